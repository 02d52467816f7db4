/* SPDX-License-Identifier: MIT */
/*
 * store_int.h — internals shared by the store's files (env.c, txn.c, record.c, read.c, stage.c,
 * gc.c, backup.c, verify.c, crc32c.c, import*.c, export.c):
 * record layouts (docs/FORMAT.md §2), checksums, the error-message seam. Not for other modules.
 *
 * Every layout here is little-endian and packed; keys are big-endian so byte order is numeric
 * order. The OFFSET/SIZE tables in docs/FORMAT.md §2 are the normative description: keep both in
 * the same commit.
 */
#ifndef QINS_STORE_INT_H
#define QINS_STORE_INT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "store.h"

#define QS_FORMAT_VERSION 1 /* docs/FORMAT.md §2: bump when any layout below changes */

/* Named databases. */
#define QS_DB_META "meta"       /* "qins" -> meta record */
#define QS_DB_MODELS "models"   /* model name -> model record */
#define QS_DB_TENSORS "tensors" /* u64 model id | name -> tensor record */
#define QS_DB_CHUNKS "chunks"   /* u64 model id | u32 tensor index | u32 chunk index -> chunk */
#define QS_DB_PARAMS "params"   /* u64 params id -> shared codec parameter blob */
#define QS_DB_STAGING "staging" /* u64 model id -> staging record (import in progress / garbage) */

/* Record magics (first 4 bytes of each value). */
#define QS_MAGIC_META "QINSSTOR" /* 8 bytes */
#define QS_MAGIC_MODEL "QSMD"
#define QS_MAGIC_TENSOR "QSTN"
#define QS_MAGIC_CHUNK "QSCK"
#define QS_MAGIC_PARAMS "QSPM"
#define QS_MAGIC_STAGING "QSSG"

#define QS_META_SIZE 32     /* meta record bytes */
#define QS_MODEL_HDR 64     /* model record header, then name\0 metadata\0 */
#define QS_TENSOR_HDR 176   /* tensor record header, then name\0 */
#define QS_CHUNK_HDR 16     /* chunk header, then payload */
#define QS_PARAMS_HDR 24    /* params record header, then blob */
#define QS_STAGING_HDR 16   /* staging record header, then name\0 */

enum { QS_STAGE_IMPORTING = 1, QS_STAGE_GARBAGE = 2 };
enum { QS_TF_PARAMS_FIRST = 1 }; /* tensor record flags */

/* CRC-32C (Castagnoli): VPCLMULQDQ folding (AVX-512) or the SSE4.2 instruction when the CPU has
 * them, else a table (QINS_CRC_NO_CLMUL, QINS_CRC_SOFT force the slower ones); crc32c.c. */
uint32_t qs__crc32c(uint32_t crc, const void *buf, size_t len);
/* The kernel qs__crc32c uses for long buffers: 0 table, 1 SSE4.2, 2 VPCLMULQDQ fold. */
int qs__crc32c_kernel(void);
/* qs__crc32c of A ++ B from those of A and of B (len_b bytes): a table lookup per byte of the
 * CRC when len_b is QS_SEG (joining segment CRCs), else a multiply mod P. */
uint32_t qs__crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
/* CRC-32C of a record's first size bytes with the 4 checksum bytes at off taken as zero
 * (the model and tensor record checksums, docs/FORMAT.md §2.3, §2.4). */
uint32_t qs__rec_crc(const uint8_t *p, size_t size, size_t off);
#define QS_MODEL_CRC 60   /* model record: u32 CRC of header + name, 0 = none */
#define QS_TENSOR_CRC 168 /* tensor record: u32 CRC of the record, 0 = none */
/* 64-bit content hash (FNV-1a 64 finished with a splitmix64 mixer) for params dedup keys. */
uint64_t qs__hash64(const void *buf, size_t len, uint64_t seed);
/* A 64-bit hash of len bytes for this process's lookup caches (a word at a time, finished with
 * the splitmix64 mixer; never stored: qs__hash64 is the stored one). */
