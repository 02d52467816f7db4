/* SPDX-License-Identifier: MIT */
/*
 * safetensors.h — a validating safetensors reader (qs_st_), plus the header writer export uses.
 *
 * File layout (../shared/docs/FORMATS-AND-PEERS.md §1.1): u64 LE N | N bytes of UTF-8 JSON header |
 * data buffer. qs_st_open reads only the header (at most QS_ST_MAX_HEADER bytes, so memory is
 * bounded by that, never by the file) and enforces everything the reference reader does:
 *   - the file holds at least 8 bytes; N <= 100,000,000; 8 + N <= file size;
 *   - the header is valid UTF-8 JSON (store/json.h: strict, duplicate keys rejected) whose top level
 *     is an object; each tensor entry is {"dtype": known, "shape": [u64...], "data_offsets":
 *     [BEGIN, END]} and nothing else; "__metadata__", if present, maps strings to strings
 *     (null counts as absent, as in the reference reader);
 *   - element counts are computed with checked 64-bit multiplication, and count * bits(dtype) must
 *     be a whole number of bytes equal to END - BEGIN;
 *   - sorted by offsets, the first BEGIN is 0, each BEGIN equals the previous END (no gaps, no
 *     overlaps) and the last END + 8 + N equals the file size (no trailing bytes).
 * Beyond the reference reader it also refuses tensor names holding a NUL byte and tensors of more
 * than QS_ST_MAX_NDIM dimensions (qins's limit).
 *
 * Tensor data is read with pread into the caller's buffer: nothing is mmapped, and nothing is ever
 * cast to float * (data in a safetensors file is at best 8-byte aligned; convert with qc_to_f32).
 *
 * Errors: QINS_EFORMAT (malformed file), QINS_EIO (read failure, truncated file), QINS_ENOMEM,
 * QINS_EINVALID (bad arguments), QINS_EUNSUPPORTED; the err buffer gets "PATH: what is wrong".
 * A qs_st_file is immutable after open and may be read from several threads at once.
 */
#ifndef QINS_STORE_SAFETENSORS_H
#define QINS_STORE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define QS_ST_MAX_HEADER 100000000ull /* the reference reader's cap (decimal 100 MB) */
#define QS_ST_MAX_NDIM 8              /* = QINS_MAX_NDIM: the store's limit */

/* Every dtype the format defines, in the reference enum's order. */
typedef enum qs_st_dtype {
  QS_ST_BOOL = 0, QS_ST_F4, QS_ST_F6_E2M3, QS_ST_F6_E3M2, QS_ST_U8, QS_ST_I8, QS_ST_F8_E5M2,
  QS_ST_F8_E4M3, QS_ST_F8_E8M0, QS_ST_F8_E4M3FNUZ, QS_ST_F8_E5M2FNUZ, QS_ST_I16, QS_ST_U16,
  QS_ST_F16, QS_ST_BF16, QS_ST_I32, QS_ST_U32, QS_ST_F32, QS_ST_C64, QS_ST_F64, QS_ST_I64,
  QS_ST_U64,
  QS_ST_DTYPE_COUNT
} qs_st_dtype;

const char *qs_st_dtype_name(qs_st_dtype d); /* "F32", "BF16", ... */
int qs_st_dtype_from_name(const char *name); /* qs_st_dtype, or -1 */
unsigned qs_st_dtype_bits(qs_st_dtype d);    /* bits per element: 1 (BOOL is 8), 4, 6, 8 ... 64 */

typedef struct qs_st_tensor {
  const char *name;         /* NUL-terminated; owned by the file, lives until qs_st_close */
  size_t name_len;          /* bytes, NUL excluded */
  qs_st_dtype dtype;        /* element type */
  int ndim;                 /* 0 (scalar) .. QS_ST_MAX_NDIM */
  uint64_t shape[QS_ST_MAX_NDIM]; /* row-major (C order) */
  uint64_t n_elem;          /* product of shape (1 for a scalar, 0 if any dim is 0) */
  uint64_t offset;          /* absolute file offset of the first data byte (8 + N + BEGIN) */
  uint64_t nbytes;          /* END - BEGIN */
} qs_st_tensor;

