/* SPDX-License-Identifier: MIT */
/*
 * txn.c — transactions and the map: every LMDB transaction of the store begins and ends here
 * (qs__begin/qs__commit/qs__abort), the map grows here (qs__ensure_map), and the read
 * transactions of the read API (qs_txn_begin/qs_txn_end) keep their lookup caches here, with the
 * chunk fetch (qs__chunk_fetch) that reads through them.
 *
 * Invariants.
 *  - Active transactions of this process are counted (s->active); the map is resized (ours:
 *    growth before a write txn; theirs: MDB_MAP_RESIZED) only while none is open, as LMDB
 *    requires. A resize bumps s->map_gen.
 *  - One ended read txn per store is kept reset (mdb_txn_reset: no snapshot, no page pinned, its
 *    reader slot kept) and renewed by the next qs_txn_begin, on whichever thread (MDB_NOTLS):
 *    each qs_txn_begin is still a fresh snapshot, at a fraction of mdb_txn_begin's cost.
 *  - That txn remembers recent tensor and chunk lookups (qs__tcache) only while renewals find the
 *    same snapshot (mdb_txn_id unchanged) in the same mapping (map_gen unchanged): LMDB never
 *    writes a live page in place, so every page reachable from that snapshot is as it was.
 *  - Every read checks the stored bytes it serves (qs__chunk_check), however often they were
 *    checked before: the first read of a chunk in this process verifies it whole (CRC + codec
 *    data) and keeps its segment CRCs (s->sums); later reads check the segments they touch
 *    against those. So a byte changed in data.mdb after a check is an error, never a number.
 *    The lookup cache remembers where a chunk is, never that its bytes are good.
 */
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

/* ---------------------------------------------------------------------------------------------
 * Transactions and the map */
