/* SPDX-License-Identifier: MIT */
/*
 * gguf_quant.c — dequantization of GGUF's block-quantized tensors, exactly as ggml defines them
 * (the block layouts of ggml's ggml-common.h and the scalar dequantize_row_* formulas of
 * ggml-quants.c; written here from those layouts). Internal to store/ (import_int.h).
 *
 * Exactness: every value is computed in single precision, one rounding per operation, in the
 * order ggml's scalar reference writes it (e.g. Q4_K: d1 * q - m1 with d1 = d * sc, m1 = dmin * m;
 * Q6_K: (d * sc) * q); fp16 scales are widened exactly (qc_f16_to_f32). This file is built with
 * -std=c11, so the compiler never fuses a multiply and an add into an FMA (-ffp-contract=off),
 * and the f32 result is the value ggml's reference gives. Stored as f32 (the default policy for
 * these sources) the tensor serves those values bit for bit.
 *
 * Layouts (bytes, little-endian; "half" is IEEE fp16; QK_K = 256):
 *   Q4_0  32 w, 18 B: half d | u8 qs[16]                      y = (nibble - 8) * d
 *   Q4_1  32 w, 20 B: half d | half m | u8 qs[16]             y = nibble * d + m
 *   Q5_0  32 w, 22 B: half d | u32 qh | u8 qs[16]             y = ((nibble | hbit << 4) - 16) * d
 *   Q5_1  32 w, 24 B: half d | half m | u32 qh | u8 qs[16]    y = (nibble | hbit << 4) * d + m
 *   Q8_0  32 w, 34 B: half d | i8 qs[32]                      y = q * d
 *   Q2_K 256 w, 84 B: u8 scales[16] | u8 qs[64] | half d | half dmin
 *   Q3_K 256 w,110 B: u8 hmask[32] | u8 qs[64] | u8 scales[12] | half d
 *   Q4_K 256 w,144 B: half d | half dmin | u8 scales[12] | u8 qs[128]
 *   Q5_K 256 w,176 B: half d | half dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]
 *   Q6_K 256 w,210 B: u8 ql[128] | u8 qh[64] | i8 scales[16] | half d
 *   Q8_K 256 w,292 B: f32 d | i8 qs[256] | i16 bsums[16]     y = d * q
 * In the 32-weight types byte j's low nibble is weight j and its high nibble weight j + 16 (qh bit
 * j and bit j + 16 give their fifth bits).
 */
#include <string.h>

#include "import_int.h"
#include "store_int.h"

static float qs__h(const uint8_t *p) { return qc_f16_to_f32(qs__get_u16(p)); }

