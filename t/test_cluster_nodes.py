"""Issue 12, item 5: several nginx nodes and fan-out workers on the cluster
topology (scripts/stack up --cluster: two nginx nodes with chat_node_id 0
and 1, two fan-out workers sharing the shards, a 6-node Redis Cluster).
A user with a device on each node, a sender on one node and the recipient
on the other, one nginx node killed with kill -9 while messages flow (its
clients reconnect to the other and resume from their cursor), one fan-out
worker killed while messages flow. Every test runs on the cluster_stack
fixture (t/conftest.py), once per queue."""
import copy
import os
import re
import subprocess
import threading
import time

from redis.cluster import ClusterNode, RedisCluster

from chatlib import ROOT
from helpers import BULK, RetrySender, ack_of, conv_of, eventually, get, redis_only, send, shard, uniq, ws
from wsclient import Closed, HandshakeError


def on_node(stack, i):
    """The stack as a client of nginx node i sees it (WebSocket, HTTP and
    status URLs of that node; the same secret, Redis and queue)."""
    if i == 1:
        return stack
    v = copy.copy(stack)
    v.env = dict(stack.env)
    m = re.match(r"ws://([^:/]+):(\d+)(/.*)", stack.env[f"CHAT_WS_URL_{i}"])
    v.host, v.port, v.ws_path = m.group(1), int(m.group(2)), m.group(3)
    v.http = stack.env[f"CHAT_HTTP_URL_{i}"]
    v.env["CHAT_STATUS_URL"] = stack.env[f"CHAT_STATUS_URL_{i}"]
    return v


def stack_run(stack, *args, check=True):
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                       env=stack.proc_env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def cluster_client(stack):
    nodes = []
    for u in stack.env["REDIS_SEEDS"].split(","):
        host, port = u.split("//", 1)[1].rsplit(":", 1)
        nodes.append(ClusterNode(host, int(port)))
    return RedisCluster(startup_nodes=nodes, decode_responses=True)


def node_of_id(mid):
    """chat_node_id of the generator of a message id (docs/PROTOCOL.md: bits
    21..12 are the generator, its top 5 bits the node)."""
    return ((int(mid) >> 12) & 0x3ff) >> 5


def received(c, want, timeout=60, tail=1.0):
    """msg frames on c until want distinct ids came, and `tail` seconds
    more (a duplicate would come right behind); every frame, duplicates
    included."""
    got, deadline = [], time.time() + timeout
    while len({m["id"] for m in got}) < want and time.time() < deadline:
        try:
            m = c.recv(max(0.1, deadline - time.time()))
        except TimeoutError:
            break
        if m["type"] == "msg":
            got.append(m)
    end = time.time() + tail
    while time.time() < end:
        try:
            m = c.recv(0.2)
        except TimeoutError:
            continue
        if m["type"] == "msg":
            got.append(m)
    return got


def Sender(nodes, a, b, n, gap=0.01):
    """n messages from a to b through the nodes in order: when its node
    goes away it connects to the next and resends the unacknowledged
    message with its client_id (helpers.RetrySender)."""
    state = {"node": 0}

    def conn():
        deadline = time.time() + 60
        while True:
            try:
                return ws(nodes[state["node"]], a, "s", path=BULK)
            except (OSError, HandshakeError, Closed):
                assert time.time() < deadline, "no node to send to for 60 s"
                state["node"] = min(state["node"] + 1, len(nodes) - 1)
                time.sleep(0.2)

    def next_node():
        state["node"] = min(state["node"] + 1, len(nodes) - 1)
        return conn()
    return RetrySender(conn, b, n, gap=gap, reconnect=next_node, deadline=240, pause=0.2)


class Reader(threading.Thread):
    """Every msg frame a connection gets until it is closed or lost."""

    def __init__(self, c):
        super().__init__(daemon=True)
        self.c, self.got, self.lost = c, [], threading.Event()

    def run(self):
        try:
            while True:
                try:
                    m = self.c.recv(1)
                except TimeoutError:
                    continue
                if m["type"] == "msg":
                    self.got.append(m)
        except Exception:
            self.lost.set()


