/* SPDX-License-Identifier: MIT */
/*
 * codec_convert.c — f16 and bf16 conversions (PITFALLS.md "Numbers and SIMD"): f16 -> f32 -> f16
 * over all 65,536 patterns, bf16 likewise, round to nearest even at every rounding boundary
 * (checked against an independent rounding of the exact value), subnormals, overflow to infinity,
 * NaN kept quiet with its sign; and the bulk converters (qc_to_f32/qc_from_f32, F16C on x86) equal
 * the scalar ones bit for bit.
 */
#include <criterion/criterion.h>

#include "codec_test.h"

static int f16_nan(uint16_t h) { return (h & 0x7C00) == 0x7C00 && (h & 0x3FF); }

Test(codec_convert, f16_all_patterns_round_trip) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = qc_f16_to_f32((uint16_t)h);
    uint16_t back = qc_f32_to_f16(f);
    if (f16_nan((uint16_t)h)) {
      cr_assert(isnan(f), "%04x", h);
      cr_assert_eq(back, h | 0x200, "NaN %04x -> %04x (quiet, payload and sign kept)", h, back);
    } else {
      cr_assert_eq(back, h, "%04x -> %a -> %04x", h, f, back);
      /* the value is the textbook one */
      int e = (h >> 10) & 31, m = h & 0x3FF;
      double v = e == 0 ? ldexp(m, -24) : e == 31 ? INFINITY : ldexp(1024 + m, e - 25);
      if (h & 0x8000) v = -v;
      cr_assert(f == v && !signbit(f) == !signbit(v), "%04x decodes to %a, want %a", h, f, v);
    }
  }
}

/* Independent f32 -> f16 reference: exact value in double, nearest even by hand. */
static uint16_t f16_slow(float f) {
  if (isnan(f)) return 0; /* not used for NaN */
  uint16_t sign = signbit(f) ? 0x8000 : 0;
  double a = fabs((double)f);
  uint16_t best = 0;
  double bd = INFINITY;
  /* scan the two candidates around a: the largest finite f16 <= a and its successor */
  int lo = 0, hi = 0x7BFF;
  while (lo < hi) { /* binary search over magnitudes (monotone in the bits) */
    int mid = (lo + hi + 1) / 2;
    if (qc_f16_to_f32((uint16_t)mid) <= a) lo = mid;
    else hi = mid - 1;
  }
  for (int c = lo; c <= lo + 1 && c <= 0x7C00; c++) {
    double v = c == 0x7C00 ? 65536.0 : qc_f16_to_f32((uint16_t)c); /* 65536 = next step past max */
    double d = fabs(v - a);
    if (d < bd || (d == bd && !(c & 1))) bd = d, best = (uint16_t)c;
  }
  return sign | best;
}

Test(codec_convert, f32_to_f16_nearest_even_everywhere) {
  /* every f16 value, the midpoints to its neighbours, and one f32 ulp either side of them */
  for (uint32_t h = 0; h < 0x7C00; h++) {
    double v = qc_f16_to_f32((uint16_t)h), next = h == 0x7BFF ? 65536.0 : qc_f16_to_f32((uint16_t)(h + 1));
    float mid = (float)((v + next) / 2);
    float probes[5] = {(float)v, mid, nextafterf(mid, 0), nextafterf(mid, INFINITY), -mid};
    for (int k = 0; k < 5; k++)
      cr_assert_eq(qc_f32_to_f16(probes[k]), f16_slow(probes[k]), "%a", probes[k]);
  }
  cr_assert_eq(qc_f32_to_f16(65519.996f), 0x7BFF);
  cr_assert_eq(qc_f32_to_f16(65520.0f), 0x7C00);
  cr_assert_eq(qc_f32_to_f16(-1e30f), 0xFC00);
  cr_assert_eq(qc_f32_to_f16(0x1p-25f), 0x0000);             /* tie to even: 0 */
  cr_assert_eq(qc_f32_to_f16(nextafterf(0x1p-25f, 1)), 0x0001);
  cr_assert_eq(qc_f32_to_f16(0x1.8p-24f), 0x0002);           /* 1.5 ulps: to even 2 */
  cr_assert_eq(qc_f32_to_f16(-0.0f), 0x8000);
  cr_assert_eq(qc_f32_to_f16(ct_float(0x7F800001)), 0x7E00); /* sNaN -> quiet */
  cr_assert_eq(qc_f32_to_f16(ct_float(0xFFC12345)), 0xFE09);
}

Test(codec_convert, bf16_all_patterns_and_rounding) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = qc_bf16_to_f32((uint16_t)h);
    cr_assert_eq(ct_bits(f), h << 16);
    uint16_t back = qc_f32_to_bf16(f);
    if (isnan(f)) cr_assert_eq(back, h | 0x40);
    else cr_assert_eq(back, h);
    /* ties and near-ties below this pattern's next neighbour */
    if ((h & 0x7F80) != 0x7F80) {
      uint32_t b = h << 16;
      cr_assert_eq(qc_f32_to_bf16(ct_float(b | 0x8000)), (h & 1) ? h + 1 : h, "tie %04x", h);
      cr_assert_eq(qc_f32_to_bf16(ct_float(b | 0x7FFF)), h);
      cr_assert_eq(qc_f32_to_bf16(ct_float(b | 0x8001)), (uint16_t)(h + 1));
    }
  }
}

/* The bulk converters (F16C/AVX2 on x86) equal the scalar functions, NaN payloads included. */
Test(codec_convert, bulk_equals_scalar) {
  uint64_t n = 65536 + 13;
  uint16_t *h = malloc(n * 2), *back = malloc(n * 2);
  float *f = malloc(n * 4);
  for (uint64_t i = 0; i < n; i++) h[i] = (uint16_t)(i * 40503u);
  for (int dt = QC_DT_F16; dt <= QC_DT_BF16; dt++) {
    qc_to_f32((qc_dtype)dt, h, n, f);
    for (uint64_t i = 0; i < n; i++) {
      float s = dt == QC_DT_F16 ? qc_f16_to_f32(h[i]) : qc_bf16_to_f32(h[i]);
      cr_assert_eq(ct_bits(f[i]), ct_bits(s), "%s %04x", qc_dtype_name((qc_dtype)dt), h[i]);
    }
  }
  uint64_t s = 1;
  for (uint64_t i = 0; i < n; i++) f[i] = ct_float((uint32_t)ct_next(&s)); /* NaNs, subnormals... */
  for (int dt = QC_DT_F16; dt <= QC_DT_BF16; dt++) {
    qc_from_f32((qc_dtype)dt, f, n, back);
    for (uint64_t i = 0; i < n; i++) {
      uint16_t want = dt == QC_DT_F16 ? qc_f32_to_f16(f[i]) : qc_f32_to_bf16(f[i]);
      cr_assert_eq(back[i], want, "%s %08x", qc_dtype_name((qc_dtype)dt), ct_bits(f[i]));
    }
  }
  free(h);
  free(back);
  free(f);
}
