#!/bin/sh
# SPDX-License-Identifier: MIT
# bench_pull.sh — run by `make bench` (tests/bench/run.sh): issue 16's figures. A synthetic model of
# 1 GiB FP32 (16 matrices 4096x4096 + norms, safetensors) is imported (qins8) and exported as a
# .qins file; Debian's nginx-light serves both files on 127.0.0.1 (a free port, its own config in a
# temp dir, stopped on exit). Then, alternated, best of REPS: `curl -o /dev/null` of the .qins file
# (the reference), `curl | openssl dgst -sha256` of it (a fetch that verifies, one core, SHA-NI),
# `qinsctl pull` of it into a fresh store (fetch rate, SHA-256 of every piece included, and the
# whole pull with its import), and the time until the model serves on a second store via pull vs
# via fetching the FP32 safetensors with curl and importing them there.
# Needs $QINS_BUILD (set by run.sh). GIB=N for another FP32 size, REPS (2), CONNS (4).
set -eu
BUILD="${QINS_BUILD:-build}"
GIB="${GIB:-1}"; REPS="${REPS:-2}"; CONNS="${CONNS:-4}"
command -v nginx >/dev/null || { echo "bench_pull: skipped: no nginx (make deps installs nginx-light)"; exit 0; }
D=$(mktemp -d /tmp/qins-bp-XXXXXX)
NPID=""
cleanup() {
  if [ -n "$NPID" ] && kill -0 "$NPID" 2>/dev/null; then kill -TERM "$NPID"; wait "$NPID" 2>/dev/null || true; fi
  rm -rf "$D"
}
trap cleanup EXIT INT TERM
chmod 755 "$D"; mkdir -p "$D/www" "$D/t"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }   # calc FORMAT EXPR
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

/usr/bin/python3 - "$D/www/m.safetensors" "$GIB" <<'EOF'
import json, struct, sys
import numpy as np
path, gib = sys.argv[1], float(sys.argv[2])
n = max(1, int(round(16 * gib)))
rng = np.random.default_rng(16)
hdr, off = {"__metadata__": {"bench": "pull"}}, 0
for i in range(n):
    hdr["l%02d.w" % i] = {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [off, off + 4096 * 4096 * 4]}
    off += 4096 * 4096 * 4
    hdr["l%02d.norm" % i] = {"dtype": "F32", "shape": [4096], "data_offsets": [off, off + 4096 * 4]}
    off += 4096 * 4
h = json.dumps(hdr, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for i in range(n):
        f.write((rng.standard_normal((4096, 4096), dtype=np.float32) * 0.02).tobytes())
        f.write(np.ones(4096, dtype=np.float32).tobytes())
EOF
FP32=$(stat -c %s "$D/www/m.safetensors")
"$BUILD/qinsctl" --store "$D/src" import "$D/www/m.safetensors" --model m >/dev/null
"$BUILD/qinsctl" --store "$D/src" export m "$D/www/m.qins" --format qins >/dev/null
QB=$(stat -c %s "$D/www/m.qins")
chmod 644 "$D/www/"*

PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"
cat >"$D/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
pid $D/nginx.pid;
error_log $D/error.log;
events { worker_connections 64; }
http {
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path $D/t; proxy_temp_path $D/t; fastcgi_temp_path $D/t; uwsgi_temp_path $D/t; scgi_temp_path $D/t;
  server { listen 127.0.0.1:$PORT; root $D/www; }
}
EOF
nginx -p "$D" -c "$D/nginx.conf" -g 'daemon off;' & NPID=$!
i=0; until curl -s -o /dev/null "http://127.0.0.1:$PORT/m.qins" -r 0-0; do
  i=$((i+1)); [ $i -lt 200 ] || { cat "$D/error.log"; exit 1; }; sleep 0.05; done
URL="http://127.0.0.1:$PORT/m.qins"
cat "$D/www/m.qins" "$D/www/m.safetensors" >/dev/null   # page cache warm for every run

best_curl=""; best_sum=""; best_fetch=""; best_pull=""; best_fp32=""
for r in $(seq "$REPS"); do
  t0=$(now); curl -s -o /dev/null "$URL"; t1=$(now); c=$(secs "$t0" "$t1")
  t0=$(now); curl -s "$URL" | openssl dgst -sha256 >/dev/null; t1=$(now); cs=$(secs "$t0" "$t1")
  rm -rf "$D/p"; t0=$(now)
  js=$("$BUILD/qinsctl" --store "$D/p" --json pull "$URL" --connections "$CONNS"); t1=$(now)
  p=$(secs "$t0" "$t1")
  f=$(echo "$js" | sed 's/.*"fetch_seconds":\([0-9.]*\).*/\1/')
  rm -rf "$D/f"; t0=$(now)
  curl -s -o "$D/f.safetensors" "http://127.0.0.1:$PORT/m.safetensors"
  "$BUILD/qinsctl" --store "$D/f" import "$D/f.safetensors" --model m >/dev/null; t1=$(now)
  rm -f "$D/f.safetensors"; i32=$(secs "$t0" "$t1")
  echo "run $r: curl $c s, curl|openssl-sha256 $cs s, pull fetch $f s, pull total $p s, FP32 fetch+import $i32 s"
  if [ -z "$best_curl" ] || lt "$c" "$best_curl"; then best_curl=$c; fi
  if [ -z "$best_sum" ] || lt "$cs" "$best_sum"; then best_sum=$cs; fi
  if [ -z "$best_fetch" ] || lt "$f" "$best_fetch"; then best_fetch=$f; fi
  if [ -z "$best_pull" ] || lt "$p" "$best_pull"; then best_pull=$p; fi
  if [ -z "$best_fp32" ] || lt "$i32" "$best_fp32"; then best_fp32=$i32; fi
done
"$BUILD/qinsctl" --store "$D/p" export m "$D/re.qins" --format qins >/dev/null
cmp -s "$D/re.qins" "$D/www/m.qins" || { echo "bench_pull: the pulled model's export differs"; exit 1; }
mb() { calc %.0f "$1 / 1000000 / $2"; }
echo "model: $(calc %.2f "$FP32 / 1073741824") GiB FP32, .qins $(calc %.1f "$QB / 1048576") MiB (qins8), nginx on 127.0.0.1, best of $REPS, $CONNS connections"
echo "curl -o /dev/null of the .qins:   $best_curl s  $(mb "$QB" "$best_curl") MB/s  (reference)"
echo "curl | openssl dgst -sha256:      $best_sum s  $(mb "$QB" "$best_sum") MB/s  $(calc %.2f "$best_curl / $best_sum")x curl"
echo "pull, fetch + verify pieces:      $best_fetch s  $(mb "$QB" "$best_fetch") MB/s  $(calc %.2f "$best_curl / $best_fetch")x curl, $(calc %.2f "$best_sum / $best_fetch")x curl|openssl-sha256"
echo "pull, total (+ import, publish):  $best_pull s  $(mb "$QB" "$best_pull") MB/s  $(calc %.2f "$best_curl / $best_pull")x curl"
echo "time to serve on a second store: pull $best_pull s vs FP32 safetensors fetch + import $best_fp32 s ($(calc %.1f "$best_fp32 / $best_pull")x faster)"
