#!/usr/bin/env bash
# Local PostgreSQL, Redis and Apache Kafka (KRaft, single node) for the
# booking backend, on 127.0.0.1, without Docker.
#
# Everything lives under ${BOOKING_DATA_DIR:-<repo>/.data} (git-ignored).
# Missing packages are installed with apt-get (postgresql, redis-server);
# Kafka's jars come from Maven Central via scripts/kafka/pom.xml.
#
# Usage: scripts/services.sh COMMAND
#   up                 start whatever is not running, wait until all three
#                      answer, then print the exports below on stdout
#                      (progress goes to stderr):  eval "$(scripts/services.sh up)"
#   down               stop all three (clean shutdown), idempotent
#   status             state of each service; exit 0 only if all are up
#   env                print only the exports:     eval "$(scripts/services.sh env)"
#   check              like status, plus a real Kafka produce/consume round trip
#   reset              down, then delete the data directory
#   start-postgres | start-redis | start-kafka   start one service, wait until ready
#   stop-postgres  | stop-redis  | stop-kafka    stop one service (for fault tests)
#   delete-topics REGEX   delete the Kafka topics whose names match REGEX (the benchmark drops
#                      its own when it ends)
#   warm-kafka [SECONDS]  SECONDS (default 20) of idempotent produce and consume on a scratch
#                      topic: a broker JVM just started spends seconds of CPU compiling its hot
#                      paths, which would land on whatever is measured first (the benchmark calls it)
#   prune              drop what earlier test and benchmark runs left: databases test_* and
#                      bench_*, and their Kafka topics (t<12 hex>.* and bench<14 digits>.*).
#                      Not while a test or benchmark runs on these services: it would lose its
#                      database. A broker keeps ~40 KB of heap per partition, so thousands of
#                      leftover test topics slow it down and make its restarts long.
#
# Topologies: --topology single|cluster (anywhere on the command line) or BOOKING_TOPOLOGY.
#   single (default)  the three services above, one process each.
#   cluster           the production topology on this machine, beside the single one (own
#                     ports, data under <data dir>/cluster): three KRaft Kafka brokers (each
#                     broker+controller, configured from docker-compose.yml's x-kafka-env:
#                     replication factor 3, min.insync.replicas=2), a Redis Cluster of 3 masters
#                     + 3 replicas (cluster-node-timeout 1s, so a failover takes seconds), and
#                     the same single PostgreSQL. up/down/status/env/check/reset act on it
#                     (down and reset leave PostgreSQL alone: the single topology shares it), plus
#                     kill-kafka N (SIGKILL broker N = 1..3), start-kafka N (start it again,
#                     wait until it listens), kill-redis PORT (SIGKILL one Redis node); `up`
#                     restarts whatever is down. env also prints
#                     TOPIC_REPLICATION_FACTOR=3.
#
# Environment (all optional):
#   BOOKING_DATA_DIR              data directory (default <repo>/.data)
#   BOOKING_PG_PORT               PostgreSQL port          (default 55432)
#   BOOKING_REDIS_PORT            Redis port               (default 56379)
#   BOOKING_KAFKA_PORT            Kafka broker port        (default 59092)
#   BOOKING_KAFKA_CONTROLLER_PORT Kafka KRaft controller   (default 59093)
#   BOOKING_SERVICES_TIMEOUT      seconds to wait for a service (default 90)
#   BOOKING_KAFKA_ROUNDTRIP_ATTEMPT  seconds one Kafka round-trip attempt may take (default 30)
#   BOOKING_KAFKA_JVM_OPTS        extra JVM options for the brokers (after ours, so they win)
#   BOOKING_TOPOLOGY              single (default) or cluster
#   BOOKING_CLUSTER_KAFKA_PORTS   cluster: broker ports     (default "59192 59193 59194")
#   BOOKING_CLUSTER_CONTROLLER_PORTS  cluster: controllers  (default "59195 59196 59197")
#   BOOKING_CLUSTER_REDIS_PORTS   cluster: Redis nodes (default "57001 57002 57003 57004 57005 57006")
#
# Exports printed by `up` and `env`:
#   DATABASE_URL=postgres://booking:booking@127.0.0.1:55432/booking  (role booking is SUPERUSER)
#   REDIS_URL=redis://127.0.0.1:56379
#   KAFKA_BROKERS=127.0.0.1:59092
# and in the cluster topology:
#   REDIS_URL=redis+cluster://127.0.0.1:57001,…,127.0.0.1:57006
#   KAFKA_BROKERS=127.0.0.1:59192,127.0.0.1:59193,127.0.0.1:59194
#   TOPIC_REPLICATION_FACTOR=3
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
DATA_DIR=$(realpath -m -- "${BOOKING_DATA_DIR:-$REPO_DIR/.data}")

HOST=127.0.0.1
PG_PORT=${BOOKING_PG_PORT:-55432}
REDIS_PORT=${BOOKING_REDIS_PORT:-56379}
KAFKA_PORT=${BOOKING_KAFKA_PORT:-59092}
KAFKA_CONTROLLER_PORT=${BOOKING_KAFKA_CONTROLLER_PORT:-59093}
TIMEOUT=${BOOKING_SERVICES_TIMEOUT:-90}
KAFKA_ROUNDTRIP_ATTEMPT=${BOOKING_KAFKA_ROUNDTRIP_ATTEMPT:-30}

DATA_MARKER=$DATA_DIR/.booking-services-data

PG_DIR=$DATA_DIR/postgres
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
PG_SOCK_DIR=$PG_DIR/run
PG_SUPERUSER=postgres        # bootstrap superuser created by initdb
PG_OS_USER=postgres          # OS user that owns the cluster when we are root

REDIS_DIR=$DATA_DIR/redis
REDIS_CONF=$REDIS_DIR/redis.conf
REDIS_PID=$REDIS_DIR/redis.pid
REDIS_LOG=$REDIS_DIR/redis.log

KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
KAFKA_DIR=$DATA_DIR/kafka
KAFKA_LIBS=$KAFKA_DIR/libs
KAFKA_LIBS_MARKER=$KAFKA_LIBS/.pom-sha256
KAFKA_LOG_DIRS=$KAFKA_DIR/data
KAFKA_LOGS=$KAFKA_DIR/logs
KAFKA_OUT=$KAFKA_LOGS/kafka.out
KAFKA_SERVER_LOG=$KAFKA_LOGS/server.log
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_LOG4J=$KAFKA_DIR/log4j2.properties
KAFKA_TOOLS_LOG4J=$KAFKA_DIR/log4j2-tools.properties
KAFKA_PID=$KAFKA_DIR/kafka.pid
KAFKA_CLUSTER_ID_FILE=$KAFKA_DIR/cluster.id
KAFKA_HEALTH_TOPIC=_healthcheck
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

DATABASE_URL="postgres://booking:booking@$HOST:$PG_PORT/booking"
REDIS_URL="redis://$HOST:$REDIS_PORT"
KAFKA_BROKERS="$HOST:$KAFKA_PORT"

# ---------------------------------------------------------------- helpers

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

# die, showing the end of the given log files
# (the logs first, the message last: callers stop there, and the last line says what failed)
die_log() {
    local msg=$1 file
    shift
    for file in "$@"; do
        if [[ -n $file && -s $file ]]; then
            printf '[services] ---- last 40 lines of %s ----\n' "$file" >&2
            tail -n 40 -- "$file" >&2 || true
            printf '[services] ---- end of %s ----\n' "$file" >&2
        fi
    done
    printf '[services] ERROR: %s\n' "$msg" >&2
    exit 1
}

