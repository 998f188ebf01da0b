#!/usr/bin/env bash
# The distributed profile's services on 127.0.0.1, for CI and for trying it by hand:
#   Postgres (instance storage), Redis (Celery broker + results), moto's S3 server (object store),
#   a loopback HTTP mirror of ml-latest-small (or a synthetic stand-in in its layout), and two dagster-celery
#   workers (separate processes).
#
#   bash .ci/services.sh start   # prints nothing but errors; writes $FLEXMF_STACK_DIR/env.sh
#   . "$FLEXMF_STACK_DIR/env.sh" # FLEXMF_PROFILE=distributed, DAGSTER_HOME, endpoints ...
#   bash .ci/services.sh stop    # stops everything and deletes the throwaway data
#
# FLEXMF_STACK_DIR defaults to /tmp/flexmf-stack. Everything lives under it (data dirs, logs, pids).
# A failed start tears down what it started. Installs Debian's postgresql and redis-server when missing.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STACK="${FLEXMF_STACK_DIR:-/tmp/flexmf-stack}"
BUCKET="${FLEXMF_S3_BUCKET:-flexmf}"
PY="${PYTHON:-python}"
# the `distributed` extra (pins: the Dagster family moves together; core 1.13.27 <-> integrations 0.29.27)
DIST_REQS=(dagster-postgres==0.29.27 dagster-celery==0.29.27 "redis>=5" "s3fs>=2024.6" "boto3>=1.34"
  "moto[server,s3]>=5.0")

log() { echo "services: $*" >&2; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }; done
  command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

