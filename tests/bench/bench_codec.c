/* SPDX-License-Identifier: MIT */
/*
 * bench_codec.c — codec throughput, from one run (`make bench`): decode GB/s of FP32 written
 * (256 MiB of output) for qins8, qins16 and seed-log with each decode kernel this CPU has, next to
 * memcpy of the same output size and a Q8_0 dequantize written the obvious way (ggml's block_q8_0,
 * scalar loop), with ratios to memcpy timed alternately with each (so that a busy machine skews
 * both alike); and encode MB/s of FP32 read per codec
 * (single thread; qins8 at the default effort = fit + encode). Each figure is the best of a few
 * repetitions (the machine may be shared). Bounded: well under two minutes.
 *
 * The exact codec qinsx (issue 19) on the same weights rounded to bf16, cut into chunks as the
 * store cuts them (a table per chunk): encode MB/s, bits/weight (and what one table per tensor
 * would take), decode to f32 and to bf16 with every kernel against memcpy of the same output
 * bytes; and bits/weight on stories260K rounded to bf16 (read at run time from
 * $QINS_SHARED/models/stories260K.safetensors; skipped with a message when absent).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codec.h"
#include "safetensors.h"
#include "store.h"

#define ROW 4096
#define ROWS 16384 /* 64 Mi weights: 256 MiB of FP32 */
#define REPS 5

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
/* This thread's CPU time: encode is single-threaded, and on a shared machine CPU time is the
 * per-core figure (wall time also counts the time other processes held the core). */
static double cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ggml's Q8_0 block and its dequantize, the obvious way. */
typedef struct {
  uint16_t d;    /* fp16 scale */
  int8_t qs[32]; /* quants */
} block_q8_0;

static void dequantize_row_q8_0(const block_q8_0 *x, float *y, uint64_t k) {
  for (uint64_t i = 0; i < k / 32; i++) {
    const float d = qc_f16_to_f32(x[i].d);
    for (int j = 0; j < 32; j++) y[i * 32 + j] = x[i].qs[j] * d;
  }
}

static uint64_t s_ = 88172645463325252ull;
static double unif(void) {
  s_ ^= s_ << 13, s_ ^= s_ >> 7, s_ ^= s_ << 17;
  return ((s_ >> 11) + 0.5) * 0x1p-53;
}

/* ---- qinsx ------------------------------------------------------------------------------ */

/* A tensor encoded in chunks of rpc rows (0: as the store cuts them, QS_CHUNK_TARGET over the
 * largest encoded row), packed back to back in buf; off[c] locates chunk c. */
typedef struct qx_tensor {
  uint8_t *buf;
  uint64_t bytes, nchunks, rpc, L, R;
  uint64_t *off;
} qx_tensor;

static int qx_encode(const float *w, uint64_t L, uint64_t R, uint64_t rpc, qx_tensor *t) {
  qc_params p = {.codec = QC_QINSX};
  if (!rpc) rpc = QS_CHUNK_TARGET / qc_chunk_bytes(QC_QINSX, L, 1, NULL);
  if (!rpc) rpc = 1;
  t->L = L, t->R = R, t->rpc = rpc, t->nchunks = (R + rpc - 1) / rpc, t->bytes = 0;
  t->off = malloc((t->nchunks + 1) * sizeof *t->off);
  t->buf = malloc(qc_chunk_bytes(QC_QINSX, L, R, NULL) / 2 + 64 * t->nchunks); /* bf16 input */
  uint8_t *scratch = malloc(qc_chunk_bytes(QC_QINSX, L, rpc, NULL));
  if (!t->off || !t->buf || !scratch) return -1;
  for (uint64_t c = 0; c < t->nchunks; c++) {
    uint64_t r0 = c * rpc, nr = R - r0 < rpc ? R - r0 : rpc, sz;
    if (qc_encode(&p, L, nr, w + r0 * L, scratch, NULL, NULL) ||
        qc_chunk_size(&p, L, nr, scratch, qc_chunk_bytes(QC_QINSX, L, nr, NULL), &sz))
      return -1;
    t->off[c] = t->bytes;
    memcpy(t->buf + t->bytes, scratch, sz);
    t->bytes += sz;
  }
  t->off[t->nchunks] = t->bytes;
  free(scratch);
  return 0;
}

static void qx_free(qx_tensor *t) {
  free(t->buf);
  free(t->off);
}

