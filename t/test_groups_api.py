"""Groups in the rest and persist roles (issue 5): the groups API behind
nginx, the membership script's Redis state and queue entries
(docs/PIPELINE.md, "Groups"), the groups documents and history records the
persist role writes, group history (members only, from `since` on, `after=`
paging), groups in the conversation list, the receipts endpoint, and the
rebuild of Redis group state from MongoDB when the rest role starts.

Group messages are enqueued the way the module's accept script does it
(HINCRBY of the group's seq counter, then XADD or a Kafka record)."""
import json
import time

import pytest
import redis

from helpers import (SHARDS, eventually, group_msg_fields, receipt_fields, rest_request, shard, stack_cmd, stream, uid,
                          ukey)

# on the single-node stack and on the cluster stack (t/conftest.py)
pytestmark = pytest.mark.topologies("single", "cluster")

MAX_MEMBERS = 500          # group_max_members default


# ---- helpers ------------------------------------------------------------------

def auth(stack, user):
    return {"Authorization": "Bearer " + stack.token(user)}


def api(stack, user, method, path, body=None):
    """(status, body) of a request through nginx as user (None: no token)."""
    st, _, b = stack.request(method, stack.http + path, body=body, headers=auth(stack, user) if user else {})
    return st, b


def gkey(group, what):
    return "chat:{s%d}:g:%s:%s" % (shard("g:" + group), group, what)


def seqkey(group):
    return "chat:{s%d}:seq" % shard("g:" + group)


def create(stack, owner, members, name="team"):
    st, b = api(stack, owner, "POST", "/groups", {"name": name, "members": members})
    assert st == 201, b
    return b["group"]


def change(stack, user, group, add=None, remove=None):
    body = {}
    if add is not None:
        body["add"] = add
    if remove is not None:
        body["remove"] = remove
    return api(stack, user, "POST", f"/groups/{group}/members", body)


def assert_error(st, b, status, code):
    assert st == status, b
    assert b["type"] == "error" and b["code"] == code and b["message"], b


def queued(stack, r, group, n, timeout=15):
    """The first n queue entries of the group's conversation (string fields)."""
    conv = "g:" + group
    if stack.env.get("CHAT_QUEUE", "redis") == "redis":
        def entries():
            got = [f for _, f in r.xrange(stream(conv), "-", "+") if f.get("conv") == conv]
            return got if len(got) >= n else None
        return eventually(entries, timeout=timeout, what=f"{n} queue entries of {conv}")[:n]
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": stack.env["KAFKA_BROKERS"], "group.id": "test-groups-" + uid(),
                  "enable.auto.commit": False})
    try:
        tp = TopicPartition("chat.in", shard(conv), 0)
        c.assign([tp])
        got, deadline = [], time.time() + timeout
        while len(got) < n and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            if m.key() == conv.encode():
                got.append(json.loads(m.value()))
        assert len(got) >= n, f"{len(got)} records of {conv} on partition {shard(conv)}"
        return got[:n]
    finally:
        c.close()


def group_msg(r, group, frm, body="hi", dev="d1", ts=None):
    """Numbers and enqueues a group message as the module's accept script
    does; returns (queue fields, seq)."""
    seq = r.hincrby(seqkey(group), "g:" + group, 1)
    return group_msg_fields(group, frm, seq, dev=dev, body=body, ts=ts), seq


def send_group_msgs(r, q, group, frm, n, ts=None):
    out = []
    for i in range(n):
        f, seq = group_msg(r, group, frm, body=f"msg {i}", ts=ts + i if ts else None)
        q.send(f)
        out.append(seq)
    q.flush()
    return out


def persisted(db, group, ver, timeout=30):
    return eventually(lambda: (lambda d: d if d and d.get("ver") == ver else None)(db.groups.find_one({"_id": group})),
                      timeout=timeout, what=f"groups document {group} at ver {ver}")


def history(stack, user, query):
    return api(stack, user, "GET", "/history?" + query)


# ---- create, read, change --------------------------------------------------------

