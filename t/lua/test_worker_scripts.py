"""The workers' Redis scripts of lua/ on their own, against a bare
redis-server: the inbox append (exactly once, late seqs, size and age
bounds, the trim point), group receipts, membership changes (the rules and
the events), the rebuild from MongoDB, and the group budgets."""
import json
import time

from conftest import SCRIPTS  # noqa: F401  (the table the workers load)

U = "chat:{u:bob}:"
IK = [U + "inbox", U + "cur", U + "last", U + "conns", U + "ages", U + "acked"]
DAY = 86400000


def ev(seq, body="x", conv="d:alice:bob"):
    return json.dumps({"type": "msg", "conv": conv, "seq": seq, "body": body})


def append(run, field, seq, event, now=None, mx=100000, ret=365 * DAY, skip=""):
    now = now if now is not None else int(time.time() * 1000)
    return run("inbox", IK, [field, seq, event, now, mx, ret, skip])


def test_inbox_appends_once_and_publishes_again_with_the_same_cursor(r, run):
    now = int(time.time() * 1000)
    r.zadd(U + "conns", {"chat:w:a|phone|1": now + 60000, "chat:w:b|old|2": now - 1})
    assert append(run, "m:d:alice:bob", 1, ev(1), now) == [1, 1, "chat:w:a|phone|1"]
    assert append(run, "m:d:alice:bob", 1, ev(1), now) == [0, 1, "chat:w:a|phone|1"]   # re-consumed
    assert append(run, "m:d:alice:bob", 2, ev(2), now)[:2] == [1, 2]
    assert r.zcard(U + "inbox") == 2 and r.hget(U + "last", "m:d:alice:bob") == "2:2"
    # receipts keep their own field and only move forward
    assert append(run, "r:read:d:alice:bob:alice", 2, '{"type":"receipt","seq":2}', now)[:2] == [1, 3]
    assert append(run, "r:read:d:alice:bob:alice", 1, '{"type":"receipt","seq":1}', now)[:2] == [0, 0]


def test_a_late_seq_is_still_appended_once(r, run):
    """Kafka: seq 3 can be appended before 2; 2 is remembered and appended
    when it comes, once."""
    assert append(run, "m:d:alice:bob", 1, ev(1))[:2] == [1, 1]
    assert append(run, "m:d:alice:bob", 3, ev(3))[:2] == [1, 2]
    assert r.hget(U + "last", "h:d:alice:bob") == "2"
    assert append(run, "m:d:alice:bob", 2, ev(2))[:2] == [1, 3]
    assert r.hget(U + "last", "h:d:alice:bob") is None
    assert append(run, "m:d:alice:bob", 2, ev(2))[:2] == [0, 3]           # again: the same cursor
    r.zremrangebyscore(U + "inbox", 3, 3)                                   # acked and trimmed
    assert append(run, "m:d:alice:bob", 2, ev(2))[:2] == [0, 0]           # nothing to publish


def test_own_copy_is_appended_only_when_another_device_may_need_it(r, run):
    """The sender's copy (skip device set) costs no cursor while the user
    has no other registered device; once another device registered, it is
    appended as before. A re-consumed skipped entry stays skipped, and the
    push check still finds the newest appended cursor."""
    now = int(time.time() * 1000)
    r.zadd(U + "conns", {"chat:w:a|phone|1": now + 60000})
    assert append(run, "m:d:alice:bob", 1, ev(1), now) == [1, 1, "chat:w:a|phone|1"]   # alice's message
    assert append(run, "m:d:alice:bob", 2, ev(2), now, skip="phone") == [0, 0]          # no device known
    r.hset(U + "acked", "phone", 0)
    assert append(run, "m:d:alice:bob", 3, ev(3), now, skip="phone") == [0, 0]          # only the acting one
    assert r.hget(U + "last", "m:d:alice:bob") == "3:1:s"
    assert append(run, "m:d:alice:bob", 3, ev(3), now, skip="phone") == [0, 0]          # re-consumed
    assert r.zcard(U + "inbox") == 1 and r.get(U + "cur") == "1"
    assert 0 < r.pttl(U + "last") <= 365 * DAY
    # positive control: a second device has registered, so the copy is kept
    r.hset(U + "acked", "laptop", 0)
    assert append(run, "m:d:alice:bob", 4, ev(4), now, skip="phone") == [1, 2, "chat:w:a|phone|1"]
    assert append(run, "m:d:alice:bob", 4, ev(4), now, skip="phone")[:2] == [0, 2]
    # an HTTP send from a device that never registered: the known one needs it
    r.hdel(U + "acked", "laptop")
    assert append(run, "m:d:alice:bob", 5, ev(5), now, skip="curl")[:2] == [1, 3]
    # a peer's message after a skipped own copy: no seq remembered as missing
    r.hdel(U + "acked", "phone")
    assert append(run, "m:d:alice:bob", 6, ev(6), now, skip="phone") == [0, 0]
    assert append(run, "m:d:alice:bob", 7, ev(7), now)[:2] == [1, 4]
    assert r.hget(U + "last", "h:d:alice:bob") is None
    # receipts (the read sync copy) follow the same rule
    assert append(run, "r:read:d:alice:bob:bob", 7, '{"type":"receipt","seq":7}', now, skip="phone") == [0, 0]
    r.hset(U + "acked", mapping={"phone": 0, "tab": 0})
    assert append(run, "r:read:d:alice:bob:bob", 8, '{"type":"receipt","seq":8}', now, skip="phone")[:2] == [1, 5]
    # a user who only ever sends from one device: its last hash expires too
    r.delete(U + "last", U + "acked")
    assert append(run, "m:d:bob:carol", 1, ev(1, conv="d:bob:carol"), now, skip="phone") == [0, 0]
    assert 0 < r.pttl(U + "last") <= 365 * DAY


