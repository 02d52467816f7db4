/* SPDX-License-Identifier: MIT */
/*
 * codec_vectors.c — the conformance vectors of ../shared/docs/qins-vectors.json (QINS.md): seed-log
 * (codes exact, decoded within 1e-6 relative), seed-rational (exact), qins8 decode (exact), qins16
 * (exponent, codes and decode exact) and the CRC-32 of qins16's mantissa table. Decodes are checked
 * with every kernel this CPU has. The file is found through $QINS_SHARED (default ../shared).
 */
#include <criterion/criterion.h>

#include "codec_test.h"
#include "json.h"
#include "qins.h"

static qs_json *vec_root;
static char *vec_text;

static void vec_load(void) {
  char path[1024];
  size_t len;
  snprintf(path, sizeof path, "%s/docs/qins-vectors.json", ct_shared());
  vec_text = ct_slurp(path, &len);
  if (!vec_text) cr_skip_test("qins-vectors.json not found at %s (set QINS_SHARED)", path);
  char err[256];
  cr_assert_eq(qs_json_parse(vec_text, len, &vec_root, err, sizeof err), 0, "%s", err);
}
static void vec_free(void) {
  qs_json_free(vec_root);
  free(vec_text);
}

static const qs_json *sect(const char *name) {
  const qs_json *s = qs_json_get(vec_root, name);
  cr_assert(s && s->type == QS_JSON_OBJECT, "section %s", name);
  return s;
}
/* Array member `key` of obj as int64 values; returns its length. */
static size_t ints(const qs_json *obj, const char *key, int64_t *out, size_t cap) {
  const qs_json *a = qs_json_get(obj, key);
  cr_assert(a && a->type == QS_JSON_ARRAY && a->len <= cap, "array %s", key);
  for (size_t i = 0; i < a->len; i++) {
    cr_assert(a->items[i].num_flags & QS_JSON_IS_I64, "%s[%zu] not an integer", key, i);
    out[i] = a->items[i].i64;
  }
  return a->len;
}
static int64_t num(const qs_json *obj, const char *key) {
  const qs_json *v = qs_json_get(obj, key);
  cr_assert(v && (v->num_flags & QS_JSON_IS_I64), "number %s", key);
  return v->i64;
}

static const char *const kernels[] = {"ref", "avx2", "avx512"};

TestSuite(codec_vectors, .init = vec_load, .fini = vec_free);

/* QINS.md §seed-log */
Test(codec_vectors, seed_log_codes_exact_decode_close) {
  const qs_json *s = sect("seed-log");
  int64_t in[64], sign[64], stored[64], dec[64];
  size_t n = ints(s, "input", in, 64);
  cr_assert_eq(ints(s, "sign", sign, 64), n);
  cr_assert_eq(ints(s, "stored", stored, 64), n);
  cr_assert_eq(ints(s, "decoded", dec, 64), n);
  float w[64];
  for (size_t i = 0; i < n; i++) w[i] = ct_float((uint32_t)in[i]);
  qc_params p;
  cr_assert_eq(qc_fit_tensor(QC_SEED_LOG, n, 1, w, NULL, &p, NULL), 0);
  cr_assert_eq(ct_bits(p.log_min), (uint32_t)num(s, "log_min"));
  cr_assert_eq(ct_bits(p.log_max), (uint32_t)num(s, "log_max"));
  uint8_t chunk[128];
  cr_assert_eq(qc_chunk_bytes(QC_SEED_LOG, n, 1, NULL), 2 * n);
  cr_assert_eq(qc_encode(&p, n, 1, w, chunk, NULL, NULL), 0);
  for (size_t i = 0; i < n; i++) {
    cr_assert_eq((int8_t)chunk[i], sign[i], "sign[%zu]", i);
    cr_assert_eq(chunk[n + i], stored[i], "stored[%zu]", i);
  }
  for (size_t k = 0; k < 3; k++) {
    if (!qc_kernel_available(kernels[k])) continue;
    float out[64];
    cr_assert_eq(qc_decode_with(kernels[k], &p, n, 1, chunk, 0, n, QC_DT_F32, out), 0);
    for (size_t i = 0; i < n; i++) {
      float want = ct_float((uint32_t)dec[i]);
      cr_assert(fabsf(out[i] - want) <= 1e-6f * fabsf(want), "%s: decoded[%zu] %a want %a",
                kernels[k], i, out[i], want);
    }
  }
}

/* QINS.md §seed-rational */
Test(codec_vectors, seed_rational_exact) {
  const qs_json *s = sect("seed-rational");
  int64_t in[64], q[64], dec[64];
  size_t n = ints(s, "input", in, 64);
  cr_assert_eq(ints(s, "q", q, 64), n);
  cr_assert_eq(ints(s, "decoded", dec, 64), n);
  float w[64];
  for (size_t i = 0; i < n; i++) w[i] = ct_float((uint32_t)in[i]);
  qc_fit_opts o = {.alpha = ct_float((uint32_t)num(s, "alpha"))};
  qc_params p;
  cr_assert_eq(qc_fit_tensor(QC_SEED_RATIONAL, n, 1, w, &o, &p, NULL), 0);
  uint8_t chunk[64];
  cr_assert_eq(qc_encode(&p, n, 1, w, chunk, NULL, NULL), 0);
  for (size_t i = 0; i < n; i++) cr_assert_eq(chunk[i], q[i], "q[%zu]", i);
  for (size_t k = 0; k < 3; k++) {
    if (!qc_kernel_available(kernels[k])) continue;
    float out[64];
    cr_assert_eq(qc_decode_with(kernels[k], &p, n, 1, chunk, 0, n, QC_DT_F32, out), 0);
    for (size_t i = 0; i < n; i++)
      cr_assert_eq(ct_bits(out[i]), (uint32_t)dec[i], "%s: decoded[%zu]", kernels[k], i);
  }
}

