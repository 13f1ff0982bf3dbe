"""Issue 4: one-to-one messaging end to end against the real stack: accept
(single tick), fan-out to inboxes and live sessions, receipts, offline
drain, history and conversations from MongoDB."""
import threading
import time
import uuid

import pytest

from wsclient import WS


from helpers import BULK, ack_of, auth, conv_of, msgs, redis_client, send, stream, uniq, ws  # noqa: F401

# on the single-node stack and on the cluster stack (t/conftest.py)
pytestmark = pytest.mark.topologies("single", "cluster")


def test_online_delivery_with_sender_sync(stack):
    a, b = uniq("a"), uniq("b")
    a1, a2, b1, b2 = ws(stack, a, "phone"), ws(stack, a, "laptop"), ws(stack, b, "phone"), ws(stack, b, "web")
    cid = send(a1, b, "hello bob ✓")
    ack = ack_of(a1, cid)
    assert set(ack) == {"type", "client_id", "id", "conv", "seq", "ts"}
    assert ack["conv"] == conv_of(a, b) and ack["seq"] == 1 and isinstance(ack["id"], str)
    for dev in (b1, b2, a2):
        m = msgs(dev, 1)[0]
        assert m["id"] == ack["id"] and m["seq"] == 1 and m["conv"] == conv_of(a, b)
        assert m["from"] == a and m["to"] == b and m["body"] == "hello bob ✓" and m["kind"] == "text"
        assert m["ts"] == ack["ts"] and m["cursor"] >= 1
    # the sending device does not get its own message back live
    a1.send_json({"type": "ping"})
    assert a1.recv()["type"] == "pong"
    for c in (a1, a2, b1, b2):
        c.close()


def test_retry_with_the_same_client_id_creates_nothing_new(stack):
    a, b = uniq("a"), uniq("b")
    a1, b1 = ws(stack, a), ws(stack, b)
    cid = send(a1, b, "once")
    first = ack_of(a1, cid)
    send(a1, b, "once", cid)
    again = ack_of(a1, cid)
    assert again == first
    st, _, http_again = stack.request("POST", stack.http + "/send",
                                      body={"client_id": cid, "to": b, "body": "once"}, headers=auth(stack, a))
    assert st == 200 and http_again["id"] == first["id"] and http_again["seq"] == first["seq"]
    got = msgs(b1, 1)
    send(a1, b, "next")
    nxt = msgs(b1, 1)
    assert got[0]["id"] == first["id"] and nxt[0]["seq"] == 2     # nothing in between
    a1.close()
    b1.close()


def test_two_concurrent_senders_share_one_order(stack):
    a, b = uniq("a"), uniq("b")
    a1, b1 = ws(stack, a, path=BULK), ws(stack, b, path=BULK)
    a2, b2 = ws(stack, a, "watch"), ws(stack, b, "watch")
    n = 100

    def blast(c, to):
        for i in range(n):
            send(c, to, f"{i}")

    ta, tb = threading.Thread(target=blast, args=(a1, b)), threading.Thread(target=blast, args=(b1, a))
    ta.start(), tb.start()
    ta.join(), tb.join()
    # each watcher device sees every message of the conversation once, and
    # both see the same order: the same seq for every id, seqs 1..2n
    orders = []
    for dev in (a2, b2):
        got = msgs(dev, 2 * n, timeout=30)
        seqs = [m["seq"] for m in got]
        assert sorted(seqs) == list(range(1, 2 * n + 1))
        assert len({m["id"] for m in got}) == 2 * n
        cursors = [m["cursor"] for m in got]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
        if stack.env["CHAT_QUEUE"] == "redis":
            # the script that numbers also enqueues: arrival order is seq order
            assert seqs == sorted(seqs)
        orders.append({m["id"]: m["seq"] for m in got})
    assert orders[0] == orders[1]
    for c in (a1, b1, a2, b2):
        c.close()


