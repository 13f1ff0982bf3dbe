"""Issue 16: retention and deletion, both queues, against the real stack.
Delete for everyone (the sender, within delete_window_s: 8 s in the test
stack's worker config, scripts/stack --test) and delete for me over
`DELETE /chat/messages/<id>?conv=C[&for=me]`: the tombstone / deleted event
reaches every device live and on replay, MongoDB (queried directly) holds
no body, Redis inboxes (read directly) hold no copy of it, history shows
the tombstone. The history policy setting itself is in t/test_push.py's
settings tests and here."""
import datetime
import time
import uuid

from helpers import SHARDS, ack_of, auth, dconv, eventually, inbox, msgs, redis_only, send, shard, uid, ws

WINDOW_S = 8


def api(stack, user, method, path, body=None, device=None):
    st, _, b = stack.request(method, stack.http + path, body=body, headers=auth(stack, user, device))
    return st, b


def delete(stack, user, mid, conv, what=None, device=None):
    q = f"/messages/{mid}?conv={conv}" + (f"&for={what}" if what else "")
    return api(stack, user, "DELETE", q, device=device)


def stored(db, mid):
    return eventually(lambda: db.messages.find_one({"_id": mid}), timeout=20, what=f"message {mid} in MongoDB")


def next_of(c, typ, timeout=15):
    return c.recv_type(typ, timeout=timeout)


def history(stack, user, conv):
    st, b = api(stack, user, "GET", f"/history?conv={conv}")
    assert st == 200, b
    return b["messages"]


def gsend(c, group, body):
    cid = uuid.uuid4().hex
    c.send_json({"type": "send", "client_id": cid, "group": group, "body": body})
    return cid


def test_history_policy_setting(stack, r, db):
    u = uid()
    st, b = api(stack, u, "GET", "/settings")
    assert st == 200 and b["history"] == "keep", b
    for ok in ("days:90", "device", "days:1", "keep"):
        st, b = api(stack, u, "PUT", "/settings", {"history": ok})
        assert st == 200 and b["history"] == ok, b
        assert r.hget("chat:{u:%s}:set" % u, "history") == ok
        assert db.settings.find_one({"_id": u})["history"] == ok
    for bad in ("days:0", "days:3651", "days:09", "forever", 90, None, "days:"):
        st, b = api(stack, u, "PUT", "/settings", {"history": bad})
        assert st == 400 and b["code"] == "bad_request" and "history" in b["message"], (bad, b)
    assert api(stack, u, "GET", "/settings")[1]["history"] == "keep"