uint64_t qs__hash_key(const void *buf, size_t len, uint64_t seed);

/* Functions on a small get's path (txn.c, read.c, record.c, crc32c.c, codec.c) are marked
 * __attribute__((hot)), as the daemon's are (daemon/qinsd.h): kept together, the path's code fits
 * the instruction cache. */

/* Error message seam: sets qs_error() for this thread and returns rc. */
int qs__fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Fixed-width fields at any alignment, each one unaligned access plus a byte swap where the host
 * order differs (byte loops are not merged by the compiler, and records are decoded per
 * request): qs__get_/qs__put_u16/u32/u64/f64 are the records' little-endian fields,
 * qs__get_/qs__put_be32/be64 the big-endian keys (which sort by number). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define QS__LE16(v) __builtin_bswap16(v)
#define QS__LE32(v) __builtin_bswap32(v)
#define QS__LE64(v) __builtin_bswap64(v)
#define QS__BE32(v) (v)
#define QS__BE64(v) (v)
#else
#define QS__LE16(v) (v)
#define QS__LE32(v) (v)
#define QS__LE64(v) (v)
#define QS__BE32(v) __builtin_bswap32(v)
#define QS__BE64(v) __builtin_bswap64(v)
#endif
#define QS__GET(name, type, order)                                                                 \
  static inline type name(const uint8_t *p) {                                                      \
    type v;                                                                                        \
    memcpy(&v, p, sizeof v);                                                                       \
    return order(v);                                                                               \
  }
#define QS__PUT(name, type, order)                                                                 \
  static inline void name(uint8_t *p, type v) {                                                    \
    v = order(v);                                                                                  \
    memcpy(p, &v, sizeof v);                                                                       \
  }
QS__GET(qs__get_u16, uint16_t, QS__LE16)
QS__GET(qs__get_u32, uint32_t, QS__LE32)
QS__GET(qs__get_u64, uint64_t, QS__LE64)
QS__GET(qs__get_be32, uint32_t, QS__BE32)
QS__GET(qs__get_be64, uint64_t, QS__BE64)
QS__PUT(qs__put_u16, uint16_t, QS__LE16)
QS__PUT(qs__put_u32, uint32_t, QS__LE32)
QS__PUT(qs__put_u64, uint64_t, QS__LE64)
QS__PUT(qs__put_be32, uint32_t, QS__BE32)
QS__PUT(qs__put_be64, uint64_t, QS__BE64)
static inline double qs__get_f64(const uint8_t *p) {
  uint64_t v = qs__get_u64(p);
  double d;
  memcpy(&d, &v, 8);
  return d;
}
static inline void qs__put_f64(uint8_t *p, double d) {
  uint64_t v;
  memcpy(&v, &d, 8);
  qs__put_u64(p, v);
}

/* ---- Record decoders: pure functions over a record's bytes (record.c; fuzzed by tests/fuzz/
 * records.c). Each validates before anything is trusted and fails with QINS_ECORRUPT (or
 * QINS_EVERSION, QINS_ECHECKSUM) naming the record in qs_error(). */

struct qs__sums; /* below */

/* Raw tensor-record fields beyond qs_tensor. */
typedef struct qs__trec {
  uint64_t params_id;    /* 0 = none */
  uint32_t params_bytes; /* blob size */
  uint64_t data_bytes;   /* chunk payloads */
  uint32_t tensor_crc;   /* crc32c over the chunk crcs */
  int flags;             /* QS_TF_* */
} qs__trec;

/* A tensor record (FORMAT.md §2.4) of model `model` in store `dir` (both for messages): the
 * header's fields, consistent (shape, counts, chunking, chunk sizes within 64 bits), into *t and
 * *r. t->params is set only for codecs without parameters: see qs__params_rec_decode. */
int qs__tensor_rec_decode(const char *dir, const char *model, const uint8_t *p, size_t size,
                          qs_tensor *t /* out */, qs__trec *r /* out */);
/* The params record r->params_id of t (magic, codec, length, checksum, qc_params_read) into
 * t->params. */
