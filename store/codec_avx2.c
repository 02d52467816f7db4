/* SPDX-License-Identifier: MIT */
/*
 * codec_avx2.c — AVX2 + F16C decode kernels (codec_int.h contract), compiled with -mavx2 -mf16c
 * and used only when the CPU has them (codec.c checks __builtin_cpu_supports).
 *
 * qins8: 8 codes -> vpmovzxbd -> vgatherdps from the 256-entry signed table -> one vmulps by the
 * block scale (lanes of a group that cross into the next block take its scale by a blend).
 * qins16: the mantissa is gathered from MT, the power of two added to its exponent field as an
 * integer (exact: QINS.md guarantees the result is a normal float for a valid chunk), the sign
 * or'ed in, code 32767 forced to +-0. seed-log and seed-rational: gathers from the per-call table.
 *
 * Invariants: results equal codec_ref.c's bit for bit (same float operations on the same values,
 * no FMA: the Makefile passes -ffp-contract=off); loads never pass the segment's last code or
 * block scale; tails go through the reference segment kernels; with nt, stores are non-temporal
 * once out is 32-byte aligned, and the kernel ends with sfence.
 */
#include <immintrin.h>

#include "codec_int.h"

static inline void st8(uint8_t *o, __m256 v, int nt) {
  if (nt) _mm256_stream_ps((float *)(void *)o, v);
  else _mm256_storeu_ps((float *)(void *)o, v);
}

static inline float f16s(const uint8_t *p) { return _cvtsh_ss(qc__ld16(p)); }

/* Floats to write before out is 32-byte aligned, with non-temporal stores (qc__nt_head). */
static inline uint64_t nt_head(const uint8_t *o, uint64_t n, int *nt) { return qc__nt_head(o, n, 4, 32, nt); }

static void k_qins8(const float *lut, const uint8_t *scales, const uint8_t *codes, uint64_t off,
                    uint64_t n, void *out, int nt) {
  uint8_t *o = out;
  uint64_t j = nt_head(o, n, &nt);
  if (j) qc__ref_qins8(lut, scales, codes, off, j, o, 0);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i b31 = _mm256_set1_epi32(31);
  while (j + 8 <= n) {
    uint64_t k = off + j, b = k >> 5;
    unsigned r = (unsigned)(k & 31);
    __m256 dv = _mm256_set1_ps(f16s(scales + 2 * b));
    if (r == 0 && j + 32 <= n) { /* a whole block: four groups, one scale */
      const uint8_t *c = codes + j;
      __m256 v0 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)c)), 4);
      __m256 v1 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(c + 8))), 4);
      __m256 v2 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(c + 16))), 4);
      __m256 v3 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(c + 24))), 4);
      st8(o + 4 * j, _mm256_mul_ps(dv, v0), nt);
      st8(o + 4 * j + 32, _mm256_mul_ps(dv, v1), nt);
      st8(o + 4 * j + 64, _mm256_mul_ps(dv, v2), nt);
      st8(o + 4 * j + 96, _mm256_mul_ps(dv, v3), nt);
      j += 32;
      continue;
    }
    if (r > 24) { /* lanes r + l >= 32 are in the next block */
      __m256 d1 = _mm256_set1_ps(f16s(scales + 2 * b + 2));
      __m256i m = _mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32((int)r)), b31);
      dv = _mm256_blendv_ps(dv, d1, _mm256_castsi256_ps(m));
    }
    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(codes + j)));
    st8(o + 4 * j, _mm256_mul_ps(dv, _mm256_i32gather_ps(lut, idx, 4)), nt);
    j += 8;
  }
  if (j < n) {
    uint64_t k = off + j;
    qc__ref_qins8(lut, scales + 2 * (k >> 5), codes + j, k & 31, n - j, o + 4 * j, 0);
  }
  if (nt) _mm_sfence();
}

