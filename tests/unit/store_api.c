/* SPDX-License-Identifier: MIT */
/*
 * store_api.c — the store's C API in process (store.h): staged import, slices against the full
 * decode across chunk boundaries, raw tensors, replace/remove reclaiming shared codec parameters,
 * checksum failures, the writer lock, and input checks.
 *
 * Each Criterion test runs in its own process and opens the env at most once, never forking after
 * (the lock test forks its helper before the parent opens anything).
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <lmdb.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qins.h"
#include "qt.h"
#include "store.h"
#include "store_int.h"

static char dir[64], sdir[128];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(sdir, sizeof sdir, "%s/store", dir);
}
static void teardown(void) { qt_rmrf(dir); }
TestSuite(store_api, .init = setup, .fini = teardown, .timeout = 120);

/* Imports one f32 tensor with codec c (fitted in memory). */
static void put_tensor(qs_import *im, const char *name, int ndim, const uint64_t *shape, int codec,
                       const float *x) {
  qs_tensor_desc d = {0};
  d.name = name;
  d.src_dtype = QS_DT_F32;
  d.ndim = ndim;
  uint64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= (d.shape[i] = shape[i]);
  d.codec = codec;
  uint64_t rl = ndim ? shape[ndim - 1] : 1, nr = rl ? n / rl : 0;
  qc_params p;
  memset(&p, 0, sizeof p);
  p.codec = (qc_codec)codec;
  if (nr) cr_assert_eq(qc_fit_tensor((qc_codec)codec, rl, nr, x, NULL, &p, NULL), 0);
  d.params = &p;
  cr_assert_eq(qs_import_tensor_begin(im, &d), 0, "%s", qs_error());
  uint64_t cr = qs_import_chunk_rows(im);
  /* Feed in uneven batches to exercise the store's buffering. */
  uint64_t r = 0, step = cr > 3 ? cr / 3 + 1 : 1;
  while (r < nr) {
    uint64_t k = nr - r < step ? nr - r : step;
    cr_assert_eq(qs_import_tensor_rows(im, x + r * rl, k, NULL), 0, "%s", qs_error());
    r += k;
  }
  cr_assert_eq(qs_import_tensor_end(im, NULL), 0, "%s", qs_error());
}

static float *gauss(uint64_t n, uint64_t seed) {
  float *x = malloc(n * sizeof *x + 4);
  qt_fill_gauss(x, n, seed, 0.1f);
  return x;
}

