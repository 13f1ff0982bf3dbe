"""Helpers of the system tests, one library for every test module (no test
module imports another): ids and keys as docs/PIPELINE.md names them, queue
entries written as the module writes them (Queue: Redis Streams or Kafka),
a pub/sub listener (Channel), WebSocket clients, the stack's commands.
Fixtures built on them (r, db, q, chan) are in conftest.py."""
import json
import os
import signal
import subprocess
import threading
import time
import uuid
import zlib

import pytest
import redis

from chatlib import ROOT
from wsclient import WS, Closed


SHARDS = 16
RETENTION_MS = 365 * 86400 * 1000


# ---- helpers ------------------------------------------------------------------

def eventually(pred, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def uid(prefix="u"):
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def dconv(a, b):
    return f"d:{min(a, b)}:{max(a, b)}"


def shard(conv):
    return zlib.crc32(conv.encode()) % SHARDS


def stream(conv):
    return "chat:{s%d}:in" % shard(conv)


def ukey(user, what):
    return "chat:{u:%s}:%s" % (user, what)


def msg_fields(conv, frm, to, seq, dev="d1", body=None, mid=None, ts=None, kind="text", media=None):
    mid = mid or uid("m")
    ev = {"type": "msg", "id": mid, "conv": conv, "seq": seq, "from": frm, "to": to,
          "body": body if body is not None else f"message {seq}", "kind": kind, "ts": ts or int(time.time() * 1000)}
    if media:
        ev["media"] = media
    return {"t": "msg", "conv": conv, "from": frm, "dev": dev, "to": to, "seq": str(seq),
            "ev": json.dumps(ev, separators=(",", ":"))}


def group_msg_fields(group, frm, seq, dev="d1", body="hi", mid=None, ts=None):
    conv = "g:" + group
    ev = {"type": "msg", "id": mid or uid("m"), "conv": conv, "seq": seq, "from": frm, "group": group, "body": body,
          "kind": "text", "ts": ts or int(time.time() * 1000)}
    return {"t": "msg", "conv": conv, "from": frm, "dev": dev, "group": group, "seq": str(seq),
            "ev": json.dumps(ev, separators=(",", ":"))}


def receipt_fields(conv, by, st, seq, dev="d1", ts=None):
    ev = {"type": "receipt", "conv": conv, "status": st, "by": by, "seq": seq, "ts": ts or int(time.time() * 1000)}
    return {"t": "receipt", "conv": conv, "from": by, "dev": dev, "seq": str(seq), "st": st,
            "ev": json.dumps(ev, separators=(",", ":"))}


def ping(c):
    try:
        return c.ping()
    except redis.ConnectionError:
        return False


def redis_client(stack):
    """A client of the stack's Redis: on a cluster stack (REDIS_CLUSTER=on)
    redis-py's RedisCluster from the seeds, which routes every command by
    its key's slot (a pipeline across slots is split per node, never a
    MULTI); else a plain client."""
    if stack.env.get("REDIS_CLUSTER") == "on":
        from redis.cluster import ClusterNode, RedisCluster
        nodes = []
        for u in stack.env["REDIS_SEEDS"].split(","):
            host, port = u.split("//", 1)[1].rsplit(":", 1)
            nodes.append(ClusterNode(host, int(port)))
        return RedisCluster(startup_nodes=nodes, decode_responses=True)
    return redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)


def is_cluster(r):
    from redis.cluster import RedisCluster
    return isinstance(r, RedisCluster)


def stack_cmd(stack, *args):
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                       env=stack.proc_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


class Queue:
    """Enqueues entries the way ngx_chat_module does, on the stack's queue,
    and tells how much a consumer group has not acknowledged yet."""

    def __init__(self, stack, r):
        self.kind = stack.env.get("CHAT_QUEUE", "redis")
        self.r = r
        self.stack = stack
        self.producer = None
        self.lag_consumers = {}
        if self.kind == "kafka":
            from confluent_kafka import Producer
            self.brokers = stack.env["KAFKA_BROKERS"]
            ensure_topic(self.brokers)
            self.producer = Producer({"bootstrap.servers": self.brokers, "acks": "all",
                                      "enable.idempotence": True, "linger.ms": 2})

    def send(self, fields, raw=None):
        conv = fields.get("conv", "")
        if self.kind == "redis":
            return self.r.xadd(stream(conv), fields)
        self.producer.produce("chat.in", key=conv, value=raw if raw is not None else json.dumps(fields),
                              partition=shard(conv))
        self.producer.poll(0)

    def send_many(self, fields_list):
        if self.kind == "redis":
            p = self.r.pipeline(transaction=False)
            for f in fields_list:
                p.xadd(stream(f["conv"]), f)
            return p.execute()
        for f in fields_list:
            self.send(f)
        self.flush()

    def flush(self):
        if self.producer:
            assert self.producer.flush(30) == 0

    def backlog(self, group):
        if self.kind == "redis":
            return backlog(self.r, group)
        from confluent_kafka import Consumer, TopicPartition
        self.flush()
        c = self.lag_consumers.get(group)
        if c is None:
            c = self.lag_consumers[group] = Consumer({"bootstrap.servers": self.brokers, "group.id": "chat-" + group,
                                                      "enable.auto.commit": False})
        lag = 0
        for tp in c.committed([TopicPartition("chat.in", p) for p in range(SHARDS)], timeout=10):
            lo, hi = c.get_watermark_offsets(TopicPartition("chat.in", tp.partition), timeout=10)
            lag += hi - (tp.offset if tp.offset >= 0 else lo)
        return lag

    def close(self):
        if self.producer:
            self.producer.flush(30)
        for c in self.lag_consumers.values():
            c.close()