def test_push_check_reads_the_cursor_of_a_skipped_own_copy(r, run):
    P2 = "chat:{u:bob}:"
    keys = [P2 + "push", P2 + "set", P2 + "mute", P2 + "acked", P2 + "read", P2 + "last", P2 + "conns", P2 + "pn"]
    r.hset(P2 + "push", "phone", '{"provider":"fcm","token":"t"}')
    r.hset(P2 + "pn", "d:alice:bob", json.dumps({"seq": 1, "seqs": [1], "from": "alice", "body": "x", "ts": 1}))
    r.hset(P2 + "last", "m:d:alice:bob", "2:1:s")       # bob answered from his only device
    assert run("push_check", keys, ["phone", "d:alice:bob", 1, "0"])[0] == "send"
    r.hset(P2 + "acked", "phone", 1)
    assert run("push_check", keys, ["phone", "d:alice:bob", 1, "0"]) == ["acked"]


def test_inbox_size_bound_records_the_trim_point(r, run):
    for s in range(1, 6):
        append(run, "m:d:alice:bob", s, ev(s), mx=3)
    assert [int(c) for _, c in r.zrange(U + "inbox", 0, -1, withscores=True)] == [3, 4, 5]
    assert r.hget(U + "last", "trim") == "2"
    assert 0 < r.pttl(U + "inbox") <= 365 * DAY


def test_inbox_age_bound_drops_what_is_older_than_the_retention(r, run):
    t0 = int(time.time() * 1000)
    append(run, "m:d:alice:bob", 1, ev(1), now=t0, ret=10 * DAY)
    append(run, "m:d:alice:bob", 2, ev(2), now=t0 + 1000, ret=10 * DAY)          # same hour: no marker
    assert r.zcard(U + "ages") == 1
    append(run, "m:d:alice:bob", 3, ev(3), now=t0 + 2 * 3600000, ret=10 * DAY)   # a new marker
    assert r.zcard(U + "ages") == 2
    # eleven days later: the markers older than the retention drop what came before the newest of them
    append(run, "m:d:alice:bob", 4, ev(4), now=t0 + 11 * DAY, ret=10 * DAY)
    assert [int(c) for _, c in r.zrange(U + "inbox", 0, -1, withscores=True)] == [3, 4]
    assert r.hget(U + "last", "trim") == "2"


def test_group_receipt_raises_pointers_and_names_the_senders(r, run):
    G = "chat:{s5}:g:ops:"
    r.zadd(G + "snd", {"alice": 3, "carol": 7, "dave": 9})
    keys = [G + "dlv", G + "read", G + "snd"]
    # everyone who sent after bob's previous pointer (dave's newest is 9,
    # but an earlier message of his may be among those delivered)
    assert sorted(run("group_receipt", keys, ["bob", 8, "delivered", 2])) == ["alice", "carol", "dave"]
    assert r.hget(G + "dlv", "bob") == "8" and r.hget(G + "read", "bob") is None
    assert run("group_receipt", keys, ["bob", 9, "read", 8]) == ["dave"]   # after 8: only dave
    assert r.hget(G + "dlv", "bob") == "9" and r.hget(G + "read", "bob") == "9"
    run("group_receipt", keys, ["bob", 4, "delivered", 9])
    assert r.hget(G + "dlv", "bob") == "9"                                  # never backwards


