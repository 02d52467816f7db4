/* SPDX-License-Identifier: MIT */
/*
 * export.c — qs_export_safetensors and qs_export_gguf: write a stored model back out as a
 * safetensors or GGUF file.
 *
 * Deterministic by construction: tensors in name order (the tensors DB's key order), a header
 * built by qs_st_header_build from the records alone, the model's string metadata, and data
 * decoded by the bit-exact codecs; so two exports of one model are byte-identical. The file is
 * written to OUT.tmp and renamed into place (a reader never sees half a file; a source being
 * mmapped elsewhere is never truncated under it). One read transaction covers the export, so a
 * concurrent re-import cannot mix two versions into one file. Memory: one decode buffer.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "import_int.h"
#include "json.h"
#include "safetensors.h"
#include "store_int.h"

#define QS__EXPORT_BUF (1u << 22) /* bytes decoded per write */

typedef struct qs__elist {
  qs_tensor *t;
  size_t n, cap;
  int oom;
} qs__elist;

static int qs__elist_cb(void *ud, const qs_tensor *t) {
  qs__elist *l = ud;
  qs_tensor *nt = qp_grow(l->t, &l->cap, l->n, sizeof *nt, 64);
  if (!nt) {
    l->oom = 1;
    return 1;
  }
  l->t = nt;
  l->t[l->n++] = *t;
  return 0;
}

static qs_st_dtype qs__st_of(const qs_tensor *t, qc_dtype dt) {
  if (t->codec != QS_RAW) return dt == QC_DT_F16 ? QS_ST_F16 : dt == QC_DT_BF16 ? QS_ST_BF16 : QS_ST_F32;
  switch (t->src_dtype) {
  case QS_DT_I8: return QS_ST_I8;
  case QS_DT_U8: return QS_ST_U8;
  case QS_DT_I16: return QS_ST_I16;
  case QS_DT_U16: return QS_ST_U16;
  case QS_DT_I32: return QS_ST_I32;
  case QS_DT_U32: return QS_ST_U32;
  case QS_DT_I64: return QS_ST_I64;
  case QS_DT_U64: return QS_ST_U64;
  case QS_DT_BOOL: return QS_ST_BOOL;
  default: return QS_ST_F32;
  }
}

/* The string members of the metadata object text m, as a compact JSON object: safetensors'
 * __metadata__ maps strings to strings, so the structured members (the GGUF KV list, the HF JSON
 * files) stay out of it. *out is malloc'd. */
static int qs__st_metadata_of(const char *m, char **out) {
  qs_json *root = NULL;
  qp_buf b = {0};
  qp_puts(&b, "{");
  if (qs_json_parse(m, strlen(m), &root, NULL, 0) == 0 && root->type == QS_JSON_OBJECT) {
    int n = 0;
    for (size_t i = 0; i < root->len; i++) {
      const qs_json *v = &root->items[i];
      if (v->type != QS_JSON_STRING) continue;
      if (n++) qp_puts(&b, ",");
      qp_json_str(&b, v->key, v->key_len, QP_JSON_U);
      qp_puts(&b, ":");
      qp_json_str(&b, v->str, v->len, QP_JSON_U);
    }
  }
  qs_json_free(root);
  qp_puts(&b, "}");
  if (b.oom) {
    free(b.p);
    return qs__fail(QINS_ENOMEM, "out of memory");
  }
  *out = b.p;
  return 0;
}

/* Writes head (hl bytes) to tmp, then each tensor of l decoded as dts[i] (dt for all when dts is
 * NULL; raw tensors as stored), each followed by zeros up to a multiple of align; fsyncs, and
 * renames tmp to out_path. On failure tmp is removed and qs_error() names the file. */
