"""Issue 2: the foundation. The stack runs real servers, the worker proves
each one works, the module loads into Debian's nginx, the shipped
configuration is accepted, the compose file parses."""
import os
import re
import shutil
import socket
import subprocess

import pytest
import redis

from chatlib import ROOT, make_jwt, nginx_argv


def test_worker_check_reaches_every_server(stack):
    r = stack.run_worker("--check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {l.split()[0]: l for l in r.stdout.splitlines() if l.strip()}
    assert lines["redis"].split()[1] == "ok", r.stdout
    assert lines["kafka"].split()[1] == "ok", r.stdout
    assert "produce+consume" in lines["kafka"]
    assert lines["mongodb"].split()[1] == "ok", r.stdout
    assert "insert+find" in lines["mongodb"]


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("var,url,name", [
    ("REDIS_URL", "redis://127.0.0.1:{port}", "redis"),
    ("MONGO_URI", "mongodb://127.0.0.1:{port}/chat?serverSelectionTimeoutMS=1500", "mongodb"),
])
def test_worker_check_reports_a_dead_server(stack, var, url, name):
    r = stack.run_worker("--check", env={var: url.format(port=_closed_port())})
    assert r.returncode == 1
    line = [l for l in r.stdout.splitlines() if l.startswith(name)][0]
    assert "FAIL" in line, r.stdout


def test_worker_check_reports_a_dead_kafka(stack):
    r = stack.run_worker("--check", env={"KAFKA_BROKERS": f"127.0.0.1:{_closed_port()}"}, timeout=90)
    assert r.returncode == 1
    line = [l for l in r.stdout.splitlines() if l.startswith("kafka")][0]
    assert "FAIL" in line, r.stdout


def test_worker_rejects_bad_config(stack, tmp_path):
    bad = tmp_path / "w.conf"
    bad.write_text("queue = rabbitmq\n")
    r = subprocess.run([stack.worker, "--config", str(bad), "--check"], capture_output=True, text=True)
    assert r.returncode == 2 and "queue must be" in r.stderr
    bad.write_text("no_such_key = 1\n")
    r = subprocess.run([stack.worker, "--config", str(bad), "--check"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key" in r.stderr


def test_stack_status_sees_every_component(stack):
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), "status", "--dir", stack.dir],
                       capture_output=True, text=True, env=stack.proc_env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("redis", "kafka", "ferretdb", "nginx", "worker-fanout", "worker-persist", "worker-rest"):
        assert re.search(rf"^{name}\s+running", r.stdout, re.M), r.stdout
    assert "nginx            answers" in r.stdout


def test_stack_env_file_has_the_contract_keys(stack):
    for k in ("CHAT_WS_URL", "CHAT_HTTP_URL", "CHAT_JWT_SECRET", "REDIS_URL", "MONGO_URI",
              "KAFKA_BROKERS", "CHAT_QUEUE"):
        assert stack.env.get(k), k
    assert stack.env["CHAT_WS_URL"].startswith("ws://127.0.0.1:")


def test_redis_runs_with_aof(stack):
    import redis
    r = redis.Redis.from_url(stack.env["REDIS_URL"])
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.config_get("appendfsync")["appendfsync"] == "everysec"
    # rewrites at 400 % growth (a fork and the whole dataset each time)
    assert r.config_get("auto-aof-rewrite-percentage")["auto-aof-rewrite-percentage"] == "400"


from helpers import example_conf as _example_conf, module_path as _module  # noqa: F401
from helpers import ack_of, msgs, send, uniq, ws  # noqa: E402


def test_nginx_accepts_the_shipped_example_conf(tmp_path):
    conf = _example_conf(tmp_path, _module())
    r = subprocess.run(nginx_argv("-t", "-p", str(tmp_path), "-c", str(conf)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


@pytest.mark.parametrize("bad,complaint", [
    ("chat_websocket on;", "invalid number of arguments"),
    ("chat_redis;", "invalid number of arguments"),
    ("chat_jwt_secret_file /nonexistent/secret;", "failed"),
])
def test_nginx_rejects_bad_directives(tmp_path, bad, complaint):
    conf = _example_conf(tmp_path, _module())
    text = conf.read_text()
    if bad.startswith("chat_websocket"):
        text = text.replace("include ", f"location /x {{ {bad} }}\n        include ", 1)
    else:
        text = text.replace("http {", "http {\n    " + bad, 1)
    conf.write_text(text)
    r = subprocess.run(nginx_argv("-t", "-p", str(tmp_path), "-c", str(conf)), capture_output=True, text=True)
    assert r.returncode != 0
    assert complaint in r.stderr, r.stderr


@pytest.mark.parametrize("line,complaint", [
    ("chat_redis redis://127.0.0.1:7000 redis://127.0.0.1:7001; chat_redis_cluster on;", None),
    ("chat_redis redis://:pw@127.0.0.1:7000; chat_redis_cluster on;", None),       # one seed is fine
    ("chat_redis redis://127.0.0.1:7000 redis://127.0.0.1:7001;", "chat_redis_cluster on"),
    ("chat_redis redis://127.0.0.1:7000/2 redis://127.0.0.1:7001; chat_redis_cluster on;", "database 0"),
    ("chat_redis redis://127.0.0.1:7000 http://x; chat_redis_cluster on;", "is not redis://"),
    ("chat_redis redis://127.0.0.1:7000; chat_redis_cluster maybe;", "invalid value"),
    ("chat_redis unix:///run/redis/redis.sock;", None),                          # a single node's socket
    ("chat_redis unix://:pw@/run/redis/redis.sock?db=2;", None),
    ("chat_redis unix://run/redis.sock;", "is not redis://"),                    # the path must be absolute
    ("chat_redis unix:///run/redis/redis.sock; chat_redis_cluster on;", "over TCP, not a unix socket"),
])
def test_chat_redis_seeds_need_the_cluster_flag(tmp_path, line, complaint):
    """Several chat_redis URLs are a cluster's seeds (chat_redis_cluster on),
    checked by nginx -t; the accepted forms are the positive control."""
    conf = _example_conf(tmp_path, _module())
    text = conf.read_text()
    assert "chat_redis redis://127.0.0.1:6379;" in text
    conf.write_text(text.replace("chat_redis redis://127.0.0.1:6379;", line, 1))
    r = subprocess.run(nginx_argv("-t", "-p", str(tmp_path), "-c", str(conf)), capture_output=True, text=True)
    if complaint is None:
        assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr
    else:
        assert r.returncode != 0 and complaint in r.stderr, r.stderr


def test_the_stacks_nginx_and_workers_reach_redis_over_its_unix_socket(stack):
    """scripts/stack gives its own Redis a unix socket (mode 700) and points
    nginx and the workers at it (only the stack's user reaches the servers'
    Redis; no TCP stack per round trip); the TCP port stays for tools and tests.
    Every connection from the module and the workers is on the socket, and
    the stack serves a message through it."""
    env = stack.env
    if env.get("REDIS_CLUSTER") == "on":
        pytest.fail("this test runs on the single-node stack (the cluster is TCP only)")
    sock = os.path.join(stack.dir, "redis", "redis.sock")
    if len(sock) > 100:
        # longer than sun_path allows with room to spare: the stack says TCP
        assert env["CHAT_SERVERS_REDIS_URL"] == env["REDIS_URL"], env
        return
    assert env["CHAT_SERVERS_REDIS_URL"] == "unix://" + sock, env.get("CHAT_SERVERS_REDIS_URL")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o700"
    assert f"chat_redis unix://{sock};" in open(env["CHAT_NGINX_CONF"]).read()
    assert f"redis_url = unix://{sock}" in open(env["CHAT_WORKER_CONF"]).read()
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    clients = r.client_list()
    on_socket = [c for c in clients if c["addr"].startswith(sock)]
    # each nginx worker process subscribes to its delivery channel
    # chat:w:<host>:<pid>: every such subscriber is on the socket
    channels = [ch for ch in r.pubsub_channels("chat:w:*") if ch != "chat:w:all"]
    assert channels, "no nginx worker subscribed"
    subscribers = [c for c in clients if int(c.get("sub", 0)) > 0]
    assert len(subscribers) >= len(channels) and all(c in on_socket for c in subscribers), subscribers
    # and the workers' roles: the queue's consumers read the streams over it
    assert len(on_socket) >= len(channels) * 2 + 3, on_socket
    a, b = uniq("a"), uniq("b")
    a1, b1 = ws(stack, a), ws(stack, b)
    cid = send(a1, b, "over the socket")
    ack = ack_of(a1, cid)
    got = msgs(b1, 1)[0]
    assert got["id"] == ack["id"] and got["body"] == "over the socket"
    a1.close()
    b1.close()


def test_module_is_loaded_and_answers(stack):
    status, _, body = stack.request("GET", stack.env["CHAT_STATUS_URL"])
    assert status == 200, body
    assert b"ngx_chat_connections" in body


def test_token_script_signs_with_the_stack_secret(stack):
    r = subprocess.run([os.path.join(ROOT, "scripts/token"), "alice", "phone", "--dir", stack.dir],
                       capture_output=True, text=True, check=True)
    tok = r.stdout.strip()
    h, p, s = tok.split(".")
    import base64, json, time
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    assert claims["sub"] == "alice" and claims["dev"] == "phone" and claims["exp"] > time.time()
    again = make_jwt(stack.secret, claims)
    assert again.split(".")[2] == s


def test_compose_file_parses():
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose (Debian package) is missing: scripts/setup installs it")
    secret = os.path.join(ROOT, "build", "compose-test-secret")
    os.makedirs(os.path.dirname(secret), exist_ok=True)
    with open(secret, "w") as f:
        f.write("x" * 44 + "\n")
    r = subprocess.run(["docker-compose", "-f", os.path.join(ROOT, "docker/docker-compose.yml"), "config"],
                       capture_output=True, text=True, env={**os.environ, "CHAT_JWT_SECRET_FILE": secret})
    assert r.returncode == 0, r.stderr
    for svc in ("redis:", "kafka:", "mongo:", "nginx:", "chat-fanout:", "chat-persist:", "chat-rest:"):
        assert svc in r.stdout


def test_docker_config_stays_in_step_with_conf():
    """docker/nginx.conf must use the same locations file and the same directives as conf/."""
    dconf = open(os.path.join(ROOT, "docker/nginx.conf")).read()
    conf = open(os.path.join(ROOT, "conf/nginx.conf")).read()
    assert "include /etc/ngx-chat/chat-locations.conf;" in dconf
    directives = lambda t: sorted(set(re.findall(r"^\s*(chat_\w+)", t, re.M)))
    assert directives(dconf) == directives(conf)
    df = open(os.path.join(ROOT, "docker/Dockerfile")).read()
    assert "COPY conf/chat-locations.conf" in df
