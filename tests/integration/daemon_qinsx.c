/* SPDX-License-Identifier: MIT */
/*
 * daemon_qinsx.c — the exact codec qinsx (docs/FORMAT.md §1.5) served by qinsd and exported by
 * qinsctl: `get` with dtype bf16 returns the source bf16 bits exactly (NaN payloads, signalling
 * NaNs, zeros of both signs, subnormals, infinities, the largest and smallest exponents), f32 the
 * widened bits, f16 the reference's rounding; whole tensors, row slices, column slices starting
 * mid-group, a multi-chunk tensor large enough to be streamed; f32 sources (the f32 variant).
 * `qinsctl import --codec-for GLOB=qinsx` + `export --dtype bf16` give back the source bytes, and
 * `audit` calls the tensor lossless. Both import paths are used: chunks encoded inline (the
 * fixture's store) and by worker threads (qinsctl import).
 */
#include "daemon_fixture.h"

/* bf16 specials, spread through the weights every 41 elements. */
static const uint16_t specials[] = {
    0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
    0x7FC0, 0xFFC1, 0x7F81, 0xFF81, 0x7FBF, 0x3F80,
};
#define N_SPEC (sizeof specials / sizeof specials[0])

typedef struct qx_tensor {
  const char *name;
  uint64_t shape[2];
  int bf16; /* bf16 values, else f32 */
} qx_tensor;
static const qx_tensor qx_tensors[] = {
    {"w", {300, 257}, 1},    /* rows not a multiple of 64: every row starts mid-group */
    {"f", {40, 33}, 0},      /* f32 values: the f32 variant */
    {"big", {2100, 1024}, 1} /* 3 chunks, 8.6 MB as f32: streamed */
};

/* The source bits of tensor k (f32 bits; bf16 values have a zero low half). */
static uint32_t *qx_values(int k, uint64_t *n_out) {
  const qx_tensor *t = &qx_tensors[k];
  uint64_t n = t->shape[0] * t->shape[1];
  float *w = malloc(n * sizeof *w);
  qt_fill_gauss(w, n, 17 + (uint64_t)k, 0.02f);
  uint32_t *u = malloc(n * 4);
  for (uint64_t i = 0; i < n; i++) {
    memcpy(&u[i], &w[i], 4);
    if (t->bf16) u[i] = (uint32_t)qc_f32_to_bf16(w[i]) << 16;
    if (i % 41 == 5) u[i] = (uint32_t)specials[(i / 41) % N_SPEC] << 16 | (t->bf16 ? 0 : 0x1234u);
  }
  free(w);
  *n_out = n;
  return u;
}

/* Runs in ts_store_fill's child. One import thread: chunks are encoded inline (the importer's
 * other path, with worker threads, is what qinsctl import uses in export_gives_back_the_source). */
static int fill_qx(qs_store *s, void *ud) {
  (void)ud;
  setenv("QINS_IMPORT_THREADS", "1", 1);
  qs_import *im;
  int rc = qs_import_begin(s, "x", NULL, &im);
  for (int k = 0; !rc && k < 3; k++) {
    uint64_t n;
    uint32_t *u = qx_values(k, &n);
    rc = ts_import_f32(im, qx_tensors[k].name, 2, qx_tensors[k].shape, QC_QINSX, (const float *)(const void *)u);
    free(u);
  }
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static void setup_qx(void) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_qx, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "starting qinsd");
}

TestSuite(daemon_qinsx, .init = setup_qx, .fini = teardown, .timeout = 60);

/* The expected bytes of tensor k's elements as dtype dt (full tensor). */
static uint8_t *expect(int k, const char *dt, uint64_t *n) {
  uint32_t *u = qx_values(k, n);
  size_t es = strcmp(dt, "f32") ? 2 : 4;
  uint8_t *e = malloc(*n * es);
  for (uint64_t i = 0; i < *n; i++) {
    float f;
    memcpy(&f, &u[i], 4);
    uint16_t h = !strcmp(dt, "bf16") ? (qx_tensors[k].bf16 ? (uint16_t)(u[i] >> 16) : qc_f32_to_bf16(f))
                                     : qc_f32_to_f16(f);
    if (es == 4) memcpy(e + 4 * i, &u[i], 4);
    else memcpy(e + 2 * i, &h, 2);
  }
  free(u);
  return e;
}