def test_create_group(stack, r):
    alice, bob, carol = uid("alice"), uid("bob.x"), uid("carol")
    t0 = int(time.time() * 1000)
    st, b = api(stack, alice, "POST", "/groups", {"name": "Équipe \u00e9t\u00e9 \U0001F600",
                                                   "members": [bob, carol, bob, alice]})
    assert st == 201, b
    g = b["group"]
    assert 1 <= len(g) <= 64 and all(ch.isalnum() or ch in "._-" for ch in g)
    assert b == {"group": g, "name": "Équipe \u00e9t\u00e9 \U0001F600", "owner": alice,
                 "members": sorted([alice, bob, carol])}
    meta = r.hgetall(gkey(g, "meta"))
    assert meta["name"] == b["name"] and meta["owner"] == alice and meta["n"] == "3" and meta["ver"] == "1"
    assert t0 <= int(meta["created"]) <= int(time.time() * 1000)
    assert r.hgetall(gkey(g, "mem")) == {alice: "1", bob: "1", carol: "1"}
    assert r.hget(seqkey(g), "g:" + g) == "1"
    [e] = queued(stack, r, g, 1)
    assert set(e) == {"t", "conv", "group", "from", "seq", "event", "rcpt", "state", "ev"}
    assert (e["t"], e["conv"], e["group"], e["from"], e["seq"], e["event"]) == ("group", "g:" + g, g, alice, "1",
                                                                                "created")
    assert sorted(e["rcpt"].split(" ")) == sorted([alice, bob, carol])
    assert json.loads(e["state"]) == {"name": b["name"], "owner": alice, "members": sorted([alice, bob, carol]),
                                      "since": {alice: 1, bob: 1, carol: 1}, "created": int(meta["created"])}
    assert json.loads(e["ev"]) == {"type": "group", "id": f"g:{g}#1", "conv": "g:" + g, "seq": 1, "group": g,
                                   "event": "created", "members": sorted([alice, bob, carol]), "by": alice,
                                   "ts": int(meta["created"])}
    # a group of one, members omitted; every id is new
    st, b2 = api(stack, alice, "POST", "/groups", {"name": "me"})
    assert st == 201 and b2["members"] == [alice] and b2["owner"] == alice and b2["group"] != g


def test_get_group(stack, r):
    alice, bob, eve = uid("alice"), uid("bob"), uid("eve")
    g = create(stack, alice, [bob], name="readers")
    st, b = api(stack, bob, "GET", f"/groups/{g}")
    assert st == 200 and b == {"group": g, "name": "readers", "owner": alice, "members": sorted([alice, bob])}
    assert_error(*api(stack, eve, "GET", f"/groups/{g}"), 403, "forbidden")
    assert_error(*api(stack, alice, "GET", f"/groups/{uid('nosuch')}"), 404, "not_found")
    assert_error(*api(stack, alice, "GET", "/groups/bad%20id"), 400, "bad_request")
    assert_error(*api(stack, None, "GET", f"/groups/{g}"), 401, "unauthorized")


def test_owner_adds_and_removes(stack, r):
    alice, bob, carol, dave = uid("alice"), uid("bob"), uid("carol"), uid("dave")
    g = create(stack, alice, [bob])
    st, b = change(stack, alice, g, add=[carol, dave, carol], remove=[bob])
    assert st == 200 and b == {"group": g, "name": "team", "owner": alice, "members": sorted([alice, carol, dave])}
    # an added then a removed event, two seqs
    _, added, removed = queued(stack, r, g, 3)
    assert (added["event"], added["seq"], removed["event"], removed["seq"]) == ("added", "2", "removed", "3")
    assert json.loads(added["ev"])["members"] == sorted([carol, dave])
    assert json.loads(removed["ev"])["members"] == [bob] and json.loads(removed["ev"])["by"] == alice
    # the removed user is told too
    assert sorted(removed["rcpt"].split()) == sorted([alice, bob, carol, dave])
    assert json.loads(removed["state"])["since"] == {alice: 1, carol: 2, dave: 2}
    assert r.hgetall(gkey(g, "mem")) == {alice: "1", bob: "1:3", carol: "2", dave: "2"}
    meta = r.hgetall(gkey(g, "meta"))
    assert meta["n"] == "3" and meta["ver"] == "3"
    # nothing to change: the unchanged group, no event, no seq
    st, b2 = change(stack, alice, g, add=[carol], remove=[bob])
    assert st == 200 and b2 == b
    assert r.hget(seqkey(g), "g:" + g) == "3" and r.hget(gkey(g, "meta"), "ver") == "3"
    # a removed member comes back with a fresh since
    st, b3 = change(stack, alice, g, add=[bob])
    assert st == 200 and bob in b3["members"]
    assert r.hget(gkey(g, "mem"), bob) == "4"


def test_non_owner_is_refused_and_nothing_changes(stack, r):
    alice, bob, carol, eve = uid("alice"), uid("bob"), uid("carol"), uid("eve")
    g = create(stack, alice, [bob, carol])
    before = (r.hgetall(gkey(g, "meta")), r.hgetall(gkey(g, "mem")))
    assert_error(*change(stack, bob, g, add=[eve]), 403, "forbidden")
    assert_error(*change(stack, bob, g, remove=[carol]), 403, "forbidden")
    assert_error(*change(stack, bob, g, add=[eve], remove=[bob]), 403, "forbidden")   # leaving is fine, adding not
    assert_error(*change(stack, eve, g, remove=[eve]), 403, "forbidden")              # not a member
    assert_error(*change(stack, eve, g, add=[eve]), 403, "forbidden")
    assert_error(*change(stack, alice, uid("nosuch"), add=[eve]), 404, "not_found")
    assert (r.hgetall(gkey(g, "meta")), r.hgetall(gkey(g, "mem"))) == before
    assert r.hget(seqkey(g), "g:" + g) == "1"