S = "chat:{s5}:"
GK = [S + "g:ops:meta", S + "g:ops:mem", S + "seq", S + "in"]


def change(run, op, actor, add=(), rem=(), mx=4, name="ops"):
    return run("group_change", GK, [op, "ops", actor, 1700000000000, mx, 500, "redis", name,
                                    json.dumps(list(add)), json.dumps(list(rem))])


def test_group_change_rules_and_events(r, run):
    assert change(run, "get", "alice") == ["not_found"]
    out = change(run, "create", "alice", add=["bob"])
    assert out[0] == "ok"
    state = json.loads(out[1])
    assert state["owner"] == "alice" and state["members"] == ["alice", "bob"]
    assert change(run, "create", "carol") == ["exists"]
    assert change(run, "change", "bob", add=["carol"]) == ["forbidden"]        # not the owner
    assert change(run, "change", "zed", rem=["zed"]) == ["forbidden"]          # not a member
    assert change(run, "change", "alice", add=["c", "d", "e"]) == ["too_large"]   # 5 > 4
    assert r.hget(S + "seq", "g:ops") == "1"                                   # refusals take no seq
    assert change(run, "change", "alice", add=["carol"])[0] == "ok"
    assert r.hget(S + "g:ops:mem", "carol") == "2"
    assert change(run, "change", "bob", rem=["bob"])[0] == "ok"                # leaving is allowed
    assert r.hget(S + "g:ops:mem", "bob") == "1:3"
    entries = [e[1] for e in r.xrange(S + "in")]
    assert [(e["event"], e["seq"]) for e in entries] == [("created", "1"), ("added", "2"), ("removed", "3")]
    assert json.loads(entries[2]["state"])["members"] == ["alice", "carol"]
    # a change that changes nothing adds no event
    assert change(run, "change", "alice", add=["carol"])[0] == "ok" and len(r.xrange(S + "in")) == 3


def test_group_rebuild_never_goes_back_and_raises_the_seq(r, run):
    keys = [S + "g:ops:meta", S + "g:ops:mem", S + "seq"]
    args = ["g:ops", 5, "ops", "alice", 1700000000000, 9, "alice", "1", "bob", "3"]
    assert run("group_rebuild", keys, args) == 1
    assert r.hgetall(S + "g:ops:mem") == {"alice": "1", "bob": "3"} and r.hget(S + "seq", "g:ops") == "9"
    assert run("group_rebuild", keys, ["g:ops", 4, "old", "x", 1, 2, "x", "1"]) == 0
    assert r.hget(S + "g:ops:meta", "name") == "ops"


def test_group_budget_and_adds_limits(r, run):
    k = ["chat:{u:alice}:rl:groups"]
    now = 1700000000000
    assert [run("group_budget", k, [now, 60, 3]) for _ in range(3)] == [0, 0, 0]
    wait = run("group_budget", k, [now, 60, 3])
    assert 0 < wait <= 1000
    assert run("group_budget", k, [now + 1000, 60, 3]) == 0                  # one a second comes back
    a = ["chat:{u:bob}:adds"]
    assert [run("group_adds", a, [100, 4, 2, 3, "take"]) for _ in range(2)] == [0, 0]
    assert run("group_adds", a, [100, 4, 2, 3, "take"]) == 1                  # the hour is full
    assert run("group_adds", a, [100, 4, 2, 3, "give"]) == 0                  # a refused change gives back
    assert run("group_adds", a, [100, 4, 2, 3, "take"]) == 0
    assert run("group_adds", a, [101, 4, 2, 3, "take"]) == 0                  # next hour: the third of the day
    assert run("group_adds", a, [101, 4, 2, 3, "take"]) == 2                  # the day is full


# --- push ------------------------------------------------------------------

P = "chat:{u:bob}:"
PK = [P + "pn", P + "push", P + "notify", P + "read"]


def enqueue(run, seq, conv="d:alice:bob", pull="0"):
    return run("push_enqueue", PK, [conv, seq, "alice", "hi", 1700000000000 + seq, "alice", pull, 86400000])