def test_delete_for_everyone_live_replay_storage_and_history(stack, r, db):
    a, b = uid("a"), uid("b")
    conv = dconv(a, b)
    a1, a2, b1 = ws(stack, a, "phone"), ws(stack, a, "laptop"), ws(stack, b, "phone")
    b2 = ws(stack, b, "tablet")
    keep_cid = send(a1, b, "stays")
    keep = ack_of(a1, keep_cid)
    gone = ack_of(a1, send(a1, b, "secret body"))
    got = msgs(b2, 2)
    b2.send_json({"type": "ack", "cursor": got[-1]["cursor"]})
    b2.close()                                   # b's tablet is offline during the deletion
    msgs(b1, 2)
    msgs(a2, 2)
    stored(db, gone["id"])
    st, res = delete(stack, a, gone["id"], conv, device="phone")
    assert st == 200 and res == {"id": gone["id"], "conv": conv, "seq": gone["seq"], "for": "everyone"}, res
    # live: every other device of both users
    for c in (b1, a2):
        t = next_of(c, "deleted")
        assert t["for"] == "everyone" and t["id"] == gone["id"] and t["seq"] == gone["seq"] and t["by"] == a
        assert t["conv"] == conv and t["cursor"] > 0
    # MongoDB: no body, marked deleted; the other message untouched
    doc = eventually(lambda: (lambda d: d if d and d.get("deleted") else None)(db.messages.find_one({"_id": gone["id"]})),
                     what="deleted in MongoDB")
    assert "body" not in doc and "media" not in doc
    assert db.messages.find_one({"_id": keep["id"]})["body"] == "stays"        # positive control
    for u in (a, b):
        last = eventually(lambda: (lambda d: d if d and d["last"].get("deleted") else None)(
            db.conversations.find_one({"_id": f"{u}|{conv}"})), what="last stripped")
        assert "body" not in last["last"] and last["last"]["id"] == gone["id"]
    # Redis inboxes: no copy of the body anywhere, the cursors stay (tombstone in place)
    for u in (a, b):
        raw = r.zrange("chat:{u:%s}:inbox" % u, 0, -1)
        assert not [m for m in raw if "secret body" in m], u
        assert [m for m in raw if "stays" in m], u                               # positive control
        evs = [e for _, e in inbox(r, u)]
        assert any(e.get("type") == "msg" and e.get("deleted") and e["id"] == gone["id"] for e in evs), u
        assert any(e.get("type") == "deleted" and e["id"] == gone["id"] for e in evs), u
    # replay after being offline: the tablet reconnects from its acked cursor
    b3 = ws(stack, b, "tablet")
    t = next_of(b3, "deleted")
    assert t["id"] == gone["id"] and t["for"] == "everyone"
    # a new device replaying from the start sees the tombstone where the message was
    b4 = ws(stack, b, "watch", cursor=0)
    seen = []
    deadline = time.time() + 15
    while not any(m.get("type") == "deleted" for m in seen) and time.time() < deadline:
        seen.append(b4.recv(max(0.1, deadline - time.time())))
    kinds = [(m["type"], m.get("id"), bool(m.get("deleted"))) for m in seen if m["type"] in ("msg", "deleted")]
    assert kinds == [("msg", keep["id"], False), ("msg", gone["id"], True), ("deleted", gone["id"], False)], kinds
    assert "body" not in seen[1] or not seen[1].get("body")
    # history shows the tombstone, no body
    h = {m["id"]: m for m in history(stack, b, conv)}
    assert h[gone["id"]].get("deleted") is True and "body" not in h[gone["id"]]
    assert h[keep["id"]]["body"] == "stays"
    # idempotent: again answers the same, nothing new queued
    st, res2 = delete(stack, a, gone["id"], conv)
    assert st == 200 and res2 == res
    for c in (a1, a2, b1, b3, b4):
        c.close()


def test_delete_for_everyone_is_refused_to_others_and_after_the_window(stack, db):
    a, b = uid("a"), uid("b")
    conv = dconv(a, b)
    a1 = ws(stack, a)
    m1 = ack_of(a1, send(a1, b, "one"))
    m2 = ack_of(a1, send(a1, b, "two"))
    stored(db, m2["id"])
    # not the sender
    st, e = delete(stack, b, m1["id"], conv)
    assert st == 403 and e["code"] == "forbidden" and "sender" in e["message"], e
    # not a participant, unknown message, bad arguments
    st, e = delete(stack, uid("c"), m1["id"], conv)
    assert st == 403 and e["code"] == "forbidden", e
    st, e = delete(stack, a, "999999999", conv)
    assert st == 404 and e["code"] == "not_found", e
    st, e = delete(stack, a, m1["id"], conv, what="nobody")
    assert st == 400 and e["code"] == "bad_request", e
    st, e = api(stack, a, "GET", f"/messages/{m1['id']}?conv={conv}")
    assert st == 405, e
    # positive control: the sender within the window
    st, res = delete(stack, a, m1["id"], conv)
    assert st == 200, res
    # after the window
    left = WINDOW_S + 0.5 - (time.time() * 1000 - m2["ts"]) / 1000
    if left > 0:
        time.sleep(left)
    st, e = delete(stack, a, m2["id"], conv)
    assert st == 403 and e["code"] == "forbidden" and "within" in e["message"], e
    assert db.messages.find_one({"_id": m2["id"]})["body"] == "two"
    # delete for me still works after the window
    st, res = delete(stack, b, m2["id"], conv, what="me")
    assert st == 200, res
    a1.close()


