"""Golden vectors shared by the C unit tests and these tests: the shard of
a conversation (t/vectors/shards.txt) as the Python tests compute it, and
as the running module puts a message on a shard's stream; queue entries
(t/vectors/entries.txt) as the Python tests build them and as the running
workers judge and route them."""
import json
import os
import urllib.parse
import uuid
import zlib

import pytest
import redis

import golden
from chatlib import ROOT
from helpers import SHARDS, eventually, inbox, msg_fields, receipt_fields, uid


def vectors():
    out = []
    for line in open(os.path.join(ROOT, "t/vectors/shards.txt"), encoding="utf-8"):
        if line.startswith("#"):
            continue
        conv, crc, s16, s7 = line.split()
        out.append(("" if conv == "-" else conv, int(crc, 16), int(s16), int(s7)))
    return out


def test_python_crc_matches_the_vectors():
    v = vectors()
    assert len(v) >= 8
    for conv, crc, s16, s7 in v:
        assert zlib.crc32(conv.encode()) == crc and crc % 16 == s16 and crc % 7 == s7


@pytest.mark.queue("redis")
def test_the_module_enqueues_on_the_vectors_shard(stack):
    """A send from alice to bob lands on the stream of d:alice:bob's shard."""
    from wsclient import WS
    conv, _, s16, _ = next(v for v in vectors() if v[0] == "d:alice:bob")
    r = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    before = r.xlen("chat:{s%d}:in" % s16)
    c = WS(stack.host, stack.port, stack.ws_path, token=stack.token("alice", "vec"))
    c.recv()
    cid = uuid.uuid4().hex
    c.send_json({"type": "send", "client_id": cid, "to": "bob", "body": "vector"})
    while True:
        m = c.recv(10)
        if m.get("client_id") == cid:
            break
    assert m["type"] == "ack" and m["conv"] == conv
    assert r.xlen("chat:{s%d}:in" % s16) == before + 1 or any(
        e[1].get("ev", "").find(m["id"]) >= 0 for e in r.xrevrange("chat:{s%d}:in" % s16, count=50))
    c.close()


# ---- queue entries ----------------------------------------------------------------

def _fields(v):
    """a vector's fields as the str dict the Python builders make; an empty
    value is an absent field (libchat's rule)"""
    return {k: b.decode() for k, b in v["fields"]}


def _present(d):
    return {k: x for k, x in d.items() if x != ""}


def test_the_python_entry_builders_write_what_the_vectors_hold():
    """t/helpers.py builds queue entries for many tests: they are the
    vectors' entries, byte for byte (the C codec is held to the same)."""
    checked = 0
    for name in ("dm", "dm_back", "dm_max"):
        f = _fields(golden.entry(name))
        ev = json.loads(f["ev"])
        built = msg_fields(f["conv"], f["from"], f["to"], int(f["seq"]), dev=f.get("dev", ""), body=ev["body"],
                           mid=ev["id"], ts=ev["ts"])
        assert _present(built) == f, name
        checked += 1
    for name in ("read", "delivered", "group_read"):
        f = _fields(golden.entry(name))
        ev = json.loads(f["ev"])
        built = receipt_fields(f["conv"], f["from"], f["st"], int(f["seq"]), dev=f.get("dev", ""), ts=ev["ts"])
        if "prev" in f:
            built["prev"] = f["prev"]
        assert _present(built) == f, name
        checked += 1
    assert checked == 6


def _rename(v, sfx):
    """the vector with its users and groups made unique to this run (the
    relations between them, which the verdicts depend on, stay)"""
    out = []
    for k, b in v["fields"]:
        for n in (b"alice", b"bob", b"carol", b"team1", b"team2"):
            b = b.replace(n, n + sfx)
        out.append((k, b))
    return out


