#!/bin/sh
# `make bench`: runs every benchmark binary in BUILD/bench (and bench scripts beside this file),
# one after the other, so each prints its figures and its same-run reference (ratios) undisturbed.
# Skipped: scale_worker (a load program), bench_scale.sh, which `make bench-scale` runs on its own
# (about 20 minutes), and bench_core_compare.sh, which `make bench-compare` runs on its own (it
# builds an older tree's qinsd to compare with). The output is also written to
# BUILD/bench/bench.log, from which tests/bench/render.py regenerates docs/BENCHMARKS.md (the scale
# and before/after sections come from their own logs, or stay as they were).
# Usage: run.sh BUILD_DIR SHARED_DIR
set -e
BUILD="$1"; SHARED="$2"
export QINS_BUILD="$BUILD" QINS_SHARED="$SHARED"
HERE="$(cd "$(dirname "$0")" && pwd)"
HELPERS="scale_worker bench_scale.sh bench_core_compare.sh"
LOG="$BUILD/bench/bench.log"
mkdir -p "$BUILD/bench"

is_helper() {
  for h in $HELPERS; do [ "$1" = "$h" ] && return 0; done
  return 1
}

run() {
  echo "# qins bench — $(date -u +%Y-%m-%dT%H:%MZ) — $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') — $(nproc) cores — load $(cut -d' ' -f1-3 /proc/loadavg)"
  for b in "$BUILD"/bench/*; do
    [ -f "$b" ] && [ -x "$b" ] || continue
    is_helper "$(basename "$b")" && continue
    echo "== $(basename "$b")"
    "$b"
  done
  for s in "$HERE"/bench_*.sh; do
    [ -f "$s" ] || continue
    is_helper "$(basename "$s")" && continue
    echo "== $(basename "$s")"
    sh "$s"
  done
}

# set -e holds inside the subshell: a failing benchmark ends run() before "0" is written.
RC="$LOG.rc"
rm -f "$RC"
{ run; echo 0 >"$RC"; } 2>&1 | tee "$LOG"
rc=$(cat "$RC" 2>/dev/null || echo 1)
rm -f "$RC"
if [ "$rc" = 0 ]; then /usr/bin/python3 "$HERE/render.py" --bench "$LOG"; fi
exit "$rc"
