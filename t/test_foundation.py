"""Issue 2: the foundation. The stack runs real servers, the worker proves
each one works, the module loads into Debian's nginx, the shipped
configuration is accepted, the compose file parses."""
import os
import re
import shutil
import socket
import subprocess

import pytest

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


from helpers import example_conf as _example_conf, module_path as _module  # noqa: F401


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
