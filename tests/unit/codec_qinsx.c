/* SPDX-License-Identifier: MIT */
/*
 * codec_qinsx.c — the exact codec qinsx (docs/FORMAT.md §1.5): every BF16 bit pattern class
 * (zeros of both signs, subnormals, infinities, NaN payloads quiet and signalling, the largest and
 * smallest exponents) round trips bit for bit through encode and every decode kernel (reference,
 * AVX2, AVX-512 VBMI2), as f32 and as bf16; tensors with more than 7 distinct exponents, with
 * exactly 1, with none escaped and with all escaped; lengths around the group (64) and super-block
 * (8192) sizes, slices starting mid-group, unaligned outputs; the f32, f16 and raw variants; sizes
 * and validation of malformed chunks. Chunks the encoder would never write (all escaped, a table
 * missing the data's exponents) are built here from the layout in FORMAT.md, so the kernels are
 * tested on them too.
 */
#include <criterion/criterion.h>

#include "codec_test.h"
#include "qins.h"

static uint32_t ld32(const void *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

static qc_params qx_params(void) {
  qc_params p;
  memset(&p, 0, sizeof p);
  p.codec = QC_QINSX;
  return p;
}

static float *from_bits(const uint32_t *u, uint64_t n) {
  float *w = malloc((n ? n : 1) * sizeof(float));
  memcpy(w, u, n * 4);
  return w;
}

/* Encodes n values (f32 bits) as one row, checks size and validation; returns the chunk. */
static uint8_t *encode_bits(const uint32_t *u, uint64_t n, uint64_t *size) {
  qc_params p = qx_params();
  float *w = from_bits(u, n);
  uint64_t cap = qc_chunk_bytes(QC_QINSX, n, 1, NULL);
  uint8_t *c = malloc(cap + 1);
  cr_assert_eq(qc_encode(&p, n, 1, w, c, NULL, NULL), 0);
  cr_assert_eq(qc_chunk_size(&p, n, 1, c, cap, size), 0);
  cr_assert_leq(*size, cap);
  cr_assert_eq(qc_chunk_validate(&p, n, 1, c), 0);
  free(w);
  return c;
}

/* Decodes [b, e) with the reference: as f32 it must be `want` bit for bit, as bf16 the top halves
 * when bf16_exact; then every kernel must equal the reference in all three dtypes. Returns the
 * comparisons made. */
static int check_decode(const uint8_t *c, uint64_t n, uint64_t b, uint64_t e, const uint32_t *want,
                        int bf16_exact) {
  qc_params p = qx_params();
  uint8_t *ref = malloc((size_t)(e - b) * 4 + 8);
  for (int dt = 0; dt < QC_DT_COUNT; dt += 2) {
    cr_assert_eq(qc_decode_ref(&p, n, 1, c, b, e, (qc_dtype)dt, ref), 0);
    for (uint64_t i = b; i < e; i++) {
      if (dt == QC_DT_F32)
        cr_assert_eq(ld32(ref + 4 * (i - b)), want[i], "f32 element %llu: %08x, want %08x",
                     (unsigned long long)i, ld32(ref + 4 * (i - b)), want[i]);
      else if (bf16_exact)
        cr_assert_eq(ref[2 * (i - b)] | ref[2 * (i - b) + 1] << 8, want[i] >> 16,
                     "bf16 element %llu", (unsigned long long)i);
    }
  }
  free(ref);
  return ct_same_as_ref(&p, n, 1, c, b, e);
}

/* Trained-like bf16 weights (Gaussian, sd 0.02, rounded to nearest even), as f32 bits. */
static uint32_t *trained_bf16(uint64_t n, uint64_t seed) {
  float *w = ct_tensor(CT_GAUSS, n, seed);
  uint32_t *u = malloc((n ? n : 1) * 4);
  for (uint64_t i = 0; i < n; i++) u[i] = (uint32_t)qc_f32_to_bf16(w[i]) << 16;
  free(w);
  return u;
}

/* The bf16 classes: +-0, subnormals, smallest and largest normal exponents, +-Inf, NaNs quiet and
 * signalling with payloads. */
static const uint16_t specials[] = {
    0x0000, 0x8000, 0x0001, 0x807F, 0x0040, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x7F00,
    0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7FC1, 0xFFFF, 0x7F81, 0xFF81, 0x7FBF, 0x3F80,
};
#define N_SPECIALS (sizeof specials / sizeof specials[0])

Test(codec_qinsx, every_bf16_pattern_round_trips) {
  /* All 65536 patterns in one tensor (256 exponents: stored raw), and each pattern class spread
   * through trained-like weights (coded, the specials escaped). */
  uint64_t n = 65536, size;
  uint32_t *u = malloc(n * 4);
  for (uint64_t i = 0; i < n; i++) u[i] = (uint32_t)i << 16;
  uint8_t *c = encode_bits(u, n, &size);
  cr_assert_eq(c[0], QC_QX_BF16_RAW);
  cr_assert_gt(check_decode(c, n, 0, n, u, 1), 0);
  check_decode(c, n, 12345, 12345 + 777, u, 1);
  free(c);
  free(u);
  n = 70001; /* super-blocks, a partial last group */
  u = trained_bf16(n, 7);
  for (uint64_t i = 0; i < n; i += 53) u[i] = (uint32_t)specials[(i / 53) % N_SPECIALS] << 16;
  c = encode_bits(u, n, &size);
  cr_assert_eq(c[0], QC_QX_BF16);
  cr_assert_gt(ld32(c + 8), 0, "escapes");
  check_decode(c, n, 0, n, u, 1);
  uint64_t s = 3;
  for (int t = 0; t < 40; t++) { /* slices starting anywhere, mid-group and mid-super-block */
    uint64_t b = ct_next(&s) % n, e = b + ct_next(&s) % (n - b + 1);
    if (t < 4) b = 8192 * (uint64_t)(t + 1) - 1, e = b + 130;
    check_decode(c, n, b, e, u, 1);
  }
  free(c);
  free(u);
}

Test(codec_qinsx, exponent_counts_one_few_many) {
  uint64_t n = 1000, size;
  uint32_t *u = malloc(n * 4);
  /* exactly one exponent: every value in [1, 2), either sign */
  for (uint64_t i = 0; i < n; i++) u[i] = (uint32_t)(0x3F80 | (i & 0x7F) | (i & 128 ? 0x8000 : 0)) << 16;
  uint8_t *c = encode_bits(u, n, &size);
  cr_assert_eq(c[0], QC_QX_BF16);
  cr_assert_eq(ld32(c + 8), 0, "no escapes");
  for (int k = 1; k < 7; k++) cr_assert_eq(c[1 + k], c[1], "unused codes repeat code 0");
  check_decode(c, n, 0, n, u, 1);
  check_decode(c, n, 1, n - 1, u, 1);
  free(c);
  /* seven exponents: none escaped */
  for (uint64_t i = 0; i < n; i++) u[i] = (uint32_t)(((0x3C + i % 7) << 7) | (i * 13 & 0x7F)) << 16;
  c = encode_bits(u, n, &size);
  cr_assert_eq(ld32(c + 8), 0);
  check_decode(c, n, 0, n, u, 1);
  free(c);
  /* eight: the rarest is escaped */
  for (uint64_t i = 0; i < n; i++) u[i] = (uint32_t)(((0x3C + (i % 9 == 8 ? 7 : i % 7)) << 7) | (i & 0x7F)) << 16;
  c = encode_bits(u, n, &size);
  cr_assert_eq(ld32(c + 8), n / 9, "escapes %u", ld32(c + 8));
  check_decode(c, n, 0, n, u, 1);
  check_decode(c, n, 17, 700, u, 1);
  free(c);
  free(u);
}

/* A coded bf16 chunk built from the layout (FORMAT.md §1.5) with table T, whatever the data. */
static uint8_t *build_coded(const uint32_t *u, uint64_t n, const uint8_t T[7]) {
  uint64_t ng = (n + 63) / 64, ns = (n + 8191) / 8192, esc_n = 0;
  for (uint64_t i = 0; i < n; i++) {
    int hit = 0;
    for (int k = 0; k < 7; k++) hit |= T[k] == (uint8_t)(u[i] >> 23);
    esc_n += !hit;
  }
  uint64_t po = 16 + 8 * ns, ro = po + 24 * ng, size = ro + n + esc_n;
  uint8_t *c = calloc(1, size + qc_chunk_bytes(QC_QINSX, n, 1, NULL));
  c[0] = QC_QX_BF16;
  memcpy(c + 1, T, 7);
  memcpy(c + 8, &esc_n, 8);
  uint64_t ei = 0;
  for (uint64_t i = 0; i < n; i++) {
    if (i % 8192 == 0) memcpy(c + 16 + 8 * (i / 8192), &ei, 8);
    uint8_t e = (uint8_t)(u[i] >> 23);
    int code = 7;
    for (int k = 6; k >= 0; k--)
      if (T[k] == e) code = k;
    for (int bit = 0; bit < 3; bit++)
      if (code >> bit & 1) c[po + 24 * (i / 64) + 8 * bit + (i % 64) / 8] |= (uint8_t)(1 << (i % 8));
    if (code == 7) c[ro + n + ei++] = e;
    c[ro + i] = (uint8_t)((u[i] >> 24 & 0x80) | (u[i] >> 16 & 0x7F));
  }
  return c;
}

Test(codec_qinsx, all_escaped_and_every_length) {
  static const uint64_t lens[] = {1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 8191, 8192, 8193, 3 * 8192 + 17};
  const uint8_t none[7] = {0xF0, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6}; /* no value has these */
  for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
    uint64_t n = lens[li], size;
    uint32_t *u = trained_bf16(n, n);
    for (uint64_t i = 0; i < n; i += 7) u[i] = (uint32_t)specials[i % N_SPECIALS] << 16;
    qc_params p = qx_params();
    uint8_t *c = build_coded(u, n, none);
    /* A coded chunk larger than 16 + 4n bytes (all escaped, n < 32) is never valid. */
    int fits = 16 + 8 * ((n + 8191) / 8192) + 24 * ((n + 63) / 64) + 2 * n <= 16 + 4 * n;
    cr_assert_eq(qc_chunk_validate(&p, n, 1, c), fits ? 0 : QINS_ECORRUPT, "n=%llu", (unsigned long long)n);
    if (fits) {
      cr_assert_eq(qc_chunk_size(&p, n, 1, c, qc_chunk_bytes(QC_QINSX, n, 1, NULL), &size), 0);
      check_decode(c, n, 0, n, u, 1);
      if (n > 3) check_decode(c, n, n / 3, n - 1, u, 1);
    }
    free(c);
    c = encode_bits(u, n, &size); /* what the encoder makes of the same values */
    check_decode(c, n, 0, n, u, 1);
    if (n > 70) check_decode(c, n, 65, n, u, 1);
    free(c);
    free(u);
  }
}

