/* SPDX-License-Identifier: MIT */
/*
 * codec_ref.c — the scalar reference decoder of the QINS codecs: the executable form of
 * ../shared/docs/QINS.md's normative decode rules and of docs/FORMAT.md §1. Always built, never
 * vectorized by hand; every SIMD kernel is tested bit for bit against qc_decode_ref.
 *
 * Also here: the scalar f16/bf16 conversions (round to nearest even; subnormals, infinities and
 * NaN handled; NaN comes out quiet with its sign and top payload bits, as F16C does), the qins16
 * mantissa table, the per-code values every kernel's lookup table is built from, and the portable
 * segment kernels (qc__kernel_ref) the dispatcher falls back to.
 *
 * Invariants: float/double arithmetic only as written (the Makefile compiles codec* files with
 * -ffp-contract=off: no FMA); reads stay inside the chunk bytes of the requested blocks; no
 * allocation.
 */
#include <math.h>
#include <pthread.h>

#include "codec_int.h"
#include "qins_base.h"

/* ---- f16 / bf16 conversions ------------------------------------------------------------- */

float qc_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    if (m == 0) return qc__bitsf(sign);
    return qc__bitsf(sign | qc__fbits((float)m * 0x1p-24f)); /* subnormal: exact */
  }
  if (e == 31) return qc__bitsf(sign | 0x7F800000u | (m ? 0x400000u | (m << 13) : 0));
  return qc__bitsf(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t qc_f32_to_f16(float f) {
  uint32_t x = qc__fbits(f), a = x & 0x7FFFFFFFu;
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu)); /* NaN, quiet */
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 rounds to infinity */
  if (a >= 0x38800000u) {                                  /* normal f16: >= 2^-14 */
    uint32_t r = a - 0x38000000u;                          /* rebias 127 -> 15 */
    r += 0xFFFu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
  }
  if (a <= 0x33000000u) return sign; /* <= 2^-25: zero (2^-25 is a tie, to even) */
  uint32_t e = a >> 23, mant = (a & 0x7FFFFFu) | 0x800000u, shift = 126u - e; /* 14..24 */
  uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) r++;
  return (uint16_t)(sign | r);
}

float qc_bf16_to_f32(uint16_t h) { return qc__bitsf((uint32_t)h << 16); }

uint16_t qc_f32_to_bf16(float f) {
  uint32_t x = qc__fbits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u); /* NaN, quiet */
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/* ---- per-code values -------------------------------------------------------------------- */

static float qc_mt[2048];
static pthread_once_t qc_mt_once = PTHREAD_ONCE_INIT;
static void qc_mt_init(void) {
  for (int r = 0; r < 2048; r++) qc_mt[r] = (float)exp2(-r / 2048.0);
}
const float *qc_qins16_mantissa(void) {
  pthread_once(&qc_mt_once, qc_mt_init);
  return qc_mt;
}

float qc__qins16_value(int e, uint16_t code) {
  uint32_t m = code & 0x7FFFu;
  float v = m == QC_QINS16_ZERO ? 0.0f : ldexpf(qc_qins16_mantissa()[m & 2047u], e - (int)(m >> 11));
  return (code & 0x8000u) ? -v : v;
}

float qc__seedlog_mag(const qc_params *p, uint8_t stored) {
  float n = (float)(255 - (int)stored) / 254.0f;
  return expf(p->log_min + n * (p->log_max - p->log_min));
}

float qc__seedrat_value(float alpha, uint8_t q) {
  float e = (float)q / 127.5f - 1.0f;
  float s = e > 0 ? 1.0f : e < 0 ? -1.0f : 0.0f;
  float ae = fabsf(e);
  return s * (1.0f - ae) / (alpha * fmaxf(ae, 1e-12f));
}

void qc__qins8_lut(const qc_params *p, float lut[256]) {
  for (int c = 0; c < 256; c++) lut[c] = (c & 0x80) ? -p->table[c & 0x7F] : p->table[c & 0x7F];
}
void qc__seedlog_lut(const qc_params *p, float lut[256]) {
  for (int c = 0; c < 256; c++) lut[c] = qc__seedlog_mag(p, (uint8_t)c);
}
void qc__seedrat_lut(const qc_params *p, float lut[256]) {
  for (int c = 0; c < 256; c++) lut[c] = qc__seedrat_value(p->alpha, (uint8_t)c);
}

/* ---- portable segment kernels (codec_int.h contract) ------------------------------------ */

void qc__ref_qins8(const float *lut, const uint8_t *scales, const uint8_t *codes, uint64_t off,
                   uint64_t n, void *out, int nt) {
  (void)nt;
  uint8_t *o = out;
  for (uint64_t j = 0; j < n; j++) {
    float d = qc_f16_to_f32(qc__ld16(scales + 2 * ((off + j) / QC_QINS8_BLOCK)));
    qc__stf(o + 4 * j, d * lut[codes[j]]);
  }
}

