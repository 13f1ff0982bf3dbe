"""Issue 3, operations: Redis going away under live connections, graceful
drain on reload (1,000 open connections) and quit."""
import base64
import os
import selectors
import socket
import subprocess
import time

import pytest

from chatlib import ROOT
from wsclient import WS, HandshakeError, frame


def ws(stack, user, device=None):
    c = WS(stack.host, stack.port, stack.ws_path, token=stack.token(user, device))
    c.hello = c.recv()
    return c


def stack_cmd(stack, *args):
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), *args, "--dir", stack.dir],
                       capture_output=True, text=True, env=stack.proc_env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def eventually(fn, timeout=15, every=0.2):
    deadline = time.time() + timeout
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception:
            if time.time() > deadline:
                raise
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def test_redis_restart_under_live_connections(stack):
    alice, bob = ws(stack, "r-alice"), ws(stack, "r-bob")
    stack_cmd(stack, "kill", "redis")
    time.sleep(0.5)
    # live connections stay up and answer what needs no Redis
    alice.send_json({"type": "ping"})
    assert alice.recv() == {"type": "pong"}
    # what needs Redis is refused at once, not left hanging
    alice.send_json({"type": "typing", "to": "r-bob"})
    e = alice.recv(timeout=3)
    assert e["type"] == "error" and e["code"] == "unavailable"
    with pytest.raises(HandshakeError) as he:
        WS(stack.host, stack.port, stack.ws_path, token=stack.token("r-carol"), timeout=5)
    assert he.value.status == 503 and he.value.body["code"] == "unavailable"
    st, _, body = stack.request("GET", f"{stack.http}/presence?user=r-bob",
                                headers={"Authorization": "Bearer " + stack.token("r-alice")})
    assert st == 503 and body["code"] == "unavailable"
    st, _, body = stack.request("GET", f"{stack.http}/poll?timeout=1",
                                headers={"Authorization": "Bearer " + stack.token("r-alice")})
    assert st == 503
    # Redis comes back (AOF): nginx reconnects by itself
    stack_cmd(stack, "up")
    eventually(lambda: ws(stack, "r-carol").close() or True, timeout=20)
    # the registry is rebuilt by the periodic refresh; typing flows again
    def typing_arrives():
        alice.send_json({"type": "typing", "to": "r-bob"})
        m = bob.recv(timeout=1)
        return m.get("type") == "typing"
    eventually(typing_arrives, timeout=40, every=0.5)
    alice.close()
    bob.close()
    assert not stack.nginx_crashes()


