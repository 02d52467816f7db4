/* SPDX-License-Identifier: MIT */
/*
 * import_formats.c — importers on valid inputs (store.h §Importers; FORMATS-AND-PEERS.md §1):
 * GGUF v2/v3 with reversed dims and F32/F16/BF16, Q8_0/Q4_0 dequantization against the ggml
 * formulas (every block type: import_ecosystem.c), .npy v1/v2/v3 (file and directory), a sharded safetensors model, unaligned data.
 * Values are checked by reading the store back (f32 codec: exact).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "import_test.h"

TestSuite(import_formats, .init = setup, .fini = teardown, .timeout = 60);

static void pad(qt_buf *b, size_t a) {
  while (b->n % a) qt_put(b, "\0", 1);
}

Test(import_formats, gguf_plain_types_with_reversed_dims) {
  for (uint32_t ver = 2; ver <= 3; ver++) {
    qt_buf b = {0};
    qt_put(&b, "GGUF", 4);
    qt_put_u32(&b, ver);
    qt_put_u64(&b, 3); /* tensors */
    qt_put_u64(&b, 4); /* KVs */
    qt_put_gstr(&b, "general.architecture");
    qt_put_u32(&b, 8);
    qt_put_gstr(&b, "llama");
    qt_put_gstr(&b, "llama.block_count");
    qt_put_u32(&b, 4);
    qt_put_u32(&b, 5);
    qt_put_gstr(&b, "tokenizer.ggml.tokens");
    qt_put_u32(&b, 9);
    qt_put_u32(&b, 8);
    qt_put_u64(&b, 2);
    qt_put_gstr(&b, "a");
    qt_put_gstr(&b, "b");
    qt_put_gstr(&b, "general.alignment");
    qt_put_u32(&b, 4);
    qt_put_u32(&b, 64);
    /* w: ne = {8, 4} F32 -> row-major [4, 8]; h: ne = {16, 2, 3} F16 -> [3, 2, 16]; bf: ne {5} BF16 */
    qt_put_gstr(&b, "w");
    qt_put_u32(&b, 2);
    qt_put_u64(&b, 8);
    qt_put_u64(&b, 4);
    qt_put_u32(&b, 0);
    qt_put_u64(&b, 0);
    qt_put_gstr(&b, "h");
    qt_put_u32(&b, 3);
    qt_put_u64(&b, 16);
    qt_put_u64(&b, 2);
    qt_put_u64(&b, 3);
    qt_put_u32(&b, 1);
    qt_put_u64(&b, 128);
    qt_put_gstr(&b, "bf");
    qt_put_u32(&b, 1);
    qt_put_u64(&b, 5);
    qt_put_u32(&b, 30);
    qt_put_u64(&b, 128 + 192);
    pad(&b, 64);
    float w[32];
    for (int i = 0; i < 32; i++) w[i] = (float)i * 0.25f - 3;
    qt_put(&b, w, sizeof w);
    pad(&b, 64);
    uint16_t h[96];
    for (int i = 0; i < 96; i++) h[i] = qc_f32_to_f16((float)i / 16 - 2);
    qt_put(&b, h, sizeof h);
    pad(&b, 64);
    uint16_t bf[5];
    for (int i = 0; i < 5; i++) bf[i] = qc_f32_to_bf16((float)i * 1.5f);
    qt_put(&b, bf, sizeof bf);
    char p[256];
    snprintf(p, sizeof p, "%s/m%u.gguf", dir, ver);
    cr_assert_eq(qt_write(p, b.p, b.n), 0);
    free(b.p);
    cr_assert_eq(import(p, NULL, QC_F32, 0), 0, "%s", qs_error());
    char model[8];
    snprintf(model, sizeof model, "m%u", ver);
    qs_tensor t;
    float *x = read_tensor(model, "w", &t);
    cr_assert_eq(t.ndim, 2);
    cr_assert_eq(t.shape[0], 4);
    cr_assert_eq(t.shape[1], 8);
    cr_assert_eq(memcmp(x, w, sizeof w), 0);
    free(x);
    x = read_tensor(model, "h", &t);
    cr_assert_eq(t.ndim, 3);
    cr_assert(t.shape[0] == 3 && t.shape[1] == 2 && t.shape[2] == 16);
    cr_assert_eq(t.src_dtype, QS_DT_F16);
    for (int i = 0; i < 96; i++) cr_assert_eq(x[i], qc_f16_to_f32(h[i]));
    free(x);
    x = read_tensor(model, "bf", &t);
    cr_assert_eq(t.src_dtype, QS_DT_BF16);
    cr_assert_eq(t.src_bytes, 10);
    for (int i = 0; i < 5; i++) cr_assert_eq(x[i], qc_bf16_to_f32(bf[i]));
    free(x);
    /* Metadata: strings and scalars as strings; every KV typed in "gguf" (import_ecosystem.c). */
    qs_txn *tx;
    qs_model m;
    cr_assert_eq(qs_txn_begin(st, &tx), 0);
    cr_assert_eq(qs_model_get(tx, model, &m), 0);
    cr_assert(strstr(m.metadata, "\"general.architecture\":\"llama\""), "%s", m.metadata);
    cr_assert(strstr(m.metadata, "\"llama.block_count\":\"5\""), "%s", m.metadata);
    cr_assert(strstr(m.metadata, "\"source_format\":\"gguf\""), "%s", m.metadata);
    cr_assert(strstr(m.metadata, "[\"tokenizer.ggml.tokens\",\"[string]\",[\"a\",\"b\"]]"), "%s",
              m.metadata);
    qs_txn_end(tx);
  }
}

