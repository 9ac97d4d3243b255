#!/usr/bin/env bash
# The live-stream benchmark of issues 13 and 15 (docs/bench/streams.md), in one command:
#
#   scripts/bench-streams.sh
#
# Starts the services, builds the release binaries and bench/examples/streams.rs, runs an api, a
# delay-scheduler and an expirer (--hold-ttl 3s) on a fresh database and key prefixes, then the
# example: WATCHERS (2,000) seat-map streams on one schedule while HOLDS holds expire, then
# IDLE_STREAMS (10,000) idle notification streams. It prints the figures; docs/bench/streams.md
# keeps the latest. Ports: BENCH_PORT (default 18480) and the three next ones.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -z ${CARGO_TARGET_DIR:-} ]]; then
  CARGO_TARGET_DIR=$(scripts/target-dir.sh)
fi
export CARGO_TARGET_DIR
PORT=${BENCH_PORT:-18480}

services_env=$(scripts/services.sh up)
eval "$services_env"
export DATABASE_URL REDIS_URL KAFKA_BROKERS

cargo build --release --locked -p booking --bins
cargo build --release --locked -p bench --example streams
BIN="$CARGO_TARGET_DIR/release"

STAMP=$(date -u +%Y%m%d%H%M%S)
DB="streams_$STAMP"
PREFIX="streams$STAMP."
WORK="$ROOT/.data/bench/streams-$STAMP"
mkdir -p "$WORK"
psql "$DATABASE_URL" -qAtc "CREATE DATABASE $DB" >/dev/null
DB_URL="${DATABASE_URL%/*}/$DB"
COMMON=(--database-url "$DB_URL" --redis-url "$REDIS_URL" --kafka-brokers "$KAFKA_BROKERS" --topic-prefix "$PREFIX" --redis-prefix "$PREFIX")

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  psql "$DATABASE_URL" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

healthy() { # url
  for _ in $(seq 1 150); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "[streams] $1 did not answer; logs in $WORK" >&2
  exit 1
}

"$BIN/api" "${COMMON[@]}" --listen "127.0.0.1:$PORT" --metrics-addr "127.0.0.1:$((PORT + 1))" --admin-token admin \
  --queue-secret streams --queue-tick 100ms --queue-batch 100000 --queue-max-active 1000000 --hold-ttl 3s \
  --max-streams 20000 >>"$WORK/api.log" 2>&1 &
API_PID=$!
PIDS+=("$API_PID")
"$BIN/delay-scheduler" "${COMMON[@]}" --metrics-addr "127.0.0.1:$((PORT + 2))" --group "${PREFIX}scheduler" >>"$WORK/delay-scheduler.log" 2>&1 &
PIDS+=("$!")
"$BIN/expirer" "${COMMON[@]}" --metrics-addr "127.0.0.1:$((PORT + 3))" --group "${PREFIX}expirer" >>"$WORK/expirer.log" 2>&1 &
PIDS+=("$!")
healthy "http://127.0.0.1:$((PORT + 1))/health"
healthy "http://127.0.0.1:$((PORT + 2))/health"
healthy "http://127.0.0.1:$((PORT + 3))/health"

API="http://127.0.0.1:$PORT" API_PID="$API_PID" DATABASE_URL="$DB_URL" ADMIN_TOKEN=admin "$BIN/examples/streams"
