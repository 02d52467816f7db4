/* SPDX-License-Identifier: MIT */
/*
 * codec.h — the QINS codecs (qc_): encode float rows into a codec's chunk layout, decode any
 * element range of a chunk to f32/f16/bf16. Normative rules: ../shared/docs/QINS.md; byte
 * layouts: docs/FORMAT.md §Codecs (keep both true to this code).
 *
 * Model. A tensor of n elements is viewed as n_rows rows of row_len elements (row_len = the last
 * dimension; 1 for a scalar; a 1-D tensor is one row). Rows are cut into blocks of the codec's
 * block size B; a row's last block may be shorter; blocks never span rows. A *chunk* is a run of
 * whole rows encoded together; the store keeps a tensor as one or more chunks. Per-tensor
 * parameters (qins8's table, seed-log's log range, seed-rational's alpha) live in qc_params;
 * per-block parameters (scales) live inside each chunk.
 *
 * Chunk layouts (n = n_rows * row_len elements, nb = n_rows * ceil(row_len / B) blocks),
 * all little-endian, arrays packed back to back with no padding:
 *   f32          f32[n]
 *   f16, bf16    u16[n]
 *   qins8        fp16 scale[nb] (B = 32), then u8 code[n]
 *   qins16       i8 exponent[nb] (B = 64), then u16 code[n]
 *   seed-log     i8 sign[n], then u8 stored[n]
 *   seed-rational u8 q[n]
 *
 * Decoding is split into a scalar reference (codec_ref.c, the executable spec, always built) and
 * SIMD kernels (codec_avx2.c, codec_avx512.c) picked once at run time from CPU features; every
 * kernel is bit-identical to the reference. QINS_CODEC=ref in the environment forces the reference.
 *
 * Invariants: 64-bit sizes throughout (tensors above 2^32 elements work); no function here
 * allocates except qc_fit_*; decode never reads outside [chunk, chunk + qc_chunk_bytes()).
 */
#ifndef QINS_CODEC_H
#define QINS_CODEC_H

#include <stddef.h>
#include <stdint.h>

typedef enum qc_codec {
  QC_F32 = 0,           /* passthrough, 4 bytes/weight */
  QC_F16 = 1,           /* passthrough, 2 bytes/weight (f32 input rounded to nearest even) */
  QC_BF16 = 2,          /* passthrough, 2 bytes/weight */
  QC_QINS8 = 3,         /* lossy default: 8.5 bits/weight + table */
  QC_QINS16 = 4,        /* near-lossless: 16.125 bits/weight */
  QC_SEED_LOG = 5,      /* the seed's log codec: 16 bits/weight */
  QC_SEED_RATIONAL = 6, /* the seed's rational codec: 8 bits/weight */
  QC_CODEC_COUNT
} qc_codec;

/* Element dtypes for decode output and for encode input conversion. Same values as qins_dtype. */
typedef enum qc_dtype { QC_DT_F32 = 0, QC_DT_F16 = 1, QC_DT_BF16 = 2, QC_DT_COUNT } qc_dtype;

#define QC_QINS8_BLOCK 32   /* QINS.md: qins8 B = 32 */
#define QC_QINS16_BLOCK 64  /* QINS.md: qins16 B = 64 */
#define QC_QINS8_LEVELS 128 /* magnitude table entries T[0..127] */

/* Per-tensor codec parameters. Only the fields of `codec` are meaningful. */
typedef struct qc_params {
  qc_codec codec;                /* which codec */
  float table[QC_QINS8_LEVELS];  /* qins8: T[0] = 1, non-increasing, T[127] = 0 */
  float log_min, log_max;        /* seed-log */
  float alpha;                   /* seed-rational (> 0, finite) */
} qc_params;

/* Error figures of one encode, accumulated over calls (zero-initialize before the first). */
typedef struct qc_stats {
  double sum_sq;     /* sum of w^2 over encoded elements */
  double err_sq;     /* sum of (w - decode(encode(w)))^2 */
  double max_err;    /* max |w - decoded| */
  uint64_t n;        /* elements accounted */
} qc_stats;

/* 10*log10(sum_sq/err_sq); +INFINITY when err_sq == 0. */
double qc_stats_snr_db(const qc_stats *s);

/* Name <-> codec ("f32", "f16", "bf16", "qins8", "qins16", "seed-log", "seed-rational").
 * qc_codec_from_name returns -1 for an unknown name. */
