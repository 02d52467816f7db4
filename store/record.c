/* SPDX-License-Identifier: MIT */
/*
 * record.c — names and records: the dtype and codec name tables, the name check for what enters
 * the store, and the decoders of the stored records (model, tensor, params, chunk;
 * docs/FORMAT.md §2, layouts in store_int.h).
 *
 * Invariants.
 *  - Decoders are pure functions over a record's bytes (fuzzed by tests/fuzz/records.c): each
 *    validates everything a reader relies on (lengths, magics, versions, shape and chunking
 *    consistent within 64 bits) before any field is trusted, and fails with QINS_ECORRUPT,
 *    QINS_EVERSION or QINS_ECHECKSUM naming the record.
 */
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

/* ---------------------------------------------------------------------------------------------
 * Names */
static const char *const qs__dt_names[QS_DT_COUNT] = {
    "f32",  "f16",  "bf16", "f64",  "i8",   "u8",   "i16",  "u16",  "i32",  "u32",  "i64", "u64",
    "bool", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k"};
static const unsigned char qs__dt_sizes[QS_DT_COUNT] = {4, 2, 2, 8, 1, 1, 2, 2, 4, 4, 8, 8, 1}; /* block types: 0 */

const char *qs_dtype_name(qs_dtype d) { return (unsigned)d < QS_DT_COUNT ? qs__dt_names[d] : "?"; }
int qs_dtype_from_name(const char *name) {
  for (int i = 0; i < QS_DT_COUNT; i++)
    if (!strcmp(name, qs__dt_names[i])) return i;
  return -1;
}
size_t qs_dtype_size(qs_dtype d) { return (unsigned)d < QS_DT_COUNT ? qs__dt_sizes[d] : 0; }
const char *qs_codec_name(int codec) {
  if (codec == QS_RAW) return "raw";
  if (codec < 0 || codec >= QC_CODEC_COUNT) return "?";
  return qc_codec_name((qc_codec)codec);
}

/* Length of the UTF-8 sequence at p (n bytes left) if it is well formed (shortest form, no
 * surrogate, at most U+10FFFF), else 0; *cp gets the code point. */
static size_t qs__utf8_seq(const unsigned char *p, size_t n, uint32_t *cp) {
  unsigned char c = p[0];
  size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  if (!len || len > n) return 0;
  uint32_t v = len == 1 ? c : c & (0x7F >> len);
  for (size_t i = 1; i < len; i++) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (p[i] & 0x3F);
  }
  static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < min[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return len;
}

void qs__escape(const char *name, char *out, size_t cap) {
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)name; *p && o + 5 < cap && o < 80; p++)
    o += (size_t)(*p >= 0x20 && *p < 0x7F && *p != '"' && *p != '\\'
                      ? snprintf(out + o, cap - o, "%c", *p)
                      : snprintf(out + o, cap - o, "\\x%02x", *p));
  out[o] = 0;
}

/* name escaped into esc, for a message: only when the check fails (every request's names pass
 * through qs_name_check, and escaping costs a formatted write a byte). */
static const char *qs__escaped(const char *name, char *esc, size_t cap) {
  qs__escape(name, esc, cap);
  return esc;
}

