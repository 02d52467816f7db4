#!/bin/sh
# SPDX-License-Identifier: MIT
# bench_worker.sh — run by `make bench` (tests/bench/run.sh): the worker's sampling sanity check
# (issue 5, the seed's step A3). stories260K served by qinsd as qins8 (default policy) and qins16;
# for each, 5 seeds x 200 steps at temperature 0.9, top-p 0.9: tokens identical to the FP32 run
# with the same seed, first divergence (with the probability margin there), teacher-forced mean
# KLD and top-1; then the means. Needs $QINS_BUILD and $QINS_SHARED (set by run.sh).
set -eu
BUILD="${QINS_BUILD:-build}"; SHARED="${QINS_SHARED:-../shared}"
MODEL="${MODEL:-$SHARED/models/stories260K.safetensors}"
SEEDS="${SEEDS:-1 2 3 4 5}"; STEPS="${STEPS:-200}"
if [ ! -f "$MODEL" ]; then echo "bench_worker: skipped: no $MODEL"; exit 0; fi
. "$(dirname "$0")/qinsd.sh"
"$BUILD/qinsctl" import --store "$D/store" "$MODEL" --model qins8 >/dev/null
"$BUILD/qinsctl" import --store "$D/store" "$MODEL" --model qins16 --codec qins16 --codec-for '*norm.weight=f32' >/dev/null
qinsd_start
echo "sampling sanity: T=0.9 top-p 0.9, $STEPS steps, seeds: $SEEDS"
for codec in qins8 qins16; do
  sum_kld=0; sum_top1=0; sum_same=0; n=0
  for seed in $SEEDS; do
    out=$("$BUILD/qins-llama2" --socket "$D/s" --model $codec --reference "$MODEL" --steps "$STEPS" \
          --temperature 0.9 --topp 0.9 --seed "$seed" -q)
    par=$(echo "$out" | grep '^parity:')
    tf=$(echo "$out" | grep '^teacher-forced:')
    same=$(echo "$par" | sed 's/^parity: \([0-9]*\)\/.*/\1/')
    kld=$(echo "$tf" | sed 's/.*mean KLD \([^,]*\),.*/\1/')
    top1=$(echo "$tf" | sed 's/.*top-1 agreement \([0-9]*\)\/.*/\1/')
    printf '%-6s seed %s: %s | %s\n' $codec "$seed" "$par" "${tf#teacher-forced: }"
    echo "$out" | grep -A4 '^divergence at step' | sed 's/^/         /' || true
    sum_kld=$(awk -v a="$sum_kld" -v b="$kld" 'BEGIN{printf "%.9g", a+b}')
    sum_top1=$((sum_top1 + top1)); sum_same=$((sum_same + same)); n=$((n+1))
  done
  awk -v c=$codec -v k="$sum_kld" -v t=$sum_top1 -v s=$sum_same -v n=$n -v st="$STEPS" 'BEGIN{
    printf "%-6s mean over %d seeds: tokens identical %.1f/%d, mean KLD %.3e, top-1 %.2f%%\n",
           c, n, s/n, st, k/n, 100*t/(n*st) }'
done
