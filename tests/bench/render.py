#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""render.py — regenerates docs/BENCHMARKS.md from the benchmarks' own output.

    render.py [--bench BUILD/bench/bench.log] [--scale BUILD/bench/scale.log] [--doc PATH]

`make bench` (tests/bench/run.sh) passes --bench, `make bench-scale` (tests/bench/bench_scale.sh)
passes --scale, `make bench-compare` (tests/bench/bench_core_compare.sh) passes --bench with its
own log (BUILD/bench/compare.log), which holds only its section. The figures are the logs' lines verbatim, each benchmark's block stamped with its
run's date, CPU, core count and load; the headline table is extracted from those lines by
pattern. The prose (what each benchmark measures, how to run it, how to read it) is fixed text
here. A benchmark whose log was not given keeps the figures block already in the document
(between its <!-- figures:KEY --> markers), so `make bench` does not erase the scale figures
and vice versa. Nothing in the document's figures is typed by hand.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (key, log section name, title, how to run, what it measures, how to read it)
BENCHES = [
    ("codec", "bench_codec", "Codec throughput — `tests/bench/bench_codec.c`",
     "`make bench` runs it; alone: `build/bench/bench_codec` (under two minutes).",
     "Decode GB/s of FP32 written (256 MiB of output, 4096-wide rows) for qins8, qins16 and "
     "seed-log with every decode kernel this CPU has (scalar reference, AVX2, AVX-512), each next "
     "to `memcpy` of the same output size timed alternately with it, plus a Q8_0 dequantize "
     "written the obvious way (ggml's block_q8_0, scalar) as an outside reference. Encode MB/s of "
     "FP32 read per codec on one thread (qins8 at the default effort = fit + encode; the last "
     "qins8 line is QINS.md's exhaustive reference encoder). Then the exact codec qinsx on the "
     "same weights rounded to bf16: encode MB/s, bits/weight (cut into the store's chunks with a "
     "table each, with one table per tensor, as one chunk), decode of the 256 MiB-of-FP32 tensor "
     "to f32 and to bf16 with every kernel, each against memcpy of the same output bytes (after a "
     "check that every kernel gives the input back bit for bit), and bits/weight on stories260K "
     "rounded to bf16 (read from the shared models at run time). Best of 5 repetitions.",
     "The ratio column is the figure to trust: memcpy runs beside each kernel, so a busy machine "
     "slows both alike. A decode kernel above 1.0x memcpy writes FP32 faster than copying it "
     "(it reads a quarter of the bytes). Encode figures are CPU time of one thread (the `wall` "
     "figure includes time other processes held the core); the importer encodes on one worker "
     "thread per CPU. qinsx reads about 1.4 bytes per weight (an f32 copy reads 4), so its "
     "AVX-512 decode to f32 can outrun memcpy; to bf16 it writes 2 bytes per weight, as the "
     "memcpy beside it does, and does more work per byte. Its bits/weight are exact sizes, not "
     "estimates: qinsx loses nothing (bf16 would take 16)."),
    ("import", "bench_import", "Import throughput — `tests/bench/bench_import.c`",
     "`make bench`; alone: `QINS_BUILD=build build/bench/bench_import`.",
     "`qinsctl import` of synthetic safetensors files (512 MiB: 8 matrices of 4096x4096 f32 plus "
     "norms, and 128 MiB), with the default policy (qins8) and with `--codec f32` (store overhead "
     "alone), each import its own process: seconds, MB/s of source and peak RSS (wait4), next to "
     "a raw pread of the same file (page cache warm) and the qins8 codec alone on one thread.",
     "The importer is bounded by encoding, not I/O (ratio to raw read far below 1). Peak RSS is "
     "about the same for 128 and 512 MiB: memory does not grow with the model (batches of rows, "
     "bounded staging transactions)."),
    ("serve", "bench_serve", "Serving vs a bare socket, latency vs Redis — `tests/bench/bench_serve.c`",
     "`make bench`; alone: `QINS_BUILD=build build/bench/bench_serve` (`BENCH_SCALE=N` for N "
     "times the requests, `BENCH_QINSD_ARGS` for qinsd flags).",
     "(1) A 64 MiB FP32 `get` of a tensor stored f32 (sent from the store's map, no copy) and of "
     "one stored qins8 (decoded in cache-sized pieces), each against the same bytes through a bare "
     "Unix socketpair (a forked writer sending from a warm 64 MiB buffer: the target's reference; "
     "and from a cache-resident 256 KiB buffer: the socket's ceiling on the machine), best of 8, "
     "alternated: throughput and ratios (target >= 0.8), with qinsd's time in the store's reads "
     "per get (summed over its threads, so it can exceed the get's wall time). "
     "(2) 4 KiB-slice `get` latency p50/p99 (rows spread over the 64 MiB tensor) with 1 and 16 "
     "concurrent clients next to Redis `GET` of a 4 KiB value (Debian's redis-server on a "
     "temporary Unix socket): each client holds a connection to both, the two servers take turns "
     "phase by phase (ABBA, 100 rounds after a warm-up), and each line gives both servers' and the "
     "clients' CPU per request, the servers' sleeps per request and qinsd's in-daemon latency.",
     "Ratios are same-run and alternated, so they hold on a noisy machine; absolute numbers do "
     "not. qins8 can beat the 64 MiB-buffer reference because its socket copy reads a piece "
     "still in cache while the reference reads 64 MiB from memory; against the cache-resident "
     "ceiling it is below 1. With 16 clients on 2 cores both servers are saturated (about zero "
     "sleeps per request) and preempted by client threads about every other request, so the "
     "order in which requests are taken shapes the tail: qinsd takes them in arrival order "
     "(docs/qinsd.md, Serving order). Measured over several runs when that order replaced "
     "libuv's level-triggered batch reads (commit ec196b8 is the batch-order one): p99 "
     "1.02-1.15x Redis's with batch order, 0.73-0.95x with arrival order; p50 0.89-0.95x and "
     "0.89-1.00x (the median stays, the tail shrinks). p99 moves by about 10% from run to run."),
    ("store", "bench_store", "Checking every read — `tests/bench/bench_store.c`",
     "`make bench`; alone: `build/bench/bench_store` (a few seconds).",
     "The same reads through the store API in one process, with the default checks (every read "
     "checks the CRCs of the stored bytes it serves: a chunk verified whole at its first read in "
     "the process, then the 4 KiB segments each read touches) and with "
     "`QINS_VERIFY=risk-wrong-numbers` (a chunk checked once per process), alternated, best of "
     "5: a 64 MiB f32 tensor through `qs_tensor_span` copied out (qinsd's zero-copy path), a "
     "64 MiB FP32 decode of a qins8 tensor in 256 KiB pieces (a streamed get), and 256 reads of "
     "4 KiB (the start of a row) of the 64 MiB f32 tensor, a read transaction each (a small get).",
     "The ratio is unchecked/checked time (1.0 = free). The f32 span line is the worst case: "
     "there is no decode to hide the CRC behind, only a memcpy; through qinsd the socket copy "
     "dominates instead. Small reads pay for one or two 4 KiB segments, not the 4 MiB chunk."),
    ("arena", "bench_arena", "Shared arena vs socket delivery — `tests/bench/bench_arena.c`",
     "`make bench`; alone: `QINS_BUILD=build build/bench/bench_arena` (imports 1.25 GiB of f32 as "
     "qins8 first; needs about 5 GiB of free memory for part 3).",
     "(1) First delivery of a 64 MiB and a 256 MiB (decoded f32) qins8 tensor through `map` "
     "(request, decode into the arena, the client reading one byte of every page of its "
     "mapping) next to `get` of the same tensor into a fresh buffer read the same way (target "
     ">= 2.5x), on three kinds of arena pages: pages the warm reserve created in the "
     "background after attach (a fresh daemon with the default `arena-warm-bytes`, its reserve "
     "waited for untimed: the `arena_first_delivery_*_qins8` lines, what a worker meets), "
     "pages that do not exist yet (`arena-warm-bytes 0`: the `_new_pages` lines) and pages an "
     "evicted entry left (`arena-warm-bytes 0`, a 288 MiB arena that mapped and released "
     "another 256 MiB tensor first: the `_evicted_pages` lines). `arena_warm_reserve` says how "
     "long the reserve took after attach and what it added to qinsd's PSS. (2) A repeat `map` "
     "of the cached entry next to a repeat `get` (target >= 50x), best of 5. (3) The summed "
     "PSS of qinsd (without a reserve) and 4 worker processes each mapping the same 1 GiB of "
     "decoded weights and reading every page, next to 4 workers holding `get` copies and to "
     "one decoded copy plus the store pages read (target <= 1.1x).",
     "A repeat map costs a round trip and the worker's read faults on pages it has not touched "
     "yet, whatever the tensor's size; a repeat get moves every byte again. Creating a 4 KiB "
     "shmem page costs about 2.3 us (docs/qinsd.md \"The arena\"), so a decode into pages that "
     "do not exist runs at page-creation speed and the `_new_pages` ratios sit near or below "
     "1; into pages that exist (the reserve's, or an evicted entry's) it runs at decode speed. "
     "The `_evicted_pages` lines are the fastest because the same client had read those pages "
     "before (its mapping's page tables already hold them), where a worker's first map pays a "
     "read fault per 16 pages. "
     "A daemon pays page creation once per page, in the background after the first attach with "
     "the reserve, so the first map of a worker finds pages ready; the reserve's price is the "
     "memory it holds before any entry needs it (at most `arena-warm-bytes`, shown as qinsd's "
     "PSS). PSS splits each shared page between its mappers, so the mapped sum shows one copy "
     "while RSS would show it in every worker."),
    ("arena_worker", "bench_arena_worker.sh", "Mapped workers vs local FP32 — `tests/bench/bench_arena_worker.sh`",
     "`make bench`; alone: `QINS_BUILD=build QINS_SHARED=../shared sh tests/bench/bench_arena_worker.sh` "
     "(`STEPS`, `HEADS`, `MODEL` override).",
     "4 `qins-llama2 --map` workers at once on stories260K (qins8), every weight read in place from "
     "qinsd's arena, next to 4 of the same worker on FP32 weights read from the file into each "
     "worker: tokens/s per worker (better of 2 alternated rounds; target >= 0.9x) and summed PSS. "
     "Then the same on a synthetic model of stories110M's shapes (`qinsctl synth --arch "
     "llama2-110m`: a token reads ~440 MB of weights), with socket streaming (the default qinsd "
     "provider) as a third column.",
     "The mapped workers' time includes mapping every unit once (a round trip each and one decode "
     "per host); after that no request is made per token. PSS: the mapped workers share one "
     "decoded copy with the daemon, the FP32 workers each hold theirs."),
    ("worker", "bench_worker.sh", "Worker sampling sanity — `tests/bench/bench_worker.sh`",
     "`make bench`; alone: `QINS_BUILD=build QINS_SHARED=../shared sh tests/bench/bench_worker.sh` "
     "(`SEEDS`, `STEPS`, `MODEL` override).",
     "stories260K served by qinsd as qins8 (default policy) and qins16, sampled by "
     "`qins-llama2` for 5 seeds x 200 steps at temperature 0.9, top-p 0.9: tokens identical to "
     "the FP32 run with the same seed, the first divergence, teacher-forced mean KL divergence "
     "and top-1 agreement against FP32 logits; then the means.",
     "Sampling is chaotic: one flipped token changes the rest of the text, so identical-token "
     "counts vary a lot between seeds; the teacher-forced KLD and top-1 (each step scored on "
     "the same FP32 prefix) are the stable measure of what the codec changes."),
    ("pull", "bench_pull.sh", "Fleet pull over HTTP — `tests/bench/bench_pull.sh`",
     "`make bench`; alone: `QINS_BUILD=build sh tests/bench/bench_pull.sh` (`GIB`, `REPS`, "
     "`CONNS` override; needs nginx-light, installed by `make deps`).",
     "A synthetic 1 GiB FP32 model (16 matrices 4096x4096 and norms) imported as qins8 and "
     "exported as a `.qins` file, served with the FP32 safetensors by a local nginx-light on "
     "127.0.0.1. Alternated, best of 2: `curl -o /dev/null` of the `.qins` file (the reference), "
     "`curl | openssl dgst -sha256` of it (a fetch that verifies, on one core), `qinsctl pull` "
     "of it into a fresh store with 4 connections (fetch: each piece hashed as it arrives on its connection's "
     "thread, checked, written in place in the staging file; then the whole pull with its import "
     "and publish), and the time until the model is in a second store via the FP32 route (`curl` "
     "of the safetensors, then `qinsctl import`) next to the pull.",
     "Loopback moves bytes at memory speed, so the fetch ratio measures pull's own per-byte work "
     "against curl writing to /dev/null, and on this 2-core machine (shared with nginx and with "
     "whatever else runs) it is bound by CPU time: `curl -o /dev/null` spends about 0.1 s of CPU "
     "on the 272 MiB file, while SHA-256 alone costs about 0.2 s of CPU for it (about 1.3 GB/s a "
     "core with SHA-NI, OpenSSL's EVP path), before the receive and the write into the staging "
     "file. Pull runs each connection on its own thread, so that work spreads over the cores it "
     "gets, and it beats the one-core fetch that verifies (`curl | openssl dgst -sha256`); but "
     "issue 16's target (>= 0.8x of `curl -o /dev/null`, verification counted) is out of reach "
     "on 2 cores over loopback: with both cores hashing and doing nothing else, SHA-256 alone "
     "takes longer than the 1.25x of curl's time that 0.8x of its rate allows. Over a real network link (10 Gb/s = 1.25 GB/s) the "
     "link is the bound: two cores hash about 2.6 GB/s. The total adds the import: LMDB copies each chunk record into its "
     "pages and writes them (the staging file is read in place, not hashed again). The "
     "time-to-serve ratio is the point of the format: the FP32 route moves 3.7x the bytes and "
     "encodes every weight again."),
    ("scale", None, "Scale: Phi-3.5-mini, 4 workers — `tests/bench/bench_scale.sh`",
     "`make bench-scale` (about 5-20 minutes here; needs ~4.2 GB free in `$SCALE_DIR`, default "
     "`$TMPDIR` or /tmp). `ARCH=phi-mini-4l` or `ARCH=tiny` for a quick run; `WORKERS`, "
     "`SLICE_MIB` (32) override.",
     "`qinsctl synth --arch phi-3.5-mini` (195 tensors, 3.82 B weights, Phi-3.5-mini's names "
     "and shapes, trained-like heavy-tailed values; docs/qinsctl.md §synth) writes the model "
     "straight into a fresh store: import time and MB/s of FP32 generated, fitted, encoded and "
     "written, peak RSS, its CPU time (user+sys: on a shared machine the wall time also counts "
     "the time other processes held the cores), stored bytes vs FP32, bytes/weight. Then qinsd serves it to 4 worker "
     "processes (`build/bench/scale_worker serve`) that each stream every tensor once, "
     "concurrently, with libqins `qins_get_into` into one reused buffer (row slices of 32 MiB): "
     "aggregate GB/s of FP32 delivered next to 4 bare Unix socketpairs moving the same message "
     "size in the same run, each worker's peak RSS, the daemon's RSS, and the peak over the run "
     "of the summed PSS (`/proc/PID/smaps_rollup`, sampled every 250 ms) of daemon and workers, "
     "next to what 4 private FP32 copies would take. Ends with issue 6's acceptance checks.",
     "PSS accounting, honestly: qinsd maps the LMDB file read-only; every page of it that qinsd "
     "touches while decoding becomes resident in its mapping and counts in its PSS (as file-"
     "backed pages: nobody else maps the file, so each counts in full). After every tensor has "
     "been served once, the daemon's PSS therefore includes about the whole store — the one "
     "compressed copy the host keeps — plus its heap (decode buffers, the buffer cache, up to "
     "`buffer-cache-bytes`). Each worker's PSS is its reused slice buffer plus libqins; a real "
     "inference worker would also hold the FP32 weights it keeps resident, which is exactly what "
     "qins lets it not keep (it can fetch a layer, use it and drop it). The page cache holding "
     "data.mdb is not charged to any process beyond the pages mapped. The serve figure "
     "includes decoding every weight on the daemon's threads and two kernel copies per byte; "
     "the bare-socket reference has only the copies, on the same 2 cores."),
    ("compare", "bench_core_compare.sh",
     "Serving core before/after its redesign — `tests/bench/bench_core_compare.sh`",
     "`make bench-compare` (not part of `make bench`: it builds a second tree; 3 rounds, about "
     "3-6 minutes on 2 cores); `ROUNDS=N`, `REV=commit` (default c8b3cf1, the last commit "
     "before the redesign) override. Needs redis-server (installed by `make deps`).",
     "The serving core as it was at REV against this tree's, same run: the qinsd of REV is built "
     "in a temporary git worktree under /tmp (removed afterwards) and this tree's bench_serve "
     "(§3; the protocol is the same) runs against each daemon in turn, the order reversed every "
     "round: `before` (REV's qinsd, whose store checks each chunk once per process), `after` "
     "(this tree's qinsd with that same checking policy, `QINS_VERIFY=risk-wrong-numbers`: the "
     "serving core alone compared) and `checked` (this tree's qinsd as shipped, every read "
     "checked). Each bench_serve run has its own bare-socket and Redis references; the summary "
     "lists, per round, the 64 MiB get's ratio to the bare socket (f32 and qins8) and the 4 KiB "
     "latency ratios p50/p99 to Redis with 1 and 16 clients.",
     "Compare ratios, not absolute figures: each daemon's lines carry their own same-run "
     "references, taken minutes apart on a shared machine. `before` vs `after` is the redesign's "
     "cost or gain; `after` vs `checked` is the cost of checking every read (§4 and §3's "
     "verify_cost lines measure it alone). One round is noisy; read the rounds together."),
]