def test_offline_drain_of_5000_in_order_without_duplicates(stack):
    a, b = uniq("a"), uniq("b")
    a1 = ws(stack, a, path=BULK)
    n = 5000
    for i in range(n):
        send(a1, b, f"m{i}", cid=f"c{i}")
    acked = 0
    while acked < n:
        m = a1.recv(30)
        assert m["type"] == "ack", m
        acked += 1
    t0 = time.time()
    b1 = ws(stack, b)
    got = msgs(b1, n, timeout=120)
    assert [m["seq"] for m in got] == list(range(1, n + 1))
    assert [m["body"] for m in got] == [f"m{i}" for i in range(n)]
    assert len({m["id"] for m in got}) == n
    # nothing more
    b1.send_json({"type": "ping"})
    assert b1.recv()["type"] == "pong"
    print(f"drained {n} in {time.time() - t0:.2f}s")
    a1.close()
    b1.close()


def test_only_unacknowledged_events_are_redelivered(stack):
    a, b = uniq("a"), uniq("b")
    a1 = ws(stack, a)
    for i in range(10):
        ack_of(a1, send(a1, b, f"{i}"))
    b1 = ws(stack, b, "phone")
    got = msgs(b1, 10)
    b1.send_json({"type": "ack", "cursor": got[4]["cursor"]})
    b1.send_json({"type": "ping"})
    assert b1.recv()["type"] == "pong"
    b1.close()
    b2 = ws(stack, b, "phone")
    assert b2.hello["cursor"] == got[4]["cursor"]
    again = msgs(b2, 5)
    assert [m["id"] for m in again] == [m["id"] for m in got[5:]]
    # an explicit cursor wins over the acknowledged one
    b3 = ws(stack, b, "tablet", cursor=got[7]["cursor"])
    assert [m["id"] for m in msgs(b3, 2)] == [m["id"] for m in got[8:]]
    for c in (a1, b2, b3):
        c.close()


def test_delivered_and_read_receipts(stack):
    a, b = uniq("a"), uniq("b")
    a1, b1, b2 = ws(stack, a), ws(stack, b, "phone"), ws(stack, b, "laptop")
    for i in range(3):
        ack_of(a1, send(a1, b, f"{i}"))
    got = msgs(b1, 3)
    msgs(b2, 3)
    b1.send_json({"type": "ack", "cursor": got[-1]["cursor"]})
    r = a1.recv_type("receipt", timeout=10)
    assert r["status"] == "delivered" and r["by"] == b and r["seq"] == 3 and r["conv"] == conv_of(a, b)
    assert "cursor" not in r                             # live only: its pointer is read on reconnect
    if stack.env["CHAT_QUEUE"] == "redis":
        # relayed to the sender's connections, not queued: the conversation's
        # stream holds its three messages (trimming removes a prefix, so a
        # receipt queued after them would still be there) and no receipt
        rc = redis_client(stack)
        ents = [f for _, f in rc.xrange(stream(conv_of(a, b))) if f.get("conv") == conv_of(a, b)]
        rc.close()
        assert [f["t"] for f in ents] == ["msg"] * 3, ents
    # one receipt for many messages, and no second one for the other device
    b2.send_json({"type": "ack", "cursor": got[-1]["cursor"]})
    b1.send_json({"type": "read", "conv": conv_of(a, b), "seq": 2})
    r = a1.recv_type("receipt", timeout=10)
    assert r["status"] == "read" and r["seq"] == 2 and r["by"] == b
    sync = b2.recv_type("receipt", timeout=10)           # the reader's other device
    assert sync["status"] == "read" and sync["seq"] == 2
    # lower values are ignored
    b1.send_json({"type": "read", "conv": conv_of(a, b), "seq": 1})
    b1.send_json({"type": "read", "conv": conv_of(a, b), "seq": 3})
    r = a1.recv_type("receipt", timeout=10)
    assert r["status"] == "read" and r["seq"] == 3 and r["cursor"] >= 1     # read receipts are durable
    for c in (a1, b1, b2):
        c.close()
    # a sender's device that was away: no delivered receipt in the replay,
    # the read one is; the delivered pointer is read from /chat/receipts
    a2 = ws(stack, a, cursor=0)
    replayed = []
    deadline = time.time() + 10
    while ("read", 3) not in [(m.get("status"), m.get("seq")) for m in replayed] and time.time() < deadline:
        replayed.append(a2.recv(max(0.1, deadline - time.time())))
    try:
        while True:
            replayed.append(a2.recv(1))                  # and nothing after it
    except TimeoutError:
        pass
    assert [(m["status"], m["seq"]) for m in replayed if m["type"] == "receipt"] == [("read", 2), ("read", 3)]
    st, _, body = stack.request("GET", stack.http + f"/receipts?conv={conv_of(a, b)}&seq=3", headers=auth(stack, a))
    assert st == 200 and body["delivered"] == [b] and body["read"] == [b]
    assert body["pointers"] == {b: {"delivered": 3, "read": 3}}
    a2.close()


