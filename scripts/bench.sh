#!/usr/bin/env bash
# The benchmark of issue 7, from a clean stack, in one command:
#
#   scripts/bench.sh            # moderate sizes (see below); about 5–10 minutes on 2 cores
#   scripts/bench.sh --small    # a quick smoke run
#
# It starts the services (scripts/services.sh up), builds the release binaries, creates a fresh
# database (bench_<timestamp>) with fresh Kafka topic and Redis key prefixes, and runs the four
# daemons on fixed ports with bench-friendly flags (the queue admits everyone at the next tick).
# Then, in three phases:
#   1. api --hold-ttl 5m:                 limits (pgbench of the same database at the same
#                                         concurrency), queue-spike, seat-fight, sell-out, payments,
#                                         one-schedule (the sell-out's seats in one schedule)
#   2. api --hold-ttl $BENCH_HOLD_TTL:    end-to-end, expiry --label after
#      (delay-scheduler + expirer --mode after)
#   2b. the same stack:                   versus-bullmq (N = BENCH_BULLMQ_N holds straight into
#      PostgreSQL through the outbox, due in one BENCH_WINDOW; then BullMQ 5 on the same Redis with the
#      same N and window; bullmq is installed from npm into $BENCH_NODE_CACHE, never committed)
#   3. delay-scheduler stopped, expirer --mode before (the old 10 s scan): expiry --label before
#   4. every daemon stopped: notify-drain (BENCH_NOTIFICATIONS requests produced to fresh topics,
#      then a worker of its own is started by the bench and timed until all are delivered)
# and merges the five JSON files into $BENCH_OUT.{json,md} (default docs/bench/latest) and draws
# the charts with scripts/bench_charts.py. Daemon logs and the per-phase JSON stay in
# .data/bench/<timestamp>/.
#
# Sizes (environment):
#   BENCH_USERS=20000 BENCH_FIGHTERS=500 BENCH_SCHEDULES=60 BENCH_CLIENTS=64 BENCH_PAY_CONCURRENCY=64
#   BENCH_SEATS=50      seats per sell-out schedule (BENCH_SCHEDULES=1 BENCH_SEATS=3000: a one-schedule sale)
#   BENCH_BULLMQ_N=1000,10000 BENCH_NODE_CACHE=~/.cache/booking-bench-node
#   BENCH_HOLDS=10000 BENCH_WINDOW=2s BENCH_E2E_USERS=100 BENCH_CONCURRENCY=64 BENCH_NOTIFICATIONS=100000
#   BENCH_HOLD_TTL=60s  (must exceed the time to take the holds + 11 s for clean DB statistics)
#   BENCH_PORT=28080    (api; the daemons' metrics on BENCH_PORT+21 … +24)   BENCH_OUT=docs/bench/latest
#   BENCH_KEEP_DB=1     keep the bench database afterwards
#   BENCH_PHASES=spike,after,bullmq,before,drain   the phases to run (default all; the report merges
#                       those that ran), e.g. BENCH_PHASES=bullmq to try a change to the expiry path
#   BENCH_PROFILE=1     profile instead: phase 1 only, with pg_stat_statements (the database time per
#                       statement), perf sampling the api (its hottest functions) and the whole
#                       machine (CPU by process, kernel included); writes docs/bench/profile.md and
#                       leaves latest.* alone
#   BENCH_PROFILE_SCENARIOS=sell-out,payments   with BENCH_PROFILE=1, profile only these scenarios
#                       of phase 1 (default: all of them)
#   BENCH_SPIKE_SCENARIOS=limits,sell-out   run only these scenarios of phase 1 (an A/B of one
#                       path; the report then lacks the others)
#   BENCH_API_DB_CONNECTIONS=8   the api's PostgreSQL pool (see below)
#   BENCH_BIN=DIR       run the daemons and the load generator found in DIR (api, delay-scheduler,
#                       expirer, worker, bench) instead of building this tree: for an A/B of two
#                       trees, alternating runs on the same services
#   BENCH_TRACE_PAYMENTS=FILE   the payments scenario writes one line per payment to FILE: its
#                       start (Unix ms) and its latency (ms), to line the slowest up with a profile
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/booking-target}"