def test_push_enqueue_needs_a_registration_and_skips_what_was_read(r, run):
    assert enqueue(run, 1) == []                                  # no device registered
    r.hset(P + "push", mapping={"phone": '{"provider":"fcm"}', "tab": '{"provider":"webpush"}'})
    assert sorted(enqueue(run, 1)) == ["phone", "tab"]
    assert sorted(enqueue(run, 2)) == ["phone", "tab"]
    pn = json.loads(r.hget(P + "pn", "d:alice:bob"))
    assert pn["seqs"] == [1, 2] and pn["seq"] == 2
    r.hset(P + "read", "d:alice:bob", 2)
    assert enqueue(run, 2) == []                                  # read already
    assert enqueue(run, 1, conv="g:big", pull="1") == []          # a pull group not opted in to
    r.hset(P + "notify", "g:big", 1)
    assert sorted(enqueue(run, 1, conv="g:big", pull="1")) == ["phone", "tab"]


def test_push_check_sends_only_what_is_still_needed(r, run):
    keys = [P + "push", P + "set", P + "mute", P + "acked", P + "read", P + "last", P + "conns", P + "pn"]
    now = 1700000100000
    check = lambda dev="phone", conn="1": run("push_check", keys, [dev, "d:alice:bob", now, conn])
    assert check() == ["noreg"]
    r.hset(P + "push", "phone", '{"provider":"fcm","token":"t"}')
    assert check() == ["read"]                                     # nothing pending
    enqueue(run, 1)
    enqueue(run, 2)
    assert check() == ["later"]                                    # not in the inbox yet
    r.hset(P + "last", "m:d:alice:bob", "2:10")
    out = check()
    assert out[0] == "send" and out[2] == 2 and out[3] == 2       # 2 unread, badge 2
    r.hset(P + "acked", "phone", 10)
    assert check() == ["acked"]
    r.hset(P + "acked", "phone", 9)
    r.hset(P + "mute", "d:alice:bob", 0)                           # forever
    assert check() == ["muted"]
    r.hdel(P + "mute", "d:alice:bob")
    r.zadd(P + "conns", {"chat:w:a|phone|1": now + 1000})
    assert check() == ["online"]
    assert check(conn="0")[0] == "send"
    r.hset(P + "read", "d:alice:bob", 2)
    assert check() == ["read"] and not r.hexists(P + "pn", "d:alice:bob")


def test_push_lease_done_and_dead(r, run):
    due = "chat:{pq3}:due"
    r.zadd(due, {"bob|phone|d:alice:bob": 100, "bob|tab|d:alice:bob": 200, "carol|x|g:ops": 900})
    assert sorted(run("push_lease", [due], [250, 5000, 10])) == ["bob|phone|d:alice:bob", "bob|tab|d:alice:bob"]
    assert r.zscore(due, "bob|phone|d:alice:bob") == 5000          # leased: back at 5000 if not done
    assert run("push_lease", [due], [250, 6000, 10]) == []         # already in someone's hands
    assert run("push_done", [due], ["bob|phone|d:alice:bob", 5000]) == 1
    assert r.zscore(due, "bob|phone|d:alice:bob") is None
    assert run("push_done", [due], ["bob|tab|d:alice:bob", 4000]) == 0   # not our lease
    assert run("push_done", [due], ["bob|tab|d:alice:bob", 5000, 7000]) == 1
    assert r.zscore(due, "bob|tab|d:alice:bob") == 7000            # rescheduled (a retry)
    r.hset(P + "push", "phone", "old")
    assert run("push_dead", [P + "push"], ["phone", "other"]) == 0   # registered again meanwhile
    assert run("push_dead", [P + "push"], ["phone", "old"]) == 1 and not r.hexists(P + "push", "phone")


def test_fanout_lease_take_renew_give_back(r, run):
    """One holder per shard: taken when free, renewed only by its holder,
    given back only by its holder, free again after its ttl."""
    k = "chat:{s3}:lease"
    assert run("fanout_lease", [k], ["w1", 5000]) == 2                 # free: taken
    assert r.get(k) == "w1" and 4000 < r.pttl(k) <= 5000
    assert run("fanout_lease", [k], ["w2", 5000]) == 0                 # held: not taken
    assert run("fanout_lease", [k], ["w2", 0]) == 0                    # nor given back by another
    assert r.get(k) == "w1"
    r.pexpire(k, 100)
    assert run("fanout_lease", [k], ["w1", 8000]) == 1                 # renewed by its holder
    assert 7000 < r.pttl(k) <= 8000
    assert run("fanout_lease", [k], ["w1", 0]) == 1                    # given back
    assert r.exists(k) == 0
    assert run("fanout_lease", [k], ["w2", 300]) == 2                  # and taken by another
    time.sleep(0.4)
    assert r.exists(k) == 0                                            # not renewed: free after its ttl
    assert run("fanout_lease", [k], ["w1", 5000]) == 2


