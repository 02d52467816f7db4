/* SPDX-License-Identifier: MIT */
/*
 * codec_int.h — internals shared by codec.c, codec_ref.c and the SIMD kernels (qc__). Not for
 * other modules: they include codec.h.
 *
 * A decode kernel works on a *segment*: n consecutive elements of one chunk that lie in
 * consecutive equal-size blocks (within one row, or across rows when row_len is a multiple of B),
 * the first element at offset `off` (0 <= off < B) inside its block. Element j of the segment uses
 * block (off + j) / B: scales[] points at the segment's first block. codec.c cuts a range into
 * segments and tiles non-f32 outputs; kernels only write f32. Kernels read only the blocks and
 * codes of their segment, write out[0..n) (any alignment: they never dereference a float pointer
 * that may be misaligned) and, when `nt` is set, may use non-temporal stores (then they end with
 * a store fence).
 *
 * Bit-identity: every kernel computes what codec_ref.c computes, with the same operations in the
 * same order on the same float values (a per-call 256-entry lookup table of the reference's
 * per-code values, then one multiplication): no FMA, no reassociation.
 */
#ifndef QINS_CODEC_INT_H
#define QINS_CODEC_INT_H

#include <stdint.h>
#include <string.h>

#include "codec.h"

/* A coded qinsx chunk as the kernels see it (docs/FORMAT.md §1.5). Element i's exponent code is
 * bit (i % 64) of the three u64 plane words of group i / 64 (bit 0 from planes[24g], bit 1 from
 * planes[24g + 8], bit 2 from planes[24g + 16]); its exponent is table[code], or for code 7 the
 * next byte of esc; its f32 bits are (raw0 & 0x80) << 24 | exponent << 23 | (raw0 & 0x7F) << 16
 * | raw1 << 8 | raw2, with raw1 = raw2 = 0 when raw1 is NULL (the bf16 variant). */
typedef struct qc__qx {
  const uint8_t *planes;             /* group records, 24 bytes per 64 elements */
  const uint8_t *raw0, *raw1, *raw2; /* raw byte planes, element-indexed (raw1, raw2 may be NULL) */
  const uint8_t *esc;                /* escape exponents, element order */
  uint64_t n_esc;                    /* escapes in the chunk (bytes at esc) */
  uint8_t table[8];                  /* exponents of codes 0..6; [7] is 0 */
} qc__qx;

typedef struct qc__kernel {
  const char *name; /* "ref", "avx2", "avx512" */
  /* qins8: out[j] = f16(scales[(off+j)/32]) * lut[codes[j]]; scales are LE fp16, lut the 256
   * signed table entries. */
  void (*qins8)(const float *lut, const uint8_t *scales, const uint8_t *codes, uint64_t off,
                uint64_t n, void *out, int nt);
  /* qins16: out[j] = decode(exps[(off+j)/64], code j); codes are LE u16 at any alignment. */
  void (*qins16)(const int8_t *exps, const uint8_t *codes, uint64_t off, uint64_t n, void *out,
                 int nt);
  /* seed-log: out[j] = (float)sign[j] * lut[stored[j]]. */
  void (*seedlog)(const float *lut, const int8_t *sign, const uint8_t *stored, uint64_t n,
                  void *out, int nt);
  /* out[j] = lut[codes[j]] (seed-rational). */
  void (*lut8)(const float *lut, const uint8_t *codes, uint64_t n, void *out, int nt);
  /* qinsx: elements [e0, e0 + n) of chunk x, whose first escape (if any) is esc[ei], as f32, or
   * as bf16 when `bf16` is set (bf16 variant only: the stored bits). Returns the index of the
   * next escape after the segment. */
  uint64_t (*qinsx)(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out, int bf16,
                    int nt);
  /* Conversions between LE 16-bit floats and f32 (any alignment). */
  void (*f16_to_f32)(const void *src, uint64_t n, void *dst);
  void (*bf16_to_f32)(const void *src, uint64_t n, void *dst);
  void (*f32_to_f16)(const void *src, uint64_t n, void *dst);
  void (*f32_to_bf16)(const void *src, uint64_t n, void *dst);
} qc__kernel;

