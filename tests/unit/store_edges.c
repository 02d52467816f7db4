/* SPDX-License-Identifier: MIT */
/*
 * store_edges.c — edge shapes through the whole import path, for every codec: empty tensors
 * ([0, 64], [64, 0], [0]), one element, rows shorter than a codec block, one row. Each is
 * imported from a safetensors file with `--codec` forced, then listed, read whole and sliced, and
 * the store verified: empty tensors read as zero elements, others equal their source within the
 * codec's error (exactly for f32). docs/FORMAT.md §2.4 (empty tensors).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qins.h"
#include "qt.h"
#include "store.h"

static char dir[64], sdir[128], src[128];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(sdir, sizeof sdir, "%s/store", dir);
  snprintf(src, sizeof src, "%s/edges.safetensors", dir);
}
static void teardown(void) { qt_rmrf(dir); }
TestSuite(store_edges, .init = setup, .fini = teardown, .timeout = 120);

typedef struct edge {
  const char *name;
  int ndim;
  uint64_t shape[2];
} edge;

static const edge edges[] = {
    {"empty_rows", 2, {0, 64}}, {"empty_cols", 2, {64, 0}}, {"empty_1d", 1, {0, 0}},
    {"one", 1, {1, 0}},         {"one_2d", 2, {1, 1}},      {"short_rows", 2, {5, 3}},
    {"one_row", 2, {1, 70}},    {"tall", 2, {300, 2}},
};
#define N_EDGES (sizeof edges / sizeof edges[0])

static uint64_t n_of(const edge *e) {
  uint64_t n = 1;
  for (int i = 0; i < e->ndim; i++) n *= e->shape[i];
  return n;
}

static int n_checked(void *ud, const qs_tensor *t) {
  (void)t;
  ++*(int *)ud;
  return 0;
}

static void problem(void *ud, const char *msg) {
  (void)ud;
  cr_log_error("verify: %s", msg);
}

static void check_codec(int codec) {
  float *vals[N_EDGES];
  qt_tensor ts[N_EDGES];
  for (size_t i = 0; i < N_EDGES; i++) {
    uint64_t n = n_of(&edges[i]);
    vals[i] = malloc(n * sizeof(float) + 4);
    qt_fill_gauss(vals[i], n, 7 + i, 0.5f);
    memset(&ts[i], 0, sizeof ts[i]);
    ts[i].name = edges[i].name;
    ts[i].dtype = QS_ST_F32;
    ts[i].ndim = edges[i].ndim;
    memcpy(ts[i].shape, edges[i].shape, sizeof edges[i].shape);
    ts[i].data = vals[i];
    ts[i].nbytes = n * sizeof(float);
  }
  cr_assert_eq(qt_st_write(src, ts, N_EDGES, NULL), 0);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  qs_import_opts o;
  qs_import_opts_init(&o);
  o.model = "m";
  o.codec = codec;
  cr_assert_eq(qs_import_path(s, src, &o, NULL), 0, "codec %s: %s",
               qc_codec_name((qc_codec)codec), qs_error());
  qs_txn *t;
  cr_assert_eq(qs_txn_begin(s, &t), 0, "%s", qs_error());
  int listed = 0;
  cr_assert_eq(qs_tensors_each(t, "m", NULL, n_checked, &listed), 0, "codec %s: listing: %s",
               qc_codec_name((qc_codec)codec), qs_error());
  cr_assert_eq(listed, (int)N_EDGES);
  /* Error bounds per codec: absolute + relative to the value (f32 exact). */
  static const float tabs[QC_CODEC_COUNT] = {0, 0, 0, 0.2f, 0.01f, 0, 0.2f};
  static const float trel[QC_CODEC_COUNT] = {0, 1e-3f, 8e-3f, 0.05f, 1e-3f, 0.03f, 0.05f};
  float ta = tabs[codec], tr = trel[codec];
  for (size_t i = 0; i < N_EDGES; i++) {
    const edge *e = &edges[i];
    uint64_t n = n_of(e);
    qs_tensor ten;
    cr_assert_eq(qs_tensor_get(t, "m", e->name, &ten), 0, "codec %s: %s: %s",
                 qc_codec_name((qc_codec)codec), e->name, qs_error());
    cr_assert_eq(ten.n_elem, n);
    cr_assert_eq(ten.ndim, e->ndim);
    for (int d = 0; d < e->ndim; d++) cr_assert_eq(ten.shape[d], e->shape[d]);
    float *out = malloc(n * sizeof(float) + 4);
    cr_assert_eq(qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, n, out), 0, "codec %s: %s: %s",
                 qc_codec_name((qc_codec)codec), e->name, qs_error());
    for (uint64_t k = 0; k < n; k++)
      cr_assert(fabsf(out[k] - vals[i][k]) <= ta + tr * fabsf(vals[i][k]), "codec %s: %s[%llu] = %g, stored %g",
                qc_codec_name((qc_codec)codec), e->name, (unsigned long long)k, out[k],
                vals[i][k]);
    /* A slice of the first dimension: empty ranges and, where there are rows, the last row. */
    qs_slice sl = {.ndim = 1};
    sl.start[0] = e->shape[0] ? e->shape[0] - 1 : 0;
    sl.stop[0] = e->shape[0];
    uint64_t shp[8], sn;
    cr_assert_eq(qs_slice_shape(&ten, &sl, shp, &sn), 0, "%s", qs_error());
    cr_assert_eq(qs_tensor_read(t, &ten, &sl, QC_DT_F32, 0, sn, out), 0, "%s: %s", e->name,
                 qs_error());
    for (uint64_t k = 0; k < sn; k++) cr_assert(fabsf(out[k] - vals[i][n - sn + k]) <= ta + tr * fabsf(vals[i][n - sn + k]));
    free(out);
    free(vals[i]);
  }
  qs_txn_end(t);
  uint64_t probs = 1, checked = 0;
  cr_assert_eq(qs_verify(s, NULL, problem, NULL, &probs, &checked), 0, "%s", qs_error());
  cr_assert_eq(probs, 0, "codec %s: verify found %llu problems", qc_codec_name((qc_codec)codec),
               (unsigned long long)probs);
  cr_assert_eq(checked, N_EDGES);
  qs_close(s);
}

Test(store_edges, f32) { check_codec(QC_F32); }
Test(store_edges, f16) { check_codec(QC_F16); }
Test(store_edges, bf16) { check_codec(QC_BF16); }
Test(store_edges, qins8) { check_codec(QC_QINS8); }
Test(store_edges, qins16) { check_codec(QC_QINS16); }
Test(store_edges, seed_log) { check_codec(QC_SEED_LOG); }
Test(store_edges, seed_rational) { check_codec(QC_SEED_RATIONAL); }
Test(store_edges, qinsx) { check_codec(QC_QINSX); } /* exact: the zero bounds above */
