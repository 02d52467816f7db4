/* SPDX-License-Identifier: MIT */
/*
 * codec_fit.c — per-tensor parameters: streaming fits (rows in any number of pieces) equal one-shot
 * fits; small tensors get a standard qins8 table whose bytes are identical for every tensor that
 * uses it, large ones a fitted table; effort max runs QINS.md's reference encoder; params records
 * round-trip through qc_params_write/read and corrupt ones are refused; stored chunks are
 * validated; names and sizes; out-of-range magnitudes are refused naming the element.
 */
#include <criterion/criterion.h>

#include "codec_test.h"
#include "qins.h"

static qc_params fit_pieces(qc_codec c, uint64_t L, uint64_t R, const float *w, uint64_t piece,
                            const qc_fit_opts *o) {
  qc_fit *f;
  qc_params p;
  cr_assert_eq(qc_fit_new(c, L, o, &f), 0);
  for (uint64_t r = 0; r < R; r += piece)
    cr_assert_eq(qc_fit_add(f, w + r * L, R - r < piece ? R - r : piece, NULL), 0);
  cr_assert_eq(qc_fit_finish(f, &p), 0);
  qc_fit_free(f);
  return p;
}

static int same_params(const qc_params *a, const qc_params *b) {
  uint8_t x[QC_PARAMS_MAX], y[QC_PARAMS_MAX];
  if (a->codec != b->codec) return 0;
  qc_params_write(a, x);
  qc_params_write(b, y);
  return !memcmp(x, y, qc_params_size(a->codec));
}

Test(codec_fit, streaming_equals_one_shot) {
  uint64_t L = 256;
  for (int big = 0; big < 2; big++) {
    uint64_t R = big ? 400 : 40; /* 102400 (fitted table) and 10240 (standard table) weights */
    float *w = ct_tensor(CT_LAPLACE_OUTLIERS, L * R, 5);
    for (int c = QC_QINS8; c < QC_CODEC_COUNT; c++) {
      qc_params one = fit_pieces((qc_codec)c, L, R, w, R, NULL);
      qc_params many = fit_pieces((qc_codec)c, L, R, w, 7, NULL);
      cr_assert(same_params(&one, &many), "%s", qc_codec_name((qc_codec)c));
      if (c == QC_QINS8) {
        cr_assert_eq(one.table_id, many.table_id);
        cr_assert_eq(big ? one.table_id < 0 : one.table_id >= 0, 1, "table kind for %llu weights",
                     (unsigned long long)(L * R));
      }
    }
    free(w);
  }
}

Test(codec_fit, standard_tables_identical_across_tensors) {
  uint8_t rec[QC_QINS8_STD_COUNT][QC_PARAMS_MAX];
  int seen[QC_QINS8_STD_COUNT] = {0};
  for (int t = 0; t < 24; t++) {
    int kind = t % 2 ? CT_GAUSS : CT_LAPLACE_OUTLIERS;
    uint64_t L = 64 + (uint64_t)t * 8, R = 32;
    float *w = ct_tensor(kind, L * R, (uint64_t)t);
    if (t % 3 == 2) /* uniform-like: tables other than the primary ones get their chance */
      for (uint64_t i = 0; i < L * R; i++) w[i] = (float)((double)(i * 2654435761u % 1000) / 1000 - 0.5);
    qc_params p;
    cr_assert_eq(qc_fit_tensor(QC_QINS8, L, R, w, NULL, &p, NULL), 0);
    cr_assert(p.table_id >= 0 && p.table_id < QC_QINS8_STD_COUNT);
    uint8_t r[QC_PARAMS_MAX];
    qc_params_write(&p, r);
    if (seen[p.table_id]) cr_assert_eq(memcmp(r, rec[p.table_id], qc_params_size(QC_QINS8)), 0);
    memcpy(rec[p.table_id], r, sizeof r);
    seen[p.table_id]++;
    qc_params s;
    cr_assert_eq(qc_params_std_qins8(p.table_id, &s), 0);
    cr_assert(same_params(&p, &s));
    free(w);
  }
  cr_assert(seen[0] > 0, "a uniform tensor gets rat(0)");
  cr_assert(seen[1] + seen[2] > 0);
}

