/* SPDX-License-Identifier: MIT */
/*
 * codec.h — the QINS codecs (qc_): encode float rows into a codec's chunk layout, decode any
 * element range of a chunk to f32/f16/bf16. Normative rules: ../shared/docs/QINS.md; byte
 * layouts: docs/FORMAT.md §1 Codecs (keep both true to this code).
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
 *   qinsx        a 16-byte header, then (coded variants) u64 esc_before[ns], u64 plane[3][ng]
 *                per group of 64, u8 raw[r][n], u8 escape[n_esc]; or (raw variants) the values
 *                (docs/FORMAT.md §1.5). Its size depends on the data: qc_chunk_size.
 * The block records of ggml are split here into a scales array and a codes array so that codes
 * stay contiguous (one vector load per 32/64 weights) and a range decode touches two short runs.
 *
 * Decoding is split into a scalar reference (codec_ref.c, the executable spec, always built) and
 * SIMD kernels (codec_avx2.c, codec_avx512.c) picked once at run time from CPU features; every
 * kernel is bit-identical to the reference on every chunk qc_chunk_validate accepts.
 * QINS_CODEC=ref in the environment forces the reference (and the encoder's scalar paths, which
 * give the same bytes), QINS_CODEC=avx2 the AVX2 kernel; read once per process.
 *
 * qins8 tables. A table is per-tensor data (qc_params.table), serialized in the tensor's params
 * record. Small tensors cannot afford 512 bytes each, so the fitter gives every tensor below
 * qc_fit_opts.table_min_elems (default QC_QINS8_CUSTOM_MIN) one of QC_QINS8_STD_COUNT standard
 * tables, which are bit-identical wherever they are used: a store that keys params records by
 * their bytes stores each standard table once. Larger tensors get a table refined for them.
 *
 * Invariants: 64-bit sizes throughout (tensors above 2^32 elements work); only qc_fit_* and
 * qc_encode allocate (qins8 encode: a 20 KB lookup table per call), decode never does; decode
 * never reads outside [chunk, chunk + qc_chunk_bytes()) nor writes outside its output range.
 * Every function is thread-safe (the kernel choice and standard tables are set up once; qins8
 * decode keeps the last table it expanded, and the AVX-512 kernel its byte planes, per thread).
 * Encoding is deterministic: the same input and params give the same bytes on every CPU.
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
  QC_QINSX = 7,         /* exact: coded exponent + raw sign/mantissa, ~11 bits/weight on BF16 */
  QC_CODEC_COUNT
} qc_codec;

/* Per-codec constants (STYLE.md 12): the chunk layout of docs/FORMAT.md §1.1 in numbers. The
 * decode/encode entry points are qc_decode/qc_encode; kernels are chosen per CPU (codec_int.h). */
typedef struct qc_traits {
  const char *name;       /* "qins8", ... (qc_codec_name) */
  uint32_t block;         /* B, or 0 for element-wise codecs */
  uint32_t scale_bytes;   /* bytes per block in the scales array (qins8 2, qins16 1, else 0) */
  uint32_t code_bytes;    /* bytes per element in the codes arrays (seed-log: sign + stored) */
  int lossy;              /* refuses NaN/Inf */
  double bits_per_weight; /* full blocks, per-tensor params excluded */
} qc_traits;
extern const qc_traits qc_traits_table[]; /* indexed by qc_codec, QC_CODEC_COUNT entries */

/* Element dtypes for decode output and for encode input conversion. Same values as qins_dtype. */
typedef enum qc_dtype { QC_DT_F32 = 0, QC_DT_F16 = 1, QC_DT_BF16 = 2, QC_DT_COUNT } qc_dtype;

#define QC_QINS8_BLOCK 32   /* QINS.md: qins8 B = 32 */
#define QC_QINS16_BLOCK 64  /* QINS.md: qins16 B = 64 */
/* A full qins8 block: one fp16 scale + 32 codes = 34 bytes = 8.5 bits/weight (as ggml's Q8_0). */
_Static_assert(2 + QC_QINS8_BLOCK == 34, "qins8 block is 34 bytes");
/* A full qins16 block: one i8 exponent + 64 u16 codes = 129 bytes = 16.125 bits/weight. */
_Static_assert(1 + 2 * QC_QINS16_BLOCK == 129, "qins16 block is 129 bytes");
#define QC_QINS8_LEVELS 128 /* magnitude table entries T[0..127] */
/* qinsx (docs/FORMAT.md §1.5): exponent codes are 3 bits in three bit planes per group of 64
 * elements (one u64 each: an AVX-512 mask register apiece); code 7 is an escape whose exponent
 * byte comes from the escape array, in element order. Every QC_QX_SUPER elements the count of
 * escapes before them is stored, so a range decode finds its first escape with at most 127
 * popcounts (and the index costs 64 bits per 8192 weights, 0.008 bit/weight). */
