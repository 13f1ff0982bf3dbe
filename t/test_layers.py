"""The module's files call only downward (issue 11): codecs, support,
store adapters, session core, features, transports, module glue. A call
from a lower layer to a higher one, or a cycle within a layer, fails here
(read from the sources; no stack needed)."""
import os
import re

from chatlib import ROOT

MOD = os.path.join(ROOT, "ngx_chat_module")
LIB = os.path.join(ROOT, "libchat")

LAYERS = [
    ("support", ["status", "rate", "http", "auth", "cors"]),
    ("store adapters", ["redis", "kafka"]),
    ("session core", ["session"]),
    ("features", ["msg", "deliver", "presence", "typing", "router"]),
    ("transports", ["ws", "poll"]),
    ("module glue", ["module"]),
]


def _sources():
    """name -> (folder relative to ngx_chat_module, text) of every glue file"""
    out = {}
    for d, _, fs in os.walk(MOD):
        for f in fs:
            if f.startswith("ngx_chat_") and f.endswith(".c"):
                out[f[len("ngx_chat_"):-2]] = (os.path.relpath(d, MOD), open(os.path.join(d, f)).read())
    return out


def _graph():
    files = {n: src for n, (_, src) in _sources().items()}
    defs = {n: set(re.findall(r"^(ngx_chat_[a-z_]+)\(", src, re.M)) for n, src in files.items()}
    edges = set()
    for a, src in files.items():
        body = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
        for b, names in defs.items():
            if a != b and any(re.search(r"\b%s\b" % n, body) for n in names):
                edges.add((a, b))
    return files, edges


FOLDERS = {"support": "support", "store adapters": "store", "session core": "session",
           "features": "features", "transports": "transport", "module glue": "."}


def test_every_module_file_has_a_layer_and_lives_in_its_folder():
    src = _sources()
    placed = {n for _, ns in LAYERS for n in ns}
    assert set(src) == placed, set(src) ^ placed
    for layer, ns in LAYERS:
        for n in ns:
            assert src[n][0] == FOLDERS[layer], (n, src[n][0], layer)


def test_calls_go_only_downward_and_never_in_a_circle():
    _, edges = _graph()
    rank = {n: i for i, (_, ns) in enumerate(LAYERS) for n in ns}
    up = [(a, b) for a, b in edges if rank[b] > rank[a]]
    assert up == [], up
    # positive control: the graph is not empty (the reader works)
    assert ("module", "redis") in edges and ("ws", "router") in edges
    # within a layer: no cycle
    succ = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)
    state = {}

    def visit(n, path):
        assert state.get(n) != 1, "cycle: " + " -> ".join(path + [n])
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in sorted(succ.get(n, ())):
            visit(m, path + [n])
        state[n] = 2
    for n in list(succ):
        visit(n, [])


def test_libchat_knows_no_nginx():
    files = [f for f in os.listdir(LIB) if f.endswith((".c", ".h"))]
    assert len(files) >= 10
    for f in files:
        src = open(os.path.join(LIB, f)).read()
        assert "ngx_" not in re.sub(r"/\*.*?\*/", "", src, flags=re.S), f
