#!/bin/sh
# SPDX-License-Identifier: MIT
# bench_scale.sh — `make bench-scale` (issue 6): qins at Phi-3.5-mini scale on this machine.
#   1. `qinsctl synth --arch phi-3.5-mini` into a fresh store: import time, MB/s of FP32 generated
#      and encoded, the synth's peak RSS, stored bytes vs FP32 and bytes/weight, data.mdb's size.
#   2. qinsd on that store and 4 worker processes (build/bench/scale_worker serve) each streaming
#      every tensor once, concurrently, through qinsd: aggregate GB/s of FP32 next to bare Unix
#      sockets measured in the same run, each worker's peak RSS, the daemon's RSS, and the peak
#      of the summed PSS of daemon + workers next to 4 private FP32 copies.
#   3. The acceptance checks of issue 6, one line each; exit 1 if one fails.
# The output is also written to BUILD/bench/scale.log, from which tests/bench/render.py rewrites
# the scale section of docs/BENCHMARKS.md. qinsd is always stopped and the store always removed
# (trap), whatever happens.
# Environment: QINS_BUILD (build dir), ARCH (phi-3.5-mini; phi-mini-4l or tiny for a quick run),
# WORKERS (4), SLICE_MIB (32: row slices per get), SCALE_DIR (where the store goes: default
# $TMPDIR or /tmp; needs about 4.2 GB free for phi-3.5-mini), SEED (1).
# Usage: bench_scale.sh [BUILD_DIR]
set -eu
BUILD="${1:-${QINS_BUILD:-build}}"
ARCH="${ARCH:-phi-3.5-mini}"; WORKERS="${WORKERS:-4}"; SLICE_MIB="${SLICE_MIB:-32}"; SEED="${SEED:-1}"
BASE="${SCALE_DIR:-${TMPDIR:-/tmp}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
LOG="$BUILD/bench/scale.log"
mkdir -p "$BUILD/bench"

