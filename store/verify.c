/* SPDX-License-Identifier: MIT */
/*
 * verify.c — qs_verify: a full check of the store's records, independent of the read caches:
 * every chunk's checksum and codec data (a full decode), each tensor's checksum over its chunks,
 * model totals against their tensors, params refcounts against the references found.
 *
 * Invariants.
 *  - Verify reads through qs__chunk_fetch with full_check: nothing remembered as verified is
 *    trusted. Problems are reported one by one and the walk goes on.
 */
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

typedef struct qs__vctx {
  qs_store *s;
  MDB_txn *txn;
  qs_problem_cb cb;
  void *ud;
  uint64_t problems, checked;
  float *buf;        /* decode scratch */
  uint64_t buf_elems;
  /* params refs counted by the walk (NULL model only) */
  uint64_t *pid, *pcount;
  size_t np, capp;
  /* per-model sums of the tensor records, compared with the model record */
  uint64_t m_tensors, m_elem, m_src, m_stored;
} qs__vctx;

__attribute__((format(printf, 2, 3))) static void qs__vprob(qs__vctx *v, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  v->problems++;
  if (v->cb) v->cb(v->ud, msg);
}

static int qs__verify_tensor(qs__vctx *vc, const qs_tensor *t) {
  vc->checked++;
  vc->m_tensors++;
  vc->m_elem += t->n_elem;
  vc->m_src += t->src_bytes;
  vc->m_stored += t->stored_bytes;
  qs__trec tr;
  qs_tensor tt;
  int rc = qs__tensor_get_id(vc->s, vc->txn, t->model_id, t->model, t->name, &tt, &tr);
  if (rc) {
    qs__vprob(vc, "%s", qs__errbuf);
    return 0;
  }
  if (tr.params_id && !vc->pid) { /* fine */ }
  if (tr.params_id && vc->pid) {
    size_t i;
    for (i = 0; i < vc->np; i++)
      if (vc->pid[i] == tr.params_id) break;
    if (i == vc->np) {
      if (vc->np == vc->capp) {
        size_t nc = vc->capp ? vc->capp * 2 : 64;
        uint64_t *a = realloc(vc->pid, nc * 8), *b = realloc(vc->pcount, nc * 8);
        if (a) vc->pid = a;
        if (b) vc->pcount = b;
        if (!a || !b) return qs__fail(QINS_ENOMEM, "out of memory");
        vc->capp = nc;
      }
      vc->pid[vc->np] = tr.params_id;
      vc->pcount[vc->np++] = 0;
    }
    vc->pcount[i]++;
  }
  uint32_t tcrc = 0;
  uint64_t data = 0;
  for (uint64_t ci = 0; ci < t->n_chunks; ci++) {
    qs__chunk_ref ref = {.idx = UINT64_MAX};
    rc = qs__chunk_fetch(vc->s, vc->txn, NULL, t, ci, &ref, 1);
    if (rc) {
      qs__vprob(vc, "%s", qs__errbuf);
      return 0;
    }
    const uint8_t *hdr = ref.data - QS_CHUNK_HDR;
    tcrc = qs__crc32c(tcrc, hdr + 4, 4);
    uint64_t n = ref.n_rows * t->row_len;
    data += qs__get_u64(hdr + 8);
    if (t->codec == QS_RAW) continue;
    /* Decode in slices of at most buf_elems elements. */
    for (uint64_t a = 0; a < n; a += vc->buf_elems) {
      uint64_t b = a + vc->buf_elems < n ? a + vc->buf_elems : n;
      rc = qc_decode(&t->params, t->row_len, ref.n_rows, ref.data, a, b, QC_DT_F32, vc->buf);
      if (rc) {
        qs__vprob(vc, "tensor %s/%s: chunk %llu does not decode", t->model, t->name,
                  (unsigned long long)ci);
        return 0;
      }
    }
  }
  if (tcrc != tr.tensor_crc)
    qs__vprob(vc, "tensor %s/%s: tensor checksum mismatch (chunks swapped or replaced)", t->model,
              t->name);
  if (data != tr.data_bytes)
    qs__vprob(vc, "tensor %s/%s: chunk bytes %llu differ from the record's %llu", t->model,
              t->name, (unsigned long long)data, (unsigned long long)tr.data_bytes);
  return 0;
}

static int qs__verify_tensor_cb(void *ud, const qs_tensor *t) {
  return qs__verify_tensor(ud, t);
}

typedef struct qs__mlist {
  char (*names)[QS_MAX_NAME + 1];
  uint64_t *ids;
  size_t n, cap;
} qs__mlist;

static int qs__mlist_cb(void *ud, const qs_model *m) {
  qs__mlist *l = ud;
  if (l->n == l->cap) {
    size_t nc = l->cap ? l->cap * 2 : 16;
    void *a = realloc(l->names, nc * sizeof *l->names), *b = realloc(l->ids, nc * 8);
    if (a) l->names = a;
    if (b) l->ids = b;
    if (!a || !b) return 1;
    l->cap = nc;
  }
  snprintf(l->names[l->n], sizeof l->names[0], "%s", m->name);
  l->ids[l->n++] = m->id;
  return 0;
}

