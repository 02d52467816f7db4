/* SPDX-License-Identifier: MIT */
/*
 * codec_roundtrip.c — encode then decode every codec on the synthetic tensors of issue 2
 * (Gaussian, Laplace with outliers, all-zero, constant, tiny 1e-30, huge 1e30), each against a
 * named per-element error bound and, for the lossy codecs, an SNR floor; exact zeros stay exact;
 * re-encoding decoded values gives the same codes; NaN/Inf are refused naming the element;
 * 0-element tensors and rows that are not a multiple of the block size work.
 *
 * Bounds (w the input, v the decoded value, a the block's absmax):
 *   f32   v == w                     f16  |w - v| <= 2^-11 |w| + 2^-25  (|w| < 65520)
 *   bf16  |w - v| <= 2^-8 |w|
 *   qins8 |w - v| <= a * (max_m (T[m] - T[m+1]) / 2 + 2^-7) + 9 * 2^-24  (scale within +-8 fp16
 *         ulps of a; the last term covers fp16's subnormal scales, and tiny tensors decode to 0)
 *         a block whose absmax fp16 cannot hold (>= 65520) is refused (QINS_EUNSUPPORTED)
 *   qins16 |w - v| <= 2^-12 |w| + 2^(e-16)  (e the block exponent)
 *   seed-log  |w - v| <= (exp(range/508) - 1) * 1.001 * max(|w|, 1e-8) + 1e-8 * [|w| < 1e-8]
 *   seed-rational  |z(w) - z(v)| <= 1/255 + 1e-6 with z(w) = sign/(1 + alpha |w|) (its own domain)
 */
#include <criterion/criterion.h>

#include "codec_test.h"
#include "qins.h"

#define N_ROWS 37
#define ROW_LEN 172 /* not a multiple of 32 or 64: every row ends in a short block */

static double snr_floor(qc_codec c, int kind) {
  if (kind != CT_GAUSS && kind != CT_LAPLACE_OUTLIERS && kind != CT_TINY && kind != CT_HUGE)
    return -INFINITY;
  switch (c) {
  case QC_QINS8: return kind == CT_TINY ? -INFINITY : 44.0; /* tiny is below fp16's reach */
  case QC_QINS16: return 79.0;
  case QC_F16: return kind == CT_TINY || kind == CT_HUGE ? -INFINITY : 70.0;
  case QC_BF16: return 48.0;
  case QC_SEED_LOG: return kind == CT_TINY ? -INFINITY : kind == CT_HUGE ? 15.0 : 28.0;
  default: return -INFINITY;
  }
}