def test_acks_of_many_sessions_in_one_tick_each_apply(stack):
    """The acks one chat_ack_delay tick releases for many sessions at once
    (40 recipients ack in the same moment, across the nginx workers) each
    apply to their own user only. Each sender gets the
    delivered receipt of exactly its conversation and seq, and each
    recipient's cursor is stored (a reconnect starts after it). Control: a
    recipient that does not ack gets no receipt sent and keeps its cursor."""
    n = 40
    pairs = [(uniq("a"), uniq("b")) for _ in range(n + 1)]
    senders = [ws(stack, a) for a, _ in pairs]
    rcpts = [ws(stack, b, "phone") for _, b in pairs]
    for i, (a, b) in enumerate(pairs):
        for k in range(i % 3 + 1):
            ack_of(senders[i], send(senders[i], b, f"{i}.{k}"))
    got = [msgs(rcpts[i], i % 3 + 1) for i in range(n + 1)]
    for i in range(n):                                     # the last one is the control
        rcpts[i].send_json({"type": "ack", "cursor": got[i][-1]["cursor"]})
    for i, (a, b) in enumerate(pairs[:n]):
        r = senders[i].recv_type("receipt", timeout=10)
        assert (r["status"], r["by"], r["conv"], r["seq"]) == ("delivered", b, conv_of(a, b), i % 3 + 1)
    with pytest.raises(TimeoutError):
        senders[n].recv_type("receipt", timeout=1)
    for c in senders + rcpts:
        c.close()
    for i, (a, b) in enumerate(pairs):
        again = ws(stack, b, "phone")
        assert again.hello["cursor"] == (got[i][-1]["cursor"] if i < n else 0)
        again.close()


def test_notes_to_self(stack):
    a = uniq("self")
    a1, a2 = ws(stack, a, "phone"), ws(stack, a, "laptop")
    ack = ack_of(a1, send(a1, a, "remember the milk"))
    assert ack["conv"] == f"d:{a}:{a}"
    m = msgs(a2, 1)[0]
    assert m["to"] == a and m["from"] == a and m["id"] == ack["id"]
    a1.close()
    a2.close()


def poll_until(stack, user, n, device="browser"):
    """Long-polls from cursor 0, each poll from the cursor of the previous
    answer, until n events came (the fan-out may still be working); returns
    them and the last cursor."""
    events, cur = [], 0
    while len(events) < n:
        st, _, body = stack.request("GET", stack.http + f"/poll?cursor={cur}&timeout=5",
                                    headers=auth(stack, user, device))
        assert st == 200 and body["events"], body
        events += body["events"]
        assert body["cursor"] == body["events"][-1]["cursor"] > cur
        cur = body["cursor"]
    return events, cur


def test_long_poll_device_gets_messages_and_acks_by_polling(stack):
    a, b = uniq("a"), uniq("b")
    a1 = ws(stack, a)
    for i in range(3):
        ack_of(a1, send(a1, b, f"p{i}"))
    events, cur = poll_until(stack, b, 3)
    assert [e["body"] for e in events] == ["p0", "p1", "p2"]
    # polling with the cursor acknowledges: a delivered receipt reaches the sender
    res = {}
    t = threading.Thread(target=lambda: res.update(r=stack.request(
        "GET", stack.http + f"/poll?cursor={cur}&timeout=10", headers=auth(stack, b, "browser"), timeout=15)))
    t.start()
    r = a1.recv_type("receipt", timeout=10)
    while r["seq"] < 3:            # earlier polls may have acknowledged a part
        r = a1.recv_type("receipt", timeout=10)
    assert r["status"] == "delivered" and r["seq"] == 3
    ack_of(a1, send(a1, b, "live"))
    t.join(15)
    st, _, body = res["r"]
    assert st == 200 and [e["body"] for e in body["events"]] == ["live"]
    a1.close()


