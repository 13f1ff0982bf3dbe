"""Issue 3: 15,000 simultaneous WebSocket connections held with heartbeats
flowing (our C load generator in 4 processes, under the 20,000 open files a
process may have)."""
import os
import re
import subprocess

from chatlib import ROOT


def test_15000_websockets_held_with_heartbeats(stack):
    loadgen = os.path.join(ROOT, "build/loadgen")
    r = subprocess.run([loadgen, "--target", "chat", "--env", os.path.join(stack.dir, "env"),
                        "--scenario", "idle", "--conns", "15000", "--procs", "4", "--ramp", "2500",
                        "--hold", "10", "--ping-interval", "2", "--src-addrs", "8", "--max-time", "150"],
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = dict(kv.split("=", 1) for kv in line.split()[1:])
    assert int(res["established"]) == 15000 and int(res["failed"]) == 0, line
    assert int(res["held"]) == 15000 and int(res["dropped"]) == 0, line
    # every connection pinged at least a few times and got every pong back
    assert int(res["pings"]) >= 15000 * 3 and int(res["pongs"]) == int(res["pings"]), line