Test(store_api, slices_equal_the_same_part_of_a_full_decode_across_chunks) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  uint64_t sa[2] = {2500, 1024}, sb[2] = {3000, 2048}, sc[3] = {7, 9, 40};
  float *a = gauss(sa[0] * sa[1], 1), *b = gauss(sb[0] * sb[1], 2), *c = gauss(7 * 9 * 40, 3);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", "{\"k\":\"v\"}", &im), 0, "%s", qs_error());
  put_tensor(im, "a", 2, sa, QC_F32, a);
  put_tensor(im, "b", 2, sb, QC_QINS8, b);
  put_tensor(im, "c", 3, sc, QC_QINS8, c);
  cr_assert_eq(qs_import_commit(im), 0, "%s", qs_error());
  qs_txn *t;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  qs_model m;
  cr_assert_eq(qs_model_get(t, "m", &m), 0);
  cr_assert_eq(m.n_tensors, 3);
  cr_assert_str_eq(m.metadata, "{\"k\":\"v\"}");
  const char *names[3] = {"a", "b", "c"};
  for (int k = 0; k < 3; k++) {
    qs_tensor ten;
    cr_assert_eq(qs_tensor_get(t, "m", names[k], &ten), 0, "%s", qs_error());
    if (k == 0) {
      cr_assert_gt(ten.n_chunks, 2, "a must span chunks");
      cr_assert(isinf(ten.snr_db));
    }
    if (k == 1) {
      cr_assert_gt(ten.n_chunks, 1, "b must span chunks");
      cr_assert_gt(ten.snr_db, 40);
    }
    float *full = malloc(ten.n_elem * 4);
    cr_assert_eq(qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, ten.n_elem, full), 0, "%s", qs_error());
    if (k == 0) cr_assert_eq(memcmp(full, a, ten.n_elem * 4), 0, "f32 codec must be exact");
    /* Several hyperslabs, and partial output ranges of each. */
    qs_slice sl[4];
    memset(sl, 0, sizeof sl);
    sl[0].ndim = 1; sl[0].start[0] = 3; sl[0].stop[0] = ten.shape[0] - 2;             /* rows */
    sl[1].ndim = 2; sl[1].start[0] = 0; sl[1].stop[0] = ten.shape[0];                 /* columns */
    sl[1].start[1] = ten.shape[1] / 4; sl[1].stop[1] = ten.shape[1] - ten.shape[1] / 5;
    sl[2].ndim = ten.ndim; for (int d = 0; d < ten.ndim; d++) { sl[2].start[d] = 1; sl[2].stop[d] = ten.shape[d] - 1; }
    sl[3].ndim = 1; sl[3].start[0] = 4; sl[3].stop[0] = 4;                           /* empty */
    for (int q = 0; q < 4; q++) {
      uint64_t shp[QS_MAX_NDIM], n;
      cr_assert_eq(qs_slice_shape(&ten, &sl[q], shp, &n), 0);
      float *got = malloc(n * 4 + 4), *want = malloc(n * 4 + 4);
      /* Expected: walk the slice over the full decode. */
      uint64_t idx[QS_MAX_NDIM] = {0}, stride[QS_MAX_NDIM];
      stride[ten.ndim - 1] = 1;
      for (int d = ten.ndim - 2; d >= 0; d--) stride[d] = stride[d + 1] * ten.shape[d + 1];
      for (uint64_t e = 0; e < n; e++) {
        uint64_t off = 0;
        for (int d = 0; d < ten.ndim; d++) off += ((d < sl[q].ndim ? sl[q].start[d] : 0) + idx[d]) * stride[d];
        want[e] = full[off];
        for (int d = ten.ndim - 1; d >= 0; d--) {
          if (++idx[d] < shp[d]) break;
          idx[d] = 0;
        }
      }
      cr_assert_eq(qs_tensor_read(t, &ten, &sl[q], QC_DT_F32, 0, n, got), 0, "%s", qs_error());
      cr_assert_eq(memcmp(got, want, n * 4), 0, "tensor %s slice %d", names[k], q);
      if (n > 10) {
        uint64_t b0 = n / 3, b1 = n - n / 5;
        cr_assert_eq(qs_tensor_read(t, &ten, &sl[q], QC_DT_F32, b0, b1, got), 0);
        cr_assert_eq(memcmp(got, want + b0, (b1 - b0) * 4), 0, "tensor %s slice %d partial", names[k], q);
        /* f16 output is the f32 result rounded. */
        uint16_t *h = malloc(n * 2);
        cr_assert_eq(qs_tensor_read(t, &ten, &sl[q], QC_DT_F16, 0, n, h), 0);
        for (uint64_t e = 0; e < n; e += 97) cr_assert_eq(h[e], qc_f32_to_f16(want[e]));
        free(h);
      }
      free(got);
      free(want);
    }
    free(full);
  }
  qs_txn_end(t);
  qs_close(s);
  free(a);
  free(b);
  free(c);
}

Test(store_api, rejects_bad_slices_and_ranges) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  uint64_t sh[2] = {4, 6};
  float *x = gauss(24, 4);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, QC_F32, x);
  cr_assert_eq(qs_import_commit(im), 0);
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
  float out[24];
  qs_slice sl = {0};
  sl.ndim = 1; sl.start[0] = 3; sl.stop[0] = 2;
  cr_assert_eq(qs_tensor_read(t, &ten, &sl, QC_DT_F32, 0, 0, out), QINS_EBAD_SLICE);
  cr_assert(strstr(qs_error(), "reversed"), "%s", qs_error());
  sl.start[0] = 0; sl.stop[0] = 5;
  cr_assert_eq(qs_tensor_read(t, &ten, &sl, QC_DT_F32, 0, 0, out), QINS_EBAD_SLICE);
  cr_assert(strstr(qs_error(), "out of range"), "%s", qs_error());
  sl.ndim = 3;
  cr_assert_eq(qs_tensor_read(t, &ten, &sl, QC_DT_F32, 0, 0, out), QINS_EBAD_SLICE);
  cr_assert_eq(qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, 25, out), QINS_EBAD_SLICE);
  cr_assert_eq(qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, 24, out), 0);
  cr_assert_eq(memcmp(out, x, sizeof out), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "nope", &ten), QINS_ENO_TENSOR);
  cr_assert_eq(qs_tensor_get(t, "nope", "w", &ten), QINS_ENO_MODEL);
  qs_txn_end(t);
  qs_close(s);
  free(x);
}

