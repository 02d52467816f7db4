#!/bin/sh
# SPDX-License-Identifier: MIT
# bench_core_compare.sh — `make bench-compare`: the serving core before and after its redesign
# (issue 12), same run. Builds the qinsd of revision REV (default c8b3cf1, the last commit before
# the redesign) in a temporary git worktree under /tmp (removed afterwards), then runs the
# current bench_serve (the protocol is the same) against the old and the new qinsd in turn,
# ROUNDS rounds, the order reversed every round (see run_variant). Each run prints its own
# same-run references (the bare socket, Redis), so the lines to compare are the ratios: 64 MiB get
# (f32 and qins8) to the bare socket, 4 KiB latency p50/p99 with 1 and 16 clients to Redis.
# Per-round lines for each daemon, then a summary: each ratio per round, before | after | checked.
# 10 to 30 s a bench_serve run on 2 cores: 3 x ROUNDS runs (default 3: a few minutes) plus the old
# build. Not part of `make bench` (run.sh skips it): it builds a second tree.
# Usage: bench_core_compare.sh BUILD_DIR [ROUNDS] [REV]
#   BENCH_SCALE (bench_serve's request counts) and BENCH_QINSD_ARGS pass through to both runs.
set -eu
BUILD=$(cd "$1" && pwd)
ROUNDS=${2:-3}
REV=${3:-c8b3cf1}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
BENCH="$BUILD/bench/bench_serve"
[ -x "$BENCH" ] || { echo "bench_core_compare: $BENCH not built (make bench-compare builds it)" >&2; exit 1; }

T=$(mktemp -d /tmp/qins-compare-XXXXXX)
cleanup() {
  git -C "$REPO" worktree remove --force "$T/src" 2>/dev/null || true
  rm -rf "$T"
  git -C "$REPO" worktree prune 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

compare() {
  # The old daemon: built in its own worktree; bench_serve runs $QINS_BUILD/qinsd, so "before" is a
  # directory holding a link to it.
  git -C "$REPO" worktree add --detach -q "$T/src" "$REV"
  if ! make -C "$T/src" -j2 BUILD="$T/build" "$T/build/qinsd" >"$T/make.log" 2>&1; then
    tail -20 "$T/make.log" >&2
    echo "bench_core_compare: building qinsd at $REV failed" >&2
    exit 1
  fi
  mkdir "$T/before"
  ln -s "$T/build/qinsd" "$T/before/qinsd"
  echo "before: qinsd at $(git -C "$REPO" rev-parse --short "$REV"); after and checked: this tree's qinsd at $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD || echo ' + uncommitted changes')"

  # One bench_serve run: its figure lines, prefixed "round R LABEL: ", into $T/lines.
  run_one() { # round label dir [VAR=value for qinsd's environment]
    r1=$1 l1=$2 d1=$3
    shift 3
    out=$(env "$@" QINS_BUILD="$d1" BENCH_SKIP_VERIFY=1 "$BENCH") || {
      echo "$out" >&2; echo "bench_core_compare: bench_serve failed ($l1)" >&2; exit 1; }
    echo "$out" | grep -E '^(serve_get_64MiB|slice_4KiB_latency|redis:)' | sed "s/^/round $r1 $l1: /" |
      tee -a "$T/lines"
  }
  # The three daemons of a round: before (REV's qinsd; its store checks each chunk once per process),
  # after (this tree's qinsd with the same checking policy, QINS_VERIFY=risk-wrong-numbers: the
  # serving core alone compared), checked (this tree's qinsd as shipped: every read checked).
  run_variant() { # round variant
    case $2 in
      before) run_one "$1" before "$T/before" ;;
      after) run_one "$1" after "$BUILD" QINS_VERIFY=risk-wrong-numbers ;;
      checked) run_one "$1" checked "$BUILD" ;;
    esac
  }
  : >"$T/lines"
  r=1
  while [ "$r" -le "$ROUNDS" ]; do
    if [ $((r % 2)) = 1 ]; then order="before after checked"; else order="checked after before"; fi
    for v in $order; do run_variant "$r" "$v"; done
    r=$((r + 1))
  done

  # The summary: per figure, each round's ratio, before | after | checked.
  echo "summary (per round; same-run ratios; 64 MiB get: qinsd / bare socket, higher is better; latency: qinsd / redis, lower is better):"
  awk '
    /serve_get_64MiB_[a-z0-9_]+: qinsd/ {
      split($4, a, ":"); v = "-"
      for (i = 1; i <= NF; i++) if ($i == "ratio") { v = $(i + 1); break }
      add("get_64MiB_" substr(a[1], 17) " ratio to bare", v)
    }
    /slice_4KiB_latency_/ {
      split($4, a, ":"); name = "latency_" substr(a[1], 20); p50 = p99 = "-"
      for (i = 1; i <= NF; i++) if ($i == "ratio" && $(i + 1) == "p50") { p50 = $(i + 2); p99 = $(i + 4); break }
      add(name " p50 to redis", p50); add(name " p99 to redis", p99)
    }
    function add(key, v) {
      if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      col[key, $3] = col[key, $3] " " v
    }
    END {
      for (i = 1; i <= n; i++)
        printf "  %-36s before%s | after%s | checked%s\n", order[i], col[order[i], "before:"],
               col[order[i], "after:"], col[order[i], "checked:"]
    }' "$T/lines"
}

# Like run.sh: the output also goes to BUILD/bench/compare.log, from which render.py rewrites the
# "compare" figures of docs/BENCHMARKS.md (only those). set -e holds inside the subshell: a
# failure ends compare() before "0" is written.
LOG="$BUILD/bench/compare.log"
{
  echo "# qins bench — $(date -u +%Y-%m-%dT%H:%MZ) — $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') — $(nproc) cores — load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "== bench_core_compare.sh"
  compare
  echo 0 >"$T/rc"
} 2>&1 | tee "$LOG"
[ "$(cat "$T/rc" 2>/dev/null)" = 0 ] || exit 1
[ -n "${BENCH_NO_RENDER:-}" ] || /usr/bin/python3 "$HERE/render.py" --bench "$LOG"