install_missing() {
  local pkgs=()
  pg_bin >/dev/null || pkgs+=(postgresql)
  command -v redis-server >/dev/null || pkgs+=(redis-server)
  if [ ${#pkgs[@]} -gt 0 ]; then
    log "installing ${pkgs[*]} (apt)"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  if ! "$PY" -c 'import dagster_celery, dagster_postgres, psycopg2, s3fs, boto3, moto.server, redis' 2>/dev/null; then
    log "installing the distributed extra: ${DIST_REQS[*]}"
    "$PY" -m pip install -q "${DIST_REQS[@]}"
  fi
}

# run a command as the postgres user when we are root (postgres refuses to run as root)
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

wait_for() {  # wait_for <what> <seconds> <command...>
  local what="$1" secs="$2"; shift 2
  local i
  for ((i = 0; i < secs * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$what did not come up within ${secs}s (logs in $STACK/logs)"; return 1
}

start() {
  if [ -f "$STACK/env.sh" ]; then log "already running (stop first): $STACK/env.sh"; return 1; fi
  install_missing
  mkdir -p "$STACK"/{logs,run,www,dagster_home,celery}
  trap 'log "start failed; cleaning up"; stop; exit 1' ERR
  local pg_port redis_port s3_port www_port bin
  pg_port=$(free_port); redis_port=$(free_port); s3_port=$(free_port); www_port=$(free_port)

  # Postgres: throwaway cluster, trust auth on loopback, fsync off (test data only)
  bin=$(pg_bin)
  mkdir -p "$STACK/pg" "$STACK/pgsock"
  [ "$(id -u)" = 0 ] && chown postgres "$STACK/pg" "$STACK/pgsock" "$STACK/logs" && chmod 755 "$STACK"
  as_pg "$bin/initdb" -D "$STACK/pg/data" -U postgres --auth=trust -E UTF8 >"$STACK/logs/initdb.log" 2>&1
  as_pg "$bin/pg_ctl" -D "$STACK/pg/data" -l "$STACK/logs/postgres.log" -w -t 30 \
    -o "-p $pg_port -k $STACK/pgsock -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200" \
    start >/dev/null
  echo "$bin" >"$STACK/run/pg_bin"
  psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc "CREATE DATABASE dagster" >/dev/null

  # Redis: no persistence
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no --dir "$STACK/run" \
    --daemonize yes --pidfile "$STACK/run/redis.pid" --logfile "$STACK/logs/redis.log"
  wait_for redis 10 redis-cli -h 127.0.0.1 -p "$redis_port" ping

  # moto's S3 server and the bucket
  setsid "$PY" -m moto.server -H 127.0.0.1 -p "$s3_port" >"$STACK/logs/moto.log" 2>&1 &
  echo $! >"$STACK/run/moto.pid"
  export AWS_ACCESS_KEY_ID=flexmf-test AWS_SECRET_ACCESS_KEY=flexmf-test AWS_DEFAULT_REGION=us-east-1
  wait_for moto 30 "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $s3_port), 1).close()"
  "$PY" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$s3_port').create_bucket(Bucket='$BUCKET')"

  # a loopback mirror of the shared MovieLens archive (a real HTTP server, as in the other tests); without
  # it (or with FLEXMF_TEST_SHARED=0) a synthetic archive in its layout, as tests/conftest.py does
  local zip="$REPO/../shared/data/movielens/ml-latest-small.zip" sha
  if [ -f "$zip" ] && [ "${FLEXMF_TEST_SHARED:-1}" != 0 ]; then
    cp "$zip" "$STACK/www/"
  else
    "$PY" -c 'import sys; from flexmf_assets.datasets.synthetic import write_movielens_archive as w; w(sys.argv[1])' \
      "$STACK/www/ml-latest-small.zip"
  fi
  sha=$(sha256sum "$STACK/www/ml-latest-small.zip" | cut -d' ' -f1)
  setsid "$PY" -m http.server -b 127.0.0.1 -d "$STACK/www" "$www_port" >"$STACK/logs/mirror.log" 2>&1 &
  echo $! >"$STACK/run/mirror.pid"

  # the code location's config: the mirrored dataset and four small explicit sets
  cat >"$STACK/flexmf.yaml" <<EOF
default_dataset: ml-latest-small
datasets:
  ml-latest-small:
    url: http://127.0.0.1:$www_port/ml-latest-small.zip
    sha256: $sha
    format: ml-latest-small
device: {device: cpu, threads: 1}
explicit_hparams:
  k8-e2: {embedding_size: 8, epochs: 2, patience: null}
  k16-e2: {embedding_size: 16, epochs: 2, patience: null}
  k8-e3: {embedding_size: 8, epochs: 3, patience: null}
  k16-e3: {embedding_size: 16, epochs: 3, patience: null}
  # slow on purpose: the worker-kill test needs a step that is still running when it strikes
  slow: {embedding_size: 64, epochs: 400, patience: null, batch_size: 256}
implicit_hparams:
  default: {epochs: 1, embedding_size: 8}
sweep: {datasets: [ml-latest-small]}
schedule: {cron: "0 3 * * 1", enabled: false}
EOF
  cp "$REPO/deploy/dagster.yaml" "$STACK/dagster_home/dagster.yaml"
  # the workers' executor config: the same block as the profile's executor (`execution: config:`)
  cat >"$STACK/celery/celery.yaml" <<EOF
execution:
  config:
    broker: redis://127.0.0.1:$redis_port/0
    backend: redis://127.0.0.1:$redis_port/1
    config_source: {worker_prefetch_multiplier: 1}
EOF
  cat >"$STACK/celery/ping.py" <<'EOF'
import os, sys
from celery import Celery
app = Celery(broker=os.environ["FLEXMF_CELERY_BROKER"], backend=os.environ["FLEXMF_CELERY_BACKEND"])
sys.exit(0 if len(app.control.ping(timeout=0.5)) >= int(sys.argv[1]) else 1)
EOF

  cat >"$STACK/env.sh" <<EOF
export FLEXMF_STACK_DIR=$STACK
export FLEXMF_PROFILE=distributed
export FLEXMF_CONFIG=$STACK/flexmf.yaml
export FLEXMF_DATA_DIR=$STACK/data
export FLEXMF_STORAGE_URL=s3://$BUCKET/assets
export FLEXMF_S3_ENDPOINT=http://127.0.0.1:$s3_port
export FLEXMF_S3_BUCKET=$BUCKET
export FLEXMF_CELERY_BROKER=redis://127.0.0.1:$redis_port/0
export FLEXMF_CELERY_BACKEND=redis://127.0.0.1:$redis_port/1
export FLEXMF_MIRROR_URL=http://127.0.0.1:$www_port
export DAGSTER_HOME=$STACK/dagster_home
export DAGSTER_PG_HOST=127.0.0.1 DAGSTER_PG_PORT=$pg_port DAGSTER_PG_DB=dagster
export DAGSTER_PG_USERNAME=postgres DAGSTER_PG_PASSWORD=unused-trust-auth
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export GX_ANALYTICS_ENABLED=False TQDM_DISABLE=1
EOF
  # shellcheck disable=SC1091
  . "$STACK/env.sh"
  # create the instance schema once, before workers and runs race to do it
  # ... and the pools' slot rows: concurrent first runs otherwise race to insert them
  "$PY" -c "import dagster; i = dagster.DagsterInstance.get(); i.get_runs(limit=1)
i.event_log_storage.set_concurrency_slots('flexmf_training', 4); i.event_log_storage.set_concurrency_slots('gpu', 1)"

  # two Celery workers, one process each (plus its pool child), each in its own process group
  local w
  for w in 1 2; do
    (cd "$STACK/celery" && exec setsid dagster-celery worker start -A dagster_celery.app \
      -y "$STACK/celery/celery.yaml" -n "flexmf-w$w" -q dagster -l INFO \
      -- --concurrency=1 --pool=prefork --without-gossip --without-mingle \
      >"$STACK/logs/worker$w.log" 2>&1) &
    echo $! >"$STACK/run/worker$w.pid"
  done
  wait_for "celery workers" 45 "$PY" "$STACK/celery/ping.py" 2
  trap - ERR
}

kill_group() {  # kill_group <pidfile>: SIGTERM the process group, then SIGKILL what is left
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$f"
}

stop() {
  [ -d "$STACK" ] || return 0
  kill_group "$STACK/run/worker1.pid"
  kill_group "$STACK/run/worker2.pid"
  kill_group "$STACK/run/moto.pid"
  kill_group "$STACK/run/mirror.pid"
  if [ -f "$STACK/run/redis.pid" ]; then kill "$(cat "$STACK/run/redis.pid")" 2>/dev/null || true; fi
  if [ -f "$STACK/pg/data/postmaster.pid" ]; then
    as_pg "$(cat "$STACK/run/pg_bin" 2>/dev/null || pg_bin)/pg_ctl" -D "$STACK/pg/data" -m immediate -w stop \
      >/dev/null 2>&1 || true
  fi
  rm -rf "$STACK"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|restart" >&2; exit 2 ;;
esac
