"""Every Redis script of lua/ on its own, against a bare redis-server: the
guarantee each header names, its edge cases, and that every key it touches
is one it was given (one hash tag: a Redis Cluster slot)."""
import json
import os
import re
import time

import pytest
import redis

from conftest import ROOT, SCRIPTS

import golden

U = "chat:{u:alice}:"


def test_every_script_file_is_in_the_table_with_a_header():
    files = sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "lua"))
                   if f.endswith(".lua") and not f.startswith("_"))
    assert sorted(SCRIPTS) == files and files
    for f in files:
        head = open(os.path.join(ROOT, "lua", f + ".lua")).read().split("\n")
        header = "\n".join(l for l in head if l.startswith("--"))
        for part in ("KEYS:", "ARGV:", "returns:", "guarantees:"):
            assert part in header, (f, part)
        # headers stay out of what Redis gets; includes are resolved
        assert "-- KEYS:" not in SCRIPTS[f] and "@include" not in SCRIPTS[f]


def test_scripts_touch_only_keys_they_are_given():
    """No key name is built inside a script (else a cluster slot could be
    wrong); channels (PUBLISH) are not keys. A sharded channel (SPUBLISH) is
    slot-checked like a key: it must carry the user's hash tag {u:<user>},
    the slot of the script's KEYS (t/test_cluster.py runs them on a cluster)."""
    for name, src in SCRIPTS.items():
        aliases = set()       # local SET, USER = KEYS[4], ARGV[5]
        for m in re.finditer(r"local ([\w, ]+) = ([^\n]+)", src):
            for var, val in zip(m.group(1).split(","), m.group(2).split(",")):
                if val.strip().startswith("KEYS["):
                    aliases.add(var.strip())
        # local function raise(k) ... raise(KEYS[1]): k is a key when every call passes one
        for m in re.finditer(r"local function (\w+)\((\w+)\)", src):
            calls = re.findall(r"\b%s\(([^)]*)\)" % m.group(1), src[m.end():])
            if calls and all(c.strip().startswith("KEYS[") for c in calls):
                aliases.add(m.group(2))
        for m in re.finditer(r"redis\.p?call\('(\w+)',\s*([^,)]+)(?:,\s*([^,)]+))?", src):
            cmd, first = m.group(1), m.group(2).strip()
            if cmd in ("XGROUP", "XINFO"):          # a subcommand, then the key
                first = (m.group(3) or "").strip()
            if cmd in ("PUBLISH",):
                continue
            if cmd == "SPUBLISH":
                assert re.match(r"'chat:p:\{u:' \.\. (USER|ARGV\[\d\]) \.\. '\}'$", first), (name, first)
                continue
            assert first.startswith("KEYS[") or first in aliases, (name, cmd, first)


# --- registry and presence -------------------------------------------------

def test_sharded_presence_goes_to_the_users_slot_channel(r, run):
    """With the cluster flag ("s") register, refresh and unregister announce
    on chat:p:{u:<user>} with SPUBLISH (the user's slot), not on the
    classic channel; without it, on chat:p:<user> only (positive control)."""
    sp = r.pubsub()
    sp.ssubscribe("chat:p:{u:alice}")
    cp = r.pubsub()
    cp.subscribe("chat:p:alice")
    sp.get_sharded_message(timeout=1)
    cp.get_message(timeout=1)
    now = int(time.time() * 1000)
    keys = [U + "conns", U + "seen", U + "set"]
    assert run("register", [U + "conns", U + "acked", U + "last", U + "set"],
               ["w1|phone|1", now, 30000, 3, "alice", "phone", "s"])[0] == 1
    assert run("unregister", keys, ["w1|phone|1", now + 1, "alice", "s"]) == 1
    assert run("refresh", [U + "conns", U + "set"], ["w1|phone|1", now + 2, 30000, "alice", "s"]) == 0
    got = [json.loads(m["data"]) for m in iter(lambda: sp.get_sharded_message(timeout=0.2), None)
           if m["type"] == "smessage"]
    assert [g["online"] for g in got] == [True, False, True]
    assert [m for m in iter(lambda: cp.get_message(timeout=0.2), None) if m["type"] == "message"] == []
    # the classic form, same steps: classic channel only
    assert run("unregister", keys, ["w1|phone|1", now + 3, "alice"]) == 1
    assert [json.loads(m["data"])["online"] for m in iter(lambda: cp.get_message(timeout=0.2), None)
            if m["type"] == "message"] == [False]
    assert [m for m in iter(lambda: sp.get_sharded_message(timeout=0.2), None) if m["type"] == "smessage"] == []


