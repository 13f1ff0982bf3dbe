"""The worker roles (issue 4): fan-out, persistence and REST reads, tested
against the real stack by enqueueing entries exactly as docs/PIPELINE.md
specifies (XADD into chat:{s<s>}:in, or Kafka records on topic chat.in,
partition = shard, whichever queue the stack runs) and checking inboxes,
cursors, PUBLISH payloads, MongoDB documents and the REST answers. Fault
tests kill -9 the fan-out worker, FerretDB and Redis mid-stream and prove
that every message reaches every inbox exactly once."""
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
import zlib

import pymongo
import pytest
import redis

from chatlib import ROOT
from wsclient import WS

from helpers import (  # noqa: F401
    Channel,
    Queue,
    RETENTION_MS,
    SHARDS,
    backlog,
    dconv,
    ensure_topic,
    eventually,
    get,
    inbox,
    msg_fields,
    ping,
    receipt_fields,
    rest_request,
    shard,
    stack_cmd,
    stop_worker,
    stream,
    uid,
    ukey)
from helpers import auth, kafka_only, redis_only  # noqa: F401


# ---- configuration -------------------------------------------------------------

def test_config_keys_and_env_overrides(stack, tmp_path):
    conf = tmp_path / "w.conf"
    conf.write_text("shards = 8\nfanout_workers = 2\nfanout_index = 1\ninbox_max = 10\n"
                    "retention_days = 30\nbatch = 50\n")
    for text, msg in [("shards = 0\n", "shards must be between"),
                      ("batch = lots\n", "batch must be an integer"),
                      ("fanout_workers = 2\nfanout_index = 2\n", "fanout_index must be between"),
                      ("sweep_timeout_ms = 999\n", "sweep_timeout_ms must be between 1000 and 3600000"),
                      ("sweep_batch = 0\n", "sweep_batch must be between"),
                      ("persist_window_ms = 5\n", "persist_window_ms must be between 10 and 10000"),
                      ("persist_state_delay_ms = 60001\n", "persist_state_delay_ms must be between 0 and 60000")]:
        bad = tmp_path / "bad.conf"
        bad.write_text(text)
        p = subprocess.run([stack.worker, "--config", str(bad), "--role", "fanout"], capture_output=True, text=True)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
    p = subprocess.run([stack.worker, "--config", str(conf), "--role", "fanout"], capture_output=True, text=True,
                       env=dict(os.environ, CHAT_FANOUT_INDEX="5"))
    assert p.returncode == 2 and "fanout_index must be between 0 and 1" in p.stderr, p.stderr


