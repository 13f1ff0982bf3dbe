# Shared settings for scripts/*. Sourced, not run.
NGX_CHAT_CACHE=${NGX_CHAT_CACHE:-$HOME/.cache/ngx-chat}
KAFKA_VERSION=${KAFKA_VERSION:-3.9.1}
KAFKA_HOME=${KAFKA_HOME:-$NGX_CHAT_CACHE/kafka-$KAFKA_VERSION}
FERRETDB_VERSION=${FERRETDB_VERSION:-v1.24.2}
FERRETDB_BIN=${FERRETDB_BIN:-$NGX_CHAT_CACHE/bin/ferretdb-$FERRETDB_VERSION}

say() { printf '[ngx-chat] %s\n' "$*" >&2; }
die() { printf '[ngx-chat] error: %s\n' "$*" >&2; exit 1; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# True when everything scripts/setup provides is present.
setup_done() {
  [ -x .venv/bin/pytest ] && cmp -s t/requirements.txt .venv/.requirements 2>/dev/null || return 1
  [ -n "${KAFKA_BROKERS:-}" ] || [ -f "$KAFKA_HOME/.complete" ] || return 1
  [ -n "${MONGO_URI:-}" ] || [ -x "$FERRETDB_BIN" ] || return 1
  local c
  for c in nginx redis-server cc clang pkg-config sqlite3; do command -v $c >/dev/null 2>&1 || return 1; done
  [ -d /usr/share/nginx/src ] && [ -f /usr/include/hiredis/async.h ] && [ -f /usr/include/librdkafka/rdkafka.h ] \
    && [ -f /usr/include/cmocka.h ] && [ -d /usr/include/libmongoc-1.0 ] || return 1
  [ -d /usr/lib/nginx/modules ] && [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || return 1
  for c in node npm chromium; do command -v $c >/dev/null 2>&1 || return 1; done
  cmp -s clients/js/package-lock.json clients/js/node_modules/.ngx-chat-lock 2>/dev/null || return 1
  return 0
}

# A stack Redis as both scripts run it (scripts/stack's, and the bench's
# Centrifugo Redis, so that the peers' Redis is configured alike): AOF
# fsynced every second, rewritten at 400 % growth (each rewrite forks and
# re-serialises the whole dataset; docs/BENCHMARKS.md, "AOF rewrites").
redis_aof_args=(--appendonly yes --appendfsync everysec --save '' --auto-aof-rewrite-percentage 400)

# redis_socket <path>: sets redis_sock_args for a unix socket only this
# user may open, or leaves it empty and fails (TCP only) with
# CHAT_REDIS_TCP=1 or a path too long for sun_path.
redis_socket() {
  redis_sock_args=()
  [ "${CHAT_REDIS_TCP:-0}" != 1 ] && [ ${#1} -le 100 ] || return 1
  redis_sock_args=(--unixsocket "$1" --unixsocketperm 700)
}