/* QINS.md §qins8, decode (normative) */
Test(codec_vectors, qins8_decode_exact) {
  const qs_json *s = sect("qins8-decode");
  int64_t tab[128], sc[8], codes[64], dec[64];
  cr_assert_eq(num(s, "block"), QC_QINS8_BLOCK);
  cr_assert_eq(ints(s, "table", tab, 128), 128);
  size_t nb = ints(s, "scales_fp16", sc, 8);
  size_t n = ints(s, "codes", codes, 64);
  cr_assert_eq(ints(s, "decoded", dec, 64), n);
  cr_assert_eq(nb, (n + 31) / 32);
  qc_params p;
  uint8_t ser[QC_PARAMS_MAX];
  memset(&p, 0, sizeof p);
  p.codec = QC_QINS8;
  for (int m = 0; m < 128; m++) p.table[m] = ct_float((uint32_t)tab[m]);
  qc_params_write(&p, ser); /* the table must pass params validation */
  cr_assert_eq(qc_params_read(QC_QINS8, ser, qc_params_size(QC_QINS8), &p), 0);
  uint8_t chunk[2 * 8 + 64];
  for (size_t b = 0; b < nb; b++) chunk[2 * b] = (uint8_t)sc[b], chunk[2 * b + 1] = (uint8_t)(sc[b] >> 8);
  for (size_t i = 0; i < n; i++) chunk[2 * nb + i] = (uint8_t)codes[i];
  cr_assert_eq(qc_chunk_validate(&p, n, 1, chunk), 0);
  for (size_t k = 0; k < 3; k++) {
    if (!qc_kernel_available(kernels[k])) continue;
    float out[64];
    cr_assert_eq(qc_decode_with(kernels[k], &p, n, 1, chunk, 0, n, QC_DT_F32, out), 0);
    for (size_t i = 0; i < n; i++)
      cr_assert_eq(ct_bits(out[i]), (uint32_t)dec[i], "%s: decoded[%zu]", kernels[k], i);
  }
}

/* QINS.md §qins16: encode and decode exact */
Test(codec_vectors, qins16_codes_and_decode_exact) {
  const qs_json *s = sect("qins16");
  int64_t in[64], codes[64], dec[64];
  cr_assert_eq(num(s, "block"), QC_QINS16_BLOCK);
  size_t n = ints(s, "input", in, 64);
  cr_assert_eq(ints(s, "codes", codes, 64), n);
  cr_assert_eq(ints(s, "decoded", dec, 64), n);
  float w[64];
  for (size_t i = 0; i < n; i++) w[i] = ct_float((uint32_t)in[i]);
  qc_params p;
  cr_assert_eq(qc_fit_tensor(QC_QINS16, n, 1, w, NULL, &p, NULL), 0);
  uint8_t chunk[1 + 128];
  cr_assert_eq(qc_chunk_bytes(QC_QINS16, n, 1, NULL), 1 + 2 * n);
  cr_assert_eq(qc_encode(&p, n, 1, w, chunk, NULL, NULL), 0);
  cr_assert_eq((int8_t)chunk[0], num(s, "scale_exponent"));
  for (size_t i = 0; i < n; i++)
    cr_assert_eq(chunk[1 + 2 * i] | chunk[2 + 2 * i] << 8, codes[i], "code[%zu]", i);
  for (size_t k = 0; k < 3; k++) {
    if (!qc_kernel_available(kernels[k])) continue;
    float out[64];
    cr_assert_eq(qc_decode_with(kernels[k], &p, n, 1, chunk, 0, n, QC_DT_F32, out), 0);
    for (size_t i = 0; i < n; i++)
      cr_assert_eq(ct_bits(out[i]), (uint32_t)dec[i], "%s: decoded[%zu]", kernels[k], i);
  }
}

/* QINS.md §qins16: CRC-32 of MT's 8192 little-endian bytes */
Test(codec_vectors, qins16_mantissa_crc) {
  const float *mt = qc_qins16_mantissa();
  uint32_t crc = 0xFFFFFFFFu;
  for (int r = 0; r < 2048; r++) {
    uint32_t v = ct_bits(mt[r]);
    for (int b = 0; b < 4; b++) {
      crc ^= (v >> (8 * b)) & 0xFF;
      for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
    }
  }
  crc ^= 0xFFFFFFFFu;
  cr_assert_eq(crc, (uint32_t)num(vec_root, "qins16-mantissa-table-crc32"));
  cr_assert_eq(crc, 2116257167u);
}