/* The 6-bit scale and min j (0..7) of a Q4_K/Q5_K block's 12 packed bytes. */
static void qs__k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (uint8_t)((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

static void qs__dq_q4_0(const uint8_t *b, float *y) {
  float d = qs__h(b);
  for (int j = 0; j < 16; j++) {
    y[j] = (float)((b[2 + j] & 0x0F) - 8) * d;
    y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
  }
}

static void qs__dq_q4_1(const uint8_t *b, float *y) {
  float d = qs__h(b), m = qs__h(b + 2);
  for (int j = 0; j < 16; j++) {
    y[j] = (float)(b[4 + j] & 0x0F) * d + m;
    y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
  }
}

static void qs__dq_q5(const uint8_t *b, float *y, int with_min) {
  float d = qs__h(b), m = with_min ? qs__h(b + 2) : 0;
  const uint8_t *p = b + (with_min ? 4 : 2);
  uint32_t qh = qs__get_u32(p);
  const uint8_t *qs = p + 4;
  for (int j = 0; j < 16; j++) {
    int x0 = (qs[j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
    int x1 = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
    if (with_min) {
      y[j] = (float)x0 * d + m;
      y[j + 16] = (float)x1 * d + m;
    } else {
      y[j] = (float)(x0 - 16) * d;
      y[j + 16] = (float)(x1 - 16) * d;
    }
  }
}

static void qs__dq_q8_0(const uint8_t *b, float *y) {
  float d = qs__h(b);
  for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
}

static void qs__dq_q2_k(const uint8_t *b, float *y) {
  const uint8_t *sc = b, *q = b + 16;
  float d = qs__h(b + 80), dmin = qs__h(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128, q += 32)
    for (int shift = 0; shift < 8; shift += 2)
      for (int half = 0; half < 2; half++, is++) {
        float dl = d * (float)(sc[is] & 0x0F), ml = dmin * (float)(sc[is] >> 4);
        for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l + 16 * half] >> shift) & 3) - ml;
      }
}

static void qs__dq_q3_k(const uint8_t *b, float *y) {
  const uint8_t *hm = b, *q = b + 32, *s = b + 96;
  float d = qs__h(b + 108);
  int8_t scales[16];
  for (int i = 0; i < 16; i++) {
    /* Low 4 bits: bytes 0..7 (low nibbles for scales 0..7, high for 8..15); high 2 bits: bytes
     * 8..11, two bits per scale, scale i taking bits 2 * (i / 4) of byte 8 + i % 4. */
    int lo = i < 8 ? s[i] & 0x0F : s[i - 8] >> 4;
    int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    scales[i] = (int8_t)((lo | (hi << 4)) - 32);
  }
  int is = 0;
  uint8_t m = 1;
  for (int n = 0; n < 256; n += 128, q += 32)
    for (int shift = 0; shift < 8; shift += 2, m = (uint8_t)(m << 1))
      for (int half = 0; half < 2; half++, is++) {
        float dl = d * (float)scales[is];
        for (int l = 0; l < 16; l++) {
          int k = l + 16 * half;
          int v = ((q[k] >> shift) & 3) - ((hm[k] & m) ? 0 : 4);
          *y++ = dl * (float)v;
        }
      }
}

static void qs__dq_q45_k(const uint8_t *b, float *y, int five) {
  float d = qs__h(b), dmin = qs__h(b + 2);
  const uint8_t *sc = b + 4, *qh = b + 16, *ql = five ? b + 48 : b + 16;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32) {
    uint8_t s, mm;
    qs__k4_scale_min(is, sc, &s, &mm);
    float d1 = d * (float)s, m1 = dmin * (float)mm;
    qs__k4_scale_min(is + 1, sc, &s, &mm);
    float d2 = d * (float)s, m2 = dmin * (float)mm;
    for (int l = 0; l < 32; l++)
      *y++ = d1 * (float)((ql[l] & 0x0F) + (five && (qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; l++)
      *y++ = d2 * (float)((ql[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0)) - m2;
    u1 = (uint8_t)(u1 << 2);
    u2 = (uint8_t)(u2 << 2);
  }
}

static void qs__dq_q6_k(const uint8_t *b, float *y) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t *sc = (const int8_t *)(b + 192);
  float d = qs__h(b + 208);
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8)
    for (int l = 0; l < 32; l++) {
      int is = l / 16;
      int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * (float)sc[is] * (float)q1;
      y[l + 32] = d * (float)sc[is + 2] * (float)q2;
      y[l + 64] = d * (float)sc[is + 4] * (float)q3;
      y[l + 96] = d * (float)sc[is + 6] * (float)q4;
    }
}

static void qs__dq_q8_k(const uint8_t *b, float *y) {
  uint32_t u = qs__get_u32(b);
  float d;
  memcpy(&d, &u, 4);
  for (int j = 0; j < 256; j++) y[j] = d * (float)(int8_t)b[4 + j];
}

void qs__gguf_dequant(qs_dtype dt, const uint8_t *src, uint64_t n_blocks, float *dst) {
  unsigned bw, bb;
  qs__gguf_block(dt, &bw, &bb);
  for (uint64_t i = 0; i < n_blocks; i++, src += bb, dst += bw) {
    switch (dt) {
    case QS_DT_Q4_0: qs__dq_q4_0(src, dst); break;
    case QS_DT_Q4_1: qs__dq_q4_1(src, dst); break;
    case QS_DT_Q5_0: qs__dq_q5(src, dst, 0); break;
    case QS_DT_Q5_1: qs__dq_q5(src, dst, 1); break;
    case QS_DT_Q8_0: qs__dq_q8_0(src, dst); break;
    case QS_DT_Q2_K: qs__dq_q2_k(src, dst); break;
    case QS_DT_Q3_K: qs__dq_q3_k(src, dst); break;
    case QS_DT_Q4_K: qs__dq_q45_k(src, dst, 0); break;
    case QS_DT_Q5_K: qs__dq_q45_k(src, dst, 1); break;
    case QS_DT_Q6_K: qs__dq_q6_k(src, dst); break;
    case QS_DT_Q8_K: qs__dq_q8_k(src, dst); break;
    default: memset(dst, 0, bw * sizeof *dst); break; /* not a block type: never reached */
    }
  }
}

int qs__gguf_block(qs_dtype dt, unsigned *weights, unsigned *bytes) {
  static const unsigned short tab[][2] = {
      [QS_DT_Q4_0 - QS_DT_Q4_0] = {32, 18},  [QS_DT_Q4_1 - QS_DT_Q4_0] = {32, 20},
      [QS_DT_Q5_0 - QS_DT_Q4_0] = {32, 22},  [QS_DT_Q5_1 - QS_DT_Q4_0] = {32, 24},
      [QS_DT_Q8_0 - QS_DT_Q4_0] = {32, 34},  [QS_DT_Q2_K - QS_DT_Q4_0] = {256, 84},
      [QS_DT_Q3_K - QS_DT_Q4_0] = {256, 110}, [QS_DT_Q4_K - QS_DT_Q4_0] = {256, 144},
      [QS_DT_Q5_K - QS_DT_Q4_0] = {256, 176}, [QS_DT_Q6_K - QS_DT_Q4_0] = {256, 210},
      [QS_DT_Q8_K - QS_DT_Q4_0] = {256, 292},
  };
  if (dt < QS_DT_Q4_0 || dt > QS_DT_Q8_K) {
    *weights = 1;
    *bytes = (unsigned)qs_dtype_size(dt);
    return 0;
  }
  *weights = tab[dt - QS_DT_Q4_0][0];
  *bytes = tab[dt - QS_DT_Q4_0][1];
  return 1;
}