def test_status_shows_two_nodes_and_two_fanout_workers(cluster_stack):
    stack = cluster_stack
    assert stack.env["CHAT_NODES"] == "2"
    r = stack_run(stack, "status")
    out = r.stdout
    assert "topology         2 nginx node(s), 2 fan-out worker(s)" in out, out
    assert re.search(r"node nginx +chat_node_id 0 .* [1-9]\d* redis-connected workers", out), out
    assert re.search(r"node nginx2 +chat_node_id 1 .* [1-9]\d* redis-connected workers", out), out
    assert re.search(r"fanout worker-fanout +fanout_index 0 +running", out), out
    assert re.search(r"fanout worker-fanout2 +fanout_index 1 +running", out), out
    assert out.count("  master  ") == 3
    # the fan-out workers split the shards (Redis) or share the group (Kafka)
    conf = open(stack.env["CHAT_WORKER_CONF"]).read()
    assert "fanout_workers = 2" in conf


def test_message_ids_name_the_node_that_made_them(cluster_stack):
    n1, n2 = cluster_stack, on_node(cluster_stack, 2)
    a, b = uniq("a"), uniq("b")
    c1, c2 = ws(n1, a, "one"), ws(n2, a, "two")
    ids1 = [ack_of(c1, send(c1, b, f"x{i}"))["id"] for i in range(5)]
    ids2 = [ack_of(c2, send(c2, b, f"y{i}"))["id"] for i in range(5)]
    assert {node_of_id(i) for i in ids1} == {0} and {node_of_id(i) for i in ids2} == {1}
    assert len(set(ids1 + ids2)) == 10
    c1.close()
    c2.close()


def test_a_user_on_both_nodes_gets_everything_once_with_receipts_and_presence(cluster_stack):
    n1, n2 = cluster_stack, on_node(cluster_stack, 2)
    a, b = uniq("a"), uniq("b")
    conv = conv_of(a, b)
    # watchers of a on each node
    w1, w2 = ws(n1, uniq("w")), ws(n2, uniq("w"))
    for w in (w1, w2):
        w.send_json({"type": "watch", "users": [a]})
        assert w.recv_type("presence")["online"] is False
    a1 = ws(n1, a, "phone")                     # node 1
    for w in (w1, w2):
        assert w.recv_type("presence", 10)["online"] is True
    a2 = ws(n2, a, "laptop")                    # node 2, the same user
    b1 = ws(n2, b, "phone")                     # node 2
    # b (node 2) to a: each of a's devices gets every message once, in order
    acks = [ack_of(b1, send(b1, a, f"to a {i}")) for i in range(10)]
    for dev in (a1, a2):
        got = received(dev, 10)
        assert [m["id"] for m in got] == [x["id"] for x in acks]
    # a on node 1 to b on node 2: b once, a's laptop (node 2) its own copy once
    acks2 = [ack_of(a1, send(a1, b, f"to b {i}")) for i in range(5)]
    got_b, got_a2 = received(b1, 5), received(a2, 5)
    assert [m["id"] for m in got_b] == [m["id"] for m in got_a2] == [x["id"] for x in acks2]
    # b acknowledges: a "delivered" receipt on both of a's devices (one per node)
    b1.send_json({"type": "ack", "cursor": got_b[-1]["cursor"]})
    for dev in (a1, a2):
        r = dev.recv_type("receipt", 10)
        assert (r["status"], r["by"], r["seq"], r["conv"]) == ("delivered", b, 15, conv)
    # b reads: a "read" receipt on both of a's devices
    b1.send_json({"type": "read", "conv": conv, "seq": 15})
    for dev in (a1, a2):
        r = dev.recv_type("receipt", 10)
        assert (r["status"], r["by"], r["seq"]) == ("read", b, 15)
    # a reads on node 1: b gets it (node 2), a's laptop (node 2) its sync
    a1.send_json({"type": "read", "conv": conv, "seq": 10})
    r = b1.recv_type("receipt", 10)
    assert (r["status"], r["by"], r["seq"]) == ("read", a, 10)
    r = a2.recv_type("receipt", 10)
    assert (r["status"], r["by"], r["seq"]) == ("read", a, 10)
    # presence: a's node-1 session closes, its node-2 session remains: still
    # online on both nodes, and no "offline" is published ...
    a1.close()
    rc = cluster_client(n1)
    eventually(lambda: not any("|phone|" in m for m in rc.zrange(f"chat:{{u:{a}}}:conns", 0, -1)),
               what="a's node-1 session out of the registry")
    assert any("|laptop|" in m for m in rc.zrange(f"chat:{{u:{a}}}:conns", 0, -1))
    rc.close()
    for node in (n1, n2):
        st, _, body = get(node, uniq("q"), f"/presence?user={a}")
        assert st == 200 and body["online"] is True, body
    # ... until the last session (node 2) closes: the first presence event
    # each watcher sees after a1's close is that one (its last_seen is
    # after t_last, so it is not one a1's close would have sent)
    t_last = int(time.time() * 1000)
    a2.close()
    for w in (w1, w2):
        p = w.recv_type("presence", 10)
        assert p["online"] is False and p["last_seen"] >= t_last, p
    for c in (b1, w1, w2):
        c.close()


