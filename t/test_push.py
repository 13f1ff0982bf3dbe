"""Push notifications (issue 14): user settings (GET/PUT /chat/settings and
per-conversation mute), device push registrations (/chat/devices) and the
push role against local HTTP/2 TLS servers that enforce each provider's
contract (t/pushservers.py)."""
import json
import time
import uuid

import pytest


# ---- helpers ------------------------------------------------------------------

def uid(prefix="u"):
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def ukey(user, what):
    return "chat:{u:%s}:%s" % (user, what)


def dconv(a, b):
    return f"d:{min(a, b)}:{max(a, b)}"


def api(stack, user, method, path, body=None, device=None):
    """(status, body) of a request through nginx as user/device."""
    hdrs = {"Authorization": "Bearer " + stack.token(user, device)} if user else {}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    st, _, b = stack.request(method, stack.http + path, body=body, headers=hdrs)
    return st, b


def assert_error(st, b, status, code, text=None):
    assert st == status, b
    assert b["type"] == "error" and b["code"] == code and b["message"], b
    if text:
        assert text in b["message"], b


# ---- settings -------------------------------------------------------------------

DEFAULTS = {"last_seen": "everyone", "preview": False, "tz": "UTC", "quiet": None, "mute": {}, "notify": [],
            "history": "keep"}


def test_settings_defaults_and_merge(stack, r, db):
    u = uid()
    st, b = api(stack, u, "GET", "/settings")
    assert st == 200 and b == DEFAULTS, b
    st, b = api(stack, u, "PUT", "/settings", {"last_seen": "nobody"})
    assert st == 200 and b == dict(DEFAULTS, last_seen="nobody"), b
    # the module reads exactly this field
    assert r.hget(ukey(u, "set"), "last_seen") == "nobody"
    st, b = api(stack, u, "PUT", "/settings",
                {"preview": True, "tz": "Europe/Berlin", "quiet": {"from": "22:00", "to": "07:30"}})
    want = dict(DEFAULTS, last_seen="nobody", preview=True, tz="Europe/Berlin",
                quiet={"from": "22:00", "to": "07:30"})
    assert st == 200 and b == want, b
    assert r.hgetall(ukey(u, "set")) == {"last_seen": "nobody", "preview": "1", "tz": "Europe/Berlin",
                                         "quiet": "1320-450", "history": "keep"}
    doc = db.settings.find_one({"_id": u})
    assert doc["last_seen"] == "nobody" and doc["preview"] is True and doc["tz"] == "Europe/Berlin"
    assert doc["quiet"] == {"from": "22:00", "to": "07:30"}
    st, b = api(stack, u, "GET", "/settings")
    assert st == 200 and b == want
    st, b = api(stack, u, "PUT", "/settings", {"last_seen": "everyone", "quiet": None})
    assert st == 200 and b == dict(want, last_seen="everyone", quiet=None), b
    assert r.hget(ukey(u, "set"), "last_seen") == "everyone"
    assert "quiet" not in r.hgetall(ukey(u, "set"))
    # another user is not affected
    st, b = api(stack, uid(), "GET", "/settings")
    assert b == DEFAULTS


@pytest.mark.parametrize("body, text", [
    ({"last_seen": "friends"}, "last_seen"),
    ({"last_seen": True}, "last_seen"),
    ({"preview": "yes"}, "preview"),
    ({"tz": "Mars/Olympus"}, "tz"),
    ({"tz": "../../etc/passwd"}, "tz"),
    ({"tz": 5}, "tz"),
    ({"quiet": {"from": "25:00", "to": "07:00"}}, "quiet"),
    ({"quiet": {"from": "22:00"}}, "quiet"),
    ({"quiet": {"from": "22:00", "to": "22:00"}}, "differ"),
    ({"quiet": "22-7"}, "quiet"),
    ({"colour": "blue"}, "unknown setting"),
    ({"mute": {}}, "mute"),
    ([1, 2], "JSON object"),
    ("{not json", "JSON object"),
])
def test_settings_validation(stack, r, body, text):
    u = uid()
    st, b = api(stack, u, "PUT", "/settings", {"preview": True})
    assert st == 200
    st, b = api(stack, u, "PUT", "/settings", body)
    assert_error(st, b, 400, "bad_request", text)
    # nothing of a refused request is applied
    st, b = api(stack, u, "GET", "/settings")
    assert b == dict(DEFAULTS, preview=True)
    assert r.hget(ukey(u, "set"), "preview") == "1"


