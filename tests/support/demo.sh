#!/bin/sh
# SPDX-License-Identifier: MIT
# demo.sh — `make demo`: one compressed copy of a model served to four inference workers.
# Usage: demo.sh BUILD_DIR SHARED_DIR [MODEL.safetensors|MODEL.bin]
#
# The model: MODEL if given (it must exist); else SHARED_DIR/models/stories260K.safetensors when
# it is there; else (a bare clone) a synthetic one made here: `qinsctl synth --arch llama2-tiny`
# (llama2.c's architecture with stories260K's shapes, seeded random weights with trained-like
# statistics, its hyper-parameters in the metadata) written as f32 into a scratch store and
# exported as the safetensors file the demo then uses like a real one, FP32 reference included.
# The demo says so, and how to run it on a real model: nothing is downloaded. A llama2.c legacy
# checkpoint (MODEL.bin: stories15M.bin ...) is converted to safetensors first
# (client/examples/llama2c_to_safetensors.py).
#
# Creates a store in a temporary directory, imports the model twice (the default policy: qins8 for
# matrices, f32 for norms; and qins16 for matrices, f32 for norms: near-lossless — qins16 on the
# norm weights too moves the greedy path at the model's step-37 near-tie), starts qinsd, runs 4 qins-llama2 workers at
# once (greedy and sampled, on each import), each comparing itself with the FP32 reference read
# from the safetensors file, then prints the footprint, each worker's parity line and tokens/s, and
# the daemon's counters. The daemon is always stopped and the directory removed (trap).
set -eu
BUILD="$1"; SHARED="$2"; MODEL="${3:-}"
PY=${PYTHON:-/usr/bin/python3}
SYNTH=""
if [ -z "$MODEL" ]; then
  MODEL="$SHARED/models/stories260K.safetensors"
  [ -f "$MODEL" ] || SYNTH=llama2-tiny
elif [ ! -f "$MODEL" ]; then
  echo "demo: no model at $MODEL" >&2
  echo "demo: give a llama2.c model as .bin or safetensors (README.md: where models come from), or run make demo without MODEL for the synthetic one" >&2
  exit 1
fi
for b in qinsd qinsctl qins-llama2; do
  [ -x "$BUILD/$b" ] || { echo "demo: $BUILD/$b is missing: run make" >&2; exit 1; }
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
D=$(mktemp -d /tmp/qins-demo-XXXXXX)   # short: the socket path must stay under 108 bytes
PID=""
. "$ROOT/tests/support/daemon_lib.sh"
cleanup() {
  stop_daemon "$PID"
  rm -rf "$D"
}
trap cleanup EXIT INT TERM

if [ -n "$SYNTH" ]; then
  echo "== no model given and none at $SHARED/models/stories260K.safetensors: using a synthetic one"
  echo "   $SYNTH is made here by qinsctl synth: llama2.c's architecture with stories260K's shapes,"
  echo "   seeded random weights with trained-like statistics. It is not a trained model: its tokens"
  echo "   are ids, not text. On a real model: make demo MODEL=path/to/stories15M.bin (a llama2.c"
  echo "   checkpoint) or MODEL=path/to/model.safetensors (README.md: where real models come from)."
  echo "== synthesizing $SYNTH (qinsctl synth --arch $SYNTH --codec f32) and exporting it as the FP32 reference"
  mkdir -p "$D/gen"
  "$BUILD/qinsctl" synth --store "$D/gen" --arch "$SYNTH" --codec f32 >/dev/null
  MODEL="$D/$SYNTH.safetensors"
  "$BUILD/qinsctl" export --store "$D/gen" "$SYNTH" "$MODEL" >/dev/null
  rm -rf "$D/gen"
fi
case $MODEL in
  *.bin)
    echo "== converting $MODEL (a llama2.c checkpoint) to safetensors"
    NAME=$(basename "$MODEL" .bin)
    "$PY" "$ROOT/client/examples/llama2c_to_safetensors.py" "$MODEL" "$D/$NAME.safetensors" | sed 's/^/   /'
    MODEL="$D/$NAME.safetensors" ;;
esac
NAME=$(basename "$MODEL" .safetensors)

echo "== importing $MODEL"
mkdir -p "$D/store"
"$BUILD/qinsctl" import --store "$D/store" "$MODEL" --model "$NAME" >/dev/null
"$BUILD/qinsctl" import --store "$D/store" "$MODEL" --model "$NAME-qins16" --codec qins16 --codec-for '*norm.weight=f32' >/dev/null

