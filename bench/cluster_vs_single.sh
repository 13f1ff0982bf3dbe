#!/usr/bin/env bash
# One-to-one on the single-node stack and on the cluster stack, alternating,
# with the CPU each component spent and the Redis commands each node ran per
# delivered message (bench/cpu_split.py). Both stacks must be up:
#
#   scripts/stack up --bench --dir /tmp/size-stack --port-base 18300
#   scripts/stack up --bench --cluster --cluster-port 18450 --dir /tmp/size-cl --port-base 18420
#   bench/cluster_vs_single.sh /tmp/size-stack /tmp/size-cl > run.log
#   bench/cluster_vs_single.py run.log      # the table in docs/BENCHMARKS.md
#
# ROUNDS (2), RATES ("1000 2000"), PAIRS (500), DURATION (15) override.
set -euo pipefail
cd "$(dirname "$0")/.."
single=${1:?single-node stack dir}; cluster=${2:?cluster stack dir}
make -s loadgen
for round in $(seq 1 "${ROUNDS:-2}"); do
  for rate in ${RATES:-1000 2000}; do
    for t in "$single" "$cluster"; do
      kind=single; [ "$t" = "$cluster" ] && kind=cluster
      echo "=== round $round $kind rate $rate $(date +%T)"
      .venv/bin/python bench/cpu_split.py --dir "$t" --per-result -- \
        build/loadgen --target chat --env "$t/env" --scenario one2one \
          --pairs "${PAIRS:-500}" --duration "${DURATION:-15}" --rate "$rate" --drain 5 2>&1 |
        grep -E '^(RESULT|CPUSPLIT)|commands'
    done
  done
done
# which nodes were masters during the run
for t in "$cluster"; do
  port=$(sed -n 's/^REDIS_SEEDS=redis:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$t/env")
  redis-cli -p "$port" cluster nodes | awk '$3 ~ /master/ {split($2, a, "@"); split(a[1], b, ":"); print "MASTER redis-" b[2]}'
done
