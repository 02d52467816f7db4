/* SPDX-License-Identifier: MIT */
/*
 * import_ecosystem.c — the importer on files as they come from Hugging Face, mlx and llama.cpp
 * (issue 15; store.h §Importers): "__metadata__": null, files sniffed by content (Git LFS
 * pointers, zips, .npz, pickles named in the error; formats found by magic, not extension),
 * every GGUF block-quantized type dequantized bit for bit against an independent dequantizer
 * written here from ggml's block layouts, SNR against the true source values (f64 narrowed to
 * f32), and the default policy for 1-D f16/bf16 tensors. Every input is generated here.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "import_test.h"

TestSuite(import_ecosystem, .init = setup, .fini = teardown, .timeout = 120);

static char *model_metadata(const char *model) {
  qs_txn *t;
  qs_model m;
  cr_assert_eq(qs_txn_begin(st, &t), 0);
  cr_assert_eq(qs_model_get(t, model, &m), 0, "%s", qs_error());
  char *md = strdup(m.metadata);
  qs_txn_end(t);
  return md;
}

static void path_of(char *p, size_t cap, const char *name) { snprintf(p, cap, "%s/%s", dir, name); }

/* ---------------------------------------------------------------------------------------------
 * safetensors "__metadata__": null; sniffing */
