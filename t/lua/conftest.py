"""Fixtures of the script tests: a bare redis-server of our own (a unix
socket in a temporary directory, nothing persisted) and the scripts exactly
as Redis gets them: lua/gen.sh's generated table, read back from C."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# t/golden.py (the golden vectors); appended, so "conftest" stays this one
sys.path.append(os.path.join(ROOT, "t"))


def _c_unescape(lit):
    out, i = [], 0
    while i < len(lit):
        c = lit[i]
        if c == "\\":
            n = lit[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}[n])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_table():
    d = tempfile.mkdtemp()
    try:
        subprocess.run(["sh", os.path.join(ROOT, "lua/gen.sh"), os.path.join(ROOT, "lua"), d], check=True)
        text = open(os.path.join(d, "chat_lua.c")).read()
    finally:
        shutil.rmtree(d)
    table = {}
    for m in re.finditer(r'\{ "([a-z_]+)",\n((?:      ".*"\n)+)    \},', text):
        table[m.group(1)] = "".join(_c_unescape(l.strip()[1:-1]) for l in m.group(2).splitlines())
    return table


SCRIPTS = load_table()


@pytest.fixture(scope="session")
def redis_server():
    d = tempfile.mkdtemp()
    sock = os.path.join(d, "redis.sock")
    p = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                          "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    yield sock
    p.terminate()
    p.wait(10)
    shutil.rmtree(d)


@pytest.fixture
def r(redis_server):
    c = redis.Redis(unix_socket_path=redis_server, decode_responses=True)
    c.flushall()
    return c


@pytest.fixture
def run(r):
    """run(name, keys, args): the script by its file name, as EVALSHA does."""
    shas = {n: r.script_load(src) for n, src in SCRIPTS.items()}

    def call(name, keys, args):
        return r.evalsha(shas[name], len(keys), *keys, *args)
    return call