def test_a_device_connecting_while_messages_arrive_gets_each_once(stack):
    """A session must not take durable events live before its replay starts:
    they are in the inbox, and the replay (from the cursor the registry
    answers with) would send them again. Racy by nature, so repeated: before
    the fix 4 of 150 rounds of this got an event twice in one poll."""
    bad = []
    for it in range(100):
        a, b = uniq("a"), uniq("b")
        a1 = ws(stack, a)
        for i in range(3):
            ack_of(a1, send(a1, b, f"p{i}"))
        events, _ = poll_until(stack, b, 3)
        got = [(e["body"], e["cursor"]) for e in events]
        if got != [("p0", 1), ("p1", 2), ("p2", 3)]:
            bad.append((it, got))
        a1.close()
    assert not bad, bad


def test_http_send_ack_read(stack):
    a, b = uniq("a"), uniq("b")
    b1 = ws(stack, b)
    st, _, ack = stack.request("POST", stack.http + "/send", body={"client_id": "h1", "to": b, "body": "hi"},
                               headers=auth(stack, a))
    assert st == 200 and ack["type"] == "ack" and ack["seq"] == 1
    m = msgs(b1, 1)[0]
    st, _, _ = stack.request("POST", stack.http + "/ack", body={"cursor": m["cursor"]}, headers=auth(stack, b))
    assert st == 204
    st, _, _ = stack.request("POST", stack.http + "/read", body={"conv": conv_of(a, b), "seq": 1},
                             headers=auth(stack, b))
    assert st == 204
    st, _, e = stack.request("POST", stack.http + "/read", body={"conv": "d:x:y", "seq": 1}, headers=auth(stack, b))
    assert st == 403 and e["code"] == "forbidden"
    b1.close()


@pytest.mark.parametrize("frame,code,status", [
    ({"client_id": "k", "to": "bob"}, "bad_request", 400),                        # no body
    ({"client_id": "k", "body": "x"}, "bad_request", 400),                        # no target
    ({"client_id": "k", "to": "b@d", "body": "x"}, "bad_request", 400),           # bad id
    ({"to": "bob", "body": "x"}, "bad_request", 400),                             # no client_id
    ({"client_id": "k" * 65, "to": "bob", "body": "x"}, "bad_request", 400),
    ({"client_id": "k", "to": "bob", "body": "x" * 1001}, "too_large", 413),
    ({"client_id": "k", "to": "bob", "body": 5}, "bad_request", 400),
    ({"client_id": "k", "to": "bob", "body": "", "kind": "media",
      "media": {"url": "ftp://x/y", "mime": "image/png", "size": 1}}, "bad_request", 400),
    ({"client_id": "k", "to": "bob", "body": "", "kind": "media",
      "media": {"url": "https://x/y", "mime": "png", "size": 1}}, "bad_request", 400),
    ({"client_id": "k", "to": "bob", "body": "", "kind": "media",
      "media": {"url": "https://x/y", "mime": "image/png", "size": 10**12}}, "too_large", 413),
    ({"client_id": "k", "to": "bob", "body": "x", "kind": "video"}, "bad_request", 400),
])
def test_every_bad_send_gets_its_error(stack, frame, code, status):
    c = ws(stack, uniq("bad"))
    c.send_json({"type": "send", **frame})
    e = c.recv()
    assert e["type"] == "error" and e["code"] == code, e
    if "client_id" in frame and len(frame["client_id"]) <= 64:
        assert e["client_id"] == frame["client_id"]
    c.send_json({"type": "ping"})
    assert c.recv()["type"] == "pong"
    c.close()
    st, _, body = stack.request("POST", stack.http + "/send", body=frame, headers=auth(stack, uniq("bad")))
    assert st == status and body["code"] == code