static int qs__export_write(qs_txn *tx, const qs__elist *l, const qc_dtype *dts, qc_dtype dt,
                            uint64_t align, const void *head, size_t hl, const char *tmp,
                            const char *out_path, uint64_t total, qs_progress_cb progress,
                            void *progress_ud) {
  static const char zeros[64] = {0};
  uint8_t *buf = malloc(QS__EXPORT_BUF);
  if (!buf) return qs__fail(QINS_ENOMEM, "out of memory");
  int rc = 0;
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    rc = qs__fail(-errno, "%s: cannot create: %s", tmp, strerror(errno));
    goto out;
  }
  if (fwrite(head, 1, hl, f) != hl) goto werr;
  uint64_t done = 0;
  for (size_t i = 0; i < l->n; i++) {
    const qs_tensor *t = &l->t[i];
    qc_dtype d = dts ? dts[i] : dt;
    size_t esz = t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(d);
    uint64_t step = QS__EXPORT_BUF / esz;
    for (uint64_t a = 0; a < t->n_elem; a += step) {
      uint64_t b = t->n_elem - a < step ? t->n_elem : a + step;
      if ((rc = qs_tensor_read(tx, t, NULL, d, a, b, buf))) goto out;
      if (fwrite(buf, esz, b - a, f) != b - a) goto werr;
      done += (b - a) * esz;
      if (progress) progress(progress_ud, done, total, t->name);
    }
    for (uint64_t pad = (align - t->n_elem * esz % align) % align; pad;) {
      size_t k = pad < sizeof zeros ? (size_t)pad : sizeof zeros;
      if (fwrite(zeros, 1, k, f) != k) goto werr;
      pad -= k;
    }
  }
  if (fflush(f) || fsync(fileno(f))) goto werr;
  if (fclose(f)) {
    f = NULL;
    goto werr;
  }
  f = NULL;
  if (rename(tmp, out_path)) rc = qs__fail(-errno, "%s: cannot rename into place: %s", out_path, strerror(errno));
  goto out;
werr:
  rc = qs__fail(QINS_EIO, "%s: write error: %s", tmp, strerror(errno));
out:
  if (f) fclose(f);
  if (rc) unlink(tmp);
  free(buf);
  return rc;
}

/* Opens a read transaction for exporting model: its record in *m, its tensors in *l. On success
 * the caller ends the transaction (qs_txn_end) and frees l->t; on failure nothing is left open. */
static int qs__export_begin(qs_store *s, const char *model, qs_txn **tx, qs_model *m,
                            qs__elist *l) {
  int rc = qs_txn_begin(s, tx);
  if (rc) return rc;
  if (!(rc = qs_model_get(*tx, model, m)) &&
      !(rc = qs_tensors_each(*tx, model, NULL, qs__elist_cb, l)) && l->oom)
    rc = qs__fail(QINS_ENOMEM, "out of memory");
  if (rc) {
    qs_txn_end(*tx);
    free(l->t);
    l->t = NULL;
  }
  return rc;
}

int qs_export_safetensors(qs_store *s, const char *model, const char *out_path, qc_dtype dt,
                          qs_progress_cb progress, void *progress_ud) {
  if ((unsigned)dt >= QC_DT_COUNT) return qs__fail(QINS_EDTYPE, "bad export dtype");
  qs_txn *tx;
  qs_model m;
  qs__elist l = {0};
  int rc = qs__export_begin(s, model, &tx, &m, &l);
  if (rc) return rc;
  qs_st_entry *e = NULL;
  uint8_t *hdr = NULL;
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", out_path);
  e = calloc(l.n + 1, sizeof *e);
  if (!e) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  uint64_t total = 0;
  for (size_t i = 0; i < l.n; i++) {
    const qs_tensor *t = &l.t[i];
    e[i].name = t->name;
    e[i].dtype = qs__st_of(t, dt);
    e[i].ndim = t->ndim;
    e[i].shape = t->shape;
    size_t esz = t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(dt);
    e[i].nbytes = t->n_elem * esz;
    total += e[i].nbytes;
  }
  size_t hl;
  char *smeta = NULL;
  if ((rc = qs__st_metadata_of(m.metadata, &smeta))) goto out;
  rc = qs_st_header_build(e, l.n, smeta, &hdr, &hl);
  free(smeta);
  if (rc) {
    rc = qs__fail(rc, "%s: cannot build the header", out_path);
    goto out;
  }
  rc = qs__export_write(tx, &l, NULL, dt, 1, hdr, hl, tmp, out_path, total, progress, progress_ud);
out:
  qs_txn_end(tx);
  free(l.t);
  free(e);
  free(hdr);
  return rc;
}