def test_delete_for_me_hides_it_for_me_only(stack, r, db):
    a, b = uid("a"), uid("b")
    conv = dconv(a, b)
    a1, b1, b2 = ws(stack, a), ws(stack, b, "phone"), ws(stack, b, "tablet")
    m1 = ack_of(a1, send(a1, b, "hide me"))
    m2 = ack_of(a1, send(a1, b, "keep me"))
    msgs(b1, 2)
    msgs(b2, 2)
    stored(db, m2["id"])
    st, res = delete(stack, b, m1["id"], conv, what="me", device="phone")
    assert st == 200 and res["for"] == "me", res
    # my other device gets the durable event; the peer gets nothing
    t = next_of(b2, "deleted")
    assert t["for"] == "me" and t["id"] == m1["id"] and t["by"] == b and t["cursor"] > 0
    a1.send_json({"type": "ping"})
    while True:
        m = a1.recv(10)
        assert m["type"] != "deleted", m
        if m["type"] == "pong":
            break
    # my history: gone; the peer's: there, with its body
    eventually(lambda: m1["id"] not in [m["id"] for m in history(stack, b, conv)], what="hidden in b's history")
    assert m2["id"] in [m["id"] for m in history(stack, b, conv)]                  # positive control
    ha = {m["id"]: m for m in history(stack, a, conv)}
    assert ha[m1["id"]]["body"] == "hide me" and "hidden" not in ha[m1["id"]]
    assert db.messages.find_one({"_id": m1["id"]})["body"] == "hide me"
    # my inbox no longer holds its body, the peer's does
    assert not [m for m in r.zrange("chat:{u:%s}:inbox" % b, 0, -1) if "hide me" in m]
    # a device of mine replaying from the start: the message is a tombstone
    b3 = ws(stack, b, "laptop", cursor=0)
    seen = []
    deadline = time.time() + 15
    while not any(m.get("type") == "deleted" for m in seen) and time.time() < deadline:
        seen.append(b3.recv(max(0.1, deadline - time.time())))
    mine = [m for m in seen if m.get("id") == m1["id"]]
    assert mine and all(not m.get("body") for m in mine), mine
    for c in (a1, b1, b2, b3):
        c.close()


def test_a_group_message_deleted_for_everyone(stack, r, db):
    o, m, n = uid("o"), uid("m"), uid("n")
    st, _, g = stack.request("POST", stack.http + "/groups", body={"name": "t", "members": [m, n]},
                             headers=auth(stack, o))
    assert st == 201, g
    gid, conv = g["group"], "g:" + g["group"]
    o1, m1, n1 = ws(stack, o, "phone"), ws(stack, m), ws(stack, n)
    cid = gsend(o1, gid, "group secret")
    ack = ack_of(o1, cid)
    for c in (m1, n1):
        assert msgs(c, 1)[0]["id"] == ack["id"]
    stored(db, ack["id"])
    # a member who is not the sender may not
    st, e = delete(stack, m, ack["id"], conv)
    assert st == 403 and e["code"] == "forbidden", e
    st, res = delete(stack, o, ack["id"], conv, device="phone")
    assert st == 200, res
    for c in (m1, n1):
        t = next_of(c, "deleted")
        assert t["id"] == ack["id"] and t["for"] == "everyone" and t["conv"] == conv
    doc = eventually(lambda: (lambda d: d if d and d.get("deleted") else None)(db.messages.find_one({"_id": ack["id"]})),
                     what="group message deleted in MongoDB")
    assert "body" not in doc
    eventually(lambda: (lambda d: d if d and d["last"].get("deleted") else None)(db.groups.find_one({"_id": gid})),
               what="group last stripped")
    assert "body" not in db.groups.find_one({"_id": gid})["last"]
    for u in (m, n):
        assert not [x for x in r.zrange("chat:{u:%s}:inbox" % u, 0, -1) if "group secret" in x], u
    h = [x for x in history(stack, m, conv) if x.get("id") == ack["id"]]
    assert h and h[0].get("deleted") is True and "body" not in h[0]
    for c in (o1, m1, n1):
        c.close()


# ---- expiry: days:N and device (sweep_day_ms = 2000 in the test stack: a "day" is 2 s) ----

DAY_S = 2


def absent(r, db, user, mid):
    return db.messages.find_one({"_id": mid}) is None and not [
        m for m in r.zrange("chat:{u:%s}:inbox" % user, 0, -1) if '"id":"%s"' % mid in m]


