/* SPDX-License-Identifier: MIT */
/*
 * bench_store.c — `make bench`: what checking every read's checksums costs (store.h,
 * qs_tensor_read). The same reads through the store API, in process, with the default checks (every
 * read checks the CRCs of the stored bytes it serves: a chunk verified whole at its first read in
 * the process, then the 4 KiB segments each read touches) and with
 * QINS_VERIFY=risk-wrong-numbers (a chunk checked once per process), timed alternately in one run
 * so both see the same machine:
 *  - a 64 MiB f32 tensor read whole through qs_tensor_span (the zero-copy path qinsd streams f32
 *    from), copied out as a socket write would;
 *  - a 64 MiB FP32 output of a qins8 tensor decoded by qs_tensor_read in 256 KiB pieces, one read
 *    transaction for the whole tensor (as a streamed get);
 *  - 4 KiB (the first 1024 values of a row) of a 4096-wide f32 tensor, one read transaction per
 *    read (as a small get): the check reads the one 4 KiB segment holding it.
 * Best of 5 rounds; each figure is GB/s of output (or microseconds per small read) and the
 * checked/unchecked ratio. The store is a temp directory, removed at the end.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qt.h"
#include "store.h"

#define ROWS 4096
#define COLS 4096 /* 64 MiB of f32 per tensor */

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int put(qs_import *im, const char *name, int codec, const float *x) {
  qs_tensor_desc d = {0};
  qc_params p;
  memset(&p, 0, sizeof p);
  p.codec = (qc_codec)codec;
  if (qc_fit_tensor((qc_codec)codec, COLS, ROWS, x, NULL, &p, NULL)) return -1;
  d.name = name;
  d.src_dtype = QS_DT_F32;
  d.ndim = 2;
  d.shape[0] = ROWS;
  d.shape[1] = COLS;
  d.codec = codec;
  d.params = &p;
  if (qs_import_tensor_begin(im, &d) || qs_import_tensor_rows(im, x, ROWS, NULL) ||
      qs_import_tensor_end(im, NULL))
    return -1;
  return 0;
}

static char *out; /* 64 MiB destination */

/* Whole f32 tensor through spans, one txn. */
static int read_span(qs_store *s) {
  qs_txn *t;
  qs_tensor ten;
  if (qs_txn_begin(s, &t) || qs_tensor_get(t, "m", "w32", &ten)) return -1;
  uint64_t pos = 0;
  while (pos < ten.n_elem) {
    const void *p;
    uint64_t n;
    if (qs_tensor_span(t, &ten, NULL, QC_DT_F32, pos, ten.n_elem, &p, &n) != 1) return -1;
    memcpy(out + pos * 4, p, n * 4);
    pos += n;
  }
  qs_txn_end(t);
  return 0;
}

/* Whole qins8 tensor decoded in 256 KiB pieces, one txn. */
static int read_q8(qs_store *s) {
  qs_txn *t;
  qs_tensor ten;
  if (qs_txn_begin(s, &t) || qs_tensor_get(t, "m", "q8", &ten)) return -1;
  for (uint64_t pos = 0; pos < ten.n_elem; pos += 65536)
    if (qs_tensor_read(t, &ten, NULL, QC_DT_F32, pos, pos + 65536, out + pos * 4)) return -1;
  qs_txn_end(t);
  return 0;
}

/* 256 reads of 4 KiB of w32 (the start of a row), a txn each (rows spread over the tensor's
 * chunks). */
#define SMALL_READS 256
#define SMALL_VALUES 1024 /* 4 KiB of f32 */
static int read_rows(qs_store *s) {
  for (int i = 0; i < SMALL_READS; i++) {
    qs_txn *t;
    qs_tensor ten;
    if (qs_txn_begin(s, &t) || qs_tensor_get(t, "m", "w32", &ten)) return -1;
    qs_slice sl = {.ndim = 1};
    sl.start[0] = (uint64_t)i * 97 % ROWS;
    sl.stop[0] = sl.start[0] + 1;
    if (qs_tensor_read(t, &ten, &sl, QC_DT_F32, 0, SMALL_VALUES, out)) return -1;
    qs_txn_end(t);
  }
  return 0;
}

/* Seconds of the best of `reps` runs of f, with the store opened in the given verify mode. */
static double best(const char *store, const char *mode, int (*f)(qs_store *), int reps) {
  if (mode) setenv("QINS_VERIFY", mode, 1);
  else unsetenv("QINS_VERIFY");
  qs_store *s;
  if (qs_open(&s, store, QS_OPEN_RDONLY)) {
    fprintf(stderr, "bench_store: %s\n", qs_error());
    exit(1);
  }
  double b = 1e9;
  if (f(s)) goto fail; /* warm: pages in, and the unchecked mode's one check */
  for (int i = 0; i < reps; i++) {
    double t0 = now();
    if (f(s)) goto fail;
    double d = now() - t0;
    if (d < b) b = d;
  }
  qs_close(s);
  return b;
fail:
  fprintf(stderr, "bench_store: read failed: %s\n", qs_error());
  exit(1);
}

int main(void) {
  char dir[64], store[128];
  if (qt_tmpdir(dir)) return 1;
  snprintf(store, sizeof store, "%s/store", dir);
  float *x = malloc((size_t)ROWS * COLS * 4);
  out = malloc((size_t)ROWS * COLS * 4);
  qt_fill_gauss(x, (uint64_t)ROWS * COLS, 1, 0.02f);
  qs_store *s;
  qs_import *im;
  if (qs_open(&s, store, QS_OPEN_CREATE) || qs_import_begin(s, "m", NULL, &im) ||
      put(im, "w32", QC_F32, x) || put(im, "q8", QC_QINS8, x) || qs_import_commit(im)) {
    fprintf(stderr, "bench_store: building the store: %s\n", qs_error());
    return 1;
  }
  qs_close(s);
  free(x);
  const double mib64 = (double)ROWS * COLS * 4;
  double c[3] = {1e9, 1e9, 1e9}, u[3] = {1e9, 1e9, 1e9};
  int (*fs[3])(qs_store *) = {read_span, read_q8, read_rows};
  for (int round = 0; round < 5; round++)
    for (int k = 0; k < 3; k++) {
      double a = best(store, NULL, fs[k], 1), b = best(store, "risk-wrong-numbers", fs[k], 1);
      if (a < c[k]) c[k] = a;
      if (b < u[k]) u[k] = b;
    }
  printf("store read, checked on every read vs QINS_VERIFY=risk-wrong-numbers (checked once per "
         "process), best of 5, alternated, same run:\n");
  printf("f32 64 MiB span + copy:    checked %6.2f GB/s  unchecked %6.2f GB/s  ratio %.2f\n",
         mib64 / c[0] / 1e9, mib64 / u[0] / 1e9, u[0] / c[0]);
  printf("qins8 64 MiB FP32 decode:  checked %6.2f GB/s  unchecked %6.2f GB/s  ratio %.2f\n",
         mib64 / c[1] / 1e9, mib64 / u[1] / 1e9, u[1] / c[1]);
  printf("f32 4 KiB read, txn each:  checked %6.1f us    unchecked %6.1f us    ratio %.2f\n",
         c[2] / SMALL_READS * 1e6, u[2] / SMALL_READS * 1e6, u[2] / c[2]);
  free(out);
  qt_rmrf(dir);
  return 0;
}