echo "== starting qinsd on $D/s"
"$BUILD/qinsd" --store "$D/store" --socket "$D/s" --log "$D/qinsd.log" &
PID=$!
wait_daemon "$BUILD/qinsctl" "$D/s" "$PID" "$D/qinsd.log" || exit 1

echo "== footprint"
QINS_SOCKET="$D/s" PYTHONPATH="$ROOT/client/python" "$PY" - <<'PYEOF'
import qins
c = qins.Client()
ms = c.models()
fp32 = max(m["src_bytes"] for m in ms)
total = sum(m["stored_bytes"] for m in ms)
for m in ms:
    print("  %-24s %9d bytes stored (%.2f bytes/weight)" % (m["name"], m["stored_bytes"], m["stored_bytes"] / m["n_elem"]))
print("  one copy of each import:   %9d bytes, shared by every worker" % total)
print("  4 workers x FP32 copy:     %9d bytes (4 x %d)" % (4 * fp32, fp32))
print("  ratio:                     %9.2fx less memory for weights" % (4 * fp32 / total))
PYEOF

echo "== 4 workers at once (500 tokens each; FP32 reference read from the file)"
W="$BUILD/qins-llama2 --socket $D/s --reference $MODEL --steps 500 -q"
$W --model "$NAME"          > "$D/w1" 2>&1 & P1=$!
$W --model "$NAME-qins16"   > "$D/w2" 2>&1 & P2=$!
$W --model "$NAME"        --temperature 0.9 --topp 0.9 --seed 1 > "$D/w3" 2>&1 & P3=$!
$W --model "$NAME-qins16" --temperature 0.9 --topp 0.9 --seed 1 > "$D/w4" 2>&1 & P4=$!
fail=0
for p in $P1 $P2 $P3 $P4; do wait $p || fail=1; done
n=1
for what in "qins8  greedy" "qins16 greedy" "qins8  T=0.9 top-p 0.9 seed 1" "qins16 T=0.9 top-p 0.9 seed 1"; do
  echo "-- worker $n ($what)"
  grep -E '^(parity|teacher-forced|speed|weights):' "$D/w$n" | sed 's/^/   /' || cat "$D/w$n"
  n=$((n+1))
done

echo "== 4 workers holding the whole model: private FP32 copies (get) vs the shared arena (--map)"
for mode in copy map; do
  if [ $mode = map ]; then flag=--map; else flag="--budget 1G"; fi
  for n in 1 2 3 4; do
    # No --reference here (it would load FP32 into each worker): heads from $HEADS (stories260K: 8).
    "$BUILD/qins-llama2" --socket "$D/s" --model "$NAME" --n-heads "${HEADS:-8}" --steps 200 -q \
      $flag > "$D/$mode$n" 2>&1 &
    eval "Q$n=\$!"
  done
  for n in 1 2 3 4; do eval "wait \$Q$n" || fail=1; done
  priv=0; pss=0
  for n in 1 2 3 4; do
    l=$(grep '^memory:' "$D/$mode$n") || { cat "$D/$mode$n"; fail=1; continue; }
    priv=$((priv + $(echo "$l" | sed 's/.*held privately \([0-9]*\) bytes.*/\1/')))
    pss=$((pss + $(echo "$l" | sed 's/^memory: pss \([0-9]*\) KiB.*/\1/')))
  done
  echo "   $mode: decoded weights held privately by the 4 workers: $priv bytes; their PSS summed: $pss KiB"
done
"$BUILD/qinsctl" stats --socket "$D/s" | grep -E '^arena_(resident|entries|hits|misses|decode_bytes) ' | sed 's/^/   daemon /' || true

echo "== qinsd counters"
"$BUILD/qinsctl" stats --socket "$D/s" | grep -E '^(connections_total|bytes_served|requests\.(get|get_many)|latency_p50_us|latency_p99_us) ' | sed 's/^/   /' || true
echo "== stopping qinsd"
cleanup
[ $fail -eq 0 ] || { echo "demo: a worker failed" >&2; exit 1; }
if [ -n "$SYNTH" ]; then
  echo "== done (on the synthetic $SYNTH: make demo MODEL=path/to/model.bin|.safetensors runs a real one)"
else
  echo "== done"
fi
