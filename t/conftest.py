"""pytest harness: starts a private stack (real Redis, Kafka, FerretDB, nginx
with our module, workers) for the session and stops it at the end.

Environment:
  CHAT_TEST_STACK_DIR   where the test stack lives (default .stack-test)
  CHAT_TEST_PORT_BASE   its port base (default 17300, so a dev stack on 17100 can run too)
  CHAT_TEST_KEEP=1      leave the stack running after the session (for debugging)
  CHAT_TEST_QUEUES      queues to run the suite against (default "redis,kafka")
  CHAT_TEST_DURABLE_CLUSTER_PORT  the same for the --replicas 1 cluster stack of
                        t/test_cluster_durability.py (default port base + 70; its stack at + 60)
  CHAT_TEST_CLUSTER_PORT  first port of the Redis Cluster stack's 6 nodes (default port base + 30;
                        the cluster stack itself, t/test_cluster.py, uses port base + 20 and the
                        stack dir + "-cluster")
  CHAT_TEST_TOPOLOGIES  topologies of the modules that run on both (default "single,cluster"):
                        a module opts in with `pytestmark = pytest.mark.topologies("single",
                        "cluster")` and its tests then run on the single-node stack ([redis],
                        [kafka]) and on the cluster stack ([redis-cluster], [kafka-cluster]), the
                        same one t/test_cluster.py uses (cluster_stack); a test that needs the
                        single node is marked single_only(reason)
  NGX_CHAT_MODULE, NGX_CHAT_WORKER   binaries to test (make test-asan points them at the ASan build)
  NGX_CHAT_SAN=1        sanitizer run: nginx and workers get the ASan runtime; reports fail the session
"""
import glob
import os
import subprocess

import pytest

from chatlib import Stack, ROOT


def _san_env(stack_dir):
    env = {}
    if os.environ.get("NGX_CHAT_SAN") == "1":
        libasan = subprocess.check_output(["gcc", "-print-file-name=libasan.so"], text=True).strip()
        libubsan = subprocess.check_output(["gcc", "-print-file-name=libubsan.so"], text=True).strip()
        logs = os.path.join(stack_dir, "logs")
        os.makedirs(logs, exist_ok=True)
        # nginx itself (Debian's build) does not free its cycle at exit: leaks are
        # checked in the workers and unit tests, not in nginx.
        env["NGINX_WRAPPER"] = (f"env LD_PRELOAD={libasan}:{libubsan} "
                                f"ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:log_path={logs}/asan-nginx "
                                f"UBSAN_OPTIONS=print_stacktrace=1:log_path={logs}/ubsan-nginx")
        env["WORKER_WRAPPER"] = (f"env ASAN_OPTIONS=detect_leaks=1:log_path={logs}/asan-worker "
                                 f"UBSAN_OPTIONS=print_stacktrace=1:log_path={logs}/ubsan-worker")
    return env


def pytest_configure(config):
    config.addinivalue_line("markers", "queue(name): the test applies to that queue only")
    config.addinivalue_line("markers", "heavy: a load test; runs after the others of its stack, so the "
                                       "persistence backlog it leaves (FerretDB is slow) delays no other test")
    config.addinivalue_line("markers", "topologies(*names): the module's tests run on these stack topologies "
                                       "(single, cluster; default single only)")
    config.addinivalue_line("markers", "single_only(reason): in a module that runs on both topologies, this "
                                       "test needs the single-node stack (it is not collected for the cluster)")


QUEUES = [q for q in os.environ.get("CHAT_TEST_QUEUES", "redis,kafka").split(",") if q]
TOPOLOGIES = [t for t in os.environ.get("CHAT_TEST_TOPOLOGIES", "single,cluster").split(",") if t]
# the order the stacks run in: one stack at a time (pytest stops a session
# fixture's stack when the next parameter is asked for)
STACKS = [q + ("" if t == "single" else "-" + t) for q in QUEUES for t in ("single", "cluster")]


