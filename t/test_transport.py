"""Issue 3: the transport. WebSocket (RFC 6455) and long-poll sessions,
authentication, Redis in nginx's event loop, registry, presence, typing,
protection, status counters. Everything against the real stack."""
import json
import os
import socket
import struct
import threading
import time

import pytest

from chatlib import make_jwt
from wsclient import WS, HandshakeError, Closed, frame


def ws(stack, user="alice", device=None, path=None, **kw):
    c = WS(stack.host, stack.port, path or stack.ws_path,
           token=stack.token(user, device) if "token" not in kw else kw.pop("token"), **kw)
    c.hello = c.recv()
    assert c.hello["type"] == "hello"
    return c


def uniq(prefix):
    return f"{prefix}{time.time_ns() % 10**12}"


# --- handshake and authentication -------------------------------------------

def test_hello_names_user_device_cursor_heartbeat(stack):
    c = ws(stack, "alice", "phone")
    assert c.hello == {"type": "hello", "user": "alice", "device": "phone", "cursor": 0, "heartbeat": 30}
    c.close()
    d = ws(stack, "alice")
    assert d.hello["device"] == "default"
    d.close()


def test_bearer_header_works_too(stack):
    c = WS(stack.host, stack.port, stack.ws_path, token=None,
           headers={"Authorization": "Bearer " + stack.token("carol", "tab")})
    assert c.recv() == {"type": "hello", "user": "carol", "device": "tab", "cursor": 0, "heartbeat": 30}
    c.close()


@pytest.mark.parametrize("case", ["missing", "garbage", "bad_signature", "expired", "alg_none",
                                  "alg_hs512", "not_yet_valid", "bad_sub", "no_exp"])
def test_bad_tokens_get_401_with_an_error_object(stack, case):
    now = int(time.time())
    tokens = {
        "missing": None,
        "garbage": "not.a.jwt",
        "bad_signature": make_jwt("wrong-secret", {"sub": "alice", "exp": now + 60}),
        "expired": make_jwt(stack.secret, {"sub": "alice", "exp": now - 10}),
        "alg_none": make_jwt(stack.secret, {"sub": "alice", "exp": now + 60}, header={"alg": "none"}, sign=False),
        "alg_hs512": make_jwt(stack.secret, {"sub": "alice", "exp": now + 60}, header={"alg": "HS512"}),
        "not_yet_valid": make_jwt(stack.secret, {"sub": "alice", "exp": now + 600, "nbf": now + 300}),
        "bad_sub": make_jwt(stack.secret, {"sub": "al ice", "exp": now + 60}),
        "no_exp": make_jwt(stack.secret, {"sub": "alice"}),
    }
    with pytest.raises(HandshakeError) as e:
        WS(stack.host, stack.port, stack.ws_path, token=tokens[case])
    assert e.value.status == 401
    assert e.value.body["type"] == "error" and e.value.body["code"] == "unauthorized"
    # long-poll and the REST endpoints refuse it the same way
    hdrs = {"Authorization": "Bearer " + tokens[case]} if tokens[case] else {}
    st, _, body = stack.request("GET", stack.http + "/poll?timeout=0", headers=hdrs)
    assert st == 401 and body["code"] == "unauthorized"


def _raw_handshake(stack, lines):
    s = socket.create_connection((stack.host, stack.port), timeout=5)
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(4096)
        if not d:
            break
        data += d
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    hdrs = {l.split(b":")[0].strip().lower().decode(): l.split(b":", 1)[1].strip().decode()
            for l in head.split(b"\r\n")[1:]}
    if status == 101:
        s.close()
        return status, hdrs, None
    n = int(hdrs.get("content-length", 0))
    while len(body) < n:
        d = s.recv(4096)
        if not d:
            break
        body += d
    s.close()
    return status, hdrs, json.loads(body) if body else None