static int qx_decode(const char *kernel, const qx_tensor *t, qc_dtype dt, uint8_t *out) {
  qc_params p = {.codec = QC_QINSX};
  size_t es = qc_dtype_size(dt);
  for (uint64_t c = 0; c < t->nchunks; c++) {
    uint64_t r0 = c * t->rpc, nr = t->R - r0 < t->rpc ? t->R - r0 : t->rpc;
    if (qc_decode_with(kernel, &p, t->L, nr, t->buf + t->off[c], 0, nr * t->L, dt, out + r0 * t->L * es))
      return -1;
  }
  return 0;
}

/* Bytes the same chunks would take with one exponent table for the whole tensor (7 most common
 * exponents of the tensor instead of the chunk's; the layout is otherwise the same). */
static uint64_t qx_bytes_one_table(const float *w, const qx_tensor *t) {
  uint64_t hist[256] = {0}, n = t->L * t->R;
  for (uint64_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, w + i, 4);
    hist[(u >> 23) & 0xFF]++;
  }
  uint64_t covered = 0;
  for (int k = 0; k < 7; k++) {
    int b = 0;
    for (int e = 1; e < 256; e++)
      if (hist[e] > hist[b]) b = e;
    covered += hist[b], hist[b] = 0;
  }
  uint64_t fixed = 0;
  for (uint64_t c = 0; c < t->nchunks; c++) {
    uint64_t nr = t->R - c * t->rpc < t->rpc ? t->R - c * t->rpc : t->rpc, m = nr * t->L;
    fixed += QC_QX_HDR + 8 * ((m + QC_QX_SUPER - 1) / QC_QX_SUPER) + 24 * ((m + 63) / 64) + m;
  }
  return fixed + (n - covered);
}

static void round_bf16(float *w, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) w[i] = qc_bf16_to_f32(qc_f32_to_bf16(w[i]));
}

/* bits/weight of stories260K rounded to bf16, every tensor encoded as the store would. */
static void qx_stories(void) {
  const char *sh = getenv("QINS_SHARED");
  char path[1024], err[512];
  snprintf(path, sizeof path, "%s/models/stories260K.safetensors", sh && *sh ? sh : QINS_SHARED_DIR);
  qs_st_file *f;
  if (qs_st_open(path, &f, err, sizeof err)) {
    printf("size    qinsx stories260K: skipped, %s\n", err);
    return;
  }
  uint64_t bytes = 0, n = 0, mbytes = 0, mn = 0, nt = 0, nm = 0;
  for (size_t i = 0; i < qs_st_count(f); i++) {
    const qs_st_tensor *st = qs_st_tensor_at(f, i);
    if (st->dtype != QS_ST_F32 || !st->n_elem) continue;
    uint8_t *raw = malloc(st->nbytes);
    float *w = malloc(st->n_elem * sizeof *w);
    if (!raw || !w || qs_st_read(f, st, 0, st->nbytes, raw, err, sizeof err)) {
      printf("size    qinsx stories260K: skipped, cannot read %s\n", st->name);
      free(raw), free(w);
      qs_st_close(f);
      return;
    }
    qc_to_f32(QC_DT_F32, raw, st->n_elem, w);
    round_bf16(w, st->n_elem);
    uint64_t L = st->ndim ? st->shape[st->ndim - 1] : 1;
    qx_tensor t;
    if (qx_encode(w, L, st->n_elem / L, 0, &t)) {
      printf("size    qinsx stories260K: encode failed on %s\n", st->name);
      qs_st_close(f);
      return;
    }
    bytes += t.bytes, n += st->n_elem, nt++;
    if (st->ndim >= 2) mbytes += t.bytes, mn += st->n_elem, nm++;
    qx_free(&t);
    free(raw), free(w);
  }
  qs_st_close(f);
  printf("size    qinsx stories260K bf16: %.3f bits/weight over %llu tensors (%llu weights); "
         "%.3f over its %llu matrices (target <= 11.5)\n",
         bytes * 8.0 / n, (unsigned long long)nt, (unsigned long long)n, mbytes * 8.0 / mn,
         (unsigned long long)nm);
}

/* w (n = ROW * ROWS weights) is rounded to bf16 in place. Decode is timed on the tensor as one
 * chunk (one call, as the other codecs' figures: outputs this large use non-temporal stores, as
 * memcpy does); sizes are given for the store's chunks too. */