Test(codec_fit, custom_table_for_large_tensors) {
  uint64_t L = 4096, R = 12; /* 49152 >= QC_QINS8_CUSTOM_MIN */
  float *w = ct_tensor(CT_GAUSS, L * R, 9);
  qc_params fitted, std;
  cr_assert_eq(qc_fit_tensor(QC_QINS8, L, R, w, NULL, &fitted, NULL), 0);
  cr_assert_eq(fitted.table_id, -1);
  qc_fit_opts o = {.table_min_elems = UINT64_MAX};
  cr_assert_eq(qc_fit_tensor(QC_QINS8, L, R, w, &o, &std, NULL), 0);
  cr_assert_geq(std.table_id, 0);
  uint8_t *chunk = malloc(qc_chunk_bytes(QC_QINS8, L, R, NULL));
  qc_stats a = {0}, b = {0};
  cr_assert_eq(qc_encode(&fitted, L, R, w, chunk, &a, NULL), 0);
  cr_assert_eq(qc_encode(&std, L, R, w, chunk, &b, NULL), 0);
  cr_assert(qc_stats_snr_db(&a) >= qc_stats_snr_db(&b) - 0.02, "fitted %.3f < standard %.3f",
            qc_stats_snr_db(&a), qc_stats_snr_db(&b));
  free(chunk);
  free(w);
}

/* QINS.md's reference encoder (effort max) does at least as well as the default. */
Test(codec_fit, effort_max_at_least_default) {
  uint64_t L = 512, R = 16;
  float *w = ct_tensor(CT_LAPLACE_OUTLIERS, L * R, 4);
  qc_fit_opts mx = {.effort = QC_EFFORT_MAX, .table_min_elems = 1}, df = {.table_min_elems = 1};
  qc_params pm, pd;
  cr_assert_eq(qc_fit_tensor(QC_QINS8, L, R, w, &mx, &pm, NULL), 0);
  cr_assert_eq(qc_fit_tensor(QC_QINS8, L, R, w, &df, &pd, NULL), 0);
  uint8_t *chunk = malloc(qc_chunk_bytes(QC_QINS8, L, R, NULL));
  qc_stats a = {0}, b = {0};
  cr_assert_eq(qc_encode(&pm, L, R, w, chunk, &a, NULL), 0);
  cr_assert_eq(qc_encode(&pd, L, R, w, chunk, &b, NULL), 0);
  cr_assert_geq(qc_stats_snr_db(&a), qc_stats_snr_db(&b), "max %.3f default %.3f",
                qc_stats_snr_db(&a), qc_stats_snr_db(&b));
  free(chunk);
  free(w);
}

Test(codec_fit, params_round_trip_and_corruption) {
  float *w = ct_tensor(CT_GAUSS, 64 * 700, 2);
  for (int c = 0; c < QC_CODEC_COUNT; c++) {
    qc_params p, q;
    qc_fit_opts o = {.alpha = 0.5f};
    cr_assert_eq(qc_fit_tensor((qc_codec)c, 64, 700, w, &o, &p, NULL), 0);
    size_t n = qc_params_size((qc_codec)c);
    cr_assert_leq(n, QC_PARAMS_MAX);
    uint8_t r[QC_PARAMS_MAX + 1];
    qc_params_write(&p, r);
    cr_assert_eq(r[0], c);
    cr_assert_eq(r[1], QC_PARAMS_VERSION);
    cr_assert_eq(qc_params_read((qc_codec)c, r, n, &q), 0);
    cr_assert(same_params(&p, &q));
    cr_assert_eq(qc_params_read((qc_codec)c, r, n - 1, &q), QINS_ECORRUPT);
    cr_assert_eq(qc_params_read((qc_codec)c, r, n + 1, &q), QINS_ECORRUPT);
    cr_assert_eq(qc_params_read((qc_codec)((c + 1) % QC_CODEC_COUNT), r, n, &q), QINS_ECORRUPT);
    r[1] = QC_PARAMS_VERSION + 1;
    cr_assert_eq(qc_params_read((qc_codec)c, r, n, &q), QINS_EVERSION);
    r[1] = QC_PARAMS_VERSION, r[3] = 1;
    cr_assert_eq(qc_params_read((qc_codec)c, r, n, &q), QINS_ECORRUPT);
    r[3] = 0;
    if (c == QC_QINS8) {
      float bad[4] = {0.5f /* T[0] != 1 */, NAN, 2.0f /* increasing */, -1.0f};
      int at[4] = {0, 40, 41, 127};
      for (int k = 0; k < 4; k++) {
        uint8_t r2[QC_PARAMS_MAX];
        memcpy(r2, r, n);
        memcpy(r2 + 4 + 4 * at[k], &bad[k], 4);
        cr_assert_eq(qc_params_read(QC_QINS8, r2, n, &q), QINS_ECORRUPT, "bad table %d", k);
      }
    }
    if (c == QC_SEED_RATIONAL) {
      float z = 0;
      memcpy(r + 4, &z, 4);
      cr_assert_eq(qc_params_read((qc_codec)c, r, n, &q), QINS_ECORRUPT);
    }
  }
  free(w);
}

