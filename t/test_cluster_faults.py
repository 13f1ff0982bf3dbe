"""Issue 12, the done-when's fault run: on the cluster stack with
--replicas 1 (chat_redis_replicas 1, redis_replicas = 1; two nginx nodes,
two fan-out workers), while 2,000 one-to-one messages flow from senders on
both nodes: kill -9 of one Redis master (its replica takes over; the node
comes back as a replica), then `redis-cli --cluster reshard` of a slot range
holding users of the run, then kill -9 of nginx node 2 (its senders
reconnect to node 1) and of fan-out worker 2 (Kafka: the group rebalances;
Redis queue: its shard leases expire and worker 1 takes them). Every
acknowledged message reaches its recipient exactly once (a replay from
cursor 0 after the run) and MongoDB holds each exactly once. Senders retry
`unavailable` with the same client_id (PROTOCOL section 8).

combined_run() is also what bench/failover_loss.py --combined measures on
a --replicas 0 stack (docs/SCALING.md). Runs on the durable_cluster_stack
fixture (t/conftest.py), once per queue."""
import os
import subprocess
import time
import urllib.request

import pymongo
import pytest

from chatlib import ROOT
from helpers import BULK, RetrySender, conv_of, eventually, shard, uniq, ws
from test_cluster import cluster_nodes, owner_of, received, slot_of
from test_cluster_nodes import on_node
from wsclient import Closed, HandshakeError


def stack_cmd(stack, *args, timeout=300):
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                       env=stack.proc_env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def status_of(node):
    try:
        return urllib.request.urlopen(node.env["CHAT_STATUS_URL"], timeout=5).read().decode()
    except OSError as e:
        return f"(no status: {e})"


def connect(nodes, user, device, state, timeout=120, **kw):
    """A session on the first node of `nodes` that takes one (state["node"]
    is where to start: a node found dead is skipped for good). 503 while a
    failover settles: again. Fails with /chat/status of the node after
    `timeout` (the known defect of SCALING.md would show here)."""
    deadline = time.time() + timeout
    last = None
    while True:
        node = nodes[state["node"]]
        try:
            return ws(node, user, device, **kw)
        except HandshakeError as e:
            last = e
            assert "503" in str(e), e
        except (OSError, Closed) as e:          # the node is gone: the next one
            last = e
            state["node"] = min(state["node"] + 1, len(nodes) - 1)
        if time.time() > deadline:
            raise AssertionError(f"no session for {user} in {timeout} s on node {state['node'] + 1}: {last}\n"
                                 + status_of(nodes[state["node"]]))
        time.sleep(0.2)


def Sender(nodes, a, b, n, gap):
    """n messages from a to b, one at a time, `gap` s apart, through nodes
    (its own first): `unavailable` or a lost connection means the same
    client_id again, on the next node if its node died
    (helpers.RetrySender)."""
    state = {"node": 0}

    def conn():
        return connect(nodes, a, "s", state, path=BULK)
    return RetrySender(conn, b, n, gap=gap, reconnect=conn, cid=lambda i: f"{a}-{i}", deadline=180)


def masters(stack):
    return {nid: n for nid, n in cluster_nodes(stack).items() if n["master"]}