static void get_and_compare(ts_rx *rx, int k, const char *dt, int nr, const uint64_t (*rg)[2]) {
  uint64_t n, sn;
  uint8_t *full = expect(k, dt, &n);
  size_t es = strcmp(dt, "f32") ? 2 : 4;
  uint8_t *want = nr > 0 ? slice_ref(full, 2, qx_tensors[k].shape, es, nr, rg, &sn) : full;
  if (nr <= 0) sn = n;
  got g = do_get(rx, "x", qx_tensors[k].name, nr, rg, dt);
  cr_assert_eq(g.code, 0, "get %s as %s: code %d", qx_tensors[k].name, dt, g.code);
  cr_assert_str_eq(g.dtype, dt);
  cr_assert_eq(g.bytes, sn * es, "%s: %zu bytes", qx_tensors[k].name, g.bytes);
  if (memcmp(g.data, want, g.bytes)) {
    size_t i = 0;
    while (g.data[i] == want[i]) i++;
    cr_assert_fail("get %s as %s (%d ranges): first difference at element %zu", qx_tensors[k].name, dt,
                   nr, i / es);
  }
  free(g.data);
  if (want != full) free(want);
  free(full);
}

Test(daemon_qinsx, get_bf16_gives_the_source_bits) {
  ts_rx rx;
  open_rx(&rx);
  static const char *const dts[] = {"bf16", "f32", "f16"};
  const uint64_t col[2][2] = {{0, 300}, {65, 66}};
  for (int d = 0; d < 3; d++)
    for (int k = 0; k < 2; k++) {
      const uint64_t *sh = qx_tensors[k].shape;
      const uint64_t rows[1][2] = {{3, sh[0] - 3}}, block[2][2] = {{5, 9}, {13, sh[1] - 3}};
      get_and_compare(&rx, k, dts[d], -1, NULL);
      get_and_compare(&rx, k, dts[d], 1, rows);
      get_and_compare(&rx, k, dts[d], 2, block);
      if (k == 0) get_and_compare(&rx, k, dts[d], 2, col);
    }
  ts_rx_destroy(&rx);
}

Test(daemon_qinsx, streamed_multi_chunk_tensor) {
  ts_rx rx;
  open_rx(&rx);
  get_and_compare(&rx, 2, "bf16", -1, NULL);
  get_and_compare(&rx, 2, "f32", -1, NULL);
  const uint64_t mid[1][2] = {{1000, 2100}}; /* across a chunk boundary */
  get_and_compare(&rx, 2, "bf16", 1, mid);
  ts_rx_destroy(&rx);
}

/* qinsctl import --codec-for w*=qinsx, export --dtype bf16: the source bytes; audit: lossless. */
Test(daemon_qinsx, export_gives_back_the_source) {
  char dir[64], src[128], out[128], store[128];
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(src, sizeof src, "%s/in.safetensors", dir);
  snprintf(out, sizeof out, "%s/out.safetensors", dir);
  snprintf(store, sizeof store, "%s/st", dir);
  uint64_t n;
  uint32_t *u = qx_values(0, &n);
  uint16_t *h = malloc(n * 2);
  for (uint64_t i = 0; i < n; i++) h[i] = (uint16_t)(u[i] >> 16);
  qt_tensor t = {"w", QS_ST_BF16, 2, {300, 257}, h, n * 2};
  cr_assert_eq(qt_st_write(src, &t, 1, NULL), 0);
  char *o = NULL, *e = NULL;
  cr_assert_eq(qt_ctl(store, NULL, &e, "import", src, "--model", "e", "--codec-for", "w*=qinsx", NULL), 0, "%s", e);
  free(e);
  cr_assert_eq(qt_ctl(store, &o, &e, "audit", "e", NULL), 0, "%s", e);
  cr_assert(strstr(o, "qinsx") && strstr(o, "lossless"), "%s", o);
  free(o), free(e);
  /* info: lossless, with the stored bits per weight (between the 3-bit code + raw byte and 16) */
  cr_assert_eq(qt_ctl(store, &o, &e, "info", "e/w", NULL), 0, "%s", e);
  const char *bw = strstr(o, "bits/weight:");
  cr_assert(bw && strstr(o, "SNR:            lossless"), "%s", o);
  double bits = strtod(bw + strlen("bits/weight:"), NULL);
  cr_assert(bits > 11.0 && bits < 16.0, "bits/weight %f\n%s", bits, o);
  free(o), free(e);
  cr_assert_eq(qt_ctl(store, NULL, &e, "export", "e", out, "--dtype", "bf16", NULL), 0, "%s", e);
  free(e);
  size_t len;
  char *file = qt_read(out, &len);
  cr_assert(file && len >= n * 2);
  cr_assert_eq(memcmp(file + len - n * 2, h, n * 2), 0, "exported bf16 data differs from the source");
  free(file);
  free(h);
  free(u);
  qt_rmrf(dir);
}
