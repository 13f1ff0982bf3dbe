#!/usr/bin/env bash
# The cost of chat_redis_replicas (issue 12 item 4): one-to-one load on one
# cluster stack, alternating --replicas 0 and 1 (nginx reloaded, the
# fan-out worker restarted with the other redis_replicas), printing
# loadgen's summary line and the WAITs per durable accept of the run
# (the module's status counters).
#
#   scripts/stack up --bench --cluster --cluster-port 17590 --dir .stack-rb --port-base 17580 --queue redis
#   bench/replicas_bench.sh .stack-rb "1000 3000" 2
#   scripts/stack down --dir .stack-rb
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dir=$(cd "${1:?stack dir}" && pwd); rates=${2:-"1000 3000"}; rounds=${3:-2}
metric() { curl -fsS "$(grep CHAT_STATUS_URL "$dir/env" | cut -d= -f2)" | awk -v m="$1" '$1 == m {print $2}'; }
set_replicas() {
  "$top/scripts/stack" up --dir "$dir" --replicas "$1" >/dev/null 2>&1
  nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -s reload
  "$top/scripts/stack" kill worker-fanout --dir "$dir" >/dev/null 2>&1
  "$top/scripts/stack" up --dir "$dir" >/dev/null 2>&1
  sleep 3      # the old nginx worker processes leave
}
for round in $(seq "$rounds"); do
  for n in 0 1; do
    set_replicas "$n"
    for rate in $rates; do
      w0=$(metric ngx_chat_redis_waits_total); d0=$(metric ngx_chat_redis_durable_accepts_total)
      "$top/build/loadgen" --label "r$round-replicas$n-$rate" --target chat --env "$dir/env" \
        --scenario one2one --pairs 200 --duration 8 --rate "$rate" --drain 5 | grep -E '^RESULT|acked|lost' || true
      w1=$(metric ngx_chat_redis_waits_total); d1=$(metric ngx_chat_redis_durable_accepts_total)
      echo "round $round replicas $n rate $rate: WAITs $((w1 - w0)) durable accepts $((d1 - d0))"
    done
  done
done
