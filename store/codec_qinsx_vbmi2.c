/* SPDX-License-Identifier: MIT */
/*
 * codec_qinsx_vbmi2.c — the AVX-512 qinsx decode kernel (codec_int.h contract), compiled with the
 * AVX-512 flags plus -mavx512vbmi2 and used only when the CPU has VBMI2 (codec.c checks).
 *
 * 64 elements a step, no gathers: the three plane words of a group are the three mask registers
 * of the codes; a masked add builds the 64 code bytes, one vpermb looks their exponents up in the
 * chunk's 8-byte table, and one vpexpandb (expand-load) puts the escapes, in order, into the lanes
 * whose code is 7 (the lanes where all three masks are set). Two vpternlogd merge exponent and
 * raw byte into the two top bytes of each f32 (sign | exponent >> 1; exponent bit 0 | 7 mantissa
 * bits), and vpermt2b interleaves them into four vectors of 16 floats (bf16 variant; the low
 * bytes are zero), two of 32 bf16 words (bf16 output), or, with the two low raw planes, two
 * vpermt2b + one vpermt2w per 16 floats (f32 variant). A step may start anywhere in a group (its
 * masks are then shifted together from two groups); with non-temporal stores the elements before
 * out's next 64-byte boundary go through the reference kernel; the last step is masked.
 *
 * Invariants: equal to qc__ref_qinsx bit for bit (integer operations only); reads only the
 * segment's group records, raw bytes and escapes (masked loads); writes only out[0..n).
 */
#include <immintrin.h>

#include "codec_int.h"

/* Permute indices that interleave two vectors of N lanes: entry 2k is lane k of the first, entry
 * 2k + 1 lane k of the second (index N + k). QX_F32 places (b2[k], b3[k]) in bytes 2 and 3 of
 * float k; its bytes 0 and 1 are zeroed by the hi2 mask, so their index does not matter. */
#define QX_ZIP(k, N) (k), (N) + (k)
#define QX_F32(k, N) 0, 0, QX_ZIP(k, N)
#define QX_EACH8(F, k, N) F(k, N), F(k + 1, N), F(k + 2, N), F(k + 3, N), F(k + 4, N), \
                          F(k + 5, N), F(k + 6, N), F(k + 7, N)
#define QX_EACH32(F, N) QX_EACH8(F, 0, N), QX_EACH8(F, 8, N), QX_EACH8(F, 16, N), QX_EACH8(F, 24, N)
#define QX_EACH64(F, N) QX_EACH32(F, N), QX_EACH8(F, 32, N), QX_EACH8(F, 40, N), \
                        QX_EACH8(F, 48, N), QX_EACH8(F, 56, N)

/* Byte lanes of the (b2, b3) pair into the top two bytes of 64 floats, 16 a vector. */
static const uint8_t qx_idx_f32[] __attribute__((aligned(64))) = {QX_EACH64(QX_F32, 64)};
/* Byte lanes of two vectors interleaved into 64 words, 32 a vector (bf16 output; raw2/raw1). */
static const uint8_t qx_idx_w[] __attribute__((aligned(64))) = {QX_EACH64(QX_ZIP, 64)};
/* Word lanes of two vectors interleaved into 32 dwords, 16 a vector (f32 variant: low, high). */
static const uint16_t qx_idx_d[] __attribute__((aligned(64))) = {QX_EACH32(QX_ZIP, 32)};
_Static_assert(sizeof qx_idx_f32 == 256 && sizeof qx_idx_w == 128 && sizeof qx_idx_d == 128,
               "the tables fill four, two and two 512-bit vectors");