extern const qc__kernel qc__kernel_ref;    /* codec_ref.c: portable scalar kernels */
extern const qc__kernel qc__kernel_avx2;   /* codec_avx2.c */
extern const qc__kernel qc__kernel_avx512; /* codec_avx512.c */

/* AVX2 segment kernels (codec_avx2.c), reused by the AVX-512 table where AVX-512 does not pay. */
void qc__avx2_qins16(const int8_t *exps, const uint8_t *codes, uint64_t off, uint64_t n, void *out,
                     int nt);
void qc__avx2_seedlog(const float *lut, const int8_t *sign, const uint8_t *stored, uint64_t n,
                      void *out, int nt);
void qc__avx2_lut8(const float *lut, const uint8_t *codes, uint64_t n, void *out, int nt);
uint64_t qc__avx2_qinsx(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out,
                        int bf16, int nt);
/* The AVX-512 VBMI2 qinsx kernel (codec_qinsx_vbmi2.c): qc__kernel_avx512 uses it when the CPU
 * has VBMI2 (vpexpandb), else the AVX2 one. */
uint64_t qc__vbmi2_qinsx(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out,
                         int bf16, int nt);
void qc__avx2_f16_to_f32(const void *src, uint64_t n, void *dst);
void qc__avx2_bf16_to_f32(const void *src, uint64_t n, void *dst);
void qc__avx2_f32_to_f16(const void *src, uint64_t n, void *dst);
void qc__avx2_f32_to_bf16(const void *src, uint64_t n, void *dst);

/* Unaligned little-endian loads and stores (x86-64 and every target we build for is LE; the
 * memcpy compiles to one mov). */