Test(import_ecosystem, safetensors_metadata_null_is_no_metadata) {
  float w[6] = {1, 2, 3, 4, 5, 6};
  qt_tensor t = {"lora_a", QS_ST_F32, 2, {2, 3}, w, sizeof w};
  char p[256];
  path_of(p, sizeof p, "adapters.safetensors");
  cr_assert_eq(qt_st_write(p, &t, 1, "null"), 0);
  cr_assert_eq(import(p, "ad", QC_F32, 0), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("ad", "lora_a", &ten);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
  char *md = model_metadata("ad");
  cr_assert_null(strstr(md, "null"), "%s", md);
  free(md);
  /* Any other non-object is still refused, naming the key. */
  path_of(p, sizeof p, "bad.safetensors");
  cr_assert_eq(qt_st_write(p, &t, 1, "[1]"), 0);
  cr_assert_eq(import(p, "bad", QC_F32, 0), QINS_EFORMAT);
  cr_assert(strstr(qs_error(), "__metadata__"), "%s", qs_error());
}

static void expect_named(const char *name, const void *bytes, size_t n, const char *what,
                         const char *todo) {
  char p[256];
  path_of(p, sizeof p, name);
  cr_assert_eq(qt_write(p, bytes, n), 0);
  int rc = import(p, "x", -1, 0);
  cr_assert(rc != 0, "%s imported", name);
  cr_assert(strstr(qs_error(), p), "%s", qs_error());
  cr_assert(strstr(qs_error(), what), "%s: want \"%s\" in: %s", name, what, qs_error());
  cr_assert(strstr(qs_error(), todo), "%s: want \"%s\" in: %s", name, todo, qs_error());
  cr_assert_null(strstr(qs_error(), "header length"), "%s", qs_error());
}

/* A zip's first local file header naming `member` (enough for the sniffer; the rest is junk). */
static size_t zip_head(uint8_t *b, const char *member) {
  memset(b, 0, 30);
  memcpy(b, "PK\x03\x04", 4);
  size_t nl = strlen(member);
  b[26] = (uint8_t)nl;
  memcpy(b + 30, member, nl);
  memset(b + 30 + nl, 0x5A, 64);
  return 30 + nl + 64;
}

Test(import_ecosystem, foreign_files_are_named_with_what_to_do) {
  const char *lfs = "version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a2146c0f2e8f1c5f0b7d1d3b4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6\n"
                    "size 1234567\n";
  expect_named("model.safetensors", lfs, strlen(lfs), "Git LFS pointer", "fetch the real file");
  uint8_t z[256];
  size_t zn = zip_head(z, "archive/data.pkl");
  expect_named("pytorch_model.bin", z, zn, "zip archive", "convert it to safetensors");
  zn = zip_head(z, "weights.npy");
  expect_named("arrays.npz", z, zn, ".npz archive", "unpack it");
  zn = zip_head(z, "weights.npy"); /* found by content whatever the name */
  expect_named("arrays.safetensors", z, zn, ".npz archive", "unpack it");
  const uint8_t pk[] = {0x80, 0x02, 0x63, 0x63, 0x6f, 0x6c, 0x6c, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e};
  expect_named("old.bin", pk, sizeof pk, "pickle", "convert it to safetensors");
  /* An LFS pointer as a shard of an index is named too. */
  char p[256];
  path_of(p, sizeof p, "sharded");
  cr_assert_eq(mkdir(p, 0700), 0);
  path_of(p, sizeof p, "sharded/model-00001-of-00001.safetensors");
  cr_assert_eq(qt_write(p, lfs, strlen(lfs)), 0);
  path_of(p, sizeof p, "sharded/model.safetensors.index.json");
  const char *idx = "{\"weight_map\":{\"w\":\"model-00001-of-00001.safetensors\"}}";
  cr_assert_eq(qt_write(p, idx, strlen(idx)), 0);
  path_of(p, sizeof p, "sharded");
  cr_assert_neq(import(p, "x", -1, 0), 0);
  cr_assert(strstr(qs_error(), "Git LFS pointer"), "%s", qs_error());
  /* So is one in a directory of .npy files. */
  path_of(p, sizeof p, "arrays");
  cr_assert_eq(mkdir(p, 0700), 0);
  path_of(p, sizeof p, "arrays/w.npy");
  cr_assert_eq(qt_write(p, lfs, strlen(lfs)), 0);
  path_of(p, sizeof p, "arrays");
  cr_assert_neq(import(p, "x", -1, 0), 0);
  cr_assert(strstr(qs_error(), "arrays/w.npy: this is a Git LFS pointer"), "%s", qs_error());
  /* A directory holding only a PyTorch checkpoint says so. */
  path_of(p, sizeof p, "hf");
  cr_assert_eq(mkdir(p, 0700), 0);
  path_of(p, sizeof p, "hf/pytorch_model.bin");
  cr_assert_eq(qt_write(p, z, zn), 0);
  path_of(p, sizeof p, "hf");
  cr_assert_neq(import(p, "x", -1, 0), 0);
  cr_assert(strstr(qs_error(), "PyTorch .bin/.pt") && strstr(qs_error(), "convert"), "%s",
            qs_error());
}

Test(import_ecosystem, formats_are_found_by_magic_not_extension) {
  float w[4] = {1, -2, 3, -4};
  qt_tensor t = {"w", QS_ST_F32, 1, {4}, w, sizeof w};
  char p[256];
  path_of(p, sizeof p, "model.gguf"); /* safetensors under a GGUF name */
  cr_assert_eq(qt_st_write(p, &t, 1, NULL), 0);
  cr_assert_eq(import(p, "st", QC_F32, 0), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("st", "w", &ten);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
  /* A GGUF named .bin. */
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, 1);
  qt_put_u64(&b, 0);
  qt_put_gstr(&b, "g");
  qt_put_u32(&b, 1);
  qt_put_u64(&b, 4);
  qt_put_u32(&b, 0);
  qt_put_u64(&b, 0);
  while (b.n % 32) qt_put(&b, "\0", 1);
  qt_put(&b, w, sizeof w);
  path_of(p, sizeof p, "model.bin");
  cr_assert_eq(qt_write(p, b.p, b.n), 0);
  free(b.p);
  cr_assert_eq(import(p, "gg", QC_F32, 0), 0, "%s", qs_error());
  x = read_tensor("gg", "g", &ten);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
}

/* ---------------------------------------------------------------------------------------------
 * GGUF block types: an independent dequantizer, element by element from ggml's layouts (the
 * importer's works block by block in ggml's loop order; both must give the same bits). */
typedef struct qtype {
  uint32_t ggml;    /* ggml type id */
  const char *name; /* qins src_dtype name */
  int dt;           /* qs_dtype */
  unsigned bw, bb;  /* weights, bytes per block */
} qtype;

static const qtype qtypes[] = {
    {2, "q4_0", QS_DT_Q4_0, 32, 18},    {3, "q4_1", QS_DT_Q4_1, 32, 20},
    {6, "q5_0", QS_DT_Q5_0, 32, 22},    {7, "q5_1", QS_DT_Q5_1, 32, 24},
    {8, "q8_0", QS_DT_Q8_0, 32, 34},    {10, "q2_k", QS_DT_Q2_K, 256, 84},
    {11, "q3_k", QS_DT_Q3_K, 256, 110}, {12, "q4_k", QS_DT_Q4_K, 256, 144},
    {13, "q5_k", QS_DT_Q5_K, 256, 176}, {14, "q6_k", QS_DT_Q6_K, 256, 210},
    {15, "q8_k", QS_DT_Q8_K, 256, 292},
};
#define NQTYPES (sizeof qtypes / sizeof qtypes[0])

static float half_at(const uint8_t *p) { return qc_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

/* Scale j and min j (6 bits each) of Q4_K/Q5_K's 12 bytes: j < 4 in bytes j and j + 4; j >= 4 the
 * low nibble (scale) / high nibble (min) of byte j + 4 with the top 2 bits from bytes j - 4 / j. */
static void k4_scale(const uint8_t *q, int j, int *sc, int *m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

/* Q3_K's 16 signed scales through ggml's 32-bit mask arithmetic (kmask1 0x03030303, kmask2
 * 0x0f0f0f0f), a different route from the importer's per-scale bit picking. */
static void q3_scales(const uint8_t *s12, int8_t out[16]) {
  uint32_t a[4];
  memcpy(a, s12, 12);
  uint32_t tmp = a[2];
  a[2] = ((a[0] >> 4) & 0x0f0f0f0fu) | (((tmp >> 4) & 0x03030303u) << 4);
  a[3] = ((a[1] >> 4) & 0x0f0f0f0fu) | (((tmp >> 6) & 0x03030303u) << 4);
  a[0] = (a[0] & 0x0f0f0f0fu) | (((tmp >> 0) & 0x03030303u) << 4);
  a[1] = (a[1] & 0x0f0f0f0fu) | (((tmp >> 2) & 0x03030303u) << 4);
  uint8_t u[16];
  memcpy(u, a, 16);
  for (int i = 0; i < 16; i++) out[i] = (int8_t)(u[i] - 32);
}

static float ref_elem(int dt, const uint8_t *b, int i) {
  switch (dt) {
  case QS_DT_Q4_0: {
    int q = i < 16 ? b[2 + i] & 15 : b[2 + i - 16] >> 4;
    return (float)(q - 8) * half_at(b);
  }
  case QS_DT_Q4_1: {
    int q = i < 16 ? b[4 + i] & 15 : b[4 + i - 16] >> 4;
    return (float)q * half_at(b) + half_at(b + 2);
  }
  case QS_DT_Q5_0:
  case QS_DT_Q5_1: {
    int o = dt == QS_DT_Q5_1 ? 4 : 2;
    uint32_t qh = (uint32_t)b[o] | (uint32_t)b[o + 1] << 8 | (uint32_t)b[o + 2] << 16 |
                  (uint32_t)b[o + 3] << 24;
    int q = (i < 16 ? b[o + 4 + i] & 15 : b[o + 4 + i - 16] >> 4) | (int)((qh >> i) & 1) << 4;
    return dt == QS_DT_Q5_1 ? (float)q * half_at(b) + half_at(b + 2) : (float)(q - 16) * half_at(b);
  }
  case QS_DT_Q8_0: return (float)(int8_t)b[2 + i] * half_at(b);
  case QS_DT_Q2_K:
  case QS_DT_Q3_K: {
    int n = i / 128, r = i % 128, s = r / 32, h = (r % 32) / 16, k = r % 32;
    int is = n * 8 + s * 2 + h;
    if (dt == QS_DT_Q2_K) {
      int q = (b[16 + n * 32 + k] >> (2 * s)) & 3;
      float dl = half_at(b + 80) * (float)(b[is] & 15), ml = half_at(b + 82) * (float)(b[is] >> 4);
      return dl * (float)q - ml;
    }
    int8_t sc[16];
    q3_scales(b + 96, sc);
    int q = ((b[32 + n * 32 + k] >> (2 * s)) & 3) - ((b[k] >> (n * 4 + s)) & 1 ? 0 : 4);
    return half_at(b + 108) * (float)sc[is] * (float)q;
  }
  case QS_DT_Q4_K:
  case QS_DT_Q5_K: {
    int c = i / 64, sub = (i % 64) / 32, l = i % 32, sc, m;
    k4_scale(b + 4, 2 * c + sub, &sc, &m);
    int qsoff = dt == QS_DT_Q5_K ? 48 : 16;
    int q = sub ? b[qsoff + 32 * c + l] >> 4 : b[qsoff + 32 * c + l] & 15;
    if (dt == QS_DT_Q5_K && (b[16 + l] >> (2 * c + sub)) & 1) q += 16;
    float d1 = half_at(b) * (float)sc, m1 = half_at(b + 2) * (float)m;
    return d1 * (float)q - m1;
  }
  case QS_DT_Q6_K: {
    int n = i / 128, r = i % 128, g = r / 32, l = r % 32;
    uint8_t lo = b[64 * n + l + (g & 1 ? 32 : 0)];
    int q = ((g < 2 ? lo & 15 : lo >> 4) | (((b[128 + 32 * n + l] >> (2 * g)) & 3) << 4)) - 32;
    int8_t sc = (int8_t)b[192 + 8 * n + l / 16 + 2 * g];
    return half_at(b + 208) * (float)sc * (float)q;
  }
  case QS_DT_Q8_K: {
    float d;
    memcpy(&d, b, 4);
    return d * (float)(int8_t)b[4 + i];
  }
  }
  return NAN;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 11);
}

/* A random block whose fp16 (f32 for Q8_K) scales are finite and moderate. */
static void random_block(const qtype *q, uint8_t *b) {
  for (unsigned k = 0; k < q->bb; k++) b[k] = (uint8_t)rnd();
  float lo = (float)(rnd() % 1000 + 1) / 4096.0f;
  uint16_t h1 = qc_f32_to_f16(lo * ((rnd() & 1) ? 1 : -1)), h2 = qc_f32_to_f16((float)(rnd() % 997) / 8192.0f);
  int d_at = -1, m_at = -1;
  switch (q->dt) {
  case QS_DT_Q4_0: case QS_DT_Q5_0: case QS_DT_Q8_0: d_at = 0; break;
  case QS_DT_Q4_1: case QS_DT_Q5_1: case QS_DT_Q4_K: case QS_DT_Q5_K: d_at = 0; m_at = 2; break;
  case QS_DT_Q2_K: d_at = 80; m_at = 82; break;
  case QS_DT_Q3_K: d_at = 108; break;
  case QS_DT_Q6_K: d_at = 208; break;
  case QS_DT_Q8_K: memcpy(b, &lo, 4); break;
  }
  if (d_at >= 0) memcpy(b + d_at, &h1, 2);
  if (m_at >= 0) memcpy(b + m_at, &h2, 2);
}

Test(import_ecosystem, gguf_block_types_dequantize_bit_for_bit) {
  /* One tensor per type: ne = {2 * 256, 3} (row-major [3, 512]), random blocks. */
  const uint64_t row = 512, rows = 3;
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, NQTYPES);
  qt_put_u64(&b, 1);
  qt_put_gstr(&b, "general.file_type"); /* llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M */
  qt_put_u32(&b, 4);
  qt_put_u32(&b, 15);
  uint64_t off = 0, sizes[NQTYPES];
  for (size_t t = 0; t < NQTYPES; t++) {
    qt_put_gstr(&b, qtypes[t].name);
    qt_put_u32(&b, 2);
    qt_put_u64(&b, row);
    qt_put_u64(&b, rows);
    qt_put_u32(&b, qtypes[t].ggml);
    qt_put_u64(&b, off);
    sizes[t] = row * rows / qtypes[t].bw * qtypes[t].bb;
    off += (sizes[t] + 31) / 32 * 32;
  }
  float *want[NQTYPES];
  for (size_t t = 0; t < NQTYPES; t++) {
    while (b.n % 32) qt_put(&b, "\0", 1);
    want[t] = malloc(row * rows * sizeof(float));
    uint8_t blk[292];
    for (uint64_t k = 0; k < row * rows / qtypes[t].bw; k++) {
      random_block(&qtypes[t], blk);
      qt_put(&b, blk, qtypes[t].bb);
      for (unsigned i = 0; i < qtypes[t].bw; i++) want[t][k * qtypes[t].bw + i] = ref_elem(qtypes[t].dt, blk, (int)i);
    }
  }
  char p[256];
  path_of(p, sizeof p, "quants.gguf");
  cr_assert_eq(qt_write(p, b.p, b.n), 0);
  free(b.p);
  /* Default policy: exact f32 whatever --codec says; src_dtype the block type. */
  cr_assert_eq(import(p, "q", QC_QINS8, 0), 0, "%s", qs_error());
  for (size_t t = 0; t < NQTYPES; t++) {
    qs_tensor ten;
    float *x = read_tensor("q", qtypes[t].name, &ten);
    cr_assert_eq(ten.codec, QC_F32, "%s", qtypes[t].name);
    cr_assert_str_eq(qs_dtype_name(ten.src_dtype), qtypes[t].name);
    cr_assert_eq(ten.src_bytes, sizes[t], "%s", qtypes[t].name);
    cr_assert(ten.shape[0] == rows && ten.shape[1] == row);
    cr_assert(isinf(ten.snr_db), "%s: %g", qtypes[t].name, ten.snr_db);
    for (uint64_t i = 0; i < row * rows; i++) {
      uint32_t a, w;
      memcpy(&a, &x[i], 4);
      memcpy(&w, &want[t][i], 4);
      cr_assert_eq(a, w, "%s element %llu: %a, want %a", qtypes[t].name, (unsigned long long)i,
                   (double)x[i], (double)want[t][i]);
    }
    free(x);
  }
  /* Exported as GGUF: F32 tensors of the same values, general.file_type saying ALL_F32. */
  char q[256];
  path_of(q, sizeof q, "dequantized.gguf");
  cr_assert_eq(qs_export_gguf(st, "q", q, -1, NULL, NULL), 0, "%s", qs_error());
  cr_assert_eq(import(q, "q2", QC_F32, 0), 0, "%s", qs_error());
  char *md = model_metadata("q2");
  cr_assert(strstr(md, "[\"general.file_type\",\"u32\",0]"), "%s", md);
  free(md);
  for (size_t t = 0; t < NQTYPES; t++) {
    qs_tensor ten;
    float *x = read_tensor("q2", qtypes[t].name, &ten);
    cr_assert_eq(ten.src_dtype, QS_DT_F32);
    cr_assert_eq(memcmp(x, want[t], row * rows * sizeof(float)), 0, "%s", qtypes[t].name);
    free(x);
  }
  /* --allow-requant: the rules apply (qins8 for matrices); the source type is still named. */
  cr_assert_eq(import(p, "r", -1, 1), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("r", "q4_k", &ten);
  cr_assert_eq(ten.codec, QC_QINS8);
  cr_assert_eq(ten.src_dtype, QS_DT_Q4_K);
  cr_assert(isfinite(ten.snr_db) && ten.snr_db > 20, "%g", ten.snr_db);
  free(x);
  for (size_t t = 0; t < NQTYPES; t++) free(want[t]);
}

Test(import_ecosystem, gguf_unsupported_block_type_is_named) {
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, 1);
  qt_put_u64(&b, 0);
  qt_put_gstr(&b, "iq");
  qt_put_u32(&b, 1);
  qt_put_u64(&b, 256);
  qt_put_u32(&b, 23); /* IQ4_XS */
  qt_put_u64(&b, 0);
  while (b.n % 32) qt_put(&b, "\0", 1);
  uint8_t z[136] = {0};
  qt_put(&b, z, sizeof z);
  char p[256];
  path_of(p, sizeof p, "iq.gguf");
  cr_assert_eq(qt_write(p, b.p, b.n), 0);
  free(b.p);
  cr_assert_eq(import(p, "iq", -1, 1), QINS_EUNSUPPORTED);
  cr_assert(strstr(qs_error(), "IQ4_XS") && strstr(qs_error(), "Q4_K"), "%s", qs_error());
}

/* ---------------------------------------------------------------------------------------------
 * SNR against the true source values; the default policy for 1-D f16/bf16 */
static void snr_of(const double *src, const float *got, size_t n, double *snr, double *max_err) {
  double s = 0, e2 = 0, mx = 0;
  for (size_t i = 0; i < n; i++) {
    double e = fabs(src[i] - (double)got[i]);
    s += src[i] * src[i];
    e2 += e * e;
    if (e > mx) mx = e;
  }
  *snr = 10 * log10(s / e2);
  *max_err = mx;
}

Test(import_ecosystem, f64_sources_report_their_real_snr) {
  enum { R = 16, C = 64 };
  static double vec[C], mat[R * C];
  for (int i = 0; i < C; i++) vec[i] = sin(i * 0.37) * 3.0 + 1e-3 / 3.0;
  for (int i = 0; i < R * C; i++) mat[i] = cos(i * 0.011) * 0.05 + sin(i * 1.7) * 0.01;
  qt_tensor t[2] = {{"bias", QS_ST_F64, 1, {C}, vec, sizeof vec},
                    {"w", QS_ST_F64, 2, {R, C}, mat, sizeof mat}};
  char p[256];
  path_of(p, sizeof p, "f64.safetensors");
  cr_assert_eq(qt_st_write(p, t, 2, NULL), 0);
  qs_import_opts o;
  qs_import_opts_init(&o);
  qs_import_result res;
  cr_assert_eq(qs_import_path(st, p, &o, &res), 0, "%s", qs_error());
  qs_tensor ten;
  double want, want_max;
  /* 1-D f64 -> f32: not lossless; the SNR is that of the rounding to f32. */
  float *x = read_tensor("f64", "bias", &ten);
  cr_assert_eq(ten.codec, QC_F32);
  cr_assert_eq(ten.src_dtype, QS_DT_F64);
  snr_of(vec, x, C, &want, &want_max);
  cr_assert(isfinite(ten.snr_db) && ten.snr_db > 130 && ten.snr_db < 200, "%g", ten.snr_db);
  cr_assert(fabs(ten.snr_db - want) < 1e-9, "snr %.12g, want %.12g", ten.snr_db, want);
  cr_assert_eq(ten.max_err, want_max);
  free(x);
  cr_assert_eq(res.n_narrowed, 1);
  cr_assert_str_eq(res.narrowed_tensor, "bias");
  cr_assert(fabs(res.snr_db_narrowed - want) < 1e-9);
  /* 2-D f64 -> qins8: the codec's error measured against the f64 values. */
  x = read_tensor("f64", "w", &ten);
  cr_assert_eq(ten.codec, QC_QINS8);
  snr_of(mat, x, R * C, &want, &want_max);
  cr_assert(fabs(ten.snr_db - want) < 1e-9, "snr %.12g, want %.12g", ten.snr_db, want);
  cr_assert_eq(ten.max_err, want_max);
  free(x);
}

Test(import_ecosystem, half_vectors_keep_their_dtype_and_narrowing_shows) {
  enum { C = 64 };
  uint16_t h[C], bf[C], bfm[4 * C];
  float bfv[4 * C];
  for (int i = 0; i < C; i++) {
    h[i] = qc_f32_to_f16((float)i / 7 - 3);
    bf[i] = qc_f32_to_bf16((float)i * 1.001f - 20);
  }
  for (int i = 0; i < 4 * C; i++) {
    bfm[i] = qc_f32_to_bf16(1e-6f * (1 + (float)i / 37)); /* f16 subnormals: bits lost */
    bfv[i] = qc_bf16_to_f32(bfm[i]);
  }
  qt_tensor t[3] = {{"norm_h", QS_ST_F16, 1, {C}, h, sizeof h},
                    {"norm_bf", QS_ST_BF16, 1, {C}, bf, sizeof bf},
                    {"m_bf", QS_ST_BF16, 2, {4, C}, bfm, sizeof bfm}};
  char p[256];
  path_of(p, sizeof p, "half.safetensors");
  cr_assert_eq(qt_st_write(p, t, 3, NULL), 0);
  cr_assert_eq(import(p, "half", -1, 0), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("half", "norm_h", &ten);
  cr_assert_eq(ten.codec, QC_F16);
  cr_assert_lt(ten.stored_bytes, C * 4, "%llu", (unsigned long long)ten.stored_bytes);
  cr_assert(isinf(ten.snr_db) && ten.snr_db > 0);
  free(x);
  x = read_tensor("half", "norm_bf", &ten);
  cr_assert_eq(ten.codec, QC_BF16);
  cr_assert_lt(ten.stored_bytes, C * 4);
  free(x);
  /* bf16 asked as f16: a narrowing with its real SNR. */
  qs_codec_rule rule = {"m_bf", QC_F16};
  qs_import_opts o;
  qs_import_opts_init(&o);
  o.model = "half16";
  o.rules = &rule;
  o.n_rules = 1;
  qs_import_result res;
  cr_assert_eq(qs_import_path(st, p, &o, &res), 0, "%s", qs_error());
  x = read_tensor("half16", "m_bf", &ten);
  cr_assert_eq(ten.codec, QC_F16);
  double src[4 * C], want, want_max;
  for (int i = 0; i < 4 * C; i++) src[i] = bfv[i];
  snr_of(src, x, 4 * C, &want, &want_max);
  cr_assert(isfinite(ten.snr_db) && fabs(ten.snr_db - want) < 1e-6, "%g vs %g", ten.snr_db, want);
  cr_assert_eq(res.n_narrowed, 1);
  free(x);
}

/* ---------------------------------------------------------------------------------------------
 * Metadata: GGUF KVs with their types, HF directories, cache snapshot names */
static void kv_u32(qt_buf *b, const char *k, uint32_t ty, const void *v, size_t n) {
  qt_put_gstr(b, k);
  qt_put_u32(b, ty);
  qt_put(b, v, n);
}

/* A GGUF with a KV of every type (arrays included: a tokenizer) and two F32/F16 tensors. */
static size_t gguf_with_every_kv(const char *path) {
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, 2);
  qt_put_u64(&b, 15);
  uint8_t u8 = 200;
  int8_t i8 = -100;
  uint16_t u16 = 60000;
  int16_t i16 = -30000;
  uint32_t u32 = 4000000000u;
  int32_t i32 = -2000000000;
  float f32 = 1e-5f, finf = INFINITY;
  uint8_t bl = 1;
  uint64_t u64 = 18446744073709551615ull;
  int64_t i64 = -9223372036854775807ll - 1;
  double f64 = 0.1;
  kv_u32(&b, "general.architecture", 8, "\x05\0\0\0\0\0\0\0llama", 13);
  kv_u32(&b, "t.u8", 0, &u8, 1);
  kv_u32(&b, "t.i8", 1, &i8, 1);
  kv_u32(&b, "t.u16", 2, &u16, 2);
  kv_u32(&b, "t.i16", 3, &i16, 2);
  kv_u32(&b, "t.u32", 4, &u32, 4);
  kv_u32(&b, "t.i32", 5, &i32, 4);
  kv_u32(&b, "llama.rope.freq_base", 6, &f32, 4);
  kv_u32(&b, "t.f32_inf", 6, &finf, 4);
  kv_u32(&b, "t.bool", 7, &bl, 1);
  kv_u32(&b, "t.u64", 10, &u64, 8);
  kv_u32(&b, "t.i64", 11, &i64, 8);
  kv_u32(&b, "t.f64", 12, &f64, 8);
  qt_put_gstr(&b, "tokenizer.ggml.tokens");
  qt_put_u32(&b, 9);
  qt_put_u32(&b, 8);
  qt_put_u64(&b, 3);
  qt_put_gstr(&b, "<s>");
  qt_put_gstr(&b, "\"q\"\n");
  qt_put_gstr(&b, "\xe2\x96\x81the");
  qt_put_gstr(&b, "tokenizer.ggml.scores");
  qt_put_u32(&b, 9);
  qt_put_u32(&b, 6);
  qt_put_u64(&b, 3);
  float sc[3] = {0, -1.5f, -2.25f};
  qt_put(&b, sc, sizeof sc);
  /* Tensors in name order (export writes name order: the round trip is then byte-identical). */
  qt_put_gstr(&b, "a.weight");
  qt_put_u32(&b, 2);
  qt_put_u64(&b, 8);
  qt_put_u64(&b, 2);
  qt_put_u32(&b, 0);
  qt_put_u64(&b, 0);
  qt_put_gstr(&b, "b.norm");
  qt_put_u32(&b, 1);
  qt_put_u64(&b, 8);
  qt_put_u32(&b, 1);
  qt_put_u64(&b, 64);
  while (b.n % 32) qt_put(&b, "\0", 1);
  float a[16];
  for (int i = 0; i < 16; i++) a[i] = (float)i / 3 - 2;
  qt_put(&b, a, sizeof a);
  while (b.n % 32) qt_put(&b, "\0", 1);
  uint16_t h[8];
  for (int i = 0; i < 8; i++) h[i] = qc_f32_to_f16((float)i * 0.125f + 1);
  qt_put(&b, h, sizeof h);
  while (b.n % 32) qt_put(&b, "\0", 1);
  cr_assert_eq(qt_write(path, b.p, b.n), 0);
  size_t n = b.n;
  free(b.p);
  return n;
}

Test(import_ecosystem, gguf_metadata_keeps_every_kv_with_its_type) {
  char p[256];
  path_of(p, sizeof p, "kv.gguf");
  gguf_with_every_kv(p);
  cr_assert_eq(import(p, "kv", QC_F32, 0), 0, "%s", qs_error());
  char *md = model_metadata("kv");
  const char *want[] = {
      "\"general.architecture\":\"llama\"",     /* flat strings, as before */
      "\"llama.rope.freq_base\":\"9.99999975e-06\"",
      "\"gguf\":{\"version\":3,\"kv\":[[\"general.architecture\",\"string\",\"llama\"]",
      "[\"t.u8\",\"u8\",200]", "[\"t.i8\",\"i8\",-100]", "[\"t.u16\",\"u16\",60000]",
      "[\"t.i16\",\"i16\",-30000]", "[\"t.u32\",\"u32\",4000000000]",
      "[\"t.i32\",\"i32\",-2000000000]", "[\"llama.rope.freq_base\",\"f32\",9.99999975e-06]",
      "[\"t.f32_inf\",\"f32\",\"inf\"]", "[\"t.bool\",\"bool\",true]",
      "[\"t.u64\",\"u64\",18446744073709551615]", "[\"t.i64\",\"i64\",-9223372036854775808]",
      "[\"t.f64\",\"f64\",0.10000000000000001]",
      "[\"tokenizer.ggml.tokens\",\"[string]\",[\"<s>\",\"\\\"q\\\"\\u000a\",\"\xe2\x96\x81the\"]]",
      "[\"tokenizer.ggml.scores\",\"[f32]\",[0,-1.5,-2.25]]]}",
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
    cr_assert(strstr(md, want[i]), "want %s in %s", want[i], md);
  free(md);
}

static void put_text(const char *rel, const char *text) {
  char p[512];
  path_of(p, sizeof p, rel);
  cr_assert_eq(qt_write(p, text, strlen(text)), 0);
}

Test(import_ecosystem, hf_directory_keeps_its_json_files_and_snapshot_name) {
  char p[512];
  const char *parts[] = {"hub", "hub/models--acme--tiny-llama", "hub/models--acme--tiny-llama/snapshots",
                         "hub/models--acme--tiny-llama/snapshots/0123abcd"};
  for (int i = 0; i < 4; i++) {
    path_of(p, sizeof p, parts[i]);
    cr_assert_eq(mkdir(p, 0700), 0);
  }
  const char *snap = "hub/models--acme--tiny-llama/snapshots/0123abcd";
  float w[4] = {1, 2, 3, 4};
  qt_tensor t = {"model.norm.weight", QS_ST_F32, 1, {4}, w, sizeof w};
  snprintf(p, sizeof p, "%s/%s/model.safetensors", dir, snap);
  cr_assert_eq(qt_st_write(p, &t, 1, "{\"format\":\"pt\"}"), 0);
  char rel[256];
  snprintf(rel, sizeof rel, "%s/config.json", snap);
  put_text(rel, "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"hidden_size\": 64,\n"
                "  \"num_attention_heads\": 4\n}\n");
  snprintf(rel, sizeof rel, "%s/generation_config.json", snap);
  put_text(rel, "{\"bos_token_id\": 1, \"eos_token_id\": 2}");
  snprintf(rel, sizeof rel, "%s/tokenizer.json", snap);
  put_text(rel, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}}}");
  snprintf(p, sizeof p, "%s/%s", dir, snap);
  qs_import_opts o;
  qs_import_opts_init(&o);
  qs_import_result res;
  cr_assert_eq(qs_import_path(st, p, &o, &res), 0, "%s", qs_error());
  cr_assert_str_eq(res.model, "tiny-llama");
  char *md = model_metadata("tiny-llama");
  cr_assert(strstr(md, "\"format\":\"pt\""), "%s", md);
  cr_assert(strstr(md, "\"hf\":{\"config\":{\n  \"architectures\""), "%s", md);
  cr_assert(strstr(md, "\"generation_config\":{\"bos_token_id\": 1"), "%s", md);
  cr_assert(strstr(md, "\"tokenizer\":{\"model\""), "%s", md);
  free(md);
  /* A file in the snapshot is named after the repository too. */
  snprintf(p, sizeof p, "%s/%s/model.safetensors", dir, snap);
  cr_assert_eq(qs_import_path(st, p, &o, &res), 0, "%s", qs_error());
  cr_assert_str_eq(res.model, "tiny-llama");
  /* safetensors export keeps the string metadata only (the format's rule). */
  snprintf(p, sizeof p, "%s/out.safetensors", dir);
  cr_assert_eq(qs_export_safetensors(st, "tiny-llama", p, QC_DT_F32, NULL, NULL), 0, "%s", qs_error());
  size_t n;
  char *f = qt_read(p, &n);
  cr_assert(f && n > 8);
  cr_assert(memmem(f, n, "\"__metadata__\":{\"format\":\"pt\"}", 30), "%.*s", (int)n, f);
  free(f);
  /* A broken config.json is named. */
  snprintf(rel, sizeof rel, "%s/config.json", snap);
  put_text(rel, "{\"hidden_size\": 64,}");
  snprintf(p, sizeof p, "%s/%s", dir, snap);
  cr_assert_eq(qs_import_path(st, p, &o, &res), QINS_EFORMAT);
  cr_assert(strstr(qs_error(), "config.json: not valid JSON"), "%s", qs_error());
}

