/* SPDX-License-Identifier: MIT */
/*
 * codec_qinsx.c — the exact codec qinsx (codec.h QC_QINSX; layout: docs/FORMAT.md §1.5): chunk
 * layout helpers, the encoder, chunk sizes and validation. Decoders: qc__ref_qinsx (codec_ref.c,
 * the executable spec), qc__avx2_qinsx (codec_avx2.c), qc__vbmi2_qinsx (codec_qinsx_vbmi2.c).
 *
 * Design. Trained weights use few exponents: on stories260K rounded to bf16 the exponent byte
 * carries 2.77 bits of information (24 distinct values; the 7 most common cover 95%). Each
 * chunk gets a table of its 7 most common exponents; every element stores a 3-bit code (7 =
 * escape: the exponent byte follows in an escape array, in element order) and its sign and
 * mantissa bits raw: one byte for values that are all bf16 (the bf16 variant, ~11 bits/weight),
 * three for other f32 values. Codes live in three bit planes per
 * group of 64 elements, so a SIMD decoder gets them as three mask registers, looks the exponent up
 * with one byte permute and pulls escapes in with one expand-load. Tables are per chunk, not per
 * tensor: a chunk is a few MiB, so its 16-byte header costs nothing, its table fits its own rows,
 * and the encoder needs no fitting pass over the tensor (the same rows give the same bytes).
 *
 * The encoder takes f32 values and decides per chunk: all bf16 (low 16 bits zero, NaN payloads
 * included) -> coded bf16 variant; else all exactly f16 -> raw f16 (a 3-bit code would save at most
 * 2 of the 16 bits and leaves 11 raw bits that fit no byte); else coded f32. A coded chunk that
 * would be larger than the raw values is stored raw, so a chunk never exceeds 16 + 4n bytes.
 *
 * Invariants: decoding gives back the encoder's f32 input bit for bit (NaN payloads, signalling
 * NaNs, -0, subnormals and infinities included); a chunk's size is a function of its header
 * (qc__qx_size) and never exceeds qc__qx_bound; the encoder writes canonical chunks (escape
 * counts, the super-block index and the zero padding bits of the last group all consistent), and
 * qc__qx_validate accepts exactly those; no allocation.
 */
#include <math.h>

#include "codec_int.h"
#include "qins_base.h"

static uint64_t qx_ng(uint64_t n) { return (n + QC_QX_GROUP - 1) / QC_QX_GROUP; }
static uint64_t qx_ns(uint64_t n) { return (n + QC_QX_SUPER - 1) / QC_QX_SUPER; }
static unsigned qx_raw_planes(int variant) { return variant == QC_QX_F32 ? 3 : 1; }

uint64_t qc__qx_planes_off(uint64_t n) { return QC_QX_HDR + 8 * qx_ns(n); }

uint64_t qc__qx_bound(uint64_t n, int *overflow) {
  uint64_t r;
  if (n == 0) return 0;
  if (__builtin_mul_overflow(n, 4, &r) || __builtin_add_overflow(r, QC_QX_HDR, &r)) {
    *overflow = 1;
    return 0;
  }
  return r;
}

static uint64_t ld64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

void qc__qx_view(const uint8_t *chunk, uint64_t n, qc__qx *x) {
  uint64_t raw = qc__qx_planes_off(n) + 24 * qx_ng(n);
  int v = chunk[0];
  x->planes = chunk + qc__qx_planes_off(n);
  x->raw0 = chunk + raw;
  x->raw1 = v == QC_QX_F32 ? chunk + raw + n : NULL;
  x->raw2 = v == QC_QX_F32 ? chunk + raw + 2 * n : NULL;
  x->esc = chunk + raw + (uint64_t)qx_raw_planes(v) * n;
  x->n_esc = ld64(chunk + 8);
  memcpy(x->table, chunk + 1, 7);
  x->table[7] = 0;
}