Test(store_api, raw_tensors_round_trip_as_stored) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  int64_t v[3][5];
  for (int i = 0; i < 15; i++) v[i / 5][i % 5] = (int64_t)i * 1000000007LL - 5;
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  qs_tensor_desc d = {"ids", QS_DT_I64, 0, 2, {3, 5}, QS_RAW, NULL, NULL};
  cr_assert_eq(qs_import_tensor_begin(im, &d), 0, "%s", qs_error());
  cr_assert_eq(qs_import_tensor_rows(im, v, 3, NULL), 0);
  qs_tensor st;
  cr_assert_eq(qs_import_tensor_end(im, &st), 0);
  cr_assert_eq(st.src_bytes, 120);
  cr_assert_eq(qs_import_commit(im), 0);
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "ids", &ten), 0);
  cr_assert_eq(ten.codec, QS_RAW);
  cr_assert_eq(ten.src_dtype, QS_DT_I64);
  int64_t got[2][3];
  qs_slice sl = {2, {1, 2}, {3, 5}};
  cr_assert_eq(qs_tensor_read(t, &ten, &sl, QC_DT_F32, 0, 6, got), 0, "%s", qs_error());
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 3; j++) cr_assert_eq(got[i][j], v[1 + i][2 + j]);
  qs_txn_end(t);
  qs_close(s);
}

static void info(qs_store *s, qs_store_info *si) { cr_assert_eq(qs_store_info_get(s, si), 0); }

Test(store_api, replace_and_remove_reclaim_shared_parameters) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  uint64_t sh[2] = {64, 64};
  float *x = gauss(4096, 5), *y = gauss(4096, 6);
  for (int round = 0; round < 3; round++) {
    qs_import *im;
    cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
    put_tensor(im, "w1", 2, sh, QC_QINS8, x);
    put_tensor(im, "w2", 2, sh, QC_QINS8, y);
    put_tensor(im, "w3", 2, sh, QC_QINS8, x); /* same data: same table */
    cr_assert_eq(qs_import_commit(im), 0, "%s", qs_error());
  }
  qs_store_info si;
  info(s, &si);
  cr_assert_eq(si.n_models, 1);
  cr_assert_eq(si.n_staging, 0);
  uint64_t blobs = si.n_params;
  cr_assert_geq(blobs, 1);
  cr_assert_leq(blobs, 2, "w1 and w3 must share one blob");
  /* The table is paid once in the model's stored bytes. */
  qs_txn *t;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  qs_model m;
  cr_assert_eq(qs_model_get(t, "m", &m), 0);
  cr_assert_eq(m.id, 3, "each import gets a fresh id");
  qs_tensor t1, t3;
  qs_tensor_cost c1, c3;
  cr_assert_eq(qs_tensor_get(t, "m", "w1", &t1), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w3", &t3), 0);
  cr_assert_eq(qs_tensor_cost_get(t, &t1, &c1), 0);
  cr_assert_eq(qs_tensor_cost_get(t, &t3, &c3), 0);
  cr_assert_eq(c1.params_id, c3.params_id);
  cr_assert(c1.params_first && !c3.params_first);
  cr_assert_eq(t3.stored_bytes, c3.data_bytes);
  qs_txn_end(t);
  /* A second model sharing the blob; removing the first keeps it, removing both frees it. */
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "n", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, QC_QINS8, x);
  cr_assert_eq(qs_import_commit(im), 0);
  info(s, &si);
  cr_assert_eq(si.n_params, blobs);
  cr_assert_eq(qs_model_remove(s, "m"), 0);
  info(s, &si);
  cr_assert_eq(si.n_params, 1);
  uint64_t probs = 9, checked = 0;
  cr_assert_eq(qs_verify(s, NULL, NULL, NULL, &probs, &checked), 0);
  cr_assert_eq(probs, 0);
  cr_assert_eq(checked, 1);
  cr_assert_eq(qs_model_remove(s, "n"), 0);
  cr_assert_eq(qs_model_remove(s, "n"), QINS_ENO_MODEL);
  info(s, &si);
  cr_assert_eq(si.n_params, 0);
  cr_assert_eq(si.n_models, 0);
  cr_assert_eq(si.n_staging, 0);
  qs_close(s);
  free(x);
  free(y);
}