static void roundtrip(qc_codec c, int kind) {
  uint64_t L = ROW_LEN, R = N_ROWS, n = L * R;
  float *w = ct_tensor(kind, n, (uint64_t)kind + 10 * c);
  qc_params p;
  uint64_t bad = 777;
  int rc = qc_fit_tensor(c, L, R, w, NULL, &p, &bad);
  if (c == QC_QINS8 && kind == CT_HUGE) { /* fp16 scales cannot hold 1e30: refused, named */
    cr_assert_eq(rc, QINS_EUNSUPPORTED);
    cr_assert(fabsf(w[bad]) >= 65520.0f);
    for (uint64_t i = 0; i < bad; i++) cr_assert(fabsf(w[i]) < 65520.0f);
    p.codec = QC_QINS8;
    qc_params_std_qins8(1, &p);
    uint8_t *dst = malloc(qc_chunk_bytes(c, L, R, NULL));
    cr_assert_eq(qc_encode(&p, L, R, w, dst, NULL, &bad), QINS_EUNSUPPORTED);
    free(dst);
    free(w);
    return;
  }
  cr_assert_eq(rc, 0, "%s %s: fit %d", qc_codec_name(c), ct_kind_names[kind], rc);
  uint64_t bytes = qc_chunk_bytes(c, L, R, NULL);
  uint8_t *chunk = malloc(bytes), *again = malloc(bytes);
  float *v = malloc(n * 4);
  qc_stats st = {0};
  cr_assert_eq(qc_encode(&p, L, R, w, chunk, &st, NULL), 0);
  cr_assert_eq(qc_chunk_validate(&p, L, R, chunk), 0);
  cr_assert_eq(qc_decode(&p, L, R, chunk, 0, n, QC_DT_F32, v), 0);
  cr_assert_eq(st.n, n);
  double maxgap = 0;
  for (int m = 0; m < 127; m++) maxgap = fmax(maxgap, p.table[m] - p.table[m + 1]);
  double range = p.log_max - p.log_min;
  double es = 0, ss = 0;
  for (uint64_t i = 0; i < n; i++) {
    double x = w[i], y = v[i], err = fabs(x - y), bound;
    uint32_t B = qc_codec_block(c);
    uint64_t b0 = B ? (i / L) * L + (i % L) / B * B : i, b1 = B ? b0 + B : i + 1;
    if (B && b1 > (i / L + 1) * L) b1 = (i / L + 1) * L;
    double a = 0;
    for (uint64_t j = b0; j < b1; j++) a = fmax(a, fabs(w[j]));
    switch (c) {
    case QC_F32: bound = 0; break;
    case QC_F16: bound = 0x1p-11 * fabs(x) + 0x1p-25; break;
    case QC_BF16: bound = 0x1p-8 * fabs(x); break;
    case QC_QINS8: bound = a * (maxgap / 2 + 0x1p-7) + 9 * 0x1p-24; break; /* fp16 subnormals */
    case QC_QINS16: {
      int e = (int8_t)chunk[(i / L) * ((L + 63) / 64) + (i % L) / 64];
      bound = e == QC_QINS16_EZERO ? 0x1p-100 : 0x1p-12 * fabs(x) + ldexp(1, e - 16);
      break;
    }
    case QC_SEED_LOG:
      bound = (exp(range / 508) - 1) * 1.001 * fmax(fabs(x), 1e-8) + (fabs(x) < 1e-8 ? 1e-8 : 0);
      break;
    default: {
      double zx = (x >= 0 ? 1 : -1) / (1 + p.alpha * fabs(x));
      double zy = y == 0 ? (x >= 0 ? 1.0 : -1.0) : (y >= 0 ? 1 : -1) / (1 + p.alpha * fabs(y));
      err = fabs(zx - zy), bound = 1.0 / 255 + 1e-6;
      break;
    }
    }
    cr_assert(err <= bound, "%s %s: element %llu: w=%a v=%a err %g > bound %g",
              qc_codec_name(c), ct_kind_names[kind], (unsigned long long)i, x, y, err, bound);
    if (x == 0) cr_assert(y == 0, "%s: exact zero at %llu decoded as %a", qc_codec_name(c),
                          (unsigned long long)i, y);
    es += (x - y) * (x - y), ss += x * x;
  }
  double snr = es == 0 ? INFINITY : 10 * log10(ss / es);
  cr_assert(snr >= snr_floor(c, kind), "%s %s: SNR %.2f dB < %.1f", qc_codec_name(c),
            ct_kind_names[kind], snr, snr_floor(c, kind));
  /* qc_stats agrees with what decode gives */
  cr_assert(fabs(st.err_sq - es) <= 1e-9 * (es + 1e-300) + 1e-300 || (isinf(snr) && st.err_sq == 0),
            "%s: stats err %g vs %g", qc_codec_name(c), st.err_sq, es);
  /* Re-encoding the decoded values gives the same codes (qins8 with the same scales). */
  if (c == QC_QINS8) memcpy(again, chunk, bytes), p.scale_search = QC_SCALE_KEEP;
  cr_assert_eq(qc_encode(&p, L, R, v, again, NULL, NULL), 0);
  if (c == QC_QINS16) {
    /* The exponent is normative (smallest e with 2^e >= absmax): a block whose absmax decoded to
     * exactly 2^(e-1) legitimately re-encodes one exponent lower. Values must agree everywhere
     * and codes wherever the exponent did not move. */
    float *v2 = malloc(n * 4);
    cr_assert_eq(qc_decode(&p, L, R, again, 0, n, QC_DT_F32, v2), 0);
    cr_assert_eq(memcmp(v, v2, n * 4), 0, "qins16 decode(encode(decode)) != decode");
    uint64_t bpr = (L + 63) / 64, nb = bpr * R;
    for (uint64_t i = 0; i < n; i++) {
      uint64_t blk = (i / L) * bpr + (i % L) / 64;
      if (chunk[blk] == again[blk])
        cr_assert_eq(memcmp(chunk + nb + 2 * i, again + nb + 2 * i, 2), 0, "qins16 code %llu",
                     (unsigned long long)i);
    }
    free(v2);
  } else if (c == QC_SEED_RATIONAL) {
    /* q = 0 decodes to -0.0, which QINS.md's s = (w >= 0) ? 1 : -1 encodes as q = 255 (+0). */
    for (uint64_t i = 0; i < n; i++)
      cr_assert(chunk[i] == again[i] || (chunk[i] == 0 && again[i] == 255), "seed-rational q[%llu]",
                (unsigned long long)i);
  } else {
    cr_assert_eq(memcmp(chunk, again, bytes), 0, "%s %s: encode(decode(codes)) != codes",
                 qc_codec_name(c), ct_kind_names[kind]);
  }
  free(w);
  free(v);
  free(chunk);
  free(again);
}