def test_handshake_validation(stack):
    tok = stack.token("alice")
    base = [f"GET {stack.ws_path}?token={tok} HTTP/1.1", f"Host: {stack.host}"]
    good = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13"]
    # not an upgrade at all
    st, h, body = _raw_handshake(stack, base)
    assert st == 426 and h["upgrade"] == "websocket" and body["code"] == "bad_request"
    # wrong version
    st, h, body = _raw_handshake(stack, base + good[:3] + ["Sec-WebSocket-Version: 8"])
    assert st == 426 and h["sec-websocket-version"] == "13"
    # bad key
    st, h, body = _raw_handshake(stack, base + good[:2] + ["Sec-WebSocket-Key: short", good[3]])
    assert st == 400 and body["code"] == "bad_request"
    # missing Connection: upgrade
    st, h, body = _raw_handshake(stack, base + [good[0], "Connection: keep-alive"] + good[2:])
    assert st == 426
    # token lists in Connection are understood
    st, h, _ = _raw_handshake(stack, base + [good[0], "Connection: keep-alive, Upgrade"] + good[2:])
    assert st == 101 and h["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    # not GET
    st, h, body = _raw_handshake(stack, [f"POST {stack.ws_path}?token={tok} HTTP/1.1", f"Host: {stack.host}",
                                         "Content-Length: 0"] + good)
    assert st == 405
    # bad cursor
    st, h, body = _raw_handshake(stack, [f"GET {stack.ws_path}?token={tok}&cursor=-1 HTTP/1.1",
                                         f"Host: {stack.host}"] + good)
    assert st == 400 and "cursor" in body["message"]


def test_origin_allow_list(stack):
    path = "/chat/test/ws-origin"
    c = ws(stack, path=path, headers={"Origin": "https://chat.example.com"})
    c.close()
    with pytest.raises(HandshakeError) as e:
        WS(stack.host, stack.port, path, token=stack.token("alice"), headers={"Origin": "https://evil.example"})
    assert e.value.status == 403 and e.value.body["code"] == "forbidden"
    ws(stack, path=path).close()    # no Origin: not a browser


def test_user_from_an_nginx_variable(stack):
    path = "/chat/test/ws-upstream-auth"
    c = WS(stack.host, stack.port, path, token=None, query="device=laptop", headers={"X-Test-User": "dave"})
    assert c.recv() == {"type": "hello", "user": "dave", "device": "laptop", "cursor": 0, "heartbeat": 30}
    c.close()
    with pytest.raises(HandshakeError) as e:
        WS(stack.host, stack.port, path, token=None)
    assert e.value.status == 401
    with pytest.raises(HandshakeError) as e:
        WS(stack.host, stack.port, path, token=None, headers={"X-Test-User": "bad user!"})
    assert e.value.status == 401


# --- frames -----------------------------------------------------------------

def test_ping_pong_and_bad_frames_keep_the_connection(stack):
    c = ws(stack)
    c.send_json({"type": "ping"})
    assert c.recv() == {"type": "pong"}
    c.send_text("{not json")
    e = c.recv()
    assert e["type"] == "error" and e["code"] == "bad_request"
    c.send_json({"type": "launch_rockets"})
    assert c.recv()["code"] == "bad_request"
    c.send_json({"type": "watch", "users": ["ok", "not ok"]})
    assert c.recv()["code"] == "bad_request"
    c.send_json({"type": "watch", "users": [f"u{i}" for i in range(101)]})
    assert c.recv()["code"] == "too_large"
    c.send_json({"type": "ping"})
    assert c.recv() == {"type": "pong"}
    c.close()


def test_websocket_ping_is_answered_with_the_same_payload(stack):
    c = ws(stack)
    c.send_raw(frame(0x9, b"are you there"))
    op, payload = c.recv_frame()
    assert (op, payload) == (0xA, b"are you there")
    c.close()


def test_fragmented_message_with_interleaved_control_frames(stack):
    c = ws(stack)
    c.send_raw(frame(0x1, '{"type"', fin=False) + frame(0x9, b"mid")
               + frame(0x0, ':"pi', fin=False) + frame(0x0, 'ng"}', fin=True))
    op, payload = c.recv_frame()
    assert (op, payload) == (0xA, b"mid")
    assert c.recv() == {"type": "pong"}
    # a multi-byte character split across fragments
    c.send_raw(frame(0x1, b'{"type":"ping","x":"\xe2\x82', fin=False) + frame(0x0, b'\xac"}'))
    assert c.recv() == {"type": "pong"}
    c.close()


@pytest.mark.parametrize("name,data,code", [
    ("unmasked", frame(0x1, '{"type":"ping"}', mask=False), 1002),
    ("reserved_bits", frame(0x1, '{"type":"ping"}', rsv=4), 1002),
    ("reserved_opcode", frame(0x3, b"x"), 1002),
    ("control_too_long", frame(0x9, b"x" * 126), 1002),
    ("fragmented_control", frame(0x9, b"x", fin=False), 1002),
    ("continuation_without_start", frame(0x0, b"x"), 1002),
    ("new_message_inside_fragmented", frame(0x1, b"{", fin=False) + frame(0x1, b"}"), 1002),
    ("invalid_utf8", frame(0x1, b'{"type":"ping","x":"\xc3\x28"}'), 1007),
    ("truncated_utf8_at_end", frame(0x1, b'{"x":"\xe2\x82', fin=False) + frame(0x0, b"", fin=True), 1007),
    ("binary", frame(0x2, b"\x00\x01"), 1003),
    ("bad_close_code", frame(0x8, struct.pack("!H", 1005)), 1002),
])
def test_protocol_errors_close_with_the_right_code(stack, name, data, code):
    c = ws(stack)
    c.send_raw(data)
    assert c.expect_close() == code
    assert c.wait_eof()
    c.close()


def test_message_over_the_limit_closes_with_1009(stack):
    c = ws(stack, path="/chat/test/ws-short")     # chat_max_message 1k
    c.send_raw(frame(0x1, b"x" * 600, fin=False) + frame(0x0, b"y" * 600))
    assert c.expect_close() == 1009
    c.close()
    # announced length alone is enough: the payload never needs to arrive
    c = ws(stack, path="/chat/test/ws-short")
    c.send_raw(frame(0x1, b"", length=1 << 40)[:14])
    assert c.expect_close() == 1009
    c.close()


def test_client_close_is_echoed_then_the_server_closes(stack):
    c = ws(stack)
    c.send_raw(frame(0x8, struct.pack("!H", 1000) + b"bye"))
    op, payload = c.recv_frame()
    assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1000
    assert c.wait_eof()
    c.close()


def test_body_too_large_is_an_error_frame_not_a_close(stack):
    c = ws(stack, path="/chat/test/ws-short")     # chat_max_body 50
    c.send_json({"type": "send", "client_id": "k1", "to": "bob", "body": "é" * 51})
    e = c.recv()
    assert e["code"] == "too_large" and e["client_id"] == "k1"
    c.send_json({"type": "ping"})
    assert c.recv() == {"type": "pong"}
    c.close()


# --- timeouts and bounds ------------------------------------------------------

def test_idle_connection_without_heartbeat_is_closed(stack):
    c = ws(stack, path="/chat/test/ws-short")     # heartbeat 1s, idle 2s
    assert c.hello["heartbeat"] == 1
    t0 = time.time()
    assert c.expect_close(timeout=6) == 1001
    assert 1.5 < time.time() - t0 < 5
    c.close()


def test_heartbeats_keep_the_connection(stack):
    c = ws(stack, path="/chat/test/ws-short")
    for _ in range(8):                              # 4 s, twice the idle timeout
        time.sleep(0.5)
        c.send_json({"type": "ping"})
        assert c.recv() == {"type": "pong"}
    c.close()


def _status(stack):
    st, _, body = stack.request("GET", stack.env["CHAT_STATUS_URL"])
    assert st == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = int(v)
    return out


def test_slow_consumer_is_cut_off_alone(stack):
    st0 = _status(stack)
    before = st0['ngx_chat_closed_total{reason="slow_consumer"}']
    bystander = ws(stack, "bystander")
    slow = socket.create_connection((stack.host, stack.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c = WS.__new__(WS)
    c.sock, c.buf = slow, b""
    # handshake by hand on the small-buffer socket
    import base64
    key = base64.b64encode(os.urandom(16)).decode()
    slow.sendall((f"GET /chat/test/ws-short?token={stack.token('slowpoke')} HTTP/1.1\r\nHost: x\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    # never read; ask for many large pongs (outbound limit: 8 frames, 4k)
    big = frame(0x9, b"p" * 125)
    deadline = time.time() + 20
    closed = False
    slow.settimeout(0.5)
    while time.time() < deadline and not closed:
        try:
            slow.sendall(big * 200)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        except socket.timeout:
            pass
        if _status(stack)['ngx_chat_closed_total{reason="slow_consumer"}'] > before:
            closed = True
    if not closed:   # say how it was closed instead, if it was (a rare failure on CI)
        st1 = _status(stack)
        moved = {k: st1[k] - st0.get(k, 0) for k in st1 if k.startswith("ngx_chat_closed_total") and st1[k] != st0.get(k, 0)}
        raise AssertionError(f"the slow consumer was never cut off; close counters that moved: {moved}")
    slow.close()
    bystander.send_json({"type": "ping"})
    assert bystander.recv() == {"type": "pong"}
    bystander.close()


def test_connections_per_user_are_bounded(stack):
    user = uniq("many")
    conns = [ws(stack, user, f"d{i}") for i in range(16)]   # chat_max_connections_per_user 16
    with pytest.raises(HandshakeError) as e:
        WS(stack.host, stack.port, stack.ws_path, token=stack.token(user, "one-too-many"))
    assert e.value.status == 429 and e.value.body["code"] == "rate_limited"
    conns.pop().close()
    time.sleep(0.3)
    ws(stack, user, "now-fits").close()
    for c in conns:
        c.close()


# --- presence and typing ------------------------------------------------------

def test_presence_watch_online_offline_and_http(stack):
    bob = uniq("bob")
    w = ws(stack, "watcher")
    w.send_json({"type": "watch", "users": [bob]})
    assert w.recv_type("presence") == {"type": "presence", "user": bob, "online": False, "last_seen": None}
    b1 = ws(stack, bob, "phone")
    assert w.recv_type("presence") == {"type": "presence", "user": bob, "online": True, "last_seen": None}
    b2 = ws(stack, bob, "laptop")       # a second device changes nothing
    st, _, p = stack.request("GET", f"{stack.http}/presence?user={bob}",
                             headers={"Authorization": "Bearer " + stack.token("watcher")})
    assert st == 200 and p == {"user": bob, "online": True, "last_seen": None}
    b1.close()
    time.sleep(0.3)
    b2.close()
    t = int(time.time() * 1000)
    m = w.recv_type("presence")
    assert m["online"] is False and abs(m["last_seen"] - t) < 3000
    st, _, p = stack.request("GET", f"{stack.http}/presence?user={bob}",
                             headers={"Authorization": "Bearer " + stack.token("watcher")})
    assert p == {"user": bob, "online": False, "last_seen": m["last_seen"]}
    w.send_json({"type": "unwatch", "users": [bob]})
    b3 = ws(stack, bob)
    w.send_json({"type": "ping"})
    assert w.recv() == {"type": "pong"}     # no presence event after unwatch
    b3.close()
    w.close()
    st, _, p = stack.request("GET", f"{stack.http}/presence?user=bad%20id",
                             headers={"Authorization": "Bearer " + stack.token("watcher")})
    assert st == 400


def test_typing_reaches_every_device_of_the_target_only(stack):
    a, b = uniq("ta"), uniq("tb")
    b1, b2, other = ws(stack, b, "phone"), ws(stack, b, "laptop"), ws(stack, uniq("other"))
    sender = ws(stack, a)
    sender.send_json({"type": "typing", "to": b})
    conv = f"d:{min(a, b)}:{max(a, b)}"
    for dev in (b1, b2):
        assert dev.recv_type("typing") == {"type": "typing", "conv": conv, "from": a}
    other.send_json({"type": "ping"})
    assert other.recv() == {"type": "pong"}
    # over HTTP too (after chat_typing_interval, 2 s: one indicator per
    # sender and conversation per interval is relayed)
    time.sleep(2.1)
    st, _, _ = stack.request("POST", stack.http + "/typing", body={"to": b},
                             headers={"Authorization": "Bearer " + stack.token(a)})
    assert st == 204
    assert b1.recv_type("typing")["from"] == a
    st, _, body = stack.request("POST", stack.http + "/typing", body={"to": "no good"},
                                headers={"Authorization": "Bearer " + stack.token(a)})
    assert st == 400 and body["code"] == "bad_request"
    for c in (b1, b2, other, sender):
        c.close()


# --- long-poll ------------------------------------------------------------------

def test_long_poll_times_out_empty(stack):
    tok = stack.token(uniq("poller"))
    t0 = time.time()
    st, _, body = stack.request("GET", stack.http.replace("/chat", "/chat/test/poll-short") + "?cursor=7",
                                headers={"Authorization": "Bearer " + tok})
    assert st == 200 and body == {"events": [], "cursor": 7}
    assert 0.8 < time.time() - t0 < 3
    st, _, body = stack.request("GET", stack.http + "/poll?timeout=61", headers={"Authorization": "Bearer " + tok})
    assert st == 400
    st, _, body = stack.request("GET", stack.http + "/poll?cursor=x", headers={"Authorization": "Bearer " + tok})
    assert st == 400


def test_long_poll_and_websocket_devices_of_one_user(stack):
    u, sender = uniq("lp"), uniq("snd")
    phone = ws(stack, u, "phone")
    result = {}

    def poll():
        result["r"] = stack.request("GET", stack.http + "/poll?cursor=0&timeout=10",
                                    headers={"Authorization": "Bearer " + stack.token(u, "browser")}, timeout=15)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    s = ws(stack, sender)
    s.send_json({"type": "typing", "to": u})
    t.join(12)
    st, _, body = result["r"]
    conv = f"d:{min(u, sender)}:{max(u, sender)}"
    assert st == 200 and body["events"] == [{"type": "typing", "conv": conv, "from": sender}]
    assert phone.recv_type("typing")["from"] == sender
    phone.close()
    s.close()


# --- status ---------------------------------------------------------------------

def test_status_counts_connections(stack):
    # other tests' connections may still be closing: reason with bounds
    key = 'ngx_chat_connections{transport="websocket"}'
    before = _status(stack)
    conns = [ws(stack, f"status-{i}") for i in range(10)]
    mid = _status(stack)
    assert before[key] + 10 >= mid[key] >= 10
    assert mid["ngx_chat_sessions_total"] >= before["ngx_chat_sessions_total"] + 10
    assert mid["ngx_chat_redis_connected_workers"] >= 1
    assert mid['ngx_chat_frames_total{direction="out"}'] >= before['ngx_chat_frames_total{direction="out"}'] + 10
    for c in conns:
        c.close()
    deadline = time.time() + 10
    while _status(stack)[key] > mid[key] - 10 and time.time() < deadline:
        time.sleep(0.1)
    assert _status(stack)[key] <= mid[key] - 10
