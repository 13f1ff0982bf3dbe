"""Clients (issue 15): CORS and cache headers of the HTTP endpoints, the dev
sign-in, and the JavaScript SDK, terminal client and web app against the
stack pytest started (the node tests run as subprocesses and must pass)."""
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import pytest

from chatlib import ROOT

JS = os.path.join(ROOT, "clients", "js")


def _node_env(stack, **extra):
    env = dict(os.environ)
    env.update(CHAT_HTTP_URL=stack.http, CHAT_JWT_SECRET=stack.secret, **extra)
    return env


def _node_test(stack, path, timeout, **extra):
    r = subprocess.run(["node", "--test", "--test-timeout=120000", path], cwd=JS,
                       env=_node_env(stack, **extra), capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    passed = re.search(r"^# pass (\d+)", out, re.M)
    failed = re.search(r"^# fail (\d+)", out, re.M)
    assert r.returncode == 0 and failed and failed.group(1) == "0", out[-6000:]
    return int(passed.group(1)), out


@pytest.fixture(scope="module", autouse=True)
def _sdk_built():
    # the node tests import clients/js/dist; `make clients` builds it
    subprocess.run(["make", "-s", "clients"], cwd=ROOT, check=True)


def _raw(stack, method, path, headers=None, body=None):
    req = urllib.request.Request(stack.http.rsplit("/chat", 1)[0] + path, method=method,
                                 data=body.encode() if isinstance(body, str) else body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _origin(stack):
    return f"http://localhost:{stack.port}"      # in the stack's chat_allowed_origins


@pytest.mark.parametrize("path,methods", [
    ("/chat/send", "POST"), ("/chat/ack", "POST"), ("/chat/read", "POST"), ("/chat/typing", "POST"),
    ("/chat/poll", "GET"), ("/chat/presence?user=bob", "GET, HEAD"),
    ("/chat/history?conv=d:alice:bob", "GET, POST"), ("/chat/conversations", "GET, POST"),
    ("/chat/groups", "GET, POST"),
])
def test_preflight_allowed_origin(stack, path, methods):
    st, h, body = _raw(stack, "OPTIONS", path, {"Origin": _origin(stack),
                       "Access-Control-Request-Method": methods.split(",")[0],
                       "Access-Control-Request-Headers": "authorization,content-type"})
    assert st == 204 and body == b""               # before chat_auth: no 401 for a preflight
    assert h["Access-Control-Allow-Origin"] == _origin(stack)
    assert h["Access-Control-Allow-Methods"] == methods
    allowed = [x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")]
    assert "authorization" in allowed and "content-type" in allowed
    assert "Origin" in h.get_all("Vary")
    assert h["Allow"] == methods + ", OPTIONS"


def test_preflight_other_origin_gets_no_cors(stack):
    for path in ("/chat/send", "/chat/history?conv=d:a:b"):
        st, h, _ = _raw(stack, "OPTIONS", path, {"Origin": "https://evil.example",
                        "Access-Control-Request-Method": "POST"})
        assert st == 204
        assert h["Access-Control-Allow-Origin"] is None and h["Access-Control-Allow-Methods"] is None
        assert "Origin" in h.get_all("Vary")


def test_answers_carry_cors_and_no_store(stack):
    tok = stack.token("cors-alice")
    auth = {"Authorization": f"Bearer {tok}", "Origin": _origin(stack)}
    st, h, b = _raw(stack, "POST", "/chat/send", {**auth, "Content-Type": "application/json"},
                    json.dumps({"client_id": "c-cors", "to": "cors-bob", "body": "hi"}))
    assert st == 200 and json.loads(b)["type"] == "ack"
    assert h["Access-Control-Allow-Origin"] == _origin(stack)
    assert "Retry-After" in h["Access-Control-Expose-Headers"]
    assert h["Cache-Control"] == "no-store"
    for path in ("/chat/poll?cursor=0&timeout=0", "/chat/presence?user=cors-bob", "/chat/conversations",
                 "/chat/history?conv=d:cors-alice:cors-bob"):
        st, h, _ = _raw(stack, "GET", path, auth)
        assert st == 200, path
        assert h["Access-Control-Allow-Origin"] == _origin(stack), path
        assert h.get_all("Cache-Control") == ["no-store"], path
    # errors too: a browser must be able to read a 401 to refresh its token
    st, h, _ = _raw(stack, "GET", "/chat/history?conv=d:a:b", {"Origin": _origin(stack)})
    assert st == 401 and h["Access-Control-Allow-Origin"] == _origin(stack)
    st, h, _ = _raw(stack, "POST", "/chat/ack", {"Origin": "https://evil.example", "Authorization": f"Bearer {tok}",
                    "Content-Type": "application/json"}, '{"cursor":0}')
    assert st == 204 and h["Access-Control-Allow-Origin"] is None


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/chat/send", "POST, OPTIONS"), ("POST", "/chat/poll", "GET, OPTIONS"),
    ("POST", "/chat/presence?user=x", "GET, HEAD, OPTIONS"), ("POST", "/chat/ws", "GET"),
])
def test_405_has_allow(stack, method, path, allow):
    st, h, b = _raw(stack, method, path, {"Authorization": f"Bearer {stack.token('alice')}"}, b"" if method == "POST" else None)
    assert st == 405 and json.loads(b)["code"] == "bad_request"
    assert h["Allow"] == allow


def test_dev_sign_in(stack):
    st, _, b = _raw(stack, "GET", "/dev/token?user=dev-alice&device=web1&ttl=60")
    assert st == 200
    d = json.loads(b)
    assert d["user"] == "dev-alice" and d["device"] == "web1" and d["exp"] - time.time() <= 61
    st, _, b = _raw(stack, "GET", "/chat/poll?timeout=0", {"Authorization": f"Bearer {d['token']}"})
    assert st == 200, b                            # nginx accepts what the worker signed
    for bad in ("user=", "user=a%20b", "user=ok&device=" + "d" * 33, "user=ok&ttl=0", "user=ok&ttl=86401"):
        st, _, b = _raw(stack, "GET", "/dev/token?" + bad)
        assert st == 400 and json.loads(b)["code"] == "bad_request", bad


def test_web_app_is_served(stack):
    st, h, b = _raw(stack, "GET", "/")
    assert st == 200 and b"<title>ngx-chat</title>" in b and h["Content-Type"].startswith("text/html")
    st, h, b = _raw(stack, "GET", "/sdk/client.js")
    assert st == 200 and h["Content-Type"].startswith("text/javascript") and b"class ChatClient" in b


def test_sdk_against_the_stack(stack):
    n, _ = _node_test(stack, "test/integration/", timeout=300)
    assert n >= 8


def test_web_app_in_a_browser(stack):
    shots = os.path.join(ROOT, "docs") if stack.env.get("CHAT_QUEUE") == "redis" else "/tmp"
    n, _ = _node_test(stack, "test/browser/", timeout=400, CHAT_SHOTS_DIR=shots)
    assert n == 5
    if shots.endswith("docs"):
        for f in ("web-signin.png", "web-chat.png", "web-offline.png", "web-group.png"):
            p = os.path.join(shots, f)
            assert os.path.getsize(p) > 5000 and time.time() - os.path.getmtime(p) < 600, p


class _Cli:
    def __init__(self, stack, user, peer):
        base = stack.http.rsplit("/chat", 1)[0]
        self.p = subprocess.Popen(["node", os.path.join(JS, "bin", "ngx-chat.mjs"), "--url", base,
                                   "--user", user, "--to", peer], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def say(self, text):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def wait(self, pattern, timeout=15):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if any(re.search(pattern, x) for x in self.lines):
                return
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def close(self):
        self.p.stdin.close()
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()


def test_terminal_client_two_users(stack):
    sfx = str(int(time.time() * 1000))[-6:]
    a, b = f"talice{sfx}", f"tbob{sfx}"
    ca = _Cli(stack, a, b)
    cb = _Cli(stack, b, a)
    try:
        ca.wait(r"^\* connected \(websocket\) as " + a)
        cb.wait(r"^\* connected \(websocket\) as " + b)
        ca.wait(rf"^\* {b} is online")
        ca.say("hello from the terminal")
        ca.wait(r"^  ✓ sent #1$")
        cb.wait(rf"^#1 {a}: hello from the terminal$")
        ca.wait(rf"✓✓ read \(blue\) up to #1 by {b}")      # bob's terminal shows it: read
        cb.say("hi back")
        ca.wait(rf"^#2 {b}: hi back$")
        cb.close()
        ca.wait(rf"^\* {b} is offline, last seen")
    finally:
        ca.close()
        cb.close()