if [[ "${1:-}" == "--small" ]]; then
  : "${BENCH_USERS:=2000}" "${BENCH_FIGHTERS:=200}" "${BENCH_SCHEDULES:=4}" "${BENCH_CLIENTS:=16}"
  : "${BENCH_HOLDS:=1000}" "${BENCH_E2E_USERS:=20}" "${BENCH_HOLD_TTL:=20s}" "${BENCH_CONCURRENCY:=32}"
  : "${BENCH_NOTIFICATIONS:=10000}" "${BENCH_BULLMQ_N:=1000}"
  shift
elif [[ -n "${1:-}" ]]; then
  echo "usage: scripts/bench.sh [--small]" >&2
  exit 2
fi
USERS=${BENCH_USERS:-20000}
FIGHTERS=${BENCH_FIGHTERS:-500}
SCHEDULES=${BENCH_SCHEDULES:-60}
SEATS=${BENCH_SEATS:-50}
CLIENTS=${BENCH_CLIENTS:-64}
PAY_CONCURRENCY=${BENCH_PAY_CONCURRENCY:-64}
BULLMQ_N=${BENCH_BULLMQ_N:-1000,10000}
NODE_CACHE=${BENCH_NODE_CACHE:-$HOME/.cache/booking-bench-node}
HOLDS=${BENCH_HOLDS:-10000}
WINDOW=${BENCH_WINDOW:-2s}
E2E_USERS=${BENCH_E2E_USERS:-100}
CONCURRENCY=${BENCH_CONCURRENCY:-64}
HOLD_TTL=${BENCH_HOLD_TTL:-60s}
NOTIFICATIONS=${BENCH_NOTIFICATIONS:-100000}
# The api's PostgreSQL pool. 8, not 32, since issue 11's fourteenth pass: once a hold and a
# payment were one round trip each, fewer backends on the two cores meant shorter run queues;
# alternating runs at 32, 8 and 12 gave payments p99 64/66, 47/47 and 59/56 ms (a third pair
# of 32 and 8 on a slower hour: 70 and 67 ms).
API_DB=${BENCH_API_DB_CONNECTIONS:-8}
PORT=${BENCH_PORT:-28080}
M_API=$((PORT + 21)) M_SCHED=$((PORT + 22)) M_EXP=$((PORT + 23)) M_WORK=$((PORT + 24))
OUT=${BENCH_OUT:-docs/bench/latest}
PHASES=",${BENCH_PHASES:-spike,after,bullmq,before,drain},"
phase() { [[ $PHASES == *",$1,"* ]]; }

log() { echo "[bench] $*" >&2; }

eval "$(scripts/services.sh up)"
export DATABASE_URL REDIS_URL KAFKA_BROKERS

if [[ -n "${BENCH_BIN:-}" ]]; then
  # Binaries built elsewhere (an A/B of two trees: each tree's daemons and load generator
  # copied to a directory of their own, the same script and services running both).
  BIN=$(cd "$BENCH_BIN" && pwd)
  log "using the binaries in $BIN (BENCH_BIN; nothing built)"
else
  log "building release binaries"
  # The daemons (package booking) and the load generator (package bench, the workspace member bench/).
  cargo build --release --locked -p booking -p bench --bins
  BIN="$CARGO_TARGET_DIR/release"
fi

# BullMQ 5 for the versus-bullmq phase: from the npm registry into a cache directory, once.
if [[ ! -f "$NODE_CACHE/node_modules/bullmq/package.json" ]]; then
  log "installing bullmq@5 (npm) into $NODE_CACHE"
  mkdir -p "$NODE_CACHE"
  npm install --prefix "$NODE_CACHE" --no-audit --no-fund --silent bullmq@5 >/dev/null