int qs__params_rec_decode(const char *dir, const qs__trec *r, const uint8_t *p, size_t size,
                          qs_tensor *t /* in/out */);
/* Chunk record ci of t: size, magic and payload length; with verify, also its checksum and
 * qc_chunk_validate. *rows gets the chunk's rows; the payload starts at p + QS_CHUNK_HDR. */
int qs__chunk_rec_check(const qs_tensor *t, uint64_t ci, const uint8_t *p, size_t size, int verify,
                        uint64_t *rows /* out */);
/* The verify step of qs__chunk_rec_check on a record whose header passed (rows rows): the
 * payload's CRC against the stored one, then qc_chunk_validate. With sums (may be NULL) the CRC
 * is joined from segment CRCs, which sums keeps (its key is left to the caller). */
int qs__chunk_verify(const qs_tensor *t, uint64_t ci, const uint8_t *p, uint64_t rows,
                     struct qs__sums *sums /* out */);

/* name for a message: bytes outside printable ASCII, '"' and '\\' as \\xNN, at most about 80
 * bytes of output (cap >= 86), so a message never carries raw bytes a client sent. */
void qs__escape(const char *name, char *out, size_t cap);
/* The internal spelling of qs_name_check (store.h), as the importers call it. */
#define qs__name_check qs_name_check

/* ---- The environment, shared by the store's files (env.c, txn.c, record.c, read.c, stage.c, gc.c,
 * backup.c, verify.c). How a model lives in LMDB:
 *  - Named DBs meta, models, tensors, chunks, params, staging. A model's tensors and chunks are
 *    keyed by its numeric id (u64 BE), never by its name: the name -> id mapping in "models" is
 *    the only thing a reader consults first, so flipping it in one transaction makes a whole new
 *    model visible (or invisible) at once. Ids are never reused (meta.next_model_id).
 *  - Writes stage a model under a fresh id (stage.c); leftovers are collected by gc.c.
 *  - Every transaction begins and ends through txn.c, which counts them so the map is resized
 *    only when none is open. */
#include <lmdb.h>
#include <pthread.h>
#include <sys/types.h>

#define QS_MAP_INITIAL (1ull << 30)   /* first map size: virtual space only, the file grows by use */
#define QS_MAP_SLACK (32ull << 20)    /* headroom kept beyond a write txn's estimate */

struct qs_store {
  MDB_env *env;           /* the one environment of this process */
  MDB_dbi db_meta, db_models, db_tensors, db_chunks, db_params, db_staging;
  char *dir;              /* store directory */
  int rdonly;             /* opened QS_OPEN_RDONLY */
  int lock_fd;            /* DIR/writer.lock, -1 until first write */
  int locked;             /* we hold the writer flock */
  uint64_t max_map;       /* growth cap ($QINS_STORE_MAX_MAP), 0 = none */
  pthread_mutex_t mu;     /* guards active/resizing */
  pthread_cond_t cv;      /* signalled when active drops to 0 or resizing ends */
  int active;             /* open transactions of this process */
  struct qs_txn *spare;   /* one ended read txn kept reset for reuse (qs_txn_end), or NULL */
  int resizing;           /* a map resize waits for active == 0 */
  /* Segment checksums of chunks this process verified whole (qs__sums), direct-mapped by chunk
   * key hash; each slot allocated at its first use. A lost slot only means verifying again. */
  pthread_mutex_t vmu;
  struct qs__sums **sums; /* QS_SUMS slots */
  int verify;             /* QS_VERIFY_* from $QINS_VERIFY */
  uint64_t map_adopted;   /* times MDB_MAP_RESIZED made us adopt another process's map size */
  dev_t lock_dev;         /* DIR/lock.mdb as this process opened it (lock_ok) */
  ino_t lock_ino;
  int lock_ok;            /* lock.mdb existed after mdb_env_open (no read-only mount fallback) */
  int lock_lost;          /* qs_store_check found it removed or replaced: sticky */
  int share_data, share_lock; /* data.mdb and lock.mdb opened again, each holding a shared flock
                           * for as long as the store is open: who uses which file (write_check) */
  unsigned warnings;      /* QS_WARN_* found at open */
  mode_t fmode;           /* mode of the files this process creates (0600 or 0640) */
  long gid;               /* group given to them, or -1 */
  uint64_t map_gen;       /* bumped (under mu) whenever the map may have moved: set_mapsize */
};
/* When stored bytes are checked against their checksums ($QINS_VERIFY; docs/OPERATIONS.md). */
enum {
  QS_VERIFY_READ = 0, /* default: every read checks the bytes it serves (segment CRCs, below) */
  QS_VERIFY_ALWAYS,   /* "always": every read checks its chunks whole, no lookup caches */
  QS_VERIFY_RISKY     /* "risk-wrong-numbers": once per process; bytes changed later are served */
};