def test_sharded_relay_returns_the_channels_unpublished(r, run):
    now = int(time.time() * 1000)
    r.zadd(U + "conns", {"chat:w:h:1|phone|1": now + 30000, "chat:w:h:1|tab|2": now + 30000,
                         "chat:w:h:2|web|3": now + 30000, "chat:w:h:3|old|4": now - 1})
    p = r.pubsub()
    p.subscribe("chat:w:h:1", "chat:w:h:2")
    for _ in range(2):
        p.get_message(timeout=1)
    out = run("relay", [U + "conns"], [now, "alice", '{"type":"typing"}', "s"])
    assert out[0] == 'alice\n{"type":"typing"}' and sorted(out[1:]) == ["chat:w:h:1", "chat:w:h:2"]
    assert [m for m in iter(lambda: p.get_message(timeout=0.2), None) if m["type"] == "message"] == []
    # without the flag: published, one per worker channel (positive control)
    assert run("relay", [U + "conns"], [now, "alice", '{"type":"typing"}']) == 2
    assert sorted(m["channel"] for m in iter(lambda: p.get_message(timeout=0.2), None)
                  if m["type"] == "message") == ["chat:w:h:1", "chat:w:h:2"]

def reg(run, member, now, ttl=30000, mx=3, user="alice", dev="phone"):
    return run("register", [U + "conns", U + "acked", U + "last", U + "set"],
               [member, now, ttl, mx, user, dev])


def test_register_counts_bounds_and_announces_once(r, run):
    p = r.pubsub()
    p.subscribe("chat:p:alice")
    p.get_message(timeout=1)
    now = int(time.time() * 1000)
    assert reg(run, "w1|phone|1", now) == [1, "0", "0"]
    assert reg(run, "w1|laptop|2", now, dev="laptop") == [2, "0", "0"]
    assert reg(run, "w2|tab|3", now, dev="tab") == [3, "0", "0"]
    assert reg(run, "w2|tab|4", now, dev="tab") == [-1, "0", "0"]      # the bound
    msgs = [m for m in iter(lambda: p.get_message(timeout=0.2), None) if m["type"] == "message"]
    assert [json.loads(m["data"])["online"] for m in msgs] == [True]
    assert r.hget(U + "acked", "phone") == "0" and r.pttl(U + "conns") > 0
    # expired members do not count; the trim point comes back
    r.hset(U + "last", "trim", 17)
    r.hset(U + "acked", "phone", 12)
    assert reg(run, "w3|phone|5", now + 60000) == [1, "12", "17"]


def test_last_seen_nobody_is_never_announced_and_looks_offline(r, run):
    p = r.pubsub()
    p.subscribe("chat:p:alice")
    p.get_message(timeout=1)
    r.hset(U + "set", "last_seen", "nobody")
    now = int(time.time() * 1000)
    assert reg(run, "w1|phone|1", now)[0] == 1
    keys = [U + "conns", U + "seen", U + "set"]
    assert run("presence", keys, [now, "0"]) == [0, ""]
    assert run("presence", keys, [now, "1"]) == [1, ""]           # the user itself
    assert run("refresh", [U + "conns", U + "set"], ["w1|phone|1", now + 60000, 30000, "alice"]) == 0
    assert run("unregister", keys, ["w1|phone|1", now + 60001, "alice"]) == 1
    assert r.get(U + "seen") == str(now + 60001)
    assert [m for m in iter(lambda: p.get_message(timeout=0.2), None) if m["type"] == "message"] == []
    r.hdel(U + "set", "last_seen")              # everyone: the state is visible
    assert run("presence", keys, [now, "0"]) == [0, str(now + 60001)]


def test_unregister_announces_only_the_last_close_and_refresh_revives(r, run):
    p = r.pubsub()
    p.subscribe("chat:p:alice")
    p.get_message(timeout=1)
    now = int(time.time() * 1000)
    reg(run, "w1|phone|1", now)
    reg(run, "w1|laptop|2", now, dev="laptop")
    keys = [U + "conns", U + "seen", U + "set"]
    assert run("unregister", keys, ["w1|phone|1", now + 1, "alice"]) == 1
    assert run("unregister", keys, ["w1|phone|1", now + 2, "alice"]) == 0      # twice: nothing
    assert run("presence", keys, [now + 3, "0"]) == [1, ""]
    assert run("unregister", keys, ["w1|laptop|2", now + 4, "alice"]) == 1
    assert run("presence", keys, [now + 5, "0"]) == [0, str(now + 4)]
    # a refresh after everything expired announces the user again
    assert run("refresh", [U + "conns", U + "set"], ["w1|phone|1", now + 6, 30000, "alice"]) == 0
    got = [json.loads(m["data"]) for m in iter(lambda: p.get_message(timeout=0.2), None)
           if m["type"] == "message"]
    assert [(g["online"], g["last_seen"]) for g in got] == [(True, None), (False, now + 4), (True, None)]


