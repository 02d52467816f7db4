/* SPDX-License-Identifier: MIT */
/*
 * codec_kernels.c — every SIMD decode kernel equals the scalar reference bit for bit (STYLE.md 14):
 * over every code value of every codec, lengths 0, 1, odd and every tail length, rows that are not
 * a multiple of the block size, ranges starting anywhere in a block, unaligned input and output
 * buffers, all three output dtypes, and the non-temporal path of large outputs. Also: a range
 * decode equals the same slice of a full decode. Kernels this CPU lacks are skipped by name.
 */
#include <criterion/criterion.h>

#include "codec_test.h"
#include "qins.h"

/* A valid chunk of codec c with pseudo-random scales and codes cycling through every value
 * (starting at `phase`), placed at byte offset `mis` of the returned allocation (*base to free). */
static uint8_t *make_chunk(const qc_params *p, uint64_t L, uint64_t R, uint64_t phase, int mis,
                           void **base) {
  uint64_t bytes = qc_chunk_bytes(p->codec, L, R, NULL), n = L * R;
  uint8_t *mem = malloc(bytes + 8), *c = mem + mis;
  *base = mem;
  uint64_t s = 12345 + phase;
  uint32_t B = qc_codec_block(p->codec);
  uint64_t bpr = B ? (L + B - 1) / B : 0, nb = bpr * R;
  switch (p->codec) {
  case QC_QINS8:
    for (uint64_t b = 0; b < nb; b++) { /* fp16 scales: zero, subnormal, normal, up to 65504 */
      uint16_t h = (uint16_t)(ct_next(&s) % 0x7C00);
      if (b % 7 == 0) h = 0x3C00 + (uint16_t)(b % 5);
      if (b % 11 == 0) h = (uint16_t)(b % 3); /* 0 and subnormals */
      c[2 * b] = (uint8_t)h, c[2 * b + 1] = (uint8_t)(h >> 8);
    }
    for (uint64_t i = 0; i < n; i++) c[2 * nb + i] = (uint8_t)(i + phase);
    break;
  case QC_QINS16:
    for (uint64_t r = 0; r < R; r++)
      for (uint64_t b = 0; b < bpr; b++) {
        uint64_t blk = r * bpr + b;
        int e = (int)(ct_next(&s) % 228) - 100; /* [-100, 127] */
        if (blk % 13 == 5) e = QC_QINS16_EZERO;
        if (blk % 17 == 1) e = 127;
        if (blk % 19 == 2) e = -100;
        c[blk] = (uint8_t)(int8_t)e;
        for (uint64_t i = r * L + b * B; i < r * L + b * B + B && i < (r + 1) * L; i++) {
          uint16_t code = (uint16_t)(i * 7 + phase); /* 7 is odd: every value over 65536 */
          if (e == QC_QINS16_EZERO) code = (i & 1) ? 0xFFFF : QC_QINS16_ZERO;
          c[nb + 2 * i] = (uint8_t)code, c[nb + 2 * i + 1] = (uint8_t)(code >> 8);
        }
      }
    break;
  case QC_SEED_LOG:
    for (uint64_t i = 0; i < n; i++) c[i] = (uint8_t)(int8_t)((int)((i + phase) % 3) - 1);
    for (uint64_t i = 0; i < n; i++) c[n + i] = (uint8_t)(i * 3 + phase);
    break;
  case QC_SEED_RATIONAL:
    for (uint64_t i = 0; i < n; i++) c[i] = (uint8_t)(i + phase);
    break;
  case QC_F32:
    for (uint64_t i = 0; i < n; i++) { /* random bits: NaN, Inf, subnormals included */
      uint32_t v = (uint32_t)ct_next(&s);
      if (i % 5 == 0) v &= 0x807FFFFFu;  /* subnormal */
      if (i % 9 == 0) v |= 0x7F800000u;  /* Inf / NaN */
      memcpy(c + 4 * i, &v, 4);
    }
    break;
  default: /* f16, bf16: every pattern */
    for (uint64_t i = 0; i < n; i++) c[2 * i] = (uint8_t)(i + phase), c[2 * i + 1] = (uint8_t)((i + phase) >> 8);
    break;
  }
  return c;
}

static qc_params params_of(qc_codec c) {
  qc_params p;
  memset(&p, 0, sizeof p);
  if (c == QC_QINS8) {
    /* a tensor-fitted table: entries an ulp apart where Lloyd squeezed them */
    float *w = ct_tensor(CT_LAPLACE_OUTLIERS, 64 * 1024, 3);
    qc_fit_opts o = {.table_min_elems = 1};
    cr_assert_eq(qc_fit_tensor(QC_QINS8, 1024, 64, w, &o, &p, NULL), 0);
    free(w);
  }
  p.codec = c;
  p.log_min = -18.42f, p.log_max = -1.5f;
  p.alpha = c == QC_SEED_RATIONAL ? 0.37f : 1.0f;
  return p;
}

static void every_geometry(qc_codec c) {
  qc_params p = params_of(c);
  static const uint64_t Ls[] = {1, 7, 31, 32, 33, 63, 64, 65, 100, 172, 261};
  int cmp = 0;
  for (size_t li = 0; li < sizeof Ls / sizeof *Ls; li++) {
    uint64_t L = Ls[li], R = 600 / L + 3, n = L * R;
    for (int mis = 0; mis < 2; mis++) {
      void *base;
      uint8_t *chunk = make_chunk(&p, L, R, li * 31, mis, &base);
      cmp += ct_same_as_ref(&p, L, R, chunk, 0, n);
      cmp += ct_same_as_ref(&p, L, R, chunk, 0, 0);
      /* every start offset within two blocks, with every tail length up to 80 */
      for (uint64_t b = 0; b < 130 && b < n; b += 1 + (mis ? 4 : 0))
        for (uint64_t len = 1; len <= 80 && b + len <= n; len += (b % 3 == 0 ? 1 : 13))
          cmp += ct_same_as_ref(&p, L, R, chunk, b, b + len);
      free(base);
    }
  }
  cr_assert_gt(cmp, 0);
}

