"""Issue 12 item 4: durability across a Redis failover. On the cluster
stack with --replicas 1 (nginx: chat_redis_replicas 1, the workers:
redis_replicas = 1) an accept is acknowledged only once WAIT confirmed it
on its master's replica, so killing that master with kill -9 while
messages flow loses no acknowledged message: each reaches its recipient
exactly once and MongoDB holds each exactly once.

What the same run loses without it (--replicas 0) is a measurement, not a
test (nothing is guaranteed there): bench/failover_loss.py runs
failover_run() below against a stack of either kind (docs/SCALING.md).
Every test here runs on the durable_cluster_stack fixture (t/conftest.py)."""
import os
import re
import subprocess
import time

import pymongo
import pytest

from chatlib import ROOT
from helpers import BULK, RetrySender, conv_of, eventually, shard, uniq
from test_cluster import owner_of, received, slot_of, status_metric, ws_retry


def Sender(stack, a, b, n):
    """n messages from a to b, one at a time; an `unavailable` answer, or
    the connection lost, means: again with the same client_id
    (helpers.RetrySender)."""
    def conn():
        return ws_retry(stack, a, "s", path=BULK)
    return RetrySender(conn, b, n, reconnect=conn, cid=lambda i: f"{a}-{i}", deadline=90)


def nginx_workers(stack):
    """pids of the nginx worker processes that take new connections"""
    master = open(os.path.join(stack.env["CHAT_NGINX_PREFIX"], "logs", "nginx.pid")).read().strip() \
        if os.path.exists(os.path.join(stack.env["CHAT_NGINX_PREFIX"], "logs", "nginx.pid")) \
        else open(os.path.join(stack.env["CHAT_NGINX_PREFIX"], "nginx.pid")).read().strip()
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = open(f"/proc/{d}/stat").read()
            title = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = st.rsplit(")", 1)[1].split()[1]
        if ppid == master and "worker process" in title and "shutting down" not in title:
            out.add(int(d))
    return out


def reload_nginx(stack, conf_text):
    """nginx with this configuration, once every worker process that takes
    new connections is a new one (old ones may finish their sessions)"""
    old = nginx_workers(stack)
    with open(stack.env["CHAT_NGINX_CONF"], "w") as f:
        f.write(conf_text)
    stack.nginx_signal("reload")
    eventually(lambda: (lambda now: now and not (now & old))(nginx_workers(stack)),
               timeout=30, interval=0.1, what="the new nginx worker processes")


def pairs_on_one_master(stack, n):
    """n pairs (a, b) whose user slots and conversation shard are all on one
    master (the busiest: it carries every accept, claim and inbox of the
    run); returns the pairs and that master's port"""
    out, master = [], None
    while len(out) < n:
        a, b = uniq("da"), uniq("db")
        conv = conv_of(a, b)
        slots = [slot_of(f"chat:{{u:{a}}}:x"), slot_of(f"chat:{{u:{b}}}:x"),
                 slot_of(f"chat:{{s{shard(conv)}}}:in")]
        owners = {owner_of(stack, s)[1] for s in slots}
        if len(owners) != 1:
            continue
        port = owners.pop()
        if master is None:
            master = port
        if port == master:
            out.append((a, b, conv))
    return out, master


def stack_cmd(stack, *args, timeout=300):
    subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                   env=stack.proc_env, check=True, capture_output=True, timeout=timeout)


def failover_run(stack, n_pairs=4, per_pair=500, kill_after=0.3, mongo_timeout=300):
    """~n_pairs * per_pair messages from n_pairs senders at once; when
    kill_after of them are acknowledged, kill -9 the master that holds them
    all. Each sender retries an `unavailable` with the same client_id until
    acknowledged. Then every recipient connects again from cursor 0.
    Returns what was acknowledged, received and stored."""
    prs, victim = pairs_on_one_master(stack, n_pairs)
    senders = [Sender(stack, a, b, per_pair) for a, b, _ in prs]
    for s in senders:
        s.start()
    total = n_pairs * per_pair
    deadline = time.time() + 120
    while sum(len(s.acks) for s in senders) < kill_after * total:
        assert time.time() < deadline, "senders too slow"
        assert all(s.t.is_alive() or len(s.acks) == per_pair for s in senders), \
            [s.error for s in senders]
        time.sleep(0.02)
    acked_at_kill = sum(len(s.acks) for s in senders)
    slot = slot_of(f"chat:{{s{shard(prs[0][2])}}}:in")
    stack_cmd(stack, "kill", f"redis-{victim}", timeout=60)
    # its replica takes over; the killed node comes back as the new
    # master's replica (with chat_redis_replicas 1 the promoted master,
    # replica-less until then, answers every accept `unavailable`: the
    # senders retry meanwhile)
    def taken_over():
        try:
            return owner_of(stack, slot)[1] != victim
        except AssertionError:          # no master for it yet
            return False
    eventually(taken_over, timeout=60, interval=0.2, what="the replica took over")
    stack_cmd(stack, "up")
    for s in senders:
        s.join()
    out = {"victim": victim, "acked_at_kill": acked_at_kill,
           "retries": sum(s.retries for s in senders),
           "reconnects": sum(s.reconnects for s in senders), "pairs": []}
    for (a, b, conv), s in zip(prs, senders):
        acked = {m["id"]: m for m in s.acks.values()}
        c = ws_retry(stack, b, "after", cursor=0)
        got = received(c, len(acked), timeout=90)
        c.close()
        out["pairs"].append({"conv": conv, "acked": acked, "got": [m["id"] for m in got],
                             "got_seqs": [m["seq"] for m in got]})
    db = pymongo.MongoClient(stack.env["MONGO_URI"], serverSelectionTimeoutMS=5000).get_default_database()
    want = {i for p in out["pairs"] for i in p["acked"]}
    convs = [p["conv"] for p in out["pairs"]]

    def stored():
        return db.messages.count_documents({"_id": {"$in": list(want)}}) == len(want)
    try:
        eventually(stored, timeout=mongo_timeout, interval=1.0, what="every acked message in MongoDB")
    except AssertionError:
        pass            # counted below: the caller decides what it may assert
    for p in out["pairs"]:
        docs = list(db.messages.find({"conv": p["conv"]}, {"_id": 1, "seq": 1}))
        p["stored"] = [d["_id"] for d in docs]
        p["stored_seqs"] = [d["seq"] for d in docs]
    assert len(convs) == n_pairs
    return out


