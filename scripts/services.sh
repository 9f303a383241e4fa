#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on loopback (the test suite needs both, for real).
# Starts them when they are installed but down; installs them with apt-get when missing and
# we are root; otherwise fails with a clear message.
set -uo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

try_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing $* with apt-get ..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null 2>&1
  fi
}

if ! pg_up; then
  command -v pg_ctlcluster >/dev/null || try_install postgresql
  if command -v pg_ctlcluster >/dev/null; then
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    if [ -n "$version" ]; then
      pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
    fi
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
fi
if ! pg_up; then
  echo "ERROR: PostgreSQL is not answering on $PGHOST:$PGPORT and could not be started." >&2
  echo "       Start it (trust auth for user postgres) or set DATABASE_URL to a server that runs." >&2
  exit 1
fi

if ! redis_up; then
  command -v redis-server >/dev/null || try_install redis-server
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 \
      || redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" >/dev/null 2>&1 || true
  fi
  for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
fi
if ! redis_up; then
  echo "ERROR: Redis is not answering on 127.0.0.1:$REDIS_PORT and could not be started." >&2
  echo "       Start it or set REDIS_URL to a server that runs." >&2
  exit 1
fi
echo "PostgreSQL and Redis are up."
