/* SPDX-License-Identifier: MIT */
/*
 * store.h — the qins tensor store (qs_): one LMDB environment holding models and their tensors,
 * encoded with the QINS codecs (codec.h). On-disk layout: docs/FORMAT.md §Store.
 *
 * LMDB rules this module keeps (lmdb.h Caveats; ../shared/docs/PITFALLS.md):
 *  - One qs_store (one MDB_env) per process; never fork() after qs_open.
 *  - The env is opened with MDB_NOTLS: a qs_txn may be used by any one thread at a time, so a
 *    daemon can begin a read txn on its pool thread, decode, and end it there.
 *  - Read transactions are short: one per request, ended before the reply is queued. Pointers
 *    obtained inside a txn (names, metadata) are valid only until qs_txn_end.
 *  - mdb_reader_check runs at open; MDB_MAP_RESIZED is handled by growing the map and retrying.
 *  - One writer process at a time (an flock on DIR/writer.lock); any number of readers.
 *  - A model appears, is replaced and disappears atomically: readers in any process see the whole
 *    model or none of it.
 */
#ifndef QINS_STORE_H
#define QINS_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "qins.h"

#define QS_MAX_NDIM QINS_MAX_NDIM
#define QS_MAX_NAME QINS_MAX_NAME

/* Source dtypes a tensor can come from. Float ones go through a codec; the others are stored raw
 * (codec QS_RAW) and served only as themselves. */
typedef enum qs_dtype {
  QS_DT_F32 = 0, QS_DT_F16, QS_DT_BF16, QS_DT_F64,
  QS_DT_I8, QS_DT_U8, QS_DT_I16, QS_DT_U16, QS_DT_I32, QS_DT_U32, QS_DT_I64, QS_DT_U64, QS_DT_BOOL,
  QS_DT_COUNT
} qs_dtype;
#define QS_RAW 255 /* codec value of a raw (integer/bool) tensor */

typedef struct qs_store qs_store;
typedef struct qs_txn qs_txn;

enum { QS_OPEN_RDONLY = 1, QS_OPEN_CREATE = 2 };
/* Opens (QS_OPEN_CREATE: creates) the store in directory dir. */
int qs_open(qs_store **out /* out; qs_close */, const char *dir, unsigned flags);
void qs_close(qs_store *s);
/* Message of the last failure on this store in this thread ("" if none): names the object. */
const char *qs_error(void);

/* A read transaction (a consistent snapshot). */
int qs_txn_begin(qs_store *s, qs_txn **out /* out; qs_txn_end */);
void qs_txn_end(qs_txn *t);

/* One model as listed. Pointers are valid until the txn ends. */
typedef struct qs_model {
  const char *name;      /* model name */
  uint64_t id;           /* internal id, changes on re-import */
  uint64_t n_tensors;
  uint64_t src_bytes;    /* sum of tensors' source bytes */
  uint64_t stored_bytes; /* sum of tensors' stored bytes (params included) */
  uint64_t n_elem;       /* sum of elements */
  int64_t created;       /* unix seconds of import */
  const char *metadata;  /* JSON object text (safetensors __metadata__ etc.), NUL-terminated */
} qs_model;

/* One tensor's record, decoded. Copied out of the txn (safe to keep), except nothing points in. */
typedef struct qs_tensor {
  char model[QS_MAX_NAME + 1];
  char name[QS_MAX_NAME + 1];
  uint64_t model_id;
  uint32_t index;               /* position within the model */
  int ndim;                     /* 0..QS_MAX_NDIM */
  uint64_t shape[QS_MAX_NDIM];  /* row-major */
  uint64_t n_elem;
  uint64_t row_len, n_rows;     /* rows of the last axis (scalar: 1 x 1) */
  uint64_t rows_per_chunk;      /* every chunk but the last holds this many rows */
  uint64_t n_chunks;
  int codec;                    /* qc_codec, or QS_RAW */
  qs_dtype src_dtype;
  uint64_t src_bytes, stored_bytes;
  double snr_db, max_err;       /* measured at encode; +inf / 0 for lossless */
  qc_params params;
} qs_tensor;

typedef int (*qs_model_cb)(void *ud, const qs_model *m);   /* nonzero stops the walk */
typedef int (*qs_tensor_cb)(void *ud, const qs_tensor *t);

int qs_models_each(qs_txn *t, qs_model_cb cb, void *ud);
int qs_model_get(qs_txn *t, const char *model, qs_model *out /* out */);   /* QINS_ENO_MODEL */
/* Tensors of `model` in name order whose name starts with prefix (NULL or "" for all). */
int qs_tensors_each(qs_txn *t, const char *model, const char *prefix, qs_tensor_cb cb, void *ud);
int qs_tensor_get(qs_txn *t, const char *model, const char *name,
                  qs_tensor *out /* out */); /* QINS_ENO_MODEL / QINS_ENO_TENSOR */

/* A hyperslab: one [start, stop) per leading dimension (ndim <= tensor ndim); later dims whole. */
typedef struct qs_slice {
  int ndim;
  uint64_t start[QS_MAX_NDIM], stop[QS_MAX_NDIM];
} qs_slice;

/* Shape and element count of t sliced by sl (NULL = whole). QINS_EBAD_SLICE names what is wrong
 * in qs_error(). */
int qs_slice_shape(const qs_tensor *t, const qs_slice *sl, uint64_t shape[QS_MAX_NDIM] /* out */,
                   uint64_t *n_elem /* out */);

/* Decodes output elements [out_begin, out_end) of t[sl] (row-major over the slice's shape) as dtype
 * dt into out. Reads only the chunks the range touches; checks each chunk's checksum
 * (QINS_ECHECKSUM naming the tensor and chunk) and validates it before decoding. */
int qs_tensor_read(qs_txn *t, const qs_tensor *ten, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, void *out);

#endif /* QINS_STORE_H */
