#!/usr/bin/env bash
# The full-length chaos run: a steady booking load while every daemon is SIGKILLed and restarted,
# Kafka is stopped for 30 s, Redis is flushed and restarted without its data, and PostgreSQL is
# restarted; then the invariants are checked and a table is printed. (The test suite runs a
# shortened version of the same test.)
set -euo pipefail
cd "$(dirname "$0")/.."
CHAOS_FULL=1 exec scripts/test.sh --test chaos -- --nocapture
