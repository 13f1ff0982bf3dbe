"""Push notifications (issue 14): user settings (GET/PUT /chat/settings and
per-conversation mute), device push registrations (/chat/devices) and the
push role against local HTTP/2 TLS servers that enforce each provider's
contract (t/pushservers.py)."""
import time
import uuid

import pymongo
import pytest
import redis


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


@pytest.fixture(scope="module")
def r(stack):
    c = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    yield c
    c.close()


@pytest.fixture(scope="module")
def db(stack):
    c = pymongo.MongoClient(stack.env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    yield c.get_default_database()
    c.close()


# ---- settings -------------------------------------------------------------------

DEFAULTS = {"last_seen": "everyone", "preview": False, "tz": "UTC", "quiet": None, "mute": {}}


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
                                         "quiet": "1320-450"}
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