void qc__avx2_qins16(const int8_t *exps, const uint8_t *codes, uint64_t off, uint64_t n, void *out,
                     int nt) {
  uint8_t *o = out;
  const float *MT = qc_qins16_mantissa();
  uint64_t j = nt_head(o, n, &nt);
  if (j) qc__ref_qins16(exps, codes, off, j, o, 0);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i b63 = _mm256_set1_epi32(63), m15 = _mm256_set1_epi32(0x7FFF);
  const __m256i m11 = _mm256_set1_epi32(2047), zero = _mm256_set1_epi32(QC_QINS16_ZERO);
  const __m256i sbit = _mm256_set1_epi32(0x8000);
  for (; j + 8 <= n; j += 8) {
    uint64_t k = off + j, b = k >> 6;
    unsigned r = (unsigned)(k & 63);
    __m256i ev = _mm256_set1_epi32(exps[b]);
    if (r > 56) {
      __m256i e1 = _mm256_set1_epi32(exps[b + 1]);
      __m256i m = _mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32((int)r)), b63);
      ev = _mm256_blendv_epi8(ev, e1, m);
    }
    __m256i c = _mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)(codes + 2 * j)));
    __m256i m = _mm256_and_si256(c, m15);
    __m256i mt = _mm256_castps_si256(_mm256_i32gather_ps(MT, _mm256_and_si256(m, m11), 4));
    __m256i sh = _mm256_sub_epi32(ev, _mm256_srli_epi32(m, 11));
    __m256i v = _mm256_add_epi32(mt, _mm256_slli_epi32(sh, 23));
    v = _mm256_andnot_si256(_mm256_cmpeq_epi32(m, zero), v);
    v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(c, sbit), 16));
    st8(o + 4 * j, _mm256_castsi256_ps(v), nt);
  }
  if (j < n) {
    uint64_t k = off + j;
    qc__ref_qins16(exps + (k >> 6), codes + 2 * j, k & 63, n - j, o + 4 * j, 0);
  }
  if (nt) _mm_sfence();
}

void qc__avx2_seedlog(const float *lut, const int8_t *sign, const uint8_t *stored, uint64_t n,
                      void *out, int nt) {
  uint8_t *o = out;
  uint64_t j = nt_head(o, n, &nt);
  if (j) qc__ref_seedlog(lut, sign, stored, j, o, 0);
  for (; j + 8 <= n; j += 8) {
    __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)(sign + j))));
    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(stored + j)));
    st8(o + 4 * j, _mm256_mul_ps(s, _mm256_i32gather_ps(lut, idx, 4)), nt);
  }
  if (j < n) qc__ref_seedlog(lut, sign + j, stored + j, n - j, o + 4 * j, 0);
  if (nt) _mm_sfence();
}

void qc__avx2_lut8(const float *lut, const uint8_t *codes, uint64_t n, void *out, int nt) {
  uint8_t *o = out;
  uint64_t j = nt_head(o, n, &nt);
  if (j) qc__ref_lut8(lut, codes, j, o, 0);
  for (; j + 8 <= n; j += 8) {
    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const void *)(codes + j)));
    st8(o + 4 * j, _mm256_i32gather_ps(lut, idx, 4), nt);
  }
  if (j < n) qc__ref_lut8(lut, codes + j, n - j, o + 4 * j, 0);
  if (nt) _mm_sfence();
}

void qc__avx2_f16_to_f32(const void *src, uint64_t n, void *dst) {
  const uint8_t *s = src;
  uint8_t *d = dst;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps((float *)(void *)(d + 4 * i), _mm256_cvtph_ps(_mm_loadu_si128((const void *)(s + 2 * i))));
  for (; i < n; i++) qc__stf(d + 4 * i, qc_f16_to_f32(qc__ld16(s + 2 * i)));
}

void qc__avx2_bf16_to_f32(const void *src, uint64_t n, void *dst) {
  const uint8_t *s = src;
  uint8_t *d = dst;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)(s + 2 * i)));
    _mm256_storeu_si256((void *)(d + 4 * i), _mm256_slli_epi32(v, 16));
  }
  for (; i < n; i++) qc__stf(d + 4 * i, qc_bf16_to_f32(qc__ld16(s + 2 * i)));
}