MACHINE_NOTE = ("The machine: 2 cores shared with other engineers' builds and tests while these "
                "ran (the load average is in each stamp), so absolute figures are noisy; the "
                "same-run ratios are what to compare.")


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def parse_bench_log(text):
    """Returns (stamp, {section: lines}) from run.sh's output."""
    stamp, sections, cur = None, {}, None
    for line in text.splitlines():
        if line.startswith("# qins bench") and stamp is None:
            stamp = line[2:].strip()
        elif line.startswith("== "):
            cur = line[3:].strip()
            sections[cur] = []
        elif cur is not None:
            sections[cur].append(line)
    return stamp, sections


def block(stamp, lines):
    body = "\n".join(l.rstrip() for l in lines).strip("\n")
    return "Run: %s.\n\n```\n%s\n```" % (stamp or "(no stamp)", body)


def old_blocks(doc_text):
    out = {}
    for m in re.finditer(r"<!-- figures:(\w+) -->\n(.*?)\n<!-- /figures:\1 -->", doc_text, re.S):
        out[m.group(1)] = m.group(2)
    return out


def headline(blocks):
    """Rows (what, figure, reference) extracted from the figure blocks by pattern."""
    rows = []
    b = blocks.get("codec", "")
    k = re.search(r"kernel in use: (\w+)", b)
    if k:
        m = re.search(r"decode\s+qins8\s+%s\s+([\d.]+) GB/s\s+([\d.]+)x memcpy \(memcpy ([\d.]+) GB/s" % k.group(1), b)
        if m:
            rows.append(("qins8 decode (%s kernel), one thread" % k.group(1), "%s GB/s of FP32" % m.group(1),
                         "%sx memcpy (%s GB/s alongside)" % (m.group(2), m.group(3))))
    for dt in ("f32", "bf16"):
        m = re.search(r"decode\s+qinsx>%s\s+avx512\s+([\d.]+) GB/s\s+([\d.]+)x memcpy \(memcpy ([\d.]+) GB/s" % dt, b)
        if m:
            rows.append(("qinsx (exact) decode to %s, AVX-512 kernel, one thread" % dt, "%s GB/s of %s" % (m.group(1), dt),
                         "%sx memcpy (%s GB/s alongside)" % (m.group(2), m.group(3))))
    m = re.search(r"qinsx stories260K bf16: ([\d.]+) bits/weight", b)
    if m:
        rows.append(("qinsx size, stories260K rounded to bf16", "%s bits/weight, bit-exact" % m.group(1), "bf16: 16 bits/weight"))
    m = re.search(r"encode\s+qins8\s+([\d.]+) MB/s per core \(fit", b)
    if m:
        rows.append(("qins8 encode (fit + encode), one thread", "%s MB/s of FP32" % m.group(1), "one thread's CPU time"))
    b = blocks.get("import", "")
    m = re.search(r"import qins8 \(default policy\), 512 MiB:\s+([\d.]+) s\s+([\d.]+) MB/s of source\s+peak RSS\s+([\d.]+) MiB.*?alone ([\d.]+) MB/s", b)
    if m:
        rows.append(("`qinsctl import`, 512 MiB safetensors, qins8", "%s MB/s, peak RSS %s MiB" % (m.group(2), m.group(3)),
                     "codec alone on one thread: %s MB/s" % m.group(4)))
    b = blocks.get("serve", "")
    stored = {"f32": "stored f32", "qins8_as_f32": "stored qins8, decoded"}
    for m in re.finditer(r"serve_get_64MiB_(\S+): qinsd ([\d.]+) GB/s \| bare unix socket ([\d.]+) GB/s \| ratio ([\d.]+)", b):
        rows.append(("64 MiB FP32 `get` through qinsd (%s)" % stored.get(m.group(1), m.group(1)),
                     "%s GB/s" % m.group(2), "bare Unix socket %s GB/s: %sx" % (m.group(3), m.group(4))))
    for m in re.finditer(r"slice_4KiB_latency_(\d+)_clients?: qinsd p50 ([\d.]+) us p99 ([\d.]+) us \| redis GET 4KiB p50 ([\d.]+) us p99 ([\d.]+) us \| ratio p50 ([\d.]+) p99 ([\d.]+)", b):
        rows.append(("4 KiB slice latency, %s client%s" % (m.group(1), "" if m.group(1) == "1" else "s"),
                     "p50 %s us, p99 %s us" % (m.group(2), m.group(3)),
                     "Redis GET p50 %s us, p99 %s us: %sx, %sx" % (m.group(4), m.group(5), m.group(6), m.group(7))))
    b = blocks.get("worker", "")
    for codec in ("qins8", "qins16"):
        m = re.search(r"%s\s+mean over (\d+) seeds: tokens identical ([\d.]+)/(\d+), mean KLD ([\d.e+-]+), top-1 ([\d.]+)%%" % codec, b)
        if m:
            rows.append(("stories260K sampled through qinsd, %s" % codec,
                         "teacher-forced KLD %s, top-1 %s%%" % (m.group(4), m.group(5)),
                         "vs FP32 logits; %s/%s sampled tokens identical to the FP32 run (mean of %s seeds)"
                         % (m.group(2), m.group(3), m.group(1))))
    b = blocks.get("scale", "")
    m = re.search(r"import: qinsctl synth --arch (\S+): .*? ([\d.]+) GB FP32 .*? in ([\d.]+) s = ([\d.]+) MB/s; peak RSS (\d+) MB", b)
    if m:
        rows.append(("synth + import of %s (%s GB FP32)" % (m.group(1).rstrip(":"), m.group(2)),
                     "%s s, %s MB/s" % (m.group(3), m.group(4)), "peak RSS %s MB" % m.group(5)))
    m = re.search(r"import CPU: ([\d.]+) s user\+sys = ([\d.]+) MB/s per CPU-second", b)
    if m:
        rows.append(("synth + import CPU time", "%s s user+sys" % m.group(1), "%s MB/s per CPU-second" % m.group(2)))
    m = re.search(r"stored: ([\d.]+) GB = ([\d.]+)% of FP32 \(([\d.]+)x smaller\), ([\d.]+) bytes/weight", b)
    if m:
        rows.append(("stored size, default policy", "%s GB, %s bytes/weight" % (m.group(1), m.group(4)),
                     "%s%% of FP32" % m.group(2)))
    m = re.search(r"serve: (\d+) workers .*? in ([\d.]+) s: ([\d.]+) GB/s aggregate FP32 = ([\d.]+)x the bare socket; (\d+) errors", b)
    r = re.search(r"reference: .*?: ([\d.]+) GB/s aggregate", b)
    if m:
        rows.append(("%s workers streaming the whole model through qinsd" % m.group(1),
                     "%s GB/s aggregate, %s errors" % (m.group(3), m.group(5)),
                     "%sx bare sockets (%s GB/s)" % (m.group(4), r.group(1) if r else "?")))
    m = re.search(r"PSS at peak .*?: ([\d.]+) GB = .*?; (\d+) private FP32 copies: ([\d.]+) GB \(([\d.]+)x\)", b)
    if m:
        rows.append(("total PSS, daemon + %s workers, at the peak" % m.group(2), "%s GB" % m.group(1),
                     "%s private FP32 copies: %s GB (%sx more)" % (m.group(2), m.group(3), m.group(4))))
    return rows


