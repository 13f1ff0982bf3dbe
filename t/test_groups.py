"""Issue 5: group messaging end to end against the real stack, both queues:
delivery by push (inbox copies) and by pull (live only, history to catch
up), membership checks in the accept script, one seq order, late joiners,
removal, group receipts and typing. The groups API itself (validation,
MongoDB record) is t/test_groups_api.py."""
import json
import os
import subprocess
import threading
import time
import uuid
import zlib

import pytest

from chatlib import ROOT
from helpers import BULK, auth, uniq, ws

# on the single-node stack and on the cluster stack (t/conftest.py)
pytestmark = pytest.mark.topologies("single", "cluster")


def create(stack, owner, members, name="team"):
    st, _, g = stack.request("POST", stack.http + "/groups", body={"name": name, "members": members},
                             headers=auth(stack, owner))
    assert st == 201, g
    return g["group"]


def change(stack, user, group, add=(), remove=()):
    return stack.request("POST", f"{stack.http}/groups/{group}/members",
                         body={"add": list(add), "remove": list(remove)}, headers=auth(stack, user))


def gsend(c, group, body, cid=None):
    cid = cid or uuid.uuid4().hex
    c.send_json({"type": "send", "client_id": cid, "group": group, "body": body})
    return cid


def reply_to(c, cid, timeout=10):
    """The ack or the error that answers send cid."""
    deadline = time.time() + timeout
    while True:
        m = c.recv(max(0.1, deadline - time.time()))
        if m.get("client_id") == cid and m["type"] in ("ack", "error"):
            return m


def events(c, n, typ="msg", timeout=20):
    out = []
    deadline = time.time() + timeout
    while len(out) < n:
        m = c.recv(max(0.1, deadline - time.time()))
        if m["type"] == typ:
            out.append(m)
    return out


def quiet(c, typ="msg", seconds=0.7):
    """Nothing of that type arrives for a while (ping first: the socket is
    alive and everything sent before the pong has been read)."""
    got = []
    c.send_json({"type": "ping"})
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            m = c.recv(0.1)
        except TimeoutError:
            continue
        if m["type"] == typ:
            got.append(m)
    return got


def gkey(stack, group, what):
    shards = int(os.environ.get("CHAT_SHARDS", "16"))
    s = zlib.crc32(f"g:{group}".encode()) % shards
    return f"chat:{{s{s}}}:g:{group}:{what}"


def inbox_ids(r, user):
    out = []
    for m in r.zrange(f"chat:{{u:{user}}}:inbox", 0, -1):
        e = json.loads(m)
        if e.get("type") == "msg":
            out.append(e["id"])
    return out


def test_create_and_deliver_to_every_member_device(stack):
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    a1, a2, b1, b2, c1 = ws(stack, a, "phone"), ws(stack, a, "laptop"), ws(stack, b, "phone"), \
        ws(stack, b, "web"), ws(stack, c)
    g = create(stack, a, [b, c])
    # everybody, the creator's devices too, learns of the group (durably)
    for dev in (a1, a2, b1, b2, c1):
        ev = events(dev, 1, "group")[0]
        assert ev["group"] == g and ev["event"] == "created" and ev["by"] == a
        assert sorted(ev["members"]) == sorted([a, b, c]) and ev["cursor"] >= 1
    cid = gsend(a1, g, "hello team")
    ack = reply_to(a1, cid)
    assert ack["type"] == "ack" and ack["conv"] == f"g:{g}" and ack["seq"] >= 2
    for dev in (b1, b2, c1, a2):
        m = events(dev, 1)[0]
        assert m["id"] == ack["id"] and m["seq"] == ack["seq"] and m["conv"] == f"g:{g}"
        assert m["group"] == g and "to" not in m and m["from"] == a and m["body"] == "hello team"
        assert m["cursor"] >= 1
    assert quiet(a1) == []          # the sending device does not get its own message
    # HTTP send to the group: the same semantics
    st, _, hack = stack.request("POST", stack.http + "/send", body={"client_id": "h1", "group": g, "body": "via http"},
                                headers=auth(stack, b, "web"))
    assert st == 200 and hack["seq"] == ack["seq"] + 1
    assert events(c1, 1)[0]["id"] == hack["id"]
    for dev in (a1, a2, b1, b2, c1):
        dev.close()