def test_media_messages_travel_by_reference(stack):
    a, b = uniq("a"), uniq("b")
    a1, b1 = ws(stack, a), ws(stack, b)
    a1.send_json({"type": "send", "client_id": "m1", "to": b, "kind": "media", "body": "look",
                  "media": {"url": "https://cdn.example/p.jpg", "mime": "image/jpeg", "size": 12345}})
    ack_of(a1, "m1")
    m = msgs(b1, 1)[0]
    assert m["kind"] == "media" and m["media"] == {"url": "https://cdn.example/p.jpg", "mime": "image/jpeg",
                                                   "size": 12345}
    a1.close()
    b1.close()


def test_rate_limit(stack):
    a = uniq("rl")
    codes = []
    for i in range(6):
        st, h, body = stack.request("POST", stack.http.replace("/chat", "/chat/test/send-limited"),
                                    body={"client_id": f"r{i}", "to": "bob", "body": "x"},
                                    headers={**auth(stack, a), "Connection": "close"})
        codes.append(st)
        if st == 429:
            assert body["code"] == "rate_limited" and body["retry_after"] > 0 and int(h["Retry-After"]) >= 1
    # burst 3, shared by every worker process of this nginx
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429, 429]
    c = WS(stack.host, stack.port, "/chat/test/ws-short", token=stack.token(uniq("rlw")))
    c.recv()
    for i in range(8):
        c.send_json({"type": "send", "client_id": f"w{i}", "to": "bob", "body": "x"})
    seen = [c.recv() for _ in range(8)]
    limited = [m for m in seen if m["type"] == "error"]
    assert limited and limited[0]["code"] == "rate_limited" and limited[0]["retry_after"] > 0
    # burst 5: exactly the first five are accepted (refusals are answered
    # at once, acks after Redis, so they may arrive in either order)
    assert sorted(m["client_id"] for m in seen if m["type"] == "ack") == [f"w{i}" for i in range(5)]
    assert len(limited) == 3
    c.close()


def test_history_pagination_and_access(stack):
    a, b = uniq("a"), uniq("b")
    a1 = ws(stack, a)
    for i in range(7):
        ack_of(a1, send(a1, b, f"h{i}"))
    conv = conv_of(a, b)

    def history(user, q):
        return stack.request("GET", f"{stack.http}/history?conv={conv}{q}", headers=auth(stack, user))

    def eventually_all():
        st, _, body = history(a, "&limit=100")
        return st == 200 and len(body["messages"]) == 7 and body
    deadline = time.time() + 20
    while not eventually_all() and time.time() < deadline:
        time.sleep(0.3)
    st, _, page = history(a, "&limit=3")
    assert st == 200 and [m["seq"] for m in page["messages"]] == [7, 6, 5]
    assert page["next_before"] == 5
    st, _, page2 = history(b, f"&limit=3&before={page['next_before']}")
    assert [m["seq"] for m in page2["messages"]] == [4, 3, 2]
    st, _, page3 = history(b, f"&limit=3&before={page2['next_before']}")
    assert [m["seq"] for m in page3["messages"]] == [1] and page3["next_before"] is None
    m = page["messages"][0]
    assert m["body"] == "h6" and m["from"] == a and m["to"] == b and isinstance(m["id"], str)
    st, _, e = history(uniq("stranger"), "")
    assert st == 403 and e["code"] == "forbidden"
    st, _, e = history(a, "&limit=101")
    assert st == 400
    st, _, e = stack.request("GET", f"{stack.http}/history?conv={conv}")
    assert st == 401
    a1.close()


