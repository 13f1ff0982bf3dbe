#!/usr/bin/env python3
"""PNG plots from the raw output of scripts/bench (build/bench/*.txt).

    .venv/bin/python bench/plot.py build/bench/one2one-*.txt [-o DIR]

Reads the RESULT lines the load generator prints and draws, per input file:
  idle              bytes per connection in the nginx workers, per target
  churn             achieved against offered connections per second
  one2one, fanout   send-to-delivery latency (p50, p90, p99, p99.9, max)
                    against offered load, one line style per target
  offline           drain time per target
Writes <input name>.png next to the input (or into DIR).  Needs matplotlib
(`.venv/bin/pip install matplotlib`).
"""
import argparse
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def results(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("RESULT "):
                continue
            kv = {}
            for tok in line.split()[1:]:
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    kv[k] = v
            out.append(kv)
    return out


def num(r, k, default=0.0):
    try:
        return float(r.get(k, default))
    except ValueError:
        return default


def plot_idle(rs, ax):
    names = [r["target"] for r in rs if "rss_per_conn" in r]
    rss = [num(r, "rss_per_conn") / 1024 for r in rs if "rss_per_conn" in r]
    pss = [num(r, "pss_per_conn") / 1024 for r in rs if "rss_per_conn" in r]
    held = [int(num(r, "held")) for r in rs if "rss_per_conn" in r]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], rss, 0.4, label="RSS")
    ax.bar([i + 0.2 for i in x], pss, 0.4, label="PSS")
    for i, (v, h) in enumerate(zip(rss, held)):
        ax.annotate(f"{v:.1f} KiB\n({h} held)", (i - 0.2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_ylim(0, max(rss + pss + [1]) * 1.2)
    ax.set_ylabel("nginx worker memory per idle connection (KiB)")
    ax.set_title("Idle WebSocket connections: memory per connection")
    ax.legend()


def plot_latency(rs, ax, scenario):
    by_target = defaultdict(list)
    for r in rs:
        if num(r, "lat_n") > 0:
            key = r["target"]
            if scenario == "fanout":
                key += f" ({r.get('flows', '?')} x {r.get('members', '?')} members)"
            by_target[key].append(r)
    styles = ["-", "--", ":", "-."]
    colors = {"lat_p50_us": "C0", "lat_p90_us": "C1", "lat_p99_us": "C2",
              "lat_p999_us": "C3", "lat_max_us": "C4"}
    labels = {"lat_p50_us": "p50", "lat_p90_us": "p90", "lat_p99_us": "p99",
              "lat_p999_us": "p99.9", "lat_max_us": "max"}
    for i, (target, lst) in enumerate(sorted(by_target.items())):
        lst.sort(key=lambda r: num(r, "rate"))
        rates = [num(r, "rate") for r in lst]
        for k in colors:
            ax.plot(rates, [num(r, k) / 1000 for r in lst], styles[i % len(styles)],
                    color=colors[k], marker="o", markersize=3, label=f"{target} {labels[k]}")
    ax.set_xlabel("offered load (messages per second)")
    ax.set_ylabel("send to delivery (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{scenario}: latency against offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_churn(rs, ax):
    names = [r["target"] for r in rs]
    ax.bar([i - 0.2 for i in range(len(rs))], [num(r, "churn_offered") for r in rs], 0.4, label="offered")
    ax.bar([i + 0.2 for i in range(len(rs))], [num(r, "churn_achieved") for r in rs], 0.4, label="achieved")
    ax.set_xticks(range(len(rs)))
    ax.set_xticklabels(names)
    ax.set_ylabel("connections per second")
    ax.set_title("Connection churn")
    ax.legend()


def plot_offline(rs, ax):
    names = [r["target"] for r in rs]
    ax.bar(range(len(rs)), [num(r, "drain_max_us") / 1e6 for r in rs])
    ax.set_xticks(range(len(rs)))
    ax.set_xticklabels(names)
    ax.set_ylabel("slowest drain (s)")
    ax.set_title("Offline catch-up: time to drain the waiting messages")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("-o", "--outdir")
    a = ap.parse_args()
    rc = 0
    for path in a.files:
        rs = results(path)
        if not rs:
            print(f"{path}: no RESULT lines", file=sys.stderr)
            rc = 1
            continue
        scenario = rs[0].get("scenario", "?")
        fig, ax = plt.subplots(figsize=(8, 5))
        if scenario == "idle":
            plot_idle(rs, ax)
        elif scenario == "churn":
            plot_churn(rs, ax)
        elif scenario == "offline":
            plot_offline(rs, ax)
        else:
            plot_latency(rs, ax, scenario)
        fig.tight_layout()
        base = os.path.splitext(os.path.basename(path))[0] + ".png"
        out = os.path.join(a.outdir or os.path.dirname(path) or ".", base)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        print(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