static void all_kinds(qc_codec c) {
  for (int k = 0; k < CT_KINDS; k++) roundtrip(c, k);
}
Test(codec_roundtrip, f32_exact) { all_kinds(QC_F32); }
Test(codec_roundtrip, f16_within_half_ulp) {
  for (int k = 0; k < CT_KINDS; k++) {
    if (k == CT_HUGE) continue; /* 1e30 overflows f16: checked below */
    roundtrip(QC_F16, k);
  }
  float w[3] = {1e30f, -1e30f, 65519.0f};
  uint16_t h[3];
  qc_params p = {.codec = QC_F16};
  cr_assert_eq(qc_encode(&p, 3, 1, w, h, NULL, NULL), 0);
  cr_assert_eq(h[0], 0x7C00);
  cr_assert_eq(h[1], 0xFC00);
  cr_assert_eq(h[2], 0x7BFF);
}
Test(codec_roundtrip, bf16_within_half_ulp) { all_kinds(QC_BF16); }
Test(codec_roundtrip, qins8_bounds) { all_kinds(QC_QINS8); }
Test(codec_roundtrip, qins16_bounds) { all_kinds(QC_QINS16); }
Test(codec_roundtrip, seed_log_bounds) { all_kinds(QC_SEED_LOG); }
Test(codec_roundtrip, seed_rational_bounds) { all_kinds(QC_SEED_RATIONAL); }

/* NaN or Inf bound for a lossy codec: QINS_ENONFINITE naming the element, from fit and encode. */
Test(codec_roundtrip, nonfinite_refused_with_index) {
  uint64_t L = 100, R = 3;
  float *w = ct_tensor(CT_GAUSS, L * R, 1);
  float bads[3] = {NAN, INFINITY, -INFINITY};
  for (int c = QC_QINS8; c < QC_CODEC_COUNT; c++)
    for (int b = 0; b < 3 && qc_codec_is_lossy((qc_codec)c); b++) {
      uint64_t at = 123 + (uint64_t)b * 50, idx = 0;
      w[at] = bads[b];
      qc_params p;
      cr_assert_eq(qc_fit_tensor((qc_codec)c, L, R, w, NULL, &p, &idx), QINS_ENONFINITE);
      cr_assert_eq(idx, at, "%s: fit index", qc_codec_name((qc_codec)c));
      w[at] = 0.5f;
      cr_assert_eq(qc_fit_tensor((qc_codec)c, L, R, w, NULL, &p, NULL), 0);
      w[at] = bads[b];
      uint8_t *dst = malloc(qc_chunk_bytes((qc_codec)c, L, R, NULL));
      idx = 0;
      cr_assert_eq(qc_encode(&p, L, R, w, dst, NULL, &idx), QINS_ENONFINITE);
      cr_assert_eq(idx, at, "%s: encode index", qc_codec_name((qc_codec)c));
      free(dst);
      w[at] = 0.5f;
    }
  /* Passthrough codecs and the exact qinsx keep NaN and Inf. */
  w[5] = NAN, w[6] = -INFINITY;
  for (int c = QC_F32; c < QC_CODEC_COUNT; c++) {
    if (qc_codec_is_lossy((qc_codec)c)) continue;
    qc_params p = {.codec = (qc_codec)c};
    uint8_t *dst = malloc(qc_chunk_bytes((qc_codec)c, L, R, NULL));
    float out[8];
    cr_assert_eq(qc_encode(&p, L, R, w, dst, NULL, NULL), 0);
    cr_assert_eq(qc_decode(&p, L, R, dst, 0, 8, QC_DT_F32, out), 0);
    cr_assert(isnan(out[5]) && isinf(out[6]) && out[6] < 0);
    free(dst);
  }
  free(w);
}

/* 0-element tensors: sizes 0, fit/encode/decode succeed. */
Test(codec_roundtrip, zero_elements) {
  for (int c = 0; c < QC_CODEC_COUNT; c++)
    for (int shape = 0; shape < 2; shape++) {
      uint64_t L = shape ? 0 : 64, R = shape ? 5 : 0;
      cr_assert_eq(qc_chunk_bytes((qc_codec)c, L, R, NULL), 0);
      qc_params p;
      float dummy = 0;
      uint8_t out[4];
      cr_assert_eq(qc_fit_tensor((qc_codec)c, L, R, &dummy, NULL, &p, NULL), 0);
      cr_assert_eq(qc_encode(&p, L, R, &dummy, out, NULL, NULL), 0);
      cr_assert_eq(qc_decode(&p, L, R, out, 0, 0, QC_DT_F32, out), 0);
      cr_assert_eq(qc_chunk_validate(&p, L, R, out), 0);
    }
}