const char *qc_codec_name(qc_codec c);
int qc_codec_from_name(const char *name);
const char *qc_dtype_name(qc_dtype d); /* "f32", "f16", "bf16" */
int qc_dtype_from_name(const char *name);
size_t qc_dtype_size(qc_dtype d);
int qc_codec_is_lossy(qc_codec c); /* qins8, qins16, seed-* (NaN/Inf refused) */
uint32_t qc_codec_block(qc_codec c); /* B, or 0 for element-wise codecs */

/* Bytes of a chunk of n_rows rows of row_len elements. Checked: returns 0 and sets *overflow
 * (may be NULL) if the size does not fit in 64 bits. */
uint64_t qc_chunk_bytes(qc_codec c, uint64_t row_len, uint64_t n_rows, int *overflow);

/* Serialized per-tensor parameters (docs/FORMAT.md): size, write, read-and-validate. */
size_t qc_params_size(qc_codec c);
void qc_params_write(const qc_params *p, uint8_t *out /* qc_params_size() bytes */);
int qc_params_read(qc_codec c, const uint8_t *in, size_t len, qc_params *out /* out */);

/* --- Fitting per-tensor parameters, streaming with bounded memory ---------------------------
 * qc_fit_new; then qc_fit_add over all rows of the tensor (any number of calls); then
 * qc_fit_finish. Memory is bounded and independent of the tensor size at the default effort;
 * effort QC_EFFORT_MAX runs QINS.md's reference encoder and buffers the whole tensor. */
enum { QC_EFFORT_DEFAULT = 0, QC_EFFORT_MAX = 1 };
typedef struct qc_fit_opts {
  int effort;  /* QC_EFFORT_DEFAULT or QC_EFFORT_MAX */
  float alpha; /* seed-rational alpha; 0 means the default 1.0 */
} qc_fit_opts;
typedef struct qc_fit qc_fit;
int qc_fit_new(qc_codec c, uint64_t row_len, const qc_fit_opts *opts /* may be NULL */,
               qc_fit **out /* out; free with qc_fit_free */);
/* Rows must be finite for lossy codecs: else QINS_ENONFINITE and *bad_index (may be NULL) is the
 * element index within this call's rows. */
int qc_fit_add(qc_fit *f, const float *rows, uint64_t n_rows, uint64_t *bad_index /* out */);
int qc_fit_finish(qc_fit *f, qc_params *out /* out */);
void qc_fit_free(qc_fit *f);

/* --- Encode --------------------------------------------------------------------------------
 * Encodes n_rows rows of row_len floats (src need not be aligned to more than float) into dst
 * (qc_chunk_bytes() bytes). Accumulates error figures into *st (may be NULL). Lossy codecs
 * refuse NaN/Inf: QINS_ENONFINITE with *bad_index the element index within src. */
int qc_encode(const qc_params *p, uint64_t row_len, uint64_t n_rows, const float *src, void *dst,
              qc_stats *st /* in/out */, uint64_t *bad_index /* out */);

/* --- Decode --------------------------------------------------------------------------------
 * Decodes elements [begin, end) of a chunk (element indices within the chunk, row-major) as dtype
 * `dt` into out ((end - begin) * qc_dtype_size(dt) bytes; any alignment). Touches only the bytes
 * of the blocks it needs. chunk may be unaligned. Returns QINS_EINVAL for a bad range. */
int qc_decode(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
              uint64_t begin, uint64_t end, qc_dtype dt, void *out);
/* The scalar reference, same contract. */
int qc_decode_ref(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
                  uint64_t begin, uint64_t end, qc_dtype dt, void *out);

/* Checks a stored chunk before use: scales finite and >= 0 (qins8), exponents -128 or within
 * [-100, 127] (qins16), no 0xFF code (qins8), ... 0 or QINS_ECORRUPT. */
int qc_chunk_validate(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk);

/* Name of the decode kernel in use: "avx512", "avx2" or "ref". */
const char *qc_kernel_name(void);

/* --- Scalar conversions (round to nearest even; NaN, Inf and subnormals handled) ----------- */
float qc_f16_to_f32(uint16_t h);
uint16_t qc_f32_to_f16(float f);
float qc_bf16_to_f32(uint16_t h);
uint16_t qc_f32_to_bf16(float f);
/* n elements of little-endian dtype `src_dt` at src (any alignment) -> f32 at dst. */
void qc_to_f32(qc_dtype src_dt, const void *src, uint64_t n, float *dst);
/* n f32 -> dtype dt at dst (any alignment), rounding to nearest even. */
void qc_from_f32(qc_dtype dt, const float *src, uint64_t n, void *dst);

#endif /* QINS_CODEC_H */