def test_leave_and_owner_handover(stack, r):
    alice, bob, carol, dave = uid("alice"), uid("bob"), uid("carol"), uid("dave")
    g = create(stack, alice, [carol, bob])
    st, b = change(stack, carol, g, remove=[carol])              # a member leaves
    assert st == 200 and b["members"] == sorted([alice, bob]) and b["owner"] == alice
    assert_error(*api(stack, carol, "GET", f"/groups/{g}"), 403, "forbidden")
    st, b = change(stack, alice, g, add=[dave])
    assert st == 200
    # the owner leaves: the longest-standing member takes over (bob since 1, dave since 3)
    st, b = change(stack, alice, g, remove=[alice])
    assert st == 200 and b == {"group": g, "name": "team", "owner": bob, "members": sorted([bob, dave])}
    assert r.hget(gkey(g, "meta"), "owner") == bob
    ev = queued(stack, r, g, 4)[3]
    assert ev["event"] == "removed" and json.loads(ev["state"])["owner"] == bob
    # the new owner can add, the old one cannot
    assert change(stack, bob, g, add=[carol])[0] == 200
    assert_error(*change(stack, alice, g, add=[alice]), 403, "forbidden")
    # the last members leave: the group stays, empty; nobody can read or change it
    st, b = change(stack, bob, g, remove=[bob, carol])
    assert st == 200 and b["owner"] == dave and b["members"] == [dave]
    st, b = change(stack, dave, g, remove=[dave])
    assert st == 200 and b["members"] == []
    assert r.hget(gkey(g, "meta"), "n") == "0"
    assert_error(*api(stack, dave, "GET", f"/groups/{g}"), 403, "forbidden")


def test_member_cap(stack, r):
    alice = uid("alice")
    many = [f"m{i:03d}-{alice}" for i in range(MAX_MEMBERS)]          # with the creator: one too many
    st, b = api(stack, alice, "POST", "/groups", {"name": "big", "members": many})
    assert_error(st, b, 409, "too_large")
    g = create(stack, alice, many[:MAX_MEMBERS - 1], name="full")       # exactly the maximum
    assert r.hget(gkey(g, "meta"), "n") == str(MAX_MEMBERS)
    before = (r.hgetall(gkey(g, "meta")), r.hgetall(gkey(g, "mem")))
    assert_error(*change(stack, alice, g, add=[uid("one")]), 409, "too_large")
    # an add is judged before the remove of the same request: nothing applied
    assert_error(*change(stack, alice, g, add=[uid("one")], remove=[many[0]]), 409, "too_large")
    assert (r.hgetall(gkey(g, "meta")), r.hgetall(gkey(g, "mem"))) == before
    assert r.hget(seqkey(g), "g:" + g) == "1"
    # adding a current member is no change: fine at the maximum
    st, b = change(stack, alice, g, add=[many[5]])
    assert st == 200 and len(b["members"]) == MAX_MEMBERS
    # remove first, then there is room
    assert change(stack, alice, g, remove=[many[0]])[0] == 200
    assert change(stack, alice, g, add=[uid("one")])[0] == 200
    assert r.hget(gkey(g, "meta"), "n") == str(MAX_MEMBERS)


@pytest.mark.parametrize("path,body", [
    ("/groups", b"not json"),
    ("/groups", b"[]"),
    ("/groups", {"members": []}),
    ("/groups", {"name": ""}),
    ("/groups", {"name": 5}),
    ("/groups", {"name": "x" * 129}),
    ("/groups", {"name": "\u00e9" * 129}),
    ("/groups", {"name": "ok", "members": "bob"}),
    ("/groups", {"name": "ok", "members": ["bad id"]}),
    ("/groups", {"name": "ok", "members": ["x" * 65]}),
    ("/groups", {"name": "ok", "members": [5]}),
    ("/groups/{g}/members", b"{"),
    ("/groups/{g}/members", {"add": "bob"}),
    ("/groups/{g}/members", {"remove": ["a/b"]}),
    ("/groups/{g}/members", {"add": [None]}),
])
def test_bad_requests(stack, r, path, body):
    alice = uid("alice")
    g = create(stack, alice, [])
    st, b = api(stack, alice, "POST", path.format(g=g), body)
    assert_error(st, b, 400, "bad_request")
    assert r.hget(seqkey(g), "g:" + g) == "1"


def test_names_are_counted_in_characters(stack):
    alice = uid("alice")
    st, b = api(stack, alice, "POST", "/groups", {"name": "\u00e9" * 128})
    assert st == 201 and b["name"] == "\u00e9" * 128


