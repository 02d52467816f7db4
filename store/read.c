/* SPDX-License-Identifier: MIT */
/*
 * read.c — the read API: models and tensors as listed (qs_models_each, qs_model_get,
 * qs_tensors_each, qs_tensor_get), slices (qs_slice_shape) and the element reads
 * (qs_tensor_read decodes, qs_tensor_span points into the map), all within one qs_txn.
 *
 * Invariants.
 *  - A reader consults "models" first (name -> id); everything else is keyed by the model id, so
 *    a model is seen whole or not at all.
 *  - Every chunk a read touches is fetched through qs__chunk_fetch (txn.c), and the bytes each
 *    read serves are checked by qs__chunk_check right before they are decoded or handed out.
 *  - Output ranges are checked against the slice's shape before any chunk is read.
 */
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

/* ---------------------------------------------------------------------------------------------
 * Read API */
int qs__model_lookup(qs_txn *t, const char *model, qs_model *m) {
  size_t nl = strlen(model);
  MDB_val k = {nl, (void *)model}, v;
  int rc = nl == 0 || nl > QS_MAX_NAME ? MDB_NOTFOUND : mdb_get(t->txn, t->s->db_models, &k, &v);
  if (rc == MDB_NOTFOUND) {
    char esc[96];
    qs__escape(model, esc, sizeof esc);
    return qs__fail(QINS_ENO_MODEL, "no model \"%s\"", esc);
  }
  if (rc) return qs__mdb_fail(t->s, rc, "reading models");
  return qs__model_decode(t->s, &k, &v, m);
}

int qs_model_get(qs_txn *t, const char *model, qs_model *out) {
  return qs__model_lookup(t, model, out);
}

int qs_models_each(qs_txn *t, qs_model_cb cb, void *ud) {
  MDB_cursor *c;
  int rc = mdb_cursor_open(t->txn, t->s->db_models, &c);
  if (rc) return qs__mdb_fail(t->s, rc, "listing models");
  MDB_val k, v;
  int r = 0;
  for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    qs_model m;
    if ((r = qs__model_decode(t->s, &k, &v, &m))) break;
    if (cb(ud, &m)) break;
  }
  mdb_cursor_close(c);
  if (r) return r;
  if (rc && rc != MDB_NOTFOUND) return qs__mdb_fail(t->s, rc, "listing models");
  return 0;
}

int qs__tensor_each_id(qs_store *s, MDB_txn *txn, uint64_t id, const char *model,
                       const char *prefix, qs_tensor_cb cb, void *ud) {
  size_t pl = prefix ? strlen(prefix) : 0;
  if (pl > QS_MAX_NAME) return 0;
  uint8_t key[8 + QS_MAX_NAME];
  qs__put_be64(key, id);
  if (pl) memcpy(key + 8, prefix, pl);
  MDB_cursor *c;
  int rc = mdb_cursor_open(txn, s->db_tensors, &c);
  if (rc) return qs__mdb_fail(s, rc, "listing tensors");
  MDB_val k = {8 + pl, key}, v;
  int r = 0;
  for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
       rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    if (k.mv_size < 8 + pl || memcmp(k.mv_data, key, 8 + pl)) break;
    qs_tensor t;
    qs__trec tr;
    if ((r = qs__tensor_decode(s, txn, model, &v, &t, &tr))) break;
    if (k.mv_size - 8 != strlen(t.name) || memcmp((const char *)k.mv_data + 8, t.name, k.mv_size - 8)) {
      r = qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor key and record name differ", s->dir,
                   model);
      break;
    }
    t.model_id = id;
    if (cb(ud, &t)) break;
  }
  mdb_cursor_close(c);
  if (r) return r;
  if (rc && rc != MDB_NOTFOUND) return qs__mdb_fail(s, rc, "listing tensors");
  return 0;
}

int qs_tensors_each(qs_txn *t, const char *model, const char *prefix, qs_tensor_cb cb, void *ud) {
  qs_model m;
  int rc = qs__model_lookup(t, model, &m);
  if (rc) return rc;
  return qs__tensor_each_id(t->s, t->txn, m.id, m.name, prefix, cb, ud);
}

int qs__tensor_get_id(qs_store *s, MDB_txn *txn, uint64_t id, const char *model,
                      const char *name, qs_tensor *out, qs__trec *tr) {
  size_t nl = strlen(name);
  uint8_t key[8 + QS_MAX_NAME];
  int rc = MDB_NOTFOUND;
  MDB_val k = {8 + nl, key}, v;
  if (nl && nl <= QS_MAX_NAME) {
    qs__put_be64(key, id);
    memcpy(key + 8, name, nl);
    rc = mdb_get(txn, s->db_tensors, &k, &v);
  }
  if (rc == MDB_NOTFOUND) {
    char esc[96];
    qs__escape(name, esc, sizeof esc);
    return qs__fail(QINS_ENO_TENSOR, "model %s has no tensor \"%s\"", model, esc);
  }
  if (rc) return qs__mdb_fail(s, rc, "reading a tensor");
  rc = qs__tensor_decode(s, txn, model, &v, out, tr);
  if (rc) return rc;
  out->model_id = id;
  return 0;
}