/* ---------------------------------------------------------------------------------------------
 * Export */
Test(import_ecosystem, gguf_round_trip_is_byte_identical) {
  char p[256], q[256];
  path_of(p, sizeof p, "kv.gguf");
  size_t n0 = gguf_with_every_kv(p);
  cr_assert_eq(import(p, "kv", QC_F32, 0), 0, "%s", qs_error());
  path_of(q, sizeof q, "again.gguf");
  cr_assert_eq(qs_export_gguf(st, "kv", q, -1, NULL, NULL), 0, "%s", qs_error());
  size_t n0r, n1;
  char *a = qt_read(p, &n0r), *b = qt_read(q, &n1);
  cr_assert_eq(n0r, n0);
  cr_assert_eq(n1, n0, "exported %zu bytes, source %zu", n1, n0);
  cr_assert_eq(memcmp(a, b, n0), 0, "the exported GGUF differs from the source");
  free(a);
  free(b);
  /* And it imports again to the same metadata. */
  cr_assert_eq(import(q, "kv2", QC_F32, 0), 0, "%s", qs_error());
  char *m1 = model_metadata("kv"), *m2 = model_metadata("kv2");
  cr_assert_str_eq(m1, m2);
  free(m1);
  free(m2);
  /* A model from safetensors exports its string metadata as string KVs. */
  float w[4] = {1, 2, 3, 4};
  qt_tensor t = {"w", QS_ST_F32, 2, {2, 2}, w, sizeof w};
  path_of(p, sizeof p, "st.safetensors");
  cr_assert_eq(qt_st_write(p, &t, 1, "{\"format\":\"pt\"}"), 0);
  cr_assert_eq(import(p, "st", QC_F32, 0), 0, "%s", qs_error());
  path_of(q, sizeof q, "st.gguf");
  cr_assert_eq(qs_export_gguf(st, "st", q, -1, NULL, NULL), 0, "%s", qs_error());
  cr_assert_eq(import(q, "st2", QC_F32, 0), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("st2", "w", &ten);
  cr_assert(ten.ndim == 2 && ten.shape[0] == 2 && ten.shape[1] == 2);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
  m1 = model_metadata("st2");
  cr_assert(strstr(m1, "[\"format\",\"string\",\"pt\"]"), "%s", m1);
  free(m1);
}

Test(import_ecosystem, metadata_over_the_bound_keeps_counts_and_names) {
  setenv("QINS_IMPORT_META_MAX", "300", 1);
  char p[256], q[256];
  path_of(p, sizeof p, "kv.gguf");
  gguf_with_every_kv(p);
  cr_assert_eq(import(p, "kv", QC_F32, 0), 0, "%s", qs_error());
  char *md = model_metadata("kv");
  cr_assert(strstr(md, "[\"tokenizer.ggml.tokens\",\"[string]\",null,3]"), "%s", md);
  cr_assert(strstr(md, "[\"tokenizer.ggml.scores\",\"[f32]\",null,3]]"), "%s", md);
  cr_assert(strstr(md, "[\"t.f64\",\"f64\",0.10000000000000001]"), "%s", md);
  free(md);
  path_of(q, sizeof q, "cut.gguf");
  cr_assert_eq(qs_export_gguf(st, "kv", q, -1, NULL, NULL), QINS_EUNSUPPORTED);
  cr_assert(strstr(qs_error(), "tokenizer.ggml.tokens") && strstr(qs_error(), "too large"), "%s",
            qs_error());
  cr_assert_neq(access(q, F_OK), 0);
  /* An HF file over the bound is named, not kept. */
  path_of(p, sizeof p, "hfdir");
  cr_assert_eq(mkdir(p, 0700), 0);
  float w[2] = {1, 2};
  qt_tensor t = {"w", QS_ST_F32, 1, {2}, w, sizeof w};
  path_of(p, sizeof p, "hfdir/model.safetensors");
  cr_assert_eq(qt_st_write(p, &t, 1, NULL), 0);
  char big[600];
  memset(big, ' ', sizeof big);
  memcpy(big, "{\"model\":{}}", 12);
  path_of(p, sizeof p, "hfdir/tokenizer.json");
  cr_assert_eq(qt_write(p, big, sizeof big), 0);
  put_text("hfdir/config.json", "{\"hidden_size\":8}");
  path_of(p, sizeof p, "hfdir");
  cr_assert_eq(import(p, "hfd", QC_F32, 0), 0, "%s", qs_error());
  md = model_metadata("hfd");
  cr_assert(strstr(md, "\"hf\":{\"config\":{\"hidden_size\":8}}"), "%s", md);
  cr_assert(strstr(md, "\"hf_omitted\":[\"tokenizer.json\"]"), "%s", md);
  free(md);
}