def test_bodies_are_bounded(stack):
    alice = uid("alice")
    many = [f"{i:06d}" + "x" * 58 for i in range(MAX_MEMBERS - 1)]       # 64-character ids: about 33k
    st, b = api(stack, alice, "POST", "/groups", {"name": "wide", "members": many})
    assert st == 201 and len(b["members"]) == MAX_MEMBERS
    for _ in range(10):                                 # answered, not reset, every time
        st, b = api(stack, alice, "POST", "/groups", {"name": "huge", "members": many * 2})
        assert_error(st, b, 413, "too_large")
    # straight to the worker: the refused body is read and dropped, and the
    # connection serves the next request
    body = json.dumps({"name": "huge", "members": many * 2}).encode()
    with stack.rest_socket() as sk:
        sk.sendall(b"POST /chat/groups HTTP/1.1\r\nHost: x\r\nX-Chat-User: " + alice.encode()
                   + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                   + b"GET /chat/conversations HTTP/1.1\r\nHost: x\r\nX-Chat-User: " + alice.encode()
                   + b"\r\n\r\n")
        got = b""
        while got.count(b"HTTP/1.1 ") < 2 or not got.rstrip().endswith(b"}"):
            chunk = sk.recv(65536)
            assert chunk, got
            got += chunk
    assert got.startswith(b"HTTP/1.1 413 ") and b"HTTP/1.1 200 " in got and b'"conversations":' in got


def test_groups_api_needs_a_user(stack):
    assert_error(*api(stack, None, "POST", "/groups", {"name": "x"}), 401, "unauthorized")
    st, _, b = rest_request(stack, "POST", "/chat/groups", body={"name": "x"})
    assert_error(st, b, 401, "unauthorized")
    st, _, b = rest_request(stack, "POST", "/chat/groups", body={"name": "x"}, headers={"X-Chat-User": "bad user"})
    assert_error(st, b, 401, "unauthorized")
    st, _, b = rest_request(stack, "GET", "/chat/groups", headers={"X-Chat-User": "a"})
    assert st == 405 and b["code"] == "bad_request"


# ---- persistence --------------------------------------------------------------------

def test_persist_writes_the_group_and_its_history_records(stack, r, q, db):
    alice, bob, carol = uid("alice"), uid("bob.y"), uid("carol")
    g = create(stack, alice, [bob], name="persisted")
    created = int(r.hget(gkey(g, "meta"), "created"))
    assert change(stack, alice, g, add=[carol], remove=[bob])[0] == 200
    d = persisted(db, g, 3)
    assert d["name"] == "persisted" and d["owner"] == alice and d["created"] == created
    assert sorted(d["members"]) == sorted([alice, carol])
    assert sorted((s["u"], s["seq"]) for s in d["since"]) == sorted([(alice, 1), (carol, 2)])
    assert d["last_seq"] == 0 and d["ts"] == created
    recs = {m["_id"]: m for m in db.messages.find({"conv": "g:" + g})}
    assert set(recs) == {f"g:{g}#1", f"g:{g}#2", f"g:{g}#3"}
    r1 = recs[f"g:{g}#1"]
    assert r1 == {"_id": f"g:{g}#1", "conv": "g:" + g, "seq": 1, "group": g, "from": alice, "kind": "group",
                  "event": "created", "members": sorted([alice, bob]), "ts": created}
    assert recs[f"g:{g}#3"]["event"] == "removed" and recs[f"g:{g}#3"]["members"] == [bob]
    # group messages raise last_seq and set last/ts
    now = int(time.time() * 1000)
    f, seq = group_msg(r, g, carol, body="hello group", ts=now)
    q.send(f)
    q.flush()
    d = eventually(lambda: (lambda x: x if x.get("last_seq") == seq and x.get("last") else None)(
        db.groups.find_one({"_id": g})), timeout=30, what="group last message")
    assert d["ts"] == now and d["last"]["body"] == "hello group" and d["last"]["group"] == g
    assert d["last"]["from"] == carol and d["ver"] == 3
    # an older state arriving again (a re-consumed entry) changes nothing
    old = queued(stack, r, g, 1)[0]
    q.send(old)
    q.flush()
    eventually(lambda: q.backlog("persist") == 0, timeout=30, what="persist acknowledged everything")
    d = db.groups.find_one({"_id": g})
    assert d["ver"] == 3 and sorted(d["members"]) == sorted([alice, carol]) and d["last_seq"] == seq
    assert db.messages.count_documents({"conv": "g:" + g}) == 4


def test_a_stale_state_does_not_hold_back_a_newer_one_in_the_same_batch(stack, r, q, db):
    """FerretDB stops an unordered update command at its first error: the
    duplicate key of a stale state must not cost the other groups' states
    of the batch."""
    from helpers import stop_worker
    # each attempt has its own owner: finding the shards can take dozens of
    # creations, more than one user's group budget allows
    bob = uid("bob")
    alice = uid("alice")
    a = create(stack, alice, [bob], name="old")
    while shard("g:" + a) >= SHARDS - 1:                 # a needs a shard below another group's
        alice = uid("alice")
        a = create(stack, alice, [bob], name="old")
    assert change(stack, alice, a, remove=[bob])[0] == 200
    persisted(db, a, 2)
    stale = queued(stack, r, a, 1)[0]
    stop_worker(stack, "persist")
    try:
        q.send(stale)                                   # re-consumed: older than what is stored
        q.flush()
        b = create(stack, uid("carol"), [bob], name="new")
        while shard("g:" + b) <= shard("g:" + a):
            b = create(stack, uid("carol"), [bob], name="new")
    finally:
        stack_cmd(stack, "up")
    d = persisted(db, b, 1)
    assert d["name"] == "new"
    assert db.groups.find_one({"_id": a})["ver"] == 2