Test(store_api, abort_leaves_nothing_and_input_errors_are_named) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "", NULL, &im), QINS_ENAME);
  cr_assert_eq(qs_import_begin(s, "a/b", NULL, &im), QINS_ENAME);
  char lng[300];
  memset(lng, 'n', 299);
  lng[299] = 0;
  cr_assert_eq(qs_import_begin(s, lng, NULL, &im), QINS_ENAME);
  cr_assert(strstr(qs_error(), "at most 256"), "%s", qs_error());
  uint64_t sh[2] = {8, 8};
  float *x = gauss(64, 7);
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, QC_F32, x);
  qs_tensor_desc d = {"w", QS_DT_F32, 0, 2, {8, 8}, QC_F32, NULL, NULL};
  qc_params p = {0};
  p.codec = QC_F32;
  d.params = &p;
  cr_assert_eq(qs_import_tensor_begin(im, &d), QINS_EINVALID);
  cr_assert(strstr(qs_error(), "appears twice"), "%s", qs_error());
  d.name = "v";
  cr_assert_eq(qs_import_tensor_begin(im, &d), 0);
  cr_assert_eq(qs_import_tensor_rows(im, x, 3, NULL), 0);
  cr_assert_eq(qs_import_tensor_end(im, NULL), QINS_EINVALID, "a short tensor must be refused");
  /* NaN for a lossy codec names the element. */
  qs_import_abort(im);
  qs_store_info si;
  info(s, &si);
  cr_assert_eq(si.n_models, 0);
  cr_assert_eq(si.n_staging, 0);
  cr_assert_eq(si.n_params, 0);
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  float *w = gauss(64, 8);
  qc_params q;
  cr_assert_eq(qc_fit_tensor(QC_QINS8, 8, 8, w, NULL, &q, NULL), 0);
  w[37] = NAN;
  qs_tensor_desc dq = {"q", QS_DT_F32, 0, 2, {8, 8}, QC_QINS8, &q, NULL};
  cr_assert_eq(qs_import_tensor_begin(im, &dq), 0);
  uint64_t bad = 0;
  /* Encoding may run on a worker: the error comes from rows or from tensor_end. */
  int rc = qs_import_tensor_rows(im, w, 8, &bad);
  if (rc == 0) rc = qs_import_tensor_end(im, NULL);
  else cr_assert_eq(bad, 37);
  cr_assert_eq(rc, QINS_ENONFINITE);
  cr_assert(strstr(qs_error(), "element 37 is NaN"), "%s", qs_error());
  qs_import_abort(im);
  info(s, &si);
  cr_assert_eq(si.n_models + si.n_staging + si.n_params, 0);
  qs_close(s);
  free(x);
  free(w);
}

/* Where n bytes first stand in the store's data.mdb (asserted found; what names them says which),
 * and a byte there changed in place: data.mdb is mapped shared, so an open store's next read sees
 * it. mdb_xor with the same mask puts the byte back. */
static off_t mdb_offset_of(const void *bytes, size_t n, const char *what) {
  char p[256];
  snprintf(p, sizeof p, "%s/data.mdb", sdir);
  size_t len;
  char *db = qt_read(p, &len);
  char *hit = db ? memmem(db, len, bytes, n) : NULL;
  cr_assert_not_null(hit, "%s not found in data.mdb", what);
  off_t at = hit - db;
  free(db);
  return at;
}
static void mdb_pread(off_t at, void *out, size_t n) {
  char p[256];
  snprintf(p, sizeof p, "%s/data.mdb", sdir);
  int fd = open(p, O_RDONLY);
  cr_assert_eq(pread(fd, out, n, at), (ssize_t)n);
  close(fd);
}
static void mdb_xor(off_t at, uint8_t mask) {
  char p[256];
  snprintf(p, sizeof p, "%s/data.mdb", sdir);
  int fd = open(p, O_RDWR);
  uint8_t b;
  cr_assert_eq(pread(fd, &b, 1, at), 1);
  b ^= mask;
  cr_assert_eq(pwrite(fd, &b, 1, at), 1);
  close(fd);
}

Test(store_api, corrupted_chunk_fails_its_checksum) {
  uint64_t sh[2] = {64, 64};
  float *x = malloc(4096 * 4);
  for (int i = 0; i < 4096; i++) x[i] = 1234.5f + (float)(i % 7);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, QC_F32, x);
  cr_assert_eq(qs_import_commit(im), 0);
  qs_close(s);
  /* Flip one byte of the stored values in data.mdb. */
  mdb_xor(mdb_offset_of(x, 64, "chunk bytes") + 100, 0x40);
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0);
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
  cr_assert_eq(qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, 4096, x), QINS_ECHECKSUM);
  cr_assert(strstr(qs_error(), "m/w: chunk 0 fails its checksum"), "%s", qs_error());
  qs_txn_end(t);
  uint64_t probs = 0;
  cr_assert_eq(qs_verify(s, NULL, NULL, NULL, &probs, NULL), 0);
  cr_assert_eq(probs, 1);
  qs_close(s);
  free(x);
}

/* Rewrites the first record of the store's "chunks" DB through fn, with raw LMDB in a forked child
 * (this process has no env open: it opens the store only afterwards). */