Test(codec_qinsx, f32_f16_and_raw_variants) {
  uint64_t n = 20000, size;
  float *w = ct_tensor(CT_LAPLACE_OUTLIERS, n, 9);
  uint32_t *u = malloc(n * 4);
  memcpy(u, w, n * 4);
  u[5] = 0x7F800001u, u[6] = 0xFFC00000u, u[7] = 0x80000000u, u[8] = 0x00000001u, u[9] = 0x7F7FFFFFu;
  uint8_t *c = encode_bits(u, n, &size); /* f32 values: coded with three raw bytes */
  cr_assert_eq(c[0], QC_QX_F32);
  cr_assert_lt(size * 8.0 / n, 28.0, "%.2f bits/weight", size * 8.0 / n);
  check_decode(c, n, 0, n, u, 0);
  check_decode(c, n, 99, 5000, u, 0);
  free(c);
  for (uint64_t i = 0; i < n; i++) u[i] = ct_bits(qc_f16_to_f32(qc_f32_to_f16(w[i]))); /* f16 values */
  c = encode_bits(u, n, &size);
  cr_assert_eq(c[0], QC_QX_F16_RAW);
  cr_assert_eq(size, 16 + 2 * n);
  check_decode(c, n, 0, n, u, 0);
  free(c);
  for (uint64_t i = 0; i < n; i++) u[i] = (uint32_t)(ct_next(&(uint64_t){i + 1}) | 1); /* noise */
  c = encode_bits(u, n, &size);
  cr_assert_eq(c[0], QC_QX_F32_RAW);
  cr_assert_eq(size, 16 + 4 * n);
  check_decode(c, n, 0, n, u, 0);
  free(c);
  free(u);
  free(w);
}

