#!/usr/bin/env bash
# Runs the whole system in the foreground: services, the four daemons, and a demo concert with
# 50 seats. Ctrl-C stops the daemons (gracefully); the services keep running
# (`scripts/services.sh down` stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every step stops the run when it fails, with its own message last (never `eval "$(…)"`, which
# succeeds on the empty output of a failed command). The target directory is this checkout's own
# (scripts/target-dir.sh).
if [[ -z ${CARGO_TARGET_DIR:-} ]]; then
  CARGO_TARGET_DIR=$(scripts/target-dir.sh)
fi
export CARGO_TARGET_DIR

services_env=$(scripts/services.sh up)
eval "$services_env"
export DATABASE_URL REDIS_URL KAFKA_BROKERS
export ADMIN_TOKEN="${ADMIN_TOKEN:-demo-admin}" QUEUE_SECRET="${QUEUE_SECRET:-demo-secret}"
export LISTEN_ADDR="${LISTEN_ADDR:-127.0.0.1:8080}"

cargo build --release --bins
BIN="$CARGO_TARGET_DIR/release"

LOGS=.data/logs
mkdir -p "$LOGS"
names=() pids=()
stop() {
  trap - INT TERM EXIT
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
# stop the daemons, then print why as the last line
fail() {
  stop
  echo "[run] ERROR: $*" >&2
  exit 1
}
trap 'echo "stopping…" >&2; stop' INT TERM
trap stop EXIT

# start NAME METRICS_PORT [ARGS…]: a daemon in the background, its stderr also kept in $LOGS/NAME.log
start() {
  local name=$1 port=$2
  shift 2
  : >"$LOGS/$name.log"
  METRICS_ADDR=127.0.0.1:$port "$BIN/$name" "$@" 2> >(tee -a "$LOGS/$name.log" >&2) &
  names+=("$name") pids+=($!)
}
start api 9101
start delay-scheduler 9102
start expirer 9103
start worker 9104 --export-sink "file:.data/payments-export.jsonl"

# Every daemon must answer /health; one that exits or stays unhealthy stops the run with its own
# last words.
ports=(9101 9102 9103 9104)
for ((i = 0; i < ${#names[@]}; i++)); do
  for ((t = 0; ; t++)); do
    curl -fs "http://127.0.0.1:${ports[i]}/health" >/dev/null 2>&1 && break
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      sleep 0.2   # let tee write the last lines
      fail "${names[i]} exited during start-up: $(tail -n 1 "$LOGS/${names[i]}.log")"
    fi
    ((t < 150)) || fail "${names[i]} did not answer http://127.0.0.1:${ports[i]}/health within 30 s (log: $LOGS/${names[i]}.log)"
    sleep 0.2
  done
done
starts=$(date -u -d '+7 days' +%Y-%m-%dT19:00:00Z)
if ! out=$(curl -sS -f -X POST "http://$LISTEN_ADDR/v1/admin/concerts" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'content-type: application/json' \
  -d "{\"title\":\"Demo concert\",\"schedules\":[{\"startsAt\":\"$starts\",\"bookingOpensAt\":\"2020-01-01T00:00:00Z\",\"seatCount\":50,\"price\":50000}]}" 2>&1); then
  fail "creating the demo concert failed: $out"
fi
echo "$out" >&2
echo "The sale, live: open http://$LISTEN_ADDR/ in a browser" >&2
echo "API on http://$LISTEN_ADDR  (admin token: $ADMIN_TOKEN)  metrics on :9101-:9104, logs in $LOGS — Ctrl-C to stop" >&2
wait "${pids[@]}"
