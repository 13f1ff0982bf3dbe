"""Issue 4, faults: while 2,000 messages flow, kill -9 the fan-out worker,
then the persistence worker, then restart Redis (AOF) and, with the Kafka
queue, the broker. Afterwards every acknowledged message reached every
recipient exactly once (by id) and MongoDB holds each exactly once."""
import os
import subprocess
import threading
import time
import uuid

import pymongo

from chatlib import ROOT
from wsclient import WS, HandshakeError, Closed


def stack_cmd(stack, *args):
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                       capture_output=True, text=True, env=stack.proc_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def connect(stack, user, device, cursor=None, deadline=None):
    """Connect, retrying while the stack recovers."""
    while True:
        try:
            c = WS(stack.host, stack.port, stack.ws_path, token=stack.token(user, device),
                   query=None if cursor is None else f"cursor={cursor}", timeout=5)
            c.hello = c.recv()
            return c
        except (HandshakeError, OSError, TimeoutError, ConnectionError):
            if deadline and time.time() > deadline:
                raise
            time.sleep(0.2)


class Receiver(threading.Thread):
    """A device that stays online, reconnecting from its last cursor."""

    def __init__(self, stack, user):
        super().__init__(daemon=True)
        self.stack, self.user = stack, user
        self.ids, self.dups, self.cursor, self.stop = [], [], 0, False
        self.seen = set()

    def run(self):
        while not self.stop:
            try:
                c = connect(self.stack, self.user, "recv", cursor=self.cursor, deadline=time.time() + 120)
            except Exception:
                continue
            try:
                while not self.stop:
                    try:
                        m = c.recv(timeout=0.5)
                    except TimeoutError:
                        continue
                    if m.get("type") == "msg":
                        if m["id"] in self.seen:
                            self.dups.append(m["id"])
                        self.seen.add(m["id"])
                        self.ids.append(m["id"])
                    if "cursor" in m:
                        self.cursor = max(self.cursor, m["cursor"])
                        c.send_json({"type": "ack", "cursor": self.cursor})
            except (Closed, OSError, ConnectionError, ValueError):
                pass
            finally:
                c.close()


class Sender(threading.Thread):
    """Sends n messages; retries each with its client_id until acknowledged."""

    def __init__(self, stack, user, to, n, interval):
        super().__init__(daemon=True)
        self.stack, self.user, self.to, self.n, self.interval = stack, user, to, n, interval
        self.acked = {}

    def run(self):
        c = connect(self.stack, self.user, "send", deadline=time.time() + 120)
        for i in range(self.n):
            cid = f"{self.user}-{i}"
            deadline = time.time() + 120
            while cid not in self.acked:
                assert time.time() < deadline, f"{cid} never acknowledged"
                try:
                    c.send_json({"type": "send", "client_id": cid, "to": self.to, "body": f"{i}"})
                    while True:
                        m = c.recv(timeout=5)
                        if m.get("client_id") == cid:
                            break
                    if m["type"] == "ack":
                        self.acked[cid] = m["id"]
                    else:
                        time.sleep(0.2)            # unavailable or rate limited: retry
                except (Closed, OSError, ConnectionError, TimeoutError):
                    c.close()
                    time.sleep(0.2)
                    c = connect(self.stack, self.user, "send", deadline=time.time() + 120)
            time.sleep(self.interval)
        c.close()


def test_no_acknowledged_message_is_lost_or_doubled_across_faults(stack):
    run = uuid.uuid4().hex[:8]
    pairs = [(f"fs{run}{i}", f"fr{run}{i}") for i in range(20)]
    receivers = {r: Receiver(stack, r) for _, r in pairs}
    for r in receivers.values():
        r.start()
    time.sleep(1)
    senders = [Sender(stack, s, r, 100, 0.05) for s, r in pairs]     # 2,000 messages, ~10 s
    for s in senders:
        s.start()
    faults = ["worker-fanout", "worker-persist", "redis"]
    if stack.env["CHAT_QUEUE"] == "kafka":
        faults.append("kafka")
    for name in faults:
        time.sleep(2)
        stack_cmd(stack, "kill", name)
        time.sleep(1)
        stack_cmd(stack, "up")
    for s in senders:
        s.join(300)
        assert not s.is_alive(), "a sender is stuck"
    acked = {}
    for s in senders:
        acked.update({mid: s.to for mid in s.acked.values()})
    assert len(acked) == 2000

    # every acknowledged message reaches its recipient, exactly once
    deadline = time.time() + 120
    while time.time() < deadline:
        missing = [m for m, to in acked.items() if m not in receivers[to].seen]
        if not missing:
            break
        time.sleep(1)
    for r in receivers.values():
        r.stop = True
    assert not missing, f"{len(missing)} acknowledged messages never arrived"
    for r in receivers.values():
        assert not r.dups, f"{r.user} saw duplicates: {r.dups[:5]}"

    # and MongoDB holds each exactly once
    db = pymongo.MongoClient(stack.env["MONGO_URI"]).get_default_database()
    deadline = time.time() + 120
    while time.time() < deadline:
        n = db.messages.count_documents({"_id": {"$in": list(acked)}})
        if n == len(acked):
            break
        time.sleep(1)
    assert n == len(acked)
    docs = list(db.messages.find({"_id": {"$in": list(acked)}}, {"_id": 1, "conv": 1, "seq": 1}))
    assert len(docs) == len(acked)
    per_conv = {}
    for d in docs:
        per_conv.setdefault(d["conv"], []).append(d["seq"])
    for conv, seqs in per_conv.items():
        assert sorted(seqs) == list(range(1, 101)), conv