def test_days_policy_removes_expired_messages(stack, r, db):
    a, b, c = uid("a"), uid("b"), uid("c")
    st, _ = api(stack, a, "PUT", "/settings", {"history": "days:1"})
    assert st == 200
    a1, b1, c1 = ws(stack, a), ws(stack, b, "phone"), ws(stack, c)
    old = [ack_of(a1, send(a1, b, f"short-lived {i}")) for i in range(3)]
    ctl = ack_of(c1, send(c1, b, "kept"))          # b and c keep: the control
    msgs(b1, 4)
    for m in old + [ctl]:
        stored(db, m["id"])
    assert db.messages.find_one({"_id": old[0]["id"]})["expire_at"] is not None
    assert "expire_at" not in db.messages.find_one({"_id": ctl["id"]})
    # b never acks: the copies are still in the inboxes until the sweeper removes them
    for m in old:
        eventually(lambda: absent(r, db, a, m["id"]) and absent(r, db, b, m["id"]), timeout=40,
                   what="expired message removed")
    assert history(stack, b, dconv(a, b)) == []
    last = db.conversations.find_one({"_id": f"{b}|{dconv(a, b)}"})["last"]
    assert "body" not in last
    # the control is still there, body and inbox copy
    assert db.messages.find_one({"_id": ctl["id"]})["body"] == "kept"
    assert [m for m in r.zrange("chat:{u:%s}:inbox" % b, 0, -1) if "kept" in m]
    assert [m["id"] for m in history(stack, b, dconv(b, c))] == [ctl["id"]]
    for x in (a1, b1, c1):
        x.close()


def test_device_policy_removes_once_every_recipient_device_acked(stack, r, db):
    a, b = uid("a"), uid("b")
    st, _ = api(stack, b, "PUT", "/settings", {"history": "device"})       # the recipient asks for it
    assert st == 200
    a1, b1, b2 = ws(stack, a), ws(stack, b, "phone"), ws(stack, b, "tablet")
    sent = [ack_of(a1, send(a1, b, f"ephemeral {i}")) for i in range(2)]
    g1, g2 = msgs(b1, 2), msgs(b2, 2)
    for m in sent:
        doc = stored(db, m["id"])
        assert doc["expire_at"] is not None            # the undelivered bound
    b1.send_json({"type": "ack", "cursor": g1[-1]["cursor"]})
    b2.send_json({"type": "ack", "cursor": g2[-1]["cursor"]})
    t0 = time.time()
    for x in sent:
        eventually(lambda: absent(r, db, a, x["id"]) and absent(r, db, b, x["id"]), timeout=20,
                   what="acknowledged ephemeral message removed")
    print(f"removed {time.time() - t0:.1f} s after the last ack")
    assert [h for h in history(stack, b, dconv(a, b)) if h["id"] in [m["id"] for m in sent]] == []
    for x in (a1, b1, b2):
        x.close()


def test_device_policy_keeps_what_a_device_has_not_acked(stack, r, db):
    """Negative with a live control: a conversation where every device acked
    is emptied by the sweeper while the one with an unacknowledged device
    keeps its message."""
    a, b, c = uid("a"), uid("b"), uid("c")
    for u in (b, c):
        assert api(stack, u, "PUT", "/settings", {"history": "device"})[0] == 200
    a1, b1, b2, c1 = ws(stack, a), ws(stack, b, "phone"), ws(stack, b, "tablet"), ws(stack, c)
    mb = ack_of(a1, send(a1, b, "wait for the tablet"))
    mc = ack_of(a1, send(a1, c, "control"))
    gb = msgs(b1, 1)[0]
    msgs(b2, 1)
    gc = msgs(c1, 1)[0]
    stored(db, mb["id"])
    stored(db, mc["id"])
    b1.send_json({"type": "ack", "cursor": gb["cursor"]})          # the tablet does not ack
    c1.send_json({"type": "ack", "cursor": gc["cursor"]})
    eventually(lambda: absent(r, db, c, mc["id"]), timeout=20, what="the control removed")
    # the sweeper has passed over the shards since; make sure of one more round
    time.sleep(2)
    assert db.messages.find_one({"_id": mb["id"]})["body"] == "wait for the tablet"
    assert [m for m in r.zrange("chat:{u:%s}:inbox" % b, 0, -1) if mb["id"] in m]
    for x in (a1, b1, b2, c1):
        x.close()