# first line of a pid file, digits only; empty if missing (always succeeds)
read_pid() {
    local f=$1 pid=""
    if [[ -f $f ]]; then
        pid=$(head -n 1 -- "$f" 2>/dev/null | tr -dc '0-9') || pid=""
    fi
    printf '%s' "$pid"
}

# is the process alive? A zombie (killed, not yet reaped by its parent or
# init) counts as dead, although kill -0 still succeeds on it.
pid_alive() {
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# does the pid still exist at all (zombies included)?
pid_exists() { [[ -n ${1:-} && -e /proc/$1 ]]; }

# After a kill -9 the process lingers for a moment: a multi-threaded one shows
# as a zombie while its other threads still hold its sockets, and the zombie
# stays until reaped. Wait (bounded) until the pid has completely gone.
wait_pid_gone() {
    local pid=$1 start=$SECONDS
    while pid_exists "$pid" && ! pid_alive "$pid" && ((SECONDS - start < 30)); do
        sleep 0.2
    done
}

# die unless $HOST:$1 is free (waits a few seconds for a dying process's socket)
require_port_free() {
    local port=$1 what=$2 start=$SECONDS
    while port_open "$port"; do
        if ((SECONDS - start >= 5)); then
            die "$what: port $HOST:$port is already used by another process (ss -ltnp | grep $port)"
        fi
        sleep 0.3
    done
}

# does process $1's command line contain every further argument?
pid_cmdline_has() {
    local pid=$1 cmd
    shift
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    local s
    for s in "$@"; do
        [[ $cmd == *"$s"* ]] || return 1
    done
}

# does something accept TCP connections on $HOST:$1 ?
port_open() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

# wait_ready WHAT LOGFILE ALIVE_FN CHECK_CMD...  (LOGFILE may list several, space-separated)
# Polls CHECK_CMD until it succeeds; fails after $TIMEOUT s, or early once
# ALIVE_FN (if given) reports that the service process has gone away.
wait_ready() {
    local what=$1 logf=$2 alive_fn=$3
    shift 3
    local start=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - start >= TIMEOUT)); then
            # shellcheck disable=SC2086
            die_log "$what did not become ready within ${TIMEOUT}s" $logf
        fi
        if [[ -n $alive_fn ]] && ((SECONDS - start >= 3)) && ! "$alive_fn"; then
            # shellcheck disable=SC2086
            die_log "$what exited during start-up" $logf
        fi
        sleep 0.3
    done
}

POLICY_RC_CREATED=0
cleanup() {
    if ((POLICY_RC_CREATED)); then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=0
    fi
}
trap cleanup EXIT