def pytest_generate_tests(metafunc):
    """The stack a test runs on is one parameter, "<queue>" (single node) or
    "<queue>-cluster": a test asking for cluster_stack gets the cluster
    ones; a module marked topologies("single", "cluster") both (unless
    CHAT_TEST_TOPOLOGIES leaves one out, or the test is single_only);
    every other test the single-node ones."""
    if "stack" not in metafunc.fixturenames:
        return
    if "cluster_stack" in metafunc.fixturenames:
        tops = ["cluster"]
    else:
        m = metafunc.definition.get_closest_marker("topologies")
        tops = list(m.args) if m else ["single"]
        if m:
            tops = [t for t in tops if t in TOPOLOGIES]
        if metafunc.definition.get_closest_marker("single_only"):
            tops = [t for t in tops if t == "single"]
    params = [s for s in STACKS if _topology(s) in tops]
    # none left (CHAT_TEST_TOPOLOGIES=cluster and a single_only test): one
    # placeholder, deselected below, rather than pytest's skip of an empty set
    metafunc.parametrize("stack", params or [NO_STACK], indirect=True, scope="session")


NO_STACK = "none"


def _queue(param):
    return param.split("-")[0] if param else None


def _topology(param):
    return param.partition("-")[2] or "single"


def pytest_collection_modifyitems(config, items):
    """A test marked queue("redis") runs only with the Redis stacks: it is not
    collected for the other queue (not skipped)."""
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("queue")
        param = _stack_of(item)
        (drop if param == NO_STACK or m and param and m.args[0] != _queue(param) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # one stack after the other, heavy tests last within each stack's run
    out = []
    for s in STACKS:
        mine = [i for i in items if _stack_of(i) == s]
        out += [i for i in mine if not i.get_closest_marker("heavy")] + \
               [i for i in mine if i.get_closest_marker("heavy")]
    out += [i for i in items if _stack_of(i) not in STACKS]
    items[:] = out


def _stack_of(item):
    return getattr(getattr(item, "callspec", None), "params", {}).get("stack")


@pytest.fixture(scope="session")
def stack(request):
    """The whole suite runs once per queue (Redis Streams, Kafka); modules
    marked topologies("single", "cluster") on the cluster stack as well
    (request.param "<queue>-cluster": the cluster_stack, node 1)."""
    queue = _queue(request.param)
    base = os.environ.get("CHAT_TEST_STACK_DIR", os.path.join(ROOT, ".stack-test"))
    port_base = int(os.environ.get("CHAT_TEST_PORT_BASE", "17300"))
    if _topology(request.param) == "cluster":
        cport = os.environ.get("CHAT_TEST_CLUSTER_PORT", str(port_base + 30))
        yield from _run_stack(queue, base + "-cluster", str(port_base + 20),
                              ["--cluster", "--cluster-port", cport])
    else:
        yield from _run_stack(queue, base, str(port_base), [])


@pytest.fixture(scope="session")
def cluster_stack(stack):
    """The stack on a 6-node Redis Cluster (scripts/stack up --cluster), once
    per queue, its own dir (stack dir + "-cluster") and ports (port base +
    20, the cluster nodes + 30..35): two nginx nodes (the stack's env:
    CHAT_WS_URL is node 1, CHAT_WS_URL_2 node 2) and two fan-out workers
    (t/test_cluster_nodes.py). It is the `stack` of the "<queue>-cluster"
    parameters: the modules that run on both topologies share it."""
    assert stack.env["REDIS_CLUSTER"] == "on"
    return stack


@pytest.fixture(scope="session", params=QUEUES)
def durable_cluster_stack(request):
    """The cluster stack with --replicas 1 (chat_redis_replicas 1 in nginx,
    redis_replicas = 1 in the workers): t/test_cluster_durability.py. Its
    own dir (stack dir + "-durable") and ports (port base + 60, cluster
    nodes + 70..75, CHAT_TEST_DURABLE_CLUSTER_PORT)."""
    stack_dir = os.environ.get("CHAT_TEST_STACK_DIR", os.path.join(ROOT, ".stack-test")) + "-durable"
    port_base = int(os.environ.get("CHAT_TEST_PORT_BASE", "17300")) + 60
    cport = os.environ.get("CHAT_TEST_DURABLE_CLUSTER_PORT", str(port_base + 10))
    yield from _run_stack(request.param, stack_dir, str(port_base),
                          ["--cluster", "--cluster-port", cport, "--replicas", "1"])


def _run_stack(queue, stack_dir, port_base, extra):
    env = dict(os.environ)
    env.update(_san_env(stack_dir))
    if os.environ.get("NGX_CHAT_SAN") != "1":
        # glibc fills freed memory: nginx's own code (not instrumented by
        # ASan) reading memory our module freed then crashes at once instead
        # of once in many runs (a session's log used after the session).
        env.setdefault("MALLOC_PERTURB_", "165")
    # A stale stack from an interrupted run must not leak into this one.
    subprocess.run([os.path.join(ROOT, "scripts/stack"), "down", "--dir", stack_dir],
                   env=env, capture_output=True)
    # Every session starts from empty servers: data of an earlier run (users
    # with inboxes, stream entries) must not leak into this one.
    import shutil
    for d in ("redis", "redis-cluster", "kafka", "ferretdb"):
        shutil.rmtree(os.path.join(stack_dir, d), ignore_errors=True)
    # Logs of an earlier run must not be read as this run's.
    for f in (glob.glob(os.path.join(stack_dir, "logs", "*"))
              + glob.glob(os.path.join(stack_dir, "nginx*", "logs", "*"))):
        if os.path.isfile(f):
            os.unlink(f)
    # --test: the test-only locations (conf/test-locations.conf), which a
    # stack users run does not have
    r = subprocess.run([os.path.join(ROOT, "scripts/stack"), "up", "--test", "--dir", stack_dir,
                        "--port-base", port_base, "--queue", queue, *extra],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail("scripts/stack up failed:\n" + r.stdout + r.stderr, pytrace=False)
    s = Stack(stack_dir, env)
    yield s
    if os.environ.get("CHAT_TEST_KEEP") != "1":
        subprocess.run([os.path.join(ROOT, "scripts/stack"), "down", "--dir", stack_dir],
                       env=env, capture_output=True, timeout=120)
    reports = glob.glob(os.path.join(stack_dir, "logs", "*san-*"))
    if reports:
        text = "".join(open(f, errors="replace").read()[:4000] for f in reports)
        pytest.fail("sanitizer reports in the stack:\n" + text, pytrace=False)
    crashes = s.nginx_crashes()
    if crashes:
        pytest.fail("nginx worker crashed:\n" + "\n".join(crashes), pytrace=False)


@pytest.fixture(autouse=True)
def _no_nginx_crash(request):
    """A worker dying during a test fails that test, not the session's end."""
    s = request.getfixturevalue("stack") if "stack" in request.fixturenames else None
    before = len(s.nginx_crashes()) if s else 0
    yield
    if s:
        crashes = s.nginx_crashes()
        if len(crashes) > before:
            pytest.fail("nginx worker crashed during this test:\n" + "\n".join(crashes[before:]),
                        pytrace=False)


# ---- fixtures of the servers the stack runs (one set for every test module) ----

@pytest.fixture(scope="module")
def r(stack):
    """The stack's Redis: on the cluster stack a cluster client (redis-py's
    RedisCluster, routed by key slot)."""
    from helpers import redis_client
    c = redis_client(stack)
    yield c
    c.close()


@pytest.fixture(scope="module")
def db(stack):
    """The stack's MongoDB database."""
    import pymongo
    c = pymongo.MongoClient(stack.env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    yield c.get_default_database()
    c.close()


@pytest.fixture(scope="module")
def q(stack, r):
    """The stack's queue (helpers.Queue)."""
    from helpers import Queue
    qq = Queue(stack, r)
    yield qq
    qq.close()


@pytest.fixture
def chan(r):
    """Everything published on the nginx worker channels (helpers.Channel)."""
    from helpers import Channel
    ch = Channel(r)
    yield ch
    ch.close()
