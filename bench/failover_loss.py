#!/usr/bin/env python3
"""What a Redis master killed under load loses (issue 12 item 4): the
scenario of t/test_cluster_durability.py (failover_run: 4 senders, 2,000
one-to-one messages, every user and the shard on one master, kill -9 of
that master when 30 % are acknowledged, every `unavailable` retried with
its client_id) against a cluster stack of either kind, counting the
acknowledged messages that never reached their recipient or MongoDB.

  scripts/stack up --test --cluster --cluster-port 18600 --dir .stack-fl --port-base 17580 \\
      --queue redis --replicas 0
  .venv/bin/python bench/failover_loss.py --dir .stack-fl [--runs 3]
  scripts/stack down --dir .stack-fl

Each run kills the master holding its users (the node comes back as a
replica after it). With --combined a run is the whole fault run of
t/test_cluster_faults.py instead (8 senders on both nginx nodes, 2,000
messages; a master killed, a slot range resharded, nginx node 2 and fan-out
worker 2 killed; `scripts/stack up` after it). A measurement, not a test: with --replicas 0 nothing is
guaranteed, the number depends on how much the master had not yet sent its
replica when it died."""
import argparse
import json
import os
import sys

top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(top, "t"))

from chatlib import Stack  # noqa: E402
from test_cluster_durability import failover_run, tally  # noqa: E402
from test_cluster_faults import combined_run, stack_cmd  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--per-pair", type=int, default=500)
    ap.add_argument("--combined", action="store_true", help="the combined fault run (t/test_cluster_faults.py)")
    args = ap.parse_args()
    stack = Stack(os.path.abspath(args.dir), dict(os.environ))
    conf = open(stack.env["CHAT_NGINX_CONF"]).read()
    replicas = [ln.split()[1].rstrip(";") for ln in conf.splitlines() if "chat_redis_replicas" in ln]
    for i in range(args.runs):
        if args.combined:
            try:
                out = combined_run(stack, mongo_timeout=120, log=lambda m: print(m, file=sys.stderr))
            finally:
                stack_cmd(stack, "up")
            t = tally(out)
            t.update(faults=out["faults"])
        else:
            out = failover_run(stack, n_pairs=args.pairs, per_pair=args.per_pair, mongo_timeout=120)
            t = tally(out)
            t.update(acked_at_kill=out["acked_at_kill"])
        t.update(run=i + 1, chat_redis_replicas=replicas[0] if replicas else "0",
                 retries=out["retries"], reconnects=out["reconnects"])
        print(json.dumps(t), flush=True)


if __name__ == "__main__":
    main()
