#!/usr/bin/env bash
# The sweeper benchmark (docs/BENCHMARKS.md "Expiry sweeper"): delivery
# p99 of one-to-one traffic at RATE msg/s without, then with the persist
# role's sweeper removing N expired messages (seeded straight into MongoDB
# and chat:{s<s>}:exp), and the sweeper's removal rate.
#
#   bench/sweep_bench.sh [N] [RATE] [DURATION_S]      (defaults 20000 1000 40)
#   DURATION_S: the run without the sweeper (or BASE_DURATION_S);
#   the run with the sweeper sends until every seeded message is removed
#   (at most MAX_SWEEP_S, default 10800 s), so its p99 covers the removal
#   PORT_BASE=17880 (stack ports), SWEEP_RATE / SWEEP_BATCH: the sweeper's settings
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
n=${1:-20000}; rate=${2:-1000}; dur=${3:-40}
pb=${PORT_BASE:-17880}; dir=$top/.stack-sweep
out=build/bench/sweep-$(date +%Y%m%d-%H%M%S).txt
mkdir -p build/bench
make -s loadgen worker
# a fresh stack: the seeded documents of an earlier run would collide
scripts/stack down --dir "$dir" >/dev/null 2>&1 || true
rm -rf "$dir"
# the sweeper's settings (workers/README.md), in the worker config the stack writes
CHAT_WORKER_CONF_EXTRA=$( [ -n "${SWEEP_RATE:-}" ] && echo "sweep_rate = $SWEEP_RATE"; [ -n "${SWEEP_BATCH:-}" ] && echo "sweep_batch = $SWEEP_BATCH"; true)
export CHAT_WORKER_CONF_EXTRA
scripts/stack up --bench --dir "$dir" --port-base "$pb" --queue redis >/dev/null
trap 'scripts/stack down --dir "$dir" >/dev/null 2>&1 || true' EXIT
. "$dir/env"
stop=$dir/sweep-done
lg() { build/loadgen --label "$1" --target chat --env "$dir/env" --redis "$REDIS_URL" --scenario one2one \
         --pairs 200 --duration "$2" --rate "$rate" --drain 15 --progress 10 "${@:3}" | tee -a "$out"; }
{ echo "== sweeper benchmark: N=$n rate=$rate duration=${dur}s $(date -u)"; grep sweep_ "$dir/chat-worker.conf" || true; } | tee -a "$out"
base=$(date +%s%3N)
.venv/bin/python bench/sweep_seed.py seed --env "$dir/env" --n "$n" --base "$base" | tee -a "$out"
echo "== without the sweeper (nothing expired yet)" | tee -a "$out"
lg no-sweep "${BASE_DURATION_S:-$dur}"
echo "== with the sweeper removing $n expired messages" | tee -a "$out"
.venv/bin/python bench/sweep_seed.py arm --env "$dir/env" --n "$n" --base "$base" | tee -a "$out"
rm -f "$stop"
.venv/bin/python bench/sweep_seed.py watch --env "$dir/env" --n "$n" --base "$base" --stop-file "$stop" >"$out.watch" 2>&1 &
w=$!
lg sweeping "${MAX_SWEEP_S:-10800}" --stop-file "$stop"
wait $w || true
cat "$out.watch" | tee -a "$out" | tail -3
echo "raw output: $out"
