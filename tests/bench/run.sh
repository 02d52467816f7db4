#!/bin/sh
# `make bench`: runs every benchmark binary in BUILD/bench (and bench scripts beside this file),
# one after the other, so each prints its figures and its same-run reference (ratios) undisturbed.
# Usage: run.sh BUILD_DIR SHARED_DIR
set -e
BUILD="$1"; SHARED="$2"
export QINS_BUILD="$BUILD" QINS_SHARED="$SHARED"
echo "# qins bench — $(date -u +%Y-%m-%dT%H:%MZ) — $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') — $(nproc) cores"
for b in "$BUILD"/bench/*; do
  [ -x "$b" ] || continue
  echo "== $(basename "$b")"
  "$b"
done
for s in "$(dirname "$0")"/bench_*.sh; do
  [ -f "$s" ] || continue
  echo "== $(basename "$s")"
  sh "$s"
done