# ---- the queue's positions (lua/queue_start.lua, lua/queue_commit.lua) -------

QS, QP = "chat:{s5}:in", "chat:{s5}:pos:fanout"


def test_queue_start_makes_a_position_once(r, run):
    """A role without a position starts before the first entry ("0") or
    after the last one ("$"); a position once there is returned as it is."""
    assert run("queue_start", [QS, QP], ["fanout", "0"]) == "0-0"           # no stream yet
    r.delete(QP)
    a = r.xadd(QS, {"k": "1"})
    b = r.xadd(QS, {"k": "2"})
    assert run("queue_start", [QS, QP], ["fanout", "0"]) == "0-0" and r.get(QP) == "0-0"
    assert run("queue_start", [QS, "chat:{s5}:pos:push"], ["push", "$"]) == b
    r.set(QP, a)
    assert run("queue_start", [QS, QP], ["fanout", "0"]) == a               # kept
    r.xadd(QS, {"k": "3"})
    assert run("queue_start", [QS, "chat:{s5}:pos:push"], ["push", "$"]) == b   # kept too


def test_queue_start_takes_over_an_earlier_versions_consumer_group(r, run):
    """Upgrading from consumer groups: the position is the entry before the
    group's smallest pending one (read again), else its last delivered one;
    the group is destroyed, other groups are left alone."""
    ids = [r.xadd(QS, {"k": str(i)}) for i in range(5)]
    r.xgroup_create(QS, "fanout", "0")
    r.xgroup_create(QS, "persist", "0")
    r.xreadgroup("fanout", "fanout-0", {QS: ">"}, count=3)                 # 0, 1, 2 read
    r.xack(QS, "fanout", ids[0])                                           # 1 and 2 pending
    assert run("queue_start", [QS, QP], ["fanout", "0"]) == ids[0]
    assert [g["name"] for g in r.xinfo_groups(QS)] == ["persist"]
    r.xreadgroup("persist", "persist-0", {QS: ">"}, count=2)
    r.xack(QS, "persist", ids[0], ids[1])                                  # nothing pending
    assert run("queue_start", [QS, "chat:{s5}:pos:persist"], ["persist", "0"]) == ids[1]
    assert r.xinfo_groups(QS) == []
    # a pending entry that is the stream's first: before it is "0-0"
    r.xgroup_create(QS, "push", "0")
    r.xreadgroup("push", "push-0", {QS: ">"}, count=1)
    assert run("queue_start", [QS, "chat:{s5}:pos:push"], ["push", "$"]) == "0-0"


def test_queue_commit_is_fenced_by_the_lease_and_only_moves_forward(r, run):
    L = "chat:{s5}:lease"
    r.set(L, "w1")
    assert run("queue_commit", [QP, L], ["17-3", "w2"]) == 0               # not the holder
    assert r.get(QP) is None
    assert run("queue_commit", [QP, L], ["17-3", "w1"]) == 1 and r.get(QP) == "17-3"
    assert run("queue_commit", [QP, L], ["17-2", "w1"]) == 1 and r.get(QP) == "17-3"   # not back
    assert run("queue_commit", [QP, L], ["9-9", "w1"]) == 1 and r.get(QP) == "17-3"
    assert run("queue_commit", [QP, L], ["17-10", "w1"]) == 1 and r.get(QP) == "17-10"  # 10 > 3 as integers
    assert run("queue_commit", [QP, L], ["100-0", "w1"]) == 1 and r.get(QP) == "100-0"
    r.delete(L)
    assert run("queue_commit", [QP, L], ["200-0", "w1"]) == 0              # the lease expired
    assert r.get(QP) == "100-0"