/* A chunk's payload cut into segments of QS_SEG bytes (the last one shorter), with each segment's
 * CRC-32C, taken while the whole payload was verified against the chunk's stored CRC (the stored
 * CRC is the segments' CRCs joined: qs__crc32c_combine, one pass). A read then checks only the
 * segments holding the bytes it serves against these: one CRC pass over those whole segments,
 * compared with their kept CRCs joined. A small slice of a large chunk costs a few KiB of CRC,
 * not the chunk's MiB (a 4 KiB row of a 4 MiB chunk: one segment), a large read one pass, and
 * bytes changed after the verification are still caught. The CRCs kept are 4 bytes a segment,
 * 0.1% of the bytes verified. */
#define QS_SUMS 4096            /* chunks remembered: 16 GiB of 4 MiB chunks, 16 MiB of CRCs */
#define QS_SEG (4u << 10)       /* segment bytes */
typedef struct qs__sums {
  uint8_t key[16];              /* chunk key; all-zero: empty (model id 0 never exists) */
  uint32_t crc[];               /* one per segment (qs__sums_bytes allocates them) */
} qs__sums;
/* Bytes of a qs__sums for a payload of pay bytes. */
static inline size_t qs__sums_bytes(uint64_t pay) {
  return sizeof(qs__sums) + (size_t)((pay + QS_SEG - 1) / QS_SEG) * sizeof(uint32_t);
}

/* Lookups a qs_txn remembers across its renewals (qs_txn_end keeps it reset as the spare): the
 * decoded record of recently read tensors and the map address of recently read chunks. They are
 * valid for as long as each renewal finds the same snapshot (mdb_txn_id unchanged: no commit
 * since, so every page reachable from it is as it was, LMDB never writing a live page in place)
 * in the same mapping (map_gen unchanged: a resize may move the map). Anything else empties them.
 * So a small get of a tensor just read costs no B-tree walk, params checksum or chunk lookup. */
#define QS_TCACHE 32 /* tensors remembered: a layer's worth */
#define QS_CCACHE 64 /* chunks remembered */
typedef struct qs__tcache {
  uint64_t txnid, map_gen;        /* the snapshot and mapping the entries belong to */
  struct {
    uint64_t hash;                /* of model and name; 0: empty */
    qs_tensor t;
  } ten[QS_TCACHE];
  struct {
    uint8_t key[16];              /* chunk key; all zero: empty (model id 0 never exists) */
    const uint8_t *data;          /* payload, in the map */
    uint64_t n_rows;
    uint64_t pay;                 /* payload bytes, as its header said when it was checked */
  } chunk[QS_CCACHE];
} qs__tcache;

struct qs_txn {
  qs_store *s;     /* owner */
  MDB_txn *txn;    /* read-only txn */
  qs__tcache *tc;  /* lookups of this snapshot (allocated at the first lookup), or NULL */
};

/* A validated chunk within one read call. */
typedef struct qs__chunk_ref {
  uint64_t idx;          /* chunk index, UINT64_MAX = none */
  const uint8_t *data;   /* payload, in the map */
  uint64_t n_rows;       /* rows in this chunk */
  uint8_t key[16];       /* its key in "chunks" */
  uint64_t h;            /* qs__hash_key of key */
} qs__chunk_ref;