static void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Escapes before element e, from the index and the plane words (x from qc__qx_view). */
uint64_t qc__qx_esc_before(const uint8_t *chunk, const qc__qx *x, uint64_t e) {
  uint64_t s = e / QC_QX_SUPER, g = e / QC_QX_GROUP;
  uint64_t cnt = ld64(chunk + QC_QX_HDR + 8 * s);
  for (uint64_t k = s * (QC_QX_SUPER / QC_QX_GROUP); k < g; k++)
    cnt += (uint64_t)__builtin_popcountll(qc__qx_word(x, k, 0) & qc__qx_word(x, k, 1) &
                                          qc__qx_word(x, k, 2));
  unsigned b = (unsigned)(e % QC_QX_GROUP);
  if (b) {
    uint64_t m = qc__qx_word(x, g, 0) & qc__qx_word(x, g, 1) & qc__qx_word(x, g, 2);
    cnt += (uint64_t)__builtin_popcountll(m & ((1ull << b) - 1));
  }
  return cnt;
}

/* ---- encode ----------------------------------------------------------------------------- */

static uint32_t fbits(const float *p) {
  uint32_t u;
  memcpy(&u, p, 4);
  return u;
}

int qc__qx_encode(uint64_t n, const float *src, uint8_t *dst, qc_stats *st) {
  if (n == 0) return 0;
  int bf16 = 1, f16 = 0;
  uint64_t hist[256] = {0};
  for (uint64_t i = 0; i < n; i++) {
    uint32_t u = fbits(src + i);
    bf16 &= (u & 0xFFFFu) == 0;
    hist[(u >> 23) & 0xFF]++;
  }
  if (!bf16) { /* exactly representable as f16, bit for bit (NaN: quiet, payload in 10 bits) */
    f16 = 1;
    for (uint64_t i = 0; i < n && f16; i++) {
      float v = qc_f16_to_f32(qc_f32_to_f16(src[i]));
      f16 = fbits(&v) == fbits(src + i);
    }
  }
  if (st) {
    for (uint64_t i = 0; i < n; i++)
      if (isfinite(src[i])) st->sum_sq += (double)src[i] * src[i], st->n++;
  }
  /* The table: the 7 most common exponents, most common first (ties: the smaller exponent). */
  uint8_t table[7], code[256];
  int used[256] = {0}, nt = 0;
  uint64_t covered = 0;
  for (; nt < 7; nt++) {
    int best = -1;
    for (int e = 0; e < 256; e++)
      if (!used[e] && hist[e] && (best < 0 || hist[e] > hist[best])) best = e;
    if (best < 0) break;
    used[best] = 1, table[nt] = (uint8_t)best, covered += hist[best];
  }
  for (int k = nt; k < 7; k++) table[k] = table[0]; /* unused codes repeat code 0's exponent */
  memset(code, QC_QX_ESCAPE, sizeof code);
  for (int k = nt - 1; k >= 0; k--) code[table[k]] = (uint8_t)k;
  uint64_t n_esc = n - covered;
  int variant = bf16 ? QC_QX_BF16 : f16 ? QC_QX_F16_RAW : QC_QX_F32;
  unsigned r = qx_raw_planes(variant);
  uint64_t raw_off = qc__qx_planes_off(n) + 24 * qx_ng(n);
  uint64_t coded = raw_off + r * n + n_esc, plain = QC_QX_HDR + (bf16 || f16 ? 2 : 4) * n;
  memset(dst, 0, QC_QX_HDR);
  if (variant == QC_QX_F16_RAW || coded > plain) {
    if (variant == QC_QX_F16_RAW) qc_from_f32(QC_DT_F16, src, n, dst + QC_QX_HDR);
    else if (bf16) {
      variant = QC_QX_BF16_RAW;
      for (uint64_t i = 0; i < n; i++) qc__st16(dst + QC_QX_HDR + 2 * i, (uint16_t)(fbits(src + i) >> 16));
    } else {
      variant = QC_QX_F32_RAW;
      memcpy(dst + QC_QX_HDR, src, 4 * n);
    }
    dst[0] = (uint8_t)variant;
    return 0;
  }
  dst[0] = (uint8_t)variant;
  memcpy(dst + 1, table, 7);
  st64(dst + 8, n_esc);
  uint8_t *planes = dst + qc__qx_planes_off(n), *raw0 = dst + raw_off;
  uint8_t *raw1 = raw0 + n, *raw2 = raw0 + 2 * n, *esc = raw0 + (uint64_t)r * n;
  uint64_t ei = 0;
  for (uint64_t g = 0; g < qx_ng(n); g++) {
    if (g % (QC_QX_SUPER / QC_QX_GROUP) == 0) st64(dst + QC_QX_HDR + 8 * (g / (QC_QX_SUPER / QC_QX_GROUP)), ei);
    uint64_t w[3] = {0, 0, 0}, i0 = g * QC_QX_GROUP;
    uint64_t i1 = i0 + QC_QX_GROUP < n ? i0 + QC_QX_GROUP : n;
    for (uint64_t i = i0; i < i1; i++) {
      uint32_t u = fbits(src + i);
      uint8_t e = (uint8_t)(u >> 23), c = code[e];
      unsigned b = (unsigned)(i - i0);
      w[0] |= (uint64_t)(c & 1) << b, w[1] |= (uint64_t)((c >> 1) & 1) << b;
      w[2] |= (uint64_t)(c >> 2) << b;
      if (c == QC_QX_ESCAPE) esc[ei++] = e;
      raw0[i] = (uint8_t)(((u >> 24) & 0x80) | ((u >> 16) & 0x7F));
      if (r == 3) raw1[i] = (uint8_t)(u >> 8), raw2[i] = (uint8_t)u;
    }
    st64(planes + 24 * g, w[0]), st64(planes + 24 * g + 8, w[1]), st64(planes + 24 * g + 16, w[2]);
  }
  return 0;
}