def test_relay_publishes_once_per_worker_channel_of_live_entries(r, run):
    p = r.pubsub()
    p.subscribe("chat:w:a", "chat:w:b", "chat:w:c")
    for _ in range(3):
        p.get_message(timeout=1)
    now = int(time.time() * 1000)
    r.zadd("chat:{u:bob}:conns", {"chat:w:a|phone|1": now + 1000, "chat:w:a|web|2": now + 1000,
                                  "chat:w:b|tab|3": now + 1000, "chat:w:c|old|4": now - 1})
    assert run("relay", ["chat:{u:bob}:conns"], [now, "bob", '{"type":"typing"}']) == 2
    got = sorted((m["channel"], m["data"]) for m in iter(lambda: p.get_message(timeout=0.2), None)
                 if m["type"] == "message")
    assert got == [("chat:w:a", 'bob\n{"type":"typing"}'), ("chat:w:b", 'bob\n{"type":"typing"}')]
    # any event, as it was given: a delivered receipt the same way
    rc = '{"type":"receipt","conv":"d:alice:bob","status":"delivered","by":"alice","seq":3,"ts":1}'
    assert run("relay", ["chat:{u:bob}:conns"], [now, "bob", rc]) == 2
    got = sorted((m["channel"], m["data"]) for m in iter(lambda: p.get_message(timeout=0.2), None)
                 if m["type"] == "message")
    assert got == [("chat:w:a", "bob\n" + rc), ("chat:w:b", "bob\n" + rc)]
    assert r.zcard("chat:{u:bob}:conns") == 4            # nothing stored, nothing removed


# --- accept ----------------------------------------------------------------

S = "chat:{s3}:"


def accept_args(conv="d:alice:bob", mid="100", ts="1700000000000", to=("to", "bob"), sender="alice"):
    return [conv, mid, ts, 3600, '{"type":"msg","id":"%s","conv":"%s","seq":' % (mid, conv),
            ',"from":"%s","body":"hi","kind":"text","ts":%s}' % (sender, ts), sender, "phone", to[0], to[1]]


def test_accept_numbers_enqueues_and_dedups(r, run):
    keys = [S + "dd:alice:c1", S + "seq", S + "in"]
    rec = run("accept", keys, accept_args())
    assert rec == "100|1|1700000000000|d:alice:bob"
    assert run("accept", keys, accept_args(mid="101")) == rec         # a retry: the first answer
    assert run("accept", [S + "dd:alice:c2", S + "seq", S + "in"], accept_args(mid="102")).split("|")[1] == "2"
    assert run("accept", [S + "dd:alice:c3", S + "seq", S + "in"],
               accept_args(conv="d:alice:carol", mid="103", to=("to", "carol"))).split("|")[1] == "1"
    entries = r.xrange(S + "in")
    assert len(entries) == 3
    f = entries[0][1]
    assert f["t"] == "msg" and f["conv"] == "d:alice:bob" and f["seq"] == "1" and f["to"] == "bob"
    assert json.loads(f["ev"])["seq"] == 1 and f["dev"] == "phone"
    assert 0 < r.ttl(S + "dd:alice:c1") <= 3600


def _vector_accept_args(v):
    """accept's ARGV for a message vector: the event split at its seq, as
    the module splits it (features/ngx_chat_msg.c)"""
    f = {k: b.decode() for k, b in v["fields"]}
    pre, suf = f["ev"].split('"seq":%s' % f["seq"], 1)
    tofield = "group" if "group" in f else "to"
    return f, [f["conv"], json.loads(f["ev"])["id"], "1700000000000", 3600, pre + '"seq":', suf, f["from"],
               f.get("dev", ""), tofield, f[tofield]]


def test_accept_writes_the_golden_vectors_entries(r, run):
    """The stream entry and the Kafka record accept and accept_k write are
    t/vectors/entries.txt's (the workers' decoder, libchat, is held to the
    same vectors); an absent dev is written empty, which reads as absent."""
    for name in ("dm", "dm_back"):
        f, args = _vector_accept_args(golden.entry(name))
        r.flushall()
        r.hset(S + "seq", f["conv"], int(f["seq"]) - 1)
        run("accept", [S + "dd:x:" + name, S + "seq", S + "in"], args)
        (_, got), = r.xrange(S + "in")
        assert {k: x for k, x in got.items() if x != ""} == f, name
        r.hset(S + "seq", f["conv"], int(f["seq"]) - 1)
        rec = json.loads(run("accept_k", [S + "dd:k:" + name, S + "seq"], args)[2])
        assert {k: x for k, x in rec.items() if x != ""} == f, name
    f, args = _vector_accept_args(golden.entry("group_msg"))
    r.flushall()
    r.hset(S + "g:team1:mem", "alice", "1")
    r.hset(S + "seq", f["conv"], int(f["seq"]) - 1)
    run("accept", [S + "dd:x:g", S + "seq", S + "in", S + "g:team1:mem", S + "g:team1:snd"], args)
    (_, got), = r.xrange(S + "in")
    assert got == f