fi
export NODE_PATH="$NODE_CACHE/node_modules"

STAMP=$(date -u +%Y%m%d%H%M%S)
DB="bench_$STAMP"
PREFIX="bench$STAMP."
# The stack's topics, for what the benchmark reads back from Kafka (queue-spike, versus-bullmq).
export BENCH_STACK_TOPIC_PREFIX="$PREFIX"
WORK="$ROOT/.data/bench/$STAMP"
mkdir -p "$WORK"
psql "$DATABASE_URL" -qAtc "CREATE DATABASE $DB" >/dev/null
BENCH_DB_URL="${DATABASE_URL%/*}/$DB"
KAFKA_VERSION=$(ls "${BOOKING_DATA_DIR:-$ROOT/.data}"/kafka/libs/kafka-clients-*.jar 2>/dev/null | head -1 | sed -E 's/.*kafka-clients-(.*)\.jar/\1/')
KAFKA_VERSION=${KAFKA_VERSION:-unknown}
log "database $DB, prefix $PREFIX, logs in $WORK"

COMMON=(--database-url "$BENCH_DB_URL" --redis-url "$REDIS_URL" --kafka-brokers "$KAFKA_BROKERS"
        --topic-prefix "$PREFIX" --redis-prefix "$PREFIX")
API_FLAGS=(--listen "127.0.0.1:$PORT" --metrics-addr "127.0.0.1:$M_API" --admin-token bench-admin
           --queue-secret bench-secret --queue-tick 100ms --queue-batch 100000 --queue-max-active 1000000
           --queue-idle-timeout 30m --queue-active-limit 1h --max-seats-per-user 1000000 --db-max-connections "$API_DB")
SCHED_FLAGS=(--metrics-addr "127.0.0.1:$M_SCHED" --group "${PREFIX}scheduler" --rearm-interval 1h --db-max-connections 10)
EXPIRER_FLAGS=(--metrics-addr "127.0.0.1:$M_EXP" --group "${PREFIX}expirer" --db-max-connections 10)
WORKER_FLAGS=(--metrics-addr "127.0.0.1:$M_WORK" --group-prefix "${PREFIX}worker-" --export-sink "file:$WORK/payments-export.jsonl"
              --db-max-connections 10)

API_PID= SCHED_PID= EXPIRER_PID= WORKER_PID=
stop_pid() {
  local pid=$1
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$API_PID"; stop_pid "$SCHED_PID"; stop_pid "$EXPIRER_PID"; stop_pid "$WORKER_PID"
  if [[ "${BENCH_KEEP_DB:-0}" != 1 ]]; then
    psql "$DATABASE_URL" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    if command -v redis-cli >/dev/null; then
      redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" 2>/dev/null | xargs -r -n 500 redis-cli -u "$REDIS_URL" DEL >/dev/null 2>&1 || true
    fi
    # Its topics too: a broker keeps heap per partition (see scripts/services.sh prune).
    scripts/services.sh delete-topics "${PREFIX//./\\.}.*" 2>/dev/null || true
  fi
}
trap cleanup EXIT