Test(import_formats, gguf_q8_0_and_q4_0_dequantize_like_ggml) {
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, 2);
  qt_put_u64(&b, 0);
  qt_put_gstr(&b, "q8");
  qt_put_u32(&b, 2);
  qt_put_u64(&b, 64);
  qt_put_u64(&b, 2);
  qt_put_u32(&b, 8);
  qt_put_u64(&b, 0);
  qt_put_gstr(&b, "q4");
  qt_put_u32(&b, 1);
  qt_put_u64(&b, 32);
  qt_put_u32(&b, 2);
  qt_put_u64(&b, 160); /* 4 blocks x 34 = 136, padded to 160 */
  pad(&b, 32);
  float want8[128], want4[32];
  for (int blk = 0; blk < 4; blk++) {
    uint16_t d = qc_f32_to_f16(0.01f * (float)(blk + 1));
    qt_put(&b, &d, 2);
    for (int j = 0; j < 32; j++) {
      int8_t q = (int8_t)(j * 7 - 100 + blk);
      qt_put(&b, &q, 1);
      want8[blk * 32 + j] = (float)q * qc_f16_to_f32(d);
    }
  }
  pad(&b, 32);
  uint16_t d4 = qc_f32_to_f16(0.125f);
  qt_put(&b, &d4, 2);
  for (int j = 0; j < 16; j++) {
    uint8_t q = (uint8_t)((j & 15) | ((15 - j) << 4));
    qt_put(&b, &q, 1);
    want4[j] = (float)((q & 15) - 8) * qc_f16_to_f32(d4);
    want4[j + 16] = (float)((q >> 4) - 8) * qc_f16_to_f32(d4);
  }
  char p[256];
  snprintf(p, sizeof p, "%s/q.gguf", dir);
  cr_assert_eq(qt_write(p, b.p, b.n), 0);
  free(b.p);
  /* The default policy stores the dequantized values exactly (f32), whatever --codec asks. */
  cr_assert_eq(import(p, "q", QC_QINS8, 0), 0, "%s", qs_error());
  qs_tensor t;
  float *x0 = read_tensor("q", "q8", &t);
  cr_assert_eq(t.codec, QC_F32);
  cr_assert_eq(t.src_dtype, QS_DT_Q8_0);
  cr_assert_eq(memcmp(x0, want8, sizeof want8), 0);
  free(x0);
  cr_assert_eq(import(p, "q", QC_F32, 1), 0, "%s", qs_error());
  float *x = read_tensor("q", "q8", &t);
  cr_assert(t.shape[0] == 2 && t.shape[1] == 64);
  cr_assert_eq(t.src_bytes, 136);
  cr_assert_eq(memcmp(x, want8, sizeof want8), 0);
  free(x);
  x = read_tensor("q", "q4", &t);
  cr_assert_eq(t.src_bytes, 18);
  cr_assert_eq(memcmp(x, want4, sizeof want4), 0);
  free(x);
}

static void npy(const char *path, int major, const char *descr, const char *shape,
                const void *data, size_t n) {
  qt_buf b = {0};
  qt_put(&b, "\x93NUMPY", 6);
  uint8_t v[2] = {(uint8_t)major, 0};
  qt_put(&b, v, 2);
  char h[256];
  int hl = snprintf(h, sizeof h, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shape);
  size_t pre = major == 1 ? 10 : 12;
  while ((pre + (size_t)hl + 1) % 64) h[hl++] = ' ';
  h[hl++] = '\n';
  if (major == 1) {
    uint16_t l = (uint16_t)hl;
    qt_put(&b, &l, 2);
  } else {
    qt_put_u32(&b, (uint32_t)hl);
  }
  qt_put(&b, h, (size_t)hl);
  qt_put(&b, data, n);
  cr_assert_eq(qt_write(path, b.p, b.n), 0);
  free(b.p);
}

