#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, Redis and Kafka.
# Installs and starts them first (idempotent), so this works on a fresh machine.
#   scripts/test.sh [cargo test arguments…]
set -euo pipefail
cd "$(dirname "$0")/.."

# Build outside the clone so repeated runs (and CI clones) reuse compiled dependencies.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/booking-target}"

# rdkafka builds its bundled librdkafka with these.
if ! command -v cmake >/dev/null || ! command -v make >/dev/null || ! dpkg -s zlib1g-dev >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq cmake make g++ zlib1g-dev pkg-config >/dev/null
fi

eval "$(scripts/services.sh up)"
export DATABASE_URL REDIS_URL KAFKA_BROKERS
export PATH="$PATH:/usr/sbin"   # redis-server for the tests that need a private one

cargo test --locked "$@"
