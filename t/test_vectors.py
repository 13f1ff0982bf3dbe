"""Golden vectors shared by the C unit tests and these tests: the shard of
a conversation (t/vectors/shards.txt) as the Python tests compute it, and
as the running module puts a message on a shard's stream."""
import os
import urllib.parse
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


def crc16_xmodem(b):
    crc = 0
    for x in b:
        crc ^= x << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def key_slot(b):
    """The cluster spec's slot of key b (bytes): written here on its own so
    that it checks libchat's chat_cluster_slot through the shared vectors."""
    i = b.find(b"{")
    if i >= 0:
        j = b.find(b"}", i + 1)
        if j > i + 1:
            b = b[i + 1:j]
    return crc16_xmodem(b) % 16384


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
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                          "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path),
                          "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        for kb, slot, _ in slot_vectors():
            assert r.execute_command("CLUSTER", "KEYSLOT", kb) == slot, kb
    finally:
        p.kill()
        p.wait()