# apt-get install, without starting the packages' own system services
# (postgresql's 'main' cluster on 5432, redis on 6379): we run our own.
apt_install() {
    [[ $EUID -eq 0 ]] || die "missing packages ($*): run as root, or install them first"
    command -v apt-get >/dev/null || die "missing packages ($*) and no apt-get on this machine"
    log "installing $* with apt-get"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary (scripts/services.sh): start no services during install\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local opts=(-y -q -o Dpkg::Use-Pty=0 --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! apt-get install "${opts[@]}" "$@" >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >&2 || die "apt-get update failed"
        apt-get install "${opts[@]}" "$@" >&2 || die "apt-get install $* failed"
    fi
    cleanup
}

prepare_data_dir() {
    mkdir -p -- "$DATA_DIR"
    chmod 755 -- "$DATA_DIR"
    [[ -f $DATA_MARKER ]] || printf 'created by scripts/services.sh; delete it with: scripts/services.sh reset\n' >"$DATA_MARKER"
}

LOCK_HELD=0
take_lock() {
    ((LOCK_HELD)) && return 0
    prepare_data_dir
    exec 9>"$DATA_DIR/.lock"
    if ! flock -w 300 9; then
        die "another scripts/services.sh is busy with $DATA_DIR (waited 300 s)"
    fi
    LOCK_HELD=1
}

# ---------------------------------------------------------------- PostgreSQL

pg_find_bin() {
    # Binaries of the cluster's own major version once it exists, else the newest installed.
    local v
    if [[ -f $PG_DATA/PG_VERSION ]]; then
        v=$(<"$PG_DATA/PG_VERSION")
        if [[ -x /usr/lib/postgresql/$v/bin/initdb ]]; then
            printf '%s' "/usr/lib/postgresql/$v/bin"
        fi
        return 0
    fi
    local d found=()
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && found+=("${d%/bin}")
    done
    ((${#found[@]})) || return 0
    printf '%s/bin' "$(printf '%s\n' "${found[@]}" | sort -V | tail -n 1)"
}

PG_BIN=""
pg_require_bin() {
    PG_BIN=$(pg_find_bin)
    if [[ -z $PG_BIN ]]; then
        if [[ -f $PG_DATA/PG_VERSION ]]; then
            die "PostgreSQL $(<"$PG_DATA/PG_VERSION") binaries (/usr/lib/postgresql/$(<"$PG_DATA/PG_VERSION")/bin) are missing; install postgresql-$(<"$PG_DATA/PG_VERSION") or run 'scripts/services.sh reset'"
        fi
        apt_install postgresql
        PG_BIN=$(pg_find_bin)
        [[ -n $PG_BIN ]] || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb was found"
    fi
}

# run a command as the cluster's owner (user postgres when we are root)
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

pg_psql() {
    PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" "$@"
}

pg_is_ready() {
    "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres -t 2 &&
        [[ $(pg_psql -U "$PG_SUPERUSER" -d postgres -Atc 'select 1' 2>/dev/null) == 1 ]]
}

pg_pid() { read_pid "$PG_DATA/postmaster.pid"; }

# postmaster alive (per postmaster.pid)?
pg_running() {
    local pid
    pid=$(pg_pid)
    pid_alive "$pid" && pid_cmdline_has "$pid" postgres "$PG_DATA"
}

pg_write_conf() {
    local sock_dir=$PG_SOCK_DIR
    # sun_path is 108 bytes; with a deep data dir fall back to TCP only
    if ((${#PG_SOCK_DIR} + 20 > 107)); then
        sock_dir=""
    fi
    cat >"$PG_DATA/booking.conf" <<EOF
# Written by scripts/services.sh on every start; edits are lost.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$sock_dir'
max_connections = 1000
# Where the database time goes, per statement (docs/bench/profile.md); its cost is a few percent.
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
# durability stays on
fsync = on
synchronous_commit = on
full_page_writes = on
EOF
    cat >"$PG_DATA/pg_hba.conf" <<EOF
# Written by scripts/services.sh: trust on 127.0.0.1 only (local development).
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  peer
host    all       all   $HOST/32   trust
EOF
    if [[ $EUID -eq 0 ]]; then
        chown "$PG_OS_USER:" "$PG_DATA/booking.conf" "$PG_DATA/pg_hba.conf"
    fi
    chmod 600 "$PG_DATA/booking.conf" "$PG_DATA/pg_hba.conf"
}

pg_init() {
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    mkdir -p -- "$PG_DIR"
    if [[ $EUID -eq 0 ]]; then
        id -u "$PG_OS_USER" >/dev/null 2>&1 || die "OS user '$PG_OS_USER' does not exist (it comes with the postgresql package)"
        chown "$PG_OS_USER:" "$PG_DIR"
        as_pg test -w "$PG_DIR" ||
            die "user $PG_OS_USER cannot write $PG_DIR: a parent directory is not traversable; set BOOKING_DATA_DIR elsewhere"
    fi
    chmod 700 "$PG_DIR"
    log "postgres: initdb in $PG_DATA ($PG_BIN)"
    rm -rf -- "$PG_DIR/data.init"
    local locale=C.UTF-8
    locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$' || locale=C
    if ! as_pg "$PG_BIN/initdb" -D "$PG_DIR/data.init" -U "$PG_SUPERUSER" -E UTF8 --locale="$locale" \
        --auth-local=peer --auth-host=trust >"$PG_DIR/initdb.log" 2>&1; then
        die_log "initdb failed" "$PG_DIR/initdb.log"
    fi
    printf "\n# scripts/services.sh settings\ninclude = 'booking.conf'\n" >>"$PG_DIR/data.init/postgresql.conf"
    mv -- "$PG_DIR/data.init" "$PG_DATA"
}

pg_bootstrap_roles() {
    pg_psql -U "$PG_SUPERUSER" -d postgres >/dev/null <<'SQL' || die_log "postgres: creating role/database booking failed" "$PG_LOG"
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'booking') THEN
    CREATE ROLE booking LOGIN SUPERUSER PASSWORD 'booking';
  ELSE
    ALTER ROLE booking LOGIN SUPERUSER PASSWORD 'booking';
  END IF;
END
$$;
SELECT 'CREATE DATABASE booking OWNER booking'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'booking') \gexec
SQL
    [[ $(PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -Atc 'select 1' "$DATABASE_URL" 2>/dev/null) == 1 ]] ||
        die_log "postgres: cannot connect as $DATABASE_URL" "$PG_LOG"
}

start_postgres() {
    pg_require_bin
    if pg_running; then
        wait_ready "postgres" "$PG_LOG" pg_running pg_is_ready
        log "postgres: already running (pid $(pg_pid), $HOST:$PG_PORT)"
        pg_bootstrap_roles
        return 0
    fi
    pg_init
    local pid
    pid=$(pg_pid)
    if [[ -n $pid ]]; then
        # A killed postmaster can linger as a zombie until reaped, and postgres
        # refuses to start while that pid exists: wait for it to go away.
        wait_pid_gone "$pid"
        if pid_alive "$pid"; then
            # pid reused by an unrelated process: postgres would refuse to start
            log "postgres: removing stale postmaster.pid and socket lock (pid $pid is not our postgres)"
            rm -f -- "$PG_DATA/postmaster.pid" "$PG_SOCK_DIR/.s.PGSQL.$PG_PORT.lock"
        else
            log "postgres: stale postmaster.pid (pid $pid is gone); postgres replaces it and recovers"
        fi
    fi
    require_port_free "$PG_PORT" postgres
    pg_write_conf
    mkdir -p -- "$PG_SOCK_DIR"
    if [[ $EUID -eq 0 ]]; then
        chown "$PG_OS_USER:" "$PG_SOCK_DIR"
    fi
    log "postgres: starting on $HOST:$PG_PORT"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" start >/dev/null 2>"$PG_DIR/pg_ctl.err" 9>&-; then
        cat "$PG_DIR/pg_ctl.err" >&2 || true
        die_log "postgres: pg_ctl start failed" "$PG_LOG"
    fi
    wait_ready "postgres" "$PG_LOG" pg_running pg_is_ready
    pg_bootstrap_roles
    log "postgres: ready (pid $(pg_pid))"
}

stop_postgres() {
    PG_BIN=$(pg_find_bin)
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        log "postgres: not initialised"
        return 0
    fi
    if ! pg_running; then
        log "postgres: not running"
        return 0
    fi
    [[ -n $PG_BIN ]] || die "postgres is running but its binaries are missing"
    log "postgres: stopping (pid $(pg_pid))"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$TIMEOUT" stop >/dev/null 2>&1 9>&- ||
        die_log "postgres: pg_ctl stop failed" "$PG_LOG"
}

status_postgres() {
    PG_BIN=$(pg_find_bin)
    if [[ -z $PG_BIN ]]; then
        echo "postgres: not installed"
        return 1
    fi
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        echo "postgres: not initialised ($PG_DATA)"
        return 1
    fi
    if pg_running && pg_is_ready; then
        echo "postgres: up (pid $(pg_pid), $HOST:$PG_PORT, $(basename "$(dirname "$PG_BIN")"))"
        return 0
    fi
    if pg_running; then
        echo "postgres: running (pid $(pg_pid)) but not answering on $HOST:$PG_PORT"
    else
        echo "postgres: down"
    fi
    return 1
}

# ---------------------------------------------------------------- Redis

redis_require_bin() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        apt_install redis-server redis-tools
    fi
    command -v redis-server >/dev/null || die "redis-server not found after install"
}

redis_cli() { timeout 5 redis-cli -h "$HOST" -p "$REDIS_PORT" "$@"; }

redis_running() {
    local pid
    pid=$(read_pid "$REDIS_PID")
    pid_alive "$pid" && pid_cmdline_has "$pid" redis-server ":$REDIS_PORT"
}

redis_is_ready() { [[ $(redis_cli ping 2>/dev/null) == PONG ]]; }

start_redis() {
    redis_require_bin
    if redis_running; then
        wait_ready "redis" "$REDIS_LOG" redis_running redis_is_ready
        log "redis: already running (pid $(read_pid "$REDIS_PID"), $HOST:$REDIS_PORT)"
        return 0
    fi
    if [[ -f $REDIS_PID ]]; then
        log "redis: removing stale pid file (pid $(read_pid "$REDIS_PID") is gone)"
        wait_pid_gone "$(read_pid "$REDIS_PID")"
        rm -f -- "$REDIS_PID"
    fi
    require_port_free "$REDIS_PORT" redis
    mkdir -p -- "$REDIS_DIR/data"
    cat >"$REDIS_CONF" <<EOF
# Written by scripts/services.sh on every start; edits are lost.
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize yes
supervised no
pidfile "$REDIS_PID"
logfile "$REDIS_LOG"
loglevel notice
dir "$REDIS_DIR/data"
appendonly yes
appendfsync everysec
save 3600 1 300 100 60 10000
EOF
    log "redis: starting on $HOST:$REDIS_PORT"
    redis-server "$REDIS_CONF" </dev/null >/dev/null 2>>"$REDIS_LOG" 9>&- ||
        die_log "redis: redis-server failed to start" "$REDIS_LOG"
    wait_ready "redis" "$REDIS_LOG" redis_running redis_is_ready
    log "redis: ready (pid $(read_pid "$REDIS_PID"))"
}

stop_redis() {
    if ! redis_running; then
        if [[ -f $REDIS_PID ]]; then
            log "redis: removing stale pid file"
            rm -f -- "$REDIS_PID"
        fi
        log "redis: not running"
        return 0
    fi
    local pid
    pid=$(read_pid "$REDIS_PID")
    log "redis: stopping (pid $pid)"
    # SHUTDOWN fsyncs the AOF (and saves the RDB) before exiting
    redis_cli shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" "redis" "$REDIS_LOG"
    rm -f -- "$REDIS_PID"
}

status_redis() {
    if ! command -v redis-server >/dev/null; then
        echo "redis: not installed"
        return 1
    fi
    if redis_running && redis_is_ready; then
        echo "redis: up (pid $(read_pid "$REDIS_PID"), $HOST:$REDIS_PORT)"
        return 0
    fi
    if redis_running; then
        echo "redis: running (pid $(read_pid "$REDIS_PID")) but not answering on $HOST:$REDIS_PORT"
    else
        echo "redis: down"
    fi
    return 1
}

# wait for a process to exit; SIGKILL it after $TIMEOUT s
wait_pid_exit() {
    local pid=$1 what=$2 logf=$3 start=$SECONDS
    while pid_alive "$pid"; do
        if ((SECONDS - start >= TIMEOUT)); then
            log "$what: pid $pid still alive after ${TIMEOUT}s, sending SIGKILL (see $logf)"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- Kafka

kafka_require_bin() {
    command -v "$JAVA" >/dev/null || apt_install openjdk-17-jre-headless
    command -v mvn >/dev/null || apt_install maven
}

# Copy Kafka's jars into $KAFKA_LIBS, unless they already match the pom.
kafka_ensure_libs() {
    local hash
    hash=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
    if [[ -f $KAFKA_LIBS_MARKER && $(<"$KAFKA_LIBS_MARKER") == "$hash" ]]; then
        return 0
    fi
    log "kafka: fetching jars with Maven ($KAFKA_POM)"
    rm -rf -- "$KAFKA_LIBS.tmp"
    # (sed: Debian's Maven 3.8 prints stray colour escapes even with -B -q)
    if ! mvn -B -q -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS.tmp" 2>&1 9>&- |
        sed -e 's/\x1b\[[0-9;]*m//g' -e '/^[[:space:]]*$/d' >&2; then
        rm -rf -- "$KAFKA_LIBS.tmp"
        die "kafka: mvn dependency:copy-dependencies failed"
    fi
    ls "$KAFKA_LIBS.tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka: Maven copied no kafka_2.13 jar"
    printf '%s\n' "$hash" >"$KAFKA_LIBS.tmp/.pom-sha256"
    rm -rf -- "$KAFKA_LIBS"
    mv -- "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
}

# JVM command line for Kafka's command-line tools (fast start, warnings only,
# to stderr). An array, not a function, so that `"${KAFKA_TOOL[@]}" ... &`
# gives $! = the JVM's own pid (a backgrounded function would be a subshell
# whose java child survives a kill of $!).
kafka_tool_init() {
    KAFKA_TOOL=("$JAVA" -Xshare:auto -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m
        -Dlog4j2.configurationFile="$KAFKA_TOOLS_LOG4J" -cp "$KAFKA_LIBS/*")
}
kafka_tool_init
kafka_tool() { "${KAFKA_TOOL[@]}" "$@"; }

# A broker's JVM, heap size left to the caller: "${KAFKA_BROKER_JVM[@]}" -Xms.. -Xmx.. "${KAFKA_BROKER_ARGS[@]}".
# (Set when called, so the cluster topology's own KAFKA_LOGS, KAFKA_LOG4J and KAFKA_PROPS apply.)
# The heap: a broker keeps ~40 KB per partition on it (measured: 410 MB live after a full GC with
# 9,738 partitions). At 512 MB a development broker that had seen a few test suites spent more CPU
# in G1's concurrent marking than in serving requests (4 CPU-s of G1 Conc in a 2-minute benchmark
# phase), which the benchmark then charged to our daemons.
# The collector's threads: one for its pauses and one for its concurrent work. G1 starts as many
# as there are cores, so on a 2-core machine shared with PostgreSQL each young-generation pause
# (15 to 45 ms; every half second under load on a broker full of old test topics) took both
# cores from everything else: the whole machine stalled. With one thread a pause takes longer
# but only one core. Payments' p99 in four runs each, alternating, restarting the broker: 82 to
# 144 ms with two threads, 69 to 79 ms with one (issue 11, fourteenth pass).
# Each pause is logged in $KAFKA_LOGS/gc.log.
# shellcheck disable=SC2206  # BOOKING_KAFKA_JVM_OPTS: extra options, split on spaces
kafka_broker_cmd() {
    KAFKA_BROKER_JVM=("$JAVA")
    KAFKA_BROKER_ARGS=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:ParallelGCThreads=1 -XX:ConcGCThreads=1
        -XX:+ExitOnOutOfMemoryError "-Xlog:gc:file=$KAFKA_LOGS/gc.log:time,uptime:filecount=4,filesize=20M"
        ${BOOKING_KAFKA_JVM_OPTS:-}
        -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_LOGS" -Dlog4j2.shutdownHookEnabled=false
        -Dlog4j2.configurationFile="$KAFKA_LOG4J"
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS")
}

# Deletes the topics matching the regular expression $1 on the single broker.
delete_topics() {
    [[ -n ${1:-} ]] || die "delete-topics needs a regular expression"
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --delete --if-exists --topic "$1" >&2
}

# Warms the single broker's JVM (see usage): $1 seconds of idempotent acks=all produce at
# 20,000/s on a scratch topic, read back by a consumer; the topic is deleted afterwards.
warm_kafka() {
    local seconds=${1:-20} topic="_warmup_$$" consumer rc=0
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --create --if-not-exists \
        --topic "$topic" --partitions 3 --replication-factor 1 >/dev/null || return 1
    "${KAFKA_TOOL[@]}" org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$KAFKA_BROKERS" --topic "$topic" \
        --messages $((seconds * 20000)) --timeout $(((seconds + 20) * 1000)) >/dev/null 2>&1 &
    consumer=$!
    kafka_tool org.apache.kafka.tools.ProducerPerformance --topic "$topic" --num-records $((seconds * 20000)) --record-size 400 \
        --throughput 20000 --producer-props bootstrap.servers="$KAFKA_BROKERS" acks=all enable.idempotence=true linger.ms=0 \
        >/dev/null || rc=1
    wait "$consumer" || true
    delete_topics "$topic" 2>/dev/null || true
    return "$rc"
}

# What earlier test and benchmark runs left behind (see usage).
cmd_prune() {
    local dbs n=0 db
    pg_require_bin
    dbs=$(pg_psql -U "$PG_SUPERUSER" -d postgres -Atc "SELECT datname FROM pg_database WHERE datname ~ '^(test_([0-9]+_)?[0-9a-f]{12}|bench_[0-9]{14})$'")
    for db in $dbs; do
        pg_psql -U "$PG_SUPERUSER" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null && n=$((n + 1))
    done
    log "prune: dropped $n databases"
    delete_topics '(t[0-9a-f]{12}|bench[0-9]{14})\..*'
    log "prune: deleted the test and benchmark topics"
}

kafka_write_conf() {
    mkdir -p -- "$KAFKA_LOG_DIRS" "$KAFKA_LOGS"
    cat >"$KAFKA_PROPS" <<EOF
# Written by scripts/services.sh on every start; edits are lost.
# Single-node KRaft: this process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_LOG_DIRS

# Topics are created explicitly by the application / tests.
auto.create.topics.enable=false
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.recovery.threads.per.data.dir=1
log.retention.hours=168
EOF
    cat >"$KAFKA_LOG4J" <<EOF
# Written by scripts/services.sh: broker log at INFO to $KAFKA_SERVER_LOG
status = warn
name = booking-kafka
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $KAFKA_SERVER_LOG
appender.file.filePattern = $KAFKA_SERVER_LOG.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
    cat >"$KAFKA_TOOLS_LOG4J" <<EOF
# Written by scripts/services.sh: Kafka CLI tools log warnings to stderr
status = warn
name = booking-kafka-tools
appender.err.type = Console
appender.err.name = err
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = err
EOF
}

kafka_format_storage() {
    [[ -f $KAFKA_LOG_DIRS/meta.properties ]] && return 0
    local cid
    if [[ -s $KAFKA_CLUSTER_ID_FILE ]]; then
        cid=$(<"$KAFKA_CLUSTER_ID_FILE")
    else
        cid=$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$KAFKA_OUT" | tail -n 1) ||
            die_log "kafka: StorageTool random-uuid failed" "$KAFKA_OUT"
        [[ $cid =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: unexpected cluster id '$cid'"
        printf '%s\n' "$cid" >"$KAFKA_CLUSTER_ID_FILE"
    fi
    log "kafka: formatting storage in $KAFKA_LOG_DIRS (cluster id $cid)"
    kafka_tool kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_PROPS" >>"$KAFKA_OUT" 2>&1 ||
        die_log "kafka: StorageTool format failed" "$KAFKA_OUT"
}

kafka_running() {
    local pid
    pid=$(read_pid "$KAFKA_PID")
    pid_alive "$pid" && pid_cmdline_has "$pid" kafka.Kafka "$KAFKA_PROPS"
}

kafka_port_ready() { port_open "$KAFKA_PORT"; }

# Start the broker in the background if it is not running; does not wait.
# Sets KAFKA_LAUNCHED=1 when it started a new process.
KAFKA_LAUNCHED=0
launch_kafka() {
    kafka_require_bin
    if kafka_running; then
        return 0
    fi
    if [[ -f $KAFKA_PID ]]; then
        log "kafka: removing stale pid file (pid $(read_pid "$KAFKA_PID") is gone)"
        wait_pid_gone "$(read_pid "$KAFKA_PID")"
        rm -f -- "$KAFKA_PID"
    fi
    require_port_free "$KAFKA_PORT" kafka
    require_port_free "$KAFKA_CONTROLLER_PORT" kafka
    mkdir -p -- "$KAFKA_DIR" "$KAFKA_LOGS"
    kafka_ensure_libs
    kafka_write_conf
    kafka_format_storage
    log "kafka: starting on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
    printf '\n==== %s scripts/services.sh: starting kafka.Kafka ====\n' "$(date -Is)" >>"$KAFKA_OUT"
    # New session (setsid) + nohup: survives the caller's terminal/process group.
    # The pid file is written by the process that then execs java.
    # shellcheck disable=SC2016  # expanded by the inner bash
    kafka_broker_cmd
    setsid bash -c 'echo $$ >"$0"; exec nohup "$@"' "$KAFKA_PID" \
        "${KAFKA_BROKER_JVM[@]}" -Xms1536m -Xmx1536m "${KAFKA_BROKER_ARGS[@]}" \
        </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s $KAFKA_PID ]] && break
        sleep 0.1
    done
    KAFKA_LAUNCHED=1
}

# One real produce -> consume round trip through the broker, using Kafka's
# own CLI tools. Producer and consumer JVMs run in parallel; the consumer
# reads as group _healthcheck from its committed offset (earliest the first
# time), so it sees the new record whichever JVM is faster.
# $1: how long producer and consumer may wait, in ms (default 30000).
KAFKA_HEALTH_TOPIC_OK=0
kafka_roundtrip() {
    local wait_ms=${1:-30000}
    local bs="$HOST:$KAFKA_PORT" out="$KAFKA_LOGS/healthcheck.$$.out" errf="$KAFKA_LOGS/healthcheck.err"
    if ((!KAFKA_HEALTH_TOPIC_OK)) && [[ ! -d $KAFKA_LOG_DIRS/$KAFKA_HEALTH_TOPIC-0 ]]; then
        kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bs" --create --if-not-exists \
            --topic "$KAFKA_HEALTH_TOPIC" --partitions 1 --replication-factor 1 >>"$errf" 2>&1 || return 1
    fi
    KAFKA_HEALTH_TOPIC_OK=1
    kafka_token_roundtrip "$bs" "$wait_ms" "$errf" "$out"
}

# Produces a fresh token to $KAFKA_HEALTH_TOPIC through bootstrap $1 and waits until a consumer
# of group _healthcheck reads it; $2: how long each client may wait, in ms; $3: error log
# (appended); $4: scratch file for the consumer's output. Fails when the token never arrived.
kafka_token_roundtrip() {
    local bs=$1 wait_ms=$2 errf=$3 out=$4 token
    token="healthcheck-$(date +%s%N)-$$-$RANDOM"
    : >"$out"
    # Both clients are bounded twice: by their own settings (--timeout-ms is only an idle timeout,
    # and a producer's close waits for its sends up to delivery.timeout.ms, 120 s by default) and
    # by timeout(1), so an attempt never outlives its share whatever state a client is stuck in.
    local hard=$((wait_ms / 1000 + 10))
    timeout -k 5 "$hard" "${KAFKA_TOOL[@]}" org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$bs" \
        --topic "$KAFKA_HEALTH_TOPIC" --group _healthcheck --from-beginning --timeout-ms "$wait_ms" \
        >"$out" 2>>"$errf" </dev/null 9>&- &
    local cpid=$!
    if ! printf '%s\n' "$token" | timeout -k 5 "$hard" "${KAFKA_TOOL[@]}" org.apache.kafka.tools.ConsoleProducer \
        --bootstrap-server "$bs" --topic "$KAFKA_HEALTH_TOPIC" --producer-property acks=all \
        --producer-property max.block.ms="$wait_ms" --producer-property request.timeout.ms=3000 \
        --producer-property delivery.timeout.ms="$wait_ms" >>"$errf" 2>&1 9>&-; then
        kill -TERM "$cpid" 2>/dev/null || true
        wait "$cpid" 2>/dev/null || true
        rm -f -- "$out"
        return 1
    fi
    while kill -0 "$cpid" 2>/dev/null && ! grep -qxF -- "$token" "$out"; do
        sleep 0.1
    done
    # TERM lets the consumer commit its offset and leave the group
    kill -TERM "$cpid" 2>/dev/null || true
    wait "$cpid" 2>/dev/null || true
    local rc=0
    grep -qxF -- "$token" "$out" || rc=1
    rm -f -- "$out"
    return "$rc"
}

# Wait until the broker answers; with deep=1 also do the round trip.
wait_kafka() {
    local deep=$1
    wait_ready "kafka" "$KAFKA_SERVER_LOG $KAFKA_OUT" kafka_running kafka_port_ready
    ((deep)) || return 0
    local start=$SECONDS attempt=1 left per errf="$KAFKA_LOGS/healthcheck.err"
    log "kafka: produce/consume round trip on topic $KAFKA_HEALTH_TOPIC"
    : >"$errf"
    # Each attempt gets at most KAFKA_ROUNDTRIP_ATTEMPT seconds. One attempt may not eat the whole
    # budget: a client stuck in a state it never leaves (a group join or a metadata wait against a
    # broker still loading its logs) must be replaced by fresh ones while time is left. CI once
    # lost a whole 90 s to a single such attempt right after a restart under load.
    while :; do
        left=$((TIMEOUT - (SECONDS - start)))
        per=$((left < KAFKA_ROUNDTRIP_ATTEMPT ? left : KAFKA_ROUNDTRIP_ATTEMPT))
        per=$((per > 5 ? per : 5))
        printf '[services] ---- round trip attempt %d (%ds of %ds left) ----\n' "$attempt" "$per" "$left" >>"$errf"
        kafka_roundtrip "$((per * 1000))" && break
        if ! kafka_running; then
            die_log "kafka exited during start-up" "$KAFKA_SERVER_LOG" "$KAFKA_OUT"
        fi
        if ((SECONDS - start >= TIMEOUT)); then
            # the clients' own errors last, so a truncated CI log still shows why
            die_log "kafka: no successful produce/consume round trip within ${TIMEOUT}s" "$KAFKA_SERVER_LOG" "$errf"
        fi
        log "kafka: round trip attempt $attempt failed, retrying"
        KAFKA_HEALTH_TOPIC_OK=0
        attempt=$((attempt + 1))
        sleep 1
    done
}

start_kafka() {
    launch_kafka
    if ((KAFKA_LAUNCHED)); then
        wait_kafka 1
        log "kafka: ready (pid $(read_pid "$KAFKA_PID"))"
    else
        wait_kafka 0
        log "kafka: already running (pid $(read_pid "$KAFKA_PID"), $HOST:$KAFKA_PORT)"
    fi
}

stop_kafka() {
    if ! kafka_running; then
        if [[ -f $KAFKA_PID ]]; then
            log "kafka: removing stale pid file"
            rm -f -- "$KAFKA_PID"
        fi
        log "kafka: not running"
        return 0
    fi
    local pid
    pid=$(read_pid "$KAFKA_PID")
    log "kafka: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" "kafka" "$KAFKA_SERVER_LOG"
    rm -f -- "$KAFKA_PID"
}

status_kafka() {
    if [[ ! -f $KAFKA_LIBS_MARKER ]]; then
        echo "kafka: not installed (jars not fetched yet)"
        return 1
    fi
    if kafka_running && kafka_port_ready; then
        local jars=("$KAFKA_LIBS"/kafka_2.13-*.jar)
        echo "kafka: up (pid $(read_pid "$KAFKA_PID"), $HOST:$KAFKA_PORT, $(basename "${jars[0]}" .jar))"
        return 0
    fi
    if kafka_running; then
        echo "kafka: running (pid $(read_pid "$KAFKA_PID")) but not answering on $HOST:$KAFKA_PORT"
    else
        echo "kafka: down"
    fi
    return 1
}

# ---------------------------------------------------------------- cluster topology
# Three Kafka brokers and a Redis Cluster beside the single-node services (own ports, data under
# $CLUSTER_DIR), sharing the single PostgreSQL. The Kafka functions above are reused per broker:
# kafka_select_node points their globals (ports, directories, pid file) at one broker.

CLUSTER_DIR=$DATA_DIR/cluster
read -r -a CK_PORTS <<<"${BOOKING_CLUSTER_KAFKA_PORTS:-59192 59193 59194}"
read -r -a CK_CTRL_PORTS <<<"${BOOKING_CLUSTER_CONTROLLER_PORTS:-59195 59196 59197}"
read -r -a CR_PORTS <<<"${BOOKING_CLUSTER_REDIS_PORTS:-57001 57002 57003 57004 57005 57006}"
COMPOSE_FILE=$REPO_DIR/docker-compose.yml
CLUSTER_LIBS=$DATA_DIR/kafka/libs   # the single topology's jars: fetched once

cluster_exports() {
    local b="" r="" p
    for p in "${CK_PORTS[@]}"; do b+="${b:+,}$HOST:$p"; done
    for p in "${CR_PORTS[@]}"; do r+="${r:+,}$HOST:$p"; done
    KAFKA_BROKERS=$b
    REDIS_URL="redis+cluster://$r"
}

kafka_select_node() {
    local n=$1
    KAFKA_NODE=$n
    KAFKA_DIR=$CLUSTER_DIR/kafka-$n
    KAFKA_PORT=${CK_PORTS[n - 1]}
    KAFKA_CONTROLLER_PORT=${CK_CTRL_PORTS[n - 1]}
    KAFKA_LIBS=$CLUSTER_LIBS
    KAFKA_LIBS_MARKER=$KAFKA_LIBS/.pom-sha256
    KAFKA_LOG_DIRS=$KAFKA_DIR/data
    KAFKA_LOGS=$KAFKA_DIR/logs
    KAFKA_OUT=$KAFKA_LOGS/kafka.out
    KAFKA_SERVER_LOG=$KAFKA_LOGS/server.log
    KAFKA_PROPS=$KAFKA_DIR/server.properties
    KAFKA_LOG4J=$KAFKA_DIR/log4j2.properties
    KAFKA_TOOLS_LOG4J=$KAFKA_DIR/log4j2-tools.properties
    KAFKA_PID=$KAFKA_DIR/kafka.pid
    KAFKA_CLUSTER_ID_FILE=$CLUSTER_DIR/kafka.cluster.id
    kafka_tool_init
}

# The broker settings of docker-compose.yml (its x-kafka-env anchor), turned into server.properties
# lines the way the apache/kafka image does (KAFKA_FOO_BAR -> foo.bar). What names containers
# (quorum voters, log dirs) is set per node by the caller instead.
compose_kafka_props() {
    [[ -f $COMPOSE_FILE ]] || die "cluster topology: $COMPOSE_FILE is missing"
    awk '
        /^x-kafka-env:/ { inside = 1; next }
        inside && /^[^[:space:]#]/ { inside = 0 }
        inside && match($0, /^[[:space:]]+KAFKA_[A-Z_]+:/) {
            key = substr($0, RSTART, RLENGTH - 1); sub(/^[[:space:]]+KAFKA_/, "", key)
            val = substr($0, RSTART + RLENGTH); sub(/^[[:space:]]*"?/, "", val); sub(/"?[[:space:]]*(#.*)?$/, "", val)
            if (key == "CONTROLLER_QUORUM_VOTERS" || key == "LOG_DIRS") next
            gsub(/___/, "-", key); gsub(/__/, "\001", key); gsub(/_/, ".", key); gsub(/\001/, "_", key)
            print tolower(key) "=" val
        }' "$COMPOSE_FILE"
}

compose_cluster_id() {
    sed -n 's/^[[:space:]]*CLUSTER_ID:[[:space:]]*"\{0,1\}\([A-Za-z0-9_-]\{22\}\)"\{0,1\}.*/\1/p' "$COMPOSE_FILE" | head -n 1
}

kafka_write_cluster_conf() {
    mkdir -p -- "$KAFKA_LOG_DIRS" "$KAFKA_LOGS"
    local voters="" i
    for i in 1 2 3; do voters+="${voters:+,}$i@$HOST:${CK_CTRL_PORTS[i - 1]}"; done
    {
        echo "# Written by scripts/services.sh (cluster topology) on every start; edits are lost."
        echo "# From docker-compose.yml (x-kafka-env):"
        compose_kafka_props
        echo "# This node:"
        echo "node.id=$KAFKA_NODE"
        echo "controller.quorum.voters=$voters"
        echo "listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT"
        echo "advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT"
        echo "log.dirs=$KAFKA_LOG_DIRS"
        echo "# Sizing for a laptop; the semantics stay those of the compose file."
        echo "num.partitions=3"
        echo "offsets.topic.num.partitions=10"
        echo "transaction.state.log.num.partitions=10"
        echo "num.recovery.threads.per.data.dir=1"
        echo "log.retention.hours=168"
    } >"$KAFKA_PROPS"
    grep -q '^min.insync.replicas=2$' "$KAFKA_PROPS" && grep -q '^default.replication.factor=3$' "$KAFKA_PROPS" ||
        die "cluster topology: docker-compose.yml no longer sets KAFKA_MIN_INSYNC_REPLICAS=2 / KAFKA_DEFAULT_REPLICATION_FACTOR=3"
}

# Launch broker $KAFKA_NODE (selected) if it is not running; sets KAFKA_LAUNCHED=1 if it did.
launch_cluster_broker() {
    KAFKA_LAUNCHED=0
    if kafka_running; then
        return 0
    fi
    if [[ -f $KAFKA_PID ]]; then
        wait_pid_gone "$(read_pid "$KAFKA_PID")"
        rm -f -- "$KAFKA_PID"
    fi
    require_port_free "$KAFKA_PORT" "kafka-$KAFKA_NODE"
    require_port_free "$KAFKA_CONTROLLER_PORT" "kafka-$KAFKA_NODE"
    mkdir -p -- "$KAFKA_DIR" "$KAFKA_LOGS"
    kafka_write_conf   # log4j files
    kafka_write_cluster_conf
    if [[ ! -f $KAFKA_LOG_DIRS/meta.properties ]]; then
        local cid
        cid=$(compose_cluster_id)
        [[ -n $cid ]] || die "cluster topology: no CLUSTER_ID in $COMPOSE_FILE"
        log "kafka-$KAFKA_NODE: formatting storage (cluster id $cid)"
        kafka_tool kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_PROPS" >>"$KAFKA_OUT" 2>&1 ||
            die_log "kafka-$KAFKA_NODE: StorageTool format failed" "$KAFKA_OUT"
    fi
    log "kafka-$KAFKA_NODE: starting on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
    printf '\n==== %s scripts/services.sh: starting kafka.Kafka ====\n' "$(date -Is)" >>"$KAFKA_OUT"
    # shellcheck disable=SC2016  # expanded by the inner bash
    kafka_broker_cmd
    setsid bash -c 'echo $$ >"$0"; exec nohup "$@"' "$KAFKA_PID" \
        "${KAFKA_BROKER_JVM[@]}" -Xms1g -Xmx1g "${KAFKA_BROKER_ARGS[@]}" \
        </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s $KAFKA_PID ]] && break
        sleep 0.1
    done
    KAFKA_LAUNCHED=1
}

# One produce/consume round trip through the three brokers, on a topic with replication factor 3
# (so min.insync.replicas=2 is really in force).
cluster_roundtrip() {
    local all=$KAFKA_BROKERS errf=$CLUSTER_DIR/healthcheck.err out=$CLUSTER_DIR/healthcheck.$$.out
    : >"$errf"
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$all" --create --if-not-exists \
        --topic "$KAFKA_HEALTH_TOPIC" --partitions 1 --replication-factor 3 >>"$errf" 2>&1 || return 1
    kafka_token_roundtrip "$all" 60000 "$errf" "$out"
}

cluster_kafka_all_running() {
    local n
    for n in 1 2 3; do
        kafka_select_node "$n"
        kafka_running || return 1
    done
}

# ---- Redis Cluster

CR_NODE_TIMEOUT_MS=1000

cr_dir() { printf '%s' "$CLUSTER_DIR/redis-$1"; }
cr_cli() { local port=$1; shift; timeout 5 redis-cli -h "$HOST" -p "$port" "$@"; }
cr_running() {
    local pid
    pid=$(read_pid "$(cr_dir "$1")/redis.pid")
    pid_alive "$pid" && pid_cmdline_has "$pid" redis-server ":$1"
}
cr_cur_running() { cr_running "$CR_CUR"; }
cr_ready() { [[ $(cr_cli "$1" ping 2>/dev/null) == PONG ]]; }

start_cluster_redis_node() {
    local port=$1 dir
    dir=$(cr_dir "$port")
    if cr_running "$port"; then
        return 0
    fi
    if [[ -f $dir/redis.pid ]]; then
        wait_pid_gone "$(read_pid "$dir/redis.pid")"
        rm -f -- "$dir/redis.pid"
    fi
    require_port_free "$port" "redis-$port"
    mkdir -p -- "$dir/data"
    cat >"$dir/redis.conf" <<EOF
# Written by scripts/services.sh (cluster topology) on every start; edits are lost.
bind $HOST
port $port
protected-mode yes
daemonize yes
pidfile "$dir/redis.pid"
logfile "$dir/redis.log"
dir "$dir/data"
appendonly yes
appendfsync everysec
cluster-enabled yes
cluster-config-file nodes.conf
# The bus port defaults to port + 10000, which does not exist above 55535.
cluster-port $((port - 10000))
# A master that stops answering for 1 s is failed over to its replica within seconds.
cluster-node-timeout $CR_NODE_TIMEOUT_MS
EOF
    log "redis-$port: starting (cluster node)"
    redis-server "$dir/redis.conf" </dev/null >/dev/null 2>>"$dir/redis.log" 9>&- ||
        die_log "redis-$port: redis-server failed to start" "$dir/redis.log"
}

cluster_redis_state_ok() {
    local info
    info=$(cr_cli "${CR_PORTS[0]}" cluster info 2>/dev/null) || return 1
    [[ $info == *"cluster_state:ok"* && $info == *"cluster_known_nodes:${#CR_PORTS[@]}"* ]]
}

start_cluster_redis() {
    redis_require_bin
    local p
    for p in "${CR_PORTS[@]}"; do start_cluster_redis_node "$p"; done
    for p in "${CR_PORTS[@]}"; do
        CR_CUR=$p
        wait_ready "redis-$p" "$(cr_dir "$p")/redis.log" cr_cur_running cr_ready "$p"
    done
    # A new set of nodes is made a cluster once; after a restart the nodes find each other again
    # from their nodes.conf.
    if [[ $(cr_cli "${CR_PORTS[0]}" cluster info 2>/dev/null) == *"cluster_known_nodes:1"* ]] &&
        [[ $(cr_cli "${CR_PORTS[0]}" dbsize 2>/dev/null) == 0 ]]; then
        local nodes=()
        for p in "${CR_PORTS[@]}"; do nodes+=("$HOST:$p"); done
        log "redis: creating the cluster (3 masters, 3 replicas)"
        timeout 60 redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$CLUSTER_DIR/redis-create.log" 2>&1 ||
            die_log "redis: redis-cli --cluster create failed" "$CLUSTER_DIR/redis-create.log"
    fi
    wait_ready "redis cluster" "$CLUSTER_DIR/redis-create.log" "" cluster_redis_state_ok
    log "redis cluster: ok (${CR_PORTS[*]})"
}

stop_cluster_redis() {
    local p pid
    for p in "${CR_PORTS[@]}"; do
        if cr_running "$p"; then
            pid=$(read_pid "$(cr_dir "$p")/redis.pid")
            log "redis-$p: stopping (pid $pid)"
            cr_cli "$p" shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
            wait_pid_exit "$pid" "redis-$p" "$(cr_dir "$p")/redis.log"
        fi
        rm -f -- "$(cr_dir "$p")/redis.pid"
    done
}

cluster_up() {
    local start=$SECONDS n launched=0
    kafka_require_bin
    kafka_select_node 1
    kafka_ensure_libs
    for n in 1 2 3; do
        kafka_select_node "$n"
        launch_cluster_broker
        ((KAFKA_LAUNCHED)) && launched=1
    done
    start_postgres
    start_cluster_redis
    for n in 1 2 3; do
        kafka_select_node "$n"
        wait_ready "kafka-$n" "$KAFKA_SERVER_LOG $KAFKA_OUT" kafka_running kafka_port_ready
    done
    if ((launched)); then
        log "kafka cluster: produce/consume round trip (replication factor 3)"
        local t0=$SECONDS
        until cluster_roundtrip; do
            cluster_kafka_all_running || die_log "a kafka broker exited during start-up" "$KAFKA_SERVER_LOG"
            ((SECONDS - t0 < TIMEOUT)) || die_log "kafka cluster: no round trip within ${TIMEOUT}s" "$CLUSTER_DIR/healthcheck.err"
            sleep 1
        done
    fi
    log "cluster topology up in $((SECONDS - start))s (data: $CLUSTER_DIR)"
}

cluster_down() {
    local n
    for n in 1 2 3; do
        kafka_select_node "$n"
        stop_kafka
    done
    stop_cluster_redis
}

cluster_status() {
    local rc=0 n p
    status_postgres || rc=1
    for n in 1 2 3; do
        kafka_select_node "$n"
        if kafka_running && kafka_port_ready; then
            echo "kafka-$n: up (pid $(read_pid "$KAFKA_PID"), $HOST:$KAFKA_PORT)"
        else
            echo "kafka-$n: down ($HOST:$KAFKA_PORT)"
            rc=1
        fi
    done
    for p in "${CR_PORTS[@]}"; do
        if cr_running "$p" && cr_ready "$p"; then
            echo "redis-$p: up (pid $(read_pid "$(cr_dir "$p")/redis.pid"), $(cr_cli "$p" role 2>/dev/null | head -n 1))"
        else
            echo "redis-$p: down"
            rc=1
        fi
    done
    if cluster_redis_state_ok; then echo "redis cluster: ok"; else echo "redis cluster: not ok"; rc=1; fi
    return "$rc"
}

cluster_kill_kafka() {
    local n=${1:-}
    [[ $n =~ ^[123]$ ]] || die "kill-kafka: which broker (1, 2 or 3)?"
    kafka_select_node "$n"
    local pid
    pid=$(read_pid "$KAFKA_PID")
    if kafka_running; then
        log "kafka-$n: SIGKILL (pid $pid)"
        kill -KILL "$pid"
        wait_pid_gone "$pid"
    fi
}

# Start broker N again (after kill-kafka) and wait until it listens; no round trip, so a fault
# drill is not held up by the command-line tools' JVMs.
cluster_start_kafka() {
    local n=${1:-}
    [[ $n =~ ^[123]$ ]] || die "start-kafka: which broker (1, 2 or 3)?"
    kafka_require_bin
    kafka_select_node "$n"
    launch_cluster_broker
    wait_ready "kafka-$n" "$KAFKA_SERVER_LOG $KAFKA_OUT" kafka_running kafka_port_ready
    log "kafka-$n: listening (pid $(read_pid "$KAFKA_PID"))"
}

cluster_kill_redis() {
    local port=${1:-} pid
    [[ " ${CR_PORTS[*]} " == *" $port "* ]] || die "kill-redis: which node (${CR_PORTS[*]})?"
    pid=$(read_pid "$(cr_dir "$port")/redis.pid")
    if cr_running "$port"; then
        log "redis-$port: SIGKILL (pid $pid)"
        kill -KILL "$pid"
        wait_pid_gone "$pid"
    fi
}

cluster_reset() {
    cluster_down
    log "deleting $CLUSTER_DIR"
    rm -rf -- "$CLUSTER_DIR"
}

cluster_main() {
    local cmd=${1:-}
    cluster_exports
    # The cluster has a lock of its own: the single topology's commands are not held up by it.
    mkdir -p -- "$CLUSTER_DIR"
    prepare_data_dir
    exec 9>"$CLUSTER_DIR/.lock"
    case $cmd in
    env | status | -h | --help | help) ;;
    *) flock -w 300 9 || die "another scripts/services.sh is busy with $CLUSTER_DIR (waited 300 s)" ;;
    esac
    case $cmd in
    up)
        cluster_up >&2
        print_env
        ;;
    down) cluster_down >&2 ;;
    status) cluster_status ;;
    check) cluster_status && cluster_roundtrip && echo "kafka cluster: produce/consume round trip ok" ;;
    env) print_env ;;
    reset) cluster_reset >&2 ;;
    kill-kafka) cluster_kill_kafka "${2:-}" >&2 ;;
    start-kafka) cluster_start_kafka "${2:-}" >&2 ;;
    kill-redis) cluster_kill_redis "${2:-}" >&2 ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

