#!/usr/bin/env python3
"""Fan-out / persist throughput: preload N one-to-one messages into the
shard streams (or, with --queue kafka, the topic chat.in) exactly as
ngx_chat_module enqueues them (docs/PIPELINE.md), then start the role and
time until its consumer group has acknowledged everything. Recipients are online: each user has a live registry entry on
one of two fake nginx worker channels, so every message costs two inbox
appends and one or two PUBLISHes.

  scripts/stack up --dir .stack-workers --port-base 17900
  .venv/bin/python workers/bench/fanout_bench.py --dir .stack-workers --role fanout -n 100000

The role is killed (scripts/stack kill) before the preload and started
again (scripts/stack up) for the timed part. With --queue kafka the stack's
role is left alone (it reads the Redis streams) and a Kafka-mode process of
the role is started for the timed part and stopped after it.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
import zlib

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env_of(d):
    out = {}
    for line in open(os.path.join(d, "env")):
        k, _, v = line.strip().partition("=")
        if k:
            out[k] = v
    return out


def register(r, users, now):
    """every user online on one of two fake nginx worker channels"""
    p = r.pipeline(transaction=False)
    for i, u in enumerate(users):
        p.zadd("chat:{u:%s}:conns" % u, {"chat:w:bench:%d|d1|s%d" % (i % 2, i): now + 3600_000})
        p.pexpire("chat:{u:%s}:conns" % u, 3600_000)
    p.execute()


def entries(a, users, run, now):
    """(shard, fields) of a.n messages between random pairs of users"""
    seqs = {}
    for i in range(a.n):
        x, y = random.sample(users, 2)
        conv = "d:%s:%s" % (min(x, y), max(x, y))
        s = zlib.crc32(conv.encode()) % a.shards
        seq = seqs[conv] = seqs.get(conv, 0) + 1
        ev = {"type": "msg", "id": "%s-%d" % (run, i), "conv": conv, "seq": seq, "from": x, "to": y,
              "body": "hello there, message %d" % i, "kind": "text", "ts": now}
        yield s, {"t": "msg", "conv": conv, "from": x, "dev": "d1", "to": y, "seq": str(seq),
                  "ev": json.dumps(ev, separators=(",", ":"))}


def kafka_bench(a, env, r):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = env["KAFKA_BROKERS"]
    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic("chat.in", num_partitions=a.shards, replication_factor=1)]).values():
        try:
            f.result(30)
        except Exception:
            pass
    now = int(time.time() * 1000)
    run = "k%d" % (now % 100000000)
    users = ["%s-u%d" % (run, i) for i in range(a.users)]
    register(r, users, now)
    prod = Producer({"bootstrap.servers": brokers, "acks": "all", "linger.ms": 5, "enable.idempotence": True})
    t0 = time.time()
    for s, fields in entries(a, users, run, now):
        while True:
            try:
                prod.produce("chat.in", key=fields["conv"], value=json.dumps(fields), partition=s)
                break
            except BufferError:
                prod.poll(0.05)
    prod.flush(60)
    print("preloaded %d records in %.1f s" % (a.n, time.time() - t0), flush=True)
    lag_c = Consumer({"bootstrap.servers": brokers, "group.id": "chat-" + a.role, "enable.auto.commit": False})
    parts = [TopicPartition("chat.in", p) for p in range(a.shards)]
    high = {p.partition: lag_c.get_watermark_offsets(p, timeout=10)[1] for p in parts}

    def lag():
        return sum(high[tp.partition] - max(tp.offset, 0) for tp in lag_c.committed(parts, timeout=10))
    start_lag = lag()
    t0 = time.time()
    proc = subprocess.Popen([os.path.join(ROOT, "build/chat-worker") if not os.environ.get("NGX_CHAT_WORKER")
                             else os.environ["NGX_CHAT_WORKER"], "--config", env["CHAT_WORKER_CONF"],
                             "--role", a.role], env=dict(os.environ, CHAT_QUEUE="kafka"),
                            stdout=subprocess.DEVNULL, stderr=open("/tmp/bench-kafka-%s.log" % a.role, "w"))
    first = None
    try:
        while True:
            left = lag()
            if first is None and left < start_lag:
                first = time.time()
            if left == 0:
                break
            if time.time() - t0 > 600:
                sys.exit("timed out with %d records left" % left)
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait()
    t_end = time.time()
    print("%s (kafka): %d records in %.2f s = %.0f messages/s including process start and group join; "
          "%.2f s = %.0f/s from the first commit"
          % (a.role, start_lag, t_end - t0, start_lag / (t_end - t0), t_end - first, start_lag / (t_end - first)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".stack-workers")
    ap.add_argument("--role", default="fanout", choices=["fanout", "persist"])
    ap.add_argument("-n", type=int, default=100000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--queue", default="redis", choices=["redis", "kafka"])
    a = ap.parse_args()
    env = env_of(a.dir)
    r = redis.Redis.from_url(env["REDIS_URL"])
    stack = [os.path.join(ROOT, "scripts/stack")]
    if a.queue == "kafka":
        return kafka_bench(a, env, r)
    subprocess.run(stack + ["kill", "worker-" + a.role, "--dir", a.dir], check=False, capture_output=True)

    now = int(time.time() * 1000)
    run = "b%d" % (now % 100000000)
    users = ["%s-u%d" % (run, i) for i in range(a.users)]
    p = r.pipeline(transaction=False)
    register(r, users, now)
    t0 = time.time()
    for i, (s, fields) in enumerate(entries(a, users, run, now)):
        p.xadd("chat:{s%d}:in" % s, fields)
        if i % 2000 == 1999:
            p.execute()
    p.execute()
    print("preloaded %d entries in %.1f s" % (a.n, time.time() - t0), flush=True)

    last_ids = {}
    for s in range(a.shards):
        try:
            last_ids[s] = r.xinfo_stream("chat:{s%d}:in" % s)["last-generated-id"]
        except redis.ResponseError:
            pass

    def sid(x):
        ms, _, sq = x.decode().partition("-")
        return (int(ms), int(sq or 0))

    started = []
    initial = {}

    def backlog():
        """shards whose entries the role has not all committed: its position
        chat:{s<s>}:pos:<role> (workers/queue.c) before the last entry"""
        n = 0
        for s, last in last_ids.items():
            pos = r.get("chat:{s%d}:pos:%s" % (s, a.role))
            if initial.setdefault(s, pos) != pos and not started:
                started.append(time.time())
            if pos is None or sid(pos) < sid(last):
                n += 1
        return n

    start = a.n
    t0 = time.time()
    start_cmd = os.environ.get("BENCH_START")    # e.g. a script starting several fan-out workers
    subprocess.Popen(start_cmd if start_cmd else stack + ["up", "--dir", a.dir], shell=bool(start_cmd),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_first = None
    while True:
        left = backlog()
        if left == 0:
            break
        if time.time() - t0 > 600:
            sys.exit("timed out with %d entries left" % left)
        time.sleep(0.02)
    t_end = time.time()
    t_first = started[0] if started else t0
    dt = t_end - t0
    appended = sum(r.zcard("chat:{u:%s}:inbox" % u) for u in users)
    print("inbox events appended: %d (expected %d)" % (appended, 2 * a.n) if a.role == "fanout" else "")
    print("%s: %d entries in %.2f s = %.0f messages/s including process start; %.2f s = %.0f/s from first ack"
          % (a.role, start, dt, start / dt, t_end - t_first, start / (t_end - t_first)))


if __name__ == "__main__":
    main()
