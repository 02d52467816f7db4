/* SPDX-License-Identifier: MIT */
/*
 * store_int.h — internals shared by the store's files (store.c, crc32c.c, import*.c, export.c):
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

/* CRC-32C (Castagnoli), SSE4.2 when the CPU has it, else a table; crc32c.c. */
uint32_t qs__crc32c(uint32_t crc, const void *buf, size_t len);
/* 64-bit content hash (FNV-1a 64 finished with a splitmix64 mixer) for params dedup keys. */
uint64_t qs__hash64(const void *buf, size_t len, uint64_t seed);

/* Error message seam: sets qs_error() for this thread and returns rc. */
int qs__fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline void qs__put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void qs__put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void qs__put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void qs__put_f64(uint8_t *p, double d) {
  uint64_t v;
  memcpy(&v, &d, 8);
  qs__put_u64(p, v);
}
static inline uint16_t qs__get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
/* Loads and stores are one unaligned access (+ a byte swap where the host order differs): the
 * byte loops they replace were not merged by the compiler, and records are decoded per request. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define QS__LE32(v) __builtin_bswap32(v)
#define QS__LE64(v) __builtin_bswap64(v)
#define QS__BE32(v) (v)
#define QS__BE64(v) (v)
#else
#define QS__LE32(v) (v)
#define QS__LE64(v) (v)
#define QS__BE32(v) __builtin_bswap32(v)
#define QS__BE64(v) __builtin_bswap64(v)
#endif
static inline uint32_t qs__get_u32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return QS__LE32(v);
}
static inline uint64_t qs__get_u64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return QS__LE64(v);
}
static inline double qs__get_f64(const uint8_t *p) {
  uint64_t v = qs__get_u64(p);
  double d;
  memcpy(&d, &v, 8);
  return d;
}
static inline void qs__put_be64(uint8_t *p, uint64_t v) {
  v = QS__BE64(v);
  memcpy(p, &v, 8);
}
static inline void qs__put_be32(uint8_t *p, uint32_t v) {
  v = QS__BE32(v);
  memcpy(p, &v, 4);
}
static inline uint64_t qs__get_be64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return QS__BE64(v);
}
static inline uint32_t qs__get_be32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return QS__BE32(v);
}

/* ---- Record decoders: pure functions over a record's bytes (store.c; fuzzed by tests/fuzz/
 * records.c). Each validates before anything is trusted and fails with QINS_ECORRUPT (or
 * QINS_EVERSION, QINS_ECHECKSUM) naming the record in qs_error(). */

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

/* Checks a name for the store: 1..QS_MAX_NAME bytes, no NUL; models also no '/'. */
int qs__name_check(const char *what, const char *name, int is_model);

#endif /* QINS_STORE_INT_H */
