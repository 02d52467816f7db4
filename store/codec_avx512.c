/* SPDX-License-Identifier: MIT */
/*
 * codec_avx512.c — AVX-512 (F, BW, VL, VBMI) decode kernels (codec_int.h contract), compiled with
 * the AVX-512 flags and used only when the CPU has all of them.
 *
 * qins8 without gathers: the 128 magnitudes T[m] are split into four byte planes of 128 bytes,
 * each held in two zmm registers; one vpermi2b per plane looks up 64 codes at once (it uses bits
 * 0-6 of each code and ignores the sign bit 7). The sign bit is or'ed into the top plane, and
 * byte/word unpacks interleave the planes into 64 floats. Unpacks work within 128-bit lanes, so
 * the codes are first permuted (vpermb) such that the four result vectors come out in element
 * order. Each 16-float vector is then multiplied by its block scales (a vpermps picks each lane's
 * block among the up to three scales a 64-code group spans). Tails use masked loads and stores.
 * The result is bit-identical to the table entry +-T[m] times d, as in the reference.
 * qins16 is the AVX2 kernel widened to 16 lanes (masked tails); seed-log, seed-rational and the
 * conversions gain little over AVX2 and reuse its kernels. qinsx's kernel needs VBMI2 and lives in
 * codec_qinsx_vbmi2.c (codec.c falls back to the AVX2 one on a CPU without VBMI2).
 *
 * Invariants: as codec_avx2.c; masked loads never fault past the segment's last code or scale.
 */
#include <immintrin.h>

#include "codec_int.h"

/* Floats to write before out is 64-byte aligned, with non-temporal stores (qc__nt_head). */
static inline uint64_t nt_head(const uint8_t *o, uint64_t n, int *nt) { return qc__nt_head(o, n, 4, 64, nt); }

/* The byte planes of the last table this thread decoded with, and that table's 128 positive
 * entries: building the planes (about 50 shuffles) cost more than decoding a short segment (a row
 * of a column slice, or each row when the row length is not a multiple of 32), and a table
 * compare is 8 loads. Keyed by the entries' bits, so any table is served exactly. */
static _Thread_local struct {
  __m512i t[8];          /* lut[0..127] the planes were built from */
  __m512i plo[4], phi[4]; /* byte planes of entries 0..63 and 64..127 */
  int ok;                /* built at least once */
} q8_planes;

static void k_qins8(const float *lut, const uint8_t *scales, const uint8_t *codes, uint64_t off,
                    uint64_t n, void *out, int nt) {
  uint8_t *o = out;
  uint64_t j = nt_head(o, n, &nt);
  if (j) qc__ref_qins8(lut, scales, codes, off, j, o, 0);
  if (j >= n) return;
  /* Byte planes of the 128 positive entries lut[0..127] (cached per thread, above). */
  __m512i plo[4], phi[4];
  __m512i t[8];
  __mmask16 diff = q8_planes.ok ? 0 : (__mmask16)1;
  for (int q = 0; q < 8; q++) {
    t[q] = _mm512_loadu_si512((const void *)(lut + 16 * q));
    diff |= _mm512_cmpneq_epi32_mask(t[q], q8_planes.t[q]);
  }
  if (!diff) {
    for (int k = 0; k < 4; k++) plo[k] = q8_planes.plo[k], phi[k] = q8_planes.phi[k];
  } else {
    /* Plane k byte m = byte k of lut[m]: gather bytes with vpermb across each 64-byte group. */
    const __m512i pick = _mm512_set_epi8(
        63, 59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3,
        62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2,
        61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21, 17, 13, 9, 5, 1,
        60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
    /* After vpermb, register t[q] holds 16-byte runs: plane0 of its 16 floats, plane1, ... */
    __m512i s[8];
    for (int q = 0; q < 8; q++) s[q] = _mm512_permutexvar_epi8(pick, t[q]);
    /* Plane k of entries 64h..64h+63 = 16-byte run k of s[4h..4h+3]. */
    for (int h = 0; h < 2; h++)
      for (int k = 0; k < 4; k++) {
        __m512i r = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) {
          __m128i run = _mm512_extracti32x4_epi32(s[4 * h + q], 0);
          switch (k) {
          case 1: run = _mm512_extracti32x4_epi32(s[4 * h + q], 1); break;
          case 2: run = _mm512_extracti32x4_epi32(s[4 * h + q], 2); break;
          case 3: run = _mm512_extracti32x4_epi32(s[4 * h + q], 3); break;
          default: break;
          }
          switch (q) {
          case 0: r = _mm512_inserti32x4(r, run, 0); break;
          case 1: r = _mm512_inserti32x4(r, run, 1); break;
          case 2: r = _mm512_inserti32x4(r, run, 2); break;
          default: r = _mm512_inserti32x4(r, run, 3); break;
          }
        }
        if (h == 0) plo[k] = r;
        else phi[k] = r;
      }
    for (int q = 0; q < 8; q++) q8_planes.t[q] = t[q];
    for (int k = 0; k < 4; k++) q8_planes.plo[k] = plo[k], q8_planes.phi[k] = phi[k];
    q8_planes.ok = 1;
  }
  /* perm[p] = 16g + 4L + q for p = 16L + 4g + q: output vector g, lane L, float q. */
  const __m512i perm = _mm512_set_epi8(
      63, 62, 61, 60, 47, 46, 45, 44, 31, 30, 29, 28, 15, 14, 13, 12,
      59, 58, 57, 56, 43, 42, 41, 40, 27, 26, 25, 24, 11, 10, 9, 8,
      55, 54, 53, 52, 39, 38, 37, 36, 23, 22, 21, 20, 7, 6, 5, 4,
      51, 50, 49, 48, 35, 34, 33, 32, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i sign = _mm512_set1_epi8((char)0x80);
  const __m512i lane16 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  /* Within a 64-code group starting at offset r in its block, vector g's lane l is in block
   * (r + 16g + l) >> 5 relative to the first: sidx[g] depends on r only, and r is constant
   * across groups (they advance by two whole blocks). */
  uint64_t k0 = off + j;
  unsigned r = (unsigned)(k0 & 31);
  __m512i sidx[4];
  for (int g = 0; g < 4; g++)
    sidx[g] = _mm512_srli_epi32(_mm512_add_epi32(lane16, _mm512_set1_epi32((int)r + 16 * g)), 5);
  const uint8_t *sc = scales + 2 * (k0 >> 5);
  const uint8_t *cp = codes + j;
  uint8_t *op = o + 4 * j;
  uint64_t left = n - j;
  uint64_t nsc = (r + left + 31) >> 5; /* scales this segment part still needs */
  while (left) {
    uint64_t cnt = left < 64 ? left : 64;
    __mmask64 cm = cnt == 64 ? ~(__mmask64)0 : (((__mmask64)1 << cnt) - 1);
    _mm_prefetch((const char *)cp + 1024, _MM_HINT_T0);
    __m512i c = _mm512_maskz_loadu_epi8(cm, cp);
    unsigned ns = (unsigned)(nsc < 3 ? nsc : 3);
    __m128i sh = _mm_maskz_loadu_epi16((__mmask8)((1u << ns) - 1), sc);
    __m512 d3 = _mm512_castps128_ps512(_mm_cvtph_ps(sh));
    __m512i cpm = _mm512_permutexvar_epi8(perm, c);
    __m512i b0 = _mm512_permutex2var_epi8(plo[0], cpm, phi[0]);
    __m512i b1 = _mm512_permutex2var_epi8(plo[1], cpm, phi[1]);
    __m512i b2 = _mm512_permutex2var_epi8(plo[2], cpm, phi[2]);
    __m512i b3 = _mm512_permutex2var_epi8(plo[3], cpm, phi[3]);
    b3 = _mm512_or_si512(b3, _mm512_and_si512(cpm, sign));
    __m512i w01l = _mm512_unpacklo_epi8(b0, b1), w01h = _mm512_unpackhi_epi8(b0, b1);
    __m512i w23l = _mm512_unpacklo_epi8(b2, b3), w23h = _mm512_unpackhi_epi8(b2, b3);
    __m512 f[4];
    f[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l));
    f[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l));
    f[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h));
    f[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h));
    if (cnt == 64) {
      for (int g = 0; g < 4; g++) {
        __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(sidx[g], d3), f[g]);
        if (nt) _mm512_stream_ps((float *)(void *)(op + 64 * g), v);
        else _mm512_storeu_ps((void *)(op + 64 * g), v);
      }
    } else {
      for (int g = 0; g < 4 && 16 * g < (int)cnt; g++) {
        unsigned k = (unsigned)cnt - 16 * g;
        __mmask16 m = k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << k) - 1);
        __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(sidx[g], d3), f[g]);
        _mm512_mask_storeu_ps((void *)(op + 64 * g), m, v);
      }
    }
    cp += cnt, op += 4 * cnt, left -= cnt;
    sc += 4, nsc = nsc > 2 ? nsc - 2 : 0;
  }
  if (nt) _mm_sfence();
}

