/* SPDX-License-Identifier: MIT */
/*
 * store.h — the qins tensor store (qs_): one LMDB environment holding models and their tensors,
 * encoded with the QINS codecs (codec.h). On-disk layout: docs/FORMAT.md §2.
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
 *
 * Writes (import, remove) never hold one huge transaction: a model is staged under a fresh model id
 * in several bounded write transactions (each <= QS_TXN_BYTES of new data), then one small final
 * transaction points the name at it. Leftovers of a killed import or removal (the "staging" DB) are
 * cleared by the next writer (qs_open without RDONLY, qs_import_begin, qs_model_remove). The map
 * grows before each write transaction as needed (up to $QINS_STORE_MAX_MAP bytes if set); running
 * out of map or disk (MDB_MAP_FULL, ENOSPC) aborts the write with QINS_ESTORE_FULL and leaves the
 * store as it was.
 *
 * Errors: functions return 0 or a negative code (qins_base.h); qs_error() then holds a message naming
 * the store, model, tensor or chunk concerned.
 */
#ifndef QINS_STORE_H
#define QINS_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "qins_base.h"

#define QS_MAX_NDIM QINS_MAX_NDIM
#define QS_MAX_NAME QINS_MAX_NAME

/* Source dtypes a tensor can come from. Float ones go through a codec; the others are stored raw
 * (codec QS_RAW) and served only as themselves. */
typedef enum qs_dtype {
  QS_DT_F32 = 0, QS_DT_F16, QS_DT_BF16, QS_DT_F64,
  QS_DT_I8, QS_DT_U8, QS_DT_I16, QS_DT_U16, QS_DT_I32, QS_DT_U32, QS_DT_I64, QS_DT_U64, QS_DT_BOOL,
  /* GGUF block-quantized sources (ggml's layouts; gguf.c dequantizes them). They name where a
   * codec tensor came from; their qs_dtype_size is 0 (src_bytes comes from the descriptor) and a
   * QS_RAW tensor never has one. */
  QS_DT_Q4_0, QS_DT_Q4_1, QS_DT_Q5_0, QS_DT_Q5_1, QS_DT_Q8_0,
  QS_DT_Q2_K, QS_DT_Q3_K, QS_DT_Q4_K, QS_DT_Q5_K, QS_DT_Q6_K, QS_DT_Q8_K,
  QS_DT_COUNT
} qs_dtype;
#define QS_RAW 255 /* codec value of a raw (integer/bool) tensor */

typedef struct qs_store qs_store;
typedef struct qs_txn qs_txn;

enum { QS_OPEN_RDONLY = 1, QS_OPEN_CREATE = 2 };
/* Opens the store in directory dir. QS_OPEN_CREATE creates the directory and an empty store if
 * absent; without it a missing store is -ENOENT ("no store here"). QS_OPEN_RDONLY opens the env
 * MDB_RDONLY (write calls then fail with QINS_EINVALID). Without RDONLY, open also reclaims what a
 * killed writer left staged, if no other process holds the writer lock. QINS_EVERSION for a
 * directory that is not a qins store or has another format version. */
int qs_open(qs_store **out /* out; qs_close */, const char *dir, unsigned flags);
/* Before mapping, data.mdb is checked against its own LMDB meta: a file shorter than its last
 * committed page (truncated, or a copy cut short) is QINS_ECORRUPT naming the file and both sizes,
 * never a SIGBUS on a later read; so is an existing empty data.mdb opened without CREATE.
 * Files the store creates (data.mdb, lock.mdb, writer.lock) are 0600 and a directory it creates
 * 0700, unless qs_open_ex asks for group read. */
typedef struct qs_open_opts {
  int group_read; /* created files 0640, a created directory 0750 */
  long gid;       /* >= 0: created files (and a created directory) get this group; -1: the default */
} qs_open_opts;
int qs_open_ex(qs_store **out /* out; qs_close */, const char *dir, unsigned flags,
               const qs_open_opts *o /* NULL: as qs_open */);
void qs_close(qs_store *s);

/* What open found that weakens the store's protection, for the caller to log (qinsd at start;
 * msg, if not NULL, gets a sentence per condition). */