def test_settings_need_auth_and_methods(stack):
    st, b = api(stack, None, "GET", "/settings")
    assert st == 401
    st, b = api(stack, uid(), "DELETE", "/settings")
    assert_error(st, b, 405, "bad_request")


def test_mute_conversation(stack, r, db):
    a, b_ = uid("a"), uid("b")
    conv = dconv(a, b_)
    until = int(time.time() * 1000) + 3600_000
    st, b = api(stack, a, "PUT", f"/settings/mute/{conv}", {"until": until})
    assert st == 200 and b["mute"] == {conv: until}, b
    assert r.hgetall(ukey(a, "mute")) == {conv: str(until)}
    st, b = api(stack, a, "PUT", f"/settings/mute/{conv}", {"until": None})
    assert st == 200 and b["mute"] == {conv: None}, b
    assert r.hget(ukey(a, "mute"), conv) == "0"
    doc = db.settings.find_one({"_id": a})
    assert doc["mute"] == [{"conv": conv, "until": 0}]
    st, b = api(stack, a, "GET", "/settings")
    assert b["mute"] == {conv: None}
    # other settings survive a mute change and vice versa
    st, b = api(stack, a, "PUT", "/settings", {"preview": True})
    assert b["mute"] == {conv: None} and b["preview"] is True
    st, b = api(stack, a, "DELETE", f"/settings/mute/{conv}")
    assert st == 200 and b["mute"] == {} and b["preview"] is True, b
    assert r.hgetall(ukey(a, "mute")) == {}
    # errors
    assert_error(*api(stack, a, "PUT", f"/settings/mute/{dconv(b_, uid('c'))}", {}), 403, "forbidden")
    assert_error(*api(stack, a, "PUT", "/settings/mute/nope", {}), 400, "bad_request", "conversation")
    assert_error(*api(stack, a, "PUT", f"/settings/mute/{conv}", {"until": 5}), 400, "bad_request", "future")
    assert_error(*api(stack, a, "PUT", f"/settings/mute/{conv}", {"until": "x"}), 400, "bad_request")
    assert_error(*api(stack, a, "PUT", f"/settings/mute/{conv}", {"for": 5}), 400, "bad_request")
    assert_error(*api(stack, a, "PUT", f"/settings/mute/g:{uid('g')}", {}), 403, "forbidden")


def test_settings_redis_copy_rebuilt(stack, r):
    u = uid()
    api(stack, u, "PUT", "/settings", {"last_seen": "nobody"})
    r.delete(ukey(u, "set"))
    st, b = api(stack, u, "GET", "/settings")
    assert b["last_seen"] == "nobody"
    assert r.hget(ukey(u, "set"), "last_seen") == "nobody"


# ---- device registrations -------------------------------------------------------

def b64u(b):
    import base64
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def webpush_keys():
    """A browser-side subscription key pair: (private key, p256dh, auth)."""
    import os
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import serialization
    priv = ec.generate_private_key(ec.SECP256R1())
    pub = priv.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return priv, b64u(pub), b64u(os.urandom(16))


def webpush_body(endpoint="https://push.example.test/sub/1"):
    _, p256dh, auth = webpush_keys()
    return {"provider": "webpush", "subscription": {"endpoint": endpoint, "expirationTime": None,
                                                    "keys": {"p256dh": p256dh, "auth": auth}}}


APNS_TOKEN = "a1" * 32
FCM_TOKEN = "fcm-token:" + "A" * 140