void qc__ref_qins16(const int8_t *exps, const uint8_t *codes, uint64_t off, uint64_t n,
                    void *out, int nt) {
  (void)nt;
  uint8_t *o = out;
  for (uint64_t j = 0; j < n; j++) {
    int e = exps[(off + j) / QC_QINS16_BLOCK];
    qc__stf(o + 4 * j, qc__qins16_value(e, qc__ld16(codes + 2 * j)));
  }
}

void qc__ref_seedlog(const float *lut, const int8_t *sign, const uint8_t *stored, uint64_t n,
                     void *out, int nt) {
  (void)nt;
  uint8_t *o = out;
  for (uint64_t j = 0; j < n; j++) qc__stf(o + 4 * j, (float)sign[j] * lut[stored[j]]);
}

void qc__ref_lut8(const float *lut, const uint8_t *codes, uint64_t n, void *out, int nt) {
  (void)nt;
  uint8_t *o = out;
  for (uint64_t j = 0; j < n; j++) qc__stf(o + 4 * j, lut[codes[j]]);
}

/* docs/FORMAT.md §1.5: code = plane bits; exponent = table[code], or the next escape for code 7;
 * f32 bits = (raw0 & 0x80) << 24 | exponent << 23 | (raw0 & 0x7F) << 16 | raw1 << 8 | raw2. */
uint64_t qc__ref_qinsx(const qc__qx *x, uint64_t e0, uint64_t n, uint64_t ei, void *out, int bf16,
                       int nt) {
  (void)nt;
  uint8_t *o = out;
  for (uint64_t j = 0; j < n; j++) {
    uint64_t i = e0 + j, g = i / QC_QX_GROUP;
    unsigned b = (unsigned)(i % QC_QX_GROUP);
    unsigned c = (unsigned)((qc__qx_word(x, g, 0) >> b) & 1) |
                 (unsigned)((qc__qx_word(x, g, 1) >> b) & 1) << 1 |
                 (unsigned)((qc__qx_word(x, g, 2) >> b) & 1) << 2;
    uint32_t e = c == QC_QX_ESCAPE ? x->esc[ei++] : x->table[c];
    uint32_t r0 = x->raw0[i];
    uint32_t u = (r0 & 0x80u) << 24 | e << 23 | (r0 & 0x7Fu) << 16;
    if (x->raw1) u |= (uint32_t)x->raw1[i] << 8 | x->raw2[i];
    if (bf16) qc__st16(o + 2 * j, (uint16_t)(u >> 16));
    else qc__st32(o + 4 * j, u);
  }
  return ei;
}

/* The conversion kernels: n elements from src to dst through one scalar conversion each. */
static inline void ref_widen(const void *src, uint64_t n, void *dst, float (*cv)(uint16_t)) {
  const uint8_t *s = src;
  uint8_t *d = dst;
  for (uint64_t i = 0; i < n; i++) qc__stf(d + 4 * i, cv(qc__ld16(s + 2 * i)));
}
static inline void ref_narrow(const void *src, uint64_t n, void *dst, uint16_t (*cv)(float)) {
  const uint8_t *s = src;
  uint8_t *d = dst;
  for (uint64_t i = 0; i < n; i++) qc__st16(d + 2 * i, cv(qc__ldf(s + 4 * i)));
}
static void ref_f16_to_f32(const void *s, uint64_t n, void *d) { ref_widen(s, n, d, qc_f16_to_f32); }
static void ref_bf16_to_f32(const void *s, uint64_t n, void *d) { ref_widen(s, n, d, qc_bf16_to_f32); }
static void ref_f32_to_f16(const void *s, uint64_t n, void *d) { ref_narrow(s, n, d, qc_f32_to_f16); }
static void ref_f32_to_bf16(const void *s, uint64_t n, void *d) { ref_narrow(s, n, d, qc_f32_to_bf16); }

const qc__kernel qc__kernel_ref = {
    "ref",           qc__ref_qins8,  qc__ref_qins16,  qc__ref_seedlog, qc__ref_lut8,
    qc__ref_qinsx,   ref_f16_to_f32,  ref_bf16_to_f32, ref_f32_to_f16, ref_f32_to_bf16,
};

/* ---- qc_decode_ref: the executable spec, one element at a time --------------------------- */

/* Stores f32 value v as element i of an output of dtype dt. */
static void put(qc_dtype dt, void *out, uint64_t i, float v) {
  uint8_t *o = out;
  if (dt == QC_DT_F32) qc__stf(o + 4 * i, v);
  else qc__st16(o + 2 * i, dt == QC_DT_F16 ? qc_f32_to_f16(v) : qc_f32_to_bf16(v));
}