def main(argv):
    doc = os.path.join(ROOT, "docs", "BENCHMARKS.md")
    bench_log = scale_log = None
    i = 1
    while i < len(argv):
        if argv[i] in ("--bench", "--scale", "--doc") and i + 1 < len(argv):
            if argv[i] == "--bench": bench_log = argv[i + 1]
            elif argv[i] == "--scale": scale_log = argv[i + 1]
            else: doc = argv[i + 1]
            i += 2
        else:
            sys.stderr.write(__doc__)
            return 2
    blocks = old_blocks(read(doc)) if os.path.exists(doc) else {}
    if bench_log:
        stamp, sections = parse_bench_log(read(bench_log))
        for key, sec, *_ in BENCHES:
            if sec and sec in sections:
                blocks[key] = block(stamp, sections[sec])
    if scale_log:
        lines = read(scale_log).splitlines()
        stamp = lines[0][2:].strip() if lines and lines[0].startswith("# ") else None
        blocks["scale"] = block(stamp, lines[1:] if stamp else lines)

    out = []
    out.append("# qins benchmarks\n")
    out.append("<!-- Generated by tests/bench/render.py from the benchmarks' own output (make bench: "
               "build/bench/bench.log; make bench-scale: build/bench/scale.log; make bench-compare: "
               "build/bench/compare.log). Do not edit by hand: "
               "the prose lives in tests/bench/render.py, the figures come from the runs. -->\n")
    out.append("Every benchmark the repository has, how to run it, what it printed on this machine "
               "and what that means. `make bench` runs every one but the scale and before/after "
               "sections (a few minutes) and rewrites their figures here; `make bench-scale` and "
               "`make bench-compare` run those two and rewrite theirs. Every "
               "figure sits next to a reference measured in the same run (memcpy, a bare Unix "
               "socket, Redis, the FP32 model, raw reads).\n")
    out.append(MACHINE_NOTE + "\n")
    rows = headline(blocks)
    if rows:
        out.append("## Headline figures\n")
        out.append("| what | figure | same-run reference |")
        out.append("| --- | --- | --- |")
        for r in rows:
            out.append("| %s | %s | %s |" % r)
        out.append("")
    for n, (key, _sec, title, how, what, meaning) in enumerate(BENCHES, 1):
        out.append("## %d. %s\n" % (n, title))
        out.append("**Run:** " + how + "\n")
        out.append("**Measures:** " + what + "\n")
        out.append("**Figures:**\n")
        out.append("<!-- figures:%s -->" % key)
        out.append(blocks.get(key, "_Not run yet on this checkout._"))
        out.append("<!-- /figures:%s -->\n" % key)
        out.append("**Reading them:** " + meaning + "\n")
    text = "\n".join(out).rstrip("\n") + "\n"
    tmp = doc + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, doc)
    print("render.py: wrote %s" % os.path.relpath(doc, os.getcwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