def test_fanout_live_counts_workers_until_their_ttl(r, run):
    k = "chat:{fanout}:live"
    assert run("fanout_live", [k], ["w1", 5000]) == 1
    assert run("fanout_live", [k], ["w2", 300]) == 2
    assert run("fanout_live", [k], ["w1", 5000]) == 2                  # renewing does not count twice
    assert r.pttl(k) > 0                                               # the set itself expires too
    time.sleep(0.4)
    assert run("fanout_live", [k], ["w1", 5000]) == 1                  # w2 stopped renewing
    assert run("fanout_live", [k], ["w3", 5000]) == 2
    assert run("fanout_live", [k], ["w3", 0]) == 1                     # a clean stop: gone at once
    assert r.zrange(k, 0, -1) == ["w1"]


# ---- deletions (lua/tombstone.lua) -------------------------------------------

def test_tombstone_replaces_the_copies_at_their_cursor_and_only_them(r, run):
    """A deleted message's inbox copies become the tombstone at the same
    cursor (own-copy prefix kept), other events stay, the deletion event is
    never rewritten, and a second run changes nothing."""
    now = int(time.time() * 1000)
    m1 = json.dumps({"type": "msg", "id": "m1", "conv": "d:alice:bob", "seq": 1, "body": "secret", "ts": now},
                    separators=(",", ":"))
    m2 = json.dumps({"type": "msg", "id": "m2", "conv": "d:alice:bob", "seq": 2, "body": 'say "id":"m1"',
                     "ts": now}, separators=(",", ":"))
    own = '{"!":"phone",' + m1[1:]
    r.zadd(U + "inbox", {m1: 1, m2: 2, own: 3})
    dele = '{"type":"deleted","for":"everyone","id":"m1","conv":"d:alice:bob","seq":1,"by":"alice","ts":%d}' % now
    assert run("tombstone", [U + "inbox"], ["m1", dele, now, 60000]) == 2
    got = r.zrange(U + "inbox", 0, -1, withscores=True)
    tomb = '{"type":"msg","deleted":true,"for":"everyone","id":"m1","conv":"d:alice:bob","seq":1,"by":"alice","ts":%d}' % now
    assert got == [(tomb, 1.0), (m2, 2.0), ('{"!":"phone",' + tomb[1:], 3.0)]
    assert "secret" not in json.dumps(got)
    # the deletion event appended after it is left alone; a rerun is a no-op
    r.zadd(U + "inbox", {dele: 4})
    assert run("tombstone", [U + "inbox"], ["m1", dele, now, 60000]) == 2
    assert r.zrange(U + "inbox", 0, -1, withscores=True) == got + [(dele, 4.0)]
    # positive control of the scan bound: a copy older than ts - slack is not looked at
    r.delete(U + "inbox")
    old = m1.replace('"ts":%d' % now, '"ts":%d' % (now - 120000))
    r.zadd(U + "inbox", {old: 1, m2.replace('"ts":%d' % now, '"ts":%d' % (now - 100000)): 2})
    assert run("tombstone", [U + "inbox"], ["m1", dele, now, 60000]) == 0
    assert run("tombstone", [U + "inbox"], ["m1", dele, now, 600000]) == 1


def test_expire_removes_the_ids_copies_from_the_oldest_on(r, run):
    """The expired messages' copies (own copy, tombstone) go; other events
    stay at their cursors; the scan stops past the newest ts + slack."""
    now = int(time.time() * 1000)

    def m(mid, ts, pre=""):
        return (pre or "{") + '"type":"msg","id":"%s","conv":"d:alice:bob","seq":1,"body":"b","ts":%d}' % (mid, ts)
    r.zadd(U + "inbox", {m("e1", now - 5000): 1, m("k1", now - 4000): 2, m("e1", now - 5000, '{"!":"phone",'): 3,
                         m("e2", now - 3000): 4, m("k2", now): 5, m("e3", now + 10 ** 6): 6})
    assert run("expire", [U + "inbox"], [now - 3000, 1000, "e1", "e2", "e3"]) == 3
    left = r.zrange(U + "inbox", 0, -1, withscores=True)
    assert [(json.loads(x)["id"], s) for x, s in left] == [("k1", 2.0), ("k2", 5.0), ("e3", 6.0)]
    # past the bound nothing is looked at: e3 (newer than ts + slack) stays until its time
    assert run("expire", [U + "inbox"], [now + 10 ** 6, 0, "e3"]) == 1
    assert run("expire", [U + "inbox"], [now, 0, "k1", "k2"]) == 2 and r.zcard(U + "inbox") == 0