enum {
  QS_WARN_OTHERS_READ = 1, /* users other than owner and group can read data.mdb */
  QS_WARN_NO_LOCK = 2      /* no lock table (read-only mount): writers cannot see our readers */
};
unsigned qs_store_warnings(qs_store *s, char *msg /* out */, size_t cap);
/* Re-checks what open established; cheap (two stats): lock.mdb is still the file this process
 * opened (LMDB's reader table lives in it: if it was removed or replaced, a writer using another
 * one may reuse pages this process reads) and data.mdb still holds every committed page. 0, or
 * QINS_EIO (lock file) / QINS_ECORRUPT (data.mdb) naming the file and what to do; a lost lock
 * file stays an error until the store is closed and reopened. Every write transaction runs it
 * first and refuses to write; a reader (qinsd) calls it periodically. Every open store also
 * holds shared flocks on data.mdb and the lock.mdb it uses, so a writer refuses (QINS_EIO) while
 * another process has data.mdb open with a lock.mdb removed or replaced since. */
int qs_store_check(qs_store *s);
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
 * dt into out. Reads only the chunks the range touches. Every call checks the stored bytes it
 * decodes from (QINS_ECHECKSUM naming the tensor and chunk): the first read of a chunk in this
 * process verifies it whole (CRC, then the codec's validation: QINS_ECORRUPT) and keeps the CRCs
 * of its 4 KiB segments; later reads check the segments they touch against those, so bytes
 * changed in the file after any earlier check are an error, never other numbers.
 * $QINS_VERIFY=always verifies whole chunks on every call; $QINS_VERIFY=risk-wrong-numbers
 * (opt-in, never the default) checks once per process, so bytes changed later are served as
 * they are; qs_verify always verifies whole chunks. */
int qs_tensor_read(qs_txn *t, const qs_tensor *ten, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, void *out);
/* For QS_RAW (integer/bool) tensors qs_tensor_read ignores dt and writes the stored elements as
 * they came (qs_dtype_size(src_dtype) bytes each, little-endian). */
/* Zero-copy reads. When the output of t[sl] in dtype dt is the stored bytes themselves (codec
 * f32/f16/bf16 read as that same dtype, or QS_RAW) and sl slices at most the first dimension
 * (so the output is one linear run of the source), sets *p to output element out_begin inside the
 * store's map and *n to how many elements follow it contiguously there (up to out_end, stopping
 * at a chunk's end), with the same checks as qs_tensor_read (of those bytes, when the call is
 * made), and returns 1. *p is valid until qs_txn_end. Returns 0 when the output must be decoded
 * (use qs_tensor_read), or an error. */
int qs_tensor_span(qs_txn *t, const qs_tensor *ten, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, const void **p, uint64_t *n);

/* Chunk ci of ten as stored (FORMAT.md §2.5: the 16-byte header with its CRC-32C, then the
 * payload), checked as qs_tensor_read checks it on every call: *rec points into the store's map,
 * valid until qs_txn_end. For copying a model out encoded (qfile.c). */
int qs_tensor_chunk_record(qs_txn *t, const qs_tensor *ten, uint64_t ci, const void **rec,
                           size_t *size);

/* Names and sizes of source dtypes: "f32", "f16", "bf16", "f64", "i8", "u8", "i16", "u16", "i32",
 * "u32", "i64", "u64", "bool", and the GGUF block types "q4_0" "q4_1" "q5_0" "q5_1" "q8_0" "q2_k"
 * "q3_k" "q4_k" "q5_k" "q6_k" "q8_k" (size 0). qs_dtype_from_name returns -1 for an unknown name. */
const char *qs_dtype_name(qs_dtype d);
int qs_dtype_from_name(const char *name);
size_t qs_dtype_size(qs_dtype d);
/* "qins8", "f32", ... for a codec, "raw" for QS_RAW. */
const char *qs_codec_name(int codec);
/* Checks a model or tensor name where it enters (import, the protocol, file and directory
 * names): 1..QS_MAX_NAME bytes of well-formed UTF-8 (shortest forms, no surrogates), no NUL and
 * no control characters (U+0000-U+001F, U+007F-U+009F); a model name (is_model) also no '/'.
 * 0, or QINS_ENAME with qs_error() saying what is wrong and where, the name echoed with every
 * byte outside printable ASCII as \xNN. what names the kind in the message ("model", "tensor"). */
int qs_name_check(const char *what, const char *name, int is_model);

/* ===== Write API ===========================================================================
 * One writer process at a time: every write call takes DIR/writer.lock (flock, non-blocking;
 * QINS_ELOCKED naming the holder's pid when another process writes) and releases it when the
 * operation ends (qs_import_commit/abort, or the call's return). The store must not be opened
 * QS_OPEN_RDONLY. Not thread-safe with other writes on the same qs_store.
 *
 * Import, one model:
 *   qs_import_begin(store, "name", metadata_json, &im)
 *   for each tensor:
 *     qs_import_tensor_begin(im, &desc)            -- desc.params fitted by the caller (qc_fit_*)
 *     qs_import_tensor_rows(im, rows, n) ...       -- rows in order, qs_import_chunk_rows(im) per
 *                                                     call except the last (or any count: buffered)
 *     qs_import_tensor_end(im)
 *   qs_import_commit(im)  -- the model (replacing any of the same name) appears atomically
 * or qs_import_abort(im) at any point: the store is as before. After an error from any call but
 * commit, call qs_import_abort. Both commit and abort free im. */
#define QS_CHUNK_TARGET (4u << 20) /* stored bytes per chunk: a few MiB of whole rows */
#define QS_TXN_BYTES (64u << 20)   /* new data per staging write txn: bounds the dirty pages */

typedef struct qs_import qs_import;

typedef struct qs_tensor_desc {
  const char *name;             /* qs_name_check'ed (UTF-8, no controls); unique within the model */
  qs_dtype src_dtype;           /* dtype of the source data (src_bytes = n_elem * its size) */
  uint64_t src_bytes;           /* source bytes if not n_elem * size (block-quantized); else 0 */
  int ndim;                     /* 0..QS_MAX_NDIM */
  uint64_t shape[QS_MAX_NDIM];  /* row-major */
  int codec;                    /* qc_codec, or QS_RAW for integer/bool data */
  const qc_params *params;      /* codec parameters (params->codec == codec); NULL for QS_RAW */
  const qc_stats *src_stats;    /* NULL, or error figures the caller measured against the source's
                                   own values (wider than the f32 rows it passes, e.g. f64): the
                                   record's snr_db/max_err come from them, not from the encoder */
} qs_tensor_desc;

/* metadata_json: a JSON object text kept with the model (NULL: "{}"). Model and tensor names
 * must pass qs_name_check (QINS_ENAME). */
int qs_import_begin(qs_store *s, const char *model, const char *metadata_json,
                    qs_import **out /* out; freed by qs_import_commit or qs_import_abort */);
int qs_import_tensor_begin(qs_import *im, const qs_tensor_desc *d);
/* Rows per chunk of the current tensor. */
uint64_t qs_import_chunk_rows(const qs_import *im);
/* n_rows rows of the current tensor: f32 values (row_len each, any float alignment) for codecs, or
 * the raw little-endian elements for QS_RAW. The rows are copied or encoded before the call
 * returns. Lossy codecs refuse NaN/Inf: QINS_ENONFINITE with *bad_index (may be NULL) the element
 * index within the tensor, and qs_error() naming it. Lossy chunks are encoded by worker threads
 * ($QINS_IMPORT_THREADS, default one per CPU; 1 encodes inline), so such an error may be returned
 * by a later qs_import_tensor_rows or by qs_import_tensor_end instead. */
int qs_import_tensor_rows(qs_import *im, const void *rows, uint64_t n_rows,
                          uint64_t *bad_index /* out */);
/* Ends the tensor (all rows must have come: QINS_EINVALID otherwise); *st (may be NULL) gets
 * its stored figures. */
int qs_import_tensor_end(qs_import *im, qs_tensor *st /* out */);
int qs_import_commit(qs_import *im);
void qs_import_abort(qs_import *im);

/* Already-encoded data (a portable .qins model, qfile.c): stages the next chunk record of the
 * current tensor exactly as another store holds it (FORMAT.md §2.5: header with CRC-32C, then
 * payload), after checking its size for the chunk's rows, its checksum and its codec data
 * (QINS_ECORRUPT / QINS_ECHECKSUM naming the tensor and chunk). Nothing is re-encoded: the stored
 * record is byte-identical. Not mixed with qs_import_tensor_rows within one tensor. */
int qs_import_tensor_chunk(qs_import *im, const void *rec, size_t size);
/* The current tensor's encode figures as another store measured them, kept in its record instead
 * of figures measured here (call before qs_import_tensor_end). */
void qs_import_tensor_figures(qs_import *im, double snr_db, double max_err);

/* Removes a model atomically (QINS_ENO_MODEL if absent); its space is reclaimed right after in
 * bounded transactions (or by the next writer if this process dies). */
int qs_model_remove(qs_store *s, const char *model);

/* ===== Maintenance ========================================================================= */
/* Environment figures (mdb_env_info, mdb_stat, the freelist). */
typedef struct qs_store_info {
  uint64_t map_size;     /* bytes mapped */
  uint64_t file_size;    /* bytes of DIR/data.mdb */
  uint64_t page_size;    /* LMDB page size */
  uint64_t last_pgno;    /* highest page used */
  uint64_t free_pages;   /* pages on the freelist (reusable) */
  uint64_t n_models;     /* models */
  uint64_t n_params;     /* distinct codec parameter blobs */
  uint64_t params_bytes; /* their bytes */
  uint64_t n_staging;    /* leftover staging entries awaiting cleanup */
  unsigned max_readers, n_readers; /* reader table */
  uint64_t map_adopted;  /* this process adopted a map grown by another (MDB_MAP_RESIZED) */
} qs_store_info;
int qs_store_info_get(qs_store *s, qs_store_info *out /* out */);

/* Backup: a consistent, compacted copy of the store in directory dir (created if absent; it must
 * not already hold a data.mdb: -EEXIST). The copy is mdb_env_copy2(MDB_CP_COMPACT) of one read
 * snapshot: every model as it was at one instant (a model being imported meanwhile is wholly in it
 * or not at all), no free pages. What that snapshot had staged (an import in progress, garbage not
 * yet reclaimed) is then reclaimed in the copy and the copy compacted once more, so it holds only
 * reachable models. Works on a store opened QS_OPEN_RDONLY, while qinsd serves and while an import
 * runs: it is one more reader and never takes the writer lock (a long copy pins its snapshot's
 * pages, so a concurrent import may grow the source file meanwhile). The copy is a self-contained
 * store directory (data.mdb only; lock files are recreated by whoever opens it): move it to any
 * host of the same word size and byte order and qs_open it. data.mdb and dir are fsync'ed. On
 * failure nothing is left behind (dir is removed if this call created it); QINS_ESTORE_FULL when
 * the destination runs out of space. Opens a second, different LMDB env in this process for the
 * reclaim step (LMDB forbids opening the *same* env twice, not two envs). */
typedef struct qs_backup_info {
  uint64_t source_file_bytes; /* DIR/data.mdb of the source when the copy began */
  uint64_t file_bytes;        /* the copy's data.mdb */
  uint64_t n_models;          /* models in the copy */
  uint64_t staging_dropped;   /* staged ids of the snapshot reclaimed in the copy (0 normally) */
} qs_backup_info;
int qs_backup(qs_store *s, const char *dir, qs_backup_info *out /* out; may be NULL */);

/* Checks every record of `model` (NULL: all models, plus params refcounts): magic and version,
 * each chunk's checksum, qc_chunk_validate and a full decode. Each problem is passed to cb (may
 * be NULL) as a message; *n_problems counts them and *n_checked counts tensors checked. Returns 0
 * when the walk completed (problems or not), or an error that stopped it. */
typedef void (*qs_problem_cb)(void *ud, const char *msg);
int qs_verify(qs_store *s, const char *model, qs_problem_cb cb, void *ud,
              uint64_t *n_problems /* out */, uint64_t *n_checked /* out */);

/* Per-tensor storage detail for audits: chunk payload bytes, the codec parameter blob's bytes,
 * its id and how many tensors of this model share it. */
typedef struct qs_tensor_cost {
  uint64_t data_bytes;   /* chunk payloads */
  uint64_t params_bytes; /* serialized codec parameters (0 for none) */
  uint64_t params_id;    /* key of the shared blob (0 for none) */
  int params_first;      /* this tensor is the first of its model using the blob: it pays for it */
  uint32_t checksum;     /* the record's tensor checksum: CRC-32C over its chunks' CRC-32Cs */
} qs_tensor_cost;
int qs_tensor_cost_get(qs_txn *t, const qs_tensor *ten, qs_tensor_cost *out /* out */);

/* ===== Importers and export (import.c, gguf.c, npy.c, export.c) ==========================
 * qs_import_path imports FILE or DIR as one model, streaming with bounded memory (peak RSS does
 * not grow with the model: rows are read in batches of about one chunk with pread, converted to
 * f32 from unaligned bytes, fitted, encoded and staged). Everything is validated before the
 * first write; any failure (malformed input, NaN bound for a lossy codec, store full, ...)
 * aborts with the store unchanged and qs_error() naming the file and what is wrong.
 * Sources:
 *   FILE.safetensors                    one model
 *   DIR with model.safetensors.index.json (or that file itself): a sharded model
 *   DIR with exactly one *.safetensors   that file
 *   FILE.gguf                           GGUF v2/v3: F32/F16/BF16/F64, I8..I64, and the block
 *                                       types Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K Q8_K dequantized
 *                                       exactly as ggml does (src_dtype names the type, "q4_k");
 *                                       other quantized types refused naming the type; GGUF's
 *                                       innermost-first dims are stored row-major
 * Files are recognized by content (magic), not by extension; a Git LFS pointer, a zip (PyTorch
 * .bin, NumPy .npz) or a pickle is refused with a message naming it and what to do.
 *   FILE.npy, or DIR of *.npy           one tensor per file, named by the file's stem
 * Codec policy per float tensor, first that applies: a GGUF block-quantized tensor without
 * allow_requant is stored f32 (its dequantized values exactly: d * q - m products are generally
 * not f16-exact, and re-encoding would stack two quantization errors); the last --codec-for
 * GLOB=NAME rule whose glob (fnmatch) matches the tensor name; --codec NAME; qins8 for 2 or more
 * dimensions; a 1-D (or scalar) f16/bf16 tensor keeps its dtype (codec f16/bf16); f32 otherwise.
 * Integer and bool tensors are stored raw (QS_RAW) whatever the rules say. */
typedef struct qs_codec_rule {
  const char *glob; /* fnmatch(3) pattern over tensor names */
  int codec;        /* qc_codec */
} qs_codec_rule;

typedef void (*qs_progress_cb)(void *ud, uint64_t done, uint64_t total, const char *what);

typedef struct qs_import_opts {
  const char *model;           /* model name; NULL: the file's (or directory's) stem */
  int codec;                   /* qc_codec for all float tensors, or -1 for the policy */
  const qs_codec_rule *rules;  /* per-name overrides, later ones win */
  size_t n_rules;
  int effort;                  /* QC_EFFORT_DEFAULT or QC_EFFORT_MAX */
  int allow_requant;           /* GGUF block types: re-encode by the rules (else exact f32) */
  qs_progress_cb progress;     /* may be NULL: called with source bytes done/total */
  void *progress_ud;
} qs_import_opts;

typedef struct qs_import_result {
  char model[QS_MAX_NAME + 1]; /* name it was stored under */
  uint64_t n_tensors, n_elem, src_bytes, stored_bytes;
  double snr_db_2d;            /* element-weighted SNR over inexact tensors with >= 2 dims */
  uint64_t n_narrowed;         /* tensors stored f32/f16/bf16 whose values differ from the source's
                                  (f64 to f32, bf16 as f16, ...): SNR against the source values */
  double snr_db_narrowed;      /* the lowest SNR among them (+inf if none) */
  char narrowed_tensor[QS_MAX_NAME + 1]; /* the tensor with that SNR ("" if none) */
} qs_import_result;

void qs_import_opts_init(qs_import_opts *o);
int qs_import_path(qs_store *s, const char *path, const qs_import_opts *o,
                   qs_import_result *res /* out; may be NULL */);

/* Writes model as a safetensors file at out_path (through out_path.tmp + rename): tensors in name
 * order, codec tensors decoded as dt (f32, f16 or bf16), raw tensors as their source dtype, the
 * model's metadata as __metadata__. Deterministic: the same model gives the same bytes. */
int qs_export_safetensors(qs_store *s, const char *model, const char *out_path, qc_dtype dt,
                          qs_progress_cb progress, void *progress_ud);
/* Writes model as a GGUF v3 file at out_path (through out_path.tmp + rename): the model's GGUF
 * KV list as it was imported (every key, type and value, the tokenizer's arrays too; a model from
 * another format gets its string metadata as string KVs), tensors in name order with ggml's
 * reversed dims, padded to general.alignment (32 if absent). Codec tensors are written as dt
 * (QC_DT_F32/F16/BF16), or with dt -1 as F16/BF16 when that was their source dtype and F32
 * otherwise (block-quantized sources too: they are not re-quantized); raw i8..i64 tensors as
 * I8..I64; a model with block-quantized sources gets general.file_type rewritten to match (0 all
 * F32, 1 mostly F16, 32 mostly BF16). QINS_EUNSUPPORTED for what GGUF cannot hold (u8..u64, bool,
 * more than 4 dims, a KV list cut at import). Deterministic. */
int qs_export_gguf(qs_store *s, const char *model, const char *out_path, int dt,
                   qs_progress_cb progress, void *progress_ud);

/* ===== Portable model files (qfile.c; docs/FORMAT.md §3) ==================================
 * A .qins file holds one model as stored: its metadata, codec parameter blobs, tensor descriptors
 * and chunk records with their checksums, behind a header and an index up front (the body's
 * SHA-256 and one SHA-256 per piece of piece_size bytes), so a reader fetching ranges verifies
 * every piece as it arrives. Model ids, params ids and the import time are the store's own and
 * are not in the file: two exports of one model, or of its copy in another store, are
 * byte-identical. */
#define QS_QFILE_MAGIC "QINSMODL"
#define QS_QFILE_MAGIC_MODEL "QFMD"
#define QS_QFILE_MAGIC_TENSOR "QFTN"
#define QS_QFILE_MAGIC_END "QFEN"
#define QS_QFILE_VERSION 1
#define QS_QFILE_HDR 96          /* header bytes; the index follows */
#define QS_QFILE_PIECE (1u << 20) /* default piece size */

typedef struct qs_qfile_header {
  uint64_t file_bytes, piece_size, n_pieces;
  uint64_t index_bytes; /* 32 (body SHA-256) + 32 per piece */
  uint64_t data_off;    /* QS_QFILE_HDR + index_bytes: where the body (piece 0) starts */
  uint8_t index_sha[32];
} qs_qfile_header;

typedef struct qs_qfile_info {
  uint64_t file_bytes, n_pieces, piece_size, n_tensors, stored_bytes, n_elem;
  uint8_t sha256[32]; /* of the whole file (what sha256sum prints) */
} qs_qfile_info;

/* Writes model to path (through path.tmp + rename, fsync'ed). piece_size 0: QS_QFILE_PIECE
 * (4 KiB .. 64 MiB). Every chunk is checked as it is copied. One read transaction. */
int qs_qfile_export(qs_store *s, const char *model, const char *path, uint64_t piece_size,
                    qs_progress_cb progress, void *progress_ud, qs_qfile_info *out /* may be NULL */);

typedef struct qs_qfile_import_opts {
  const char *model;        /* store it under this name; NULL: the name in the file */
  const uint8_t *sha256;    /* 32 bytes: the whole file must have this SHA-256; NULL: no check */
  int pieces_verified;      /* the caller already checked each piece's SHA-256 and owns the file
                               (qinsctl pull's staging file): it is mapped and read in place, not
                               hashed again; it must not shrink during the import */
  qs_progress_cb progress;  /* file bytes done/total; may be NULL */
  void *progress_ud;
} qs_qfile_import_opts;
void qs_qfile_import_opts_init(qs_qfile_import_opts *o);
/* Imports the model in the .qins file at path without re-encoding: each chunk record is stored
 * byte for byte as the source store held it. Everything is checked (header CRC, index SHA-256,
 * each piece's SHA-256 naming the piece, each record's CRC-32C, each chunk's CRC-32C and codec
 * data, the body's SHA-256, opts->sha256) before qs_import_commit publishes the model; any failure
 * leaves the store as it was, with qs_error() naming the file and what is wrong. */
int qs_qfile_import(qs_store *s, const char *path, const qs_qfile_import_opts *o,
                    qs_import_result *res /* out; may be NULL */);
/* Header bytes (QS_QFILE_HDR) -> *h, checked (magic, version, CRC-32C, sizes); what names the
 * source in messages. */
int qs_qfile_parse_header(const char *what, const uint8_t *p, size_t n, qs_qfile_header *h /* out */);
/* The index (h->index_bytes) against the header's SHA-256 of it. */
int qs_qfile_check_index(const char *what, const qs_qfile_header *h, const uint8_t *index);
/* SHA-256 of n bytes (OpenSSL libcrypto); hex of n bytes into out (2n + 1 chars). */
void qs_sha256(const void *p, size_t n, uint8_t out[32]);
void qs_hex(const uint8_t *b, size_t n, char *out);

#endif /* QINS_STORE_H */