# ---------------------------------------------------------------- commands

print_env() {
    printf 'export DATABASE_URL=%s\n' "$DATABASE_URL"
    printf 'export REDIS_URL=%s\n' "$REDIS_URL"
    printf 'export KAFKA_BROKERS=%s\n' "$KAFKA_BROKERS"
    if [[ $TOPOLOGY == cluster ]]; then
        printf 'export TOPIC_REPLICATION_FACTOR=3\n'
    fi
}

cmd_up() {
    take_lock
    local start=$SECONDS
    # Kafka's JVM is the slowest to start: launch it first, then bring up
    # PostgreSQL and Redis while it boots, then wait for it.
    launch_kafka
    start_postgres
    start_redis
    if ((KAFKA_LAUNCHED)); then
        wait_kafka 1
        log "kafka: ready (pid $(read_pid "$KAFKA_PID"))"
    else
        wait_kafka 0
        log "kafka: already running (pid $(read_pid "$KAFKA_PID"), $HOST:$KAFKA_PORT)"
    fi
    log "all services up in $((SECONDS - start))s (data: $DATA_DIR)"
}

cmd_down() {
    if [[ ! -d $DATA_DIR ]]; then
        log "nothing to stop ($DATA_DIR does not exist)"
        return 0
    fi
    take_lock
    stop_kafka
    stop_redis
    stop_postgres
}