/* ---- sizes and validation --------------------------------------------------------------- */

int qc__qx_size(uint64_t n, const uint8_t *c, uint64_t avail, uint64_t *size) {
  int ovf = 0;
  uint64_t bound = qc__qx_bound(n, &ovf), sz;
  if (ovf) return QINS_EINVALID;
  if (n == 0) return *size = 0, 0;
  if (avail < QC_QX_HDR) return QINS_ECORRUPT;
  uint64_t n_esc = ld64(c + 8);
  switch (c[0]) {
  case QC_QX_BF16:
  case QC_QX_F32:
    if (n_esc > n) return QINS_ECORRUPT;
    /* <= 16 + 8 * n/8192 + 24 * n/64 + 3n + n + 24 + 8: no overflow once 16 + 4n fits */
    if (n > (UINT64_MAX - 64) / 8) return QINS_ECORRUPT;
    sz = qc__qx_planes_off(n) + 24 * qx_ng(n) + qx_raw_planes(c[0]) * n + n_esc;
    break;
  case QC_QX_F16_RAW:
  case QC_QX_BF16_RAW: sz = QC_QX_HDR + 2 * n; break;
  case QC_QX_F32_RAW: sz = bound; break;
  default: return QINS_ECORRUPT;
  }
  if (sz > bound || sz > avail) return QINS_ECORRUPT;
  *size = sz;
  return 0;
}

int qc__qx_validate(uint64_t n, const uint8_t *c) {
  uint64_t sz;
  if (n == 0) return 0;
  /* The caller holds at least qc__qx_bound(n) bytes or the size qc_chunk_size accepted. */
  if (qc__qx_size(n, c, UINT64_MAX, &sz)) return QINS_ECORRUPT;
  if (c[0] != QC_QX_BF16 && c[0] != QC_QX_F32) { /* raw: header all zero but the variant */
    for (int i = 1; i < QC_QX_HDR; i++)
      if (c[i]) return QINS_ECORRUPT;
    return 0;
  }
  qc__qx x;
  qc__qx_view(c, n, &x);
  uint64_t ng = qx_ng(n), cnt = 0;
  for (uint64_t g = 0; g < ng; g++) {
    if (g % (QC_QX_SUPER / QC_QX_GROUP) == 0 &&
        ld64(c + QC_QX_HDR + 8 * (g / (QC_QX_SUPER / QC_QX_GROUP))) != cnt)
      return QINS_ECORRUPT;
    uint64_t w0 = qc__qx_word(&x, g, 0), w1 = qc__qx_word(&x, g, 1), w2 = qc__qx_word(&x, g, 2);
    cnt += (uint64_t)__builtin_popcountll(w0 & w1 & w2);
  }
  unsigned tail = (unsigned)(n % QC_QX_GROUP);
  if (tail) { /* bits past the last element are zero */
    uint64_t pad = ~0ull << tail;
    if ((qc__qx_word(&x, ng - 1, 0) | qc__qx_word(&x, ng - 1, 1) | qc__qx_word(&x, ng - 1, 2)) & pad)
      return QINS_ECORRUPT;
  }
  return cnt == ld64(c + 8) ? 0 : QINS_ECORRUPT;
}