/* qins16: as the AVX2 kernel, 16 lanes, with masked loads/gathers/stores for the tail. */
static void k_qins16(const int8_t *exps, const uint8_t *codes, uint64_t off, uint64_t n, void *out,
                     int nt) {
  uint8_t *o = out;
  const float *MT = qc_qins16_mantissa();
  uint64_t j = nt_head(o, n, &nt);
  if (j) qc__ref_qins16(exps, codes, off, j, o, 0);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m15 = _mm512_set1_epi32(0x7FFF), m11 = _mm512_set1_epi32(2047);
  const __m512i zero = _mm512_set1_epi32(QC_QINS16_ZERO), sbit = _mm512_set1_epi32(0x8000);
  while (j < n) {
    uint64_t cnt = n - j < 16 ? n - j : 16, k = off + j, b = k >> 6;
    unsigned r = (unsigned)(k & 63);
    __mmask16 mk = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
    __m512i ev = _mm512_set1_epi32(exps[b]);
    if (r + cnt > 64) /* lanes r + l >= 64 are in the next block */
      ev = _mm512_mask_mov_epi32(ev, _mm512_cmpge_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32((int)r)), _mm512_set1_epi32(64)),
                                 _mm512_set1_epi32(exps[b + 1]));
    __m512i c = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, codes + 2 * j));
    __m512i m = _mm512_and_si512(c, m15);
    __m512i mt = _mm512_castps_si512(
        _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, _mm512_and_si512(m, m11), MT, 4));
    __m512i sh = _mm512_sub_epi32(ev, _mm512_srli_epi32(m, 11));
    __m512i v = _mm512_add_epi32(mt, _mm512_slli_epi32(sh, 23));
    v = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(m, zero), v);
    v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(c, sbit), 16));
    if (cnt == 16 && nt) _mm512_stream_ps((void *)(o + 4 * j), _mm512_castsi512_ps(v));
    else _mm512_mask_storeu_ps((void *)(o + 4 * j), mk, _mm512_castsi512_ps(v));
    j += cnt;
  }
  if (nt) _mm_sfence();
}

const qc__kernel qc__kernel_avx512 = {
    "avx512",        k_qins8,           k_qins16,     qc__avx2_seedlog,     qc__avx2_lut8,
    qc__vbmi2_qinsx, qc__avx2_f16_to_f32, qc__avx2_bf16_to_f32, qc__avx2_f32_to_f16, qc__avx2_f32_to_bf16,
};