def ensure_topic(brokers):
    """chat.in with one partition per shard (the workers create it too)."""
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
    admin = AdminClient({"bootstrap.servers": brokers})

    def partitions():
        t = admin.list_topics("chat.in", timeout=5).topics.get("chat.in")
        return len(t.partitions) if t and not t.error else 0
    if partitions() == 0:
        for f in admin.create_topics([NewTopic("chat.in", num_partitions=SHARDS, replication_factor=1)]).values():
            try:
                f.result(30)
            except Exception:
                pass                                    # created meanwhile
    if 0 < partitions() < SHARDS:
        for f in admin.create_partitions([NewPartitions("chat.in", SHARDS)]).values():
            try:
                f.result(30)
            except Exception:
                pass
    eventually(lambda: partitions() >= SHARDS, timeout=30, what="topic chat.in")


def inbox(r, user):
    """[(cursor, event dict)] oldest first"""
    return [(int(score), json.loads(m)) for m, score in r.zrange(ukey(user, "inbox"), 0, -1, withscores=True)]


def backlog(r, group):
    """entries of every shard stream the role (fanout, persist, push) has not
    committed: after its position chat:{s<s>}:pos:<role> (workers/queue.c),
    the whole stream while it has none"""
    n = 0
    for s in range(SHARDS):
        key = "chat:{s%d}:in" % s
        pos = r.get("chat:{s%d}:pos:%s" % (s, group))
        n += r.xlen(key) if pos is None else len(r.xrange(key, "(" + pos, "+"))
    return n


class Channel:
    """A fake nginx worker: a delivery channel registered in users'
    connection registries, and a subscriber collecting what is published.
    On a cluster the fan-out SPUBLISHes delivery channels (docs/SCALING.md,
    "pub/sub"): the subscriber SSUBSCRIBEs on the channel's master."""

    def __init__(self, r):
        self.r = r
        self.name = "chat:w:test-%s:1" % uuid.uuid4().hex[:8]
        self.sharded = is_cluster(r)
        self.ps = r.pubsub()
        if self.sharded:
            self.ps.ssubscribe(self.name)
        else:
            self.ps.subscribe(self.name)
        eventually(lambda: self._confirmed(), what="subscription")
        self.got = []

    def _get(self, timeout):
        if self.sharded:
            # (with its node named, the read waits up to timeout)
            m = self.ps.get_sharded_message(timeout=timeout, target_node=self.r.get_node_from_key(self.name))
            if m is None:
                return None
            return dict(m, type={"smessage": "message", "ssubscribe": "subscribe"}.get(m["type"], m["type"]))
        return self.ps.get_message(timeout=timeout)

    def _confirmed(self):
        m = self._get(0.2)
        return m is not None and m["type"] == "subscribe"

    def register(self, user, device, ttl_ms=120000):
        sid = uuid.uuid4().hex[:6]
        self.r.zadd(ukey(user, "conns"), {f"{self.name}|{device}|{sid}": int(time.time() * 1000) + ttl_ms})
        self.r.hsetnx(ukey(user, "acked"), device, 0)   # a known device, as lua/register.lua makes it
        return sid

    def collect(self, until, timeout=15.0):
        """reads payloads until until(list of (recipients, event)) holds"""
        deadline = time.time() + timeout
        while not until(self.got):
            if time.time() > deadline:
                raise AssertionError(f"publishes so far on {self.name}: {self.got}")
            m = self._get(0.2)
            if m and m["type"] == "message":
                head, _, body = m["data"].partition("\n")
                self.got.append((head.split(" "), json.loads(body)))
        return self.got

    def drain(self, seconds=0.5):
        end = time.time() + seconds
        while time.time() < end:
            m = self._get(0.1)
            if m and m["type"] == "message":
                head, _, body = m["data"].partition("\n")
                self.got.append((head.split(" "), json.loads(body)))
        return self.got

    def close(self):
        self.ps.close()








# Queue-specific tests are collected for their queue only (see conftest.py).
redis_only = pytest.mark.queue("redis")
kafka_only = pytest.mark.queue("kafka")


def stop_worker(stack, role):
    """SIGTERM the stack's worker (a clean stop: a Kafka consumer leaves its
    group at once); `scripts/stack up` starts it again."""
    pidfile = os.path.join(stack.dir, "pids", f"worker-{role}")
    pid = int(open(pidfile).read())
    os.kill(pid, signal.SIGTERM)

    def gone():
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        except FileNotFoundError:
            return True
    eventually(gone, timeout=20, what=f"worker-{role} stopped")
    os.unlink(pidfile)          # a zombie still answers kill -0: `up` must not take it for alive