def test_delete_a_whole_conversation_for_me(stack, r, db):
    a, b = uid("a"), uid("b")
    conv = dconv(a, b)
    a1, b1, b2 = ws(stack, a), ws(stack, b, "phone"), ws(stack, b, "tablet")
    sent = [ack_of(a1, send(a1, b, f"old {i}")) for i in range(3)]
    msgs(b1, 3)
    msgs(b2, 3)
    for m in sent:
        stored(db, m["id"])
    st, res = api(stack, b, "DELETE", f"/conversations/{conv}", device="phone")
    assert st == 200 and res == {"conv": conv, "upto": 3, "for": "me"}, res
    t = next_of(b2, "deleted")
    assert t["for"] == "me" and t["conv"] == conv and t["upto"] == 3 and "id" not in t and t["cursor"] > 0
    eventually(lambda: history(stack, b, conv) == [], what="b's history emptied")
    st, lst = api(stack, b, "GET", "/conversations")
    assert conv not in [c["conv"] for c in lst["conversations"]], lst
    # the peer keeps everything
    assert [m["id"] for m in history(stack, a, conv)] == [m["id"] for m in reversed(sent)]
    assert conv in [c["conv"] for c in api(stack, a, "GET", "/conversations")[1]["conversations"]]
    # a new message: the conversation is back for b, with only what came after
    new = ack_of(a1, send(a1, b, "new"))
    msgs(b1, 1)
    stored(db, new["id"])
    eventually(lambda: [m["id"] for m in history(stack, b, conv)] == [new["id"]], what="only the new one")
    eventually(lambda: conv in [c["conv"] for c in api(stack, b, "GET", "/conversations")[1]["conversations"]],
               what="listed again")
    row = [c for c in api(stack, b, "GET", "/conversations")[1]["conversations"] if c["conv"] == conv][0]
    assert row["unread"] == 1, row
    # errors
    st, e = api(stack, uid("c"), "DELETE", f"/conversations/{conv}")
    assert st == 403 and e["code"] == "forbidden", e
    st, e = api(stack, b, "DELETE", f"/conversations/{dconv(b, uid('z'))}")
    assert st == 404 and e["code"] == "not_found", e
    st, e = api(stack, b, "DELETE", "/conversations/nonsense")
    assert st == 400, e
    for x in (a1, b1, b2):
        x.close()


def test_deletions_have_a_budget_per_user(stack):
    """Every client action has a budget: deletions (the rest role's
    delete_rate_limit, 60 a minute and a burst of 30 by default, a token
    bucket in Redis per user) answer 429 rate_limited with retry_after
    beyond it; another user is not affected."""
    a, b, c = uid("a"), uid("b"), uid("c")
    conv = dconv(a, b)
    t0, answers = time.time(), []
    while len(answers) < 120:
        st, e = delete(stack, a, "999999999", conv)
        answers.append(st)
        if st == 429:
            assert e["code"] == "rate_limited" and e["retry_after"] >= 1, e
            break
        assert st == 404 and e["code"] == "not_found", e     # within the budget: looked up
    took = time.time() - t0
    assert answers[-1] == 429, answers
    n = len(answers) - 1
    # the burst went through, then at most the refill (1 a second) more
    assert 30 <= n <= 30 + took + 2, (n, took)
    # per user: someone else is answered as before
    st, e = delete(stack, c, "999999999", dconv(c, b))
    assert st == 404 and e["code"] == "not_found", e
    # the conversation delete takes from the same budget: it gets past the
    # budget only on tokens that came back since (1 a second), and is then
    # looked up: 404, this conversation has no messages
    sts, t1 = [], time.time()
    while len(sts) < 30:
        st, e = api(stack, a, "DELETE", f"/conversations/{conv}")
        sts.append(st)
        if st == 429:
            assert e["code"] == "rate_limited", e
            break
    assert sts[-1] == 429 and all(x == 404 for x in sts[:-1]), sts
    assert len(sts) - 1 <= 1 + (time.time() - t1) + 1, (sts, time.time() - t1)