def test_register_each_provider_and_list(stack, r, db):
    import json
    u = uid()
    wp = webpush_body()
    st, b = api(stack, u, "PUT", "/devices/web/push", wp, device="web")
    assert st == 200 and b["device"] == "web" and b["push"]["provider"] == "webpush", b
    assert b["push"]["origin"] == "https://push.example.test"
    st, b = api(stack, u, "PUT", "/devices/phone/push",
                {"provider": "apns", "token": APNS_TOKEN, "topic": "com.example.chat", "env": "sandbox"},
                device="phone")
    assert st == 200 and b["push"]["env"] == "sandbox" and b["push"]["topic"] == "com.example.chat", b
    st, b = api(stack, u, "PUT", "/devices/droid/push", {"provider": "fcm", "token": FCM_TOKEN}, device="droid")
    assert st == 200 and b["push"]["provider"] == "fcm", b
    regs = {k: json.loads(v) for k, v in r.hgetall(ukey(u, "push")).items()}
    assert regs == {
        "web": {"provider": "webpush", "endpoint": wp["subscription"]["endpoint"],
                "p256dh": wp["subscription"]["keys"]["p256dh"], "auth": wp["subscription"]["keys"]["auth"]},
        "phone": {"provider": "apns", "token": APNS_TOKEN, "topic": "com.example.chat", "env": "sandbox"},
        "droid": {"provider": "fcm", "token": FCM_TOKEN}}
    assert db.devices.count_documents({"user": u}) == 3
    # apns env defaults to production; a PUT replaces
    st, b = api(stack, u, "PUT", "/devices/phone/push",
                {"provider": "apns", "token": APNS_TOKEN, "topic": "com.example.chat"}, device="phone")
    assert b["push"]["env"] == "production"
    # a device without registration shows up once it acked
    r.hset(ukey(u, "acked"), "tablet", 7)
    st, b = api(stack, u, "GET", "/devices", device="web")
    assert st == 200
    devs = {d["device"]: d for d in b["devices"]}
    assert set(devs) == {"web", "phone", "droid", "tablet"}, b
    assert devs["tablet"]["push"] is None and devs["tablet"]["acked"] == 7
    assert devs["phone"]["push"]["provider"] == "apns" and "token" not in devs["phone"]["push"]
    assert devs["web"]["connected"] is False
    # unregister
    st, b = api(stack, u, "DELETE", "/devices/droid/push", device="droid")
    assert st == 200 and b == {"device": "droid", "push": None}
    assert "droid" not in r.hgetall(ukey(u, "push"))
    assert db.devices.count_documents({"user": u}) == 2
    # Redis lost the registrations: listing restores them from MongoDB
    r.delete(ukey(u, "push"))
    api(stack, u, "GET", "/devices", device="web")
    assert set(r.hgetall(ukey(u, "push"))) == {"web", "phone"}


def test_register_only_own_device(stack):
    u = uid()
    st, b = api(stack, u, "PUT", "/devices/phone/push", {"provider": "fcm", "token": FCM_TOKEN}, device="web")
    assert_error(st, b, 403, "forbidden", "token's device")
    st, b = api(stack, u, "DELETE", "/devices/phone/push", device="web")
    assert_error(st, b, 403, "forbidden")
    # no device in the token: the device is "default"
    st, b = api(stack, u, "PUT", "/devices/default/push", {"provider": "fcm", "token": FCM_TOKEN})
    assert st == 200, b
    assert_error(*api(stack, u, "PUT", "/devices/bad%20id/push", {}, device="web"), 400, "bad_request")
    assert_error(*api(stack, u, "POST", "/devices/web/push", {}, device="web"), 405, "bad_request")
    assert_error(*api(stack, u, "GET", "/devices/web/other", device="web"), 404, "not_found")


def _bad_webpush():
    import os
    priv, p256dh, auth = webpush_keys()
    ok = {"endpoint": "https://push.example.test/x", "keys": {"p256dh": p256dh, "auth": auth}}
    def sub(**kw):
        s = json_copy(ok)
        for k, v in kw.items():
            if k in ("p256dh", "auth"):
                s["keys"][k] = v
            elif v is None:
                s.pop(k)
            else:
                s[k] = v
        return {"provider": "webpush", "subscription": s}
    not_on_curve = b64u(b"\x04" + b"\x01" * 64)
    return [
        (sub(endpoint="http://push.example.test/x"), "https"),
        (sub(endpoint="https://"), "https"),
        (sub(endpoint="https://a b/x"), "https"),
        (sub(endpoint="https://user@host/x"), "https"),
        (sub(endpoint="https://h/" + "x" * 2100), "https"),
        (sub(endpoint=None), "endpoint"),
        (sub(p256dh=b64u(os.urandom(33))), "p256dh"),
        (sub(p256dh=not_on_curve), "p256dh"),
        (sub(p256dh="!!notbase64!!"), "p256dh"),
        (sub(auth=b64u(os.urandom(8))), "auth"),
        (sub(auth=5), "auth"),
        (sub(extra=1), "subscription takes"),
        ({"provider": "webpush"}, "subscription"),
    ]


def json_copy(o):
    import json
    return json.loads(json.dumps(o))


