"""The golden vectors of t/vectors/ as Python values (the C unit tests read
the same files): pure, importable from t/ and t/lua/ alike."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _unescape(s):
    """\\t \\n \\\\ \\xHH, to bytes"""
    out, i = bytearray(), 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            if n == "x":
                out.append(int(s[i + 2:i + 4], 16))
                i += 4
                continue
            out += {"t": b"\t", "n": b"\n"}.get(n, n.encode())
            i += 2
            continue
        out += c.encode()
        i += 1
    return bytes(out)


def entries():
    """[{"name", "ok", "why", "rcpts", "inbox", "fields": [(name, bytes)]}]"""
    out = []
    for line in open(os.path.join(HERE, "vectors/entries.txt"), encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        col = line.rstrip("\n").split("\t")
        verdict = col[1]
        out.append({"name": col[0], "ok": verdict == "ok", "why": None if verdict == "ok" else verdict[4:],
                    "rcpts": [] if col[2] == "-" else col[2].split(","), "inbox": None if col[3] == "-" else col[3],
                    "fields": [(c.split("=", 1)[0], _unescape(c.split("=", 1)[1])) for c in col[4:]]})
    return out


def entry(name):
    return next(v for v in entries() if v["name"] == name)


def crc16_xmodem(b):
    crc = 0
    for x in b:
        crc ^= x << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def key_slot(b):
    """The cluster spec's slot of key b (bytes), written here on its own so
    that it checks libchat's chat_cluster_slot through the shared vectors
    (t/vectors/slots.txt); the cluster tests route their own commands with it."""
    i = b.find(b"{")
    if i >= 0:
        j = b.find(b"}", i + 1)
        if j > i + 1:
            b = b[i + 1:j]
    return crc16_xmodem(b) % 16384