Test(codec_fit, validate_rejects_corrupt_chunks) {
  qc_params p;
  qc_params_std_qins8(2, &p);
  uint8_t c8[2 * 2 + 40] = {0};
  c8[1] = 0x3C; /* scale 1.0 */
  cr_assert_eq(qc_chunk_validate(&p, 40, 1, c8), 0);
  c8[3] = 0x7C; /* +Inf scale */
  cr_assert_eq(qc_chunk_validate(&p, 40, 1, c8), QINS_ECORRUPT);
  c8[3] = 0xBC; /* negative scale */
  cr_assert_eq(qc_chunk_validate(&p, 40, 1, c8), QINS_ECORRUPT);
  qc_params q = {.codec = QC_QINS16};
  uint8_t c16[1 + 2 * 10];
  memset(c16, 0, sizeof c16);
  c16[0] = (uint8_t)(int8_t)-100;
  cr_assert_eq(qc_chunk_validate(&q, 10, 1, c16), 0);
  c16[0] = (uint8_t)(int8_t)-101;
  cr_assert_eq(qc_chunk_validate(&q, 10, 1, c16), QINS_ECORRUPT);
  c16[0] = (uint8_t)(int8_t)-128; /* all-zero block with non-zero codes */
  cr_assert_eq(qc_chunk_validate(&q, 10, 1, c16), QINS_ECORRUPT);
  for (int i = 0; i < 10; i++) c16[1 + 2 * i] = 0xFF, c16[2 + 2 * i] = 0x7F;
  cr_assert_eq(qc_chunk_validate(&q, 10, 1, c16), 0);
  qc_params s = {.codec = QC_SEED_LOG, .log_min = -3, .log_max = -1};
  uint8_t cl[2 * 4] = {1, 0, 0xFF, 2, 9, 9, 9, 9};
  cr_assert_eq(qc_chunk_validate(&s, 4, 1, cl), QINS_ECORRUPT);
  cl[3] = 1;
  cr_assert_eq(qc_chunk_validate(&s, 4, 1, cl), 0);
}

Test(codec_fit, out_of_range_magnitudes_refused) {
  float w[200];
  for (int i = 0; i < 200; i++) w[i] = (float)i;
  uint64_t idx = 0;
  qc_params p;
  w[150] = 65520.0f; /* rounds to fp16 infinity */
  cr_assert_eq(qc_fit_tensor(QC_QINS8, 100, 2, w, NULL, &p, &idx), QINS_EUNSUPPORTED);
  cr_assert_eq(idx, 150);
  w[150] = 65519.0f; /* still an fp16 scale (65504) */
  cr_assert_eq(qc_fit_tensor(QC_QINS8, 100, 2, w, NULL, &p, &idx), 0);
  w[77] = 0x1.000002p127f; /* above 2^127: no int8 exponent */
  cr_assert_eq(qc_fit_tensor(QC_QINS16, 100, 2, w, NULL, &p, &idx), QINS_EUNSUPPORTED);
  cr_assert_eq(idx, 77);
  qc_params q16 = {.codec = QC_QINS16};
  uint8_t chunk[4 + 400];
  cr_assert_eq(qc_encode(&q16, 100, 2, w, chunk, NULL, &idx), QINS_EUNSUPPORTED);
  cr_assert_eq(idx, 77);
  w[77] = 0x1p127f; /* exactly 2^127: e = 127, exact */
  float v[200];
  cr_assert_eq(qc_encode(&q16, 100, 2, w, chunk, NULL, &idx), 0);
  cr_assert_eq(qc_decode(&q16, 100, 2, chunk, 0, 200, QC_DT_F32, v), 0);
  cr_assert_eq(v[77], 0x1p127f);
}