def test_an_nginx_node_killed_while_messages_flow(cluster_stack):
    """kill -9 of node 2 (master and workers) under a sender and a recipient
    device on it: both reconnect to node 1; the sender resends what was not
    acknowledged (same client_id), the recipient resumes from its cursor:
    every accept once in seq order, every message once on each device."""
    n1, n2 = cluster_stack, on_node(cluster_stack, 2)
    a, b = uniq("a"), uniq("b")
    b_laptop = ws(n1, b, "laptop")              # a control device on node 1
    b_phone = ws(n2, b, "phone")                # the device on the node that dies
    laptop, phone = Reader(b_laptop), Reader(b_phone)
    laptop.start()
    phone.start()
    s = Sender([n2, n1], a, b, 300, gap=0.01)
    s.start()
    eventually(lambda: len(s.acks) >= 60, timeout=60, what="60 messages acknowledged before the kill")
    stack_run(n1, "kill", "nginx2")
    assert phone.lost.wait(15), "the phone's connection outlived its node"
    # the phone resumes on node 1 from the highest cursor it processed
    before = list(phone.got)
    cursor = max((m["cursor"] for m in before), default=0)
    b_phone2 = ws(n1, b, "phone", cursor=cursor)
    s.join()
    n = len(s.acks)
    assert n == 300 and s.reconnects >= 1
    seqs = sorted(x["seq"] for x in s.acks.values())
    assert seqs == list(range(1, n + 1)), "an accept was lost or doubled"
    acked = {x["id"] for x in s.acks.values()}
    after = received(b_phone2, n - len({m["id"] for m in before}), timeout=90)
    phone_ids = [m["id"] for m in before + after]
    assert len(phone_ids) == len(set(phone_ids)), "a message came twice to the phone"
    assert set(phone_ids) == acked, (len(acked - set(phone_ids)), len(set(phone_ids) - acked))
    eventually(lambda: len({m["id"] for m in laptop.got}) >= n, timeout=60, what="the laptop got all")
    time.sleep(1.0)
    laptop_ids = [m["id"] for m in laptop.got]
    assert len(laptop_ids) == len(set(laptop_ids)) and set(laptop_ids) == acked
    print(f"nginx2 killed after {len(before)} messages on the phone; the sender reconnected "
          f"{s.reconnects}x; {len(after)} resumed on node 1")
    b_laptop.close()
    b_phone2.close()
    # `up` starts the node again, and it serves
    stack_run(n1, "up")
    c = ws(n2, b, "tablet")
    assert c.hello["type"] == "hello"
    c.close()
    assert "nginx2 " in stack_run(n1, "status").stdout


def kafka_assignment(stack):
    """partition of chat.in -> client id of the chat-fanout member holding it"""
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BROKERS"]})
    g = admin.describe_consumer_groups(["chat-fanout"])["chat-fanout"].result(30)
    return {tp.partition: m.client_id for m in g.members
            for tp in m.assignment.topic_partitions if tp.topic == "chat.in"}


def lease_holders(rc, shards=16):
    """shard -> the consumer name (fanout-<index>) of the fan-out worker
    holding its lease (Redis queue; docs/PIPELINE.md chat:{s<s>}:lease)"""
    out = {}
    for s in range(shards):
        v = rc.get(f"chat:{{s{s}}}:lease")
        if v:
            out[s] = v.split(":", 1)[0]
    return out