def test_shard_lease_settings_are_checked(stack, tmp_path):
    """fanout_lease_ms: 0 (the static split) or at least 2 s; the renew
    interval at most a fifth of it (the fencing margin). Positive control:
    0 and a longer lease pass the check (a config error exits 2 before
    anything connects; a good one keeps retrying a Redis that is not
    there)."""
    for text, msg in [("fanout_lease_ms = 1000\n", "fanout_lease_ms must be between 2000"),
                      ("fanout_lease_ms = 5000\nfanout_lease_renew_ms = 2000\n",
                       "fanout_lease_renew_ms must be between 100 and 1000")]:
        bad = tmp_path / "bad.conf"
        bad.write_text(text)
        p = subprocess.run([stack.worker, "--config", str(bad), "--role", "fanout"], capture_output=True, text=True)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
    for text in ("fanout_lease_ms = 0\nfanout_lease_renew_ms = 5000\n", "fanout_lease_ms = 10000\n"):
        ok = tmp_path / "ok.conf"
        ok.write_text(text + "redis_url = redis://127.0.0.1:1\n")
        p = subprocess.Popen([stack.worker, "--config", str(ok), "--role", "fanout"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(timeout=1.5)
        except subprocess.TimeoutExpired:
            pass                    # running (retrying Redis): the config passed
        finally:
            if p.poll() is None:
                p.terminate()
            _, err = p.communicate(timeout=20)
        assert "must be" not in err, err


@redis_only
def test_static_split_without_leases(stack, r, q):
    """fanout_lease_ms = 0: the split of before, shard s by the worker
    with s mod fanout_workers == fanout_index, and no lease is taken. A
    worker of our own as index 1 of 2 in place of the stack's: a
    conversation on an odd shard is delivered (the positive control), one
    on an even shard waits for the stack's worker."""
    stop_worker(stack, "fanout")
    assert not r.keys("chat:{s*}:lease")            # the stopped worker gave its leases back
    log = open(os.path.join(stack.dir, "logs", "test-fanout-static.log"), "a")
    own = subprocess.Popen([stack.worker, "--config", stack.env["CHAT_WORKER_CONF"], "--role", "fanout"],
                           env=dict(stack.proc_env, CHAT_FANOUT_LEASE_MS="0", CHAT_FANOUT_WORKERS="2",
                                    CHAT_FANOUT_INDEX="1"), stdout=log, stderr=log)
    convs = {}
    while len(convs) < 2:
        a, b = uid("alice"), uid("bob")
        convs.setdefault(shard(dconv(a, b)) % 2, (a, b))
    try:
        for parity in (1, 0):
            a, b = convs[parity]
            q.send(msg_fields(dconv(a, b), a, b, 1))
        q.flush()
        odd_b = convs[1][1]
        eventually(lambda: r.get(ukey(odd_b, "cur")) == "1", timeout=30, what="the odd shard's message appended")
        time.sleep(1.0)
        assert r.get(ukey(convs[0][1], "cur")) is None      # the even shard is not ours
        assert not r.keys("chat:{s*}:lease")
    finally:
        own.terminate()
        own.wait(timeout=20)
        stack_cmd(stack, "up")
    even_b = convs[0][1]
    eventually(lambda: r.get(ukey(even_b, "cur")) == "1", timeout=30, what="the stack's worker took the even shard")


def test_heartbeat_keys(stack, r):
    keys = eventually(lambda: r.keys("chat:worker:*"), what="heartbeat keys")
    roles = {k.split(":")[2] for k in keys}
    assert {"fanout", "persist"} <= roles
    assert 0 < r.ttl(keys[0]) <= 10


# ---- fan-out --------------------------------------------------------------------

def test_direct_message_reaches_inboxes_and_nginx_workers(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    other = Channel(r)
    try:
        chan.register(bob, "phone")
        chan.register(alice, "laptop")          # only the sending device here: the token all the same
        other.register(alice, "phone")          # alice's other device gets her copy
        other.register(alice, "laptop")
        ids = []
        for seq in (1, 2, 3):
            f = msg_fields(conv, alice, bob, seq, dev="laptop", body=f'hi "{seq}" \\ \u00e9')
            ids.append(json.loads(f["ev"])["id"])
            q.send(f)
        q.flush()
        got = chan.collect(lambda g: len(g) >= 3, timeout=30)
        assert [sorted(g[0]) for g in got] == [sorted([f"{bob}:{c}", f"{alice}:{c}!laptop"]) for c in (1, 2, 3)]
        assert [g[1]["id"] for g in got] == ids
        assert got[0][1] == {"type": "msg", "id": ids[0], "conv": conv, "seq": 1, "from": alice, "to": bob,
                             "body": 'hi "1" \\ \u00e9', "kind": "text", "ts": got[0][1]["ts"]}
        got2 = other.collect(lambda g: len(g) >= 3)
        assert [g[0] for g in got2] == [[f"{alice}:1!laptop"], [f"{alice}:2!laptop"], [f"{alice}:3!laptop"]]
    finally:
        other.close()
    b = inbox(r, bob)
    a = inbox(r, alice)
    assert [c for c, _ in b] == [1, 2, 3] and [e["id"] for _, e in b] == ids
    assert [c for c, _ in a] == [1, 2, 3] and [e["id"] for _, e in a] == ids
    assert "cursor" not in b[0][1] and "!" not in b[0][1]
    # the sender's copy names the device it came from, first (docs/PIPELINE.md)
    raw = r.zrange(ukey(alice, "inbox"), 0, 0)[0]
    assert raw.startswith('{"!":"laptop","type":"msg",') and a[0][1]["!"] == "laptop"
    assert r.get(ukey(bob, "cur")) == "3"
    assert r.hget(ukey(bob, "last"), f"m:{conv}") == "3:3"
    assert RETENTION_MS - 60000 < r.pttl(ukey(bob, "inbox")) <= RETENTION_MS
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")


def test_own_copy_only_for_a_user_with_another_known_device(stack, r, q, chan):
    """The fan-out asks the acting user's known devices first: with only the
    acting one known, neither a message nor a read receipt costs an own
    copy (no cursor, no publish to the user); once another device is known
    both are copied again."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(alice, "phone")
    chan.register(bob, "phone")
    q.send(msg_fields(conv, alice, bob, 1, dev="phone"))
    q.send(receipt_fields(conv, alice, "read", 1, dev="phone"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 2, timeout=30)
    assert got[0][0] == [f"{bob}:1"] and got[0][1]["type"] == "msg"
    assert got[1][0] == [f"{bob}:2"] and got[1][1]["status"] == "read"
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")
    assert r.get(ukey(alice, "cur")) is None and inbox(r, alice) == []
    # positive control: a second device of alice is known now
    chan.register(alice, "laptop")
    q.send(msg_fields(conv, alice, bob, 2, dev="phone"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 3)
    assert sorted(got[2][0]) == sorted([f"{bob}:3", f"{alice}:1!phone"])
    assert [(c, e["!"], e["seq"]) for c, e in inbox(r, alice)] == [(1, "phone", 2)]


def test_one_publish_per_channel_with_every_recipient(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone")
    chan.register(bob, "tablet")
    chan.register(alice, "phone")
    chan.register(alice, "laptop")
    q.send(msg_fields(conv, bob, alice, 1, dev="tablet"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 1, timeout=30)
    chan.drain(0.5)
    assert len(chan.got) == 1
    assert sorted(got[0][0]) == sorted([f"{alice}:1", f"{bob}:1!tablet"])


def test_expired_registry_entries_get_nothing(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone", ttl_ms=-1000)       # expired a second ago
    q.send(msg_fields(conv, alice, bob, 1))
    q.flush()
    eventually(lambda: r.zcard(ukey(bob, "inbox")) == 1, timeout=30, what="inbox append")
    chan.drain(0.5)
    assert chan.got == []


def test_reconsumed_entry_adds_nothing_and_is_published_again(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone")
    r.hset(ukey(alice, "acked"), "laptop", 0)   # alice has another device: her copies are kept
    f1 = msg_fields(conv, alice, bob, 1)
    f2 = msg_fields(conv, alice, bob, 2)
    q.send(f1)
    q.send(f2)
    q.flush()
    chan.collect(lambda g: len(g) >= 2, timeout=30)
    q.send(f2)                                  # the same entry again (a re-consumed entry)
    q.flush()
    got = chan.collect(lambda g: len(g) >= 3)
    assert got[2][0] == [f"{bob}:2"] and got[2][1]["id"] == json.loads(f2["ev"])["id"]
    # older than the newest and still in the inbox (not yet acknowledged):
    # published again with its own cursor; once trimmed away, not at all
    q.send(f1)
    q.flush()
    got = chan.collect(lambda g: len(g) >= 4)
    assert got[3][0] == [f"{bob}:1"] and got[3][1]["id"] == json.loads(f1["ev"])["id"]
    r.zremrangebyscore(ukey(bob, "inbox"), 1, 1)          # as the module does once every device acked it
    q.send(f1)
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")
    chan.drain(0.5)
    assert len(chan.got) == 4
    assert [c for c, _ in inbox(r, bob)] == [2]
    assert r.get(ukey(bob, "cur")) == "2"
    assert r.get(ukey(alice, "cur")) == "2"


def test_notes_to_self(stack, r, q, chan):
    alice = uid("alice")
    conv = dconv(alice, alice)
    chan.register(alice, "laptop")
    chan.register(alice, "phone")
    q.send(msg_fields(conv, alice, alice, 1, dev="laptop"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 1, timeout=30)
    assert got[0][0] == [f"{alice}:1!laptop"]
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")
    assert [(c, e["!"]) for c, e in inbox(r, alice)] == [(1, "laptop")]
    assert r.get(ukey(alice, "cur")) == "1"


def test_receipt_recipients(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(alice, "phone")
    r.hset(ukey(alice, "acked"), "laptop", 0)   # alice has another device: her copies are kept
    chan.register(bob, "phone")
    chan.register(bob, "tablet")
    q.send(msg_fields(conv, alice, bob, 1, dev="phone"))
    q.flush()
    chan.collect(lambda g: len(g) >= 1, timeout=30)
    q.send(receipt_fields(conv, bob, "delivered", 1, dev="phone"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 2)
    assert got[1][0] == [alice]                   # delivered: live only, no cursor, no inbox copy
    assert got[1][1] == {"type": "receipt", "conv": conv, "status": "delivered", "by": bob, "seq": 1,
                         "ts": got[1][1]["ts"]}
    assert r.hget(ukey(alice, "last"), f"r:delivered:{conv}:{bob}") is None
    q.send(receipt_fields(conv, bob, "read", 1, dev="phone"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 3)
    assert sorted(got[2][0]) == sorted([f"{alice}:2", f"{bob}:2!phone"])
    assert r.hget(ukey(alice, "last"), f"r:read:{conv}:{bob}") == "1:2"
    # the same pointer again: a duplicate, published again with the same cursors
    q.send(receipt_fields(conv, bob, "read", 1, dev="phone"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 4)
    assert sorted(got[3][0]) == sorted(got[2][0])
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")
    assert r.get(ukey(alice, "cur")) == "2" and r.get(ukey(bob, "cur")) == "2"
    # notes to self: delivered goes nowhere, read to the other devices
    me = uid("carol")
    self_conv = dconv(me, me)
    chan.register(me, "phone")
    r.hset(ukey(me, "acked"), "laptop", 0)      # the device the read comes from is known
    q.send(msg_fields(self_conv, me, me, 1, dev="phone"))
    q.send(receipt_fields(self_conv, me, "delivered", 1, dev="laptop"))
    q.send(receipt_fields(self_conv, me, "read", 1, dev="laptop"))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 6)
    assert got[4][0] == [f"{me}:1!phone"] and got[4][1]["type"] == "msg"
    assert got[5][0] == [f"{me}:2!laptop"] and got[5][1]["status"] == "read"
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")
    assert [(e["type"], e["!"]) for _, e in inbox(r, me)] == [("msg", "phone"), ("receipt", "laptop")]
    assert [e.get("!") for _, e in inbox(r, alice)] == ["phone", None]   # her message, bob's read receipt
    assert [e.get("!") for _, e in inbox(r, bob)] == [None, "phone"]           # alice's message, his read


def test_malformed_entries_are_skipped_not_blocking(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone")
    bad_conv = f"d:{max(alice, bob)}:{min(alice, bob)}"                   # not in byte order
    q.send({"t": "msg", "conv": conv})                                   # incomplete
    q.send({"conv": conv, "garbage": "1"})
    q.send(dict(msg_fields(conv, alice, bob, 1), conv=bad_conv), )
    q.send(dict(msg_fields(conv, alice, bob, 1), to=uid("mallory")))     # not the other participant
    q.send(dict(msg_fields(conv, alice, bob, 1), ev="not json"))
    if q.kind == "kafka":
        q.send({"conv": conv}, raw=b"\xff not json at all")
    q.send(msg_fields(conv, alice, bob, 1))
    q.flush()
    got = chan.collect(lambda g: len(g) >= 1, timeout=30)
    assert got[0][0] == [f"{bob}:1"]
    eventually(lambda: q.backlog("fanout") == 0, what="fanout acknowledged everything")
    eventually(lambda: q.backlog("persist") == 0, what="persist acknowledged everything")
    assert r.get(ukey(bob, "cur")) == "1"


def test_inbox_is_bounded_and_expires(stack, r, q, chan):
    """inbox_max keeps the newest events (here 50, set by environment for a
    fan-out worker of our own in place of the stack's)."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    stop_worker(stack, "fanout")
    log = open(os.path.join(stack.dir, "logs", "test-fanout-inbox-max.log"), "a")
    own = subprocess.Popen([stack.worker, "--config", stack.env["CHAT_WORKER_CONF"], "--role", "fanout"],
                           env=dict(stack.proc_env, CHAT_INBOX_MAX="50", CHAT_RETENTION_DAYS="2"),
                           stdout=log, stderr=log)
    try:
        fs = [msg_fields(conv, alice, bob, seq) for seq in range(1, 121)]
        q.send_many(fs)
        eventually(lambda: r.get(ukey(bob, "cur")) == "120", timeout=60, what="120 appends")
        ib = inbox(r, bob)
        assert [c for c, _ in ib] == list(range(71, 121))
        assert [e["id"] for _, e in ib] == [json.loads(f["ev"])["id"] for f in fs[70:]]
        assert 2 * 86400000 - 60000 < r.pttl(ukey(bob, "inbox")) <= 2 * 86400000
        assert 2 * 86400000 - 60000 < r.pttl(ukey(bob, "last")) <= 2 * 86400000
        # the newest cursor dropped unacknowledged is kept: a device below it
        # is told it is behind, one at or above it is not
        assert r.hget(ukey(bob, "last"), "trim") == "70"
        for cursor, behind in ((None, True), (69, True), (70, False)):
            c = WS(stack.host, stack.port, stack.ws_path, token=stack.token(bob, "old"),
                   query=None if cursor is None else f"cursor={cursor}")
            hello = c.recv()
            assert hello["type"] == "hello" and hello.get("behind", False) is behind, (cursor, hello)
            c.close()
        st, _, body = get(stack, bob, "/poll?cursor=0&timeout=1")
        assert st == 200 and body["behind"] is True
        # the age bound: an hourly marker older than the retention (2 days)
        # drops every event appended before it when the next marker is set
        now = int(time.time() * 1000)
        r.delete(ukey(bob, "ages"))
        r.zadd(ukey(bob, "ages"), {"100": now - 2 * 86400000 - 7200000, "110": now - 2 * 86400000 - 3600000})
        assert int(r.hget(ukey(bob, "last"), "mk")) > now - 600000    # the newest marker's time
        r.hset(ukey(bob, "last"), "mk", now - 2 * 86400000 - 3600000)
        q.send(msg_fields(conv, alice, bob, 121))
        q.flush()
        eventually(lambda: r.get(ukey(bob, "cur")) == "121", timeout=30, what="one more append")
        assert [c for c, _ in inbox(r, bob)] == list(range(110, 122))
        assert r.hget(ukey(bob, "last"), "trim") == "109"
        assert r.zrange(ukey(bob, "ages"), 0, -1) == ["110", "121"]
        assert int(r.hget(ukey(bob, "last"), "mk")) >= now
        assert 2 * 86400000 - 60000 < r.pttl(ukey(bob, "ages")) <= 2 * 86400000
    finally:
        own.terminate()
        own.wait(timeout=20)
        stack_cmd(stack, "up")


@redis_only
def test_streams_are_trimmed_but_keep_what_a_group_needs(stack, r, q):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    key = stream(conv)
    stack_cmd(stack, "kill", "worker-persist")
    try:
        ids = q.send_many([msg_fields(conv, alice, bob, seq) for seq in range(1, 401)])
        first = ids[0]
        eventually(lambda: r.get(ukey(bob, "cur")) == "400", what="fan-out of 400 messages")
        time.sleep(6)           # a trim round has passed: nothing persist needs is gone
        assert r.xrange(key, first, first), "an entry the persist group has not read was trimmed"
    finally:
        stack_cmd(stack, "up")
    eventually(lambda: q.backlog("persist") == 0, timeout=60, what="persist caught up")
    eventually(lambda: not r.xrange(key, first, first), timeout=20, interval=0.5,
               what="the stream trimmed after both groups are done")


@redis_only
def test_each_role_commits_its_position_after_a_batch(stack, r, q, chan):
    """The fan-out and persist roles read the streams from positions of
    their own (chat:{s<s>}:pos:<role>, workers/queue.c), committed once a
    batch is processed: no consumer group, nothing pending per entry."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    key = stream(conv)
    chan.register(bob, "phone")
    eid = q.send(msg_fields(conv, alice, bob, 1))
    chan.collect(lambda g: len(g) >= 1, timeout=20)

    def at_or_past(role):
        pos = r.get("chat:{s%d}:pos:%s" % (shard(conv), role))
        return pos is not None and tuple(map(int, pos.split("-"))) >= tuple(map(int, eid.split("-")))
    eventually(lambda: at_or_past("fanout"), what="the fan-out's position past the entry")
    eventually(lambda: at_or_past("persist"), timeout=30, what="persist's position past the entry")
    assert r.xinfo_groups(key) == []


@redis_only
def test_a_clean_stop_commits_what_was_processed(stack, r, q, chan):
    """With commits held back (queue_commit_ms = 10 s) the fan-out's position
    lags what it processed; a clean stop (SIGTERM: the leases' release)
    commits it, so the next start processes nothing again."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    pos = "chat:{s%d}:pos:fanout" % shard(conv)

    def sid(x):
        return tuple(map(int, x.split("-")))
    stop_worker(stack, "fanout")
    up = subprocess.run([os.path.join(ROOT, "scripts/stack"), "up", "--dir", stack.dir],
                        env=dict(stack.proc_env, CHAT_QUEUE_COMMIT_MS="10000"), capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        chan.register(bob, "phone")
        ids = [q.send(msg_fields(conv, alice, bob, seq)) for seq in (1, 2, 3)]
        chan.collect(lambda g: len(g) >= 3, timeout=20)
        time.sleep(0.5)
        held = r.get(pos)
        assert held is None or sid(held) < sid(ids[-1]), "committed before queue_commit_ms"
        stop_worker(stack, "fanout")
        assert r.get(pos) == ids[-1]
    finally:
        stack_cmd(stack, "up")


@redis_only
def test_an_earlier_versions_consumer_group_is_taken_over_at_start(stack, r, q, chan):
    """Upgrading from consumer groups: entries the old fan-out read and never
    acknowledged (pending under its name) are read again by the new one,
    which starts from the group's place (lua/queue_start.lua) and destroys
    it; nothing before that place is processed again."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    key = stream(conv)
    pos = "chat:{s%d}:pos:fanout" % shard(conv)
    chan.register(bob, "phone")
    stack_cmd(stack, "kill", "worker-fanout")
    try:
        r.delete(pos)                           # as before the upgrade: no position, a group
        r.xgroup_create(key, "fanout", "$", mkstream=True)
        q.send(msg_fields(conv, alice, bob, 1))
        got = r.xreadgroup("fanout", "fanout-0", {key: ">"}, count=100)
        assert got and any(f.get("conv") == conv for _, f in got[0][1])
    finally:
        stack_cmd(stack, "up")
    chan.collect(lambda g: len(g) >= 1, timeout=20)
    assert r.get(ukey(bob, "cur")) == "1"
    last = tuple(map(int, got[0][1][-1][0].split("-")))
    eventually(lambda: tuple(map(int, r.get(pos).split("-"))) >= last, what="the position committed")
    assert "fanout" not in [g["name"] for g in r.xinfo_groups(key)]


def test_fanout_killed_mid_stream_delivers_everything_exactly_once(stack, r, q, chan):
    users = [uid("k") for _ in range(6)]
    convs = [(users[i], users[j]) for i in range(6) for j in range(i + 1, 6)]   # 15 conversations
    n_per_conv = 200
    for u in users:
        chan.register(u, "phone")
    expected = {u: [] for u in users}
    seqs = {c: 0 for c in convs}
    entries = []
    for k in range(n_per_conv):
        for a, b in convs:
            seqs[(a, b)] += 1
            frm, to = (a, b) if k % 2 else (b, a)
            f = msg_fields(dconv(a, b), frm, to, seqs[(a, b)], dev="laptop")
            entries.append(f)
            mid = json.loads(f["ev"])["id"]
            expected[a].append(mid)
            expected[b].append(mid)

    def producer():
        for i in range(0, len(entries), 100):
            q.send_many(entries[i:i + 100])
            time.sleep(0.03)

    t = threading.Thread(target=producer)
    t.start()
    try:
        eventually(lambda: int(r.get(ukey(users[0], "cur")) or 0) > 50, timeout=30, what="fan-out under way")
        stack_cmd(stack, "kill", "worker-fanout")
        killed_at = sum(int(r.get(ukey(u, "cur")) or 0) for u in users)
    finally:
        t.join()
    assert killed_at < 2 * len(entries), "the kill came too late to prove anything"
    stack_cmd(stack, "up")
    eventually(lambda: q.backlog("fanout") == 0, timeout=90, what="fan-out caught up")
    for u in users:
        ib = inbox(r, u)
        # exactly once: one cursor per message, no cursor spent twice
        assert r.get(ukey(u, "cur")) == str(len(expected[u]))
        assert [c for c, _ in ib] == list(range(1, len(expected[u]) + 1))
        assert sorted(e["id"] for _, e in ib) == sorted(expected[u])
        # per conversation in seq order
        per = {}
        for _, e in ib:
            per.setdefault(e["conv"], []).append(e["seq"])
        assert all(v == list(range(1, n_per_conv + 1)) for v in per.values())
    # what was published: every (user, cursor) always names the same message
    chan.drain(1.0)
    seen = {}
    for rcpts, ev in chan.got:
        for tok in rcpts:
            u, c = tok.split("!")[0].rsplit(":", 1)
            assert seen.setdefault((u, int(c)), ev["id"]) == ev["id"]
    for u in users:
        assert {c for (uu, c) in seen if uu == u} == set(range(1, len(expected[u]) + 1))


def test_workers_survive_a_redis_restart(stack, r, q, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone")
    q.send(msg_fields(conv, alice, bob, 1))
    q.flush()
    eventually(lambda: r.get(ukey(bob, "cur")) == "1", timeout=30, what="first message")
    eventually(lambda: q.backlog("fanout") == 0 and q.backlog("persist") == 0, what="all acknowledged")
    time.sleep(1.2)                               # AOF fsync (everysec)
    pids = {n: open(os.path.join(stack.dir, "pids", f"worker-{n}")).read().strip() for n in ("fanout", "persist")}
    stack_cmd(stack, "kill", "redis")
    time.sleep(2)
    stack_cmd(stack, "up")
    for n, pid in pids.items():
        assert os.path.exists(f"/proc/{pid}"), f"worker-{n} exited while Redis was away"
    r2 = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    eventually(lambda: ping(r2), what="redis back")
    eventually(lambda: ping(r), what="the shared client reconnected")
    ch2 = Channel(r2)
    try:
        ch2.register(bob, "phone")
        q.send(msg_fields(conv, alice, bob, 2))
        q.flush()
        got = ch2.collect(lambda g: len(g) >= 1, timeout=30)
        assert got[0][0] == [f"{bob}:2"]
    finally:
        ch2.close()
        r2.close()


# ---- persistence -----------------------------------------------------------------

def test_persist_writes_messages_and_conversations(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    fs = [msg_fields(conv, alice, bob, 1, ts=1000), msg_fields(conv, bob, alice, 2, ts=2000),
          msg_fields(conv, alice, bob, 3, ts=3000, kind="media", body="",
                     media={"url": "https://example.com/a.jpg", "mime": "image/jpeg", "size": 1234})]
    q.send_many(fs)
    ids = [json.loads(f["ev"])["id"] for f in fs]
    eventually(lambda: db.messages.count_documents({"conv": conv}) == 3, timeout=30, what="messages in MongoDB")
    m = db.messages.find_one({"_id": ids[0]})
    assert m == {"_id": ids[0], "conv": conv, "seq": 1, "from": alice, "to": bob, "body": "message 1",
                 "kind": "text", "ts": 1000}
    m = db.messages.find_one({"_id": ids[2]})
    assert m["media"] == {"url": "https://example.com/a.jpg", "mime": "image/jpeg", "size": 1234}
    assert m["kind"] == "media"

    def convs_done():
        docs = {d["_id"]: d for d in db.conversations.find({"conv": conv})}
        return docs if len(docs) == 2 and all(d.get("last", {}).get("seq") == 3 for d in docs.values()) else None
    docs = eventually(convs_done, what="conversation documents")
    a = docs[f"{alice}|{conv}"]
    assert a["user"] == alice and a["conv"] == conv and a["last_seq"] == 3
    assert a["read_seq"] == 0 and a["delivered_seq"] == 0 and a["ts"] == 3000
    assert a["last"]["id"] == ids[2] and a["last"]["media"]["size"] == 1234 and "cursor" not in a["last"]

    # pointers only move forward
    q.send_many([receipt_fields(conv, bob, "delivered", 3), receipt_fields(conv, bob, "read", 2)])
    eventually(lambda: (db.conversations.find_one({"_id": f"{bob}|{conv}"}) or {}).get("read_seq") == 2,
               what="read pointer")
    q.send_many([receipt_fields(conv, bob, "read", 1),
                 msg_fields(conv, alice, bob, 2, ts=9999)])    # another id with an existing seq
    eventually(lambda: q.backlog("persist") == 0, what="persist acknowledged everything")
    b = db.conversations.find_one({"_id": f"{bob}|{conv}"})
    assert b["read_seq"] == 2 and b["delivered_seq"] == 3 and b["last_seq"] == 3 and b["last"]["id"] == ids[2]
    assert db.messages.count_documents({"conv": conv}) == 3


def test_persist_is_idempotent_for_a_reconsumed_batch(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    fs = [msg_fields(conv, alice, bob, s) for s in (1, 2)]
    q.send_many(fs + fs)
    eventually(lambda: q.backlog("persist") == 0, timeout=30, what="persist acknowledged everything")
    eventually(lambda: db.messages.count_documents({"conv": conv}) == 2, what="messages")
    assert db.conversations.find_one({"_id": f"{alice}|{conv}"})["last_seq"] == 2


def test_persist_survives_ferretdb_restart(stack, r, q, db):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    stack_cmd(stack, "kill", "ferretdb")
    try:
        fs = [msg_fields(conv, alice, bob, seq) for seq in range(1, 21)]
        ids = [json.loads(f["ev"])["id"] for f in fs]
        q.send_many(fs)
        # fan-out does not need MongoDB; persist keeps the entries unacknowledged
        eventually(lambda: r.get(ukey(bob, "cur")) == "20", timeout=30, what="fan-out without MongoDB")
        time.sleep(3)
        assert q.backlog("persist") >= 20
        pid = open(os.path.join(stack.dir, "pids", "worker-persist")).read().strip()
        assert os.path.exists(f"/proc/{pid}")
    finally:
        stack_cmd(stack, "up")
    eventually(lambda: q.backlog("persist") == 0, timeout=60, what="persist caught up")
    c = pymongo.MongoClient(stack.env["MONGO_URI"], serverSelectionTimeoutMS=10000).get_default_database()
    assert sorted(d["_id"] for d in c.messages.find({"conv": conv})) == sorted(ids)
    assert c.conversations.find_one({"_id": f"{bob}|{conv}"})["last_seq"] == 20
    c.client.close()


# ---- REST --------------------------------------------------------------------------

def _seed(q, db, conv, frm, to, n, ts0=None):
    ts0 = ts0 or int(time.time() * 1000)
    fs = []
    for seq in range(1, n + 1):
        a, b = (frm, to) if seq % 3 else (to, frm)
        fs.append(msg_fields(conv, a, b, seq, ts=ts0 + seq))
    q.send_many(fs)
    eventually(lambda: db.messages.count_documents({"conv": conv}) == n, timeout=30, what="seeded messages")
    eventually(lambda: (db.conversations.find_one({"_id": f"{to}|{conv}"}) or {}).get("last", {}).get("seq") == n,
               what="seeded conversations")
    return [json.loads(f["ev"])["id"] for f in fs]


def test_history_pages_newest_first(stack, q, db):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    ids = _seed(q, db, conv, alice, bob, 7)
    st, _, body = get(stack, bob, f"/history?conv={conv}&limit=3")
    assert st == 200, body
    assert [m["seq"] for m in body["messages"]] == [7, 6, 5] and body["next_before"] == 5
    m = body["messages"][0]
    assert m == {"id": ids[6], "conv": conv, "seq": 7, "from": alice, "to": bob, "body": "message 7",
                 "kind": "text", "ts": m["ts"]}
    assert isinstance(m["id"], str)
    st, _, body = get(stack, alice, f"/history?conv={conv.replace(':', '%3A')}&limit=3&before=5")
    assert [m["seq"] for m in body["messages"]] == [4, 3, 2] and body["next_before"] == 2
    st, _, body = get(stack, alice, f"/history?conv={conv}&before=2&limit=3")
    assert [m["seq"] for m in body["messages"]] == [1] and body["next_before"] is None
    st, _, body = get(stack, alice, f"/history?conv={conv}&limit=7")
    assert len(body["messages"]) == 7 and body["next_before"] is None
    st, _, body = get(stack, alice, f"/history?conv={conv}")
    assert [m["seq"] for m in body["messages"]] == [7, 6, 5, 4, 3, 2, 1] and body["next_before"] is None
    st, _, body = get(stack, alice, f"/history?conv={dconv(alice, uid('nobody'))}")
    assert st == 200 and body == {"messages": [], "next_before": None}


def test_history_default_and_maximum_limits(stack, q, db):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    _seed(q, db, conv, alice, bob, 120)
    st, _, body = get(stack, alice, f"/history?conv={conv}")
    assert st == 200 and len(body["messages"]) == 50 and body["next_before"] == 71
    st, _, body = get(stack, alice, f"/history?conv={conv}&limit=100")
    assert len(body["messages"]) == 100 and body["next_before"] == 21
    st, _, body = get(stack, alice, f"/history?conv={conv}&limit=101")
    assert st == 400 and body["type"] == "error" and body["code"] == "bad_request"


@pytest.mark.parametrize("query,status,code", [
    ("", 400, "bad_request"),
    ("conv=", 400, "bad_request"),
    ("conv=x:a:b", 400, "bad_request"),
    ("conv=d:zz:aa", 400, "bad_request"),            # not in byte order
    ("conv=d:a%20b:c", 400, "bad_request"),
    ("conv={me}&limit=0", 400, "bad_request"),
    ("conv={me}&limit=abc", 400, "bad_request"),
    ("conv={me}&before=-1", 400, "bad_request"),
    ("conv={me}&before=", 400, "bad_request"),
    ("conv={other}", 403, "forbidden"),
    ("conv=g:team", 403, "forbidden"),
])
def test_history_rejects(stack, query, status, code):
    me = uid("dave")
    query = query.format(me=dconv(me, "zzz"), other=dconv("aaa", "bbb"))
    st, _, body = get(stack, me, "/history?" + query)
    assert st == status, body
    assert body["type"] == "error" and body["code"] == code and body["message"]


def test_rest_requires_a_user(stack):
    st, _, body = get(stack, None, "/history?conv=d:a:b")
    assert st == 401
    st, _, body = rest_request(stack, "GET", "/chat/conversations")
    assert st == 401 and body["code"] == "unauthorized"
    st, _, body = rest_request(stack, "GET", "/chat/history?conv=d:a:b", headers={"X-Chat-User": "a"})
    assert st == 200 and body == {"messages": [], "next_before": None}
    st, _, body = rest_request(stack, "GET", "/chat/nope", headers={"X-Chat-User": "a"})
    assert st == 404 and body["code"] == "not_found"


def test_conversations_most_recent_first_with_unread(stack, q, db):
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    c1, c2 = dconv(alice, bob), dconv(alice, carol)
    now = int(time.time() * 1000)
    q.send_many([msg_fields(c1, bob, alice, seq, ts=now + seq) for seq in (1, 2, 3)]
                + [msg_fields(c1, alice, bob, 4, ts=now + 4), msg_fields(c2, carol, alice, 1, ts=now + 10)])
    eventually(lambda: (db.conversations.find_one({"_id": f"{alice}|{c2}"}) or {}).get("last"), timeout=30,
               what="c2")
    eventually(lambda: (db.conversations.find_one({"_id": f"{alice}|{c1}"}) or {}).get("last", {}).get("seq") == 4,
               what="c1")
    st, _, body = get(stack, alice, "/conversations")
    assert st == 200, body
    cs = body["conversations"]
    assert [c["conv"] for c in cs] == [c2, c1]
    assert cs[0]["unread"] == 1 and cs[0]["last_seq"] == 1 and cs[0]["read_seq"] == 0
    assert cs[0]["last"]["from"] == carol and cs[0]["last"]["seq"] == 1 and "cursor" not in cs[0]["last"]
    assert cs[1]["unread"] == 3 and cs[1]["last"]["seq"] == 4
    q.send(receipt_fields(c1, alice, "read", 2))
    q.flush()
    eventually(lambda: db.conversations.find_one({"_id": f"{alice}|{c1}"})["read_seq"] == 2, what="read")
    cs = get(stack, alice, "/conversations")[2]["conversations"]
    assert cs[1]["read_seq"] == 2 and cs[1]["unread"] == 1
    cs = get(stack, bob, "/conversations")[2]["conversations"]
    assert [(c["conv"], c["unread"]) for c in cs] == [(c1, 1)]
    assert get(stack, uid("nobody"), "/conversations")[2] == {"conversations": []}


# ---- Kafka specifics ----------------------------------------------------------------

@kafka_only
def test_kafka_records_may_carry_numbers_and_objects(stack, r, q, db, chan):
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone")
    f = msg_fields(conv, alice, bob, 1)
    mid = json.loads(f["ev"])["id"]
    f["seq"] = 1
    f["ev"] = json.loads(f["ev"])
    q.send(f)
    q.flush()
    got = chan.collect(lambda g: len(g) >= 1, timeout=30)
    assert got[0][0] == [f"{bob}:1"] and got[0][1]["id"] == mid
    eventually(lambda: db.messages.find_one({"_id": mid}), timeout=30, what="persisted")


def test_messages_out_of_seq_order_are_not_lost(stack, r, q, chan):
    """Kafka: seqs are assigned in Redis and produced by several nginx worker
    processes, so seq n+1 can reach the partition before seq n. Both must
    reach the inbox, once each; a re-consumed entry still adds nothing."""
    alice, bob = uid("alice"), uid("bob")
    conv = dconv(alice, bob)
    chan.register(bob, "phone")
    r.hset(ukey(alice, "acked"), "laptop", 0)   # alice has another device: her copies are kept
    f = {s: msg_fields(conv, alice, bob, s) for s in range(1, 7)}
    q.send_many([f[2]])
    got = chan.collect(lambda g: len(g) >= 1, timeout=30)
    assert got[0][0] == [f"{bob}:1"] and got[0][1]["seq"] == 2
    q.send_many([f[1], f[3], f[6], f[4]])         # a later batch: 1 is older than the newest
    got = chan.collect(lambda g: len(g) >= 5)
    assert sorted(g[1]["seq"] for g in got) == [1, 2, 3, 4, 6]
    assert sorted(g[0][0] for g in got) == sorted(f"{bob}:{c}" for c in (1, 2, 3, 4, 5))
    assert r.hget(ukey(bob, "last"), f"h:{conv}") == "5"          # 5 not seen yet
    q.send_many([f[1], f[5], f[2], f[4], f[6], f[3]])      # 5 is new, the others are duplicates
    eventually(lambda: q.backlog("fanout") == 0, timeout=30, what="fanout acknowledged everything")
    assert sorted(e["seq"] for _, e in inbox(r, bob)) == [1, 2, 3, 4, 5, 6]
    assert r.get(ukey(bob, "cur")) == "6" and r.get(ukey(alice, "cur")) == "6"
    assert r.hget(ukey(bob, "last"), f"h:{conv}") is None
    assert r.hget(ukey(bob, "last"), f"m:{conv}").startswith("6:")