Test(import_formats, npy_versions_files_and_directories) {
  float f[6] = {1, -2, 3.5f, 0, 1e-3f, 7};
  uint16_t h[4];
  for (int i = 0; i < 4; i++) h[i] = qc_f32_to_f16((float)i - 1.5f);
  int32_t iv[3] = {-1, 0, 70000};
  char p[300], d[128];
  snprintf(d, sizeof d, "%s/npys", dir);
  mkdir(d, 0755);
  snprintf(p, sizeof p, "%s/a.npy", d);
  npy(p, 1, "<f4", "(2, 3)", f, sizeof f);
  snprintf(p, sizeof p, "%s/b.npy", d);
  npy(p, 2, "<f2", "(4,)", h, sizeof h);
  snprintf(p, sizeof p, "%s/c.npy", d);
  npy(p, 3, "<i4", "(3,)", iv, sizeof iv);
  snprintf(p, sizeof p, "%s/s.npy", dir);
  npy(p, 1, "<f4", "()", f, 4);
  cr_assert_eq(import(d, NULL, QC_F32, 0), 0, "%s", qs_error());
  cr_assert_eq(import(p, NULL, -1, 0), 0, "%s", qs_error());
  qs_tensor t;
  float *x = read_tensor("npys", "a", &t);
  cr_assert(t.ndim == 2 && t.shape[0] == 2 && t.shape[1] == 3);
  cr_assert_eq(memcmp(x, f, sizeof f), 0);
  free(x);
  x = read_tensor("npys", "b", &t);
  for (int i = 0; i < 4; i++) cr_assert_eq(x[i], (float)i - 1.5f);
  free(x);
  qs_txn *tx;
  cr_assert_eq(qs_txn_begin(st, &tx), 0);
  cr_assert_eq(qs_tensor_get(tx, "npys", "c", &t), 0);
  cr_assert_eq(t.codec, QS_RAW);
  int32_t got[3];
  cr_assert_eq(qs_tensor_read(tx, &t, NULL, QC_DT_F32, 0, 3, got), 0);
  cr_assert_eq(memcmp(got, iv, sizeof iv), 0);
  /* A scalar: 0 dims, 1 element, f32 by policy. */
  cr_assert_eq(qs_tensor_get(tx, "s", "s", &t), 0);
  cr_assert_eq(t.ndim, 0);
  cr_assert_eq(t.n_elem, 1);
  cr_assert_eq(t.codec, QC_F32);
  qs_txn_end(tx);
}

Test(import_formats, sharded_safetensors_with_unaligned_data) {
  char d[256], p[300];
  snprintf(d, sizeof d, "%s/llm", dir);
  mkdir(d, 0755);
  /* Odd sizes make every later tensor's data unaligned in the file. */
  uint8_t u8[3] = {1, 2, 3};
  float a[5 * 7], bv[9];
  uint16_t c[4 * 6];
  for (int i = 0; i < 35; i++) a[i] = (float)i / 3;
  for (int i = 0; i < 9; i++) bv[i] = (float)-i;
  for (int i = 0; i < 24; i++) c[i] = qc_f32_to_bf16((float)i * 0.5f);
  qt_tensor s1[2] = {{"odd", QS_ST_U8, 1, {3}, u8, 3}, {"a", QS_ST_F32, 2, {5, 7}, a, sizeof a}};
  qt_tensor s2[2] = {{"b", QS_ST_F32, 1, {9}, bv, sizeof bv}, {"c", QS_ST_BF16, 2, {4, 6}, c, sizeof c}};
  snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", d);
  cr_assert_eq(qt_st_write(p, s1, 2, "{\"format\":\"pt\"}"), 0);
  snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", d);
  cr_assert_eq(qt_st_write(p, s2, 2, "{\"format\":\"pt\"}"), 0);
  snprintf(p, sizeof p, "%s/model.safetensors.index.json", d);
  const char *ix = "{\"metadata\":{\"total_size\":999},\"weight_map\":{"
                   "\"odd\":\"model-00001-of-00002.safetensors\",\"a\":\"model-00001-of-00002.safetensors\","
                   "\"b\":\"model-00002-of-00002.safetensors\",\"c\":\"model-00002-of-00002.safetensors\"}}";
  cr_assert_eq(qt_write(p, ix, strlen(ix)), 0);
  qs_import_result r;
  qs_import_opts o;
  qs_import_opts_init(&o);
  o.codec = QC_F32;
  cr_assert_eq(qs_import_path(st, d, &o, &r), 0, "%s", qs_error());
  cr_assert_str_eq(r.model, "llm");
  cr_assert_eq(r.n_tensors, 4);
  cr_assert_eq(r.src_bytes, 3 + sizeof a + sizeof bv + sizeof c);
  qs_tensor t;
  float *x = read_tensor("llm", "a", &t);
  cr_assert_eq(memcmp(x, a, sizeof a), 0);
  free(x);
  x = read_tensor("llm", "c", &t);
  for (int i = 0; i < 24; i++) cr_assert_eq(x[i], (float)i * 0.5f);
  free(x);
  qs_txn *tx;
  qs_model m;
  cr_assert_eq(qs_txn_begin(st, &tx), 0);
  cr_assert_eq(qs_model_get(tx, "llm", &m), 0);
  cr_assert_str_eq(m.metadata, "{\"format\":\"pt\"}");
  qs_txn_end(tx);
  /* The index file itself may be given too; --model renames. */
  o.model = "llm2";
  cr_assert_eq(qs_import_path(st, p, &o, &r), 0, "%s", qs_error());
  cr_assert_eq(r.n_tensors, 4);
}

