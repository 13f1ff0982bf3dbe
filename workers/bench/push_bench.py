#!/usr/bin/env python3
"""Push role throughput: N offline recipients, each with one push
registration (Web Push, APNs and FCM in turn, against the strict local
provider servers of t/pushservers.py), each sent one message through nginx
(POST /chat/send, N distinct senders); measures notifications per second
(first send to last acceptance) and message-to-provider-acceptance
latency (the worker's own histogram, and the servers' clock against the
send time).

  scripts/stack up --dir .stack-pushbench --port-base 17510
  .venv/bin/python workers/bench/push_bench.py --dir .stack-pushbench -n 10000 [--delay-ms 0]

The stack's push worker (no providers) is killed and a configured one is
run for the measurement. Registrations are written straight into Redis
(chat:{u:U}:push, what the REST role would write after MongoDB), so that
the preload does not time FerretDB.
"""
import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "t"))
from chatlib import make_jwt  # noqa: E402
from pushservers import PushServers  # noqa: E402


def env_of(d):
    out = {}
    for line in open(os.path.join(d, "env")):
        k, _, v = line.strip().partition("=")
        if k:
            out[k] = v
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".stack-pushbench")
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--senders", type=int, default=8, help="sending threads")
    ap.add_argument("--server-port", type=int, default=17570)
    ap.add_argument("--providers", default="webpush,apns,fcm", help="registrations go round these")
    a = ap.parse_args()
    d = os.path.abspath(a.dir)
    env = env_of(d)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    subprocess.run([os.path.join(ROOT, "scripts/stack"), "kill", "worker-push", "--dir", d], capture_output=True)

    srv = PushServers(os.path.join(d, "pushbench"), a.server_port)
    conf = os.path.join(d, "pushbench", "push.conf")
    with open(conf, "w") as f:
        f.write(open(env["CHAT_WORKER_CONF"]).read() + srv.worker_conf()
                + f"push_delay_ms = {a.delay_ms}\nnode_id = push-bench\n")
    log = open(os.path.join(d, "pushbench", "push.log"), "ab")
    run = uuid.uuid4().hex[:6]
    users = [f"pb{run}r{i}" for i in range(a.n)]
    senders = [f"pb{run}s{i}" for i in range(a.n)]
    ids = {}
    p = r.pipeline(transaction=False)
    order = [{"webpush": 0, "apns": 1, "fcm": 2}[x] for x in a.providers.split(",")]
    for i, u in enumerate(users):
        kind = order[i % len(order)]
        if kind == 0:
            sid, sub = srv.webpush.subscribe()
            reg = {"provider": "webpush", "endpoint": sub["endpoint"], "p256dh": sub["keys"]["p256dh"],
                   "auth": sub["keys"]["auth"]}
            ids[("webpush", sid)] = i
        elif kind == 1:
            tok = os.urandom(32).hex()
            reg = {"provider": "apns", "token": tok, "topic": srv.apns.topic, "env": "production"}
            ids[("apns", tok)] = i
        else:
            tok = "fcm:" + uuid.uuid4().hex * 3
            reg = {"provider": "fcm", "token": tok}
            ids[("fcm", tok)] = i
        p.hset("chat:{u:%s}:push" % u, "dev", json.dumps(reg, separators=(",", ":")))
        if i % 1000 == 999:
            p.execute()
    p.execute()
    worker = os.environ.get("NGX_CHAT_WORKER", os.path.join(ROOT, "build/chat-worker"))
    wp = subprocess.Popen([worker, "--config", conf, "--role", "push"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while "push: consuming the queue" not in open(log.name, errors="replace").read():
        assert time.time() < deadline and wp.poll() is None, "push worker did not start"
        time.sleep(0.1)
    if env.get("CHAT_QUEUE") == "kafka":
        time.sleep(3)

    host, port = env["CHAT_HTTP_URL"].split("//")[1].split("/")[0].split(":")
    sent_at = [0.0] * a.n
    secret = env["CHAT_JWT_SECRET"]

    def sender(k):
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        for i in range(k, a.n, a.senders):
            tok = make_jwt(secret, {"sub": senders[i], "dev": "d", "exp": int(time.time()) + 3600})
            body = json.dumps({"client_id": f"b{i}", "to": users[i], "body": f"bench message {i}"})
            sent_at[i] = time.time()
            c.request("POST", "/chat/send", body=body, headers={"Authorization": "Bearer " + tok,
                                                                "Content-Type": "application/json"})
            resp = c.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
        c.close()

    t0 = time.time()
    th = [threading.Thread(target=sender, args=(k,)) for k in range(a.senders)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    t_sent = time.time()

    def done():
        return len(srv.webpush.received) + len(srv.apns.received) + len(srv.fcm.received)
    deadline = time.time() + 600
    while done() < a.n and time.time() < deadline:
        time.sleep(0.2)
    t_end = max([n["t"] for p_ in (srv.webpush, srv.apns, srv.fcm) for n in p_.received] or [time.time()])
    lat = []
    for prov, p_ in (("webpush", srv.webpush), ("apns", srv.apns), ("fcm", srv.fcm)):
        for n in p_.received:
            key = (prov, n.get("sub") or n.get("token"))
            if key in ids:
                lat.append((n["t"] - sent_at[ids[key]]) * 1000)
    time.sleep(1.5)
    stats = r.hgetall("chat:{push}:stats:push-bench")
    f = open(f"/proc/{wp.pid}/stat").read().rsplit(")", 1)[1].split()
    worker_cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    wp.send_signal(signal.SIGTERM)
    wp.wait(20)
    srv.close()
    got = done()
    print(json.dumps({
        "n": a.n, "queue": env.get("CHAT_QUEUE"), "providers": a.providers, "push_delay_ms": a.delay_ms, "received": got,
        "violations": srv.violations(),
        "send_s": round(t_sent - t0, 2), "total_s": round(t_end - t0, 2),
        "notifications_per_s": round(got / (t_end - t0), 1),
        "server_latency_ms": {"p50": round(pct(lat, 50), 1), "p99": round(pct(lat, 99), 1),
                              "max": round(max(lat) if lat else 0, 1)},
        "cpu_s": {"push_worker": round(worker_cpu, 2),
                   "bench_and_fake_providers": round(ru.ru_utime + ru.ru_stime, 2)},
        "worker_stats": {k: v for k, v in stats.items() if k.endswith(("_sent", "_p50_ms", "_p99_ms", "_failed",
                                                                         "_retried"))},
    }, indent=1))
    subprocess.run([os.path.join(ROOT, "scripts/stack"), "up", "--dir", d], capture_output=True)
    return 0 if got >= a.n else 1


if __name__ == "__main__":
    sys.exit(main())
