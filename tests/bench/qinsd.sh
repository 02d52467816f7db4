# SPDX-License-Identifier: MIT
# qinsd.sh — sourced by the benchmark scripts (bench_worker.sh, bench_arena_worker.sh): a temp dir
# $D with an empty store, a qinsd on $D/s started by qinsd_start (waits until it answers ping,
# 10 s at most) and stopped (SIGTERM, then SIGKILL after 10 s) with the dir removed on exit.
# Needs $BUILD. Not run by itself (run.sh runs bench_*.sh only).
D=$(mktemp -d /tmp/qins-bench-XXXXXX)
PID=""
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID"; i=0
    while kill -0 "$PID" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    kill -KILL "$PID" 2>/dev/null || true
  fi
  rm -rf "$D"
}
trap cleanup EXIT INT TERM
mkdir -p "$D/store"

qinsd_start() {
  "$BUILD/qinsd" --store "$D/store" --socket "$D/s" --log "$D/log" "$@" & PID=$!
  i=0
  until "$BUILD/qinsctl" ping --socket "$D/s" >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 1000 ] && kill -0 "$PID" 2>/dev/null || { cat "$D/log" >&2; exit 1; }
    sleep 0.01
  done
}