#define QC_QX_GROUP 64
#define QC_QX_SUPER 8192
#define QC_QX_HDR 16     /* variant u8, table u8[7], n_esc u64 */
#define QC_QX_ESCAPE 7   /* the code whose exponent is in the escape array */
/* Variants (header byte 0), chosen per chunk by the encoder from the values it is given: */
enum {
  QC_QX_BF16 = 1,     /* every value is a bf16: code + one raw byte (sign, 7 mantissa bits) */
  QC_QX_F32 = 2,      /* code + three raw bytes (sign and 7, then 8 and 8 mantissa bits) */
  QC_QX_F16_RAW = 3,  /* every value is an f16 (5-bit exponent: coding it does not pay here) */
  QC_QX_F32_RAW = 4,  /* the f32 bits verbatim, when coding would be larger */
  QC_QX_BF16_RAW = 5  /* the bf16 bits verbatim, when coding would be larger */
};
#define QC_QINS8_ZERO 0x7F  /* qins8 code of an exact zero (0xFF is never written) */
#define QC_QINS16_ZERO 32767 /* qins16 magnitude of an exact zero */
#define QC_QINS16_EZERO (-128) /* qins16 exponent of an all-zero block (absmax < 2^-100) */
#define QC_QINS16_EMIN (-100)  /* smallest exponent of a non-zero qins16 block */
/* qins8 scales are fp16: a block whose absmax rounds to fp16 infinity (>= 65520) cannot be
 * stored; qc_encode/qc_fit_add refuse it with QINS_EUNSUPPORTED naming the element. */
#define QC_QINS8_MAX_ABS 65504.0f
/* Tensors with at least this many elements get a tensor-fitted qins8 table by default: 512 table
 * bytes over 40,960 weights is 0.1 bit/weight, the overhead QINS.md allows. */
#define QC_QINS8_CUSTOM_MIN 40960
#define QC_QINS8_STD_COUNT 5 /* standard qins8 tables: rat(0), rat(0.5), rat(1), rat(2), rat(4) */
/* Serialized params: a 4-byte header (codec id, QC_PARAMS_VERSION, two zero bytes), then the
 * codec's fields (docs/FORMAT.md §1.2). */
#define QC_PARAMS_VERSION 1
#define QC_PARAMS_MAX 516 /* largest qc_params_size(): qins8's header + 128 f32 */

/* qc_params.scale_search: 0 uses fp16(absmax); N in 1..8 tries fp16(absmax) +-N ulps and keeps
 * the best (QINS.md A3u uses 8); QC_SCALE_FIT + R refits the scale by least squares up to R
 * times (within +-8 ulps), a fraction of the cost of the search for most of its gain. */
#define QC_SCALE_FIT 16
/* QC_SCALE_FAST + N tries fp16(absmax) +- N ulps (even offsets, then the odd neighbours of the
 * best) ranked by a vectorized error estimate: the default encoder, QC_SCALE_FAST + 8. */
#define QC_SCALE_FAST 32
/* QC_SCALE_KEEP keeps the scales already in dst (from an earlier encode) and only requantizes the
 * codes: re-encoding a decoded tensor this way gives the same bytes (QINS.md). */
#define QC_SCALE_KEEP (-1)