/* qinsx, one element at a time: raw variants are the passthrough codecs after the header; an
 * output in the chunk's own 16-bit dtype is the stored bits (bf16 variant: the top half of the
 * f32 bits), any other output the f32 value converted. */
static void decode_ref_qinsx(const uint8_t *c, uint64_t n, uint64_t begin, uint64_t end,
                             qc_dtype dt, void *out) {
  int v = c[0];
  const uint8_t *vals = c + QC_QX_HDR;
  qc__qx x;
  uint64_t ei = 0;
  if (v == QC_QX_BF16 || v == QC_QX_F32) {
    qc__qx_view(c, n, &x);
    ei = qc__qx_esc_before(c, &x, begin);
  }
  for (uint64_t i = begin; i < end; i++) {
    uint64_t k = i - begin;
    uint32_t u;
    switch (v) {
    case QC_QX_F16_RAW:
      if (dt == QC_DT_F16) {
        qc__st16((uint8_t *)out + 2 * k, qc__ld16(vals + 2 * i));
        continue;
      }
      u = qc__fbits(qc_f16_to_f32(qc__ld16(vals + 2 * i)));
      break;
    case QC_QX_BF16_RAW: u = (uint32_t)qc__ld16(vals + 2 * i) << 16; break;
    case QC_QX_F32_RAW: u = qc__ld32(vals + 4 * i); break;
    default: ei = qc__ref_qinsx(&x, i, 1, ei, &u, 0, 0); break;
    }
    int bf16_bits = v == QC_QX_BF16 || v == QC_QX_BF16_RAW;
    if (dt == QC_DT_F32) qc__st32((uint8_t *)out + 4 * k, u);
    else if (dt == QC_DT_BF16 && bf16_bits) qc__st16((uint8_t *)out + 2 * k, (uint16_t)(u >> 16));
    else put(dt, out, k, qc__bitsf(u));
  }
}

int qc_decode_ref(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
                  uint64_t begin, uint64_t end, qc_dtype dt, void *out) {
  int rc = qc__check_decode(p, row_len, n_rows, begin, end, dt);
  if (rc) return rc;
  const uint8_t *c = chunk;
  uint64_t n = row_len * n_rows;
  if (p->codec == QC_QINSX) {
    if (begin < end) decode_ref_qinsx(c, n, begin, end, dt, out);
    return 0;
  }
  uint32_t B = qc_codec_block(p->codec);
  uint64_t bpr = B ? qc__blocks_per_row(row_len, B) : 0;
  uint64_t nb = bpr * n_rows;
  for (uint64_t i = begin; i < end; i++) {
    uint64_t k = i - begin;
    uint64_t blk = B ? (i / row_len) * bpr + (i % row_len) / B : 0; /* block of element i */
    switch (p->codec) {
    case QC_F32:
      if (dt == QC_DT_F32) memcpy((uint8_t *)out + 4 * k, c + 4 * i, 4);
      else put(dt, out, k, qc__ldf(c + 4 * i));
      break;
    case QC_F16:
    case QC_BF16: {
      uint16_t h = qc__ld16(c + 2 * i);
      qc_dtype src = p->codec == QC_F16 ? QC_DT_F16 : QC_DT_BF16;
      if (dt == src) qc__st16((uint8_t *)out + 2 * k, h); /* same dtype: the stored bits */
      else put(dt, out, k, src == QC_DT_F16 ? qc_f16_to_f32(h) : qc_bf16_to_f32(h));
      break;
    }
    case QC_QINS8: { /* QINS.md qins8: w = (float)d * (c & 0x80 ? -T[c & 0x7F] : T[c & 0x7F]) */
      float d = qc_f16_to_f32(qc__ld16(c + 2 * blk));
      uint8_t code = c[2 * nb + i];
      float t = (code & 0x80) ? -p->table[code & 0x7F] : p->table[code & 0x7F];
      put(dt, out, k, d * t);
      break;
    }
    case QC_QINS16: { /* QINS.md qins16: w = +-ldexpf(MT[m & 2047], e - (m >> 11)); 32767 = 0 */
      int e = (int8_t)c[blk];
      put(dt, out, k, qc__qins16_value(e, qc__ld16(c + nb + 2 * i)));
      break;
    }
    case QC_SEED_LOG: /* w = sign * expf(log_min + n*(log_max - log_min)) */
      put(dt, out, k, (float)(int8_t)c[i] * qc__seedlog_mag(p, c[n + i]));
      break;
    case QC_SEED_RATIONAL:
      put(dt, out, k, qc__seedrat_value(p->alpha, c[i]));
      break;
    default:
      return QINS_EINVALID;
    }
  }
  return 0;
}