def get(stack, user, path):
    return stack.request("GET", stack.http + path, headers=auth(stack, user) if user else {})


def rest_request(stack, method, path, body=None, headers=None):
    """Straight to the rest worker (its unix socket), bypassing nginx."""
    return stack.rest_request(method, path, body=body, headers=headers)


# ---- WebSocket clients -------------------------------------------------------

# The test stack's WebSocket without the per-user send limit (conf/
# test-locations.conf): for senders of more than the default burst (10).
BULK = "/chat/test/ws-bulk"


def ws(stack, user, device=None, cursor=None, path=None):
    c = WS(stack.host, stack.port, path or stack.ws_path, token=stack.token(user, device),
           query=None if cursor is None else f"cursor={cursor}")
    c.hello = c.recv()
    assert c.hello["type"] == "hello"
    return c


uniq = uid          # the names some tests use
conv_of = dconv


def send(c, to, body, cid=None):
    cid = cid or uuid.uuid4().hex
    c.send_json({"type": "send", "client_id": cid, "to": to, "body": body})
    return cid


def ack_of(c, cid, timeout=10):
    while True:
        m = c.recv(timeout)
        if m.get("type") == "ack" and m["client_id"] == cid:
            return m
        assert m.get("type") != "error", m


def msgs(c, n, timeout=20):
    out = []
    deadline = time.time() + timeout
    while len(out) < n:
        m = c.recv(max(0.1, deadline - time.time()))
        if m["type"] == "msg":
            out.append(m)
    return out


def auth(stack, user, device=None):
    return {"Authorization": "Bearer " + stack.token(user, device)}


# ---- nginx configuration -------------------------------------------------------

def example_conf(tmp_path, module):
    """conf/nginx.conf with paths pointed at this checkout, for nginx -t."""
    (tmp_path / "logs").mkdir()
    secret = tmp_path / "jwt_secret"
    secret.write_text("example-secret-of-at-least-32-bytes\n")
    text = open(os.path.join(ROOT, "conf/nginx.conf")).read()
    text = text.replace("/usr/lib/nginx/modules/ngx_chat_module.so", module)
    text = text.replace("/etc/ngx-chat/jwt_secret", str(secret))
    text = text.replace("/etc/ngx-chat/chat-locations.conf", os.path.join(ROOT, "conf/chat-locations.conf"))
    text = text.replace("/var/log/nginx/error.log", str(tmp_path / "logs/error.log"))
    text = text.replace("/run/nginx.pid", str(tmp_path / "nginx.pid"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return conf


def module_path():
    return os.environ.get("NGX_CHAT_MODULE", os.path.join(ROOT, "build/ngx_chat_module.so"))


class RetrySender:
    """Sends n messages to b in a thread, one at a time, `gap` s apart, on
    the connection connect() returns. An `unavailable` answer means the
    same client_id again after `pause` s (the contract, PROTOCOL section 8:
    a retry of a client_id is idempotent, and nothing unacknowledged
    counts); with `reconnect`, so does a lost connection, on the connection
    reconnect() returns (the next node, say). Without it a lost connection
    is the test's failure. cid(i) names the i-th message's client_id
    (default: a fresh one); `deadline` s without an ack of one message
    fails. acks: client_id -> its ack; retries, reconnects: counts; stop:
    set, no new message is sent. start() returns self; join() raises what
    failed in the thread."""

    def __init__(self, connect, b, n, gap=0.0, reconnect=None, cid=None, deadline=90, pause=0.1):
        self.connect, self.b, self.n, self.gap = connect, b, n, gap
        self.reconnect, self.cid, self.deadline, self.pause = reconnect, cid, deadline, pause
        self.acks, self.retries, self.reconnects, self.error = {}, 0, 0, None
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def answer(self, c, cid, body):
        c.send_json({"type": "send", "client_id": cid, "to": self.b, "body": body})
        m = c.recv(30)
        while m.get("client_id") != cid:
            m = c.recv(30)
        return m

    def run(self):
        try:
            c = self.connect()
            for i in range(self.n):
                if self.stop.is_set():
                    break
                cid = self.cid(i) if self.cid else uuid.uuid4().hex
                deadline = time.time() + self.deadline
                while True:
                    assert time.time() < deadline, f"no ack for {cid} in {self.deadline} s"
                    try:
                        m = self.answer(c, cid, f"n{i}")
                    except (Closed, OSError):
                        if self.reconnect is None:
                            raise
                        self.reconnects += 1
                        time.sleep(0.2)
                        c = self.reconnect()
                        continue
                    if m["type"] == "ack":
                        self.acks[cid] = m
                        break
                    assert m["type"] == "error" and m["code"] == "unavailable", m
                    self.retries += 1
                    time.sleep(self.pause)
                time.sleep(self.gap)
            c.close()
        except Exception as e:          # reported by join()
            self.error = e

    def start(self):
        self.t.start()
        return self

    def join(self, timeout=300):
        self.t.join(timeout)
        assert not self.t.is_alive(), "sender stuck"
        if self.error:
            raise self.error
        return self
