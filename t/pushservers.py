"""Local stand-ins for the push providers, over HTTP/2 on TLS (h2 + asyncio),
each on its own port, that enforce the providers' documented contracts
strictly and record what they accepted:

- APNs: POST /3/device/<hex token>; the provider token is an ES256 JWT
  verified with the test .p8 key's public key (kid, iss, iat within the
  hour); apns-topic, apns-push-type: alert, apns-priority, apns-collapse-id
  (<= 64 bytes), apns-expiration; a JSON payload <= 4 KiB with aps.alert.
- FCM HTTP v1: POST /token (OAuth 2.0 JWT bearer grant: the RS256 assertion
  is verified with the service account's public key, iss, scope, aud,
  lifetime) and POST /v1/projects/<id>/messages:send with a Bearer token the
  server issued and the v1 message format (data values are strings).
- Web Push: POST /wp/<subscription>: TTL, Content-Encoding: aes128gcm,
  Urgency, Topic (<= 32 base64url characters), Authorization: vapid t=, k=
  (the JWT is verified with k by `cryptography` via PyJWT, aud = our origin,
  exp within 24 h, sub mailto:/https:); the body is decrypted by http_ece
  with the subscription's private key and auth secret.

Anything else is answered the way the provider would (400/401/403) and
recorded in `violations`. Tests make the servers answer 410/429/500, or go
down (stop listening) and come back.
"""
import asyncio
import base64
import datetime
import json
import os
import re
import ssl
import threading
import time
import urllib.parse