BAD_REGS = [
    ({"provider": "gcm", "token": FCM_TOKEN}, "provider"),
    ({"token": FCM_TOKEN}, "provider"),
    ({"provider": "apns", "token": "zz" * 32, "topic": "com.x"}, "hex"),
    ({"provider": "apns", "token": "ab" * 10, "topic": "com.x"}, "hex"),
    ({"provider": "apns", "token": APNS_TOKEN}, "topic"),
    ({"provider": "apns", "token": APNS_TOKEN, "topic": "com x"}, "topic"),
    ({"provider": "apns", "token": APNS_TOKEN, "topic": "com.x", "env": "dev"}, "env"),
    ({"provider": "apns", "token": APNS_TOKEN, "topic": "com.x", "voip": True}, "apns takes"),
    ({"provider": "fcm", "token": "short"}, "token"),
    ({"provider": "fcm", "token": "x" * 40 + "/"}, "token"),
    ({"provider": "fcm"}, "token"),
]


@pytest.mark.parametrize("i", range(len(BAD_REGS) + 13))
def test_register_validation(stack, r, i):
    cases = BAD_REGS + _bad_webpush()
    body, text = cases[i]
    u = uid()
    st, b = api(stack, u, "PUT", "/devices/d1/push", body, device="d1")
    assert_error(st, b, 400, "bad_request", text)
    assert r.hgetall(ukey(u, "push")) == {}


# ---- the push role against local providers --------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

from chatlib import ROOT  # noqa: E402
from helpers import eventually  # noqa: E402
from pushservers import PushServers  # noqa: E402
from wsclient import WS  # noqa: E402

DELAY = 1.0          # push_delay_ms of the test worker
LEASE = 5.0          # push_lease_ms
PULL_ABOVE = 3       # group_push_limit of the test push worker


class PushWorker:
    """A push worker of our own against the stack, configured for the local providers."""

    def __init__(self, stack, servers):
        self.stack, self.servers = stack, servers
        self.conf = os.path.join(servers.dir, "push-worker.conf")
        base = open(stack.env["CHAT_WORKER_CONF"]).read()
        with open(self.conf, "w") as f:
            f.write(base + servers.worker_conf() + f"push_delay_ms = {int(DELAY * 1000)}\n"
                    f"push_lease_ms = {int(LEASE * 1000)}\npush_timeout_ms = 3000\nnode_id = push-test\n"
                    # groups of more than 3 members are "large" (pull mode) for this worker
                    f"group_push_limit = {PULL_ABOVE}\n")
        self.log = os.path.join(servers.dir, "push-worker.log")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.stack.worker, "--config", self.conf, "--role", "push"],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=self.stack.proc_env)
        n = self.logtext().count("push: consuming the queue") if os.path.exists(self.log) else 0
        eventually(lambda: self.logtext().count("push: consuming the queue") > n, 20, what="push worker")
        self.warm_up()

    def warm_up(self):
        """Ready when a notification went through: with Kafka the worker first
        joins its consumer group (a fixed sleep was sometimes too short, and
        the first test's message then came due late)."""
        user = "warm" + uuid.uuid4().hex[:10]
        token = "fcm:" + b64u(os.urandom(60))
        st, b = api(self.stack, user, "PUT", "/devices/droid/push", {"provider": "fcm", "token": token},
                    device="droid")
        assert st == 200, b
        deadline = time.time() + 60
        while not got(self.servers, fcm=token):
            assert time.time() < deadline, "the push worker never notified: " + self.logtext()[-2000:]
            send(self.stack, "warmer" + uuid.uuid4().hex[:6], user, "warm up")
            end = time.time() + DELAY + 4
            while time.time() < end and not got(self.servers, fcm=token):
                time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        rc = self.proc.returncode if self.proc else 0
        self.proc = None
        return rc

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def logtext(self):
        return open(self.log, errors="replace").read()




def stack_cmd(stack, *args):
    return subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                          env=stack.proc_env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def push(stack):
    # the stack's own push worker (no providers configured) would share the
    # consumer group: ours replaces it for this module
    had_stack_worker = os.path.exists(os.path.join(stack.dir, "pids", "worker-push"))
    if had_stack_worker:
        stack_cmd(stack, "kill", "worker-push")
    port = int(os.environ.get("CHAT_TEST_PORT_BASE", "17300")) + 60
    servers = PushServers(os.path.join(stack.dir, "push"), port)
    w = PushWorker(stack, servers)
    w.start()
    yield w
    rc = w.stop()
    servers.close()
    if had_stack_worker:
        stack_cmd(stack, "up")
    assert rc == 0, w.logtext()[-3000:]
    assert "[error]" not in w.logtext() and "Sanitizer" not in w.logtext(), w.logtext()[-3000:]


