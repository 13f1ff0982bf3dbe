"""The persist worker's coalescing window (workers/persist.c): many states
of one conversation written as one upsert must still end at the newest
state, entries read again must change nothing, and a worker killed in the
middle of a batch must leave every message exactly once in MongoDB."""
import json
import os
import random
import signal
import subprocess
import time

from chatlib import ROOT

from helpers import (dconv, eventually, msg_fields, receipt_fields, stack_cmd, stop_worker,  # noqa: F401
                     uid)


def _conv_doc(db, user, conv):
    return db.conversations.find_one({"_id": f"{user}|{conv}"}) or {}


def test_many_states_of_one_conversation_in_one_window(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    t0 = int(time.time() * 1000)
    msgs = [msg_fields(conv, alice if s % 2 else bob, bob if s % 2 else alice, s, ts=t0 + s) for s in range(1, 61)]
    ids = {s: json.loads(f["ev"])["id"] for s, f in zip(range(1, 61), msgs)}
    rcpts = ([receipt_fields(conv, bob, "delivered", s) for s in (3, 41, 17)]
             + [receipt_fields(conv, bob, "read", s) for s in (12, 39, 5)]
             + [receipt_fields(conv, alice, "read", s) for s in (58, 2)])
    entries = msgs + msgs[:20] + rcpts                   # some of them twice
    random.Random(7).shuffle(entries)
    stop_worker(stack, "persist")
    try:
        q.send_many(entries)
        q.flush()
    finally:
        stack_cmd(stack, "up")                            # the worker finds them all at once: one window
    eventually(lambda: q.backlog("persist") == 0, timeout=60, what="persist acknowledged everything")
    assert sorted(d["_id"] for d in db.messages.find({"conv": conv})) == sorted(ids.values())
    a, b = _conv_doc(db, alice, conv), _conv_doc(db, bob, conv)
    for d in (a, b):
        assert d["last_seq"] == 60 and d["ts"] == t0 + 60
        assert d["last"]["seq"] == 60 and d["last"]["id"] == ids[60] and d["last"]["body"] == "message 60"
    assert b["delivered_seq"] == 41 and b["read_seq"] == 39
    assert a["read_seq"] == 58 and a["delivered_seq"] == 0

    # the same entries again, and older ones: nothing moves back
    stale = [msg_fields(conv, alice, bob, 7, ts=t0 + 10**6)] + [receipt_fields(conv, bob, "read", 1)]
    q.send_many(msgs[:30] + stale)
    q.flush()
    eventually(lambda: q.backlog("persist") == 0, timeout=60, what="persist acknowledged the stale entries")
    assert db.messages.count_documents({"conv": conv}) == 60       # (conv, seq) is unique: an old seq is stored already
    a2, b2 = _conv_doc(db, alice, conv), _conv_doc(db, bob, conv)
    assert {k: a2[k] for k in a} == a and {k: b2[k] for k in b} == b

    # positive control: a newer message does move it
    q.send(msg_fields(conv, bob, alice, 61, ts=t0 + 61))
    q.flush()
    d = eventually(lambda: (lambda x: x if x.get("last", {}).get("seq") == 61 else None)(_conv_doc(db, alice, conv)),
                   timeout=30, what="the newer message as last")
    assert d["last_seq"] == 61 and d["ts"] == t0 + 61 and d["read_seq"] == 58


def _sigkill_persist(stack, pid):
    """kill -9 of the persist worker pid; `scripts/stack up` starts it again."""
    os.kill(pid, signal.SIGKILL)

    def gone():
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        except FileNotFoundError:
            return True
    eventually(gone, timeout=20, what="persist killed")
    os.unlink(os.path.join(stack.dir, "pids", "worker-persist"))


def _kill_mid_batch(stack, q, db, nconv, per):
    """Queues per messages in each of nconv conversations while persist is
    stopped, starts it, SIGKILLs it as soon as the batch's messages are in
    MongoDB (its conversation upserts follow), starts it again. Returns
    (entries unacknowledged at the kill, what was sent)."""
    users = [uid("k") for _ in range(nconv + 1)]
    convs = [(users[0], u, dconv(users[0], u)) for u in users[1:]]
    sent = {}
    fs = []
    for s in range(1, per + 1):
        for a, b, c in convs:
            f = msg_fields(c, a, b, s)
            sent.setdefault(c, set()).add(json.loads(f["ev"])["id"])
            fs.append(f)
    stop_worker(stack, "persist")
    try:
        q.send_many(fs)
        q.flush()
    finally:
        stack_cmd(stack, "up")
    pidfile = os.path.join(stack.dir, "pids", "worker-persist")
    pid = int(open(pidfile).read())
    # by _id: FerretDB finds that through its index, where a filter on conv
    # reads the whole collection per poll (the kill then came too late)
    first = json.loads(fs[0]["ev"])["id"]
    eventually(lambda: db.messages.find_one({"_id": first}, {"_id": 1}) is not None, timeout=60, interval=0.005,
               what="the batch's messages written")
    _sigkill_persist(stack, pid)
    left = q.backlog("persist")
    stack_cmd(stack, "up")
    eventually(lambda: q.backlog("persist") == 0, timeout=120, what="persist caught up after the restart")
    # one query per collection (FerretDB reads the whole collection for a
    # filter other than {_id}: one per conversation would be slow)
    got = {}
    for d in db.messages.find({"conv": {"$in": list(sent)}}, {"_id": 1, "conv": 1}):
        got.setdefault(d["conv"], []).append(d["_id"])
    ids = [f"{u}|{c}" for a, b, c in convs for u in (a, b)]
    docs = {d["_id"]: d for d in db.conversations.find({"_id": {"$in": ids}})}
    for a, b, c in convs:
        assert len(got.get(c, [])) == len(set(got.get(c, []))) and set(got.get(c, [])) == sent[c], c
        for u in (a, b):
            d = docs.get(f"{u}|{c}", {})
            assert d.get("last_seq") == per and d.get("last", {}).get("seq") == per, (u, c)
    return left


def test_killed_mid_batch_every_message_exactly_once(stack, r, q, db):
    # the kill must land between the batch's insert and its acknowledgement:
    # 1,000 conversations make 2,000 upserts after the insert (each one
    # cheap now that the stack's FerretDB finds documents by _id: 200
    # conversations were often done before the kill); a kill that came too
    # late (everything acknowledged) is tried again
    for _ in range(6):
        if _kill_mid_batch(stack, q, db, 1000, 3) > 0:
            return
    raise AssertionError("the kill never landed inside a batch: the test proved nothing")


def _restart_persist(stack, kill, **env):
    """Stops the persist worker (SIGKILL, or SIGTERM: a clean stop) and
    starts it again with env on top of the stack's."""
    if kill:
        _sigkill_persist(stack, int(open(os.path.join(stack.dir, "pids", "worker-persist")).read()))
    else:
        stop_worker(stack, "persist")
    p = subprocess.run([os.path.join(ROOT, "scripts/stack"), "up", "--dir", stack.dir],
                       env=dict(stack.proc_env, **env), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_conversation_state_waits_and_its_batch_is_not_acknowledged_before(stack, r, q, db):
    """persist_state_delay_ms: a conversation's document is written that
    long after its change (history at once), and the batch is not
    acknowledged before: a worker killed in between leaves the entry to the
    next one, which writes the state. A clean stop writes what waits."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    _restart_persist(stack, False, CHAT_PERSIST_STATE_DELAY_MS="30000")
    try:
        f = msg_fields(conv, alice, bob, 1)
        mid = json.loads(f["ev"])["id"]
        q.send(f)
        q.flush()
        eventually(lambda: db.messages.find_one({"_id": mid}, {"_id": 1}) is not None, timeout=30,
                   what="the message in history")
        time.sleep(1.0)                                   # past any acknowledgement of the batch alone
        assert _conv_doc(db, bob, conv) == {} and _conv_doc(db, alice, conv) == {}
        assert q.backlog("persist") >= 1, "acknowledged before its conversation state was written"
        _restart_persist(stack, True, CHAT_PERSIST_STATE_DELAY_MS="200")
        for u in (alice, bob):
            eventually(lambda: _conv_doc(db, u, conv).get("last", {}).get("seq") == 1, timeout=60,
                       what=f"{u}'s conversation state written by the next worker")
        eventually(lambda: q.backlog("persist") == 0, timeout=60, what="the entry acknowledged")
        assert db.messages.count_documents({"_id": mid}) == 1

        # a clean stop (SIGTERM) writes the waiting state and acknowledges it
        _restart_persist(stack, False, CHAT_PERSIST_STATE_DELAY_MS="30000")
        q.send(msg_fields(conv, bob, alice, 2))
        q.flush()
        eventually(lambda: db.messages.count_documents({"conv": conv}) == 2, timeout=30, what="message 2 stored")
        assert _conv_doc(db, alice, conv)["last"]["seq"] == 1
        t = time.monotonic()
        _restart_persist(stack, False)
        assert time.monotonic() - t < 25
        for u in (alice, bob):
            assert _conv_doc(db, u, conv)["last"]["seq"] == 2, u
        eventually(lambda: q.backlog("persist") == 0, timeout=60, what="message 2 acknowledged")
    finally:
        if not os.path.exists(os.path.join(stack.dir, "pids", "worker-persist")):
            stack_cmd(stack, "up")


def test_a_stored_last_of_the_old_layout_is_rewritten_and_moves_on(stack, r, q, db):
    """`last` used to start with id; $max needs seq first. The worker
    rewrites stored ones once (marker persist_meta last_seq_first)."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    stop_worker(stack, "persist")
    try:
        for u in (alice, bob):
            db.conversations.insert_one({"_id": f"{u}|{conv}", "user": u, "conv": conv, "last_seq": 5,
                                         "read_seq": 0, "delivered_seq": 0, "ts": 5,
                                         "last": {"id": "zzz-old", "conv": conv, "seq": 5, "from": alice,
                                                  "to": bob, "body": "old", "kind": "text", "ts": 5}})
        db.persist_meta.delete_many({"_id": "last_seq_first"})
    finally:
        stack_cmd(stack, "up")
    eventually(lambda: db.persist_meta.count_documents({"_id": "last_seq_first"}) == 1, timeout=60,
               what="the rewrite marker")
    d = _conv_doc(db, alice, conv)
    assert list(d["last"])[0] == "seq" and d["last"]["id"] == "zzz-old" and d["last"]["body"] == "old"
    q.send(msg_fields(conv, bob, alice, 4, ts=4))            # older: stays
    q.send(msg_fields(conv, bob, alice, 6, ts=6, body="new"))
    q.flush()
    eventually(lambda: q.backlog("persist") == 0, timeout=60, what="persisted")
    for u in (alice, bob):
        d = _conv_doc(db, u, conv)
        assert d["last"]["seq"] == 6 and d["last"]["body"] == "new" and d["last_seq"] == 6 and d["ts"] == 6


def test_the_stacks_ferretdb_finds_a_document_by_id_through_an_index(stack, db):
    """FerretDB 1.24 (SQLite) filters by `_ferretdb_sjson->'$._id'` while its
    own _id index is on `_ferretdb_sjson->"_id"`, so without the index
    scripts/stack adds, every update by _id scans the table (the persist
    worker's upserts: docs/BENCHMARKS.md, "FerretDB finds by _id"). The
    query plan of exactly that statement must search an index, for every
    collection the workers write by _id, and the database must run without
    an fsync per statement (synchronous=NORMAL in WAL mode)."""
    import sqlite3
    path = os.path.join(stack.dir, "ferretdb", "data", "chat.sqlite")
    assert os.path.exists(path), "the stack runs its own FerretDB with the SQLite backend"
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        tables = dict(c.execute("SELECT name, table_name FROM _ferretdb_collections"))
        for coll in ("messages", "conversations", "groups"):
            assert coll in tables, f"persist created {coll}"
            plan = " ".join(str(row[-1]) for row in c.execute(
                f"EXPLAIN QUERY PLAN SELECT _ferretdb_sjson FROM \"{tables[coll]}\" "
                "WHERE _ferretdb_sjson->'$._id' = ?", ("x",)))
            assert "USING INDEX" in plan and "SCAN" not in plan, f"{coll}: {plan}"
    finally:
        c.close()
    with open(os.path.join(stack.dir, "pids", "ferretdb")) as f:
        pid = int(f.read().strip())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    assert any(a.startswith("--sqlite-url=") and "_pragma=synchronous(normal)" in a for a in args), args
