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

#endif /* QINS_CODEC_INT_H */