def test_delete_for_me_of_the_newest_message_leaves_my_conversation_list(stack, db):
    """Delete for me of a conversation's newest message: my conversation
    list shows the message before it (the one I have not hidden), the
    peer's list still shows the deleted one; a newer message is the newest
    again for both."""
    a, b = uid("a"), uid("b")
    conv = dconv(a, b)
    a1 = ws(stack, a)
    ack_of(a1, send(a1, b, "first"))
    m2 = ack_of(a1, send(a1, b, "second"))
    stored(db, m2["id"])

    def last_of(user):
        st, body = api(stack, user, "GET", "/conversations")
        assert st == 200, body
        rows = [c for c in body["conversations"] if c["conv"] == conv]
        return rows[0]["last"] if rows else None

    eventually(lambda: (last_of(b) or {}).get("id") == m2["id"], what="b's list at the second message")
    st, res = delete(stack, b, m2["id"], conv, what="me")
    assert st == 200, res
    last = eventually(lambda: (lambda x: x if x and x.get("id") != m2["id"] else None)(last_of(b)),
                      what="b's list without the hidden message")
    assert last["body"] == "first" and last["seq"] == m2["seq"] - 1, last
    assert last_of(a)["id"] == m2["id"] and last_of(a)["body"] == "second"      # the peer's: unchanged
    m3 = ack_of(a1, send(a1, b, "third"))
    eventually(lambda: (last_of(b) or {}).get("id") == m3["id"], what="a newer message is the newest again")
    a1.close()


@redis_only
def test_a_long_sweep_does_not_hold_up_persistence(stack, r, db):
    """The sweeper runs in its own thread with its own clients: a range
    delete on FerretDB scans the whole collection (about 35 s at 1,000,000
    documents), and persistence must go on meanwhile. 150,000 expired
    documents are seeded straight into MongoDB and chat:{s<s>}:exp (one
    round's delete then takes seconds); a message sent while that round is
    in MongoDB is stored before the round ends (its members are still all
    in the sets when the message's document is there). Then the sweeper
    removes every seeded document. On the design before (the sweep between
    persist batches) the message waited for the round."""
    n = 150000
    tag = uuid.uuid4().hex[:8]
    old = int(time.time() * 1000) - 10 * 86400000
    due = old + 86400000                            # the seeded scores: due .. due + n, ours alone
    docs, members = [], {}
    for i in range(n):
        a, b = f"sw{tag}a{i % 100}", f"sw{tag}b{i % 100}"
        conv, mid = dconv(a, b), f"sw{tag}{i:07d}"
        docs.append({"_id": mid, "conv": conv, "seq": i // 100 + 1, "from": a, "to": b, "body": "expired",
                     "kind": "text", "ts": old + i,
                     "expire_at": datetime.datetime.fromtimestamp((due + i) / 1000, datetime.timezone.utc)})
        members.setdefault(shard(conv), {})[f"{mid}|{conv}|{i // 100 + 1}|{old + i}|{a}"] = due + i
    for k in range(0, n, 10000):
        db.messages.insert_many(docs[k:k + 10000], ordered=False)
    ours = lambda: sum(r.zcount("chat:{s%d}:exp" % s, due, due + n) for s in range(SHARDS))   # noqa: E731
    p = r.pipeline(transaction=False)
    for s, m in members.items():
        m = list(m.items())
        for k in range(0, len(m), 5000):
            p.zadd("chat:{s%d}:exp" % s, dict(m[k:k + 5000]))
    p.execute()
    time.sleep(1.0)                                 # the round has read its members and is in MongoDB
    a, b = uid("a"), uid("b")
    a1 = ws(stack, a)
    t0 = time.time()
    m = ack_of(a1, send(a1, b, "stored while the sweep runs"))
    stored(db, m["id"])
    took, during = time.time() - t0, ours()
    print(f"stored {took:.1f} s after the send; {n - during} of {n} seeded members gone by then")
    # the sweep between persist batches (before) stored it only after the
    # round, its ZREMs included: some members would be gone by then
    assert during == n, "the round had ended before the message was stored"
    eventually(lambda: ours() == 0, timeout=180, interval=1, what="the seeded messages swept")
    assert db.messages.count_documents({"_id": {"$regex": f"^sw{tag}"}}) == 0
    a1.close()
