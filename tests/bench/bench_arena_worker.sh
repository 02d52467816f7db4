#!/bin/sh
# SPDX-License-Identifier: MIT
# bench_arena_worker.sh — run by `make bench` (tests/bench/run.sh): issue 14's worker figures on
# stories260K. 4 qins-llama2 workers at once reading every weight in place from qinsd's arena
# (--map) next to 4 of the same worker on local FP32 weights (--reference: the file, read into the
# worker), in the same run: tokens/s per worker (target: --map >= 0.9x FP32) and the workers'
# summed PSS (plus the daemon's for --map). Then the same on a synthetic model of stories110M's
# shapes (`qinsctl synth --arch llama2-110m`: a token reads ~440 MB of weights): --map vs local FP32
# (the model exported to an FP32 safetensors file, read into each worker) vs socket streaming (the
# qinsd provider, default budget). qinsd runs with arena-warm-bytes 0, so its PSS is what the mapped
# weights take (a warm reserve would add up to its size, docs/qinsd.md "The arena") and the
# workers' first maps create their pages (a conservative --map figure). Needs $QINS_BUILD and $QINS_SHARED (set by run.sh). STEPS
# (default 256), STEPS_110M (24) and HEADS (stories260K's 8) override; SKIP_110M=1 skips part 2.
set -eu
BUILD="${QINS_BUILD:-build}"; SHARED="${QINS_SHARED:-../shared}"
MODEL="${MODEL:-$SHARED/models/stories260K.safetensors}"
STEPS="${STEPS:-256}"; HEADS="${HEADS:-8}"
if [ ! -f "$MODEL" ]; then echo "bench_arena_worker: skipped: no $MODEL"; exit 0; fi
. "$(dirname "$0")/qinsd.sh"
"$BUILD/qinsctl" import --store "$D/store" "$MODEL" --model m >/dev/null
qinsd_start --arena-warm-bytes 0
if ! "$BUILD/qinsctl" stats --socket "$D/s" | grep -q '^arena_bytes'; then
  echo "bench_arena_worker: skipped: this qinsd has no arena"; exit 0
fi

# Runs 4 workers with the given arguments at once; prints "tokens/s-mean pss-sum-KiB".
four() {
  for n in 1 2 3 4; do
    "$BUILD/qins-llama2" --steps "$STEPS" -q "$@" > "$D/out$n" 2>&1 &
    eval "W$n=\$!"
  done
  for n in 1 2 3 4; do eval "wait \$W$n" || { cat "$D/out$n" >&2; exit 1; }; done
  cat "$D"/out1 "$D"/out2 "$D"/out3 "$D"/out4 | awk '
    /^speed:/ { for (i = 1; i <= NF; i++) if ($i == "tokens/s") { t += $(i - 1); n++ } }
    /^memory:/ { p += $3 }
    END { printf "%.1f %d\n", n ? t / n : 0, p }'
}

# Alternated, FP32 first: each side runs twice and keeps its better mean.
best_f=0; best_m=0; pss_f=0; pss_m=0
for round in 1 2; do
  set -- $(four --reference "$MODEL")
  if awk "BEGIN{exit !($1 > $best_f)}"; then best_f=$1; pss_f=$2; fi
  set -- $(four --socket "$D/s" --model m --n-heads "$HEADS" --map)
  if awk "BEGIN{exit !($1 > $best_m)}"; then best_m=$1; pss_m=$2; fi
done
dpss=$(awk '/^Pss:/ { print $2 }' "/proc/$PID/smaps_rollup")
ratio=$(awk "BEGIN{printf \"%.2f\", ($best_f > 0 ? $best_m / $best_f : 0)}")
echo "arena_worker_stories260K_4x: --map $best_m tokens/s per worker | local FP32 $best_f tokens/s per worker | ratio $ratio (target >= 0.9; $STEPS steps, 4 workers at once, better of 2 alternated rounds) | summed PSS: --map workers $pss_m KiB + qinsd $dpss KiB (arena-warm-bytes 0), FP32 workers $pss_f KiB"

[ "${SKIP_110M:-0}" = 1 ] && exit 0
# Part 2: stories110M's shapes, synthetic weights (tokens/s is what matters, not the text).
"$BUILD/qinsctl" synth --store "$D/store" --arch llama2-110m --model s110 >/dev/null
"$BUILD/qinsctl" export --store "$D/store" s110 "$D/s110.safetensors" >/dev/null
STEPS="${STEPS_110M:-24}"
set -- $(four --reference "$D/s110.safetensors"); f_t=$1; f_p=$2
set -- $(four --socket "$D/s" --model s110 --n-heads 12 --map); m_t=$1; m_p=$2
set -- $(four --socket "$D/s" --model s110 --n-heads 12); s_t=$1; s_p=$2
dpss=$(awk '/^Pss:/ { print $2 }' "/proc/$PID/smaps_rollup")
echo "arena_worker_stories110M_4x: --map $m_t tokens/s per worker | local FP32 $f_t | socket streaming $s_t | ratio map/FP32 $(awk "BEGIN{printf \"%.2f\", ($f_t > 0 ? $m_t / $f_t : 0)}") (target >= 0.9; $STEPS steps, 4 workers at once; --map includes mapping every unit once) | summed worker PSS: --map $m_p KiB, FP32 $f_p KiB, streaming $s_p KiB; qinsd $dpss KiB (arena-warm-bytes 0)"
