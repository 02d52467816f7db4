#!/bin/sh
# SPDX-License-Identifier: MIT
# run.sh — `make fuzz`: runs each libFuzzer target for DURATION seconds and prints, per target,
# executions, coverage (cov = edges, ft = features, from libFuzzer's final stats), corpus size,
# crashes and leaks. FUZZ_JOBS targets run at a time (default 1). New inputs go to
# BUILD/corpus/<target> (the seeds in tests/fuzz/corpus/<target> are read, never written); a crash
# or leak is saved under BUILD/artifacts/<target>/ — copy it to tests/fuzz/crashers/<target>/ once
# fixed, and `make test` replays it from then on. Exit status 1 if any target crashed or leaked.
#
# Usage: run.sh BUILD DURATION TARGET...
set -u
build=$1
dur=$2
shift 2
jobs=${FUZZ_JOBS:-1}
logs=$build/logs
mkdir -p "$logs"

run_one() {
  t=$1
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t"
  touch "$logs/$t.start"
  # -timeout: an input running 20 s is a hang; -rss_limit_mb: a leak or unbounded allocation.
  "$build/fuzzer/$t" -max_total_time="$dur" -print_final_stats=1 -timeout=20 -rss_limit_mb=3072 \
    -artifact_prefix="$build/artifacts/$t/" "$build/corpus/$t" "tests/fuzz/corpus/$t" \
    >"$logs/$t.log" 2>&1
  echo $? >"$logs/$t.rc"
}

summary() {
  t=$1
  log=$logs/$t.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1)
  cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  ft=$(echo "$last" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
  corp=$(echo "$last" | sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p')
  crashes=$(find "$build/artifacts/$t" -type f -newer "$logs/$t.start" \
    \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
  leaks=$(find "$build/artifacts/$t" -type f -newer "$logs/$t.start" -name 'leak-*' | wc -l)
  rc=$(cat "$logs/$t.rc" 2>/dev/null || echo '?')
  printf 'fuzz %-12s %s s: %s execs (%s/s), cov %s, ft %s, corpus %s, crashes %s, leaks %s (exit %s)\n' \
    "$t" "$dur" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes" "$leaks" "$rc"
  [ "$crashes" -eq 0 ] && [ "$leaks" -eq 0 ] && [ "$rc" = 0 ]
}

set -- "$@"
pending="$*"
while [ -n "$pending" ]; do
  batch=""
  i=0
  for t in $pending; do
    [ $i -ge "$jobs" ] && break
    batch="$batch $t"
    i=$((i + 1))
  done
  rest=""
  i=0
  for t in $pending; do
    i=$((i + 1))
    [ $i -gt "$jobs" ] && rest="$rest $t"
  done
  for t in $batch; do
    echo "fuzz $t: running ${dur} s (log $logs/$t.log)"
    run_one "$t" &
  done
  wait
  pending=$(echo $rest)
done

status=0
for t in "$@"; do summary "$t" || status=1; done
[ $status -eq 0 ] || echo "fuzz: FAILED: see the logs and $build/artifacts/" >&2
exit $status