Test(import_formats, default_policy_reports_snr_of_matrices) {
  char p[256];
  snprintf(p, sizeof p, "%s/p.safetensors", dir);
  static float w[128 * 256];
  float n[256];
  qt_fill_gauss(w, 128 * 256, 11, 0.02f);
  qt_fill_gauss(n, 256, 12, 1.0f);
  qt_tensor t[2] = {{"w", QS_ST_F32, 2, {128, 256}, w, sizeof w}, {"n", QS_ST_F32, 1, {256}, n, sizeof n}};
  cr_assert_eq(qt_st_write(p, t, 2, NULL), 0);
  qs_import_result r;
  cr_assert_eq(qs_import_path(st, p, NULL, &r), 0, "%s", qs_error());
  cr_assert_gt(r.snr_db_2d, 40, "SNR %.2f", r.snr_db_2d);
  cr_assert_lt(r.snr_db_2d, 80);
  qs_tensor ten;
  float *x = read_tensor("p", "n", &ten);
  cr_assert_eq(ten.codec, QC_F32);
  cr_assert_eq(memcmp(x, n, sizeof n), 0);
  free(x);
  x = read_tensor("p", "w", &ten);
  cr_assert_eq(ten.codec, QC_QINS8);
  double s2 = 0, e2 = 0;
  for (int i = 0; i < 128 * 256; i++) {
    s2 += (double)w[i] * w[i];
    e2 += ((double)w[i] - x[i]) * ((double)w[i] - x[i]);
  }
  cr_assert(fabs(10 * log10(s2 / e2) - ten.snr_db) < 0.01, "recorded SNR %.3f, measured %.3f",
            ten.snr_db, 10 * log10(s2 / e2));
  free(x);
}

Test(import_formats, threaded_encoding_gives_the_same_store_as_inline) {
  char p[256];
  snprintf(p, sizeof p, "%s/big.safetensors", dir);
  uint64_t rows = 8000, cols = 1024; /* 32.8 MB f32: streamed, 3 qins8 chunks */
  float *w = malloc(rows * cols * 4);
  qt_fill_gauss(w, rows * cols, 21, 0.03f);
  qt_tensor t[1] = {{"w", QS_ST_F32, 2, {rows, cols}, w, rows * cols * 4}};
  cr_assert_eq(qt_st_write(p, t, 1, NULL), 0);
  free(w);
  const char *threads[3] = {"1", "2", "4"};
  qs_tensor ten[3];
  qs_tensor_cost cost[3];
  for (int i = 0; i < 3; i++) {
    setenv("QINS_IMPORT_THREADS", threads[i], 1);
    char model[8];
    snprintf(model, sizeof model, "t%s", threads[i]);
    cr_assert_eq(import(p, model, -1, 0), 0, "%s", qs_error());
    qs_txn *tx;
    cr_assert_eq(qs_txn_begin(st, &tx), 0);
    cr_assert_eq(qs_tensor_get(tx, model, "w", &ten[i]), 0);
    cr_assert_eq(qs_tensor_cost_get(tx, &ten[i], &cost[i]), 0);
    qs_txn_end(tx);
  }
  cr_assert_geq(ten[0].n_chunks, 3);
  for (int i = 1; i < 3; i++) {
    cr_assert_eq(cost[i].checksum, cost[0].checksum, "%s threads: other bytes", threads[i]);
    cr_assert_eq(ten[i].snr_db, ten[0].snr_db);
    cr_assert_eq(ten[i].max_err, ten[0].max_err);
    cr_assert_eq(ten[i].stored_bytes, ten[0].stored_bytes);
  }
}