@pytest.fixture
def srv(push):
    """The provider servers; every test ends without contract violations and with the worker alive."""
    s = push.servers
    yield s
    assert s.violations() == {}, s.violations()
    assert push.alive(), push.logtext()[-3000:]


def send(stack, frm, to, body, group=None):
    payload = {"client_id": uuid.uuid4().hex, "body": body}
    payload["group" if group else "to"] = group or to
    # the test location without the per-user send budget (60 a minute,
    # burst 10): some tests send dozens from one user
    st, _, b = stack.request("POST", stack.http.replace("/chat", "/chat/test/send-bulk"), body=payload,
                             headers={"Authorization": "Bearer " + stack.token(frm, "laptop")})
    assert st == 200, b
    return b


def register_all(stack, srv, user, apns_token=None, fcm_token=None):
    """web (Web Push), phone (APNs) and droid (FCM) devices for user."""
    sid, sub = srv.webpush.subscribe()
    apns_token = apns_token or os.urandom(32).hex()
    fcm_token = fcm_token or "fcm:" + b64u(os.urandom(60))
    for dev, body in (("web", {"provider": "webpush", "subscription": sub}),
                      ("phone", {"provider": "apns", "token": apns_token, "topic": srv.apns.topic}),
                      ("droid", {"provider": "fcm", "token": fcm_token})):
        st, b = api(stack, user, "PUT", f"/devices/{dev}/push", body, device=dev)
        assert st == 200, b
    return sid, apns_token, fcm_token


def got(srv, sid=None, apns=None, fcm=None):
    out = []
    if sid:
        out += [("webpush", n) for n in srv.webpush.received if n["sub"] == sid]
    if apns:
        out += [("apns", n) for n in srv.apns.received if n["token"] == apns]
    if fcm:
        out += [("fcm", n) for n in srv.fcm.received if n["token"] == fcm]
    return out


def title_of(prov, n):
    if prov == "webpush":
        return n["payload"]["title"], n["payload"]["body"], n["payload"]["badge"]
    if prov == "apns":
        a = n["payload"]["aps"]
        return a["alert"]["title"], a["alert"].get("body", ""), a["badge"]
    m = n["message"]
    return m["notification"]["title"], m["notification"].get("body", ""), m["android"]["notification"]["notification_count"]


def test_offline_device_notified_once_per_device_without_content(stack, srv, push):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    # a live control on the same message (alice's other device gets her
    # copy from the fan-out): push_delay + 1 s counts from when the pipeline
    # had the message, so a loaded machine's queueing is not charged to it
    ctl = WS(stack.host, stack.port, stack.ws_path, token=stack.token(alice, "tablet"))
    assert ctl.recv()["type"] == "hello"
    t0 = time.time()
    send(stack, alice, bob, "the launch code is 0000")
    ctl.recv_type("msg", timeout=10)
    t_live = time.time()
    ctl.close()
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 5, what="three notifications")
    ns = got(srv, sid, at, ft)
    for prov, n in ns:
        assert n["t"] - t_live <= DELAY + 1.0, (prov, n["t"] - t_live, t_live - t0)
        title, body, badge = title_of(prov, n)
        assert title == f"New message from {alice}" and body == "" and badge == 1, (prov, n)
        assert "launch" not in json.dumps(n), n
    # one collapse id per conversation, the same for every provider
    assert len({n["collapse"] for _, n in ns}) == 1
    time.sleep(DELAY + 0.5)
    assert len(got(srv, sid, at, ft)) == 3, "a notification was repeated"


def test_preview_shows_the_body(stack, srv):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    api(stack, bob, "PUT", "/settings", {"preview": True})
    send(stack, alice, bob, "lunch at noon?")
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 3, what="three notifications")
    for prov, n in got(srv, sid, at, ft):
        assert title_of(prov, n)[:2] == (alice, "lunch at noon?"), (prov, n)


def test_online_and_acking_device_gets_none(stack, srv):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    c = WS(stack.host, stack.port, stack.ws_path, token=stack.token(bob, "phone"))
    try:
        assert c.recv()["type"] == "hello"
        send(stack, alice, bob, "are you there")
        ev = c.recv_type("msg", timeout=5)
        c.send_json({"type": "ack", "cursor": ev["cursor"]})
        # web and droid are not connected: they are notified; phone acked
        eventually(lambda: len(got(srv, sid, None, ft)) == 2, DELAY + 3, what="the offline devices")
        time.sleep(1.0)
        assert got(srv, apns=at) == []
    finally:
        c.close()


