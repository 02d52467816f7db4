/* SPDX-License-Identifier: MIT */
/*
 * bench_codec.c — codec throughput, from one run (`make bench`): decode GB/s of FP32 written
 * (256 MiB of output) for qins8, qins16 and seed-log with each decode kernel this CPU has, next to
 * memcpy of the same output size and a Q8_0 dequantize written the obvious way (ggml's block_q8_0,
 * scalar loop), with ratios to memcpy timed alternately with each (so that a busy machine skews
 * both alike); and encode MB/s of FP32 read per codec
 * (single thread; qins8 at the default effort = fit + encode). Each figure is the best of a few
 * repetitions (the machine may be shared). Bounded: well under two minutes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codec.h"

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
  free(w);
  free(out);
  return 0;
}