static int bench_qinsx(float *w, float *out, uint64_t n) {
  const uint64_t out_bytes = n * 4;
  round_bf16(w, n);
  qx_tensor t, ts;
  double c0 = cpu(), t0 = now();
  if (qx_encode(w, ROW, ROWS, ROWS, &t)) return fprintf(stderr, "qinsx encode failed\n"), 1;
  double c1 = cpu(), t1 = now();
  printf("encode  %-14s %7.1f MB/s per core (wall %.1f MB/s; FP32 of bf16 values read)  lossless\n",
         "qinsx", out_bytes / (c1 - c0) / 1e6, out_bytes / (t1 - t0) / 1e6);
  if (qx_encode(w, ROW, ROWS, 0, &ts)) return fprintf(stderr, "qinsx encode failed\n"), 1;
  printf("size    qinsx bench bf16 data: %.3f bits/weight in the store's %llu chunks (a table "
         "each); %.3f with one table per tensor; %.3f as one chunk\n", ts.bytes * 8.0 / n,
         (unsigned long long)ts.nchunks, qx_bytes_one_table(w, &ts) * 8.0 / n, t.bytes * 8.0 / n);
  qx_free(&ts);
  /* Every kernel gives the encoder's input back (checked once, outside the timing). */
  static const char *const kernels[] = {"ref", "avx2", "avx512"};
  for (int k = 0; k < 3; k++)
    if (qc_kernel_available(kernels[k]) &&
        (qx_decode(kernels[k], &t, QC_DT_F32, (uint8_t *)out) || memcmp(out, w, out_bytes)))
      return fprintf(stderr, "qinsx %s decode is not exact\n", kernels[k]), 1;
  for (int d = 0; d < 2; d++) {
    qc_dtype dt = d ? QC_DT_BF16 : QC_DT_F32;
    uint64_t ob = n * qc_dtype_size(dt);
    for (int k = 0; k < 3; k++) {
      char name[32];
      snprintf(name, sizeof name, "qinsx>%s", qc_dtype_name(dt));
      if (!qc_kernel_available(kernels[k])) {
        printf("decode  %-14s %-7s   (not on this CPU)\n", name, kernels[k]);
        continue;
      }
      double best = 1e9, bm = 1e9;
      for (int r = 0; r < REPS; r++) {
        double s = now();
        memcpy((uint8_t *)out + (d ? ob : 0), w, ob); /* same output bytes (bf16: a half) */
        s = now() - s;
        if (s < bm) bm = s;
        s = now();
        qx_decode(kernels[k], &t, dt, (uint8_t *)out);
        s = now() - s;
        if (s < best) best = s;
      }
      printf("decode  %-14s %-7s %7.2f GB/s  %.2fx memcpy (memcpy %.2f GB/s alongside)\n", name,
             kernels[k], ob / best / 1e9, bm / best, ob / bm / 1e9);
    }
  }
  qx_free(&t);
  qx_stories();
  return 0;
}

