"""Helpers for the tests: the stack's environment, tokens, HTTP."""
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(secret, claims, header=None, sign=True):
    header = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(claims, separators=(",", ":")).encode())
    if not sign:
        return f"{h}.{p}."
    key = secret.encode() if isinstance(secret, str) else secret
    s = b64url(hmac.new(key, f"{h}.{p}".encode(), hashlib.sha256).digest())
    return f"{h}.{p}.{s}"


def nginx_argv(*args):
    """nginx with the sanitizer runtime preloaded when the module is an ASan build."""
    pre = []
    if os.environ.get("NGX_CHAT_SAN") == "1":
        libasan = subprocess.check_output(["gcc", "-print-file-name=libasan.so"], text=True).strip()
        libubsan = subprocess.check_output(["gcc", "-print-file-name=libubsan.so"], text=True).strip()
        pre = ["env", f"LD_PRELOAD={libasan}:{libubsan}", "ASAN_OPTIONS=detect_leaks=0"]
    return pre + ["nginx", *args]


class Stack:
    def __init__(self, directory, env):
        self.dir = directory
        self.proc_env = env
        self.env = {}
        with open(os.path.join(directory, "env")) as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k:
                    self.env[k] = v
        self.secret = self.env["CHAT_JWT_SECRET"]
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", self.env["CHAT_WS_URL"])
        self.host, self.port, self.ws_path = m.group(1), int(m.group(2)), m.group(3)
        self.http = self.env["CHAT_HTTP_URL"]
        self.worker = os.environ.get("NGX_CHAT_WORKER", os.path.join(ROOT, "build/chat-worker"))

    def token(self, user, device=None, ttl=3600, **extra):
        claims = {"sub": user, "exp": int(time.time()) + ttl}
        if device:
            claims["dev"] = device
        claims.update(extra)
        return make_jwt(self.secret, claims)

    def request(self, method, url, body=None, headers=None, timeout=10):
        """Returns (status, headers, parsed-or-raw body)."""
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            data = data.encode() if isinstance(data, str) else data
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, dict(e.headers), e.read()
        try:
            return status, hdrs, json.loads(raw) if raw else None
        except ValueError:
            return status, hdrs, raw

    def rest_socket(self, timeout=10):
        """A connection straight to the rest worker (its unix socket),
        bypassing nginx."""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.env["CHAT_REST_SOCKET"])
        return s

    def rest_request(self, method, path, body=None, headers=None, timeout=10):
        """(status, headers, parsed-or-raw body) of a request straight to the
        rest worker, as nginx would send it (or as an impostor would)."""
        import http.client

        class Conn(http.client.HTTPConnection):
            def connect(conn):
                conn.sock = self.rest_socket(timeout)
        c = Conn("localhost", timeout=timeout)
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        c.request(method, path, body=data, headers=headers or {})
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, dict(r.getheaders()), json.loads(raw) if raw else None
        except ValueError:
            return r.status, dict(r.getheaders()), raw

    def nginx_signal(self, sig):
        subprocess.run(nginx_argv("-p", self.env["CHAT_NGINX_PREFIX"], "-c", self.env["CHAT_NGINX_CONF"],
                                  "-s", sig), check=True, env=self.proc_env)

    def nginx_error_log(self):
        p = os.path.join(self.env["CHAT_NGINX_PREFIX"], "logs", "error.log")
        return open(p, errors="replace").read() if os.path.exists(p) else ""

    def nginx_crashes(self):
        """Crashed worker processes of every nginx node of the stack
        (scripts/stack up --nodes N: node i's prefix is CHAT_NGINX_PREFIX_<i>)."""
        text = self.nginx_error_log()
        for k, v in self.env.items():
            if k.startswith("CHAT_NGINX_PREFIX_"):
                p = os.path.join(v, "logs", "error.log")
                text += open(p, errors="replace").read() if os.path.exists(p) else ""
        return [l for l in text.splitlines()
                if "exited on signal" in l or "[alert]" in l and "worker process" in l and "exited" in l]

    def run_worker(self, *args, env=None, timeout=60):
        e = dict(self.proc_env)
        e.update(env or {})
        return subprocess.run([self.worker, "--config", self.env["CHAT_WORKER_CONF"], *args],
                              capture_output=True, text=True, env=e, timeout=timeout)
