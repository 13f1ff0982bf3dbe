"""Issue 10: hardening. Each test reproduces one finding of the outside
review (a hostile or careless client) against the real stack, on both
queues, and proves the fix: budgets for every client action, ephemeral
events that never cost a recipient its connection, nothing acknowledged
ever dropped, no impersonation path, safe defaults."""
import json
import os
import time
import uuid

import pytest

from chatlib import ROOT
from wsclient import WS


def _uid(prefix="u"):
    return f"{prefix}{uuid.uuid4().hex[:10]}"


# ============================================================================
# Module side: budgets, typing, read pointers, dedup, sizes, presence privacy
# ============================================================================



# ============================================================================
# Store and workers side: dead letters, encodings, REST hop, stack defaults
# ============================================================================


import zlib

import pymongo
import redis

SHARDS = 16
JS_MAX = 2 ** 53 - 1          # the one integer range of seqs, cursors, pointers


def _eventually(pred, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def _dconv(a, b):
    return f"d:{min(a, b)}:{max(a, b)}"


def _shard(conv):
    return zlib.crc32(conv.encode()) % SHARDS


def _ws(stack, user, device=None, path=None):
    c = WS(stack.host, stack.port, path or stack.ws_path, token=stack.token(user, device))
    c.hello = c.recv()
    assert c.hello["type"] == "hello", c.hello
    return c


def _answer(c, cid, timeout=10):
    """The ack or error that answers client_id cid (other frames skipped)."""
    deadline = time.time() + timeout
    while True:
        m = c.recv(max(0.1, deadline - time.time()))
        if m.get("type") == "ack" and m.get("client_id") == cid:
            return m
        if m.get("type") == "error" and m.get("client_id") in (cid, None):
            return m


def _auth(stack, user):
    return {"Authorization": "Bearer " + stack.token(user)}


def _history(stack, user, conv):
    st, _, body = stack.request("GET", stack.http + f"/history?conv={conv}&limit=100", headers=_auth(stack, user))
    assert st == 200, body
    return body["messages"]


@pytest.fixture(scope="module")
def rds(stack):
    c = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    yield c
    c.close()


@pytest.fixture(scope="module")
def mdb(stack):
    c = pymongo.MongoClient(stack.env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    yield c.get_default_database()
    c.close()


def _dlq_count(rds, role):
    return int(rds.hget("chat:{dlq}:count", role) or 0)


def _enqueue_raw(stack, rds, conv, fields=None, raw=None):
    """Puts an entry on the stack's queue directly (bypassing the module)."""
    if stack.env.get("CHAT_QUEUE") == "kafka":
        from confluent_kafka import Producer
        p = Producer({"bootstrap.servers": stack.env["KAFKA_BROKERS"], "acks": "all"})
        p.produce("chat.in", key=conv, value=raw if raw is not None else json.dumps(fields), partition=_shard(conv))
        assert p.flush(30) == 0
        return None
    return rds.xadd("chat:{s%d}:in" % _shard(conv), fields)


def _dlq_records(stack, rds, role, marker, timeout=20):
    """Dead letters of role whose content holds marker: dicts of their fields
    (Redis stream) or {"value", headers...} (Kafka topic chat.dlq)."""
    if stack.env.get("CHAT_QUEUE") != "kafka":
        def find():
            return [f for _, f in rds.xrange("chat:{dlq}:%s" % role) if any(marker in v for v in f.values())]
        return _eventually(find, timeout=timeout, what=f"dead letter {marker} of {role}")
    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": stack.env["KAFKA_BROKERS"], "group.id": _uid("dlqtest"),
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe(["chat.dlq"])
    found, deadline = [], time.time() + timeout
    try:
        while not found and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            value = m.value().decode(errors="replace")
            hdrs = {k: v.decode() for k, v in (m.headers() or [])}
            if m.key() == role.encode() and marker in value:
                found.append({"value": value, **hdrs})
    finally:
        c.close()
    assert found, f"no dead letter {marker} of {role} on chat.dlq"
    return found


# Bodies that must survive module -> queue -> MongoDB -> history unchanged:
# (name, body as written in the client's JSON text)
_BODIES = [
    ("nul", r"before\u0000after"),
    ("nul-only", r"\u0000"),
    ("controls", "".join("\\u%04x" % c for c in range(1, 32))),
    ("surrogate-pair", r"\ud83d\ude00 pair"),
    ("four-byte-utf8", "😀🀄𝄞 raw"),
    ("max-body", "😀" * 1000),                  # chat_max_body default: 1000 characters
]


def test_acked_bodies_reach_history_and_mongodb_unchanged(stack, rds, mdb):
    """Item 3: whatever the module acks, persist stores. A body with U+0000
    was acked, delivered live, and dropped by persist (`ev has no message
    id`: jansson refuses \\u0000 unless told otherwise)."""
    a, b = _uid("enc"), _uid("enc")
    conv = _dconv(a, b)
    before = {r: _dlq_count(rds, r) for r in ("fanout", "persist")}
    ca, cb = _ws(stack, a), _ws(stack, b)
    sent = {}
    for name, raw in _BODIES:
        cid = "c-" + name
        ca.send_text('{"type":"send","client_id":"%s","to":"%s","body":"%s"}' % (cid, b, raw))
        ans = _answer(ca, cid)
        assert ans["type"] == "ack", (name, ans)
        sent[ans["seq"]] = (name, json.loads('"%s"' % raw))
    # each control character on its own, too
    for ch in range(1, 32):
        cid = "ctl-%d" % ch
        ca.send_text('{"type":"send","client_id":"%s","to":"%s","body":"x\\u%04xy"}' % (cid, b, ch))
        ans = _answer(ca, cid)
        assert ans["type"] == "ack", (ch, ans)
        sent[ans["seq"]] = ("control %d" % ch, "x%sy" % chr(ch))
    # live delivery carries the same bodies
    live = {}
    while len(live) < len(sent):
        m = cb.recv(10)
        if m.get("type") == "msg":
            live[m["seq"]] = m["body"]
    assert live == {s: body for s, (_, body) in sent.items()}

    def stored():
        return {m["seq"]: m["body"] for m in _history(stack, a, conv)} if len(_history(stack, a, conv)) == len(sent) else None
    hist = _eventually(stored, timeout=30, what="every acked message in history")
    for seq, (name, body) in sent.items():
        assert hist[seq] == body, name
    docs = {d["seq"]: d["body"] for d in mdb.messages.find({"conv": conv})}
    assert docs == {s: body for s, (_, body) in sent.items()}
    # the conversation list shows the newest of them, NUL and all
    st, _, lst = stack.request("GET", stack.http + "/conversations", headers=_auth(stack, b))
    row = [c for c in lst["conversations"] if c["conv"] == conv][0]
    assert row["last"]["body"] == sent[max(sent)][1]
    assert {r: _dlq_count(rds, r) for r in ("fanout", "persist")} == before, "nothing dead-lettered"
    ca.close()
    cb.close()


def test_unpaired_surrogate_is_refused_not_acked(stack, mdb):
    """A lone surrogate cannot be stored as UTF-8 (BSON, JSON): the module
    refuses it, so nothing is acked that the archive could not hold."""
    a, b = _uid("sur"), _uid("sur")
    ca = _ws(stack, a)
    for i, raw in enumerate([r"\ud800", r"x\udfffy", r"\ud83dx"]):
        cid = "s%d" % i
        ca.send_text('{"type":"send","client_id":"%s","to":"%s","body":"%s"}' % (cid, b, raw))
        ans = _answer(ca, cid)
        assert ans["type"] == "error" and ans["code"] == "bad_request", ans
    # positive control: the same session still gets a valid send acked and stored
    ca.send_text('{"type":"send","client_id":"ok","to":"%s","body":"fine"}' % b)
    assert _answer(ca, "ok")["type"] == "ack"
    _eventually(lambda: mdb.messages.count_documents({"conv": _dconv(a, b)}) == 1, what="the valid one stored")
    assert [m["body"] for m in mdb.messages.find({"conv": _dconv(a, b)})] == ["fine"]
    ca.close()


def test_malformed_queue_entries_go_to_the_dead_letter_queue(stack, rds, mdb):
    """A queue entry a worker cannot process is recorded in the dead-letter
    queue (stream chat:{dlq}:<role> or topic chat.dlq) with a counter, then
    acknowledged: never dropped silently, and it does not block the queue."""
    a, b = _uid("dl"), _uid("dl")
    conv = _dconv(a, b)
    marker = _uid("poison")
    before = {r: _dlq_count(rds, r) for r in ("fanout", "persist")}
    ev = {"type": "msg", "conv": conv, "seq": 1, "from": a, "to": b, "body": marker, "kind": "text", "ts": 1}
    # no message id: fan-out delivers it (it does not look inside ev), persist cannot store it
    _enqueue_raw(stack, rds, conv, {"t": "msg", "conv": conv, "from": a, "dev": "d", "to": b, "seq": "1",
                                    "ev": json.dumps(ev)})
    # not a valid entry at all: both roles dead-letter it
    bad = _uid("garbage")
    if stack.env.get("CHAT_QUEUE") == "kafka":
        _enqueue_raw(stack, rds, conv, raw=b"\xff" + bad.encode() + b" not json")
    else:
        _enqueue_raw(stack, rds, conv, {"t": "msg", "conv": "not-a-conv", "body": bad})
    # a valid message behind them is processed (the queue is not blocked)
    ca = _ws(stack, a)
    ca.send_json({"type": "send", "client_id": "after", "to": b, "body": "after the poison"})
    assert _answer(ca, "after")["type"] == "ack"
    _eventually(lambda: mdb.messages.count_documents({"conv": conv, "body": "after the poison"}) == 1,
                timeout=30, what="the message behind the poison stored")

    rec = _dlq_records(stack, rds, "persist", marker)[0]
    assert rec["dlq.why"] == "ev has no message id" and rec["dlq.role"] == "persist"
    for role in ("fanout", "persist"):
        r = _dlq_records(stack, rds, role, bad)[0]
        assert r["dlq.role"] == role and r["dlq.src"]
    assert _dlq_count(rds, "persist") >= before["persist"] + 2
    assert _dlq_count(rds, "fanout") >= before["fanout"] + 1
    ca.close()


def test_seq_range_is_that_of_javascript_safe_integers(stack, rds, mdb):
    """Item 5: one integer range for seqs, cursors and pointers: 0 .. 2^53-1.
    The workers accept its maximum (they refused 19 digits and dropped the
    receipt) and dead-letter what is beyond it."""
    a, b = _uid("rng"), _uid("rng")
    conv = _dconv(a, b)
    ev = {"type": "receipt", "conv": conv, "status": "read", "by": b, "seq": JS_MAX, "ts": int(time.time() * 1000)}
    _enqueue_raw(stack, rds, conv, {"t": "receipt", "conv": conv, "from": b, "dev": "d", "seq": str(JS_MAX),
                                    "st": "read", "prev": "0", "ev": json.dumps(ev)})
    _eventually(lambda: (mdb.conversations.find_one({"_id": f"{b}|{conv}"}) or {}).get("read_seq") == JS_MAX,
                timeout=30, what="the read pointer at 2^53-1 stored")
    before = _dlq_count(rds, "persist")
    ev["seq"] = JS_MAX + 1
    marker = str(JS_MAX + 1)
    _enqueue_raw(stack, rds, conv, {"t": "receipt", "conv": conv, "from": b, "dev": "d", "seq": marker,
                                    "st": "read", "prev": "0", "ev": json.dumps(ev)})
    rec = _dlq_records(stack, rds, "persist", marker)[0]
    assert "2^53-1" in rec["dlq.why"]
    _eventually(lambda: _dlq_count(rds, "persist") > before, what="dead-letter counter")
    assert mdb.conversations.find_one({"_id": f"{b}|{conv}"})["read_seq"] == JS_MAX


BURSTS = 40


def test_conversation_list_never_counts_past_its_last_message(stack):
    """Item 10: right after three messages the list showed unread: 3 with
    `last` still the first one (messages are stored before `last` is set).
    Polled as fast as possible during bursts, every answer must be
    consistent: the unread messages all lie at or before `last`."""
    import threading
    a, b = _uid("cl"), _uid("cl")
    conv = _dconv(a, b)
    ca = _ws(stack, a)
    stop = threading.Event()
    seen, bad = [], []

    def poll():
        while not stop.is_set():
            st, _, body = stack.request("GET", stack.http + "/conversations", headers=_auth(stack, b))
            if st != 200:
                bad.append(("status", st, body))
                continue
            for row in body["conversations"]:
                if row["conv"] != conv:
                    continue
                seen.append((row["unread"], row["last"]["seq"]))
                # b sends nothing: unread = messages after read_seq up to last
                if row["last"] is None or row["unread"] > row["last"]["seq"] - row["read_seq"] \
                        or row["last_seq"] != row["last"]["seq"]:
                    bad.append(row)
    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    n = 0
    try:
        for burst in range(BURSTS):
            for k in range(3):
                n += 1
                ca.send_json({"type": "send", "client_id": f"b{n}", "to": b, "body": f"burst {burst} #{k}"})
            for k in range(3):
                assert ca.recv_type("ack")["type"] == "ack"
            time.sleep(0.05)
        # positive control: the list does catch up with all of them
        def caught_up():
            st, _, body = stack.request("GET", stack.http + "/conversations", headers=_auth(stack, b))
            row = [r for r in body["conversations"] if r["conv"] == conv]
            return row and row[0]["unread"] == n and row[0]["last"]["body"] == f"burst {BURSTS - 1} #2"
        _eventually(caught_up, timeout=30, what="the list shows every message")
    finally:
        stop.set()
        for t in threads:
            t.join()
        ca.close()
    assert not bad, bad[:5]
    assert len(seen) > 20 and len({u for u, _ in seen}) > 3, "the list was polled while it changed"


def test_conversation_list_mid_batch_state_is_consistent(stack, mdb):
    """Item 10, deterministically: persist inserts a batch's messages first
    and sets the conversation's `last` afterwards. The state in between
    (message stored, conversation not yet updated) must list the old `last`
    with the unread count that goes with it, not one more."""
    a, b = _uid("mid"), _uid("mid")
    conv = _dconv(a, b)
    ca = _ws(stack, a)
    ca.send_json({"type": "send", "client_id": "one", "to": b, "body": "first"})
    first = _answer(ca, "one")
    assert first["type"] == "ack"
    ca.close()

    def row():
        st, _, body = stack.request("GET", stack.http + "/conversations", headers=_auth(stack, b))
        assert st == 200, body
        r = [c for c in body["conversations"] if c["conv"] == conv]
        return r[0] if r else None
    r1 = _eventually(lambda: row() if (row() or {}).get("unread") == 1 else None, what="first message listed")
    assert r1["last"]["body"] == "first"
    # what step 1 of the next batch writes, before steps 4 and 5
    ts = first["ts"] + 1
    doc = {"_id": _uid("m"), "conv": conv, "seq": 2, "from": a, "to": b, "body": "second", "kind": "text", "ts": ts}
    mdb.messages.insert_one(doc)
    r2 = row()
    assert r2["last"]["seq"] == 1 and r2["unread"] == 1 and r2["last_seq"] == 1, r2
    # positive control: once `last_seq` is raised (step 4) the list still
    # waits for `last`; when `last` is set (step 5) it shows both
    mdb.conversations.update_one({"_id": f"{b}|{conv}"}, {"$max": {"last_seq": 2, "ts": ts}})
    r3 = row()
    assert r3["last"]["seq"] == 1 and r3["unread"] == 1, r3
    last = {k: v for k, v in doc.items() if k != "_id"}
    last["id"] = doc["_id"]
    mdb.conversations.update_one({"_id": f"{b}|{conv}"}, {"$set": {"last": last, "ts": ts}})
    r4 = row()
    assert r4["last"]["seq"] == 2 and r4["unread"] == 2 and r4["last"]["body"] == "second", r4