port_free() { # port
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "[bench] port $1 is taken by another process; set BENCH_PORT to a free range" >&2
    exit 1
  fi
}
wait_health() { # url name pid
  for _ in $(seq 1 150); do
    kill -0 "$3" 2>/dev/null || { echo "[bench] $2 exited; see $WORK/$2*.log" >&2; tail -5 "$WORK/$2"*.log >&2; exit 1; }
    curl -fs "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "[bench] $2 did not become healthy; see $WORK/$2*.log" >&2
  exit 1
}
start_api() { # hold ttl
  "$BIN/api" "${COMMON[@]}" "${API_FLAGS[@]}" --hold-ttl "$1" >>"$WORK/api-$1.log" 2>&1 &
  API_PID=$!
  wait_health "http://127.0.0.1:$PORT/health" api "$API_PID"
}
start_scheduler() {
  "$BIN/delay-scheduler" "${COMMON[@]}" "${SCHED_FLAGS[@]}" >>"$WORK/delay-scheduler.log" 2>&1 &
  SCHED_PID=$!
  wait_health "http://127.0.0.1:$M_SCHED/health" delay-scheduler "$SCHED_PID"
}
start_expirer() { # mode
  "$BIN/expirer" "${COMMON[@]}" "${EXPIRER_FLAGS[@]}" --mode "$1" >>"$WORK/expirer-$1.log" 2>&1 &
  EXPIRER_PID=$!
  wait_health "http://127.0.0.1:$M_EXP/health" "expirer-$1" "$EXPIRER_PID"
}
start_worker() {
  "$BIN/worker" "${COMMON[@]}" "${WORKER_FLAGS[@]}" >>"$WORK/worker.log" 2>&1 &
  WORKER_PID=$!
  wait_health "http://127.0.0.1:$M_WORK/health" worker "$WORKER_PID"
}

BENCH=("$BIN/bench" --api "http://127.0.0.1:$PORT" --api-metrics "http://127.0.0.1:$M_API/metrics" --admin-token bench-admin --database-url "$BENCH_DB_URL"
       --redis-url "$REDIS_URL" --kafka-version "$KAFKA_VERSION" --concurrency "$CONCURRENCY" --cpu-marker "$PREFIX")
QUEUE_NOTE="api --queue-tick 100ms --queue-batch 100000 --queue-max-active 1000000"

for p in "$PORT" "$M_API" "$M_SCHED" "$M_EXP" "$M_WORK"; do port_free "$p"; done

# Phase 0, not measured: warm the broker. A JVM just started spends seconds of CPU compiling its
# hot paths (measured: 4.4 CPU-s of C2 compiler threads during one 2-minute phase after a
# restart), and on two cores that lands on whatever scenario runs first. A broker in production
# is warm.
log "phase 0: warming Kafka (scripts/services.sh warm-kafka 20, not measured)"
scripts/services.sh warm-kafka 20 || log "warming Kafka failed (ignored)"

start_api 5m
start_scheduler
start_expirer after
start_worker
PERF_PID=
PERF_ALL_PID=
if [[ ${BENCH_PROFILE:-0} == 1 ]]; then
  # pg_stat_statements is preloaded by scripts/services.sh (a PostgreSQL started before that
  # setting existed must be restarted: scripts/services.sh stop-postgres, then up).
  psql "$BENCH_DB_URL" -qAtc "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()" >/dev/null
  if command -v perf >/dev/null; then
    perf record -F 199 -g -p "$API_PID" -o "$WORK/api.perf" >/dev/null 2>&1 &
    PERF_PID=$!
    # And the whole machine, by process and library, kernel included: the per-process CPU table
    # leaves an "other" share (softirq, short-lived processes, anything else) that only this sees.
    perf record -F 99 -a -o "$WORK/all.perf" >/dev/null 2>&1 &
    PERF_ALL_PID=$!
  fi
fi
SPIKE_SCENARIOS=${BENCH_SPIKE_SCENARIOS:-limits,queue-spike,seat-fight,sell-out,payments,one-schedule}
[[ ${BENCH_PROFILE:-0} == 1 ]] && SPIKE_SCENARIOS=${BENCH_PROFILE_SCENARIOS:-$SPIKE_SCENARIOS}
if phase spike; then
log "phase 1: queue spike, seat fight, sell-out, payments, one-schedule sale (api --hold-ttl 5m)"
"${BENCH[@]}" --scenario "$SPIKE_SCENARIOS" --label spike \
  --users "$USERS" --fighters "$FIGHTERS" --schedules "$SCHEDULES" --seats "$SEATS" --clients "$CLIENTS" --pay-concurrency "$PAY_CONCURRENCY" \
  --note "$QUEUE_NOTE --hold-ttl 5m" --note "delay-scheduler, expirer --mode after, worker (log channel, ranking consumer)" \
  --out "$WORK/spike" || log "phase 1 reported a failure (see above); the report keeps what it measured"