cmd_status() {
    local rc=0
    status_postgres || rc=1
    status_redis || rc=1
    status_kafka || rc=1
    return "$rc"
}

cmd_check() {
    cmd_status || return 1
    if [[ -d $KAFKA_LIBS ]]; then
        if kafka_roundtrip; then
            echo "kafka: produce/consume round trip ok"
        else
            echo "kafka: produce/consume round trip FAILED (see $KAFKA_LOGS/healthcheck.err)"
            return 1
        fi
    fi
}

cmd_reset() {
    if [[ -e $DATA_DIR ]]; then
        case $DATA_DIR in
        / | "$HOME" | "$REPO_DIR" | "$SCRIPT_DIR") die "refusing to delete $DATA_DIR" ;;
        esac
        if [[ ! -f $DATA_MARKER ]] && [[ -n $(ls -A -- "$DATA_DIR" 2>/dev/null) ]]; then
            die "refusing to delete $DATA_DIR: it was not created by this script (no $(basename "$DATA_MARKER"))"
        fi
    fi
    cmd_down
    log "deleting $DATA_DIR"
    rm -rf -- "$DATA_DIR"
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Every port above sits in Linux's ephemeral range (32768-60999): an outgoing connection may take
# one as its local port while a service is down (a fault test's stop/start), and the restart then
# fails with "Address already in use" (seen: kafka-1 of the cluster topology). Reserving them keeps
# the kernel from handing them out. Best effort: only root may, and a container may forbid it.
reserve_ports() {
    local f=/proc/sys/net/ipv4/ip_local_reserved_ports p ports=()
    [[ -w $f ]] || return 0
    ports=("$PG_PORT" "$REDIS_PORT" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "${CK_PORTS[@]}" "${CK_CTRL_PORTS[@]}")
    for p in "${CR_PORTS[@]}"; do ports+=("$p" "$((p - 10000))"); done
    local current joined
    current=$(<"$f")
    joined=$(IFS=,; echo "${ports[*]}")
    echo "${current:+$current,}$joined" >"$f" 2>/dev/null || true
}