__attribute__((hot))
int qs_name_check(const char *what, const char *name, int is_model) {
  size_t n = name ? strlen(name) : 0;
  char esc[128];
  if (n == 0) return qs__fail(QINS_ENAME, "%s name is empty", what);
  if (n > QS_MAX_NAME)
    return qs__fail(QINS_ENAME, "%s name \"%s...\" is %zu bytes; at most %d allowed (LMDB keys "
                                "are limited to 511 bytes)",
                    what, qs__escaped(name, esc, sizeof esc), n, QS_MAX_NAME);
  const unsigned char *p = (const unsigned char *)name;
  int slash = 0;
  for (size_t i = 0; i < n;) {
    if (p[i] >= 0x20 && p[i] < 0x7F) { /* printable ASCII, most names: one byte */
      slash |= p[i] == '/';
      i++;
      continue;
    }
    uint32_t cp = 0;
    size_t len = qs__utf8_seq(p + i, n - i, &cp);
    if (!len)
      return qs__fail(QINS_ENAME, "%s name \"%s\" is not valid UTF-8 (byte %zu: 0x%02x)", what,
                      qs__escaped(name, esc, sizeof esc), i, p[i]);
    if (cp < 0x20 || (cp >= 0x7F && cp < 0xA0))
      return qs__fail(QINS_ENAME, "%s name \"%s\" contains control character U+%04X at byte %zu",
                      what, qs__escaped(name, esc, sizeof esc), (unsigned)cp, i);
    i += len;
  }
  if (is_model && slash)
    return qs__fail(QINS_ENAME, "%s name \"%s\" contains '/' (reserved for MODEL/TENSOR)", what,
                    qs__escaped(name, esc, sizeof esc));
  return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Record decoding */
int qs__model_decode(qs_store *s, const MDB_val *k, const MDB_val *v, qs_model *m) {
  const uint8_t *p = v->mv_data;
  if (v->mv_size < QS_MODEL_HDR + 2 || memcmp(p, QS_MAGIC_MODEL, 4))
    return qs__fail(QINS_ECORRUPT, "store %s: model record \"%.*s\" is malformed", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data);
  uint16_t nl = qs__get_u16(p + 6);
  uint32_t ml = qs__get_u32(p + 56);
  if ((uint64_t)QS_MODEL_HDR + nl + 1 + ml + 1 != v->mv_size || p[QS_MODEL_HDR + nl] ||
      p[QS_MODEL_HDR + nl + 1 + ml] || nl != k->mv_size)
    return qs__fail(QINS_ECORRUPT, "store %s: model record \"%.*s\" has bad lengths", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data);
  uint32_t crc = qs__get_u32(p + QS_MODEL_CRC);
  if (crc && crc != qs__rec_crc(p, QS_MODEL_HDR + nl + 1, QS_MODEL_CRC))
    return qs__fail(QINS_ECHECKSUM, "store %s: model record \"%.*s\" fails its checksum", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data);
  if (qs__get_u16(p + 4) != QS_FORMAT_VERSION)
    return qs__fail(QINS_EVERSION, "store %s: model record \"%.*s\" has version %u", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data, qs__get_u16(p + 4));
  m->name = (const char *)p + QS_MODEL_HDR;
  m->id = qs__get_u64(p + 8);
  m->n_tensors = qs__get_u64(p + 16);
  m->src_bytes = qs__get_u64(p + 24);
  m->stored_bytes = qs__get_u64(p + 32);
  m->n_elem = qs__get_u64(p + 40);
  m->created = (int64_t)qs__get_u64(p + 48);
  m->metadata = (const char *)p + QS_MODEL_HDR + nl + 1;
  return 0;
}

int qs__tensor_rec_decode(const char *dir, const char *model, const uint8_t *p, size_t size,
                          qs_tensor *t, qs__trec *r) {
  memset(t, 0, sizeof *t);
  if (size < QS_TENSOR_HDR + 2 || memcmp(p, QS_MAGIC_TENSOR, 4))
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor record is malformed", dir, model);
  uint16_t nl = qs__get_u16(p + 10);
  if ((uint64_t)QS_TENSOR_HDR + nl + 1 != size || nl > QS_MAX_NAME || p[QS_TENSOR_HDR + nl])
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor record has bad lengths", dir,
                    model);
  uint32_t crc = qs__get_u32(p + QS_TENSOR_CRC);
  if (crc && crc != qs__rec_crc(p, size, QS_TENSOR_CRC))
    return qs__fail(QINS_ECHECKSUM, "store %s: model %s: tensor record \"%.*s\" fails its checksum",
                    dir, model, (int)nl, (const char *)p + QS_TENSOR_HDR);
  if (qs__get_u16(p + 4) != QS_FORMAT_VERSION)
    return qs__fail(QINS_EVERSION, "store %s: model %s: tensor record has version %u", dir,
                    model, qs__get_u16(p + 4));
  size_t ml = strnlen(model, sizeof t->model - 1); /* as snprintf "%s" would, without its cost */
  memcpy(t->model, model, ml);
  t->model[ml] = 0;
  memcpy(t->name, p + QS_TENSOR_HDR, nl);
  t->name[nl] = 0;
  t->codec = p[6];
  t->src_dtype = (qs_dtype)p[7];
  t->ndim = p[8];
  r->flags = p[9];
  t->index = qs__get_u32(p + 12);
  for (int i = 0; i < QS_MAX_NDIM; i++) t->shape[i] = qs__get_u64(p + 16 + 8 * i);
  t->n_elem = qs__get_u64(p + 80);
  t->row_len = qs__get_u64(p + 88);
  t->n_rows = qs__get_u64(p + 96);
  t->rows_per_chunk = qs__get_u64(p + 104);
  t->n_chunks = qs__get_u64(p + 112);
  t->src_bytes = qs__get_u64(p + 120);
  r->data_bytes = qs__get_u64(p + 128);
  r->params_id = qs__get_u64(p + 136);
  r->params_bytes = qs__get_u32(p + 144);
  r->tensor_crc = qs__get_u32(p + 148);
  t->snr_db = qs__get_f64(p + 152);
  t->max_err = qs__get_f64(p + 160);
  t->stored_bytes = r->data_bytes + ((r->flags & QS_TF_PARAMS_FIRST) ? r->params_bytes : 0);
  /* Validate what readers rely on. */
  int bad = t->ndim > QS_MAX_NDIM || (t->codec != QS_RAW && t->codec >= QC_CODEC_COUNT) ||
            (unsigned)t->src_dtype >= QS_DT_COUNT ||
            (t->codec == QS_RAW && !qs_dtype_size(t->src_dtype));
  uint64_t n = 1;
  for (int i = 0; !bad && i < t->ndim; i++)
    if (__builtin_mul_overflow(n, t->shape[i], &n)) bad = 1;
  uint64_t rl = !bad && t->ndim ? t->shape[t->ndim - 1] : 1; /* ndim is checked first */
  if (!bad && (n != t->n_elem || rl != t->row_len || (rl ? n / rl : 0) != t->n_rows)) bad = 1;
  if (!bad && t->n_rows && (!t->rows_per_chunk ||
                            t->n_chunks != (t->n_rows + t->rows_per_chunk - 1) / t->rows_per_chunk))
    bad = 1;
  if (!bad && !t->n_rows && t->n_chunks) bad = 1;
  /* The largest chunk's payload must have a 64-bit size: else its expected size wraps and a
   * short chunk record would pass the size check (then validation reads past it). */
  if (!bad && t->n_rows) {
    uint64_t rows = t->rows_per_chunk < t->n_rows ? t->rows_per_chunk : t->n_rows, e;
    int ovf = 0;
    if (t->codec == QS_RAW)
      ovf = __builtin_mul_overflow(rows, t->row_len, &e) ||
            __builtin_mul_overflow(e, (uint64_t)qs_dtype_size(t->src_dtype), &e);
    else
      qc_chunk_bytes((qc_codec)t->codec, t->row_len, rows, &ovf);
    if (ovf) bad = 1;
  }
  if (bad)
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: record fields are inconsistent",
                    dir, model, t->name);
  t->params.codec = t->codec == QS_RAW ? QC_F32 : (qc_codec)t->codec;
  if (!r->params_id && t->codec != QS_RAW && t->n_elem && qc_params_size((qc_codec)t->codec) != 0)
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: codec parameters missing",
                    dir, model, t->name);
  return 0;
}