/* Chunk sizes follow docs/FORMAT.md §1.1, and overflow is reported. */
Test(codec_roundtrip, chunk_sizes) {
  cr_assert_eq(qc_chunk_bytes(QC_QINS8, 172, 10, NULL), 10 * (6 * 2 + 172));
  cr_assert_eq(qc_chunk_bytes(QC_QINS16, 172, 10, NULL), 10 * (3 + 2 * 172));
  cr_assert_eq(qc_chunk_bytes(QC_SEED_LOG, 7, 3, NULL), 42);
  cr_assert_eq(qc_chunk_bytes(QC_SEED_RATIONAL, 7, 3, NULL), 21);
  cr_assert_eq(qc_chunk_bytes(QC_F32, 7, 3, NULL), 84);
  cr_assert_eq(qc_chunk_bytes(QC_BF16, 7, 3, NULL), 42);
  cr_assert_eq(qc_chunk_bytes(QC_QINSX, 7, 3, NULL), 16 + 84); /* the largest qinsx chunk */
  for (int c = 0; c < QC_CODEC_COUNT; c++) /* traits agree with the sizes, full blocks */
    if (!qc_codec_varsize((qc_codec)c)) cr_assert_eq(qc_chunk_bytes((qc_codec)c, 128, 3, NULL) * 8.0 / 384,
                 qc_traits_table[c].bits_per_weight, "%s", qc_codec_name((qc_codec)c));
  int ovf = 0;
  cr_assert_eq(qc_chunk_bytes(QC_F32, 1ull << 40, 1ull << 23, &ovf), 0);
  cr_assert_eq(ovf, 1);
  cr_assert_eq(qc_chunk_bytes(QC_QINS8, 1ull << 32, 1ull << 32, &ovf), 0);
  cr_assert_eq(ovf, 1);
  cr_assert_eq(qc_chunk_bytes(QC_QINS8, 1ull << 32, 1ull << 20, &ovf), (1ull << 52) + (1ull << 48));
  cr_assert_eq(ovf, 0);
}

/* QINS.md §qins16 encode, written out literally (double log2, m0/m1, tie to m1, the 32767 rule),
 * against the encoder on random magnitudes, decoded levels and their midpoints. */
static uint16_t q16_spec(int e, float w) {
  float a = fabsf(w);
  if (a == 0) return 32767;
  double x = a / ldexp(1, e);
  double l = floor(-2048 * log2(x));
  int m0 = l < 0 ? 0 : l > 32766 ? 32766 : (int)l, m1 = m0 + 1 > 32766 ? 32766 : m0 + 1;
  const float *MT = qc_qins16_mantissa();
  double v0 = ldexpf(MT[m0 & 2047], e - (m0 >> 11)), v1 = ldexpf(MT[m1 & 2047], e - (m1 >> 11));
  int m = fabs(a - v1) <= fabs(a - v0) ? m1 : m0;
  double vm = m == m1 ? v1 : v0;
  if (m == 32766 && fabs(a) < fabs(a - vm)) m = 32767;
  return (uint16_t)(m | (w < 0 && m != 32767 ? 0x8000 : 0));
}

Test(codec_roundtrip, qins16_codes_follow_spec_rule) {
  uint64_t s = 3, n = 64 * 4096;
  float *w = malloc(n * 4);
  const float *MT = qc_qins16_mantissa();
  for (uint64_t i = 0; i < n; i++) {
    double v;
    int k = (int)(i % 4);
    uint32_t m = (uint32_t)(ct_next(&s) % 32767);
    double lv = ldexp(MT[m & 2047], -(int)(m >> 11)), lv1 = ldexp(MT[(m + 1) & 2047], -(int)((m + 1) >> 11));
    if (k == 0) v = ldexp(ct_unif(&s), -(int)(ct_next(&s) % 20)); /* random */
    else if (k == 1) v = lv;                                      /* a level */
    else if (k == 2) v = (lv + lv1) / 2;                          /* a midpoint (rounded) */
    else v = nextafterf((float)((lv + lv1) / 2), 0);
    w[i] = (float)((i & 8) ? -v : v);
    if (i % 64 == 0) w[i] = (i & 64) ? 1.0f : 0.75f; /* block absmax: e = 0 */
  }
  qc_params p = {.codec = QC_QINS16};
  uint8_t *c = malloc(qc_chunk_bytes(QC_QINS16, n, 1, NULL));
  cr_assert_eq(qc_encode(&p, n, 1, w, c, NULL, NULL), 0);
  uint64_t nb = n / 64;
  for (uint64_t i = 0; i < n; i++) {
    int e = (int8_t)c[i / 64];
    uint16_t got = (uint16_t)(c[nb + 2 * i] | c[nb + 2 * i + 1] << 8);
    cr_assert_eq(got, q16_spec(e, w[i]), "element %llu w=%a e=%d", (unsigned long long)i, w[i], e);
  }
  free(c);
  free(w);
}