static void rewrite_first_chunk(void (*fn)(uint8_t *rec, size_t *len)) {
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_cursor *c;
    MDB_val k, v;
    if (mdb_env_create(&env) || mdb_env_set_maxdbs(env, 8) || mdb_env_open(env, sdir, 0, 0664) ||
        mdb_txn_begin(env, NULL, 0, &txn) || mdb_dbi_open(txn, "chunks", 0, &dbi) ||
        mdb_cursor_open(txn, dbi, &c) || mdb_cursor_get(c, &k, &v, MDB_FIRST))
      _exit(1);
    size_t len = v.mv_size;
    uint8_t *rec = malloc(len), key[64];
    memcpy(rec, v.mv_data, len);
    memcpy(key, k.mv_data, k.mv_size);
    mdb_cursor_close(c);
    fn(rec, &len);
    MDB_val nk = {k.mv_size, key}, nv = {len, rec};
    if (mdb_put(txn, dbi, &nk, &nv, 0) || mdb_txn_commit(txn)) _exit(1);
    mdb_env_close(env);
    _exit(0);
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rewriting the chunk record failed");
}

/* Reads m/w whole (n floats) from the store; returns the code; *msg gets qs_error(). */
static int read_whole_w(uint64_t n, char *msg, size_t cap) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0, "%s", qs_error());
  qs_txn *t;
  qs_tensor ten;
  float *y = malloc(n * 4);
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
  int rc = qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, n, y);
  snprintf(msg, cap, "%s", qs_error());
  qs_txn_end(t);
  qs_close(s);
  free(y);
  return rc;
}

static void import_w(int codec) {
  uint64_t sh[2] = {64, 64};
  float *x = gauss(4096, 77);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, codec, x);
  cr_assert_eq(qs_import_commit(im), 0, "%s", qs_error());
  qs_close(s);
  free(x);
}

/* Imports model m with one f32 tensor w of rows x cols gaussian values (seed); returns them. */
static float *import_w_f32(uint64_t rows, uint64_t cols, uint64_t seed) {
  uint64_t sh[2] = {rows, cols};
  float *x = gauss(rows * cols, seed);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, QC_F32, x);
  cr_assert_eq(qs_import_commit(im), 0, "%s", qs_error());
  qs_close(s);
  return x;
}

/* QINS_VERIFY=always (docs/qinsctl.md): every read checks its chunks whole. By default a chunk is
 * verified whole at its first read, then each read checks only the 4 KiB segments it serves; so
 * after a first clean read, a byte damaged in the last row of chunk 0 is CHECKSUM for a read of
 * row 0 only under "always". */
Test(store_api, verify_always_checks_whole_chunks_on_every_read) {
  const uint64_t rows = 256, cols = 1024; /* 1 MiB of f32 */
  float *x = import_w_f32(rows, cols, 78), *y = malloc(cols * 4);
  qs_store *s;

  cr_assert_eq(setenv("QINS_VERIFY", "always", 1), 0);
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0);
  const qs_slice row0 = {.ndim = 1, .start = {0}, .stop = {1}};
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
  const uint64_t rpc = ten.rows_per_chunk;
  cr_assert_geq(rpc * cols * 4, 4 * QS_SEG, "chunk 0 spans several segments");
  cr_assert_eq(qs_tensor_read(t, &ten, &row0, QC_DT_F32, 0, cols, y), 0, "%s", qs_error());
  cr_assert_eq(memcmp(x, y, cols * 4), 0);
  qs_txn_end(t);

  /* Flip a byte of the last row of chunk 0, far from row 0's segment. The file is mapped shared:
   * the next read sees it. */
  mdb_xor(mdb_offset_of(x + (rpc - 1) * cols, 64, "the last row of chunk 0") + 40, 0x40);

  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
  int rc = qs_tensor_read(t, &ten, &row0, QC_DT_F32, 0, cols, y);
  cr_assert_eq(rc, QINS_ECHECKSUM, "row 0 of a chunk damaged elsewhere under QINS_VERIFY=always: %s",
               qins_err_name(rc));
  cr_assert(strstr(qs_error(), "m/w: chunk 0 fails its checksum"), "%s", qs_error());
  qs_txn_end(t);
  qs_close(s);
  unsetenv("QINS_VERIFY");
  free(x);
  free(y);
}

/* Default checks (docs/FORMAT.md §2.5): after a chunk's first read verified it, each read checks
 * the 4 KiB segments it touches. A byte changed in a middle segment is CHECKSUM for a read of
 * rows spanning it (one CRC pass over several segments, compared with their kept CRCs joined),
 * and so is a byte of the short last segment for a read of the last row; a row in other
 * segments still reads. */