void qc__avx2_f32_to_f16(const void *src, uint64_t n, void *dst) {
  const uint8_t *s = src;
  uint8_t *d = dst;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((void *)(d + 2 * i),
                     _mm256_cvtps_ph(_mm256_loadu_ps((const float *)(const void *)(s + 4 * i)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; i++) qc__st16(d + 2 * i, qc_f32_to_f16(qc__ldf(s + 4 * i)));
}

void qc__avx2_f32_to_bf16(const void *src, uint64_t n, void *dst) {
  const uint8_t *s = src;
  uint8_t *d = dst;
  uint64_t i = 0;
  const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
  const __m256i r7 = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const __m256i q = _mm256_set1_epi32(0x40);
  for (; i + 8 <= n; i += 8) {
    __m256i x = _mm256_loadu_si256((const void *)(s + 4 * i));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs), inf);
    __m256i hi = _mm256_srli_epi32(x, 16);
    __m256i rn = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, r7), _mm256_and_si256(hi, one)), 16);
    __m256i v = _mm256_blendv_epi8(rn, _mm256_or_si256(hi, q), nan);
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08); /* lanes 0, 2 */
    _mm_storeu_si128((void *)(d + 2 * i), _mm256_castsi256_si128(p));
  }
  for (; i < n; i++) qc__st16(d + 2 * i, qc_f32_to_bf16(qc__ldf(s + 4 * i)));
}

float qc__avx2_q8_err32(const float *t0, const float *t1, float d, const float *w) {
  const __m256 dv = _mm256_set1_ps(d), inv = _mm256_set1_ps(1.0f / d), one = _mm256_set1_ps(1.0f);
  const __m256 G = _mm256_set1_ps((float)QC__Q8_GUESS);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  for (int v = 0; v < 4; v++) {
    __m256 a = _mm256_and_ps(_mm256_loadu_ps(w + 8 * v), absm);
    __m256 x = _mm256_mul_ps(a, inv);
    __m256i i = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_min_ps(x, one), G));
    __m256 e0 = _mm256_sub_ps(a, _mm256_mul_ps(dv, _mm256_i32gather_ps(t0, i, 4)));
    __m256 e1 = _mm256_sub_ps(a, _mm256_mul_ps(dv, _mm256_i32gather_ps(t1, i, 4)));
    acc = _mm256_add_ps(acc, _mm256_min_ps(_mm256_mul_ps(e0, e0), _mm256_mul_ps(e1, e1)));
  }
  float l[8];
  _mm256_storeu_ps(l, acc);
  float s = l[0];
  for (int k = 1; k < 8; k++) s += l[k];
  return s;
}

/* qinsx, 32 elements a step (from any element): each 32-bit slice of the three plane words becomes 32
 * bytes (broadcast, byte shuffle, and + compare against the bit of each lane), the codes index the
 * table with one vpshufb, escapes are blended in, in order, into the lanes where all three bits
 * are set (a byte prefix count of those lanes indexes a window of the escape array with one more
 * vpshufb; within 32 escapes of the array's end, a loop over the lanes instead), and the exponent
 * and raw bytes are merged and widened
 * as in the VBMI2 kernel. The tail (and, with non-temporal stores, the elements before out's next
 * 32-byte boundary) goes through the reference. */