class Bulk:
    """Many WebSocket connections in one process, driven by a selector."""

    def __init__(self, stack, n, prefix, port=None, on_open=None):
        self.stack, self.conns = stack, []
        sel = selectors.DefaultSelector()
        for i in range(n):
            if on_open:
                on_open(i)
            s = socket.create_connection((stack.host, port or stack.port))
            key = base64.b64encode(os.urandom(16)).decode()
            tok = stack.token(f"{prefix}{i}")
            s.sendall((f"GET {stack.ws_path}?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                       f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
            s.setblocking(False)
            c = {"sock": s, "buf": b"", "frames": []}
            self.conns.append(c)
            sel.register(s, selectors.EVENT_READ, c)
        self.sel = sel

    def pump(self, until, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline and not all(until(c) for c in self.conns):
            for key, _ in self.sel.select(0.2):
                c = key.data
                try:
                    d = c["sock"].recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    d = b""
                if not d:
                    c["eof"] = True
                    self.sel.unregister(c["sock"])
                    continue
                c["buf"] += d
                self._frames(c)
        return all(until(c) for c in self.conns)

    @staticmethod
    def _frames(c):
        if not c.get("upgraded"):
            if b"\r\n\r\n" not in c["buf"]:
                return
            head, _, c["buf"] = c["buf"].partition(b"\r\n\r\n")
            c["status"] = int(head.split()[1])
            c["upgraded"] = True
        b = c["buf"]
        while len(b) >= 2:
            n, off = b[1] & 0x7F, 2
            if n == 126:
                if len(b) < 4:
                    break
                n, off = int.from_bytes(b[2:4], "big"), 4
            if len(b) < off + n:
                break
            c["frames"].append((b[0] & 0x0F, b[off:off + n]))
            b = b[off + n:]
        c["buf"] = b

    def close(self):
        for c in self.conns:
            try:
                c["sock"].close()
            except OSError:
                pass


def worker_pids(stack):
    master = open(os.path.join(stack.env["CHAT_NGINX_PREFIX"], "nginx.pid")).read().strip()
    out = subprocess.run(["pgrep", "-P", master], capture_output=True, text=True).stdout.split()
    return set(out)


def test_reload_drains_1000_connections(stack):
    bulk = Bulk(stack, 1000, "reload-user-")
    assert bulk.pump(lambda c: any(op == 1 and b'"hello"' in p for op, p in c["frames"]), 60), \
        "not every connection got its hello"
    assert all(c["status"] == 101 for c in bulk.conns)
    old = worker_pids(stack)
    stack.nginx_signal("reload")
    ok = bulk.pump(lambda c: any(op == 8 for op, _ in c["frames"]), 30)
    assert ok, "not every connection was told to go"
    for c in bulk.conns:
        texts = [p for op, p in c["frames"] if op == 1]
        closes = [p for op, p in c["frames"] if op == 8]
        assert texts[-1] == b'{"type":"reconnect"}', texts
        assert int.from_bytes(closes[0][:2], "big") == 1001
    # answer the closes like clients do; the server then closes the sockets
    for c in bulk.conns:
        try:
            c["sock"].send(frame(8, (1001).to_bytes(2, "big")))
        except OSError:
            pass
    assert bulk.pump(lambda c: c.get("eof"), 20), "connections left open"
    bulk.close()
    # the old workers exit; no socket is leaked
    eventually(lambda: not (old & worker_pids(stack)), timeout=20)
    assert "open socket" not in stack.nginx_error_log()
    ws(stack, "after-reload").close()


def test_reload_answers_held_long_polls(stack):
    import threading
    res = {}

    def poll():
        res["r"] = stack.request("GET", stack.http + "/poll?cursor=3&timeout=30",
                                 headers={"Authorization": "Bearer " + stack.token("poll-reload")}, timeout=40)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    t0 = time.time()
    stack.nginx_signal("reload")
    t.join(35)
    st, _, body = res["r"]
    assert st == 200 and body == {"events": [], "cursor": 3}
    assert time.time() - t0 < 5


class SecondNginx:
    """A second nginx on the same stack (its own prefix and port), for tests
    that stop it; killed with its workers when the test ends."""

    def __init__(self, stack, prefix, port):
        self.stack, self.prefix, self.port = stack, prefix, port
        conf = open(stack.env["CHAT_NGINX_CONF"]).read()
        conf = conf.replace(f"listen 127.0.0.1:{stack.port};", f"listen 127.0.0.1:{port};")
        conf = conf.replace(stack.env["CHAT_NGINX_PREFIX"], str(prefix))
        (prefix / "logs").mkdir()
        (prefix / "tmp").mkdir()
        (prefix / "nginx.conf").write_text(conf)
        self.run()
        self.master = int(eventually(lambda: (prefix / "nginx.pid").read_text().strip()))
        try:
            # ready once its workers reach Redis
            eventually(lambda: WS(stack.host, port, stack.ws_path, token=stack.token("probe")).close() or True)
        except BaseException:
            self.kill()
            raise

    def run(self, *args):
        from chatlib import nginx_argv
        subprocess.run(nginx_argv("-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), *args),
                       check=True, env=self.stack.proc_env)

    def wait_exit(self):
        def gone():
            try:
                os.kill(self.master, 0)
                return False
            except ProcessLookupError:
                return True
        eventually(gone, timeout=20)

    def log(self):
        return (self.prefix / "logs" / "error.log").read_text()

    def kill(self):
        try:
            os.killpg(self.master, 9)      # master and workers share its group
        except (ProcessLookupError, PermissionError):
            pass


def test_quit_drains_connections_and_exits(stack, tmp_path):
    """A second nginx on the same stack, stopped with -s quit under load."""
    ngx = SecondNginx(stack, tmp_path, stack.port + 50)
    try:
        bulk = Bulk(stack, 300, "quit-user-", port=ngx.port)
        assert bulk.pump(lambda c: any(op == 1 and b'"hello"' in p for op, p in c["frames"]), 30)
        ngx.run("-s", "quit")
        assert bulk.pump(lambda c: any(op == 8 for op, _ in c["frames"]), 20)
        for c in bulk.conns:
            texts = [p for op, p in c["frames"] if op == 1]
            assert texts[-1] == b'{"type":"reconnect"}'
        # clients that never answer the close are let go after the close wait
        assert bulk.pump(lambda c: c.get("eof"), 20)
        bulk.close()
        ngx.wait_exit()
        log = ngx.log()
        assert "open socket" not in log and "exited on signal" not in log
    finally:
        ngx.kill()


def test_stop_with_redis_commands_in_flight(stack, tmp_path):
    """nginx -s stop (SIGTERM) while Redis holds the replies of handshakes and
    inbox reads: freeing the link answers them with no reply, the sessions
    fail, and nothing may send on the link being freed. Every worker exits
    with code 0."""
    import threading
    import redis
    r = redis.Redis.from_url(stack.env["REDIS_URL"])
    ngx = SecondNginx(stack, tmp_path, stack.port + 51)
    try:
        # handshakes in every state: some registered with their inbox read in
        # flight, some with the registry script in flight (Redis is paused
        # while the handshakes stream in)
        halfway = threading.Event()
        out = {}

        def open_bulk():
            out["bulk"] = Bulk(stack, 400, "stop-user-", port=ngx.port,
                               on_open=lambda i: i == 200 and halfway.set())
        t = threading.Thread(target=open_bulk)
        t.start()
        assert halfway.wait(30)
        r.execute_command("CLIENT", "PAUSE", "5000", "ALL")
        t.join(30)
        bulk = out["bulk"]
        # those after the pause are not answered
        assert not bulk.pump(lambda c: any(b'"hello"' in p for _, p in c["frames"]), 1)
        ngx.run("-s", "stop")
        ngx.wait_exit()
        r.execute_command("CLIENT", "UNPAUSE")
        bulk.close()
        log = ngx.log()
        assert "exited on signal" not in log, log[-2000:]
        workers = log.count("start worker process ")
        assert workers >= 1 and log.count("exited with code 0") == workers, log[-2000:]
        # the stack's own nginx lived through the pause: the next test finds it serving
        eventually(lambda: ws(stack, "after-stop").close() or True, timeout=20)
    finally:
        try:
            r.execute_command("CLIENT", "UNPAUSE")
        except Exception:
            pass
        ngx.kill()


def test_registry_refresh_is_spread_over_its_interval(stack, r):
    """Each session's registry entry is renewed once per third of
    chat_registry_ttl (the test stack: 30 s, so every 10 s), spread over
    that interval, not in one burst per worker process (a burst put every
    refresh script ahead of the sends at once, and past the link's pending
    bound the rest of the list was never refreshed)."""
    from helpers import uniq, ws
    ttl_ms, interval = 30000, 10.0
    users = [uniq("rf") for _ in range(120)]
    t0 = time.time()
    conns = [ws(stack, u, "d") for u in users]
    opened = time.time()
    assert opened - t0 < 8, "the connects took too long to tell a burst from a spread"
    time.sleep(interval * 1.6)
    now_ms = time.time() * 1000
    by_channel = {}
    for u in users:
        members = r.zrange(f"chat:{{u:{u}}}:conns", 0, -1, withscores=True)
        assert len(members) == 1, (u, members)
        member, score = members[0]
        channel = member.split("|", 1)[0]
        refreshed_ms = score - ttl_ms
        # every session was renewed within the last interval (and a tick):
        # after it registered, and not starved
        assert refreshed_ms >= now_ms - interval * 1000 - 1500, (u, now_ms - refreshed_ms)
        by_channel.setdefault(channel, []).append(refreshed_ms)
    for channel, times in by_channel.items():
        if len(times) < 20:
            continue            # too few sessions on this process to tell
        spread = max(times) - min(times)
        # a burst renews a process's sessions within a few ms; spread over
        # the interval, 20+ sessions cover most of it
        assert spread > interval * 1000 * 0.4, (channel, len(times), spread)
    assert any(len(t) >= 20 for t in by_channel.values()), {c: len(t) for c, t in by_channel.items()}
    for c in conns:
        c.close()
