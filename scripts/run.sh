#!/usr/bin/env bash
# Runs the whole system in the foreground: services, the four daemons, and a demo concert with
# 50 seats. Ctrl-C stops the daemons (gracefully); the services keep running
# (`scripts/services.sh down` stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/booking-target}"

eval "$(scripts/services.sh up)"
export DATABASE_URL REDIS_URL KAFKA_BROKERS
export ADMIN_TOKEN="${ADMIN_TOKEN:-demo-admin}" QUEUE_SECRET="${QUEUE_SECRET:-demo-secret}"
export LISTEN_ADDR="${LISTEN_ADDR:-127.0.0.1:8080}"

cargo build --release --bins
BIN="$CARGO_TARGET_DIR/release"

pids=()
stop() {
  echo "stopping…" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM

METRICS_ADDR=127.0.0.1:9101 "$BIN/api" & pids+=($!)
METRICS_ADDR=127.0.0.1:9102 "$BIN/delay-scheduler" & pids+=($!)
METRICS_ADDR=127.0.0.1:9103 "$BIN/expirer" & pids+=($!)
METRICS_ADDR=127.0.0.1:9104 "$BIN/worker" --export-sink "file:.data/payments-export.jsonl" & pids+=($!)

for _ in $(seq 1 100); do
  curl -fs "http://$LISTEN_ADDR/health" >/dev/null 2>&1 && break
  sleep 0.2
done
starts=$(date -u -d '+7 days' +%Y-%m-%dT19:00:00Z)
curl -fs -X POST "http://$LISTEN_ADDR/v1/admin/concerts" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'content-type: application/json' \
  -d "{\"title\":\"Demo concert\",\"schedules\":[{\"startsAt\":\"$starts\",\"bookingOpensAt\":\"2020-01-01T00:00:00Z\",\"seatCount\":50,\"price\":50000}]}" \
  && echo >&2
echo "API on http://$LISTEN_ADDR  (admin token: $ADMIN_TOKEN)  metrics on :9101-:9104 — Ctrl-C to stop" >&2
wait "${pids[@]}"