def cluster_settled(stack):
    """redis-cli --cluster check passes (every slot covered, the nodes
    agree, nothing migrating): reshard refuses to start otherwise"""
    port = next(n["port"] for n in masters(stack).values())
    r = subprocess.run(["redis-cli", "--cluster", "check", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and "[ERR]" not in r.stdout and "[WARNING]" not in r.stdout


def plan(stack, n_pairs, n_moved):
    """The slots the reshard will move (redis-cli takes a source's lowest
    slots first) and n_pairs pairs, half of them with a user whose keys are
    in those slots, so the reshard moves keys the run uses."""
    ms = masters(stack)
    src_id = sorted(ms, key=lambda i: ms[i]["port"])[0]
    src_slots = sorted(s for a, b in ms[src_id]["slots"] for s in range(a, b + 1))
    moving = set(src_slots[:n_moved])
    prs = []
    while len(prs) < n_pairs:
        a, b = uniq("fa"), uniq("fb")
        hit = slot_of(f"chat:{{u:{a}}}:x") in moving or slot_of(f"chat:{{u:{b}}}:x") in moving
        if hit or len(prs) >= n_pairs // 2:
            prs.append((a, b, conv_of(a, b)))
    return prs, moving


def combined_run(stack, n_pairs=8, per_pair=250, gap=0.2, n_moved=300, mongo_timeout=300, log=print):
    """The fault run; returns what was acknowledged, replayed and stored,
    and when each fault came (acknowledged messages at that point)."""
    n1, n2 = stack, on_node(stack, 2)
    prs, moving = plan(stack, n_pairs, n_moved)
    senders = [Sender([n1, n2] if i % 2 == 0 else [n2, n1], a, b, per_pair, gap)
               for i, (a, b, _) in enumerate(prs)]
    for s in senders:
        s.t.start()
    total = n_pairs * per_pair
    acked = lambda: sum(len(s.acks) for s in senders)    # noqa: E731
    faults = {}
    t0 = time.time()

    def at(frac, what):
        deadline = time.time() + 300
        while acked() < frac * total:
            assert time.time() < deadline, f"senders too slow before {what}"
            assert all(s.t.is_alive() or len(s.acks) == per_pair for s in senders), [s.error for s in senders]
            time.sleep(0.05)
        faults[what] = {"acked": acked(), "t": round(time.time() - t0, 1)}
        log(f"{what}: {faults[what]}")

    # 1. a master, the one holding the conversation shard of the first pair
    at(0.10, "master killed")
    slot = slot_of(f"chat:{{s{shard(prs[0][2])}}}:in")
    victim = owner_of(stack, slot)[1]
    stack_cmd(stack, "kill", f"redis-{victim}", timeout=60)

    def taken_over():
        try:
            return owner_of(stack, slot)[1] != victim
        except AssertionError:
            return False
    eventually(taken_over, timeout=60, interval=0.2, what="the replica took over")
    faults["master killed"]["promoted_after"] = round(time.time() - t0 - faults["master killed"]["t"], 1)
    stack_cmd(stack, "up")                      # the node back, as a replica
    eventually(lambda: cluster_settled(stack), timeout=120, interval=1, what="the cluster settled")

    # 2. a slot range moved under load, the way operators do
    at(0.25, "reshard")
    ms = masters(stack)
    src = next(i for i, n in ms.items() if any(a <= min(moving) <= b for a, b in n["slots"]))
    dst = next(i for i in sorted(ms, key=lambda i: ms[i]["port"]) if i != src)
    r = subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{ms[src]['port']}",
                        "--cluster-from", src, "--cluster-to", dst, "--cluster-slots", str(len(moving)),
                        "--cluster-yes"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    moved = sum(1 for s in moving if owner_of(stack, s)[0] == dst)
    faults["reshard"]["moved_slots"] = moved
    faults["reshard"]["took"] = round(time.time() - t0 - faults["reshard"]["t"], 1)
    assert moved == len(moving), (moved, len(moving))

    # 3. nginx node 2, then 4. fan-out worker 2
    at(0.40, "nginx2 killed")
    stack_cmd(stack, "kill", "nginx2", timeout=60)
    at(0.50, "worker-fanout2 killed")
    stack_cmd(stack, "kill", "worker-fanout2", timeout=60)
    for s in senders:
        s.t.join(900)
        assert not s.t.is_alive(), "sender stuck"
        if s.error:
            raise s.error
    log(f"all sent after {time.time() - t0:.1f} s")

    out = {"faults": faults, "retries": sum(s.retries for s in senders),
           "reconnects": sum(s.reconnects for s in senders), "pairs": []}
    for (a, b, conv), s in zip(prs, senders):
        ids = {m["id"]: m for m in s.acks.values()}
        c = connect([n1], b, "after", {"node": 0}, cursor=0)
        got = received(c, len(ids), timeout=180)
        c.close()
        out["pairs"].append({"conv": conv, "acked": ids, "got": [m["id"] for m in got],
                             "got_seqs": [m["seq"] for m in got]})
    db = pymongo.MongoClient(stack.env["MONGO_URI"], serverSelectionTimeoutMS=5000).get_default_database()
    want = [i for p in out["pairs"] for i in p["acked"]]
    try:
        eventually(lambda: db.messages.count_documents({"_id": {"$in": want}}) == len(want),
                   timeout=mongo_timeout, interval=1.0, what="every acked message in MongoDB")
    except AssertionError:
        pass                # counted below
    for p in out["pairs"]:
        docs = list(db.messages.find({"conv": p["conv"]}, {"_id": 1, "seq": 1}))
        p["stored"] = [d["_id"] for d in docs]
        p["stored_seqs"] = [d["seq"] for d in docs]
    return out


@pytest.mark.heavy
def test_master_kill_reshard_node_and_fanout_kill_lose_nothing_acknowledged(durable_cluster_stack):
    from test_cluster_durability import tally
    stack = durable_cluster_stack
    try:
        out = combined_run(stack)
    finally:
        stack_cmd(stack, "up")                  # nginx2 and worker-fanout2 back for what follows
    t = tally(out)
    print("combined fault run, chat_redis_replicas 1:", t, out["faults"],
          "unavailable retried:", out["retries"], "reconnects:", out["reconnects"])
    assert t["acked"] == 2000
    # every fault came while messages flowed
    assert all(f["acked"] < 2000 for f in out["faults"].values()), out["faults"]
    assert t["lost_delivery"] == 0 and t["dup_delivery"] == 0, t
    assert t["lost_store"] == 0 and t["dup_seq_store"] == 0, t
    for p in out["pairs"]:
        assert sorted(m["seq"] for m in p["acked"].values()) == list(range(1, 251))
        assert p["got_seqs"] == list(range(1, 251))           # replayed once each, in order
        assert sorted(p["stored"]) == sorted(p["acked"])