def balanced(stack):
    """Redis queue: wait until both fan-out workers hold their share (8 of
    the 16 shard leases each); returns the holders."""
    rc = cluster_client(stack)
    held = {}

    def ok():
        held.clear()
        held.update(lease_holders(rc))
        return len(held) == 16 and sorted(held.values()).count("fanout-1") == 8
    eventually(ok, timeout=90, interval=0.5, what="the shard leases split 8/8 between the fan-out workers")
    rc.close()
    return dict(held)


def pairs_on_fanout(stack, index, k):
    """k (sender, recipient) pairs whose conversation shard (Kafka: the
    partition) belongs to fan-out worker `index`: Redis queue, the shards
    whose lease it holds; Kafka, what the group assigned to client id
    fanout-<index>."""
    if stack.env["CHAT_QUEUE"] == "kafka":
        assignment = {}

        def both_members():
            assignment.clear()
            assignment.update(kafka_assignment(stack))
            return len(assignment) == 16 and {"fanout-0", "fanout-1"} <= set(assignment.values())
        eventually(both_members, timeout=90, interval=1, what="both fan-out workers in the Kafka group")
        mine = {p for p, cid in assignment.items() if cid == f"fanout-{index}"}
    else:
        mine = {s for s, who in balanced(stack).items() if who == f"fanout-{index}"}
    out = []
    while len(out) < k:
        a, b = uniq("a"), uniq("b")
        if shard(conv_of(a, b)) in mine:
            out.append((a, b))
    return out


def test_a_fanout_worker_killed_while_messages_flow(cluster_stack):
    """kill -9 of worker-fanout2 while messages flow; it stays dead until
    every message was delivered. Kafka: the group rebalances and
    worker-fanout takes its partitions over (from their last committed
    offsets). Redis Streams: its shard leases expire (fanout_lease_ms) and
    worker-fanout takes them, with what worker-fanout2 had pending
    (workers/lease.c). Every conversation here is on a shard (partition)
    worker-fanout2 served. Every acknowledged message reaches its
    recipient once and in order (a re-processed entry may be published
    again, with the same cursor), the inbox holds it exactly once; then
    worker-fanout2 starts again and gets its share back."""
    stack = cluster_stack
    kafka = stack.env["CHAT_QUEUE"] == "kafka"
    pairs = pairs_on_fanout(stack, 1, 6)
    mine = {shard(conv_of(a, b)) for a, b in pairs}
    readers = {}
    for _, b in pairs:
        readers[b] = Reader(ws(stack, b, "phone"))
        readers[b].start()
    senders = [Sender([stack], a, b, 60, gap=0.03) for a, b in pairs]
    for s in senders:
        s.start()
    eventually(lambda: sum(len(s.acks) for s in senders) >= 60, timeout=60, what="60 acks before the kill")
    t_kill = time.time()                        # counted from the kill command, to be safe
    stack_run(stack, "kill", "worker-fanout2")
    took_leases = None
    if not kafka:
        # the survivor takes the dead worker's leases once they expire
        rc = cluster_client(stack)
        eventually(lambda: set(lease_holders(rc).values()) == {"fanout-0"} and len(lease_holders(rc)) == 16,
                   timeout=60, interval=0.1, what="worker-fanout holding every shard lease")
        took_leases = time.time() - t_kill
        rc.close()
    for s in senders:
        s.join()
    total = sum(len(s.acks) for s in senders)
    assert total == 60 * len(pairs)

    def all_there():
        return all({x["id"] for x in s.acks.values()} <= {m["id"] for m in readers[s.b].got} for s in senders)
    eventually(all_there, timeout=120, what="every acknowledged message delivered")
    took = time.time() - t_kill
    time.sleep(1.0)
    rc = cluster_client(stack)
    dups = 0
    for s in senders:
        got = readers[s.b].got
        first = {}
        for m in got:
            # a re-processed entry is the same event again (the same cursor,
            # PROTOCOL rule 3), never a second copy with a cursor of its own
            assert first.setdefault(m["id"], m["cursor"]) == m["cursor"], m
        dups += len(got) - len(first)
        assert set(first) == {x["id"] for x in s.acks.values()}
        # in order: each message's first arrival in seq order
        assert [m["seq"] for m in got if first.pop(m["id"], None) is not None] == list(range(1, 61))
        # the inbox holds each message once
        assert rc.zcard(f"chat:{{u:{s.b}}}:inbox") == 60
        # and a device replaying from 0 gets each once
        replay = ws(stack, s.b, "replay", cursor=0)
        ids = [m["id"] for m in received(replay, 60, timeout=30, tail=0.5)]
        assert len(ids) == len(set(ids)) == 60
        replay.close()
    rc.close()
    for r in readers.values():
        r.c.close()
    status = stack_run(stack, "status", check=False).stdout
    # nothing restarted it: worker-fanout did the work alone
    assert re.search(r"fanout worker-fanout2 +fanout_index 1 +DEAD", status), status
    stack_run(stack, "up")
    extra = ""
    if not kafka:
        # the lease bound: fanout_lease_ms (5 s) for the leases and the
        # dead worker's place among the living to expire, plus one
        # renewal round (1 s); generous for a loaded machine
        assert took_leases < 5.0 + 1.0 + 6.0, took_leases
        extra = f", its 8 shards' leases (those of {len(mine)} conversations here among them) taken over {took_leases:.1f} s after the kill"
        # started again, it gets its share back (the survivor gives back its surplus)
        balanced(stack)
    print(f"fan-out worker killed: all {total} delivered {took:.1f} s after the kill{extra}, "
          f"{dups} live re-deliveries of the same event")
    assert re.search(r"fanout worker-fanout2 +fanout_index 1 +running", stack_run(stack, "status").stdout)