def test_read_conversation_gets_none(stack, srv):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    b = send(stack, alice, bob, "hi")
    st, _, _ = stack.request("POST", stack.http + "/read", body={"conv": b["conv"], "seq": b["seq"]},
                             headers={"Authorization": "Bearer " + stack.token(bob, "tablet")})
    assert st in (200, 204)
    carol = uid("carol")
    send(stack, carol, bob, "control")       # proves the worker runs
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 3, what="the control notifications")
    time.sleep(0.5)
    assert all(title_of(p, n)[0] == f"New message from {carol}" for p, n in got(srv, sid, at, ft))


def test_muted_conversation_and_quiet_hours_get_none(stack, srv):
    alice, bob, carol, dave = uid("alice"), uid("bob"), uid("carol"), uid("dave")
    sid, at, ft = register_all(stack, srv, bob)
    st, _ = api(stack, bob, "PUT", f"/settings/mute/{dconv(alice, bob)}", {"until": None})
    assert st == 200
    send(stack, alice, bob, "muted")
    send(stack, carol, bob, "not muted")
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 3, what="the unmuted conversation")
    time.sleep(0.5)
    assert all(title_of(p, n)[0] == f"New message from {carol}" for p, n in got(srv, sid, at, ft))
    # quiet hours around now, in dave's zone
    sid2, at2, ft2 = register_all(stack, srv, dave)
    now = time.gmtime()
    fr, to = (now.tm_hour + 23) % 24, (now.tm_hour + 1) % 24
    st, b = api(stack, dave, "PUT", "/settings", {"tz": "UTC", "quiet": {"from": f"{fr:02d}:00", "to": f"{to:02d}:59"}})
    assert st == 200, b
    send(stack, alice, dave, "shh")
    time.sleep(DELAY + 1.5)
    assert got(srv, sid2, at2, ft2) == []
    # and the same hours elsewhere on the globe are not quiet now
    st, b = api(stack, dave, "PUT", "/settings", {"tz": "Pacific/Kiritimati"})   # UTC+14
    send(stack, carol, dave, "loud")
    eventually(lambda: len(got(srv, sid2, at2, ft2)) == 3, DELAY + 3, what="outside quiet hours")


def test_three_messages_collapse_into_one_with_badge_three(stack, srv):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    for i in range(3):
        send(stack, alice, bob, f"m{i}")
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 3, what="notifications")
    time.sleep(DELAY + 0.5)
    ns = got(srv, sid, at, ft)
    assert len(ns) == 3, ns          # one per device
    for prov, n in ns:
        title, _, badge = title_of(prov, n)
        assert title == f"3 new messages from {alice}" and badge == 3, (prov, n)


def test_group_message_and_group_mute(stack, srv):
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    sid, at, ft = register_all(stack, srv, bob)
    sid2, at2, ft2 = register_all(stack, srv, carol)
    st, b = api(stack, alice, "POST", "/groups", {"name": "ops", "members": [bob, carol]})
    assert st == 201, b
    g = b["group"]
    st, _ = api(stack, carol, "PUT", f"/settings/mute/g:{g}", {})
    assert st == 200
    time.sleep(0.5)
    send(stack, alice, None, "deploy", group=g)
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 3, what="bob's notifications")
    for prov, n in got(srv, sid, at, ft):
        assert title_of(prov, n)[0] == "New message in ops", n
    time.sleep(0.5)
    assert got(srv, sid2, at2, ft2) == []


def test_large_group_notifies_only_who_opted_in(stack, srv, r, db):
    alice, bob, carol, dave = uid("alice"), uid("bob"), uid("carol"), uid("dave")
    regs = {u: register_all(stack, srv, u) for u in (bob, carol)}
    st, b = api(stack, alice, "POST", "/groups", {"name": "big", "members": [bob, carol, dave]})
    assert st == 201, b
    g = b["group"]
    st, b = api(stack, bob, "PUT", f"/settings/notify/g:{g}")
    assert st == 200 and b["notify"] == [f"g:{g}"], b
    assert r.hgetall(ukey(bob, "notify")) == {f"g:{g}": "1"}
    assert db.settings.find_one({"_id": bob})["notify"] == [f"g:{g}"]
    assert_error(*api(stack, bob, "PUT", f"/settings/notify/{dconv(bob, carol)}"), 400, "bad_request", "group")
    assert_error(*api(stack, bob, "PUT", f"/settings/notify/g:{uid('g')}"), 403, "forbidden")
    time.sleep(0.5)
    send(stack, alice, None, "to many", group=g)
    eventually(lambda: len(got(srv, *regs[bob])) == 3, DELAY + 3, what="the member who opted in")
    time.sleep(0.5)
    assert got(srv, *regs[carol]) == []
    st, b = api(stack, bob, "DELETE", f"/settings/notify/g:{g}")
    assert st == 200 and b["notify"] == []