/* Per-tensor codec parameters. Only the fields of `codec` are meaningful. */
typedef struct qc_params {
  qc_codec codec;                /* which codec */
  float table[QC_QINS8_LEVELS];  /* qins8: T[0] = 1, non-increasing, T[127] = 0 */
  float log_min, log_max;        /* seed-log */
  float alpha;                   /* seed-rational (> 0, finite) */
  /* Encoder hints: not serialized, zero after qc_params_read. */
  int table_id;      /* qins8: standard table 0..QC_QINS8_STD_COUNT-1, or -1: fitted/other */
  int scale_search;  /* qins8 encode: per-block scale choice, see QC_SCALE_FIT */
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

/* Name <-> codec ("f32", "f16", "bf16", "qins8", "qins16", "seed-log", "seed-rational", "qinsx").
 * qc_codec_from_name returns -1 for an unknown name. */
const char *qc_codec_name(qc_codec c);
int qc_codec_from_name(const char *name);
const char *qc_dtype_name(qc_dtype d); /* "f32", "f16", "bf16" */
int qc_dtype_from_name(const char *name);
size_t qc_dtype_size(qc_dtype d);
int qc_codec_is_lossy(qc_codec c); /* qins8, qins16, seed-* (NaN/Inf refused) */
uint32_t qc_codec_block(qc_codec c); /* B, or 0 for element-wise codecs */

/* Bytes of a chunk of n_rows rows of row_len elements. Checked: returns 0 and sets *overflow
 * (may be NULL) if the size does not fit in 64 bits. For qinsx, whose chunks are as large as
 * their data needs, this is the largest chunk the encoder writes (16 + 4n bytes; 0 for n = 0):
 * the buffer size to give qc_encode; qc_chunk_size then tells the bytes it used. */
uint64_t qc_chunk_bytes(qc_codec c, uint64_t row_len, uint64_t n_rows, int *overflow);
/* 1 for codecs whose chunk size depends on the data (qinsx). */
int qc_codec_varsize(qc_codec c);
/* The size of the chunk at `chunk` (avail bytes readable there): qc_chunk_bytes for fixed-size
 * codecs (avail must be at least that); for qinsx read from the chunk's header. QINS_ECORRUPT
 * when the header is malformed or the chunk would not fit in avail; QINS_EINVALID for a bad
 * codec or shape. qc_chunk_validate and decode read at most *size bytes. */
int qc_chunk_size(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
                  uint64_t avail, uint64_t *size /* out */);
/* Where element `elem` of a chunk lives: *scale_off is the byte offset of its block's scale
 * (qins8/qins16; seed-log: of its sign byte; else 0) and *code_off the byte offset of its code
 * (qinsx: both 0, the header, which gives the layout of the rest).
 * Lets a reader fetch only the bytes a range needs. QINS_EINVALID if elem >= n. */
int qc_chunk_locate(qc_codec c, uint64_t row_len, uint64_t n_rows, uint64_t elem,
                    uint64_t *scale_off /* out */, uint64_t *code_off /* out */);

/* Serialized per-tensor parameters (docs/FORMAT.md §1.2): size, write, read-and-validate.
 * qc_params_read returns QINS_ECORRUPT for a bad record (wrong size, codec, version, non-finite
 * or non-monotone table, ...) and QINS_EVERSION for a newer params version. */
size_t qc_params_size(qc_codec c);
void qc_params_write(const qc_params *p, uint8_t *out /* qc_params_size() bytes */);
int qc_params_read(qc_codec c, const uint8_t *in, size_t len, qc_params *out /* out */);
/* Standard qins8 table `id` (0..QC_QINS8_STD_COUNT-1) into p (codec, table, table_id set). */
int qc_params_std_qins8(int id, qc_params *p /* out */);

/* --- Fitting per-tensor parameters, streaming with bounded memory ---------------------------
 * qc_fit_new; then qc_fit_add over all rows of the tensor (any number of calls); then
 * qc_fit_finish. At the default effort memory is bounded independently of the tensor size (a
 * 4096-bin histogram, 96 KB, plus the rows while the tensor is below table_min_elems: 160 KB by
 * default), and qins8 fit + encode runs at well over 50 MB/s per core. QC_EFFORT_MAX runs
 * QINS.md's reference encoder (A1 + A2 + A3u, ~1-2 us/weight) and buffers the whole tensor.
 * The same rows in any number of qc_fit_add calls give the same params. */
enum { QC_EFFORT_DEFAULT = 0, QC_EFFORT_MAX = 1 };
typedef struct qc_fit_opts {
  int effort;  /* QC_EFFORT_DEFAULT or QC_EFFORT_MAX */
  float alpha; /* seed-rational alpha; 0 means the default 1.0 */
  /* qins8: tensors with fewer elements get a standard table (0 means QC_QINS8_CUSTOM_MIN; 1
   * fits a table to every tensor, as QINS.md's reference encoder does). */
  uint64_t table_min_elems;
} qc_fit_opts;
typedef struct qc_fit qc_fit;
int qc_fit_new(qc_codec c, uint64_t row_len, const qc_fit_opts *opts /* may be NULL */,
               qc_fit **out /* out; free with qc_fit_free */);
/* Rows must be finite for lossy codecs: else QINS_ENONFINITE and *bad_index (may be NULL) is the
 * element index within this call's rows. qins8 refuses |w| >= 65520 (QINS_EUNSUPPORTED, same
 * index): fp16 scales cannot hold it. After an error the fit may not be continued. */
int qc_fit_add(qc_fit *f, const float *rows, uint64_t n_rows, uint64_t *bad_index /* out */);
/* Ends the fit: *out holds the parameters (and the encoder hints for qc_encode). */
int qc_fit_finish(qc_fit *f, qc_params *out /* out */);
void qc_fit_free(qc_fit *f); /* NULL is fine */

/* One call for a whole in-memory tensor: new + add + finish. */
int qc_fit_tensor(qc_codec c, uint64_t row_len, uint64_t n_rows, const float *src,
                  const qc_fit_opts *opts, qc_params *out /* out */, uint64_t *bad_index /* out */);

/* --- Encode --------------------------------------------------------------------------------
 * Encodes n_rows rows of row_len floats (src need not be aligned to more than float) into dst
 * (qc_chunk_bytes() bytes, any alignment). Accumulates error figures into *st (may be NULL).
 * Lossy codecs refuse NaN/Inf: QINS_ENONFINITE with *bad_index the element index within src;
 * qins8 refuses |w| >= 65520 and qins16 |w| > 2^127 (QINS_EUNSUPPORTED, same index).
 * qinsx accepts every value and writes as many bytes as the data needs (at most qc_chunk_bytes;
 * qc_chunk_size reads the count back); decoding gives the input back bit for bit.
 * Re-encoding decoded values with the same params gives the same chunk bytes (qins8, qins16,
 * seed-rational with alpha = 1 ... see docs/FORMAT.md §1.4). */
int qc_encode(const qc_params *p, uint64_t row_len, uint64_t n_rows, const float *src, void *dst,
              qc_stats *st /* in/out */, uint64_t *bad_index /* out */);

/* --- Decode --------------------------------------------------------------------------------
 * Decodes elements [begin, end) of a chunk (element indices within the chunk, row-major) as dtype
 * `dt` into out ((end - begin) * qc_dtype_size(dt) bytes; any alignment). Touches only the bytes
 * of the blocks it needs. chunk may be unaligned. Returns QINS_EINVALID for a bad range, codec or
 * dtype. Large f32 outputs (>= 4 MiB) are written with non-temporal stores: they bypass the cache,
 * as memcpy does at that size, since the caller is about to send them rather than compute. */
int qc_decode(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
              uint64_t begin, uint64_t end, qc_dtype dt, void *out);
/* The scalar reference, same contract. */
int qc_decode_ref(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
                  uint64_t begin, uint64_t end, qc_dtype dt, void *out);
/* qc_decode with a named kernel ("ref", "avx2", "avx512"): QINS_EUNSUPPORTED if this CPU (or
 * build) lacks it. For tests and benchmarks. */
int qc_decode_with(const char *kernel, const qc_params *p, uint64_t row_len, uint64_t n_rows,
                   const void *chunk, uint64_t begin, uint64_t end, qc_dtype dt, void *out);
int qc_kernel_available(const char *kernel); /* 1 if qc_decode_with(kernel, ...) can run */

/* Checks a stored chunk before use: table valid and scales finite and >= 0 (qins8), exponents
 * -128 (with all codes +-zero) or within [-100, 127] (qins16), signs in {-1,0,1} (seed-log).
 * 0 or QINS_ECORRUPT. Codes 0xFF (qins8) and 0xFFFF (qins16), never written by the encoders,
 * are valid and decode to -0.0 (QINS.md's vectors contain one). */
int qc_chunk_validate(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk);

/* Name of the decode kernel in use: "avx512", "avx2" or "ref". */
const char *qc_kernel_name(void);

/* --- Scalar conversions (round to nearest even; NaN, Inf and subnormals handled) -----------
 * NaN keeps its sign and top payload bits and comes out quiet, as F16C/AVX-512 hardware does. */
float qc_f16_to_f32(uint16_t h);
uint16_t qc_f32_to_f16(float f);
float qc_bf16_to_f32(uint16_t h);
uint16_t qc_f32_to_bf16(float f);
/* n elements of little-endian dtype `src_dt` at src (any alignment) -> f32 at dst. */
void qc_to_f32(qc_dtype src_dt, const void *src, uint64_t n, float *dst);
/* n f32 -> dtype dt at dst (any alignment), rounding to nearest even. */
void qc_from_f32(qc_dtype dt, const float *src, uint64_t n, void *dst);

/* The qins16 mantissa table MT[r] = (float)exp2(-r/2048.0), r = 0..2047. */
const float *qc_qins16_mantissa(void);

#endif /* QINS_CODEC_H */
