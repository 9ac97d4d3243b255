#!/usr/bin/env bash
# Prints this checkout's cargo target directory, creating it on first use.
#
# One directory per checkout (keyed by a hash of the checkout's path): cargo decides what to
# rebuild by file times, not by where the sources are, so a target directory shared between
# clones can run another clone's binaries, with that clone's compiled-in paths (a fault test then
# stops the other clone's services). A new checkout's directory starts as a copy of the shared
# cache ~/.cache/booking-target, so its first build only recompiles the workspace's own crates.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cache="$HOME/.cache/booking-target"
dir="$cache-$(printf '%s' "$repo" | sha256sum | cut -c1-12)"
if [[ ! -d $dir ]]; then
  if [[ -d $cache ]]; then
    echo "[target-dir] first build of $repo: seeding $dir from $cache" >&2
    rm -rf -- "$dir.tmp"
    cp -a --reflink=auto -- "$cache" "$dir.tmp"
    mv -- "$dir.tmp" "$dir"
  else
    mkdir -p -- "$dir"
  fi
fi
printf '%s\n' "$dir"