uint64_t qc__vbmi2_qinsx(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out,
                         int bf16, int nt) {
  uint8_t *o = out;
  unsigned es = bf16 ? 2 : 4;
  uint64_t j = qc__qx_nt_head(x, e0, n, &ei, o, bf16, &nt, 64);
  const __m512i tbl = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(const void *)x->table));
  const __m512i k80 = _mm512_set1_epi8((char)0x80), one = _mm512_set1_epi8(1);
  const __m512i two = _mm512_set1_epi8(2), four = _mm512_set1_epi8(4);
  const __m512i iw0 = _mm512_load_si512(qx_idx_w), iw1 = _mm512_load_si512(qx_idx_w + 64);
  const __m512i id = _mm512_load_si512(qx_idx_d), id1 = _mm512_load_si512(qx_idx_d + 32);
  __m512i if32[4];
  for (int g = 0; g < 4; g++) if32[g] = _mm512_load_si512(qx_idx_f32 + 64 * g);
  const __mmask64 hi2 = 0xCCCCCCCCCCCCCCCCull; /* bytes 2 and 3 of each f32 */
  while (j < n) {
    uint64_t cnt = n - j < 64 ? n - j : 64, i = e0 + j;
    __mmask64 vm = cnt == 64 ? ~(__mmask64)0 : (((__mmask64)1 << cnt) - 1);
    __mmask64 m0 = qc__qx_bits(x, i, cnt, 0) & vm, m1 = qc__qx_bits(x, i, cnt, 1) & vm;
    __mmask64 m2 = qc__qx_bits(x, i, cnt, 2) & vm, em = m0 & m1 & m2;
    __m512i c = _mm512_maskz_mov_epi8(m0, one);
    c = _mm512_mask_add_epi8(c, m1, c, two);
    c = _mm512_mask_add_epi8(c, m2, c, four);
    __m512i E = _mm512_permutexvar_epi8(c, tbl);
    E = _mm512_mask_expandloadu_epi8(E, em, x->esc + ei);
    ei += (uint64_t)__builtin_popcountll(em);
    __m512i r0 = _mm512_maskz_loadu_epi8(vm, x->raw0 + i);
    /* 0xCA: k80 ? first : second, bit by bit */
    __m512i b3 = _mm512_ternarylogic_epi32(k80, r0, _mm512_srli_epi16(E, 1), 0xCA);
    __m512i b2 = _mm512_ternarylogic_epi32(k80, _mm512_slli_epi16(E, 7), r0, 0xCA);
    uint8_t *op = o + es * j;
    if (bf16) {
      __m512i w0 = _mm512_permutex2var_epi8(b2, iw0, b3), w1 = _mm512_permutex2var_epi8(b2, iw1, b3);
      if (cnt == 64) {
        if (nt) _mm512_stream_si512((void *)op, w0), _mm512_stream_si512((void *)(op + 64), w1);
        else _mm512_storeu_si512(op, w0), _mm512_storeu_si512(op + 64, w1);
      } else {
        _mm512_mask_storeu_epi16(op, (__mmask32)(cnt >= 32 ? ~0u : (1u << cnt) - 1), w0);
        if (cnt > 32) _mm512_mask_storeu_epi16(op + 64, (__mmask32)((1ull << (cnt - 32)) - 1), w1);
      }
    } else {
      __m512i f[4];
      if (!x->raw1) {
        for (int q = 0; q < 4; q++) f[q] = _mm512_maskz_permutex2var_epi8(hi2, b2, if32[q], b3);
      } else {
        __m512i r1 = _mm512_maskz_loadu_epi8(vm, x->raw1 + i), r2 = _mm512_maskz_loadu_epi8(vm, x->raw2 + i);
        __m512i l0 = _mm512_permutex2var_epi8(r2, iw0, r1), l1 = _mm512_permutex2var_epi8(r2, iw1, r1);
        __m512i h0 = _mm512_permutex2var_epi8(b2, iw0, b3), h1 = _mm512_permutex2var_epi8(b2, iw1, b3);
        f[0] = _mm512_permutex2var_epi16(l0, id, h0), f[1] = _mm512_permutex2var_epi16(l0, id1, h0);
        f[2] = _mm512_permutex2var_epi16(l1, id, h1), f[3] = _mm512_permutex2var_epi16(l1, id1, h1);
      }
      if (cnt == 64) {
        for (int q = 0; q < 4; q++) {
          if (nt) _mm512_stream_si512((void *)(op + 64 * q), f[q]);
          else _mm512_storeu_si512(op + 64 * q, f[q]);
        }
      } else {
        for (int q = 0; q < 4 && 16 * (uint64_t)q < cnt; q++) {
          uint64_t k = cnt - 16 * (uint64_t)q;
          _mm512_mask_storeu_epi32(op + 64 * q, (__mmask16)(k >= 16 ? 0xFFFF : (1u << k) - 1), f[q]);
        }
      }
    }
    j += cnt;
  }
  if (nt) _mm_sfence();
  return ei;
}
