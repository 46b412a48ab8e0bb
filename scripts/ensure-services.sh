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

# promtool and the prometheus server, for the alert-rule and dashboard tests (tests/test_alerts.py,
# tests/integration/test_prometheus.py), from Debian's package. Its postinst would start a service on
# :9090: a policy-rc.d that refuses (exit 101) is put in place for the install when none is there, and
# a server the install started anyway is stopped and disabled; the tests run their own, on free ports.
if ! command -v promtool >/dev/null; then
  echo "prometheus: installing (promtool)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  apt_install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  status=0
  apt_install prometheus || { $SUDO apt-get update -qq && apt_install prometheus; } || status=$?
  [ -z "$added_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif command -v update-rc.d >/dev/null; then
    $SUDO service prometheus stop >/dev/null 2>&1 || true
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  if [ "$status" -ne 0 ] || ! command -v promtool >/dev/null; then
    echo "prometheus: apt-get install prometheus failed" >&2
    exit 1
  fi
  echo "prometheus: $(promtool --version 2>&1 | head -1)"
fi
bash "$(dirname "${BASH_SOURCE[0]}")/fetch-compose-schema.sh"  # tests/test_docker.py: compose schema, hadolint