int main(void) {
  const uint64_t n = (uint64_t)ROW * ROWS, out_bytes = n * 4;
  float *w = malloc(out_bytes), *out = malloc(out_bytes);
  if (!w || !out) return fprintf(stderr, "out of memory\n"), 1;
  for (uint64_t i = 0; i < n; i += 2) { /* Gaussian weights, sd 0.02 */
    double r = sqrt(-2 * log(unif())), t = 6.283185307179586 * unif();
    w[i] = (float)(0.02 * r * cos(t)), w[i + 1] = (float)(0.02 * r * sin(t));
  }
  memset(out, 0, out_bytes);
  printf("kernel in use: %s; %llu weights (%.0f MiB of FP32 output); best of %d\n", qc_kernel_name(),
         (unsigned long long)n, out_bytes / 1048576.0, REPS);

  /* memcpy of the same output size */
  double best = 1e9;
  for (int r = 0; r < REPS; r++) {
    double t = now();
    memcpy(out, w, out_bytes);
    t = now() - t;
    if (t < best) best = t;
  }
  double mc = out_bytes / best / 1e9;
  printf("decode  %-14s %-7s %7.2f GB/s  1.00x memcpy\n", "memcpy", "-", mc);

  /* Q8_0 dequantize */
  block_q8_0 *q8 = malloc(n / 32 * sizeof *q8);
  for (uint64_t b = 0; b < n / 32; b++) {
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(w[b * 32 + j]));
    float d = amax / 127, id = d ? 1 / d : 0;
    q8[b].d = qc_f32_to_f16(d);
    for (int j = 0; j < 32; j++) q8[b].qs[j] = (int8_t)roundf(w[b * 32 + j] * id);
  }
  best = 1e9;
  double bm = 1e9;
  for (int r = 0; r < REPS; r++) {
    double t = now();
    memcpy(out, w, out_bytes);
    t = now() - t;
    if (t < bm) bm = t;
    t = now();
    dequantize_row_q8_0(q8, out, n);
    t = now() - t;
    if (t < best) best = t;
  }
  printf("decode  %-14s %-7s %7.2f GB/s  %.2fx memcpy (memcpy %.2f GB/s alongside)\n",
         "q8_0 (obvious)", "scalar", out_bytes / best / 1e9, bm / best, out_bytes / bm / 1e9);
  free(q8);

  /* encode (and the chunks the decode figures use) */
  static const qc_codec codecs[] = {QC_QINS8, QC_QINS16, QC_SEED_LOG, QC_SEED_RATIONAL,
                                    QC_F16,   QC_BF16,   QC_F32};
  void *chunks[QC_CODEC_COUNT] = {0};
  qc_params params[QC_CODEC_COUNT];
  for (size_t c = 0; c < sizeof codecs / sizeof *codecs; c++) {
    qc_codec k = codecs[c];
    uint64_t cb = qc_chunk_bytes(k, ROW, ROWS, NULL);
    chunks[k] = malloc(cb);
    memset(chunks[k], 0, cb);
    qc_params *p = &params[k];
    double t0 = now(), c0 = cpu();
    if (qc_fit_tensor(k, ROW, ROWS, w, NULL, p, NULL)) return fprintf(stderr, "fit failed\n"), 1;
    double c1 = cpu();
    qc_stats st = {0};
    if (qc_encode(p, ROW, ROWS, w, chunks[k], &st, NULL)) return fprintf(stderr, "encode failed\n"), 1;
    double t2 = now(), c2 = cpu();
    char fit[64] = "";
    if (qc_codec_is_lossy(k))
      snprintf(fit, sizeof fit, "fit %.0f + encode %.0f MB/s; ", out_bytes / (c1 - c0) / 1e6,
               out_bytes / (c2 - c1) / 1e6);
    printf("encode  %-14s %7.1f MB/s per core (%swall %.1f MB/s)  SNR %.2f dB\n", qc_codec_name(k),
           out_bytes / (c2 - c0) / 1e6, fit, out_bytes / (t2 - t0) / 1e6, qc_stats_snr_db(&st));
  }
  { /* the reference encoder (effort max), on 1 Mi weights: it is ~100x slower */
    uint64_t m = 1 << 20;
    qc_fit_opts o = {.effort = QC_EFFORT_MAX, .table_min_elems = 1};
    qc_params p;
    void *ch = malloc(qc_chunk_bytes(QC_QINS8, ROW, m / ROW, NULL));
    double t0 = cpu();
    qc_fit_tensor(QC_QINS8, ROW, m / ROW, w, &o, &p, NULL);
    qc_stats st = {0};
    qc_encode(&p, ROW, m / ROW, w, ch, &st, NULL);
    double t = cpu() - t0;
    printf("encode  %-14s %7.1f MB/s per core (effort max = QINS.md reference encoder, 4 MiB)  SNR %.2f dB\n",
           "qins8", m * 4 / t / 1e6, qc_stats_snr_db(&st));
    free(ch);
  }

  static const char *const kernels[] = {"ref", "avx2", "avx512"};
  static const qc_codec dec[] = {QC_QINS8, QC_QINS16, QC_SEED_LOG};
  for (size_t c = 0; c < 3; c++)
    for (int k = 0; k < 3; k++) {
      if (!qc_kernel_available(kernels[k])) {
        printf("decode  %-14s %-7s   (not on this CPU)\n", qc_codec_name(dec[c]), kernels[k]);
        continue;
      }
      best = 1e9;
      bm = 1e9; /* memcpy timed alternately with this decode: a fair ratio on a busy box */
      for (int r = 0; r < REPS; r++) {
        double t = now();
        memcpy(out, w, out_bytes);
        t = now() - t;
        if (t < bm) bm = t;
        t = now();
        qc_decode_with(kernels[k], &params[dec[c]], ROW, ROWS, chunks[dec[c]], 0, n, QC_DT_F32, out);
        t = now() - t;
        if (t < best) best = t;
      }
      printf("decode  %-14s %-7s %7.2f GB/s  %.2fx memcpy (memcpy %.2f GB/s alongside)\n",
             qc_codec_name(dec[c]), kernels[k], out_bytes / best / 1e9, bm / best,
             out_bytes / bm / 1e9);
    }
  for (int k = 0; k < QC_CODEC_COUNT; k++) free(chunks[k]);
  int rc = bench_qinsx(w, out, n);
  free(w);
  free(out);
  return rc;
}