Test(codec_fit, names_and_sizes) {
  for (int c = 0; c < QC_CODEC_COUNT; c++)
    cr_assert_eq(qc_codec_from_name(qc_codec_name((qc_codec)c)), c);
  cr_assert_eq(qc_codec_from_name("qins9"), -1);
  cr_assert_eq(qc_codec_from_name(NULL), -1);
  for (int d = 0; d < QC_DT_COUNT; d++) cr_assert_eq(qc_dtype_from_name(qc_dtype_name((qc_dtype)d)), d);
  cr_assert_eq(qc_dtype_size(QC_DT_BF16), 2);
  cr_assert_eq(qc_codec_block(QC_QINS8), 32);
  cr_assert_eq(qc_codec_block(QC_QINS16), 64);
  cr_assert_eq(qc_codec_block(QC_F16), 0);
  cr_assert(qc_codec_is_lossy(QC_SEED_LOG) && !qc_codec_is_lossy(QC_BF16));
  const char *k = qc_kernel_name();
  cr_assert(!strcmp(k, "ref") || !strcmp(k, "avx2") || !strcmp(k, "avx512"));
  const char *env = getenv("QINS_CODEC");
  if (env && (!strcmp(env, "ref") || !strcmp(env, "avx2"))) cr_assert_str_eq(k, env);
}

/* Encoding is deterministic across CPUs: the AVX2 error estimator of the qins8 scale search and
 * the scalar one (QINS_CODEC=ref) choose the same scales, so the chunks are byte-identical. The
 * scalar run happens in a child process (the choice is made once per process). */
#include <sys/wait.h>
#include <unistd.h>

static void encode_qins8_chunk(uint8_t *out, uint64_t L, uint64_t R) {
  float *w = ct_tensor(CT_LAPLACE_OUTLIERS, L * R, 21);
  qc_params p;
  cr_assert_eq(qc_fit_tensor(QC_QINS8, L, R, w, NULL, &p, NULL), 0);
  cr_assert_eq(qc_encode(&p, L, R, w, out, NULL, NULL), 0);
  free(w);
}

Test(codec_fit, encode_same_bytes_with_scalar_estimator) {
  uint64_t L = 1000, R = 50, bytes = qc_chunk_bytes(QC_QINS8, L, R, NULL);
  uint8_t *a = malloc(bytes), *b = malloc(bytes);
  int fd[2];
  cr_assert_eq(pipe(fd), 0);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    close(fd[0]);
    setenv("QINS_CODEC", "ref", 1);
    encode_qins8_chunk(b, L, R);
    size_t off = 0;
    while (off < bytes) {
      ssize_t k = write(fd[1], b + off, bytes - off);
      if (k <= 0) _exit(1);
      off += (size_t)k;
    }
    _exit(0);
  }
  close(fd[1]);
  size_t off = 0;
  while (off < bytes) {
    ssize_t k = read(fd[0], b + off, bytes - off);
    cr_assert_gt(k, 0, "child died");
    off += (size_t)k;
  }
  int st;
  waitpid(pid, &st, 0);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  encode_qins8_chunk(a, L, R);
  cr_assert_eq(memcmp(a, b, bytes), 0, "scalar and %s encoders disagree", qc_kernel_name());
  free(a);
  free(b);
}