int qs_verify(qs_store *s, const char *model, qs_problem_cb cb, void *ud, uint64_t *n_problems,
              uint64_t *n_checked) {
  qs__vctx vc = {0};
  vc.s = s;
  vc.cb = cb;
  vc.ud = ud;
  vc.buf_elems = 1 << 18;
  vc.buf = malloc(vc.buf_elems * sizeof(float));
  if (!vc.buf) return qs__fail(QINS_ENOMEM, "out of memory");
  qs_txn *t;
  int rc = qs_txn_begin(s, &t);
  if (rc) {
    free(vc.buf);
    return rc;
  }
  vc.txn = t->txn;
  qs__mlist ml = {0};
  if (model) {
    qs_model m;
    if ((rc = qs__model_lookup(t, model, &m)) == 0) qs__mlist_cb(&ml, &m);
  } else {
    uint64_t dummy = 0;
    vc.pid = malloc(8);
    vc.pcount = malloc(8);
    vc.capp = 1;
    (void)dummy;
    rc = qs_models_each(t, qs__mlist_cb, &ml);
  }
  for (size_t i = 0; !rc && i < ml.n; i++) {
    vc.m_tensors = vc.m_elem = vc.m_src = vc.m_stored = 0;
    rc = qs__tensor_each_id(s, vc.txn, ml.ids[i], ml.names[i], NULL, qs__verify_tensor_cb, &vc);
    if (rc && rc != QINS_ENOMEM) {
      qs__vprob(&vc, "%s", qs__errbuf);
      rc = 0;
      continue;
    }
    /* The model record's totals must match its tensor records. */
    qs_model m;
    if (!rc && qs__model_lookup(t, ml.names[i], &m) == 0 &&
        (m.n_tensors != vc.m_tensors || m.n_elem != vc.m_elem || m.src_bytes != vc.m_src ||
         m.stored_bytes != vc.m_stored))
      qs__vprob(&vc, "model %s: record says %llu tensors / %llu elements / %llu source bytes / %llu "
                     "stored bytes, its tensors add up to %llu / %llu / %llu / %llu",
                ml.names[i], (unsigned long long)m.n_tensors, (unsigned long long)m.n_elem,
                (unsigned long long)m.src_bytes, (unsigned long long)m.stored_bytes,
                (unsigned long long)vc.m_tensors, (unsigned long long)vc.m_elem,
                (unsigned long long)vc.m_src, (unsigned long long)vc.m_stored);
  }
  if (!rc && !model) {
    /* Every params blob's refcount equals the references found (staging holds none after GC; if it
     * does, its references are counted too). */
    MDB_cursor *c;
    MDB_val k, v;
    /* Staged ids (an import in progress or killed, a removal not yet reclaimed) hold
     * references too: count their tensor records' params ids. */
    if (!mdb_cursor_open(vc.txn, s->db_staging, &c)) {
      int r2;
      for (r2 = mdb_cursor_get(c, &k, &v, MDB_FIRST); r2 == 0 && !rc;
           r2 = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 8) continue;
        uint8_t pre[8];
        memcpy(pre, k.mv_data, 8);
        MDB_cursor *tc;
        if (mdb_cursor_open(vc.txn, s->db_tensors, &tc)) continue;
        MDB_val tk = {8, pre}, tv;
        for (int r3 = mdb_cursor_get(tc, &tk, &tv, MDB_SET_RANGE); r3 == 0;
             r3 = mdb_cursor_get(tc, &tk, &tv, MDB_NEXT)) {
          if (tk.mv_size < 8 || memcmp(tk.mv_data, pre, 8)) break;
          if (tv.mv_size < QS_TENSOR_HDR) continue;
          uint64_t pid = qs__get_u64((const uint8_t *)tv.mv_data + 136);
          if (!pid) continue;
          size_t j;
          for (j = 0; j < vc.np; j++)
            if (vc.pid[j] == pid) break;
          if (j == vc.np) {
            if (vc.np == vc.capp) {
              size_t nc = vc.capp * 2;
              uint64_t *a = realloc(vc.pid, nc * 8), *b = realloc(vc.pcount, nc * 8);
              if (a) vc.pid = a;
              if (b) vc.pcount = b;
              if (!a || !b) { rc = qs__fail(QINS_ENOMEM, "out of memory"); break; }
              vc.capp = nc;
            }
            vc.pid[vc.np] = pid;
            vc.pcount[vc.np++] = 0;
          }
          vc.pcount[j]++;
        }
        mdb_cursor_close(tc);
      }
      mdb_cursor_close(c);
    }
    if (!rc && !mdb_cursor_open(vc.txn, s->db_params, &c)) {
      int r2;
      uint64_t seen = 0;
      for (r2 = mdb_cursor_get(c, &k, &v, MDB_FIRST); r2 == 0; r2 = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        uint64_t id = k.mv_size == 8 ? qs__get_be64(k.mv_data) : 0;
        uint64_t refs = v.mv_size >= QS_PARAMS_HDR ? qs__get_u64((const uint8_t *)v.mv_data + 8) : 0;
        uint64_t found = 0;
        for (size_t j = 0; j < vc.np; j++)
          if (vc.pid[j] == id) found = vc.pcount[j];
        if (found) seen++;
        if (found != refs)
          qs__vprob(&vc, "codec parameters %016llx: refcount %llu but %llu tensors use them",
                    (unsigned long long)id, (unsigned long long)refs, (unsigned long long)found);
      }
      mdb_cursor_close(c);
      if (seen != vc.np)
        qs__vprob(&vc, "%llu tensors' codec parameters are missing",
                  (unsigned long long)(vc.np - seen));
    }
  }
  qs_txn_end(t);
  free(ml.names);
  free(ml.ids);
  free(vc.buf);
  free(vc.pid);
  free(vc.pcount);
  if (n_problems) *n_problems = vc.problems;
  if (n_checked) *n_checked = vc.checked;
  return rc;
}