/* ============================================================================================
 * GGUF export (docs/FORMAT.md §Export): GGUF v3, the model's typed KV list written back as it
 * was read (so an imported GGUF re-exports with the same metadata), tensors in name order with
 * row-major shapes reversed into ggml's ne[], each padded to general.alignment (default 32). */

static const char *const qs__gg_tnames[13] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                              "bool", "string", "array", "u64", "i64", "f64"};
static const unsigned char qs__gg_sz[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static int qs__gg_type(const char *name, int *is_array) {
  size_t n = strlen(name);
  *is_array = n > 2 && name[0] == '[' && name[n - 1] == ']';
  for (int i = 0; i < 13; i++) {
    size_t l = strlen(qs__gg_tnames[i]);
    if (i == 9) continue;
    if (*is_array ? (l == n - 2 && !memcmp(name + 1, qs__gg_tnames[i], l)) : !strcmp(name, qs__gg_tnames[i]))
      return i;
  }
  return -1;
}

static void qs__gg_u32(qp_buf *b, uint32_t v) {
  uint8_t x[4];
  qs__put_u32(x, v);
  qp_put(b, (const char *)x, 4);
}
static void qs__gg_u64(qp_buf *b, uint64_t v) {
  uint8_t x[8];
  qs__put_u64(x, v);
  qp_put(b, (const char *)x, 8);
}
static void qs__gg_str(qp_buf *b, const char *s, size_t n) {
  qs__gg_u64(b, n);
  qp_put(b, s, n);
}

/* One scalar of GGUF type ty from JSON value v into b; 0, or -1 if v does not fit the type. */
static int qs__gg_scalar(qp_buf *b, int ty, const qs_json *v) {
  uint8_t x[8] = {0};
  if (ty == 8) {
    if (v->type != QS_JSON_STRING) return -1;
    qs__gg_str(b, v->str, v->len);
    return 0;
  }
  if (ty == 7) {
    if (v->type != QS_JSON_BOOL) return -1;
    x[0] = (uint8_t)v->boolean;
  } else if (ty == 6 || ty == 12) {
    double d;
    if (v->type == QS_JSON_NUMBER) d = v->num;
    else if (v->type == QS_JSON_STRING && !strcmp(v->str, "nan")) d = NAN;
    else if (v->type == QS_JSON_STRING && !strcmp(v->str, "inf")) d = INFINITY;
    else if (v->type == QS_JSON_STRING && !strcmp(v->str, "-inf")) d = -INFINITY;
    else return -1;
    if (ty == 6) {
      float f = (float)d;
      uint32_t u;
      memcpy(&u, &f, 4);
      qs__put_u32(x, u);
    } else {
      qs__put_f64(x, d);
    }
  } else {
    if (v->type != QS_JSON_NUMBER) return -1;
    int sgn = ty == 1 || ty == 3 || ty == 5 || ty == 11;
    if (sgn ? !(v->num_flags & QS_JSON_IS_I64) : !(v->num_flags & QS_JSON_IS_U64)) return -1;
    unsigned bits = 8u * qs__gg_sz[ty];
    if (sgn && bits < 64 && (v->i64 < -(1ll << (bits - 1)) || v->i64 >= (1ll << (bits - 1)))) return -1;
    if (!sgn && bits < 64 && v->u64 >> bits) return -1;
    qs__put_u64(x, sgn ? (uint64_t)v->i64 : v->u64);
  }
  qp_put(b, (const char *)x, qs__gg_sz[ty]);
  return 0;
}

/* The KV section from the model's metadata into b; *n_kv counts them, *align gets
 * general.alignment. Without a "gguf" list, the string members become string KVs. */
static int qs__gg_kvs(const char *model, const char *md, int64_t file_type, qp_buf *b,
                      uint64_t *n_kv, uint64_t *align) {
  qs_json *root = NULL;
  int rc = 0;
  *n_kv = 0;
  *align = 32;
  if (qs_json_parse(md, strlen(md), &root, NULL, 0) || root->type != QS_JSON_OBJECT) {
    qs_json_free(root);
    return 0;
  }
  const qs_json *gg = qs_json_get(root, "gguf"), *kv = gg ? qs_json_get(gg, "kv") : NULL;
  if (!kv || kv->type != QS_JSON_ARRAY) {
    for (size_t i = 0; i < root->len; i++) {
      const qs_json *v = &root->items[i];
      if (v->type != QS_JSON_STRING || !strcmp(v->key, "source_format") || !v->key_len ||
          memchr(v->key, 0, v->key_len))
        continue;
      qs__gg_str(b, v->key, v->key_len);
      qs__gg_u32(b, 8);
      qs__gg_str(b, v->str, v->len);
      (*n_kv)++;
    }
    qs_json_free(root);
    return 0;
  }
  for (size_t i = 0; i < kv->len && !rc; i++) {
    const qs_json *e = &kv->items[i];
    const qs_json *k = qs_json_at(e, 0), *t = qs_json_at(e, 1), *v = qs_json_at(e, 2);
    int arr = 0, ty = t && t->type == QS_JSON_STRING ? qs__gg_type(t->str, &arr) : -1;
    if (e->type != QS_JSON_ARRAY || !k || k->type != QS_JSON_STRING || ty < 0 || !v) {
      rc = qs__fail(QINS_ECORRUPT, "model %s: metadata gguf.kv entry %zu is malformed", model, i);
      break;
    }
    if (v->type == QS_JSON_NULL && e->len > 3) {
      rc = qs__fail(QINS_EUNSUPPORTED,
                    "model %s: GGUF KV %s was too large to keep at import (%.0f elements): the "
                    "model cannot be exported as GGUF",
                    model, k->str, qs_json_at(e, 3)->num);
      break;
    }
    qs__gg_str(b, k->str, k->len);
    if (arr) {
      if (v->type != QS_JSON_ARRAY) rc = -1;
      qs__gg_u32(b, 9);
      qs__gg_u32(b, (uint32_t)ty);
      qs__gg_u64(b, v->len);
      for (size_t j = 0; !rc && j < v->len; j++) rc = qs__gg_scalar(b, ty, &v->items[j]);
    } else if (file_type >= 0 && ty == 4 && !strcmp(k->str, "general.file_type")) {
      qs__gg_u32(b, 4); /* the tensors' types changed (block types are written as floats) */
      qs__gg_u32(b, (uint32_t)file_type);
    } else {
      qs__gg_u32(b, (uint32_t)ty);
      rc = qs__gg_scalar(b, ty, v);
      if (!rc && !strcmp(k->str, "general.alignment") && ty == 4 && v->u64 &&
          !(v->u64 & (v->u64 - 1)))
        *align = v->u64;
    }
    if (rc < 0)
      rc = qs__fail(QINS_ECORRUPT, "model %s: metadata gguf.kv %s does not fit its type %s", model,
                    k->str, t->str);
    (*n_kv)++;
  }
  qs_json_free(root);
  return rc;
}

/* ggml type and output dtype of t; -1 (qs_error set) if GGUF cannot hold it. */
static int qs__gg_tensor_type(const qs_tensor *t, int dt, qc_dtype *out) {
  *out = QC_DT_F32;
  if (t->codec == QS_RAW) {
    switch (t->src_dtype) {
    case QS_DT_I8: return 24;
    case QS_DT_I16: return 25;
    case QS_DT_I32: return 26;
    case QS_DT_I64: return 27;
    default:
      return qs__fail(QINS_EUNSUPPORTED, "tensor %s: GGUF has no %s type", t->name,
                      qs_dtype_name(t->src_dtype));
    }
  }
  if (dt >= 0) *out = (qc_dtype)dt;
  else if (t->src_dtype == QS_DT_F16) *out = QC_DT_F16;
  else if (t->src_dtype == QS_DT_BF16) *out = QC_DT_BF16;
  return *out == QC_DT_F16 ? 1 : *out == QC_DT_BF16 ? 30 : 0;
}

int qs_export_gguf(qs_store *s, const char *model, const char *out_path, int dt,
                   qs_progress_cb progress, void *progress_ud) {
  if (dt >= (int)QC_DT_COUNT) return qs__fail(QINS_EDTYPE, "bad export dtype");
  qs_txn *tx;
  qs_model m;
  qs__elist l = {0};
  int rc = qs__export_begin(s, model, &tx, &m, &l);
  if (rc) return rc;
  qp_buf h = {0};
  int *types = NULL;
  qc_dtype *dts = NULL;
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", out_path);
  types = calloc(l.n + 1, sizeof *types);
  dts = calloc(l.n + 1, sizeof *dts);
  if (!types || !dts) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  uint64_t n_kv, align;
  qp_buf kvs = {0};
  /* A model from block-quantized tensors is written as floats: general.file_type (llama.cpp's
   * LLAMA_FTYPE) then says so, ALL_F32 0, MOSTLY_F16 1 or MOSTLY_BF16 32. */
  int64_t ftype = -1;
  for (size_t i = 0; i < l.n; i++) {
    unsigned bw, bb;
    if (qs__gguf_block(l.t[i].src_dtype, &bw, &bb)) ftype = dt == QC_DT_F16 ? 1 : dt == QC_DT_BF16 ? 32 : 0;
  }
  rc = qs__gg_kvs(model, m.metadata, ftype, &kvs, &n_kv, &align);
  qp_put(&h, "GGUF", 4);
  qs__gg_u32(&h, 3);
  qs__gg_u64(&h, l.n);
  qs__gg_u64(&h, n_kv);
  qp_put(&h, kvs.p ? kvs.p : "", kvs.n);
  free(kvs.p);
  if (rc) goto out;
  uint64_t off = 0, total = 0;
  for (size_t i = 0; i < l.n && !rc; i++) {
    const qs_tensor *t = &l.t[i];
    if ((types[i] = qs__gg_tensor_type(t, dt, &dts[i])) < 0) {
      rc = types[i];
      break;
    }
    if (t->ndim > 4) {
      rc = qs__fail(QINS_EUNSUPPORTED, "tensor %s: %d dimensions (GGUF holds at most 4)", t->name,
                    t->ndim);
      break;
    }
    qs__gg_str(&h, t->name, strlen(t->name));
    qs__gg_u32(&h, t->ndim ? (uint32_t)t->ndim : 1);
    if (!t->ndim) qs__gg_u64(&h, 1);
    for (int d = t->ndim - 1; d >= 0; d--) qs__gg_u64(&h, t->shape[d]);
    qs__gg_u32(&h, (uint32_t)types[i]);
    qs__gg_u64(&h, off);
    uint64_t nb = t->n_elem * (t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(dts[i]));
    off += (nb + align - 1) / align * align;
    total += nb;
  }
  if (rc) goto out;
  while (h.n % align) qp_put(&h, "", 1);
  if (h.oom) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  rc = qs__export_write(tx, &l, dts, QC_DT_F32, align, h.p, h.n, tmp, out_path, total, progress,
                        progress_ud);
out:
  qs_txn_end(tx);
  free(l.t);
  free(h.p);
  free(types);
  free(dts);
  return rc;
}