Test(store_api, bytes_changed_after_the_first_read_fail_the_reads_that_touch_them) {
  const uint64_t rows = 64, cols = 1000, n = rows * cols; /* 250000 bytes: 61 segments + 144 */
  float *x = import_w_f32(rows, cols, 80), *y = malloc(n * 4);
  qs_store *s;
  const off_t at = mdb_offset_of(x, 64, "chunk 0"); /* the payload: rows stored as they are */
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0);
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
  cr_assert_eq(ten.n_chunks, 1);
  cr_assert_eq(qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, n, y), 0, "%s", qs_error());
  qs_txn_end(t);
  struct {
    uint64_t byte;                /* payload byte changed */
    uint64_t r0, r1;              /* rows read: fail */
    uint64_t ok0, ok1;            /* rows read: still served */
  } cases[] = {
      {10 * QS_SEG + 5, 8, 14, 0, 8},            /* segment 10 (rows 10..11), a read of 6 rows */
      {n * 4 - 3, rows - 1, rows, rows - 3, rows - 2}, /* the short last segment */
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    mdb_xor(at + (off_t)cases[c].byte, 0x10);
    qs_slice bad = {.ndim = 1, .start = {cases[c].r0}, .stop = {cases[c].r1}};
    qs_slice ok = {.ndim = 1, .start = {cases[c].ok0}, .stop = {cases[c].ok1}};
    cr_assert_eq(qs_txn_begin(s, &t), 0);
    cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
    int rc = qs_tensor_read(t, &ten, &bad, QC_DT_F32, 0, (cases[c].r1 - cases[c].r0) * cols, y);
    cr_assert_eq(rc, QINS_ECHECKSUM, "case %zu: %s", c, qins_err_name(rc));
    cr_assert(strstr(qs_error(), "changed after they were verified"), "%s", qs_error());
    rc = qs_tensor_read(t, &ten, &ok, QC_DT_F32, 0, (cases[c].ok1 - cases[c].ok0) * cols, y);
    cr_assert_eq(rc, 0, "case %zu, rows elsewhere: %s", c, qs_error());
    cr_assert_eq(memcmp(y, x + cases[c].ok0 * cols, (cases[c].ok1 - cases[c].ok0) * cols * 4), 0);
    qs_txn_end(t);
    mdb_xor(at + (off_t)cases[c].byte, 0x10); /* put it back for the next case */
  }
  qs_close(s);
  free(x);
  free(y);
}

/* A read transaction remembers where the chunks it read are (qs__tcache) for the next ones in the
 * same snapshot; a chunk header changed in between (the file is mapped shared) is still checked:
 * the next read is CORRUPT naming the chunk, never a read of the wrong extent. */
Test(store_api, chunk_header_changed_after_a_read_is_corrupt) {
  const uint64_t rows = 64, cols = 1024;
  float *x = import_w_f32(rows, cols, 79), *y = malloc(cols * 4);
  qs_store *s;
  const qs_slice row0 = {.ndim = 1, .start = {0}, .stop = {1}};
  const off_t hdr = mdb_offset_of(x, 64, "chunk 0") - 16;
  char magic[4];
  mdb_pread(hdr, magic, 4);
  cr_assert(hdr >= 0 && !memcmp(magic, "QSCK", 4), "chunk 0 not found");
  const int fields[2] = {0, 8}; /* the magic, the payload size */
  for (int f = 0; f < 2; f++) {
    cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0);
    qs_txn *t;
    qs_tensor ten;
    cr_assert_eq(qs_txn_begin(s, &t), 0);
    cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
    cr_assert_eq(qs_tensor_read(t, &ten, &row0, QC_DT_F32, 0, cols, y), 0, "%s", qs_error());
    qs_txn_end(t);
    mdb_xor(hdr + fields[f] + 1, 0x01);
    cr_assert_eq(qs_txn_begin(s, &t), 0);
    cr_assert_eq(qs_tensor_get(t, "m", "w", &ten), 0);
    int rc = qs_tensor_read(t, &ten, &row0, QC_DT_F32, 0, cols, y);
    cr_assert_eq(rc, QINS_ECORRUPT, "field at %d changed: %s (%s)", fields[f], qins_err_name(rc),
                 qs_error());
    cr_assert(strstr(qs_error(), "m/w: chunk 0 is malformed"), "%s", qs_error());
    qs_txn_end(t);
    qs_close(s);
    mdb_xor(hdr + fields[f] + 1, 0x01); /* put it back for the next field */
  }
  free(x);
  free(y);
}

/* Keeps the header (its size field still says the full payload) but drops 4 payload bytes. */
static void truncate_by_4(uint8_t *rec, size_t *len) {
  (void)rec;
  *len -= 4;
}