fi

if [[ ${BENCH_PROFILE:-0} == 1 ]]; then
  [[ -n $PERF_PID ]] && { kill -INT "$PERF_PID" "$PERF_ALL_PID"; wait "$PERF_PID" "$PERF_ALL_PID" 2>/dev/null || true; }
  PROFILE_OUT="$(dirname "$OUT")/profile.md"
  mkdir -p -- "$(dirname "$PROFILE_OUT")"
  {
    echo "# Profile of the spike (phase 1 of scripts/bench.sh)"
    echo
    echo "Generated $(date -u '+%Y-%m-%d %H:%M UTC') by \`BENCH_PROFILE=1 BENCH_PROFILE_SCENARIOS=$SPIKE_SCENARIOS scripts/bench.sh\` at commit $(git rev-parse --short HEAD): ${SPIKE_SCENARIOS//,/, } (queue spike of $USERS users), with the whole stack on this machine."
    echo
    echo "## PostgreSQL: statements by total time (pg_stat_statements, the bench database only)"
    echo
    echo '| total ms | % | calls | mean ms | rows | statement |'
    echo '| ---: | ---: | ---: | ---: | ---: | --- |'
    psql "$BENCH_DB_URL" -qAt -F '|' -c "
      SELECT round(total_exec_time)::bigint,
             round((100 * total_exec_time / sum(total_exec_time) OVER ())::numeric, 1),
             calls, round((total_exec_time / NULLIF(calls, 0))::numeric, 3), rows,
             left(regexp_replace(query, '\s+', ' ', 'g'), 140)
      FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY total_exec_time DESC LIMIT 25" | sed -e 's/^/| /' -e 's/$/ |/' -e 's/|\([^ ]\)/| \1/g'
    echo
    if [[ -f "$WORK/spike.md" ]]; then
      echo "## What the profiled run measured"
      echo
      echo "(Profiling slows the api a little; docs/bench/latest.md has the unprofiled figures.)"
      echo
      sed -e '1{/^# /d}' "$WORK/spike.md"
      echo
    fi
    echo "## WAL and commits in the bench database"
    echo
    psql "$BENCH_DB_URL" -qAt -c "SELECT 'transactions committed: ' || xact_commit || ', rolled back: ' || xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    if [[ -f "$WORK/all.perf" ]]; then
      echo
      echo "## The whole machine: CPU samples by process and library (perf -a, 99 Hz; idle excluded)"
      echo
      echo '```'
      perf report -i "$WORK/all.perf" --stdio --no-children --sort comm,dso --percent-limit 0.5 2>/dev/null | grep -E '^ +[0-9]' | grep -v 'swapper' | head -40 |
        sed -E -e 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' -e 's/[[:space:]]+$//'
      echo '```'
      echo
      echo "Kernel symbols, all processes:"
      echo
      echo '```'
      perf report -i "$WORK/all.perf" --stdio --no-children --sort dso,symbol --dsos '[kernel.kallsyms]' --percent-limit 0.7 2>/dev/null | grep -E '^ +[0-9]' | head -25 |
        sed -E -e 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' -e 's/[[:space:]]+$//'
      echo '```'
    fi
    if [[ -f "$WORK/api.perf" ]]; then
      echo
      echo "## The api: hottest functions (perf, 199 Hz, self time)"
      echo
      echo '```'
      # perf pads each line to the terminal's width and ends it with two empty columns.
      perf report -i "$WORK/api.perf" --stdio --no-children --sort dso,symbol --percent-limit 0.7 2>/dev/null | grep -E '^ +[0-9]' | head -40 |
        sed -E -e 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' -e 's/[[:space:]]+$//'
      echo '```'
    fi
  } >"$PROFILE_OUT"
  log "profile written to $PROFILE_OUT"
  exit 0