uint64_t qc__avx2_qinsx(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out,
                        int bf16, int nt) {
  uint8_t *o = out;
  unsigned es = bf16 ? 2 : 4;
  uint64_t j = qc__qx_nt_head(x, e0, n, &ei, o, bf16, &nt, 32);
  const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadl_epi64((const __m128i *)(const void *)x->table));
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
  const __m256i k80 = _mm256_set1_epi8((char)0x80), one = _mm256_set1_epi8(1);
  const __m256i two = _mm256_set1_epi8(2), four = _mm256_set1_epi8(4);
  const __m256i iota = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                        17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  while (j + 32 <= n) {
    uint64_t i = e0 + j;
    uint32_t m0 = (uint32_t)qc__qx_bits(x, i, 32, 0), m1 = (uint32_t)qc__qx_bits(x, i, 32, 1);
    uint32_t m2 = (uint32_t)qc__qx_bits(x, i, 32, 2), em = m0 & m1 & m2;
    __m256i v0 = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m0), spread);
    __m256i v1 = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m1), spread);
    __m256i v2 = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m2), spread);
    v0 = _mm256_cmpeq_epi8(_mm256_and_si256(v0, bitsel), bitsel); /* 0xFF where the bit is set */
    v1 = _mm256_cmpeq_epi8(_mm256_and_si256(v1, bitsel), bitsel);
    v2 = _mm256_cmpeq_epi8(_mm256_and_si256(v2, bitsel), bitsel);
    __m256i c = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(v0, one), _mm256_and_si256(v1, two)),
                                _mm256_and_si256(v2, four));
    __m256i E = _mm256_shuffle_epi8(tbl, c);
    if (ei + 32 <= x->n_esc) {
      /* Without a branch on the escapes: lane b of each 16-lane half takes escape number (escapes
       * before it in the half) from a 16-byte window starting at that half's first escape. */
      __m256i fl = _mm256_and_si256(_mm256_and_si256(v0, v1), v2), g = _mm256_and_si256(fl, one);
      __m256i p = _mm256_add_epi8(g, _mm256_slli_si256(g, 1));
      p = _mm256_add_epi8(p, _mm256_slli_si256(p, 2));
      p = _mm256_add_epi8(p, _mm256_slli_si256(p, 4));
      p = _mm256_add_epi8(p, _mm256_slli_si256(p, 8));
      const uint8_t *e = x->esc + ei;
      __m256i win = _mm256_loadu2_m128i((const __m128i *)(const void *)(e + __builtin_popcount(em & 0xFFFFu)),
                                        (const __m128i *)(const void *)e);
      E = _mm256_blendv_epi8(E, _mm256_shuffle_epi8(win, _mm256_sub_epi8(p, g)), fl);
      ei += (uint64_t)__builtin_popcount(em);
    } else {
      for (; em; em &= em - 1) /* near the end of the escapes: lane b takes the next one */
        E = _mm256_blendv_epi8(E, _mm256_set1_epi8((char)x->esc[ei++]),
                               _mm256_cmpeq_epi8(iota, _mm256_set1_epi8((char)__builtin_ctz(em))));
    }
    __m256i r0 = _mm256_loadu_si256((const __m256i *)(const void *)(x->raw0 + i));
    __m256i b3 = _mm256_or_si256(_mm256_and_si256(r0, k80), _mm256_andnot_si256(k80, _mm256_srli_epi16(E, 1)));
    __m256i b2 = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(E, 7), k80), _mm256_andnot_si256(k80, r0));
    b2 = _mm256_permute4x64_epi64(b2, 0xD8), b3 = _mm256_permute4x64_epi64(b3, 0xD8);
    __m256i w0 = _mm256_unpacklo_epi8(b2, b3), w1 = _mm256_unpackhi_epi8(b2, b3); /* 0-15, 16-31 */
    uint8_t *op = o + es * j;
    if (bf16) {
      st8(op, _mm256_castsi256_ps(w0), nt), st8(op + 32, _mm256_castsi256_ps(w1), nt);
    } else {
      __m256i f[4];
      f[0] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w0)), 16);
      f[1] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w0, 1)), 16);
      f[2] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w1)), 16);
      f[3] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w1, 1)), 16);
      if (x->raw1) {
        __m256i r1 = _mm256_loadu_si256((const __m256i *)(const void *)(x->raw1 + i));
        __m256i r2 = _mm256_loadu_si256((const __m256i *)(const void *)(x->raw2 + i));
        r1 = _mm256_permute4x64_epi64(r1, 0xD8), r2 = _mm256_permute4x64_epi64(r2, 0xD8);
        __m256i l0 = _mm256_unpacklo_epi8(r2, r1), l1 = _mm256_unpackhi_epi8(r2, r1);
        f[0] = _mm256_or_si256(f[0], _mm256_cvtepu16_epi32(_mm256_castsi256_si128(l0)));
        f[1] = _mm256_or_si256(f[1], _mm256_cvtepu16_epi32(_mm256_extracti128_si256(l0, 1)));
        f[2] = _mm256_or_si256(f[2], _mm256_cvtepu16_epi32(_mm256_castsi256_si128(l1)));
        f[3] = _mm256_or_si256(f[3], _mm256_cvtepu16_epi32(_mm256_extracti128_si256(l1, 1)));
      }
      for (int q = 0; q < 4; q++) st8(op + 32 * q, _mm256_castsi256_ps(f[q]), nt);
    }
    j += 32;
  }
  if (j < n) ei = qc__ref_qinsx(x, e0 + j, n - j, ei, o + es * j, bf16, 0);
  if (nt) _mm_sfence();
  return ei;
}

const qc__kernel qc__kernel_avx2 = {
    "avx2",          k_qins8,           qc__avx2_qins16,     qc__avx2_seedlog,     qc__avx2_lut8,
    qc__avx2_qinsx, qc__avx2_f16_to_f32, qc__avx2_bf16_to_f32, qc__avx2_f32_to_f16, qc__avx2_f32_to_bf16,
};