def tally(out):
    """acked-but-lost counts of a failover_run"""
    t = {"acked": 0, "lost_delivery": 0, "dup_delivery": 0, "lost_store": 0, "dup_seq_store": 0}
    for p in out["pairs"]:
        acked = set(p["acked"])
        t["acked"] += len(acked)
        t["lost_delivery"] += len(acked - set(p["got"]))
        t["dup_delivery"] += len(p["got"]) - len(set(p["got"]))
        t["lost_store"] += len(acked - set(p["stored"]))
        t["dup_seq_store"] += len(p["stored_seqs"]) - len(set(p["stored_seqs"]))
    return t


def test_the_durable_stack_waits_for_a_replica(durable_cluster_stack):
    """the configuration reached nginx and the workers, and an accept is
    acknowledged after a WAIT (the counters move)"""
    stack = durable_cluster_stack
    conf = open(stack.env["CHAT_NGINX_CONF"]).read()
    assert re.search(r"^\s*chat_redis_replicas 1;", conf, re.M), conf
    assert re.search(r"^redis_replicas = 1$", open(stack.env["CHAT_WORKER_CONF"]).read(), re.M)
    w0 = status_metric(stack, "ngx_chat_redis_waits_total")
    d0 = status_metric(stack, "ngx_chat_redis_durable_accepts_total")
    s = Sender(stack, uniq("wa"), uniq("wb"), 20).start()
    s.join()
    # every send acknowledged; a WAIT that outlasts chat_redis_wait_timeout
    # on a loaded machine is answered unavailable and retried (same client_id)
    assert len(s.acks) == 20, s.retries
    assert status_metric(stack, "ngx_chat_redis_durable_accepts_total") - d0 >= 20
    assert status_metric(stack, "ngx_chat_redis_waits_total") > w0


def test_too_few_replicas_is_unavailable_then_a_retry_is_acked(durable_cluster_stack):
    """chat_redis_replicas 2 with one replica per master: WAIT confirms 1,
    the accept is answered unavailable (after chat_redis_wait_timeout);
    back at 1, the retry with the same client_id is acknowledged once,
    with the seq the first attempt took (the accept's idempotency record).
    Positive control: the same send on the same stack at 1 first."""
    from helpers import ack_of, send, ws
    stack = durable_cluster_stack
    conf_path = stack.env["CHAT_NGINX_CONF"]
    conf = open(conf_path).read()
    a, b = uniq("ra"), uniq("rb")
    c = ws(stack, a, "s", path=BULK)
    assert ack_of(c, send(c, b, "control"))["seq"] == 1
    c.close()
    short0 = status_metric(stack, "ngx_chat_redis_wait_short_total")
    try:
        reload_nginx(stack, re.sub(r"chat_redis_replicas 1;", "chat_redis_replicas 2;\n"
                                   "    chat_redis_wait_timeout 300ms;", conf))

        def attempt(cid):
            c = ws_retry(stack, a, uniq("d"), path=BULK)
            try:
                c.send_json({"type": "send", "client_id": cid, "to": b, "body": "needs 2"})
                m = c.recv(10)
                while m.get("client_id") != cid:
                    m = c.recv(10)
                return m
            finally:
                c.close()
        # an old worker process may still take a connection right after
        # the reload: each try has its client_id, the acked ones counted
        m, seq, i = None, 1, 0
        deadline = time.time() + 30
        while time.time() < deadline:
            i += 1
            cid = f"cid-short-{i}"
            m = attempt(cid)
            if m["type"] == "error":
                break
            seq = m["seq"]
            time.sleep(0.5)
        assert m["type"] == "error" and m["code"] == "unavailable", m
        assert status_metric(stack, "ngx_chat_redis_wait_short_total") > short0
    finally:
        reload_nginx(stack, conf)
    # at 1 again: the retry is acknowledged with the seq the refused try
    # took (the accept ran; only its confirmation was missing)
    deadline = time.time() + 30
    while True:
        m = attempt(cid)
        if m["type"] == "ack" or time.time() > deadline:
            break
        time.sleep(0.5)
    assert m["type"] == "ack" and m["seq"] == seq + 1, (m, seq)
    rcv = ws(stack, b, "phone", cursor=0)
    got = received(rcv, seq + 1, timeout=30)
    rcv.close()
    assert sorted(x["seq"] for x in got) == list(range(1, seq + 2)), got