def test_group_receipts_update_member_pointers(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    g = create(stack, alice, [bob])
    send_group_msgs(r, q, g, alice, 2)
    q.send(receipt_fields("g:" + g, bob, "read", 3))
    q.send(receipt_fields("g:" + g, bob, "delivered", 3))
    q.flush()
    d = eventually(lambda: db.conversations.find_one({"_id": f"{bob}|g:{g}", "read_seq": 3}), timeout=30,
                   what="group read pointer")
    assert d["user"] == bob and d["conv"] == "g:" + g
    # a group's delivered pointers live in Redis only (the fan-out raises
    # them; /chat/receipts answers from there), the read pointer in both
    assert d["delivered_seq"] == 0
    eventually(lambda: r.hget(gkey(g, "dlv"), bob) == "3" and r.hget(gkey(g, "read"), bob) == "3",
               timeout=30, what="group pointers in Redis")


# ---- history ------------------------------------------------------------------------

def test_group_history_access_and_since(stack, r, q, db):
    alice, bob, carol, eve = uid("alice"), uid("bob"), uid("carol"), uid("eve")
    g = create(stack, alice, [bob])                                     # seq 1
    send_group_msgs(r, q, g, alice, 2)                                  # 2, 3
    assert change(stack, alice, g, add=[carol])[0] == 200               # 4
    send_group_msgs(r, q, g, bob, 2)                                    # 5, 6
    eventually(lambda: db.messages.count_documents({"conv": "g:" + g}) == 6, timeout=30, what="history stored")
    st, b = history(stack, alice, f"conv=g:{g}")
    assert st == 200 and [m["seq"] for m in b["messages"]] == [6, 5, 4, 3, 2, 1] and b["next_before"] is None
    ev = b["messages"][2]
    assert ev == {"type": "group", "id": f"g:{g}#4", "conv": "g:" + g, "seq": 4, "group": g, "event": "added",
                  "members": [carol], "by": alice, "ts": ev["ts"]}
    m = b["messages"][0]
    assert m["from"] == bob and m["group"] == g and m["kind"] == "text" and isinstance(m["id"], str)
    assert "type" not in m
    # the late joiner sees from its own joining on
    st, b = history(stack, carol, f"conv=g:{g}")
    assert st == 200 and [m["seq"] for m in b["messages"]] == [6, 5, 4]
    st, b = history(stack, carol, f"conv=g:{g}&before=5")
    assert [m["seq"] for m in b["messages"]] == [4] and b["next_before"] is None
    st, b = history(stack, carol, f"conv=g:{g}&after=0")
    assert [m["seq"] for m in b["messages"]] == [4, 5, 6] and b["next_after"] is None
    # non-members, removed members and unknown groups: 403
    assert_error(*history(stack, eve, f"conv=g:{g}"), 403, "forbidden")
    assert change(stack, bob, g, remove=[bob])[0] == 200
    assert_error(*history(stack, bob, f"conv=g:{g}"), 403, "forbidden")
    assert_error(*history(stack, bob, f"conv=g:{g}&after=0"), 403, "forbidden")
    assert_error(*history(stack, alice, f"conv=g:{uid('nosuch')}"), 403, "forbidden")


def test_history_after_pages_oldest_first(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    g = create(stack, alice, [bob])
    send_group_msgs(r, q, g, alice, 6)                                  # 2..7
    eventually(lambda: db.messages.count_documents({"conv": "g:" + g}) == 7, timeout=30, what="history stored")
    st, b = history(stack, bob, f"conv=g:{g}&after=0&limit=3")
    assert st == 200 and [m["seq"] for m in b["messages"]] == [1, 2, 3] and b["next_after"] == 3
    assert "next_before" not in b
    st, b = history(stack, bob, f"conv=g:{g}&after=3&limit=3")
    assert [m["seq"] for m in b["messages"]] == [4, 5, 6] and b["next_after"] == 6
    st, b = history(stack, bob, f"conv=g:{g}&after=6&limit=3")
    assert [m["seq"] for m in b["messages"]] == [7] and b["next_after"] is None
    st, b = history(stack, bob, f"conv=g:{g}&after=7")
    assert b == {"messages": [], "next_after": None}
    st, b = history(stack, bob, f"conv=g:{g}&before=5&limit=2")
    assert [m["seq"] for m in b["messages"]] == [4, 3] and b["next_before"] == 3
    # direct conversations page forward too
    from helpers import dconv, msg_fields
    carol = uid("carol")
    conv = dconv(alice, carol)
    q.send_many([msg_fields(conv, alice, carol, s) for s in range(1, 6)])
    eventually(lambda: db.messages.count_documents({"conv": conv}) == 5, timeout=30, what="direct history")
    st, b = history(stack, carol, f"conv={conv}&after=2&limit=2")
    assert st == 200 and [m["seq"] for m in b["messages"]] == [3, 4] and b["next_after"] == 4
    assert_error(*history(stack, carol, f"conv={conv}&after=1&before=4"), 400, "bad_request")
    assert_error(*history(stack, carol, f"conv={conv}&after=-1"), 400, "bad_request")
    assert_error(*history(stack, carol, f"conv={conv}&after=x"), 400, "bad_request")
    assert_error(*history(stack, uid("eve"), f"conv={conv}&after=0"), 403, "forbidden")


# ---- conversations --------------------------------------------------------------------

def test_conversations_list_groups_with_unread(stack, r, q, db):
    from helpers import dconv, msg_fields
    alice, bob, carol, dave = uid("alice"), uid("bob"), uid("carol"), uid("dave")
    now = int(time.time() * 1000) - 60000          # messages of a minute ago: the new group is newer
    g1 = create(stack, alice, [bob, carol], name="first")                # 1
    send_group_msgs(r, q, g1, alice, 2, ts=now + 10)                     # 2, 3 at now+10, now+11
    q.send(msg_fields(dconv(bob, dave), dave, bob, 1, ts=now + 20))      # a direct one in between
    q.flush()
    send_group_msgs(r, q, g1, carol, 1, ts=now + 30)                     # 4 at now+30
    g2 = create(stack, bob, [], name="quiet")                            # no messages: created ts
    eventually(lambda: ((db.groups.find_one({"_id": g1}) or {}).get("last") or {}).get("seq") == 4, timeout=30,
               what="group last message")
    persisted(db, g2, 1)
    eventually(lambda: db.conversations.find_one({"_id": f"{bob}|{dconv(bob, dave)}", "last_seq": 1}),
               what="direct conversation")
    st, b = api(stack, bob, "GET", "/conversations")
    assert st == 200, b
    cs = b["conversations"]
    assert [c["conv"] for c in cs] == ["g:" + g2, "g:" + g1, dconv(bob, dave)]
    c1 = cs[1]
    assert c1["group"] == g1 and c1["name"] == "first" and c1["last_seq"] == 4 and c1["read_seq"] == 0
    assert c1["unread"] == 3                                             # membership records do not count
    assert c1["last"]["seq"] == 4 and c1["last"]["from"] == carol and "cursor" not in c1["last"]
    assert cs[0] == {"conv": "g:" + g2, "last_seq": 0, "read_seq": 0, "unread": 0, "last": None, "group": g2,
                     "name": "quiet"}
    # read pointer from the member's conversations document
    q.send(receipt_fields("g:" + g1, bob, "read", 3))
    q.flush()
    eventually(lambda: db.conversations.find_one({"_id": f"{bob}|g:{g1}", "read_seq": 3}), timeout=30,
               what="group read pointer")
    c1 = [c for c in api(stack, bob, "GET", "/conversations")[1]["conversations"] if c["conv"] == "g:" + g1][0]
    assert c1["read_seq"] == 3 and c1["unread"] == 1
    # own messages are not unread; the sender sees 1 (carol's)
    c1 = [c for c in api(stack, alice, "GET", "/conversations")[1]["conversations"] if c["conv"] == "g:" + g1][0]
    assert c1["unread"] == 1
    # a late joiner counts from its joining on; a removed member no longer lists the group
    assert change(stack, alice, g1, add=[dave], remove=[carol])[0] == 200      # 5 added, 6 removed
    send_group_msgs(r, q, g1, alice, 1)                                        # 7
    persisted(db, g1, 6)
    eventually(lambda: ((db.groups.find_one({"_id": g1}) or {}).get("last") or {}).get("seq") == 7, timeout=30,
               what="message 7")
    c = [c for c in api(stack, dave, "GET", "/conversations")[1]["conversations"] if c["conv"] == "g:" + g1]
    assert len(c) == 1 and c[0]["unread"] == 1 and c[0]["read_seq"] == 0
    assert all(c["conv"] != "g:" + g1 for c in api(stack, carol, "GET", "/conversations")[1]["conversations"])


# ---- receipts --------------------------------------------------------------------------

def test_receipts_endpoint(stack, r):
    alice, bob, carol, dave, eve = uid("alice"), uid("bob"), uid("carol"), uid("dave"), uid("eve")
    g = create(stack, alice, [bob, carol, dave])
    # the pointers the fan-out keeps (docs/PIPELINE.md, "Group receipts")
    r.hset(gkey(g, "dlv"), mapping={bob: 5, carol: 3})
    r.hset(gkey(g, "read"), mapping={bob: 4, dave: 6})
    st, b = api(stack, alice, "GET", f"/receipts?conv=g:{g}&seq=4")
    assert st == 200 and b == {"conv": "g:" + g, "seq": 4, "delivered": sorted([bob, dave]),
                               "read": sorted([bob, dave])}
    st, b = api(stack, carol, "GET", f"/receipts?conv=g:{g}&seq=3")
    assert b["delivered"] == sorted([bob, carol, dave]) and b["read"] == sorted([bob, dave])
    st, b = api(stack, carol, "GET", f"/receipts?conv=g:{g}&seq=7")
    assert st == 200 and b["delivered"] == [] and b["read"] == []
    assert_error(*api(stack, eve, "GET", f"/receipts?conv=g:{g}&seq=1"), 403, "forbidden")
    for query in ("", f"conv=g:{g}", f"conv=g:{g}&seq=0", f"conv=g:{g}&seq=x", "conv=bad&seq=1",
                  f"conv=g:{g}&seq=-2"):
        assert_error(*api(stack, alice, "GET", "/receipts?" + query), 400, "bad_request")
    # direct conversations: the other participant's pointers
    conv = f"d:{min(alice, bob)}:{max(alice, bob)}"
    r.hset(ukey(bob, "dlv"), conv, 7)
    r.hset(ukey(bob, "read"), conv, 5)
    st, b = api(stack, alice, "GET", f"/receipts?conv={conv}&seq=5")
    assert st == 200 and b == {"conv": conv, "seq": 5, "delivered": [bob], "read": [bob],
                               "pointers": {bob: {"delivered": 7, "read": 5}}}
    st, b = api(stack, alice, "GET", f"/receipts?conv={conv}&seq=6")
    assert b["delivered"] == [bob] and b["read"] == []
    st, b = api(stack, bob, "GET", f"/receipts?conv={conv}&seq=1")
    assert b["delivered"] == [] and b["read"] == []                       # alice's pointers: none
    assert b["pointers"] == {alice: {"delivered": 0, "read": 0}}
    r.hset(ukey(bob, "dlv"), conv, 4)             # a read above the delivered pointer implies delivered
    st, b = api(stack, alice, "GET", f"/receipts?conv={conv}&seq=5")
    assert b["pointers"] == {bob: {"delivered": 5, "read": 5}} and b["delivered"] == [bob]
    assert_error(*api(stack, eve, "GET", f"/receipts?conv={conv}&seq=1"), 403, "forbidden")


# ---- rebuild at start --------------------------------------------------------------------

def test_rest_rebuilds_redis_group_state_from_mongodb(stack, r, q, db):
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    lost = create(stack, alice, [bob], name="lost")                     # Redis forgets it entirely
    assert change(stack, alice, lost, add=[carol])[0] == 200            # ver 2
    stale = create(stack, alice, [bob], name="stale")                   # Redis holds an older copy
    assert change(stack, alice, stale, remove=[bob])[0] == 200          # ver 2
    send_group_msgs(r, q, lost, alice, 2)                               # 3, 4
    keep = create(stack, alice, [], name="kept")                        # Redis is newer than MongoDB
    persisted(db, lost, 2)
    persisted(db, stale, 2)
    persisted(db, keep, 1)
    eventually(lambda: ((db.groups.find_one({"_id": lost}) or {}).get("last") or {}).get("seq") == 4, timeout=30,
               what="message 4")
    lost_meta = r.hgetall(gkey(lost, "meta"))

    r.delete(gkey(lost, "meta"), gkey(lost, "mem"))
    r.hdel(seqkey(lost), "g:" + lost)                                   # even the counter is gone
    r.hset(gkey(stale, "meta"), mapping={"ver": 1, "owner": bob, "n": 2})
    r.hset(gkey(stale, "mem"), bob, "1")
    r.hset(gkey(keep, "meta"), mapping={"ver": 9, "name": "renamed in redis"})
    assert_error(*api(stack, alice, "GET", f"/groups/{lost}"), 404, "not_found")

    stack_cmd(stack, "kill", "worker-rest")
    stack_cmd(stack, "up")

    st, b = api(stack, carol, "GET", f"/groups/{lost}")
    assert st == 200 and b == {"group": lost, "name": "lost", "owner": alice, "members": sorted([alice, bob, carol])}
    assert r.hgetall(gkey(lost, "meta")) == lost_meta
    assert r.hgetall(gkey(lost, "mem")) == {alice: "1", bob: "1", carol: "2"}
    assert r.hget(seqkey(lost), "g:" + lost) == "4"                     # no seq is given out twice
    st, b = api(stack, alice, "GET", f"/groups/{stale}")
    assert st == 200 and b["members"] == [alice] and b["owner"] == alice
    assert r.hget(gkey(stale, "meta"), "ver") == "2" and r.hgetall(gkey(stale, "mem")) == {alice: "1"}
    assert r.hget(gkey(keep, "meta"), "name") == "renamed in redis"     # newer in Redis: left alone
    # the rebuilt group works on: the next change gets seq 5
    assert change(stack, alice, lost, remove=[bob])[0] == 200
    assert r.hget(gkey(lost, "meta"), "ver") == "5"
    st, b = history(stack, carol, f"conv=g:{lost}")
    assert st == 200 and [m["seq"] for m in b["messages"]][-1] == 2


@pytest.mark.single_only("kills and restarts the one Redis server (on the cluster a master kill is "
                         "t/test_cluster.py's and t/test_cluster_workers.py's)")
def test_rest_survives_a_redis_restart(stack, r):
    alice, bob = uid("alice"), uid("bob")
    g = create(stack, alice, [bob])
    time.sleep(1.2)                                 # AOF fsync (everysec)
    pid = open(f"{stack.dir}/pids/worker-rest").read().strip()
    stack_cmd(stack, "kill", "redis")
    try:
        assert_error(*api(stack, bob, "GET", f"/groups/{g}"), 503, "unavailable")
    finally:
        stack_cmd(stack, "up")
    r2 = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    eventually(lambda: r2.ping(), what="redis back")
    r2.close()
    # the first request after the restart is answered, on a new connection
    st, b = api(stack, bob, "GET", f"/groups/{g}")
    assert st == 200 and b["members"] == sorted([alice, bob]), b
    assert change(stack, alice, g, remove=[bob])[0] == 200
    assert open(f"{stack.dir}/pids/worker-rest").read().strip() == pid      # never restarted


# ---- Kafka: a change whose record could not be produced ----------------------------------

@pytest.mark.queue("kafka")
def test_kafka_outage_answers_503_and_the_change_is_queued_later(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    stack_cmd(stack, "kill", "kafka")
    try:
        t0 = time.time()
        st, b = api(stack, alice, "POST", "/groups", {"name": "offline", "members": [bob]})
        assert_error(st, b, 503, "unavailable")
        assert time.time() - t0 < 20                                    # bounded wait for the broker
        pend = {k: v for s in range(SHARDS) for k, v in r.hgetall("chat:{s%d}:gq" % s).items()}
        mine = [k for k, v in pend.items() if f'"from":"{alice}"' in v]
        assert len(mine) == 1, pend
        g = mine[0].split("#")[0]
        # the change is applied in Redis and kept for the queue
        assert r.hgetall(gkey(g, "mem")) == {alice: "1", bob: "1"}
        assert r.hexists("chat:{s%d}:gq" % shard("g:" + g), f"{g}#1")
    finally:
        stack_cmd(stack, "up")
    # once the broker is back the sweep produces it: persisted, and gone from gq
    d = persisted(db, g, 1, timeout=90)
    assert d["name"] == "offline" and sorted(d["members"]) == sorted([alice, bob])
    eventually(lambda: not r.hexists("chat:{s%d}:gq" % shard("g:" + g), f"{g}#1"), timeout=30,
               what="pending record removed")
    st, b = api(stack, bob, "GET", f"/groups/{g}")
    assert st == 200 and b["owner"] == alice
    # and the next change goes straight through again
    assert change(stack, alice, g, remove=[bob])[0] == 200
    persisted(db, g, 2, timeout=90)                 # consumers may still be rejoining after the restart


def test_many_new_groups_in_one_batch_and_a_state_after_a_message_document(stack, r, q, db):
    """Group states are inserted as new documents first (one insert for a
    whole batch: FerretDB cannot find {_id, ver: {$lt}} by _id, so one
    conditional upsert per new group read the whole collection); where the
    document exists already, the conditional upsert keeps the newest state.
    Here: 40 groups created while persist is stopped all land with their
    fields, and a first state arriving after a message's ver-0 document
    still sets the state without losing that document's last_seq."""
    from helpers import stop_worker
    owner, bob = uid("own"), uid("bob")
    stop_worker(stack, "persist")
    try:
        gs = [create(stack, owner if i == 0 else uid("own"), [bob], name=f"n{i}") for i in range(40)]
    finally:
        stack_cmd(stack, "up")
    for i, g in enumerate(gs):
        d = persisted(db, g, 1, timeout=60)
        assert d["name"] == f"n{i}" and sorted(d["members"]) == sorted([d["owner"], bob])
        assert d["last_seq"] == 0 and d["ts"] == d["created"] and d["created"] > 0
    # a document a group message left before the group's first state
    g = gs[0]
    db.groups.delete_one({"_id": g})
    db.groups.insert_one({"_id": g, "ver": 0, "last_seq": 5, "ts": 1})
    q.send(queued(stack, r, g, 1)[0])
    q.flush()
    d = persisted(db, g, 1)
    assert d["name"] == "n0" and d["owner"] == owner and d["last_seq"] == 5
