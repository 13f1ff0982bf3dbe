#!/usr/bin/env python3
"""The table of bench/cluster_vs_single.sh's output (docs/BENCHMARKS.md):
per run, delivery latency, and per delivered message the CPU of nginx, of
Redis (masters and replicas apart) and of the fan-out, and the commands
each master ran."""
import re
import sys


def main(path):
    runs, cur, masters = [], None, []
    for line in open(path):
        m = re.match(r"=== round (\d+) (single|cluster) rate (\d+)", line)
        if m:
            cur = {"round": m[1], "t": m[2], "rate": m[3], "cpu": {}, "calls": {}}
            runs.append(cur)
            continue
        m = re.match(r"MASTER (\S+)", line)
        if m:
            masters.append(m[1])
        if cur is None:
            continue
        if line.startswith("RESULT"):
            kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
            cur.update(n=int(kv["delivered"]), lost=kv["lost"], dups=kv["dups"],
                       p50=float(kv["lat_p50_us"]) / 1000, p99=float(kv["lat_p99_us"]) / 1000)
        m = re.match(r"CPUSPLIT component=(\S+) cpu_s=([\d.]+)", line)
        if m:
            cur["cpu"][m[1]] = float(m[2])
        m = re.match(r"(redis\S*)\s+(\d+) commands", line)
        if m:
            cur["calls"][m[1]] = int(m[2])
    print("| round | topology | msg/s | delivered | lost / dups | delivery p50 / p99 ms "
          "| nginx µs | Redis µs, masters | Redis µs, replicas | commands on masters "
          "| per master: µs · commands | fan-out µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "n" not in r:
            continue
        n, cpu = r["n"], r["cpu"]

        def us(pred):
            return sum(v for k, v in cpu.items() if pred(k)) * 1e6 / n

        ngx = us(lambda k: k.startswith("nginx"))
        fan = us(lambda k: k.startswith("worker-fanout"))
        if r["t"] == "cluster":
            mst = us(lambda k: k in masters)
            rep = us(lambda k: k.startswith("redis-") and k not in masters)
            calls = sum(r["calls"].get(m, 0) for m in masters) / n
            per = " / ".join(f'{cpu.get(m, 0) * 1e6 / n:.0f} · {r["calls"].get(m, 0) / n:.1f}'
                             for m in sorted(masters))
            rep_s = f"{rep:.0f}"
        else:
            mst = us(lambda k: k.startswith("redis"))
            calls = sum(r["calls"].values()) / n
            per, rep_s = "—", "—"
        print(f'| {r["round"]} | {r["t"]} | {r["rate"]} | {n} | {r["lost"]} / {r["dups"]} '
              f'| {r["p50"]:.1f} / {r["p99"]:.0f} | {ngx:.0f} | {mst:.0f} | {rep_s} | {calls:.1f} '
              f'| {per} | {fan:.0f} |')


if __name__ == "__main__":
    main(sys.argv[1])