@pytest.mark.heavy
def test_a_master_killed_under_load_loses_no_acked_message(durable_cluster_stack):
    stack = durable_cluster_stack
    w0 = status_metric(stack, "ngx_chat_redis_waits_total")
    d0 = status_metric(stack, "ngx_chat_redis_durable_accepts_total")
    out = failover_run(stack)
    t = tally(out)
    print("failover with chat_redis_replicas 1:", t, "acked at the kill:", out["acked_at_kill"],
          "unavailable retried:", out["retries"])
    assert t["acked"] == 2000
    assert out["acked_at_kill"] < 2000          # the kill came while they flowed
    assert t["lost_delivery"] == 0 and t["dup_delivery"] == 0, t
    assert t["lost_store"] == 0 and t["dup_seq_store"] == 0, t
    for p in out["pairs"]:
        assert sorted(m["seq"] for m in p["acked"].values()) == list(range(1, 501))
        assert sorted(p["stored"]) == sorted(p["acked"])
    waits = status_metric(stack, "ngx_chat_redis_waits_total") - w0
    durable = status_metric(stack, "ngx_chat_redis_durable_accepts_total") - d0
    print(f"WAITs {waits} for {durable} durable accepts on this nginx: {waits / max(durable, 1):.2f} per accept")
    assert durable >= 2000


def test_a_single_node_with_a_replica_waits_for_it(stack, tmp_path):
    """chat_redis_replicas on a single Redis with one replica (WAIT on the
    one link): acknowledged while the replica is up (positive control),
    `unavailable` once it is gone."""
    from helpers import ack_of, send
    master_port = int(stack.env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    port = int(os.environ.get("CHAT_TEST_PORT_BASE", "17300")) + 59
    rep = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                            "--appendonly", "no", "--dir", str(tmp_path),
                            "--replicaof", "127.0.0.1", str(master_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf_path = stack.env["CHAT_NGINX_CONF"]
    conf = open(conf_path).read()
    import redis
    m = redis.Redis(port=master_port, decode_responses=True)
    try:
        eventually(lambda: any(v.get("state") == "online" for k, v in m.info("replication").items()
                               if k.startswith("slave") and isinstance(v, dict)),
                   timeout=30, what="the replica online")
        # and acknowledging: a WAIT of our own confirms it (a replica just
        # synced may not have acknowledged its offset yet)
        eventually(lambda: m.set(f"chat:test:{port}", 1) and m.execute_command("WAIT", 1, 1000) == 1,
                   timeout=30, what="the replica acknowledges writes")
        assert re.search(r"chat_redis_replicas 0;", conf)
        reload_nginx(stack, conf.replace("chat_redis_replicas 0;", "chat_redis_replicas 1;\n"
                                         "    chat_redis_wait_timeout 300ms;"))
        a, b = uniq("sa"), uniq("sb")
        # a new connection meets a new worker process once the old ones left
        d0 = status_metric(stack, "ngx_chat_redis_durable_accepts_total")
        seq = 0
        deadline = time.time() + 30
        while status_metric(stack, "ngx_chat_redis_durable_accepts_total") == d0:
            assert time.time() < deadline, "no accept waited for WAIT after the reload"
            c = ws_retry(stack, a, uniq("d"), path=BULK)
            seq = ack_of(c, send(c, b, "with a replica"))["seq"]
            c.close()
        w0 = status_metric(stack, "ngx_chat_redis_waits_total")
        c = ws_retry(stack, a, uniq("d"), path=BULK)
        assert ack_of(c, send(c, b, "with a replica again"))["seq"] == seq + 1
        assert status_metric(stack, "ngx_chat_redis_waits_total") > w0
        rep.kill()
        rep.wait(10)
        eventually(lambda: m.info("replication")["connected_slaves"] == 0, timeout=30,
                   what="the master lost its replica")
        short0 = status_metric(stack, "ngx_chat_redis_wait_short_total")
        cid = send(c, b, "without a replica")
        r = c.recv(10)
        while r.get("client_id") != cid:
            r = c.recv(10)
        assert r["type"] == "error" and r["code"] == "unavailable", r
        assert status_metric(stack, "ngx_chat_redis_wait_short_total") > short0
        c.close()
    finally:
        if rep.poll() is None:
            rep.kill()
            rep.wait(10)
        reload_nginx(stack, conf)
        m.close()
