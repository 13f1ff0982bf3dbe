#!/usr/bin/env python3
"""CPU per component of a running stack while a command runs.

    bench/cpu_split.py --dir .stack-bench [--per N | --per-result]
                       [--window START LENGTH] -- <command...>

Reads utime+stime of every process the stack started (the pid files in
<dir>/pids, plus the worker processes of each nginx master) before and after
the command, and prints the CPU each component spent, in total and, with
--per N (or --per-result: the `delivered=` of a loadgen RESULT line in the
command's output), per message. With --window the two samples are taken
START and START+LENGTH seconds after the command started (while it runs):
the cost of a phase alone, e.g. idle connections held after the connects
(--per then counts connection-seconds: connections x LENGTH). This is what the sizing model in
docs/SCALING.md is built from: which part of the system pays for a message.
"""
import argparse
import os
import socket
import re
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_of(pid):
    """utime+stime of pid and its threads, in seconds (None when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / HZ
    except (OSError, IndexError, ValueError):
        return None


def children(pid):
    out = []
    for task in os.listdir("/proc"):
        if not task.isdigit():
            continue
        try:
            with open(f"/proc/{task}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(task))
    return out


def components(stack_dir):
    """{component: [pids]}: nginx masters stand for their workers."""
    comp = {}
    pids_dir = os.path.join(stack_dir, "pids")
    for name in sorted(os.listdir(pids_dir)):
        try:
            pid = int(open(os.path.join(pids_dir, name)).read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if cpu_of(pid) is None:
            continue
        if name.startswith("nginx"):
            comp[name] = [pid] + children(pid)
        else:
            comp[name] = [pid] + children(pid)   # java, ferretdb: their own
    return comp


def redis_calls(port):
    """Commands a Redis node ran so far (INFO commandstats, every
    redis.call of a script counted): the calls per message per master."""
    try:
        sk = socket.create_connection(("127.0.0.1", port), timeout=5)
        sk.sendall(b"INFO commandstats\r\n")
        buf = b""
        while True:
            chunk = sk.recv(65536)
            if not chunk:
                break
            buf += chunk
            if buf.startswith(b"$"):
                n = int(buf[1:buf.index(b"\r\n")])
                if len(buf) >= buf.index(b"\r\n") + 2 + n:
                    break
        sk.close()
    except OSError:
        return None
    return sum(int(x) for x in re.findall(rb"cmdstat_[^:]+:calls=(\d+)", buf))


def redis_ports(comp):
    return {name: int(name.split("-", 1)[1]) for name in comp
            if name.startswith("redis-") and name.split("-", 1)[1].isdigit()}


def sample(comp):
    return {name: sum(cpu_of(p) or 0.0 for p in pids) for name, pids in comp.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--per", type=int, default=0)
    ap.add_argument("--per-result", action="store_true")
    ap.add_argument("--unit", default="delivered message")
    ap.add_argument("--window", type=float, nargs=2, metavar=("START", "LENGTH"))
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("a command to run")
    comp = components(a.dir)
    ports = redis_ports(comp)
    if not ports and "redis" in comp:
        try:
            ports = {"redis": int(open(os.path.join(a.dir, "redis.port")).read())}
        except (OSError, ValueError):
            ports = {}
    calls = lambda: {n: redis_calls(pt) for n, pt in ports.items()}
    if a.window:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        import threading
        chunks = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))
        reader.start()
        time.sleep(a.window[0])
        before, calls0, t0 = sample(comp), calls(), time.time()
        time.sleep(a.window[1])
        after, calls1, took = sample(comp), calls(), time.time() - t0
        proc.wait()
        reader.join()

        class P:
            stdout = "".join(chunks)
            returncode = proc.returncode
        p = P()
    else:
        before, calls0, t0 = sample(comp), calls(), time.time()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        after, calls1, took = sample(comp), calls(), time.time() - t0
    sys.stdout.write(p.stdout)
    per = a.per
    if a.per_result:
        m = re.findall(r"^RESULT .*\bdelivered=(\d+)", p.stdout, re.M)
        per = sum(int(x) for x in m)
    print(f"\nCPU per component during {took:.1f} s ({len(comp)} components)"
          + (f", per {a.unit} ({per})" if per else ""))
    print(f"{'component':<18} {'cpu s':>8} {'cores':>6}" + (f" {'us/unit':>9}" if per else ""))
    total = 0.0
    for name in comp:
        d = after[name] - before[name]
        total += d
        line = f"{name:<18} {d:8.2f} {d / took:6.2f}"
        if per:
            line += f" {d * 1e6 / per:9.1f}"
        print(line)
    line = f"{'all':<18} {total:8.2f} {total / took:6.2f}"
    if per:
        line += f" {total * 1e6 / per:9.1f}"
    print(line)
    for name in ports:
        if calls0[name] is None or calls1[name] is None:
            continue
        dc = calls1[name] - calls0[name]
        print(f"{name:<18} {dc:8d} commands" + (f", {dc / per:.2f} per {a.unit}" if per else ""))
    for name in comp:
        d = after[name] - before[name]
        print(f"CPUSPLIT component={name} cpu_s={d:.3f} took_s={took:.2f} per={per}")
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