@pytest.mark.queue("redis")
def test_the_workers_judge_and_route_entries_as_the_vectors_say(stack):
    """Every vector on a shard stream: a bad one reaches the fan-out's
    dead-letter queue with the vector's why, a good one is not dead-lettered
    and reaches each recipient's inbox (the positive control)."""
    r = redis.Redis.from_url(stack.env["REDIS_URL"])
    sfx = uid("v").encode()
    vs = golden.entries()
    ids = {}
    # each user has a second device the server has seen: the fan-out copies
    # a user's own sends to its other devices only then (PROTOCOL 16.3)
    for n in (b"alice", b"bob", b"carol"):
        r.hset("chat:{u:%s}:acked" % (n + sfx).decode(), "laptop", 0)
    for v in vs:
        fields = _rename(v, sfx)
        conv = dict(fields).get("conv", b"-")
        s = zlib.crc32(conv) % SHARDS
        ids[(str(s), r.xadd("chat:{s%d}:in" % s, dict(fields)).decode())] = (v, fields)

    def dead():
        got = {}
        for _, f in r.xrange("chat:{dlq}:fanout"):
            src = (f.get(b"dlq.shard", b"").decode(), f.get(b"dlq.src", b"").decode())   # ids repeat across streams
            if src in ids:
                got[src] = f[b"dlq.why"].decode()
        return got
    bad = {i for i, (v, _) in ids.items() if not v["ok"]}
    got = eventually(lambda: (lambda d: d if set(d) >= bad else None)(dead()), timeout=30,
                     what="every bad vector dead-lettered")
    for i in bad:
        assert got[i] == ids[i][0]["why"], ids[i][0]["name"]
    # the good ones: in their recipients' inboxes, never dead-lettered
    reached, live_only = 0, []
    rd = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    for i, (v, fields) in ids.items():
        if not v["ok"]:
            continue
        f = dict(fields)
        ev = json.loads(f["ev"])
        if f.get("st") == b"delivered":
            live_only.append((v, ev))        # published live, no inbox copy (PROTOCOL 7)
            continue
        for u in v["rcpts"]:
            user = (u.rstrip("!").encode() + sfx).decode()
            found = eventually(lambda: [e for _, e in inbox(rd, user)
                                        if {k: x for k, x in e.items() if k not in ("cursor", "!")} == ev],
                               timeout=30, what=f"{v['name']} in {user}'s inbox")
            # "user!": every device of the acting user but the acting one
            assert found[0].get("!") == (f["dev"].decode() if u.endswith("!") else None), (v["name"], u)
            reached += 1
    assert reached >= 10
    # the durable ones behind them are in, so these were processed too
    for v, ev in live_only:
        for u in v["rcpts"]:
            user = (u.rstrip("!").encode() + sfx).decode()
            assert not [e for _, e in inbox(rd, user) if e.get("type") == "receipt" and e.get("status") == "delivered"
                        and e.get("seq") == ev["seq"]], (v["name"], user)
    assert live_only
    assert not set(dead()) - bad, "a good vector was dead-lettered"


crc16_xmodem, key_slot = golden.crc16_xmodem, golden.key_slot


def slot_vectors():
    out = []
    for line in open(os.path.join(ROOT, "t/vectors/slots.txt"), encoding="utf-8"):
        if line.startswith("#"):
            continue
        key, slot, crc = line.split()
        kb = b"" if key == "-" else urllib.parse.unquote_to_bytes(key)
        out.append((kb, int(slot), int(crc, 16)))
    return out


def test_python_slot_matches_the_vectors():
    v = slot_vectors()
    assert len(v) >= 30
    for kb, slot, crc in v:
        assert crc16_xmodem(kb) == crc and key_slot(kb) == slot, kb
    # the checks are not vacuous: two vectors with different slots
    assert len({s for _, s, _ in v}) > 20


def test_the_vectors_match_a_real_cluster_server(tmp_path):
    """The vectors were generated with CLUSTER KEYSLOT; check them again
    against the redis-server installed here (cluster-enabled, no slots)."""
    import shutil
    import socket
    import subprocess
    import time
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/setup)")
    # a free port, then the server on it: another process may take the
    # port in between (it exits at once: "address already in use"), so a
    # few tries, each waiting for PING or for the server to exit
    p = r = None
    for attempt in range(5):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                              "--cluster-config-file", str(tmp_path / f"nodes-{attempt}.conf"), "--dir", str(tmp_path),
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        deadline = time.time() + 30
        while p.poll() is None and time.time() < deadline:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        if p.poll() is None:
            break
    assert p.poll() is None, "redis-server did not stay up on any of 5 ports"
    try:
        for kb, slot, _ in slot_vectors():
            assert r.execute_command("CLUSTER", "KEYSLOT", kb) == slot, kb
    finally:
        p.kill()
        p.wait()