#define QS__ERRBUF 1024
extern _Thread_local char qs__errbuf[QS__ERRBUF]; /* qs_error() of this thread (env.c) */

/* env.c */
/* Maps an LMDB/errno failure of `what` to a project code with a message. */
int qs__mdb_fail(qs_store *s, int rc, const char *what);
/* qs_store_check for a write: the lock table this process uses is the store's (and no writes on a
 * store whose lock table is not in use). */
int qs__write_check(qs_store *s);
/* Takes / releases DIR/writer.lock (flock, non-blocking; QINS_ELOCKED naming the holder). */
int qs__lock(qs_store *s);
void qs__unlock(qs_store *s);

/* txn.c: every LMDB txn of the store, counted in s->active. */
int qs__begin(qs_store *s, unsigned flags, MDB_txn **out); /* handles MDB_MAP_RESIZED */
void qs__abort(qs_store *s, MDB_txn *txn);                  /* NULL: nothing */
int qs__commit(qs_store *s, MDB_txn *txn);
void qs__leave(qs_store *s); /* one txn fewer (for a txn ended without qs__abort/qs__commit) */
/* Grows the map so that `extra` more bytes of data fit with headroom. No txn may be open. */
int qs__ensure_map(qs_store *s, uint64_t extra);
/* t's lookup cache for its snapshot and mapping, or NULL (no memory, or $QINS_VERIFY=always). */
qs__tcache *qs__tc(qs_txn *t);
/* Chunk ci of t into *ref (a no-op if ref already holds it): found and its header checked; with
 * full_check or QS_VERIFY_ALWAYS also verified whole (CRC + codec data), with QS_VERIFY_RISKY the
 * first time this process reads it. tc (may be NULL) remembers where it is for later reads in
 * this snapshot. Then qs__chunk_check before serving any of its bytes. */
int qs__chunk_fetch(qs_store *s, MDB_txn *txn, qs__tcache *tc, const qs_tensor *t, uint64_t ci,
                    qs__chunk_ref *ref, int full_check);
/* Checks the payload bytes output elements [a, e) of ref's chunk (chunk-relative, row-major)
 * decode from against the segment CRCs of the chunk's verification (verifying it whole first if
 * this process has no sums for it): QINS_ECHECKSUM naming tensor and chunk when they changed.
 * A no-op unless QS_VERIFY_READ. */
int qs__chunk_check(qs_store *s, const qs_tensor *t, const qs__chunk_ref *ref, uint64_t a,
                    uint64_t e);

/* record.c: decoders that look things up in the env. */
int qs__model_decode(qs_store *s, const MDB_val *k, const MDB_val *v, qs_model *m /* out */);
/* A tensor record and its params record. */
int qs__tensor_decode(qs_store *s, MDB_txn *txn, const char *model, const MDB_val *v,
                      qs_tensor *t /* out */, qs__trec *r /* out */);
/* Stored payload bytes of a chunk of `rows` rows of t. */
uint64_t qs__chunk_payload(const qs_tensor *t, uint64_t rows);

/* read.c: lookups by model id, for verify.c. */
int qs__model_lookup(qs_txn *t, const char *model, qs_model *m /* out */);
int qs__tensor_each_id(qs_store *s, MDB_txn *txn, uint64_t id, const char *model,
                       const char *prefix, qs_tensor_cb cb, void *ud);
int qs__tensor_get_id(qs_store *s, MDB_txn *txn, uint64_t id, const char *model, const char *name,
                      qs_tensor *out /* out */, qs__trec *tr /* out */);

/* gc.c */
/* Puts id into "staging" with state QS_STAGE_* (an LMDB code back). */
int qs__stage_put(qs_store *s, MDB_txn *txn, uint64_t id, int state, const char *name);
/* Deletes everything under model id `id` in bounded txns, then its staging entry. */
int qs__gc_id(qs_store *s, uint64_t id);
/* Cleans every staging entry. Caller holds the writer lock. */
int qs__gc_all(qs_store *s);

#endif /* QINS_STORE_INT_H */