void qs__leave(qs_store *s) {
  pthread_mutex_lock(&s->mu);
  if (--s->active == 0) pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

/* Begins an LMDB txn, handling MDB_MAP_RESIZED (another process grew the map). */
int qs__begin(qs_store *s, unsigned flags, MDB_txn **out) {
  for (int tries = 0;; tries++) {
    pthread_mutex_lock(&s->mu);
    while (s->resizing) pthread_cond_wait(&s->cv, &s->mu);
    s->active++;
    pthread_mutex_unlock(&s->mu);
    int rc = mdb_txn_begin(s->env, NULL, flags, out);
    if (rc == 0) return 0;
    qs__leave(s);
    if (rc != MDB_MAP_RESIZED || tries >= 16) return rc;
    pthread_mutex_lock(&s->mu);
    if (!s->resizing) {
      s->resizing = 1;
      while (s->active > 0) pthread_cond_wait(&s->cv, &s->mu);
      mdb_env_set_mapsize(s->env, 0); /* adopt the size another process set */
      s->map_adopted++;
      s->map_gen++;
      s->resizing = 0;
      pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
  }
}

void qs__abort(qs_store *s, MDB_txn *txn) {
  if (!txn) return;
  mdb_txn_abort(txn);
  qs__leave(s);
}

int qs__commit(qs_store *s, MDB_txn *txn) {
  int rc = mdb_txn_commit(txn);
  qs__leave(s);
  return rc;
}

/* Grows the map so that `extra` more bytes of data fit with headroom. No txn may be open. */
int qs__ensure_map(qs_store *s, uint64_t extra) {
  MDB_envinfo ei;
  MDB_stat st;
  if (mdb_env_info(s->env, &ei) || mdb_env_stat(s->env, &st)) return 0;
  uint64_t used = ((uint64_t)ei.me_last_pgno + 1) * st.ms_psize;
  uint64_t need = used + 2 * extra + QS_MAP_SLACK;
  if (need <= ei.me_mapsize) return 0;
  uint64_t nsz = ei.me_mapsize * 2 > need ? ei.me_mapsize * 2 : need;
  nsz = (nsz + (64ull << 20) - 1) & ~((64ull << 20) - 1);
  if (s->max_map && nsz > s->max_map) nsz = s->max_map;
  if (nsz <= ei.me_mapsize) return 0; /* at the cap: MDB_MAP_FULL will tell */
  pthread_mutex_lock(&s->mu);
  while (s->resizing) pthread_cond_wait(&s->cv, &s->mu);
  s->resizing = 1;
  while (s->active > 0) pthread_cond_wait(&s->cv, &s->mu);
  int rc = mdb_env_set_mapsize(s->env, nsz);
  s->map_gen++;
  s->resizing = 0;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  return rc ? qs__mdb_fail(s, rc, "growing the map") : 0;
}

__attribute__((hot))
int qs_txn_begin(qs_store *s, qs_txn **out) {
  *out = NULL;
  /* The spare (a reset read txn, see qs_txn_end) is renewed: cheaper than begin (no allocation,
   * the reader slot is kept). Counted active like any txn, so a map resize still waits for it. */
  pthread_mutex_lock(&s->mu);
  qs_txn *t = s->spare;
  if (t) {
    s->spare = NULL;
    while (s->resizing) pthread_cond_wait(&s->cv, &s->mu);
    s->active++;
  }
  pthread_mutex_unlock(&s->mu);
  if (t) {
    if (mdb_txn_renew(t->txn) == 0) {
      *out = t;
      return 0;
    }
    mdb_txn_abort(t->txn); /* e.g. MDB_MAP_RESIZED: the path below adopts the new size */
    qs__leave(s);
    free(t->tc);
    free(t);
  }
  t = calloc(1, sizeof *t);
  if (!t) return qs__fail(QINS_ENOMEM, "out of memory");
  int rc = qs__begin(s, MDB_RDONLY, &t->txn);
  if (rc) {
    free(t);
    return qs__mdb_fail(s, rc, "beginning a read transaction");
  }
  t->s = s;
  *out = t;
  return 0;
}

__attribute__((hot))
void qs_txn_end(qs_txn *t) {
  if (!t) return;
  qs_store *s = t->s;
  /* Reset (the snapshot is released now, like an abort) and kept as the spare if there is none;
   * a reset txn holds no page of the map, so a resize may happen while it waits. */
  mdb_txn_reset(t->txn);
  pthread_mutex_lock(&s->mu);
  if (--s->active == 0) pthread_cond_broadcast(&s->cv);
  int keep = !s->spare;
  if (!keep && t->tc && !s->spare->tc) { /* keep the one that remembers lookups */
    qs_txn *o = s->spare;
    s->spare = t;
    t = o;
  } else if (keep) {
    s->spare = t;
  }
  pthread_mutex_unlock(&s->mu);
  if (!keep) {
    mdb_txn_abort(t->txn);
    free(t->tc);
    free(t);
  }
}

/* t's lookup cache for its current snapshot and mapping (emptied if either changed), or NULL
 * (no memory, or $QINS_VERIFY=always: every read then checks its chunks again). Holding t, no
 * resize can run (it waits for active == 0), so map_gen is stable here. */
__attribute__((hot))
qs__tcache *qs__tc(qs_txn *t) {
  if (t->s->verify == QS_VERIFY_ALWAYS) return NULL;
  uint64_t id = mdb_txn_id(t->txn), gen = t->s->map_gen;
  qs__tcache *tc = t->tc;
  if (!tc) {
    if (!(tc = t->tc = calloc(1, sizeof *tc))) return NULL;
  } else if (tc->txnid == id && tc->map_gen == gen) {
    return tc;
  } else {
    for (int i = 0; i < QS_TCACHE; i++) tc->ten[i].hash = 0;
    memset(tc->chunk, 0, sizeof tc->chunk);
  }
  tc->txnid = id;
  tc->map_gen = gen;
  return tc;
}

/* The sums slot of a chunk key (hash h). */
static size_t qs__sums_slot(uint64_t h) { return (size_t)((h >> 17) % QS_SUMS); }

/* Verifies chunk ci (record at p, header checked) whole and keeps its segment CRCs. */
static int qs__chunk_learn(qs_store *s, const qs_tensor *t, uint64_t ci, const uint8_t *p,
                           uint64_t rows, const uint8_t key[16], uint64_t h) {
  qs__sums *n = malloc(qs__sums_bytes(qs__get_u64(p + 8)));
  if (!n) return qs__chunk_verify(t, ci, p, rows, NULL);
  int rc = qs__chunk_verify(t, ci, p, rows, n);
  if (rc) {
    free(n);
    return rc;
  }
  memcpy(n->key, key, 16);
  size_t slot = qs__sums_slot(h);
  pthread_mutex_lock(&s->vmu);
  qs__sums *old = s->sums ? s->sums[slot] : NULL;
  if (s->sums) s->sums[slot] = n;
  pthread_mutex_unlock(&s->vmu);
  free(s->sums ? old : n);
  return 0;
}

/* Whether this process holds sums for key. */
static int qs__chunk_known(qs_store *s, const uint8_t key[16], uint64_t h) {
  if (!s->sums) return 0;
  size_t slot = qs__sums_slot(h);
  pthread_mutex_lock(&s->vmu);
  int known = s->sums[slot] && !memcmp(s->sums[slot]->key, key, 16);
  pthread_mutex_unlock(&s->vmu);
  return known;
}

__attribute__((hot))
int qs__chunk_fetch(qs_store *s, MDB_txn *txn, qs__tcache *tc, const qs_tensor *t,
                    uint64_t ci, qs__chunk_ref *ref, int full_check) {
  if (ref->idx == ci) return 0;
  uint8_t key[16];
  qs__put_be64(key, t->model_id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)ci);
  uint64_t h = qs__hash_key(key, 16, 0);
  size_t cslot = (size_t)(h % QS_CCACHE);
  if (tc && !full_check && !memcmp(tc->chunk[cslot].key, key, 16)) {
    /* Same snapshot, same mapping: the record is where it was. Its header is as it was checked
     * (and, under QS_VERIFY_RISKY, its payload verified) when it was cached; its payload bytes
     * are checked by qs__chunk_check before any is served. A header that changed since takes
     * the full path below, which reports it. */
    const uint8_t *d = tc->chunk[cslot].data;
    if (!memcmp(d - QS_CHUNK_HDR, QS_MAGIC_CHUNK, 4) &&
        qs__get_u64(d - QS_CHUNK_HDR + 8) == tc->chunk[cslot].pay) {
      ref->idx = ci;
      ref->data = d;
      ref->n_rows = tc->chunk[cslot].n_rows;
      memcpy(ref->key, key, 16);
      ref->h = h;
      return 0;
    }
  }
  MDB_val k = {16, key}, v;
  int rc = mdb_get(txn, s->db_chunks, &k, &v);
  if (rc == MDB_NOTFOUND)
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu is missing", t->model, t->name,
                    (unsigned long long)ci);
  if (rc) return qs__mdb_fail(s, rc, "reading a chunk");
  const uint8_t *p = v.mv_data;
  uint64_t rows;
  if ((rc = qs__chunk_rec_check(t, ci, p, v.mv_size, 0, &rows))) return rc;
  if (full_check || s->verify == QS_VERIFY_ALWAYS) {
    if ((rc = qs__chunk_verify(t, ci, p, rows, NULL))) return rc;
  } else if (s->verify == QS_VERIFY_RISKY && !qs__chunk_known(s, key, h)) {
    if ((rc = qs__chunk_learn(s, t, ci, p, rows, key, h))) return rc;
  }
  ref->idx = ci;
  ref->data = p + QS_CHUNK_HDR;
  ref->n_rows = rows;
  memcpy(ref->key, key, 16);
  ref->h = h;
  if (tc) {
    memcpy(tc->chunk[cslot].key, key, 16);
    tc->chunk[cslot].data = ref->data;
    tc->chunk[cslot].n_rows = rows;
    tc->chunk[cslot].pay = v.mv_size - QS_CHUNK_HDR;
  }
  return 0;
}