def test_conversation_list_and_unread(stack):
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    a1, b1 = ws(stack, a), ws(stack, b)
    for i in range(3):
        ack_of(a1, send(a1, b, f"ab{i}"))
    ack_of(b1, send(b1, a, "reply"))
    # a message's ts has millisecond resolution, and the list orders by it:
    # "to c" goes out in a later millisecond than the reply (within the same
    # one, the order of two conversations is the message ids')
    time.sleep(0.005)
    ack_of(a1, send(a1, c, "to c"))
    b1.send_json({"type": "read", "conv": conv_of(a, b), "seq": 2})

    def convs(user):
        st, _, body = stack.request("GET", stack.http + "/conversations", headers=auth(stack, user))
        assert st == 200
        return body["conversations"]

    deadline = time.time() + 20
    while time.time() < deadline:
        lb = convs(b)
        if lb and lb[0]["last_seq"] == 4 and lb[0]["read_seq"] == 2:
            break
        time.sleep(0.3)
    lb = convs(b)
    assert len(lb) == 1 and lb[0]["conv"] == conv_of(a, b)
    assert lb[0]["last_seq"] == 4 and lb[0]["read_seq"] == 2 and lb[0]["unread"] == 1   # ab2 (reply is b's own)
    assert lb[0]["last"]["body"] == "reply"
    deadline = time.time() + 20
    while len(convs(a)) < 2 and time.time() < deadline:
        time.sleep(0.3)
    la = convs(a)
    assert [x["conv"] for x in la] == [conv_of(a, c), conv_of(a, b)]      # most recent first
    assert la[1]["unread"] == 1      # b's reply
    a1.close()
    b1.close()


def test_the_sending_device_never_gets_its_own_messages(stack):
    """Live (interleaved with receipts) and on replay after reconnecting; its
    other devices do get them (a device the server has seen before the
    sends: a brand-new one starts with what comes after its first
    connection, PROTOCOL 9 row 8)."""
    a, b = uniq("a"), uniq("b")
    ws(stack, a, "laptop").close()                 # the laptop is known
    a1, b1 = ws(stack, a, "phone"), ws(stack, b)
    ids = []
    for i in range(10):
        ids.append(ack_of(a1, send(a1, b, f"{i}"))["id"])
        m = msgs(b1, 1)[0]
        b1.send_json({"type": "ack", "cursor": m["cursor"]})     # receipts go to a
        time.sleep(0.05)
    b1.send_json({"type": "read", "conv": conv_of(a, b), "seq": 10})
    got = []
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            got.append(a1.recv(0.3))
        except TimeoutError:
            pass
    assert not [m for m in got if m.get("type") == "msg"], got
    assert any(m.get("type") == "receipt" for m in got)
    a1.close()
    again = ws(stack, a, "phone", cursor=0)
    seen = []
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            seen.append(again.recv(0.3))
        except TimeoutError:
            pass
    assert not [m for m in seen if m.get("type") == "msg"]
    # the replay has the durable read receipt; delivered ones were live only
    assert [m["status"] for m in seen if m.get("type") == "receipt"] == ["read"], seen
    other = ws(stack, a, "laptop", cursor=0)
    assert [m["id"] for m in msgs(other, 10)] == ids
    for c in (again, other, b1):
        c.close()


def test_own_sends_are_copied_only_for_devices_seen_before(stack, r):
    """A user with one device: its sends cost no inbox copy (no cursor); a
    device first seen afterwards gets none of them (they are in history),
    and from then on gets every send of the other device."""
    a, b = uniq("a"), uniq("b")
    a1, b1 = ws(stack, a, "phone"), ws(stack, b)
    for i in range(3):
        ack_of(a1, send(a1, b, f"early{i}"))
    assert [m["body"] for m in msgs(b1, 3)] == ["early0", "early1", "early2"]
    assert r.zcard(f"chat:{{u:{a}}}:inbox") == 0 and r.get(f"chat:{{u:{a}}}:cur") is None
    tab = ws(stack, a, "tablet", cursor=0)
    late = []
    try:
        while True:
            late.append(tab.recv(2))                     # the replay, if any
    except TimeoutError:
        pass
    assert not [m for m in late if m.get("type") == "msg"], late
    # positive control: now the tablet is known, the next send reaches it
    ack = ack_of(a1, send(a1, b, "later"))
    m = tab.recv_type("msg", timeout=10)
    assert m["id"] == ack["id"] and m["body"] == "later" and m["cursor"] >= 1
    for c in (a1, b1, tab):
        c.close()