@pytest.mark.parametrize("prov", ["webpush", "apns", "fcm"])
def test_dead_registration_is_removed(stack, srv, db, r, prov):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    dev = {"webpush": "web", "apns": "phone", "fcm": "droid"}[prov]
    {"webpush": srv.webpush, "apns": srv.apns, "fcm": srv.fcm}[prov].dead.add({"webpush": sid, "apns": at,
                                                                               "fcm": ft}[prov])
    send(stack, alice, bob, "hello?")
    eventually(lambda: dev not in r.hgetall(ukey(bob, "push")), DELAY + 3, what="the registration removed")
    eventually(lambda: db.devices.count_documents({"user": bob}) == 2, 5, what="mongodb record removed")
    st, b = api(stack, bob, "GET", "/devices", device="web")
    assert {d["device"]: d["push"] for d in b["devices"]}.get(dev) is None
    assert len(got(srv, sid, at, ft)) == 2        # the live ones were notified
    # the apns 400 BadDeviceToken flavour
    if prov == "apns":
        erin = uid("erin")
        _, at3, _ = register_all(stack, srv, erin)
        srv.apns.bad.add(at3)
        send(stack, alice, erin, "x")
        eventually(lambda: "phone" not in r.hgetall(ukey(erin, "push")), DELAY + 3, what="BadDeviceToken removed")


def test_retries_429_and_500_honour_retry_after(stack, srv):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    srv.apns.fail_next(1, 500)
    srv.fcm.fail_next(1, 429, retry_after=2)
    srv.webpush.fail_next(1, 503)
    t0 = time.time()
    send(stack, alice, bob, "retry me")
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 8, what="delivery after the retries")
    f = got(srv, fcm=ft)[0][1]
    assert f["t"] - t0 >= DELAY + 2 - 0.2, "Retry-After: 2 was not honoured"
    time.sleep(1)
    assert len(got(srv, sid, at, ft)) == 3


def test_provider_down_20s_loses_nothing_and_does_not_slow_others(stack, srv):
    alice = uid("alice")
    users = [uid("bob") for _ in range(5)]
    regs = {u: register_all(stack, srv, u) for u in users}
    srv.down("apns")
    try:
        t_down = time.time()
        for u in users:
            send(stack, alice, u, "while apns is down")
        # the others are not slowed
        eventually(lambda: all(len(got(srv, regs[u][0], None, regs[u][2])) == 2 for u in users), DELAY + 3,
                   what="web push and fcm while apns is down")
        time.sleep(max(0, 20 - (time.time() - t_down)))
        assert all(got(srv, apns=regs[u][1]) == [] for u in users)
    finally:
        srv.up("apns")
    t_up = time.time()
    eventually(lambda: all(len(got(srv, apns=regs[u][1])) >= 1 for u in users), 15, what="apns after it came back")
    print(f"apns back: all delivered {time.time() - t_up:.1f} s after it returned")


def test_badge_counts_every_unread_conversation(stack, srv):
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    sid, at, ft = register_all(stack, srv, bob)
    send(stack, alice, bob, "a1")
    send(stack, alice, bob, "a2")
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 3, what="alice's")
    send(stack, carol, bob, "c1")
    eventually(lambda: len(got(srv, sid, at, ft)) == 6, DELAY + 3, what="carol's")
    for prov, n in got(srv, sid, at, ft):
        title, _, badge = title_of(prov, n)
        if carol in title:
            assert badge == 3, (prov, n)       # 2 from alice + 1 from carol
    # bob reads alice's conversation: the next badge counts carol's only
    st, _, _ = stack.request("POST", stack.http + "/read", body={"conv": dconv(alice, bob), "seq": 2},
                             headers={"Authorization": "Bearer " + stack.token(bob, "tablet")})
    assert st in (200, 204)
    send(stack, carol, bob, "c2")
    eventually(lambda: len(got(srv, sid, at, ft)) == 9, DELAY + 3, what="carol's second")
    for prov, n in sorted(got(srv, sid, at, ft), key=lambda x: x[1]["t"])[6:]:
        assert title_of(prov, n)[0] == f"2 new messages from {carol}" and title_of(prov, n)[2] == 2, (prov, n)