fi

stop_pid "$API_PID"
start_api "$HOLD_TTL"
phase after && log "phase 2: end to end and expiry after (api --hold-ttl $HOLD_TTL, delay-scheduler + expirer --mode after)"
phase after && "${BENCH[@]}" --scenario end-to-end,expiry --label after \
  --scheduler-metrics "http://127.0.0.1:$M_SCHED/metrics" --expirer-metrics "http://127.0.0.1:$M_EXP/metrics" --holds "$HOLDS" --window "$WINDOW" --e2e-users "$E2E_USERS" \
  --note "$QUEUE_NOTE --hold-ttl $HOLD_TTL" --note "delay-scheduler (--poll-interval 1s), expirer --mode after (sweeper 30s/10s), worker" \
  --out "$WORK/after"

if phase bullmq; then
log "phase 2b: versus-bullmq (N = $BULLMQ_N, window $WINDOW; then BullMQ on the same Redis)"
"${BENCH[@]}" --scenario versus-bullmq --label bullmq --bullmq-n "$BULLMQ_N" --window "$WINDOW" \
  --stack-topic-prefix "$PREFIX" --scheduler-metrics "http://127.0.0.1:$M_SCHED/metrics" --bullmq-script "$ROOT/bench/bullmq/delayed.cjs" \
  --note "holds written by booking::reservation::hold straight into the bench database (outbox → the api's relay); delay-scheduler, expirer --mode after; BullMQ $(node -p "require('$NODE_CACHE/node_modules/bullmq/package.json').version") Worker (concurrency 100) on the same Redis" \
  --out "$WORK/bullmq" || log "versus-bullmq reported a failure (see above); the report keeps what it measured"
fi

stop_pid "$SCHED_PID"; SCHED_PID=
stop_pid "$EXPIRER_PID"; EXPIRER_PID=
if phase before; then
log "phase 3: expiry before (delay-scheduler stopped, expirer --mode before: scan every 10 s)"
start_expirer before
"${BENCH[@]}" --scenario expiry --label before --expirer-metrics "http://127.0.0.1:$M_EXP/metrics" --holds "$HOLDS" --window "$WINDOW" \
  --note "$QUEUE_NOTE --hold-ttl $HOLD_TTL" --note "no delay-scheduler; expirer --mode before (--legacy-interval 10s); worker" \
  --expiry-timeout 90s --out "$WORK/before"
fi

stop_pid "$API_PID"; API_PID=
stop_pid "$EXPIRER_PID"; EXPIRER_PID=
stop_pid "$WORKER_PID"; WORKER_PID=

phase drain && log "phase 4: notify-drain ($NOTIFICATIONS requests to fresh topics, then the bench's own worker; every daemon stopped)"
phase drain && "${BENCH[@]}" --scenario notify-drain --label drain --notifications "$NOTIFICATIONS" \
  --kafka-brokers "$KAFKA_BROKERS" --topic-prefix "${PREFIX}drain." --worker-bin "$BIN/worker" \
  --worker-metrics-addr "127.0.0.1:$M_WORK" --worker-log "$WORK/worker-drain.log" \
  --note "every daemon stopped; worker (log channel, --db-max-connections 10, default --delivery-batch) started by the bench after the backlog was produced" \
  --out "$WORK/drain"

mkdir -p "$(dirname "$OUT")"
INPUTS=()
for f in spike after bullmq before drain; do [[ -f $WORK/$f.json ]] && INPUTS+=(--input "$WORK/$f.json"); done
"$BIN/bench" report "${INPUTS[@]}" --out "$OUT"

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib for the charts"
  python3 -m pip install --quiet matplotlib 2>/dev/null || python3 -m pip install --quiet --break-system-packages matplotlib
fi
python3 scripts/bench_charts.py "$OUT.json" "$(dirname "$OUT")"
log "done: $OUT.md, $OUT.json and the charts in $(dirname "$OUT")/"