Test(codec_kernels, qins8_every_code_and_geometry) { every_geometry(QC_QINS8); }
Test(codec_kernels, qins16_every_geometry) { every_geometry(QC_QINS16); }
Test(codec_kernels, seed_log_every_geometry) { every_geometry(QC_SEED_LOG); }
Test(codec_kernels, seed_rational_every_geometry) { every_geometry(QC_SEED_RATIONAL); }
Test(codec_kernels, passthrough_every_geometry) {
  every_geometry(QC_F32);
  every_geometry(QC_F16);
  every_geometry(QC_BF16);
}

/* Every one of the 65536 qins16 codes, in blocks of every valid exponent. */
Test(codec_kernels, qins16_all_codes_all_exponents) {
  qc_params p = params_of(QC_QINS16);
  uint64_t L = 64 * 1024, R = 4; /* 1024 blocks per row: exponents cycle over [-100, 127] */
  void *base;
  uint8_t *c = make_chunk(&p, L, R, 0, 0, &base);
  for (uint64_t b = 0; b < 4096; b++) c[b] = (uint8_t)(int8_t)(-100 + (int)(b % 228));
  for (uint64_t i = 0; i < L * R; i++) {
    uint16_t code = (uint16_t)i;
    c[4096 + 2 * i] = (uint8_t)code, c[4096 + 2 * i + 1] = (uint8_t)(code >> 8);
  }
  cr_assert_eq(qc_chunk_validate(&p, L, R, c), 0);
  cr_assert_gt(ct_same_as_ref(&p, L, R, c, 0, L * R), 0);
  free(base);
}

/* Outputs of >= 4 MiB take the non-temporal path: aligned, 4-byte-misaligned and odd outputs. */
Test(codec_kernels, large_outputs_nontemporal, .timeout = 60) {
  qc_codec cs[] = {QC_QINS8, QC_QINS16, QC_SEED_LOG, QC_SEED_RATIONAL};
  for (size_t i = 0; i < 4; i++) {
    qc_params p = params_of(cs[i]);
    uint64_t L = 4096 + 40, R = 300; /* 1.2 M elements, 4.9 MB of f32 */
    void *base;
    uint8_t *c = make_chunk(&p, L, R, 5, 1, &base);
    cr_assert_gt(ct_same_as_ref(&p, L, R, c, 0, L * R), 0);
    cr_assert_gt(ct_same_as_ref(&p, L, R, c, 17, L * R - 3), 0);
    free(base);
  }
}

/* A range decode equals the same slice of a full decode, with the kernel in use. */
Test(codec_kernels, range_equals_slice_of_full) {
  qc_codec cs[] = {QC_QINS8, QC_QINS16, QC_SEED_LOG, QC_SEED_RATIONAL, QC_F32, QC_F16, QC_BF16};
  for (size_t ci = 0; ci < 7; ci++) {
    qc_params p = params_of(cs[ci]);
    uint64_t L = 172, R = 37, n = L * R, s = 99;
    void *base;
    uint8_t *c = make_chunk(&p, L, R, 1, 0, &base);
    for (int dt = 0; dt < QC_DT_COUNT; dt++) {
      size_t es = qc_dtype_size((qc_dtype)dt);
      uint8_t *full = malloc(n * es), *part = malloc(n * es);
      cr_assert_eq(qc_decode(&p, L, R, c, 0, n, (qc_dtype)dt, full), 0);
      for (int t = 0; t < 200; t++) {
        uint64_t b = ct_next(&s) % (n + 1), e = b + ct_next(&s) % (n - b + 1);
        cr_assert_eq(qc_decode(&p, L, R, c, b, e, (qc_dtype)dt, part), 0);
        cr_assert_eq(memcmp(part, full + b * es, (e - b) * es), 0, "%s [%llu,%llu)",
                     qc_codec_name(p.codec), (unsigned long long)b, (unsigned long long)e);
      }
      free(full);
      free(part);
    }
    free(base);
  }
}

/* Bad ranges are refused, and nothing is written. */
Test(codec_kernels, bad_ranges_refused) {
  qc_params p = params_of(QC_QINS8);
  uint8_t chunk[2 * 4 + 100] = {0};
  float out[4];
  cr_assert_eq(qc_decode(&p, 50, 2, chunk, 5, 4, QC_DT_F32, out), QINS_EINVALID);
  cr_assert_eq(qc_decode(&p, 50, 2, chunk, 0, 101, QC_DT_F32, out), QINS_EINVALID);
  cr_assert_eq(qc_decode_ref(&p, 50, 2, chunk, 0, 101, QC_DT_F32, out), QINS_EINVALID);
  cr_assert_eq(qc_decode(&p, 50, 2, chunk, 0, 1, (qc_dtype)7, out), QINS_EINVALID);
  cr_assert_eq(qc_decode(&p, UINT64_MAX, 2, chunk, 0, 1, QC_DT_F32, out), QINS_EINVALID);
  cr_assert_eq(qc_decode(&p, 50, 2, chunk, 100, 100, QC_DT_F32, out), 0);
  cr_assert_eq(qc_decode_with("sse9", &p, 50, 2, chunk, 0, 1, QC_DT_F32, out), QINS_EUNSUPPORTED);
}
