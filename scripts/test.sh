#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, Redis and Kafka.
# Installs and starts them first (idempotent), so this works on a fresh machine.
#   scripts/test.sh [cargo test arguments…]
set -euo pipefail
cd "$(dirname "$0")/.."

# Build outside the clone, in a directory of this checkout's own (scripts/target-dir.sh: sharing
# one between clones can run another clone's binaries), seeded from a shared warm cache.
# (Each step is a plain command or assignment, never `export X=$(…)` or `eval "$(…)"`, which
# succeed whatever the inner command did: the first failing step stops the run, its own message
# last.)
if [[ -z ${CARGO_TARGET_DIR:-} ]]; then
  CARGO_TARGET_DIR=$(scripts/target-dir.sh)
fi
export CARGO_TARGET_DIR

# rdkafka builds its bundled librdkafka with these.
if ! command -v cmake >/dev/null || ! command -v make >/dev/null || ! dpkg -s zlib1g-dev >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq cmake make g++ zlib1g-dev pkg-config >/dev/null
fi

# promtool (Debian package `prometheus`) checks the Prometheus config, the alert rules and each
# daemon's /metrics output (tests/observability.rs). policy-rc.d keeps the package's own
# Prometheus server from being started by the install; we only want the tool.
if ! command -v promtool >/dev/null; then
  (
    export DEBIAN_FRONTEND=noninteractive
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  )
fi

# schemathesis (PyPI) fuzzes the API against its OpenAPI description (tests/schemathesis.rs); it
# lives in a virtualenv of its own under ~/.cache so it is installed once per machine.
VENV="$HOME/.cache/booking-venv"
if [[ ! -x "$VENV/bin/schemathesis" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q schemathesis
fi
export SCHEMATHESIS="$VENV/bin/schemathesis"

# The browser test (tests/browser.rs): Debian's Chromium (and its WebDriver), driven by
# playwright-core from npm, installed into tests/browser/node_modules (git-ignored). Playwright never
# downloads a browser here: the test points it at /usr/bin/chromium.
# fonts-nanum: the page is in Korean; without a Hangul font the failure screenshots show boxes.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v node >/dev/null || ! command -v npm >/dev/null || ! dpkg -s fonts-nanum >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  pkgs=(chromium chromium-driver fonts-nanum)
  command -v node >/dev/null || pkgs+=(nodejs)
  command -v npm >/dev/null || pkgs+=(npm)
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund --silent
fi

# `up` prints the exports on stdout only when every service answers; when it fails, its message
# (stderr) is the last thing printed and the run stops here.
services_env=$(scripts/services.sh up)
eval "$services_env"
export DATABASE_URL REDIS_URL KAFKA_BROKERS

# tests/cluster.rs runs on the production topology (three Kafka brokers, Redis Cluster), which
# runs beside the single-node services on ports of its own; `up` is idempotent.
CLUSTER_ENV=$(scripts/services.sh up --topology cluster)
CLUSTER_REDIS_URL=$(sed -n 's/^export REDIS_URL=//p' <<<"$CLUSTER_ENV")
CLUSTER_KAFKA_BROKERS=$(sed -n 's/^export KAFKA_BROKERS=//p' <<<"$CLUSTER_ENV")
export CLUSTER_REDIS_URL CLUSTER_KAFKA_BROKERS
export PATH="$PATH:/usr/sbin"   # redis-server for the tests that need a private one

# --workspace: the product (booking) and the load generator (bench/) with its tests.
cargo test --workspace --locked "$@"