/* FORMAT.md §2.5: a chunk record whose length is not its header's plus the payload the tensor
 * needs is CORRUPT, before any byte of it is read as payload. */
Test(store_api, chunk_record_of_the_wrong_length_is_corrupt) {
  import_w(QC_F32);
  rewrite_first_chunk(truncate_by_4);
  char msg[512];
  int rc = read_whole_w(4096, msg, sizeof msg);
  cr_assert_eq(rc, QINS_ECORRUPT, "a record 4 bytes short: %s (%s)", qins_err_name(rc), msg);
  cr_assert(strstr(msg, "m/w: chunk 0 is malformed"), "%s", msg);
}

/* A NaN qins8 scale with a CRC that matches it (written so, not flipped): the CRC passes, the
 * codec data check refuses the chunk. */
static void nan_scale_valid_crc(uint8_t *rec, size_t *len) {
  rec[QS_CHUNK_HDR] = 0x00;
  rec[QS_CHUNK_HDR + 1] = 0x7E; /* scale[0] = f16 NaN */
  uint32_t crc = qs__crc32c(0, rec + QS_CHUNK_HDR, *len - QS_CHUNK_HDR);
  memcpy(rec + 4, &crc, 4); /* little-endian */
}

Test(store_api, chunk_with_invalid_codec_data_and_a_valid_crc_is_corrupt) {
  import_w(QC_QINS8);
  rewrite_first_chunk(nan_scale_valid_crc);
  char msg[512];
  int rc = read_whole_w(4096, msg, sizeof msg);
  cr_assert_eq(rc, QINS_ECORRUPT, "NaN scale: %s (%s)", qins_err_name(rc), msg);
  cr_assert(strstr(msg, "m/w: chunk 0 holds invalid codec data"), "%s", msg);
}

Test(store_api, one_writer_at_a_time) {
  int go[2], done[2];
  cr_assert_eq(pipe(go), 0);
  cr_assert_eq(pipe(done), 0);
  /* The store must exist before either process opens it. */
  mkdir(sdir, 0755);
  pid_t pid = fork(); /* before this process opens the env */
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    qs_store *cs;
    qs_import *im;
    if (qs_open(&cs, sdir, QS_OPEN_CREATE) || qs_import_begin(cs, "m", NULL, &im)) _exit(1);
    char c = 1;
    if (write(go[1], &c, 1) != 1) _exit(1);
    if (read(done[0], &c, 1) != 1) _exit(1);
    qs_import_abort(im);
    qs_close(cs);
    _exit(0);
  }
  char c;
  cr_assert_eq(read(go[0], &c, 1), 1);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, 0), 0, "%s", qs_error());
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "x", NULL, &im), QINS_ELOCKED);
  cr_assert(strstr(qs_error(), "locked by another writer (pid"), "%s", qs_error());
  cr_assert_eq(qs_model_remove(s, "m"), QINS_ELOCKED);
  cr_assert_eq(write(done[1], &c, 1), 1);
  int st;
  waitpid(pid, &st, 0);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  cr_assert_eq(qs_import_begin(s, "x", NULL, &im), 0, "%s", qs_error());
  qs_import_abort(im);
  qs_close(s);
}

/* A child process (the LMDB rule: one env per process, none across fork) replaces model m with a
 * 2 x n f32 tensor w filled with v, or removes m when n == 0. */
static void writer_child(uint64_t n, float v) {
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    qs_store *s;
    if (qs_open(&s, sdir, QS_OPEN_CREATE)) _exit(1);
    int rc;
    if (n == 0) {
      rc = qs_model_remove(s, "m");
    } else {
      float *x = malloc(2 * n * sizeof *x);
      for (uint64_t i = 0; i < 2 * n; i++) x[i] = v;
      qs_import *im;
      uint64_t sh[2] = {2, n};
      qc_params pr;
      memset(&pr, 0, sizeof pr);
      pr.codec = QC_F32;
      qs_tensor_desc d = {"w", QS_DT_F32, 0, 2, {sh[0], sh[1]}, QC_F32, &pr, NULL};
      rc = qs_import_begin(s, "m", NULL, &im);
      if (!rc) rc = qs_import_tensor_begin(im, &d);
      if (!rc) rc = qs_import_tensor_rows(im, x, 2, NULL);
      if (!rc) rc = qs_import_tensor_end(im, NULL);
      rc = rc ? (qs_import_abort(im), rc) : qs_import_commit(im);
      free(x);
    }
    qs_close(s);
    _exit(rc ? 2 : 0);
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "writer child failed");
}