def test_accept_checks_group_membership_without_consuming_a_seq(r, run):
    mem, snd = S + "g:ops:mem", S + "g:ops:snd"
    keys = lambda cid: [S + "dd:alice:" + cid, S + "seq", S + "in", mem, snd]
    args = accept_args(conv="g:ops", to=("group", "ops"))
    assert run("accept", keys("a"), args) == "not_found"
    r.hset(mem, mapping={"bob": "1", "alice": "1:5"})
    assert run("accept", keys("b"), args) == "forbidden"              # removed at seq 5
    r.hset(mem, "alice", "6")
    rec = run("accept", keys("c"), args)
    assert rec.split("|")[1] == "1" and r.zscore(snd, "alice") == 1
    assert r.hget(S + "seq", "g:ops") == "1" and len(r.xrange(S + "in")) == 1
    r.hset(mem, "alice", "6:9")
    assert run("accept", keys("c"), args) == rec      # a retry is answered even after leaving


def test_accept_k_keeps_the_record_until_the_broker_has_it(r, run):
    keys = [S + "dd:alice:k1", S + "seq"]
    first = run("accept_k", keys, accept_args())
    assert first[0] == 1 and first[1] == "100|1|1700000000000|d:alice:bob"
    record = json.loads(first[2])
    assert record["seq"] == "1" and record["to"] == "bob" and json.loads(record["ev"])["seq"] == 1
    assert run("accept_k", keys, accept_args(mid="999")) == first      # same bytes again
    r.set(S + "dd:alice:k1", first[1], keepttl=True, xx=True)          # what the module does after the produce
    assert run("accept_k", keys, accept_args()) == [0, first[1]]
    assert not r.exists(S + "in")


# --- ack and read ----------------------------------------------------------

def inbox_add(r, cursor, ev):
    r.zadd(U + "inbox", {json.dumps(ev): cursor})
    r.set(U + "cur", max(int(r.get(U + "cur") or 0), cursor))


def test_ack_moves_forward_caps_emits_receipts_and_trims(r, run):
    inbox_add(r, 1, {"type": "msg", "conv": "d:alice:bob", "seq": 4, "from": "bob"})
    inbox_add(r, 2, {"type": "msg", "conv": "d:alice:bob", "seq": 5, "from": "bob"})
    inbox_add(r, 3, {"type": "msg", "conv": "d:alice:bob", "seq": 6, "from": "alice"})   # own: no receipt
    inbox_add(r, 4, {"type": "receipt", "conv": "d:alice:carol", "seq": 2})
    keys = [U + "acked", U + "inbox", U + "dlv", U + "cur"]
    r.hset(U + "acked", mapping={"phone": 0, "laptop": 0})
    assert run("ack", keys, ["phone", 99, "alice"]) == ["d:alice:bob", "5", "0"]
    assert r.hget(U + "acked", "phone") == "4"                        # capped at cur
    assert run("ack", keys, ["phone", 2, "alice"]) == []               # backwards: nothing
    assert r.zcard(U + "inbox") == 4                                   # laptop has not acked
    assert run("ack", keys, ["laptop", 3, "alice"]) == []              # dlv already 5
    assert r.zcard(U + "inbox") == 1                                   # min over devices: 3
    inbox_add(r, 5, {"type": "msg", "conv": "d:alice:bob", "seq": 7, "from": "bob"})
    assert run("ack", keys, ["laptop", 5, "alice"]) == ["d:alice:bob", "7", "5"]


def test_read_only_forward_and_never_past_the_conversation(r, run):
    keys = [U + "read"]
    assert run("read", keys, ["d:alice:bob", 3, 0]) == [-1, 0]          # nothing sent yet
    assert run("read", keys, ["d:alice:bob", 1000000, 5]) == [0, 5]
    assert r.hget(U + "read", "d:alice:bob") == "5"
    assert run("read", keys, ["d:alice:bob", 4, 9]) == [-1, 4]          # backwards: nothing
    assert run("read", keys, ["d:alice:bob", 2 ** 53 - 1, 9]) == [5, 9]
    assert run("read", keys, ["g:ops", 50, 12]) == [0, 12]
    assert r.hget(U + "read", "g:ops") == "12"


def test_every_script_has_tests_here():
    here = os.path.dirname(os.path.abspath(__file__))
    text = "".join(open(os.path.join(here, f)).read() for f in os.listdir(here) if f.startswith("test_"))
    untested = [n for n in SCRIPTS if not re.search(r'run\("%s"' % n, text)
                and not re.search(r"\b%s\(run" % {"register": "reg", "accept": "accept_args"}.get(n, "$^"), text)]
    assert untested == [], untested