D=$(mktemp -d "$BASE/qins-scale-XXXXXX")
# run() executes in a subshell (the pipeline into tee): it records qinsd's pid in $D/qinsd.pid,
# and this shell's EXIT trap stops it and removes the directory.
cleanup() {
  PID=$(cat "$D/qinsd.pid" 2>/dev/null || true)
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID"; i=0
    while kill -0 "$PID" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
    kill -KILL "$PID" 2>/dev/null || true
  fi
  rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run() {
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
  mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
  echo "# qins bench-scale — $(date -u +%Y-%m-%dT%H:%MZ) — $cpu — $(nproc) cores — $mem RAM — load $(cut -d' ' -f1-3 /proc/loadavg)"
  avail=$(df -Pk "$D" | awk 'NR==2 {print $4}')
  echo "store: $D ($((avail / 1048576)) GiB free on its filesystem); arch $ARCH, seed $SEED, QINS_IMPORT_THREADS=${QINS_IMPORT_THREADS:-default (one per CPU)}"

  # 1. synth (the import): qinsctl's own JSON, and its peak RSS through scale_worker exec.
  "$BUILD/bench/scale_worker" exec "$BUILD/qinsctl" --store "$D/store" --json synth --arch "$ARCH" \
    --model "$ARCH" --seed "$SEED" >"$D/synth.json" 2>"$D/synth.err" || { cat "$D/synth.err" >&2; return 1; }
  rss_kb=$(sed -n 's/^peak_rss_kb //p' "$D/synth.err")
  cpu_s=$(sed -n 's/^cpu_s //p' "$D/synth.err")
  load=$(cut -d' ' -f1 /proc/loadavg)
  file_bytes=$(stat -c %s "$D/store/data.mdb")
  /usr/bin/python3 - "$D/synth.json" "$rss_kb" "$file_bytes" "$D/facts" "$cpu_s" "$load" "$(nproc)" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); rss = int(sys.argv[2]) * 1024; fb = int(sys.argv[3])
cpu, load, ncpu = float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
src, st, n = r["source_bytes"], r["stored_bytes"], r["elements"]
print("import: qinsctl synth --arch %s: %d tensors, %.3f B weights, %.2f GB FP32 generated, fitted, encoded and written in %.1f s = %.1f MB/s; peak RSS %.0f MB"
      % (r["arch"], r["n_tensors"], n / 1e9, src / 1e9, r["seconds"], r["mb_per_s"], rss / 1e6))
print("import CPU: %.1f s user+sys = %.1f MB/s per CPU-second; with all %d cores to itself it would take about %.0f s (load average at its end: %s)"
      % (cpu, src / 1e6 / cpu, ncpu, cpu / ncpu, load))
print("stored: %.3f GB = %.1f%% of FP32 (%.2fx smaller), %.4f bytes/weight, matrices SNR %.2f dB; data.mdb %.3f GB"
      % (st / 1e9, 100.0 * st / src, src / st, r["bytes_per_weight"], r["snr_db_matrices"], fb / 1e9))
with open(sys.argv[4], "w") as f:
    f.write("src=%d\nstored=%d\nfile=%d\nelements=%d\n" % (src, st, fb, n))
EOF
  . "$D/facts"

  # 2. serve: qinsd with its defaults, then the workers.
  # (stdout/stderr away from the pipe into tee, which would otherwise wait for qinsd to exit)
  "$BUILD/qinsd" --store "$D/store" --socket "$D/s" --log "$D/log" >/dev/null 2>&1 & PID=$!
  echo "$PID" >"$D/qinsd.pid"
  i=0
  until "$BUILD/qinsctl" ping --socket "$D/s" >/dev/null 2>&1; do
    i=$((i+1)); if [ $i -ge 1000 ] || ! kill -0 "$PID" 2>/dev/null; then cat "$D/log" >&2; return 1; fi
    sleep 0.01
  done
  set +e
  "$BUILD/bench/scale_worker" serve "$D/s" "$ARCH" "$WORKERS" "$PID" "$SLICE_MIB" >"$D/serve.out"
  serve_rc=$?
  set -e
  grep -v -e '^peak_pss_bytes ' -e '^errors_total ' "$D/serve.out"
  peak_pss=$(sed -n 's/^peak_pss_bytes //p' "$D/serve.out")
  errs=$(sed -n 's/^errors_total //p' "$D/serve.out")
  [ -n "$peak_pss" ] || peak_pss=0
  [ -n "$errs" ] || errs=1
  kill -TERM "$PID"; wait "$PID" || true

  # 3. acceptance (issue 6).
  /usr/bin/python3 - "$src" "$stored" "$elements" "$file" "$peak_pss" "$errs" "$serve_rc" "$WORKERS" <<'EOF'
import sys
src, st, n, fb, pss, errs, rc, w = (int(x) for x in sys.argv[1:])
GB = 1e9
ok = True
def check(cond, text):
    global ok
    ok = ok and cond
    print("acceptance: %s: %s" % (text, "PASS" if cond else "FAIL"))
check(st <= 0.28 * src and st / n <= 1.1,
      "stored %.1f%% of FP32 (<= 28%%), %.3f bytes/weight (<= 1.1)" % (100.0 * st / src, st / n))
check(errs == 0 and rc == 0, "%d workers streamed the whole model, %d errors" % (w, errs))
check(pss <= fb + 4 * 2**30,
      "peak PSS of daemon + workers %.2f GB <= data.mdb %.2f GB + 4 GiB = %.2f GB (%d private FP32 copies: %.1f GB)"
      % (pss / GB, fb / GB, (fb + 4 * 2**30) / GB, w, w * src / GB))
sys.exit(0 if ok else 1)
EOF
}

# set -e holds inside the subshell: a failing step ends run() before "0" is written.
{ run; echo 0 >"$D/rc"; } 2>&1 | tee "$LOG"
rc=$(cat "$D/rc" 2>/dev/null || echo 1)
# The doc gets the figures of any run that got as far as the acceptance checks (pass or fail).
if grep -q '^acceptance: ' "$LOG"; then /usr/bin/python3 "$HERE/render.py" --scale "$LOG"; fi
exit "$rc"