main() {
    local cmd=${1:-}
    [[ $cmd == up || $cmd == start-* || $cmd == restart* ]] && reserve_ports
    if [[ $TOPOLOGY == cluster ]]; then
        cluster_main "$@"
        return
    fi
    case $cmd in
    up)
        cmd_up >&2
        print_env
        ;;
    down) cmd_down >&2 ;;
    status) cmd_status ;;
    check) take_lock && cmd_check ;;
    env) print_env ;;
    reset) cmd_reset >&2 ;;
    start-postgres) take_lock && start_postgres >&2 ;;
    start-redis) take_lock && start_redis >&2 ;;
    start-kafka) take_lock && start_kafka >&2 ;;
    stop-postgres) take_lock && stop_postgres >&2 ;;
    stop-redis) take_lock && stop_redis >&2 ;;
    stop-kafka) take_lock && stop_kafka >&2 ;;
    delete-topics) delete_topics "${2:-}" ;;
    prune) cmd_prune >&2 ;;
    warm-kafka) warm_kafka "${2:-20}" >&2 ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

# --topology X / --topology=X may stand anywhere on the command line.
TOPOLOGY=${BOOKING_TOPOLOGY:-single}
ARGS=()
while (($#)); do
    case $1 in
    --topology) TOPOLOGY=${2:-}; shift 2 || shift ;;
    --topology=*) TOPOLOGY=${1#--topology=}; shift ;;
    *) ARGS+=("$1"); shift ;;
    esac
done
[[ $TOPOLOGY == single || $TOPOLOGY == cluster ]] || die "unknown topology '$TOPOLOGY' (single or cluster)"
main "${ARGS[@]}"