/* The payload byte ranges output elements [a, e) (a < e) of a chunk of `rows` rows of t decode
 * from (docs/FORMAT.md §1.1: the arrays of each codec); returns how many (1 or 2). */
__attribute__((hot))
static int qs__chunk_ranges(const qs_tensor *t, uint64_t rows, uint64_t a, uint64_t e,
                            uint64_t lo[2], uint64_t hi[2]) {
  uint64_t n = rows * t->row_len, rl = t->row_len;
  switch (t->codec) {
  case QC_QINS8:
  case QC_QINS16: {
    uint64_t B = t->codec == QC_QINS8 ? QC_QINS8_BLOCK : QC_QINS16_BLOCK;
    uint64_t bpr = (rl + B - 1) / B, nb = rows * bpr, sb = t->codec == QC_QINS8 ? 2 : 1;
    uint64_t b0 = (a / rl) * bpr + (a % rl) / B, b1 = ((e - 1) / rl) * bpr + ((e - 1) % rl) / B;
    lo[0] = sb * b0;
    hi[0] = sb * (b1 + 1);
    lo[1] = sb * nb + (3 - sb) * a; /* codes: u8 (qins8) or u16 (qins16) */
    hi[1] = sb * nb + (3 - sb) * e;
    return 2;
  }
  case QC_SEED_LOG:
    lo[0] = a, hi[0] = e, lo[1] = n + a, hi[1] = n + e;
    return 2;
  default: {
    uint64_t esz = qs__chunk_payload(t, rows) / (n ? n : 1); /* f32, f16, bf16, seed-rational, raw */
    lo[0] = esz * a;
    hi[0] = esz * e;
    return 1;
  }
  }
}