@redis_only
def test_a_paused_fanout_worker_loses_its_shards_and_stops_serving_them(cluster_stack):
    """Redis queue, the fencing of the shard leases: worker-fanout2 is
    stopped (SIGSTOP: a pause, a partition) longer than its lease while
    messages flow; worker-fanout takes its shards over and delivers. When
    worker-fanout2 goes on (SIGCONT) it finds its leases unsure or taken,
    reads and acknowledges nothing of them, and gets its share back by the
    normal give-back. Every message once in each inbox, in order; a live
    repeat carries the same cursor."""
    import signal
    stack = cluster_stack
    pairs = pairs_on_fanout(stack, 1, 4)
    readers = {}
    for _, b in pairs:
        readers[b] = Reader(ws(stack, b, "phone"))
        readers[b].start()
    senders = [Sender([stack], a, b, 80, gap=0.05) for a, b in pairs]
    for s in senders:
        s.start()
    eventually(lambda: sum(len(s.acks) for s in senders) >= 40, timeout=60, what="40 acks before the pause")
    pid = int(open(os.path.join(stack.dir, "pids", "worker-fanout2")).read())
    rc = cluster_client(stack)
    os.kill(pid, signal.SIGSTOP)
    t_stop = time.time()
    try:
        eventually(lambda: set(lease_holders(rc).values()) == {"fanout-0"} and len(lease_holders(rc)) == 16,
                   timeout=60, interval=0.1, what="worker-fanout holding every lease while worker-fanout2 is stopped")
        took = time.time() - t_stop
        time.sleep(1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    for s in senders:
        s.join()
    eventually(lambda: all({x["id"] for x in s.acks.values()} <= {m["id"] for m in readers[s.b].got}
                           for s in senders), timeout=120, what="every acknowledged message delivered")
    # back: it gets its share again (the survivor gives back its surplus)
    balanced(stack)
    time.sleep(1.0)
    for s in senders:
        got, first = readers[s.b].got, {}
        for m in got:
            assert first.setdefault(m["id"], m["cursor"]) == m["cursor"], m
        assert set(first) == {x["id"] for x in s.acks.values()}
        assert [m["seq"] for m in got if first.pop(m["id"], None) is not None] == list(range(1, 81))
        assert rc.zcard(f"chat:{{u:{s.b}}}:inbox") == 80
    rc.close()
    for r in readers.values():
        r.c.close()
    log = open(os.path.join(stack.dir, "logs", "worker-fanout2.log")).read() \
        if os.path.exists(os.path.join(stack.dir, "logs", "worker-fanout2.log")) else ""
    print(f"worker-fanout2 stopped: its leases taken over {took:.1f} s after the stop; "
          f"its log says lost: {log.count('held by another worker')}, unsure at ack: {log.count('not sure any more')}")