def test_expired_credentials_are_renewed(stack, srv):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    srv.fcm.revoke_all()                    # FCM answers 401: the worker gets a new access token
    srv.apns.expired.update(srv.apns.jwts)  # APNs answers 403 ExpiredProviderToken: a new JWT
    before = srv.fcm.token_requests
    send(stack, alice, bob, "renew")
    eventually(lambda: len(got(srv, sid, at, ft)) == 3, DELAY + 4, what="delivery with new credentials")
    assert srv.fcm.token_requests == before + 1
    assert srv.apns.jwts - srv.apns.expired


def test_fcm_token_cached_and_apns_jwt_reused(stack, srv):
    # every FCM send so far used a cached access token, APNs a few provider tokens
    assert srv.fcm.token_requests <= 3, srv.fcm.token_requests
    assert 1 <= len(srv.apns.jwts) <= 3


def test_metrics_in_redis(stack, srv, r):
    st = eventually(lambda: r.hgetall("chat:{push}:stats:push-test"), 3, what="stats hash")
    for p in ("webpush", "apns", "fcm"):
        assert int(st[f"{p}_sent"]) > 0, st
        assert int(st[f"{p}_p50_ms"]) >= 0 and int(st[f"{p}_p99_ms"]) >= int(st[f"{p}_p50_ms"]), st
    assert int(st["apns_dropped"]) >= 2 and int(st["skipped_acked"]) >= 1 and int(st["skipped_muted"]) >= 1, st


def test_delay_zero_notifies_at_once_unless_connected(stack, srv, push):
    alice, bob = uid("alice"), uid("bob")
    sid, at, ft = register_all(stack, srv, bob)
    push.stop()
    conf = open(push.conf).read()
    with open(push.conf, "w") as f:
        f.write(conf.replace(f"push_delay_ms = {int(DELAY * 1000)}", "push_delay_ms = 0"))
    try:
        push.start()
        c = WS(stack.host, stack.port, stack.ws_path, token=stack.token(bob, "phone"))
        try:
            assert c.recv()["type"] == "hello"
            t0 = time.time()
            send(stack, alice, bob, "now")
            c.recv_type("msg", timeout=5)             # connected, not acking
            t_live = time.time()                      # the pipeline had it by now
            eventually(lambda: len(got(srv, sid, None, ft)) == 2, 5, what="the offline devices")
            # well before the DELAY the other tests run with: the worker
            # waits nothing (counted from the live delivery of the same
            # message, so the machine's queueing is not charged to it)
            assert max(n["t"] for _, n in got(srv, sid, None, ft)) - t_live < 0.9 * DELAY, t_live - t0
            time.sleep(1.0)
            assert got(srv, apns=at) == []              # phone is connected
        finally:
            c.close()
    finally:
        push.stop()
        with open(push.conf, "w") as f:
            f.write(conf)
        push.start()


def test_kill9_mid_batch_loses_nothing(stack, srv, push):
    alice = uid("alice")
    users = [uid("bob") for _ in range(40)]
    tokens = {}
    for u in users:
        ft = "fcm:" + b64u(os.urandom(60))
        st, b = api(stack, u, "PUT", "/devices/droid/push", {"provider": "fcm", "token": ft}, device="droid")
        assert st == 200
        tokens[u] = ft
    for u in users:
        send(stack, alice, u, "survive")
    # kill it as soon as the first notifications were accepted, mid-batch
    eventually(lambda: any(got(srv, fcm=tokens[u]) for u in users), DELAY + 3, interval=0.005, what="the first")
    push.stop(signal.SIGKILL)
    done = sum(1 for u in users if got(srv, fcm=tokens[u]))
    push.start()
    eventually(lambda: all(got(srv, fcm=tokens[u]) for u in users), LEASE + DELAY + 8,
               what="every notification after the restart")
    repeats = sum(len(got(srv, fcm=tokens[u])) - 1 for u in users)
    print(f"killed after {done} of {len(users)}; repeats after restart: {repeats}")
    # a repeat carries the same collapse key (it replaces the first on the device)
    for u in users:
        assert len({n["collapse"] for _, n in got(srv, fcm=tokens[u])}) == 1