__attribute__((hot))
int qs__chunk_check(qs_store *s, const qs_tensor *t, const qs__chunk_ref *ref, uint64_t a,
                    uint64_t e) {
  if (s->verify != QS_VERIFY_READ || a >= e) return 0;
  uint64_t pay = qs__get_u64(ref->data - QS_CHUNK_HDR + 8);
  if (!pay) return 0;
  uint64_t lo[2] = {0, 0}, hi[2] = {pay, pay};
  /* A qinsx range's bytes depend on its header, index and escapes: the whole payload is checked. */
  int nr = qc_codec_varsize((qc_codec)t->codec) ? 1 : qs__chunk_ranges(t, ref->n_rows, a, e, lo, hi);
  /* Per range: its whole segments s0 .. s1 - 1 in one CRC pass (got), and the last segment of
   * the payload apart when the range ends in it and it is short (part; its CRC is compared as
   * it is, since joining needs a table for the segment length). */
  uint64_t s0[2], s1[2];
  uint32_t got[2] = {0, 0}, part[2] = {0, 0};
  int has_part[2] = {0, 0};
  for (int r = 0; r < nr; r++) {
    if (hi[r] > pay) hi[r] = pay; /* within the payload whatever the ranges say */
    if (lo[r] >= hi[r]) lo[r] = hi[r] - 1;
    s0[r] = lo[r] / QS_SEG;
    s1[r] = (hi[r] - 1) / QS_SEG + 1;
    if (s1[r] * QS_SEG > pay) { /* the short last segment */
      s1[r]--;
      has_part[r] = 1;
      part[r] = qs__crc32c(0, ref->data + s1[r] * QS_SEG, pay - s1[r] * QS_SEG);
    }
    if (s1[r] > s0[r])
      got[r] = qs__crc32c(0, ref->data + s0[r] * QS_SEG, (s1[r] - s0[r]) * QS_SEG);
  }
  uint64_t h = ref->h;
  size_t slot = qs__sums_slot(h);
  int known = 0, bad = 0;
  pthread_mutex_lock(&s->vmu);
  const qs__sums *sm = s->sums ? s->sums[slot] : NULL;
  if (sm && !memcmp(sm->key, ref->key, 16)) {
    known = 1;
    for (int r = 0; r < nr && !bad; r++) {
      if (s1[r] > s0[r]) {
        uint32_t want = sm->crc[s0[r]];
        for (uint64_t i = s0[r] + 1; i < s1[r]; i++) want = qs__crc32c_combine(want, sm->crc[i], QS_SEG);
        bad = want != got[r];
      }
      if (has_part[r]) bad |= part[r] != sm->crc[s1[r]];
    }
  }
  pthread_mutex_unlock(&s->vmu);
  if (!known) /* first read here (or the slot went to another chunk): verify it whole, now */
    return qs__chunk_learn(s, t, ref->idx, ref->data - QS_CHUNK_HDR, ref->n_rows, ref->key, h);
  if (bad)
    return qs__fail(QINS_ECHECKSUM, "tensor %s/%s: chunk %llu fails its checksum (its bytes "
                                    "changed after they were verified)",
                    t->model, t->name, (unsigned long long)ref->idx);
  return 0;
}
