#!/usr/bin/env python3
"""Fan-out throughput on one Redis node against a 3-master Redis Cluster
(issue 12), in the same run, alternating: each round starts an empty
single node (or an empty 6-node cluster, 3 masters + 3 replicas) on
--port .. --port+5, preloads N one-to-one messages between online users
into the shard streams exactly as the module enqueues them (docs/PIPELINE.md),
starts a fan-out worker and times until its consumer group has acknowledged
everything. Every message costs two inbox appends and one or two SPUBLISH/
PUBLISHes. Redis commands are counted per master (INFO commandstats, less
the preload's XADDs) and given per message.

  make worker && git worktree / archive of the previous commit built to OLD
  .venv/bin/python workers/bench/cluster_fanout_bench.py -n 20000 --rounds 3 \\
      --worker build/chat-worker [--baseline OLD/build/chat-worker]

--baseline: an earlier worker binary, run on the single node in each round
too (the single-node path must not get slower).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import redis


# the tests' key slot (t/golden.py, held to the shared vectors)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "t"))
from golden import key_slot  # noqa: E402


def keyslot(key):
    return key_slot(key.encode())


def state_ok(port):
    try:
        info = redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER INFO")
    except redis.RedisError:
        return False
    return info.get("cluster_state") == "ok" if isinstance(info, dict) else "cluster_state:ok" in info


class Servers:
    def __init__(self, port, cluster):
        self.dir = tempfile.mkdtemp(prefix="cwbench")
        self.ports = [port + i for i in range(6)] if cluster else [port]
        self.cluster = cluster
        self.procs = []
        for p in self.ports:
            args = ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self.dir, "--logfile", f"r{p}.log"]
            if cluster:
                args += ["--cluster-enabled", "yes", "--cluster-config-file", f"n{p}.conf",
                         "--cluster-node-timeout", "2000"]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in self.ports:
            for _ in range(100):
                try:
                    redis.Redis(port=p).ping()
                    break
                except redis.RedisError:
                    time.sleep(0.05)
        self.slots = None
        if cluster:
            subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True)
            for _ in range(200):
                if all(state_ok(p) for p in self.ports):
                    break
                time.sleep(0.1)
            self.slots = [(s[0], s[1], int(s[2][1])) for s in
                          redis.Redis(port=self.ports[0]).execute_command("CLUSTER SLOTS")]
        self.conns = {}

    def masters(self):
        return sorted({m for _, _, m in self.slots}) if self.cluster else self.ports

    def owner(self, key):
        if not self.cluster:
            return self.ports[0]
        s = keyslot(key)
        for a, b, m in self.slots:
            if a <= s <= b:
                return m

    def conn(self, port):
        if port not in self.conns:
            self.conns[port] = redis.Redis(port=port, decode_responses=True)
        return self.conns[port]

    def calls(self):
        out = {}
        for m in self.masters():
            st = self.conn(m).info("commandstats")
            out[m] = {k: v["calls"] for k, v in st.items()}
        return out

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def preload(sv, a, run):
    users = ["bu%d_%d" % (run, i) for i in range(a.users)]
    now = int(time.time() * 1000)
    by_node = {}
    for i, u in enumerate(users):
        k = "chat:{u:%s}:conns" % u
        by_node.setdefault(sv.owner(k), []).append(("zadd", k, {"chat:w:bench:%d|d1|s%d" % (i % 2, i): now + 3600_000}))
    seqs = {}
    for i in range(a.n):
        x, y = random.sample(users, 2)
        conv = "d:%s:%s" % (min(x, y), max(x, y))
        s = zlib.crc32(conv.encode()) % 16
        seq = seqs[conv] = seqs.get(conv, 0) + 1
        ev = {"type": "msg", "id": "%d-%d" % (run, i), "conv": conv, "seq": seq, "from": x, "to": y,
              "body": "hello there, message %d" % i, "kind": "text", "ts": now}
        key = "chat:{s%d}:in" % s
        by_node.setdefault(sv.owner(key), []).append(
            ("xadd", key, {"t": "msg", "conv": conv, "from": x, "dev": "d1", "to": y, "seq": str(seq),
                           "ev": json.dumps(ev, separators=(",", ":"))}))
    for port, ops in by_node.items():
        p = sv.conn(port).pipeline(transaction=False)
        for op, k, v in ops:
            getattr(p, op)(k, v)
            if len(p) >= 1000:
                p.execute()
        p.execute()


def run_one(a, worker, cluster, run):
    sv = Servers(a.port, cluster)
    try:
        # no position yet: the worker starts at the first entry (lua/queue_start.lua)
        preload(sv, a, run)
        before = sv.calls()
        conf = os.path.join(sv.dir, "w.conf")
        with open(conf, "w") as f:
            f.write("redis_url = %s\nqueue = redis\nnode_id = bench\n" %
                    ",".join("redis://127.0.0.1:%d" % p for p in sv.ports))
        t0 = time.time()
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CHAT_QUEUE")}
        w = subprocess.Popen([worker, "--config", conf, "--role", "fanout"], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(sv.dir, "w.log"), "w"), env=env)
        keys = ["chat:{s%d}:in" % s for s in range(16)]
        lasts = {k: sv.conn(sv.owner(k)).xinfo_stream(k)["last-generated-id"] for k in keys}
        own_gets = {m: 0 for m in sv.masters()}      # our polls, left out of the counts below
        while True:
            left = 0
            for k in keys:
                c = sv.conn(sv.owner(k))
                pos = c.get(k.replace(":in", ":pos:fanout"))   # the worker's committed position
                own_gets[sv.owner(k)] += 1
                left += pos is None or pos != lasts[k]
            if left == 0:
                break
            if time.time() - t0 > 600:
                raise SystemExit("timed out")
            time.sleep(0.02)
        dt = time.time() - t0
        w.send_signal(signal.SIGTERM)
        w.wait(20)
        after = sv.calls()
        # commands the worker sent (not those its scripts ran), and every
        # command executed (scripts' redis.call included), per message
        sent_cmds = ("evalsha", "publish", "spublish", "xread", "mget", "xtrim", "set", "wait", "script|load",
                     "cluster|slots")
        sent, execd = [], []
        for m in sv.masters():
            d = {k[len("cmdstat_"):]: v - before[m].get(k, 0) for k, v in after[m].items()}
            d["get"] = d.get("get", 0) - own_gets.get(m, 0)
            sent.append(sum(d.get(k, 0) for k in sent_cmds) / a.n)
            execd.append(sum(v for k, v in d.items() if k not in ("xinfo|groups", "xinfo|stream", "info", "ping",
                                                                  "command", "command|docs")) / a.n)
        return a.n / dt, (sent, execd)
    finally:
        sv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--worker", default="build/chat-worker")
    ap.add_argument("--baseline")
    a = ap.parse_args()
    cases = []
    if a.baseline:
        cases.append(("single, baseline", a.baseline, False))
    cases += [("single", a.worker, False), ("cluster 3 masters", a.worker, True)]
    res = {c[0]: [] for c in cases}
    run = 0
    for r in range(a.rounds):
        for name, worker, cluster in cases:
            run += 1
            rate, (sent, execd) = run_one(a, worker, cluster, run)
            res[name].append((rate, sent, execd))
            print("round %d %-18s %8.0f msg/s   per message per master: commands sent %s, executed %s" %
                  (r + 1, name, rate, " ".join("%.2f" % x for x in sent), " ".join("%.2f" % x for x in execd)),
                  flush=True)
    print()
    for name, rs in res.items():
        rates = sorted(x[0] for x in rs)
        print("%-18s median %8.0f msg/s  (%s)   per message per master: sent %s, executed %s" % (
            name, rates[len(rates) // 2], " ".join("%.0f" % x for x in rates),
            " ".join("%.2f" % x for x in rs[-1][1]), " ".join("%.2f" % x for x in rs[-1][2])))


if __name__ == "__main__":
    main()
