#!/usr/bin/env bash
# Makes sure the Postgres and Redis the test suite uses answer; starts them if installed but stopped.
set -euo pipefail
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}

wait_for() {  # wait_for NAME CMD...
  local name=$1; shift
  for _ in $(seq 1 30); do "$@" >/dev/null 2>&1 && { echo "$name: up"; return 0; }; sleep 1; done
  echo "$name: not answering" >&2; return 1
}

if ! pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "postgres: starting"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  else
    echo "postgres: not running on $PGHOST:$PGPORT and not installed here; set GATEWAY_TEST_POSTGRES_URL" >&2
  fi
fi
wait_for postgres pg_isready -h "$PGHOST" -p "$PGPORT"

if ! redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  if command -v redis-server >/dev/null; then
    echo "redis: starting"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || redis-server --daemonize yes --port "$REDIS_PORT" --save ""
  else
    echo "redis: not running on port $REDIS_PORT and not installed here" >&2
  fi
fi
wait_for redis sh -c "redis-cli -p $REDIS_PORT ping | grep -q PONG"
