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