/* Trained-like bf16 weights take <= 11.5 bits/weight. */
Test(codec_qinsx, bits_per_weight_on_trained_like_bf16) {
  uint64_t n = 1 << 20, size;
  uint32_t *u = trained_bf16(n, 11);
  uint8_t *c = encode_bits(u, n, &size);
  double bpw = size * 8.0 / n;
  cr_assert_lt(bpw, 11.5, "%.3f bits/weight", bpw);
  cr_assert_gt(bpw, 11.0, "%.3f bits/weight", bpw);
  check_decode(c, n, 0, n, u, 1); /* >= 4 MiB of f32: the non-temporal path */
  free(c);
  free(u);
}

Test(codec_qinsx, malformed_chunks_refused) {
  uint64_t n = 9000, size;
  uint32_t *u = trained_bf16(n, 5);
  uint8_t *c = encode_bits(u, n, &size);
  qc_params p = qx_params();
  uint64_t cap = qc_chunk_bytes(QC_QINSX, n, 1, NULL), got;
  cr_assert_eq(qc_chunk_size(&p, n, 1, c, size - 1, &got), QINS_ECORRUPT, "truncated");
  cr_assert_eq(qc_chunk_size(&p, n, 1, c, 15, &got), QINS_ECORRUPT, "no header");
  uint8_t *bad = malloc(cap);
  struct { size_t at; uint8_t x; } flips[] = {
      {0, 9},                         /* unknown variant */
      {8, 1},                         /* escape count */
      {16 + 8, 1},                    /* super-block index entry of block 1 */
      {16 + 16 + 24 * 140 + 16 + 7, 0x80}, /* a padding bit of the last group (9000 = 140*64 + 40) */
  };
  for (size_t k = 0; k < sizeof flips / sizeof *flips; k++) {
    memcpy(bad, c, cap);
    bad[flips[k].at] ^= flips[k].x;
    cr_assert_eq(qc_chunk_validate(&p, n, 1, bad), QINS_ECORRUPT, "flip %zu", k);
  }
  memcpy(bad, c, cap);
  uint64_t big = n + 1;
  memcpy(bad + 8, &big, 8);
  cr_assert_eq(qc_chunk_size(&p, n, 1, bad, cap, &got), QINS_ECORRUPT, "more escapes than values");
  /* a raw chunk with a non-zero header byte */
  uint32_t v[4] = {1, 2, 3, 4};
  free(c);
  c = encode_bits(v, 4, &size);
  cr_assert_eq(c[0], QC_QX_F32_RAW);
  c[3] = 1;
  cr_assert_eq(qc_chunk_validate(&p, 4, 1, c), QINS_ECORRUPT);
  free(bad);
  free(c);
  free(u);
}