/* Reads m/w whole through a fresh txn (the store's reused one); 0 or the error. */
static int read_w(qs_store *s, qs_tensor *ten, float *out) {
  qs_txn *t;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  int rc = qs_tensor_get(t, "m", "w", ten);
  if (!rc) rc = qs_tensor_read(t, ten, NULL, QC_DT_F32, 0, ten->n_elem, out);
  qs_txn_end(t);
  return rc;
}

/* A read txn is reused and remembers the lookups of its snapshot (txn.c, qs__tcache): repeated
 * reads of one snapshot are served from memory, and a commit by another process (replace, then
 * remove) is seen by the next txn, never an old record or chunk. */
Test(store_api, reused_txns_see_each_commit_not_remembered_lookups) {
  writer_child(8, 1.5f);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0);
  qs_tensor ten;
  float got[64];
  for (int k = 0; k < 3; k++) { /* the same snapshot: the 2nd and 3rd come from the cache */
    memset(got, 0, sizeof got);
    cr_assert_eq(read_w(s, &ten, got), 0, "%s", qs_error());
    cr_assert_eq(ten.shape[1], 8);
    for (int i = 0; i < 16; i++) cr_assert_eq(got[i], 1.5f);
  }
  writer_child(32, -2.25f); /* same names, new id, new shape and values */
  cr_assert_eq(read_w(s, &ten, got), 0, "%s", qs_error());
  cr_assert_eq(ten.shape[1], 32);
  for (int i = 0; i < 64; i++) cr_assert_eq(got[i], -2.25f, "element %d", i);
  writer_child(0, 0); /* removed */
  cr_assert_eq(read_w(s, &ten, got), QINS_ENO_MODEL);
  qs_close(s);
}

/* qs_tensor_span (zero-copy reads) gives the stored bytes exactly where qs_tensor_read would
 * decode the same values, chunk by chunk, for a whole tensor and a row range; it declines (0)
 * what must be decoded: another output dtype, a coded tensor, a slice past the first dimension. */
Test(store_api, spans_are_the_stored_bytes_and_decline_what_needs_decoding) {
  enum { R = 2100, C = 1024 }; /* 8.2 MiB of f32: three chunks of QS_CHUNK_TARGET */
  uint64_t sh[2] = {R, C};
  float *x = gauss((uint64_t)R * C, 9);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0);
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0);
  put_tensor(im, "w", 2, sh, QC_F32, x);
  put_tensor(im, "q", 2, sh, QC_QINS8, x);
  cr_assert_eq(qs_import_commit(im), 0);
  qs_txn *t;
  qs_tensor w, q;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "w", &w), 0);
  cr_assert_eq(qs_tensor_get(t, "m", "q", &q), 0);
  cr_assert_eq(w.n_chunks, 3);
  qs_slice rows = {1, {17}, {2091}}, cols = {2, {0, 3}, {R, 9}};
  const qs_slice *sls[2] = {NULL, &rows};
  float *got = malloc(sizeof(float) * R * C), *want = malloc(sizeof(float) * R * C);
  for (int k = 0; k < 2; k++) {
    uint64_t n_out = (uint64_t)(k ? 2091 - 17 : R) * C, p = 0, spans = 0;
    cr_assert_eq(qs_tensor_read(t, &w, sls[k], QC_DT_F32, 0, n_out, want), 0);
    while (p < n_out) {
      const void *sp;
      uint64_t n;
      cr_assert_eq(qs_tensor_span(t, &w, sls[k], QC_DT_F32, p, n_out, &sp, &n), 1, "%s", qs_error());
      cr_assert(n > 0 && p + n <= n_out);
      memcpy(got + p, sp, n * 4);
      p += n;
      spans++;
    }
    cr_assert(!memcmp(got, want, n_out * 4), "slice %d: spans differ from the decode", k);
    cr_assert_eq(spans, 3, "slice %d: one span per chunk touched", k);
  }
  const void *sp;
  uint64_t n;
  cr_assert_eq(qs_tensor_span(t, &w, NULL, QC_DT_F16, 0, 10, &sp, &n), 0);
  cr_assert_eq(qs_tensor_span(t, &q, NULL, QC_DT_F32, 0, 10, &sp, &n), 0);
  cr_assert_eq(qs_tensor_span(t, &w, &cols, QC_DT_F32, 0, 10, &sp, &n), 0);
  cr_assert_eq(qs_tensor_span(t, &w, NULL, QC_DT_F32, 0, (uint64_t)R * C + 1, &sp, &n),
               QINS_EBAD_SLICE);
  qs_txn_end(t);
  qs_close(s);
  free(got);
  free(want);
  free(x);
}