int qs__params_rec_decode(const char *dir, const qs__trec *r, const uint8_t *pp, size_t size,
                          qs_tensor *t) {
  if (size < QS_PARAMS_HDR || memcmp(pp, QS_MAGIC_PARAMS, 4) || pp[4] != t->codec ||
      qs__get_u32(pp + 16) != size - QS_PARAMS_HDR || size - QS_PARAMS_HDR != r->params_bytes ||
      qs__crc32c(0, pp + QS_PARAMS_HDR, size - QS_PARAMS_HDR) != qs__get_u32(pp + 20))
    return qs__fail(QINS_ECORRUPT,
                    "store %s: model %s: tensor %s: codec parameter record %016llx is malformed "
                    "or fails its checksum",
                    dir, t->model, t->name, (unsigned long long)r->params_id);
  if (qc_params_read((qc_codec)t->codec, pp + QS_PARAMS_HDR, size - QS_PARAMS_HDR, &t->params))
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: codec parameters are invalid",
                    dir, t->model, t->name);
  return 0;
}

int qs__tensor_decode(qs_store *s, MDB_txn *txn, const char *model, const MDB_val *v,
                      qs_tensor *t, qs__trec *r) {
  int rc = qs__tensor_rec_decode(s->dir, model, v->mv_data, v->mv_size, t, r);
  if (rc || !r->params_id) return rc;
  uint8_t key[8];
  qs__put_be64(key, r->params_id);
  MDB_val k = {8, key}, pv;
  rc = mdb_get(txn, s->db_params, &k, &pv);
  if (rc)
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: codec parameters %016llx %s",
                    s->dir, model, t->name, (unsigned long long)r->params_id,
                    rc == MDB_NOTFOUND ? "missing" : mdb_strerror(rc));
  return qs__params_rec_decode(s->dir, r, pv.mv_data, pv.mv_size, t);
}