def test_non_members_and_unknown_groups_are_refused(stack, r):
    a, b, x = uniq("a"), uniq("b"), uniq("x")
    g = create(stack, a, [b])
    x1 = ws(stack, x)
    cid = gsend(x1, g, "let me in")
    err = reply_to(x1, cid)
    assert err["type"] == "error" and err["code"] == "forbidden"
    cid = gsend(x1, uniq("nogroup"), "anyone?")
    err = reply_to(x1, cid)
    assert err["type"] == "error" and err["code"] == "not_found"
    st, _, body = stack.request("POST", stack.http + "/send", body={"client_id": "x", "group": g, "body": "no"},
                                headers=auth(stack, x))
    assert st == 403 and body["code"] == "forbidden"
    # reading a group one is not in is refused too, and moves nothing
    x1.send_json({"type": "read", "conv": f"g:{g}", "seq": 1})
    assert x1.recv_type("error")["code"] == "forbidden"
    st, _, _ = stack.request("POST", stack.http + "/read", body={"conv": f"g:{g}", "seq": 1}, headers=auth(stack, x))
    assert st == 403
    assert r.hget(f"chat:{{u:{x}}}:read", f"g:{g}") is None
    # nothing was numbered for the refused sends: the next seq follows the creation
    a1 = ws(stack, a)
    cid = gsend(a1, g, "first")
    assert reply_to(a1, cid)["seq"] == 2
    x1.close()
    a1.close()


def test_removal_stops_delivery_and_leave_works(stack, r):
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    g = create(stack, a, [b, c])
    a1, b1, c1 = ws(stack, a), ws(stack, b), ws(stack, c)
    st, _, grp = change(stack, a, g, remove=[c])
    assert st == 200 and c not in grp["members"]
    ev = [e for e in events(c1, 2, "group") if e["event"] == "removed"][0]
    assert ev["members"] == [c] and ev["by"] == a
    ack = reply_to(a1, gsend(a1, g, "after removal"))
    assert events(b1, 1)[0]["id"] == ack["id"]
    assert quiet(c1) == [] and ack["id"] not in inbox_ids(r, c)
    # c can no longer send
    assert reply_to(c1, gsend(c1, g, "still here?"))["code"] == "forbidden"
    # b leaves: nothing after that reaches b, and b cannot send
    st, _, grp = change(stack, b, g, remove=[b])
    assert st == 200 and grp["members"] == [a]
    # (b1's earlier group events were passed over while it waited for the message)
    ev = events(b1, 1, "group")[0]
    assert ev["event"] == "removed" and ev["members"] == [b] and ev["by"] == b
    ack2 = reply_to(a1, gsend(a1, g, "alone"))
    assert ack2["type"] == "ack"
    assert quiet(b1) == [] and ack2["id"] not in inbox_ids(r, b)
    assert reply_to(b1, gsend(b1, g, "back?"))["code"] == "forbidden"
    for x in (a1, b1, c1):
        x.close()