__attribute__((hot))
int qs_tensor_get(qs_txn *t, const char *model, const char *name, qs_tensor *out) {
  qs__tcache *tc = qs__tc(t);
  uint64_t h = 0;
  size_t slot = 0;
  if (tc) {
    h = qs__hash_key(name, strlen(name), qs__hash_key(model, strlen(model), 0)) | 1;
    slot = (size_t)(h % QS_TCACHE);
    if (tc->ten[slot].hash == h && !strcmp(tc->ten[slot].t.name, name) &&
        !strcmp(tc->ten[slot].t.model, model)) {
      *out = tc->ten[slot].t;
      return 0;
    }
  }
  qs_model m;
  int rc = qs__model_lookup(t, model, &m);
  if (rc) return rc;
  qs__trec tr;
  rc = qs__tensor_get_id(t->s, t->txn, m.id, m.name, name, out, &tr);
  if (rc == 0 && tc) {
    tc->ten[slot].hash = h;
    tc->ten[slot].t = *out;
  }
  return rc;
}

int qs_tensor_cost_get(qs_txn *t, const qs_tensor *ten, qs_tensor_cost *out) {
  qs__trec tr;
  qs_tensor tmp;
  int rc = qs__tensor_get_id(t->s, t->txn, ten->model_id, ten->model, ten->name, &tmp, &tr);
  if (rc) return rc;
  out->data_bytes = tr.data_bytes;
  out->params_bytes = tr.params_bytes;
  out->params_id = tr.params_id;
  out->params_first = !!(tr.flags & QS_TF_PARAMS_FIRST);
  out->checksum = tr.tensor_crc;
  return 0;
}

__attribute__((hot))
int qs_slice_shape(const qs_tensor *t, const qs_slice *sl, uint64_t shape[QS_MAX_NDIM],
                   uint64_t *n_elem) {
  int sd = sl ? sl->ndim : 0;
  if (sd < 0 || sd > t->ndim)
    return qs__fail(QINS_EBAD_SLICE, "tensor %s/%s: %d slice ranges for %d dimensions", t->model,
                    t->name, sd, t->ndim);
  uint64_t n = 1;
  for (int i = 0; i < t->ndim; i++) {
    uint64_t a = 0, b = t->shape[i];
    if (i < sd) {
      a = sl->start[i];
      b = sl->stop[i];
      if (a > b || b > t->shape[i])
        return qs__fail(QINS_EBAD_SLICE,
                        "tensor %s/%s: range [%llu, %llu) on dimension %d of size %llu is %s",
                        t->model, t->name, (unsigned long long)a, (unsigned long long)b, i,
                        (unsigned long long)t->shape[i], a > b ? "reversed" : "out of range");
    }
    shape[i] = b - a;
    n *= b - a; /* bounded by n_elem */
  }
  for (int i = t->ndim; i < QS_MAX_NDIM; i++) shape[i] = 0;
  *n_elem = n;
  return 0;
}

/* Decodes source elements [a, b) of t (linear, row-major) into out. */
__attribute__((hot))
static int qs__read_linear(qs_store *s, MDB_txn *txn, qs__tcache *tc, const qs_tensor *t,
                           qc_dtype dt, uint64_t a, uint64_t b, uint8_t *out, qs__chunk_ref *ref,
                           size_t esz) {
  uint64_t per_chunk = t->rows_per_chunk * t->row_len;
  while (a < b) {
    uint64_t ci = a / per_chunk, c0 = ci * per_chunk;
    int rc = qs__chunk_fetch(s, txn, tc, t, ci, ref, 0);
    if (rc) return rc;
    uint64_t cend = c0 + ref->n_rows * t->row_len;
    uint64_t e = b < cend ? b : cend;
    if ((rc = qs__chunk_check(s, t, ref, a - c0, e - c0))) return rc;
    if (t->codec == QS_RAW) {
      memcpy(out, ref->data + (a - c0) * esz, (e - a) * esz);
    } else {
      rc = qc_decode(&t->params, t->row_len, ref->n_rows, ref->data, a - c0, e - c0, dt, out);
      if (rc)
        return qs__fail(rc, "tensor %s/%s: chunk %llu: decode failed", t->model, t->name,
                        (unsigned long long)ci);
    }
    out += (e - a) * esz;
    a = e;
  }
  return 0;
}