typedef struct qs_st_file qs_st_file;

/* Opens and validates path. On failure *out is NULL and err (may be NULL) says why, starting with
 * the path. The file descriptor stays open until qs_st_close. */
int qs_st_open(const char *path, qs_st_file **out /* out; qs_st_close */, char *err, size_t errlen);
void qs_st_close(qs_st_file *f); /* NULL is fine */

const char *qs_st_path(const qs_st_file *f);
uint64_t qs_st_file_size(const qs_st_file *f);
uint64_t qs_st_header_len(const qs_st_file *f); /* N */
/* Tensors in file (data offset) order: i in [0, qs_st_count). Pointers live until qs_st_close. */
size_t qs_st_count(const qs_st_file *f);
const qs_st_tensor *qs_st_tensor_at(const qs_st_file *f, size_t i);
const qs_st_tensor *qs_st_find(const qs_st_file *f, const char *name); /* NULL if absent */

/* __metadata__ as compact JSON object text ("{}" when absent), keys in file order; and as pairs.
 * Pointers live until qs_st_close. */
const char *qs_st_metadata_json(const qs_st_file *f);
size_t qs_st_metadata_count(const qs_st_file *f);
int qs_st_metadata_at(const qs_st_file *f, size_t i, const char **key /* out */,
                      const char **value /* out */);

/* Reads nbytes bytes of tensor t starting at byte `off` within its data into buf (any alignment).
 * QINS_EINVALID if the range is outside the tensor; QINS_EIO (err names the file) on a short read. */
int qs_st_read(const qs_st_file *f, const qs_st_tensor *t, uint64_t off, uint64_t nbytes, void *buf,
               char *err, size_t errlen);
/* preads exactly n bytes at off, in pieces of at most 1 GiB, retrying on EINTR: 0, or -1 with
 * errno set (0 when the file ends first). The importers read every source format's rows with it. */
int qs__pread_full(int fd, void *buf, uint64_t n, uint64_t off);
/* Rows are along the last axis (row_len = shape[ndim-1]; a scalar is 1 row of 1). Reads rows
 * [row_begin, row_end) into buf ((row_end - row_begin) * row bytes). QINS_EUNSUPPORTED for sub-byte
 * dtypes whose rows are not whole bytes. */
uint64_t qs_st_row_len(const qs_st_tensor *t);
uint64_t qs_st_n_rows(const qs_st_tensor *t);
int qs_st_read_rows(const qs_st_file *f, const qs_st_tensor *t, uint64_t row_begin,
                    uint64_t row_end, void *buf, char *err, size_t errlen);

/* --- Writing (export) ------------------------------------------------------------------------
 * Builds a safetensors header for n tensors laid out back to back in the given order, each entry
 * `{"dtype":..,"shape":[..],"data_offsets":[B,E]}`, with "__metadata__" first if metadata_json is
 * a non-empty object text (already valid JSON; written verbatim). Keys are written in the given
 * order; the header is padded with spaces to a multiple of 8 (as the Rust writer does). *out is
 * malloc'd (free()), holding the 8-byte length prefix and the header: *out_len bytes in all. */
typedef struct qs_st_entry {
  const char *name;      /* tensor name */
  qs_st_dtype dtype;     /* element type */
  int ndim;              /* dimensions */
  const uint64_t *shape; /* ndim dims */
  uint64_t nbytes;       /* data bytes */
} qs_st_entry;
int qs_st_header_build(const qs_st_entry *entries, size_t n, const char *metadata_json,
                       uint8_t **out /* out; free() */, size_t *out_len /* out */);

#endif /* QINS_STORE_SAFETENSORS_H */