def test_all_members_see_one_order_under_concurrent_senders(stack):
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    g = create(stack, a, [b, c])
    a1, b1 = ws(stack, a, path=BULK), ws(stack, b, path=BULK)
    watchers = [ws(stack, a, "w"), ws(stack, b, "w"), ws(stack, c, "w")]
    n = 100

    def blast(dev):
        for i in range(n):
            gsend(dev, g, str(i))

    ts = [threading.Thread(target=blast, args=(d,)) for d in (a1, b1)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    views = []
    for w in watchers:
        got = events(w, 2 * n, timeout=40)
        seqs = [m["seq"] for m in got]
        assert sorted(seqs) == list(range(2, 2 * n + 2))       # seq 1 is the creation
        assert len({m["id"] for m in got}) == 2 * n
        views.append({m["id"]: m["seq"] for m in got})
        if stack.env["CHAT_QUEUE"] == "redis":
            assert seqs == sorted(seqs)
    assert views[0] == views[1] == views[2]
    for x in [a1, b1] + watchers:
        x.close()


def test_offline_member_catches_up_in_order(stack):
    a, b = uniq("a"), uniq("b")
    g = create(stack, a, [b])
    a1 = ws(stack, a, path=BULK)
    ids = [reply_to(a1, gsend(a1, g, f"m{i}"))["id"] for i in range(50)]
    b1 = ws(stack, b)
    got = events(b1, 50)
    assert [m["id"] for m in got] == ids
    assert [m["seq"] for m in got] == list(range(2, 52))
    assert quiet(b1) == []
    # acknowledged: a new connection of the same device replays nothing
    b1.send_json({"type": "ack", "cursor": got[-1]["cursor"]})
    # the pong comes after the (delayed) ack is in Redis: the new connection
    # may land on another nginx worker, which must find it
    b1.send_json({"type": "ping"})
    assert b1.recv_type("pong", timeout=10)["type"] == "pong"
    b1.close()
    b2 = ws(stack, b)
    assert quiet(b2) == []
    a1.close()
    b2.close()


def test_late_joiner_sees_nothing_earlier(stack, r):
    a, b, late = uniq("a"), uniq("b"), uniq("late")
    g = create(stack, a, [b])
    a1 = ws(stack, a)
    early = [reply_to(a1, gsend(a1, g, f"early{i}"))["id"] for i in range(5)]
    st, _, grp = change(stack, a, g, add=[late])
    assert st == 200 and late in grp["members"]
    after = reply_to(a1, gsend(a1, g, "welcome"))
    l1 = ws(stack, late)
    ev = events(l1, 1, "group")[0]
    assert ev["event"] == "added" and ev["members"] == [late]
    got = events(l1, 1)
    assert got[0]["id"] == after["id"]
    assert quiet(l1) == []
    assert not set(early) & set(inbox_ids(r, late))
    st, _, h = stack.request("GET", f"{stack.http}/history?conv=g:{g}", headers=auth(stack, late))
    assert st == 200
    assert not set(early) & {m.get("id") for m in h["messages"]}
    a1.close()
    l1.close()


def test_group_receipts_are_coalesced_per_member(stack):
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    g = create(stack, a, [b, c])
    a1, b1, b2, c1 = ws(stack, a), ws(stack, b, "phone"), ws(stack, b, "web"), ws(stack, c)
    for dev in (a1, b1, b2, c1):
        events(dev, 1, "group")
    acks = [reply_to(a1, gsend(a1, g, f"r{i}")) for i in range(3)]
    last = acks[-1]["seq"]
    got = events(b1, 3)
    events(b2, 3)
    cgot = events(c1, 3)
    b1.send_json({"type": "ack", "cursor": got[-1]["cursor"]})
    rc = events(a1, 1, "receipt")[0]
    assert rc["conv"] == f"g:{g}" and rc["status"] == "delivered" and rc["by"] == b and rc["seq"] == last
    assert quiet(a1, "receipt") == []             # one receipt for three messages
    assert quiet(c1, "receipt") == []             # c sent nothing: told nothing
    b1.send_json({"type": "read", "conv": f"g:{g}", "seq": last})
    rd = events(a1, 1, "receipt")[0]
    assert rd["status"] == "read" and rd["by"] == b and rd["seq"] == last
    sync = events(b2, 1, "receipt")[0]               # b's other device learns b read it
    assert sync["status"] == "read" and sync["by"] == b
    st, _, body = stack.request("GET", f"{stack.http}/receipts?conv=g:{g}&seq={last}", headers=auth(stack, a))
    assert st == 200 and body["delivered"] == [b] and body["read"] == [b]
    # c acknowledges: the sender hears of c too
    c1.send_json({"type": "ack", "cursor": cgot[-1]["cursor"]})
    rc = events(a1, 1, "receipt")[0]
    assert rc["by"] == c and rc["status"] == "delivered" and rc["seq"] == last
    st, _, body = stack.request("GET", f"{stack.http}/receipts?conv=g:{g}&seq={last}", headers=auth(stack, b))
    assert st == 200 and sorted(body["delivered"]) == sorted([b, c]) and body["read"] == [b]
    for x in (a1, b1, b2, c1):
        x.close()


def test_group_typing_reaches_the_other_online_members(stack):
    a, b, c, x = uniq("a"), uniq("b"), uniq("c"), uniq("x")
    g = create(stack, a, [b, c])
    a1, b1, c1, x1 = ws(stack, a), ws(stack, b), ws(stack, c), ws(stack, x)
    a1.send_json({"type": "typing", "group": g})
    for dev in (b1, c1):
        t = dev.recv_type("typing")
        assert t == {"type": "typing", "conv": f"g:{g}", "from": a}
    assert quiet(a1, "typing") == []
    # a non-member's typing reaches nobody
    x1.send_json({"type": "typing", "group": g})
    assert quiet(b1, "typing") == []
    for dev in (a1, b1, c1, x1):
        dev.close()


def stack_cmd(stack, *args):
    res = subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                         capture_output=True, text=True, env=stack.proc_env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.single_only("replaces the stack's one fan-out worker by one with another push limit; on the "
                         "cluster stack two fan-out workers share the shards and the other one would push")
def test_pull_mode_above_the_push_limit(stack, r):
    """A fan-out worker with group_push_limit 3: a four-member group gets no
    inbox copies; online members get the message live (no cursor), offline
    ones catch up from history."""
    from helpers import stop_worker
    a, b, c, d = uniq("a"), uniq("b"), uniq("c"), uniq("d")
    stop_worker(stack, "fanout")
    env = dict(stack.proc_env, CHAT_GROUP_PUSH_LIMIT="3")
    p = subprocess.Popen([stack.worker, "--config", stack.env["CHAT_WORKER_CONF"], "--role", "fanout"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        g = create(stack, a, [b, c, d])
        a1, a2, b1 = ws(stack, a, "phone"), ws(stack, a, "laptop"), ws(stack, b)
        ack = reply_to(a1, gsend(a1, g, "pulled"))
        for dev in (b1, a2):
            m = events(dev, 1)[0]
            assert m["id"] == ack["id"] and "cursor" not in m and m["group"] == g
        assert quiet(a1) == []
        for u in (b, c, d):
            assert ack["id"] not in inbox_ids(r, u)
        # d was offline: it catches up from history after the seq it had
        st, _, h = stack.request("GET", f"{stack.http}/history?conv=g:{g}&after=1", headers=auth(stack, d))
        deadline = time.time() + 15
        while st == 200 and not any(x.get("id") == ack["id"] for x in h["messages"]) and time.time() < deadline:
            time.sleep(0.2)
            st, _, h = stack.request("GET", f"{stack.http}/history?conv=g:{g}&after=1", headers=auth(stack, d))
        assert st == 200 and [x["id"] for x in h["messages"]] == [ack["id"]]
        for dev in (a1, a2, b1):
            dev.close()
    finally:
        p.terminate()
        p.wait(20)
        stack_cmd(stack, "up")


@pytest.mark.single_only("kills the stack's one fan-out worker; on the cluster stack the group's shard may be "
                         "the second one's (a fan-out worker killed under load there: t/test_cluster_nodes.py)")
def test_fanout_killed_halfway_through_a_500_member_group(stack, r):
    """kill -9 the fan-out worker while it appends 100 messages to the
    inboxes of a 500-member group; after the restart every member holds
    every message exactly once, and online members saw each once."""
    owner = uniq("own")
    members = [f"{owner}m{i}" for i in range(499)]
    g = create(stack, owner, members, name="big")
    online = [ws(stack, u) for u in (members[0], members[250], members[498])]
    for dev in online:
        events(dev, 1, "group", timeout=30)
    o1 = ws(stack, owner, path=BULK)
    cids = [gsend(o1, g, f"big{i}") for i in range(100)]
    ids = [reply_to(o1, cid)["id"] for cid in cids]
    # halfway: the first member has some of them, the last not all
    deadline = time.time() + 30
    while len(inbox_ids(r, members[0])) < 5 and time.time() < deadline:
        time.sleep(0.005)
    stack_cmd(stack, "kill", "worker-fanout")
    assert len(inbox_ids(r, members[-1])) < 100, "the fan-out finished before it was killed"
    stack_cmd(stack, "up")
    deadline = time.time() + 90
    for u in members:
        while len(inbox_ids(r, u)) < 100 and time.time() < deadline:
            time.sleep(0.1)
        got = inbox_ids(r, u)
        assert sorted(got) == sorted(ids), f"{u}: {len(got)} of 100, {len(got) - len(set(got))} twice"
    for dev in online:
        got = [m["id"] for m in events(dev, 100, timeout=60)]
        assert sorted(got) == sorted(ids)
        assert quiet(dev) == []
        dev.close()
    o1.close()