import h2.config
import h2.connection
import h2.events
import http_ece
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64u_dec(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def make_cert(directory):
    """A self-signed certificate for 127.0.0.1 (the push worker's CA file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cf, kf = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cf, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kf, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cf, kf


class Reply:
    def __init__(self, status, body=b"", headers=None):
        self.status, self.body, self.headers = status, body, headers or []


def jreply(status, obj, headers=None):
    return Reply(status, json.dumps(obj).encode(), [("content-type", "application/json")] + (headers or []))


class Provider:
    """Common part: recorded notifications, violations, injected failures."""
    name = "?"

    def __init__(self, port):
        self.port = port
        self.origin = f"https://127.0.0.1:{port}"
        self.received = []          # accepted notifications (dicts)
        self.violations = []        # contract violations seen
        self.requests = 0
        self.dead = set()           # device tokens / subscription ids answered as dead
        self.fail = []              # queued (status, retry_after) for the next sends
        self.lock = threading.Lock()

    def violation(self, why, status=400, body=None):
        self.violations.append(why)
        return body if body is not None else jreply(status, {"reason": why})

    def injected(self):
        with self.lock:
            if self.fail:
                st, ra = self.fail.pop(0)
                hdr = [("retry-after", str(ra))] if ra is not None else []
                return jreply(st, {"reason": "TooManyRequests" if st == 429 else "InternalServerError",
                                   "error": {"code": st, "status": "UNAVAILABLE"}}, hdr)
        return None

    def fail_next(self, n, status, retry_after=None):
        with self.lock:
            self.fail.extend([(status, retry_after)] * n)

    def handle(self, method, path, headers, body):
        raise NotImplementedError


class APNs(Provider):
    name = "apns"

    def __init__(self, port, topic="com.example.chat"):
        super().__init__(port)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_id, self.team_id, self.topic = "KEYID12345", "TEAMID6789", topic
        self.bad = set()            # tokens answered 400 BadDeviceToken
        self.jwts = set()
        self.expired = set()        # provider tokens answered 403 ExpiredProviderToken

    def key_pem(self):
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def handle(self, method, path, h, body):
        m = re.fullmatch(r"/3/device/([0-9a-fA-F]+)", path)
        if method != "POST" or not m:
            return self.violation(f"bad request line {method} {path}", 404, jreply(404, {"reason": "BadPath"}))
        token = m.group(1)
        auth = h.get("authorization", "")
        if not auth.startswith("bearer "):
            return self.violation("missing bearer provider token", 403,
                                  jreply(403, {"reason": "MissingProviderToken"}))
        t = auth[7:]
        try:
            hdr = jwt.get_unverified_header(t)
            claims = jwt.decode(t, self.key.public_key(), algorithms=["ES256"], options={"require": ["iat", "iss"]})
        except Exception as e:  # noqa: BLE001
            return self.violation(f"provider token does not verify: {e}", 403,
                                  jreply(403, {"reason": "InvalidProviderToken"}))
        if hdr.get("kid") != self.key_id or hdr.get("alg") != "ES256" or claims.get("iss") != self.team_id:
            return self.violation(f"provider token kid/iss wrong: {hdr} {claims}", 403,
                                  jreply(403, {"reason": "InvalidProviderToken"}))
        if not (time.time() - 3600 < claims["iat"] <= time.time() + 60):
            return self.violation("provider token too old", 403, jreply(403, {"reason": "ExpiredProviderToken"}))
        if t in self.expired:
            return jreply(403, {"reason": "ExpiredProviderToken"})
        self.jwts.add(t)
        if h.get("apns-topic") != self.topic:
            return self.violation(f"apns-topic {h.get('apns-topic')}", 400, jreply(400, {"reason": "TopicDisallowed"}))
        if h.get("apns-push-type") != "alert":
            return self.violation("apns-push-type", 400, jreply(400, {"reason": "InvalidPushType"}))
        if h.get("apns-priority", "10") not in ("5", "10"):
            return self.violation("apns-priority", 400, jreply(400, {"reason": "BadPriority"}))
        cid = h.get("apns-collapse-id")
        if cid is not None and (len(cid.encode()) > 64 or not cid):
            return self.violation("apns-collapse-id", 400, jreply(400, {"reason": "BadCollapseId"}))
        if "apns-expiration" in h and not h["apns-expiration"].isdigit():
            return self.violation("apns-expiration", 400, jreply(400, {"reason": "BadExpirationDate"}))
        if len(body) > 4096:
            return self.violation("payload too large", 413, jreply(413, {"reason": "PayloadTooLarge"}))
        try:
            payload = json.loads(body)
            aps = payload["aps"]
            alert = aps["alert"]
            assert isinstance(alert, (str, dict)) and (isinstance(alert, str) or "title" in alert)
            assert isinstance(aps.get("badge", 0), int)
        except Exception:  # noqa: BLE001
            return self.violation(f"bad payload {body[:200]!r}", 400, jreply(400, {"reason": "PayloadEmpty"}))
        if len(token) != 64:
            return jreply(400, {"reason": "BadDeviceToken"})
        if token in self.bad:
            return jreply(400, {"reason": "BadDeviceToken"})
        if token in self.dead:
            return jreply(410, {"reason": "Unregistered", "timestamp": int(time.time() * 1000)})
        r = self.injected()
        if r:
            return r
        self.received.append({"token": token, "collapse": cid, "payload": payload, "t": time.time(),
                              "priority": h.get("apns-priority")})
        return Reply(200, b"", [("apns-id", "00000000-0000-0000-0000-%012d" % len(self.received))])


class FCM(Provider):
    name = "fcm"

    def __init__(self, port, project="chat-test"):
        super().__init__(port)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.project = project
        self.email = "push@chat-test.iam.gserviceaccount.com"
        self.token_uri = f"{self.origin}/token"
        self.tokens = {}            # access token -> expiry
        self.token_requests = 0
        self.expires_in = 3600
        self.revoked = set()

    def revoke_all(self):
        self.revoked.update(self.tokens)
        self.tokens.clear()

    def service_account(self):
        return {"type": "service_account", "project_id": self.project, "private_key_id": "k1",
                "private_key": self.key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()).decode(),
                "client_email": self.email, "client_id": "1", "token_uri": self.token_uri}

    def handle(self, method, path, h, body):
        if path == "/token":
            return self.token(method, h, body)
        m = re.fullmatch(r"/v1/projects/([^/]+)/messages:send", path)
        if method != "POST" or not m:
            return self.violation(f"bad request line {method} {path}", 404, jreply(404, {"error": {"code": 404}}))
        if m.group(1) != self.project:
            return self.violation("wrong project", 403, jreply(403, {"error": {"code": 403,
                                                                               "status": "PERMISSION_DENIED"}}))
        auth = h.get("authorization", "")
        tok = auth[7:] if auth.startswith("Bearer ") else None
        if tok in self.revoked:
            return jreply(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}})
        if tok not in self.tokens or self.tokens[tok] < time.time():
            return self.violation("no valid access token", 401,
                                  jreply(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}}))
        if not h.get("content-type", "").startswith("application/json"):
            return self.violation("content-type", 400, jreply(400, {"error": {"code": 400,
                                                                              "status": "INVALID_ARGUMENT"}}))
        try:
            msg = json.loads(body)["message"]
            assert sum(k in msg for k in ("token", "topic", "condition")) == 1 and isinstance(msg["token"], str)
            n = msg.get("notification", {})
            assert isinstance(n.get("title"), str)
            assert all(isinstance(v, str) for v in msg.get("data", {}).values()), "data values must be strings"
            a = msg.get("android", {})
            assert isinstance(a.get("collapse_key", ""), str)
            assert a.get("priority", "normal") in ("normal", "high")
            assert re.fullmatch(r"\d+(\.\d+)?s", a.get("ttl", "0s"))
            assert isinstance(a.get("notification", {}).get("notification_count", 0), int)
            assert set(msg) <= {"token", "notification", "data", "android", "apns", "webpush", "fcm_options", "name"}
        except Exception as e:  # noqa: BLE001
            return self.violation(f"bad message {e!r} {body[:200]!r}", 400,
                                  jreply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}))
        if msg["token"] in self.dead:
            return jreply(404, {"error": {"code": 404, "message": "Requested entity was not found.",
                                          "status": "NOT_FOUND",
                                          "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                                       "errorCode": "UNREGISTERED"}]}})
        r = self.injected()
        if r:
            return r
        self.received.append({"token": msg["token"], "collapse": msg.get("android", {}).get("collapse_key"),
                              "message": msg, "t": time.time()})
        return jreply(200, {"name": f"projects/{self.project}/messages/{len(self.received)}"})

    def token(self, method, h, body):
        self.token_requests += 1
        if method != "POST" or not h.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return self.violation("token request method/content-type", 400, jreply(400, {"error": "invalid_request"}))
        form = dict(urllib.parse.parse_qsl(body.decode()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self.violation("grant_type", 400, jreply(400, {"error": "unsupported_grant_type"}))
        try:
            hdr = jwt.get_unverified_header(form["assertion"])
            c = jwt.decode(form["assertion"], self.key.public_key(), algorithms=["RS256"], audience=self.token_uri,
                           options={"require": ["iat", "exp", "iss", "aud"]})
            assert hdr["alg"] == "RS256"
            assert c["iss"] == self.email, "iss"
            assert "https://www.googleapis.com/auth/firebase.messaging" in c["scope"].split(), "scope"
            assert c["exp"] - c["iat"] <= 3600, "lifetime"
        except Exception as e:  # noqa: BLE001
            return self.violation(f"assertion refused: {e!r}", 400, jreply(400, {"error": "invalid_grant"}))
        tok = "ya29." + b64u(os.urandom(24))
        self.tokens[tok] = time.time() + self.expires_in
        return jreply(200, {"access_token": tok, "expires_in": self.expires_in, "token_type": "Bearer"})


class WebPush(Provider):
    name = "webpush"

    def __init__(self, port):
        super().__init__(port)
        self.subs = {}              # id -> (private key, auth secret)
        self.vapid_public = None    # the application server key the subscriptions were made with

    def subscribe(self):
        """A new browser subscription: its PushSubscription JSON (and we keep the keys)."""
        sid = b64u(os.urandom(12))
        priv = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        self.subs[sid] = (priv, auth)
        pub = priv.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
        return sid, {"endpoint": f"{self.origin}/wp/{sid}", "expirationTime": None,
                     "keys": {"p256dh": b64u(pub), "auth": b64u(auth)}}

    def handle(self, method, path, h, body):
        m = re.fullmatch(r"/wp/([A-Za-z0-9_-]+)", path)
        if method != "POST" or not m:
            return self.violation(f"bad request line {method} {path}", 404, Reply(404))
        sid = m.group(1)
        if sid in self.dead:
            return Reply(410)
        if sid not in self.subs:
            return Reply(404)
        if not h.get("ttl", "").isdigit():
            return self.violation("TTL header missing or not a number", 400, Reply(400))
        if h.get("urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return self.violation("Urgency", 400, Reply(400))
        topic = h.get("topic")
        if topic is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", topic):
            return self.violation("Topic", 400, Reply(400))
        if h.get("content-encoding") != "aes128gcm":
            return self.violation(f"Content-Encoding {h.get('content-encoding')}", 415, Reply(415))
        am = re.fullmatch(r"vapid t=([A-Za-z0-9_.-]+), *k=([A-Za-z0-9_-]+)", h.get("authorization", ""))
        if not am:
            return self.violation(f"Authorization {h.get('authorization')!r}", 401, Reply(401))
        t, k = am.groups()
        try:
            kb = b64u_dec(k)
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), kb)
            hdr = jwt.get_unverified_header(t)
            c = jwt.decode(t, pub, algorithms=["ES256"], audience=self.origin, options={"require": ["exp", "aud"]})
            assert hdr["alg"] == "ES256"
            assert c["exp"] <= time.time() + 86400, "exp more than 24 h ahead"
            assert c.get("sub", "").startswith(("mailto:", "https:")), "sub"
            if self.vapid_public is not None:
                assert kb == self.vapid_public, "k is not the application server key"
        except Exception as e:  # noqa: BLE001
            return self.violation(f"VAPID refused: {e!r}", 403, Reply(403))
        if len(body) > 4096:
            return self.violation("payload too large", 413, Reply(413))
        priv, auth = self.subs[sid]
        try:
            plain = http_ece.decrypt(body, private_key=priv, auth_secret=auth, version="aes128gcm")
            payload = json.loads(plain)
        except Exception as e:  # noqa: BLE001
            return self.violation(f"payload does not decrypt: {e!r}", 400, Reply(400))
        r = self.injected()
        if r:
            return r
        self.received.append({"sub": sid, "collapse": topic, "payload": payload, "t": time.time(),
                              "ttl": int(h["ttl"]), "urgency": h.get("urgency")})
        return Reply(201, b"", [("location", f"{self.origin}/msg/{len(self.received)}")])


class _H2(asyncio.Protocol):
    def __init__(self, srv):
        self.srv = srv
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams = {}

    def connection_made(self, transport):
        self.transport = transport
        self.srv.conns.add(self)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
            self.srv.provider.violations.append("connection without HTTP/2 (ALPN h2)")
            transport.close()
            return
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc):
        self.srv.conns.discard(self)

    def data_received(self, data):
        try:
            events = self.conn.receive_data(data)
        except Exception:  # noqa: BLE001
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.streams[ev.stream_id] = (dict(ev.headers), bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id][1].extend(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                hdrs, body = self.streams.pop(ev.stream_id, ({}, b""))
                self.respond(ev.stream_id, hdrs, bytes(body))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def respond(self, sid, hdrs, body):
        p = self.srv.provider
        p.requests += 1
        h = {k.lower(): v for k, v in hdrs.items() if not k.startswith(":")}
        try:
            r = p.handle(hdrs.get(":method"), hdrs.get(":path", "").split("?")[0], h, body)
        except Exception as e:  # noqa: BLE001
            p.violations.append(f"server error {e!r}")
            r = Reply(500)
        headers = [(":status", str(r.status))] + r.headers + [("content-length", str(len(r.body)))]
        self.conn.send_headers(sid, headers, end_stream=not r.body)
        if r.body:
            self.conn.send_data(sid, r.body, end_stream=True)


class _Server:
    def __init__(self, provider, loop, ctx):
        self.provider, self.loop, self.ctx = provider, loop, ctx
        self.server = None
        self.conns = set()

    async def start(self):
        self.server = await self.loop.create_server(lambda: _H2(self), "127.0.0.1", self.provider.port,
                                                    ssl=self.ctx, reuse_address=True)

    async def stop(self):
        if self.server:
            self.server.close()
            for c in list(self.conns):
                c.transport.abort()
            await self.server.wait_closed()
            self.server = None


class PushServers:
    """The three providers on ports base, base+1, base+2, run in a thread."""

    def __init__(self, directory, base_port):
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.cert, self.certkey = make_cert(directory)
        self.webpush = WebPush(base_port)
        self.apns = APNs(base_port + 1)
        self.fcm = FCM(base_port + 2)
        self.loop = asyncio.new_event_loop()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.certkey)
        ctx.set_alpn_protocols(["h2"])
        self.servers = {p.name: _Server(p, self.loop, ctx) for p in (self.webpush, self.apns, self.fcm)}
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        for s in self.servers.values():
            self._run(s.start())
        # credentials files for the worker
        self.vapid = ec.generate_private_key(ec.SECP256R1())
        self.webpush.vapid_public = self.vapid.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        self.vapid_file = self._write("vapid.pem", self.vapid.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.apns_file = self._write("AuthKey_test.p8", self.apns.key_pem())
        self.fcm_file = self._write("service-account.json", json.dumps(self.fcm.service_account()).encode())

    def _write(self, name, data):
        p = os.path.join(self.dir, name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def down(self, name):
        self._run(self.servers[name].stop())

    def up(self, name):
        self._run(self.servers[name].start())

    def worker_conf(self):
        return "\n".join([
            f"push_ca_file = {self.cert}",
            f"webpush_vapid_key = {self.vapid_file}",
            "webpush_subject = mailto:ops@example.test",
            "webpush_allow = 127.0.0.1",
            f"apns_key_file = {self.apns_file}",
            f"apns_key_id = {self.apns.key_id}",
            f"apns_team_id = {self.apns.team_id}",
            f"apns_url = {self.apns.origin}",
            f"apns_sandbox_url = {self.apns.origin}",
            f"fcm_service_account = {self.fcm_file}",
            f"fcm_url = {self.fcm.origin}",
        ]) + "\n"

    def violations(self):
        return {p.name: list(p.violations) for p in (self.webpush, self.apns, self.fcm) if p.violations}

    def close(self):
        for s in self.servers.values():
            try:
                self._run(s.stop())
            except Exception:  # noqa: BLE001
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