uint64_t qs__chunk_payload(const qs_tensor *t, uint64_t rows) {
  if (t->codec == QS_RAW) return rows * t->row_len * qs_dtype_size(t->src_dtype);
  return qc_chunk_bytes((qc_codec)t->codec, t->row_len, rows, NULL);
}

int qs__chunk_rec_check(const qs_tensor *t, uint64_t ci, const uint8_t *p, size_t size, int verify,
                        uint64_t *rows_out) {
  uint64_t rows = t->rows_per_chunk;
  if (ci >= t->n_chunks)
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu of %llu", t->model, t->name,
                    (unsigned long long)ci, (unsigned long long)t->n_chunks);
  if (ci == t->n_chunks - 1) rows = t->n_rows - ci * t->rows_per_chunk;
  uint64_t want = qs__chunk_payload(t, rows);
  /* qinsx chunks are as large as their data needs: the size comes from the payload's header
   * (UINT64_MAX, never equal, for a malformed one). */
  if (size >= QS_CHUNK_HDR && t->codec != QS_RAW && qc_codec_varsize((qc_codec)t->codec) &&
      qc_chunk_size(&t->params, t->row_len, rows, p + QS_CHUNK_HDR, size - QS_CHUNK_HDR, &want))
    want = UINT64_MAX;
  if (size < QS_CHUNK_HDR || size - QS_CHUNK_HDR != want || memcmp(p, QS_MAGIC_CHUNK, 4) ||
      qs__get_u64(p + 8) != want)
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu is malformed (%zu bytes, %llu expected)",
                    t->model, t->name, (unsigned long long)ci,
                    size < QS_CHUNK_HDR ? (size_t)0 : size - QS_CHUNK_HDR, (unsigned long long)want);
  *rows_out = rows;
  return verify ? qs__chunk_verify(t, ci, p, rows, NULL) : 0;
}

int qs__chunk_verify(const qs_tensor *t, uint64_t ci, const uint8_t *p, uint64_t rows,
                     qs__sums *sums) {
  uint64_t pay = qs__get_u64(p + 8); /* checked by qs__chunk_rec_check (qinsx: data-dependent) */
  const uint8_t *d = p + QS_CHUNK_HDR;
  uint32_t crc;
  if (!sums) {
    crc = qs__crc32c(0, d, pay);
  } else {
    crc = 0;
    for (uint64_t i = 0, off = 0; off < pay; i++, off += QS_SEG) {
      uint64_t len = pay - off < QS_SEG ? pay - off : QS_SEG;
      sums->crc[i] = qs__crc32c(0, d + off, len);
      crc = i ? qs__crc32c_combine(crc, sums->crc[i], len) : sums->crc[i];
    }
  }
  if (crc != qs__get_u32(p + 4))
    return qs__fail(QINS_ECHECKSUM, "tensor %s/%s: chunk %llu fails its checksum", t->model,
                    t->name, (unsigned long long)ci);
  if (t->codec != QS_RAW && qc_chunk_validate(&t->params, t->row_len, rows, d))
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu holds invalid codec data", t->model,
                    t->name, (unsigned long long)ci);
  return 0;
}