static inline uint16_t qc__ld16(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t qc__ld32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline float qc__ldf(const void *p) { float v; memcpy(&v, p, 4); return v; }
static inline void qc__st16(void *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void qc__st32(void *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void qc__stf(void *p, float v) { memcpy(p, &v, 4); }
static inline uint32_t qc__fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float qc__bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Blocks of B > 0 elements in a row of row_len: each row starts a new block, so a row's last
 * block may be short (docs/FORMAT.md §1.1). Written so that it cannot overflow. */
static inline uint64_t qc__blocks_per_row(uint64_t row_len, uint32_t B) {
  return row_len / B + (row_len % B != 0);
}
/* Elements in block b (< qc__blocks_per_row) of a row of row_len: B, or fewer in the row's last. */
static inline uint32_t qc__block_len(uint64_t row_len, uint64_t b, uint32_t B) {
  uint64_t rem = row_len - b * B;
  return (uint32_t)(rem < B ? rem : B);
}

/* For a kernel with non-temporal stores (*nt set): how many of its n elements of es bytes to
 * write with ordinary stores before out reaches an `align`-byte boundary, where the streaming
 * stores start. 0 when *nt is clear; an out that is not es-aligned never gets there, so *nt is
 * cleared. */
static inline uint64_t qc__nt_head(const void *out, uint64_t n, unsigned es, unsigned align,
                                   int *nt) {
  uintptr_t a = (uintptr_t)out;
  if (!*nt) return 0;
  if (a % es) return *nt = 0, 0;
  uint64_t h = ((align - a % align) % align) / es;
  return h < n ? h : n;
}

/* Reference per-code values (codec_ref.c), the single definition every kernel's lookup table is
 * built from. */
float qc__seedlog_mag(const qc_params *p, uint8_t stored);  /* expf(log_min + n*(max-min)) */
float qc__seedrat_value(float alpha, uint8_t q);            /* seed-rational decode of q */
float qc__qins16_value(int e, uint16_t code);               /* qins16 decode (e != -128) */
/* lut[c] = c & 0x80 ? -T[c & 0x7F] : T[c & 0x7F] */
void qc__qins8_lut(const qc_params *p, float lut[256]);
void qc__seedlog_lut(const qc_params *p, float lut[256]);
void qc__seedrat_lut(const qc_params *p, float lut[256]);

/* qins8 encoder: bins of the starting-index table over x = |w|/d in [0, 1]. */
#define QC__Q8_GUESS 2048
/* Estimated squared error of one full qins8 block (32 weights) at scale d (codec.c
 * q8_err_fast): per weight min((a - d t0[i])^2, (a - d t1[i])^2) with i = (int)(min(a/d, 1) *
 * QC__Q8_GUESS); 8 lane accumulators, lane l summing weights l, l+8, l+16, l+24, then added in
 * lane order, so that the AVX2 version returns the same float as the scalar one. */
float qc__avx2_q8_err32(const float *t0, const float *t1, float d, const float *w);

/* Argument checks shared by qc_decode and qc_decode_ref: 0 or QINS_EINVALID. */
int qc__check_decode(const qc_params *p, uint64_t row_len, uint64_t n_rows, uint64_t begin,
                     uint64_t end, qc_dtype dt);

/* Scalar tails shared by SIMD kernels (same arithmetic as the reference). */
void qc__ref_qins8(const float *lut, const uint8_t *scales, const uint8_t *codes, uint64_t off,
                   uint64_t n, void *out, int nt);
void qc__ref_qins16(const int8_t *exps, const uint8_t *codes, uint64_t off, uint64_t n,
                    void *out, int nt);
void qc__ref_seedlog(const float *lut, const int8_t *sign, const uint8_t *stored, uint64_t n,
                     void *out, int nt);
void qc__ref_lut8(const float *lut, const uint8_t *codes, uint64_t n, void *out, int nt);

/* qinsx chunk helpers (codec_qinsx.c). */
/* Fills *x from a coded chunk of n elements (variant QC_QX_BF16 or QC_QX_F32). */
void qc__qx_view(const uint8_t *chunk, uint64_t n, qc__qx *x /* out */);
/* Bytes from the chunk start to the group records / raw planes of a coded chunk of n elements. */
uint64_t qc__qx_planes_off(uint64_t n);
/* Index in the escape array of the first escape at or after element e of a coded chunk (x its
 * view): the super-block index entry plus the popcounts of the groups between. */
uint64_t qc__qx_esc_before(const uint8_t *chunk, const qc__qx *x, uint64_t e);
/* The three plane words of group g (element bits) and its escape mask. */
static inline uint64_t qc__qx_word(const qc__qx *x, uint64_t g, int k) {
  uint64_t v;
  memcpy(&v, x->planes + 24 * g + 8 * k, 8);
  return v;
}
/* Plane k's bits of elements [i, i + cnt) (cnt <= 64) in bits 0..cnt-1 (higher bits: whatever
 * follows); reads group i / 64 + 1 only when the range reaches it. */
static inline uint64_t qc__qx_bits(const qc__qx *x, uint64_t i, uint64_t cnt, int k) {
  uint64_t g = i / 64, s = i % 64, v = qc__qx_word(x, g, k);
  if (!s) return v;
  v >>= s;
  if (s + cnt > 64) v |= qc__qx_word(x, g + 1, k) << (64 - s);
  return v;
}
uint64_t qc__ref_qinsx(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out, int bf16,
                       int nt);
/* For a qinsx kernel with non-temporal stores (*nt set): decodes with the reference the elements
 * before out's next `align`-byte boundary (qc__nt_head) and returns how many; *ei advances past
 * their escapes. */
static inline uint64_t qc__qx_nt_head(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t *ei,
                                      void *out, int bf16, int *nt, unsigned align) {
  uint64_t j = qc__nt_head(out, n, bf16 ? 2 : 4, align, nt);
  if (j) *ei = qc__ref_qinsx(x, e0, j, *ei, out, bf16, 0);
  return j;
}
/* qinsx encode, size and validation (codec_qinsx.c), called by codec.c. */
int qc__qx_encode(uint64_t n, const float *src, uint8_t *dst, qc_stats *st);
int qc__qx_size(uint64_t n, const uint8_t *chunk, uint64_t avail, uint64_t *size);
int qc__qx_validate(uint64_t n, const uint8_t *chunk);
uint64_t qc__qx_bound(uint64_t n, int *overflow);

#endif /* QINS_CODEC_INT_H */