/* The output shape of t[sl] into shp, checking that output elements [a, b) lie within it. */
__attribute__((hot))
static int qs__out_range(const qs_tensor *t, const qs_slice *sl, uint64_t a, uint64_t b,
                         uint64_t shp[QS_MAX_NDIM]) {
  uint64_t n;
  int rc = qs_slice_shape(t, sl, shp, &n);
  if (rc) return rc;
  if (a > b || b > n)
    return qs__fail(QINS_EBAD_SLICE, "tensor %s/%s: output range [%llu, %llu) outside %llu elements",
                    t->model, t->name, (unsigned long long)a, (unsigned long long)b,
                    (unsigned long long)n);
  return 0;
}

__attribute__((hot))
int qs_tensor_read(qs_txn *tx, const qs_tensor *t, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, void *out) {
  uint64_t shp[QS_MAX_NDIM];
  int rc = qs__out_range(t, sl, out_begin, out_end, shp);
  if (rc) return rc;
  if (t->codec != QS_RAW && (unsigned)dt >= QC_DT_COUNT)
    return qs__fail(QINS_EDTYPE, "tensor %s/%s: bad output dtype %d", t->model, t->name, (int)dt);
  size_t esz = t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(dt);
  qs__chunk_ref ref = {.idx = UINT64_MAX};
  qs__tcache *tc = qs__tc(tx);
  uint8_t *o = out;
  int sd = sl ? sl->ndim : 0;
  if (out_begin == out_end) return 0;
  if (sd == 0 || t->ndim == 0)
    return qs__read_linear(tx->s, tx->txn, tc, t, dt, out_begin, out_end, o, &ref, esz);
  /* Runs: the last sliced dim k gives contiguous runs of len (stop_k-start_k)*inner elements. */
  int k = sd - 1;
  uint64_t inner = 1;
  for (int i = k + 1; i < t->ndim; i++) inner *= t->shape[i];
  uint64_t run = shp[k] * inner;
  uint64_t stride[QS_MAX_NDIM];
  stride[t->ndim - 1] = 1;
  for (int i = t->ndim - 2; i >= 0; i--) stride[i] = stride[i + 1] * t->shape[i + 1];
  uint64_t pos = out_begin;
  while (pos < out_end) {
    uint64_t r = pos / run, off = pos % run;
    /* Decompose run index r over dims 0..k-1 of the slice shape. */
    uint64_t src = sl->start[k] * stride[k], rr = r;
    for (int i = k - 1; i >= 0; i--) {
      uint64_t idx = rr % shp[i];
      rr /= shp[i];
      src += (sl->start[i] + idx) * stride[i];
    }
    uint64_t take = run - off;
    if (take > out_end - pos) take = out_end - pos;
    rc = qs__read_linear(tx->s, tx->txn, tc, t, dt, src + off, src + off + take, o, &ref, esz);
    if (rc) return rc;
    o += take * esz;
    pos += take;
  }
  return 0;
}

int qs_tensor_span(qs_txn *tx, const qs_tensor *t, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, const void **p, uint64_t *n) {
  int sd = sl ? sl->ndim : 0;
  size_t esz;
  if (t->codec == QS_RAW) esz = qs_dtype_size(t->src_dtype);
  else if (t->codec <= QC_BF16 && t->codec == (int)dt) esz = qc_dtype_size(dt); /* same values */
  else return 0;
  if (sd > 1 || out_begin >= out_end) return 0;
  uint64_t shp[QS_MAX_NDIM];
  int rc = qs__out_range(t, sl, out_begin, out_end, shp);
  if (rc) return rc;
  uint64_t inner = t->ndim && t->shape[0] ? t->n_elem / t->shape[0] : 1;
  uint64_t src = (sd == 1 ? sl->start[0] * inner : 0) + out_begin;
  uint64_t per_chunk = t->rows_per_chunk * t->row_len, ci = src / per_chunk, c0 = ci * per_chunk;
  qs__chunk_ref ref = {.idx = UINT64_MAX};
  if ((rc = qs__chunk_fetch(tx->s, tx->txn, qs__tc(tx), t, ci, &ref, 0))) return rc;
  uint64_t cend = c0 + ref.n_rows * t->row_len, e = src + (out_end - out_begin);
  if (e > cend) e = cend;
  if ((rc = qs__chunk_check(tx->s, t, &ref, src - c0, e - c0))) return rc;
  *p = ref.data + (src - c0) * esz;
  *n = e - src;
  return 1;
}

int qs_tensor_chunk_record(qs_txn *tx, const qs_tensor *t, uint64_t ci, const void **rec,
                           size_t *size) {
  qs__chunk_ref ref = {.idx = UINT64_MAX};
  int rc = qs__chunk_fetch(tx->s, tx->txn, NULL, t, ci, &ref, 1);
  if (rc) return rc;
  *rec = ref.data - QS_CHUNK_HDR;
  *size = QS_CHUNK_HDR + qs__chunk_payload(t, ref.n_rows);
  return 0;
}
