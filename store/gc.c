/* SPDX-License-Identifier: MIT */
/*
 * gc.c — garbage collection of staged model ids: leftovers of killed imports, and removed or
 * replaced models. The "staging" DB lists them; qs__gc_id deletes one id's chunks and tensor
 * records (dropping their params references) in bounded transactions, then its staging entry.
 *
 * Invariants.
 *  - Only a writer (holding the writer flock) collects: whatever "staging" holds when a writer
 *    starts is a leftover, as no other import can run.
 *  - Each cleanup transaction deletes at most QS_GC_BATCH entries: dirty pages stay bounded.
 *  - A tensor record and its params reference are deleted in the same transaction, so params
 *    refcounts stay exact however often a cleanup is cut short and resumed.
 */
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store_int.h"

#define QS_GC_BATCH 1024 /* entries deleted per cleanup txn: bounded dirty pages */

/* ---------------------------------------------------------------------------------------------
 * Cleanup of staged ids (leftover imports, removed or replaced models) */
int qs__stage_put(qs_store *s, MDB_txn *txn, uint64_t id, int state, const char *name) {
  size_t nl = strlen(name);
  uint8_t key[8], val[QS_STAGING_HDR + QS_MAX_NAME + 1] = {0};
  qs__put_be64(key, id);
  memcpy(val, QS_MAGIC_STAGING, 4);
  val[4] = (uint8_t)state;
  qs__put_u32(val + 8, (uint32_t)getpid());
  qs__put_u16(val + 12, (uint16_t)nl);
  memcpy(val + QS_STAGING_HDR, name, nl);
  MDB_val k = {8, key}, v = {QS_STAGING_HDR + nl + 1, val};
  return mdb_put(txn, s->db_staging, &k, &v, 0);
}

/* Drops one reference to params blob id (deleting the blob at zero). */
static int qs__params_unref(qs_store *s, MDB_txn *txn, uint64_t pid) {
  uint8_t key[8];
  qs__put_be64(key, pid);
  MDB_val k = {8, key}, v;
  int rc = mdb_get(txn, s->db_params, &k, &v);
  if (rc == MDB_NOTFOUND) return 0; /* verify reports it; cleanup must go on */
  if (rc) return rc;
  if (v.mv_size < QS_PARAMS_HDR) return mdb_del(txn, s->db_params, &k, NULL);
  uint64_t refs = qs__get_u64((const uint8_t *)v.mv_data + 8);
  if (refs <= 1) return mdb_del(txn, s->db_params, &k, NULL);
  uint8_t *copy = malloc(v.mv_size);
  if (!copy) return ENOMEM;
  memcpy(copy, v.mv_data, v.mv_size);
  qs__put_u64(copy + 8, refs - 1);
  MDB_val nv = {v.mv_size, copy};
  rc = mdb_put(txn, s->db_params, &k, &nv, 0);
  free(copy);
  return rc;
}

/* Deletes everything under model id `id` in bounded txns, then its staging entry. */
int qs__gc_id(qs_store *s, uint64_t id) {
  uint8_t pre[8];
  qs__put_be64(pre, id);
  for (int phase = 0; phase < 2; phase++) {
    MDB_dbi dbi = phase == 0 ? s->db_chunks : s->db_tensors;
    for (;;) {
      MDB_txn *txn;
      int rc = qs__write_check(s);
      if (rc) return rc;
      rc = qs__ensure_map(s, 1 << 20); /* deletions copy branch pages too */
      if (rc) return rc;
      rc = qs__begin(s, 0, &txn);
      if (rc) return qs__mdb_fail(s, rc, "cleaning up");
      MDB_cursor *c;
      if ((rc = mdb_cursor_open(txn, dbi, &c))) {
        qs__abort(s, txn);
        return qs__mdb_fail(s, rc, "cleaning up");
      }
      int n = 0;
      for (; n < QS_GC_BATCH; n++) {
        MDB_val k = {8, pre}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc || k.mv_size < 8 || memcmp(k.mv_data, pre, 8)) {
          rc = rc == MDB_NOTFOUND ? 0 : rc;
          break;
        }
        if (phase == 1 && v.mv_size >= QS_TENSOR_HDR && !memcmp(v.mv_data, QS_MAGIC_TENSOR, 4)) {
          uint64_t pid = qs__get_u64((const uint8_t *)v.mv_data + 136);
          if (pid && (rc = qs__params_unref(s, txn, pid))) break;
        }
        if ((rc = mdb_cursor_del(c, 0))) break;
      }
      mdb_cursor_close(c);
      if (rc) {
        qs__abort(s, txn);
        return qs__mdb_fail(s, rc, "cleaning up");
      }
      if ((rc = qs__commit(s, txn))) return qs__mdb_fail(s, rc, "cleaning up");
      if (n < QS_GC_BATCH) break;
    }
  }
  MDB_txn *txn;
  int rc = qs__begin(s, 0, &txn);
  if (rc) return qs__mdb_fail(s, rc, "cleaning up");
  MDB_val k = {8, pre};
  rc = mdb_del(txn, s->db_staging, &k, NULL);
  if (rc && rc != MDB_NOTFOUND) {
    qs__abort(s, txn);
    return qs__mdb_fail(s, rc, "cleaning up");
  }
  rc = qs__commit(s, txn);
  return rc ? qs__mdb_fail(s, rc, "cleaning up") : 0;
}

/* Cleans every staging entry. Caller holds the writer lock. */
int qs__gc_all(qs_store *s) {
  for (;;) {
    MDB_txn *txn;
    int rc = qs__begin(s, MDB_RDONLY, &txn);
    if (rc) return qs__mdb_fail(s, rc, "reading staging");
    MDB_cursor *c;
    MDB_val k, v;
    uint64_t id = 0;
    if (!(rc = mdb_cursor_open(txn, s->db_staging, &c))) {
      rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
      if (!rc && k.mv_size == 8) id = qs__get_be64(k.mv_data);
      mdb_cursor_close(c);
    }
    qs__abort(s, txn);
    if (rc == MDB_NOTFOUND) return 0;
    if (rc) return qs__mdb_fail(s, rc, "reading staging");
    if (!id) return qs__fail(QINS_ECORRUPT, "store %s: bad staging key", s->dir);
    if ((rc = qs__gc_id(s, id))) return rc;
  }
}
