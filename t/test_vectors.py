"""Golden vectors shared by the C unit tests and these tests: the shard of
a conversation (t/vectors/shards.txt) as the Python tests compute it, and
as the running module puts a message on a shard's stream."""
import os
import uuid
import zlib

import pytest
import redis

from chatlib import ROOT


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
