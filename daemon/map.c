/* SPDX-License-Identifier: MIT */
/*
 * map.c — the arena delivery path: attach, map, map_many and release (docs/PROTOCOL.md
 * §4.10-4.13) over the decoded-weights arena (arena.h; sizing docs/qinsd.md "The arena").
 *
 * A map job, on the loop thread: one read txn plans every tensor (record, output shape, dtype,
 * bytes: the key of its arena entry), then each entry is leased (qd_arena_acquire):
 *   HIT     nothing more to do;
 *   WAIT    another request is decoding it: an async waiter, run when that decode ends;
 *   DECODE  this job decodes it: on the loop when small (inline-decode-bytes), else on the pool,
 *           split in up to `threads` pieces (one per CPU) for large entries. Each piece has its
 *           own read txn, begun on the loop right after the plan's and checked to see the same
 *           model version (a piece whose snapshot differs is not used), used and ended on its
 *           pool thread (the env is MDB_NOTLS). Pages of the entry are created by the piece first
 *           (qd_arena_prefault), so a host out of memory gives an error, not a SIGBUS.
 * The answer goes once nothing is pending: all the leases, or (all or nothing) an error with every
 * lease of the job released.
 *
 * The warm reserve (arena-warm-bytes): from the first attach on, pages are created ahead of use
 * on the pool, one WARM_CHUNK at a time (qd_arena_warm_next picks them, qd_arena_prefault makes
 * them), until that many bytes of created pages lie in free space, so a first map decodes into
 * pages that exist. One chunk is in flight at most; none starts while map decode pieces are in
 * flight (their end, and every attach and map, resume it), so it takes one pool thread for a few
 * milliseconds at a time and never holds up a decode for long. A failure (the host out of memory)
 * stops it for good, logged once; maps still create their own pages as they decode. A small request never waits behind a decode: the loop only plans,
 * leases and answers. Leases end with the connection: qd_conn_free calls qd_map_conn_freed (the
 * arena keeps each connection's leases in a list of its own).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "arena.h"
#include "map.h"
#include "qinsd.h"

#define SPLIT_BYTES (4u << 20) /* entries from this size are decoded by several pool threads */
#define MAX_PIECES 8           /* at most this many pieces per job */

#define WARM_CHUNK (8u << 20) /* pages the warm reserve creates per pool item (~5 ms of a core) */

static qd_arena *arena;  /* opened on first use; NULL: none (off, or it failed) */
static int arena_tried;  /* the open was attempted (it is not retried) */
static int pieces_out;   /* map decode pieces on the pool (the warm reserve waits for none) */

static struct {
  uv_work_t work;        /* the chunk in flight */
  int attached;          /* a client attached: the reserve is kept from now on */
  int queued;            /* a chunk is on the pool */
  int stopped;           /* creating failed (logged): no more */
  uint64_t off, len;     /* the chunk */
  int rc;                /* its qd_arena_prefault result */
  uint64_t created;      /* bytes created ahead of use so far */
} warm;

static uint64_t warm_reserve(void) {
  uint64_t r = qd_srv.cfg.arena_warm_bytes;
  return arena && r > qd_arena_size(arena) ? qd_arena_size(arena) : r;
}

static void warm_kick(void);

static void warm_work_cb(uv_work_t *w) {
  (void)w;
  warm.rc = qd_arena_prefault(arena, warm.off, warm.len);
}

static void warm_after_cb(uv_work_t *w, int status) {
  (void)w;
  warm.queued = 0;
  if (status == UV_ECANCELED) return;
  if (warm.rc) {
    warm.stopped = 1;
    qd_log(QD_LOG_WARNING, "arena: stopped creating pages ahead of use after %llu bytes: %s "
           "(host memory); maps create their own pages as they decode",
           (unsigned long long)warm.created, strerror(-warm.rc));
    return;
  }
  warm.created += warm.len;
  warm_kick();
}

/* Queues the next chunk of the warm reserve if one is due and nothing holds it back (loop
 * thread). */
static void warm_kick(void) {
  if (!arena || !warm.attached || warm.queued || warm.stopped || pieces_out || qd_srv.stopping)
    return;
  if (!qd_arena_warm_next(arena, warm_reserve(), WARM_CHUNK, &warm.off, &warm.len, NULL)) return;
  warm.rc = 0;
  if (uv_queue_work(qd_srv.loop, &warm.work, warm_work_cb, warm_after_cb) == 0) warm.queued = 1;
}

static qd_arena *arena_get(void) {
  if (!arena_tried && qd_srv.cfg.arena_bytes) {
    arena_tried = 1;
    int rc = qd_arena_open(&arena, qd_srv.cfg.arena_bytes, (uint32_t)qd_srv.cfg.arena_max_leases);
    if (rc)
      qd_log(QD_LOG_WARNING, "arena of %llu bytes: cannot create it: %s; attach and map answer "
             "UNSUPPORTED", (unsigned long long)qd_srv.cfg.arena_bytes, qins_strerror(rc));
    else
      qd_log(QD_LOG_NOTICE, "arena: %llu bytes (pages created on first use; once a client "
             "attaches, %llu bytes of them ahead of use)", (unsigned long long)qd_arena_size(arena),
             (unsigned long long)warm_reserve());
  }
  return arena;
}

static int no_arena(qd_req *r) {
  snprintf(r->msg, sizeof r->msg, "this qinsd has no arena (arena-bytes 0, or it could not be "
           "created: see its log): use get");
  return QINS_EUNSUPPORTED;
}

qd_arena *qd_map_arena(void) { return arena; }

uint64_t qd_map_arena_bytes(void) { return arena_get() ? qd_arena_size(arena) : 0; }

int qd_map_conn_leased(uint64_t conn) { return arena && qd_arena_conn_leased(arena, conn); }

void qd_map_conn_freed(uint64_t conn) {
  if (arena) qd_arena_release_conn(arena, conn);
}

/* ---- jobs ------------------------------------------------------------------------------------ */
typedef struct mitem {
  qs_tensor t;            /* the record (copied out of the plan's txn) */
  qd_arena_key key;       /* its entry */
  qd_arena_meta meta;     /* output shape and dtype */
  uint64_t n_elem, esize; /* output elements, bytes each */
  qd_arena_grant g;       /* the lease */
  int leased;             /* g holds a lease */
  int outcome;            /* QD_ARENA_HIT, _DECODE, _WAIT */
  int pool;               /* decoded on the pool */
  int pieces_left;        /* pool pieces of it not yet done */
  int rc;                 /* its decode's (or wait's) result */
  qd_arena_waiter w;      /* for WAIT */
} mitem;

typedef struct mjob mjob;
typedef struct piece {
  uv_work_t work;         /* first: the work callbacks cast it back */
  mjob *j;
  qs_txn *txn;            /* begun on the loop, ended by work_cb */
  int k, n;               /* this is piece k of n of every pool item */
  int rc;                 /* first failure */
  char msg[512];          /* its message (built on the pool thread: qs_error is per thread) */
  uint64_t decode_ns;
} piece;

struct mjob {
  qd_ask ask;             /* what was asked (names freed with the job) */
  mitem *items;
  size_t n, cap;
  int pending;            /* pool pieces and waits outstanding */
  int err;                /* first error (message in req.msg) */
  int deferred;           /* the request was deferred */
  int created;            /* entries this job created (QD_ARENA_DECODE) */
  piece *pieces[MAX_PIECES];
  int n_pieces;
  qd_req req;             /* copy of the request */
};

static void job_free(mjob *j) {
  free(j->ask.names);
  free(j->items);
  free(j);
}

static int job_fail(mjob *j, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int job_fail(mjob *j, int code, const char *fmt, ...) {
  if (j->err) return j->err; /* the first error is the one reported */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(j->req.msg, sizeof j->req.msg, fmt, ap);
  va_end(ap);
  return j->err = code;
}

static int store_fail(mjob *j, int rc, const char *name) {
  if (j->err) return j->err;
  return j->err = qd_store_err(j->req.msg, sizeof j->req.msg, rc, j->ask.model, name);
}

static mitem *job_slot(mjob *j) {
  if (j->n == j->cap) {
    size_t nc = j->cap ? j->cap * 2 : 4;
    mitem *ni = realloc(j->items, nc * sizeof *ni);
    if (!ni) {
      job_fail(j, QINS_ENOMEM, "out of memory planning a map of %s", j->ask.model);
      return NULL;
    }
    j->items = ni;
    j->cap = nc;
  }
  mitem *it = &j->items[j->n];
  memset(it, 0, sizeof *it);
  return it;
}

/* Adds tensor t: output shape, dtype, bytes and the entry's key. */
static int job_add(mjob *j, const qs_tensor *t) {
  mitem *it = job_slot(j);
  if (!it) return j->err;
  it->t = *t;
  const qs_slice *sl = j->ask.has_slice ? &j->ask.slice : NULL;
  int rc = qs_slice_shape(t, sl, it->meta.shape, &it->n_elem);
  if (rc) return job_fail(j, rc < -999 ? rc : QINS_EBAD_SLICE, "%s", qs_error());
  it->meta.ndim = t->ndim;
  int kdt;
  if (t->codec == QS_RAW) {
    if (j->ask.dt_given)
      return job_fail(j, QINS_EDTYPE, "%s/%s is a raw %s tensor: it is served only as stored "
                      "(omit dtype)", j->ask.model, t->name, qs_dtype_name(t->src_dtype));
    it->esize = qs_dtype_size(t->src_dtype);
    snprintf(it->meta.dtype, sizeof it->meta.dtype, "%s", qs_dtype_name(t->src_dtype));
    kdt = -1;
  } else {
    it->esize = qc_dtype_size((qc_dtype)j->ask.dt);
    snprintf(it->meta.dtype, sizeof it->meta.dtype, "%s", qc_dtype_name((qc_dtype)j->ask.dt));
    kdt = j->ask.dt;
  }
  if (!it->esize) it->esize = 1;
  if (it->n_elem > UINT64_MAX / it->esize)
    return job_fail(j, QINS_EBAD_SLICE, "%s/%s: size overflows", j->ask.model, t->name);
  qd_arena_key_make(&it->key, t, sl, kdt);
  j->n++;
  return 0;
}

static int prefix_cb(void *ud, const qs_tensor *t) { return job_add(ud, t) ? 1 : 0; }

static int job_plan(mjob *j, qs_txn *t) {
  const qd_ask *a = &j->ask;
  int rc;
  if (!a->many) {
    qs_tensor ten;
    if ((rc = qs_tensor_get(t, a->model, a->name, &ten))) return store_fail(j, rc, a->name);
    return job_add(j, &ten);
  }
  if (a->by_prefix) {
    qs_model m;
    if ((rc = qs_model_get(t, a->model, &m))) return store_fail(j, rc, NULL);
    rc = qs_tensors_each(t, a->model, a->prefix, prefix_cb, j);
    if (j->err) return j->err;
    return rc ? store_fail(j, rc, a->prefix) : 0;
  }
  for (uint32_t i = 0; i < a->n_names; i++) {
    qs_tensor ten;
    if ((rc = qs_tensor_get(t, a->model, a->names[i], &ten))) return store_fail(j, rc, a->names[i]);
    if ((rc = job_add(j, &ten))) return rc;
  }
  return 0;
}

/* Decodes output elements [b, e) of item it in txn t into its entry, creating the pages first. */
static int decode_range(mitem *it, qs_txn *t, const qs_slice *sl, int dt, uint64_t b, uint64_t e,
                        char *msg, size_t cap, const char *model) {
  if (b >= e) return 0;
  uint64_t off = it->g.off + b * it->esize, len = (e - b) * it->esize;
  int rc = qd_arena_prefault(arena, off, len);
  if (rc && rc != -EINVAL) { /* -EINVAL: no MADV_POPULATE_WRITE here; the decode faults them */
    snprintf(msg, cap, "%s/%s: cannot create %llu bytes of arena pages: %s (host memory)", model,
             it->t.name, (unsigned long long)len, strerror(-rc));
    return QINS_ENOMEM;
  }
  rc = qs_tensor_read(t, &it->t, sl, (qc_dtype)(dt < 0 ? 0 : dt), b, e, qd_arena_ptr(arena, off));
  if (rc) rc = qd_store_err(msg, cap, rc, model, it->t.name);
  return rc;
}

/* Piece k of n of an item: its element range. */
static void piece_range(const mitem *it, int k, int n, uint64_t *b, uint64_t *e) {
  *b = it->n_elem * (uint64_t)k / (uint64_t)n;
  *e = it->n_elem * (uint64_t)(k + 1) / (uint64_t)n;
}

static void job_finish(mjob *j);

static void work_cb(uv_work_t *w) {
  piece *p = (piece *)w;
  mjob *j = p->j;
  uint64_t t0 = qd_now_ns();
  const qs_slice *sl = j->ask.has_slice ? &j->ask.slice : NULL;
  for (size_t i = 0; i < j->n && !p->rc; i++) {
    mitem *it = &j->items[i];
    if (!it->pool) continue;
    uint64_t b, e;
    piece_range(it, p->k, p->n, &b, &e);
    p->rc = decode_range(it, p->txn, sl, j->ask.dt, b, e, p->msg, sizeof p->msg, j->ask.model);
  }
  qs_txn_end(p->txn);
  p->txn = NULL;
  p->decode_ns = qd_now_ns() - t0;
}

static void after_work_cb(uv_work_t *w, int status) {
  piece *p = (piece *)w;
  mjob *j = p->j;
  if (status == UV_ECANCELED && !p->rc) {
    p->rc = QINS_ESHUTDOWN;
    snprintf(p->msg, sizeof p->msg, "the daemon is shutting down");
  }
  atomic_fetch_add(&qd_srv.st.decode_ns, p->decode_ns);
  if (p->rc) job_fail(j, p->rc, "%s", p->msg);
  for (size_t i = 0; i < j->n; i++) {
    mitem *it = &j->items[i];
    if (!it->pool) continue;
    if (p->rc && !it->rc) it->rc = p->rc;
    if (--it->pieces_left == 0) qd_arena_decoded(arena, it->g.entry, it->rc); /* runs waiters */
  }
  free(p);
  pieces_out--;
  if (--j->pending == 0) job_finish(j);
  warm_kick(); /* the reserve this job used is made up once no decode is left */
}

/* Waiter callbacks get the job through this wrapper (the waiter's ud). */
typedef struct wctx {
  mjob *j;
  mitem *it;
} wctx;

static void wait_done(void *ud, int rc) {
  wctx *x = ud;
  mjob *j = x->j;
  if (rc) {
    x->it->rc = rc;
    job_fail(j, rc, "%s/%s: its decode (by another request) failed: %s", j->ask.model,
             x->it->t.name, qins_strerror(rc));
  }
  free(x);
  if (--j->pending == 0) job_finish(j);
}

/* [1, msgid, nil, then the result is packed into pk. */
static void answer_begin(msgpack_sbuffer *sb, msgpack_packer *pk, uint32_t msgid) {
  msgpack_sbuffer_init(sb);
  msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
  qp_pack_response_ok(pk, msgid);
}

/* Packs one map answer. */
static void pack_item(msgpack_packer *pk, const mitem *it, int with_name) {
  msgpack_pack_map(pk, 5 + (with_name != 0));
  if (with_name) {
    qp_pack_cstr(pk, "name");
    qp_pack_cstr(pk, it->t.name);
  }
  qp_pack_cstr(pk, "lease");
  msgpack_pack_uint64(pk, it->g.lease);
  qp_pack_cstr(pk, "shape");
  msgpack_pack_array(pk, (size_t)it->meta.ndim);
  for (int d = 0; d < it->meta.ndim; d++) msgpack_pack_uint64(pk, it->meta.shape[d]);
  qp_pack_cstr(pk, "dtype");
  qp_pack_cstr(pk, it->meta.dtype);
  qp_pack_cstr(pk, "offset");
  msgpack_pack_uint64(pk, it->g.off);
  qp_pack_cstr(pk, "length");
  msgpack_pack_uint64(pk, it->g.len);
}

/* Answers (all leases, or the error with every lease released) and frees the job. */
static void job_finish(mjob *j) {
  qd_req *r = &j->req;
  qd_conn *c = r->conn;
  char m[256];
  if (j->err) {
    for (size_t i = 0; i < j->n; i++)
      if (j->items[i].leased) qd_arena_release(arena, qd_conn_id(c), j->items[i].g.lease, m, sizeof m);
    qd_reply_err(r, j->err, "%s", r->msg);
  } else {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    answer_begin(&sb, &pk, r->msgid);
    if (!j->ask.many) {
      pack_item(&pk, &j->items[0], 0);
    } else {
      msgpack_pack_map(&pk, 1);
      qp_pack_cstr(&pk, "maps");
      msgpack_pack_array(&pk, j->n);
      for (size_t i = 0; i < j->n; i++) pack_item(&pk, &j->items[i], 1);
    }
    qd_reply(r, &sb, NULL);
  }
  int deferred = j->deferred;
  job_free(j);
  if (deferred) qd_req_done_deferred(c); /* last: may free the connection */
}

/* Leases every item; decodes small ones now; starts the pool pieces and the waits. */
static void job_run(mjob *j, qs_txn *t0) {
  uint64_t conn = qd_conn_id(j->req.conn);
  int rc;
  for (size_t i = 0; i < j->n && !j->err; i++) {
    mitem *it = &j->items[i];
    rc = qd_arena_acquire(arena, &it->key, &it->meta, it->n_elem * it->esize, conn, &it->g,
                          j->req.msg, sizeof j->req.msg);
    if (rc < 0) {
      j->err = rc;
      break;
    }
    it->leased = 1;
    it->outcome = rc;
    j->created += rc == QD_ARENA_DECODE;
  }
  const qs_slice *sl = j->ask.has_slice ? &j->ask.slice : NULL;
  uint64_t pool_bytes = 0;
  for (size_t i = 0; i < j->n; i++) {
    mitem *it = &j->items[i];
    if (!it->leased || it->outcome != QD_ARENA_DECODE) continue;
    if (j->err) { /* all or nothing: entries this job was to decode are dropped */
      qd_arena_decoded(arena, it->g.entry, j->err);
      continue;
    }
    if (it->g.len <= qd_srv.cfg.inline_decode_bytes) {
      uint64_t d0 = qd_now_ns();
      char m[512];
      it->rc = decode_range(it, t0, sl, j->ask.dt, 0, it->n_elem, m, sizeof m, j->ask.model);
      atomic_fetch_add(&qd_srv.st.decode_ns, qd_now_ns() - d0);
      if (it->rc) job_fail(j, it->rc, "%s", m);
      qd_arena_decoded(arena, it->g.entry, it->rc);
    } else {
      it->pool = 1;
      pool_bytes += it->g.len;
    }
  }
  if (pool_bytes && j->err) { /* a small decode failed: the large ones are not started */
    for (size_t i = 0; i < j->n; i++)
      if (j->items[i].pool) {
        j->items[i].pool = 0;
        qd_arena_decoded(arena, j->items[i].g.entry, j->err);
      }
    pool_bytes = 0;
  }
  if (pool_bytes) {
    /* Pieces: one per CPU (at most `threads`) for large entries; the first uses the plan's txn,
     * the others their own, begun now and used only if they see the same model versions. */
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int want = pool_bytes >= SPLIT_BYTES ? (int)(cpus > 0 ? cpus : 1) : 1;
    if (want > (int)qd_srv.cfg.threads) want = (int)qd_srv.cfg.threads;
    if (want > MAX_PIECES) want = MAX_PIECES;
    qs_txn *txns[MAX_PIECES] = {t0};
    int n = 1;
    for (int k = 1; k < want; k++) {
      qs_txn *t;
      if (qs_txn_begin(qd_srv.store, &t)) break;
      int same = 1;
      for (size_t i = 0; i < j->n && same; i++) {
        qs_tensor x;
        mitem *it = &j->items[i];
        same = !it->pool || (qs_tensor_get(t, j->ask.model, it->t.name, &x) == 0 &&
                             x.model_id == it->t.model_id);
      }
      if (!same) {
        qs_txn_end(t);
        break;
      }
      txns[n++] = t;
    }
    for (size_t i = 0; i < j->n; i++)
      if (j->items[i].pool) j->items[i].pieces_left = n;
    for (int k = 0; k < n; k++) {
      piece *p = calloc(1, sizeof *p);
      if (p) {
        p->j = j;
        p->txn = txns[k];
        p->k = k;
        p->n = n;
      }
      if (!p || uv_queue_work(qd_srv.loop, &p->work, work_cb, after_work_cb)) {
        /* Not queued: this piece fails now (the others still run and end their txns). */
        qs_txn_end(txns[k]);
        free(p);
        job_fail(j, QINS_EINTERNAL, "cannot queue the decode of %s", j->ask.model);
        for (size_t i = 0; i < j->n; i++) {
          mitem *it = &j->items[i];
          if (!it->pool) continue;
          if (!it->rc) it->rc = QINS_EINTERNAL;
          if (--it->pieces_left == 0) qd_arena_decoded(arena, it->g.entry, it->rc);
        }
        continue;
      }
      j->pending++;
      pieces_out++;
    }
    t0 = NULL; /* handed to piece 0 (or ended) */
  }
  if (t0) qs_txn_end(t0);
  for (size_t i = 0; i < j->n; i++) {
    mitem *it = &j->items[i];
    if (!it->leased || it->outcome != QD_ARENA_WAIT || j->err) continue;
    wctx *x = malloc(sizeof *x);
    if (!x) {
      job_fail(j, QINS_ENOMEM, "out of memory");
      break;
    }
    x->j = j;
    x->it = it;
    it->w.cb = wait_done;
    it->w.ud = x;
    int wrc = 0;
    if (qd_arena_wait_async(arena, &it->g, &it->w, &wrc)) { /* already decoded */
      free(x);
      if (wrc) job_fail(j, wrc, "%s/%s: its decode (by another request) failed: %s",
                        j->ask.model, it->t.name, qins_strerror(wrc));
      continue;
    }
    j->pending++;
  }
}

int qd_map_start(qd_req *r, qd_ask *a) {
  if (!arena_get()) {
    qd_job_discard(a);
    return no_arena(r);
  }
  mjob *j = calloc(1, sizeof *j);
  if (!j) {
    qd_job_discard(a);
    return QINS_ENOMEM;
  }
  j->ask = *a;
  a->names = NULL; /* now the map job's */
  qd_job_discard(a);
  memcpy(&j->req, r, offsetof(qd_req, msg));
  j->req.msg[0] = '\0';
  j->req.params.p = j->req.params.end = NULL; /* the request bytes go when this returns */
  j->req.n_keys = 0;
  qs_txn *t;
  int rc = qs_txn_begin(qd_srv.store, &t);
  if (rc) {
    rc = qd_store_err(r->msg, sizeof r->msg, rc, j->ask.model, j->ask.name);
    job_free(j);
    return rc;
  }
  if (job_plan(j, t)) {
    qs_txn_end(t);
    snprintf(r->msg, sizeof r->msg, "%s", j->req.msg);
    rc = j->err;
    job_free(j);
    return rc;
  }
  j->pending = 1; /* held until job_run returns, so nothing finishes the job under it */
  job_run(j, t);
  if (j->created) warm_kick(); /* new entries took warm pages */
  if (--j->pending == 0) {
    job_finish(j);
    return 0;
  }
  j->deferred = 1;
  qd_req_defer(r, 0); /* a map answer is small: nothing to reserve */
  return 0;
}

int qd_map_attach(qd_req *r) {
  if (!arena_get()) return no_arena(r);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  answer_begin(&sb, &pk, r->msgid);
  msgpack_pack_map(&pk, 4);
  qp_pack_cstr(&pk, "arena_bytes");
  msgpack_pack_uint64(&pk, qd_arena_size(arena));
  qp_pack_cstr(&pk, "max_leases");
  msgpack_pack_uint64(&pk, qd_srv.cfg.arena_max_leases);
  qp_pack_cstr(&pk, "align");
  msgpack_pack_uint64(&pk, QD_ARENA_ALIGN);
  qp_pack_cstr(&pk, "page_align_bytes");
  msgpack_pack_uint64(&pk, QD_ARENA_PAGE_ALIGN);
  qd_reply_fd(r, &sb, qd_arena_fd(arena));
  warm.attached = 1; /* an arena nobody attaches to stays without pages */
  warm_kick();
  return 0;
}

int qd_map_release(qd_req *r, const uint64_t *leases, uint32_t n) {
  if (!arena_get()) return no_arena(r);
  uint64_t conn = qd_conn_id(r->conn), done = 0;
  int rc = 0;
  char m[256];
  for (uint32_t i = 0; i < n; i++) {
    if (qd_arena_release(arena, conn, leases[i], m, sizeof m) == 0) done++;
    else if (!rc) {
      rc = QINS_EBAD_PARAMS;
      snprintf(r->msg, sizeof r->msg, "%s", m);
    }
  }
  if (rc) return rc;
  msgpack_sbuffer sb;
  msgpack_packer pk;
  answer_begin(&sb, &pk, r->msgid);
  msgpack_pack_map(&pk, 1);
  qp_pack_cstr(&pk, "released");
  msgpack_pack_uint64(&pk, done);
  qd_reply(r, &sb, NULL);
  return 0;
}

void qd_map_stats_pack(msgpack_packer *pk) {
  qd_arena_stats s;
  memset(&s, 0, sizeof s);
  if (arena) qd_arena_stats_get(arena, &s);
  uint64_t pending = 0, o, l;
  if (arena && warm.attached && !warm.stopped)
    qd_arena_warm_next(arena, warm_reserve(), WARM_CHUNK, &o, &l, &pending);
  const char *k[QD_MAP_STATS_KEYS] = {"arena_bytes", "arena_used", "arena_leased",
                                      "arena_resident", "arena_entries", "arena_leases",
                                      "arena_hits", "arena_misses", "arena_evictions",
                                      "arena_refusals", "arena_decode_bytes", "arena_warm_bytes",
                                      "arena_warm", "arena_warm_pending", "arena_warm_created"};
  uint64_t v[QD_MAP_STATS_KEYS] = {s.bytes, s.used, s.leased, s.resident, s.entries, s.leases,
                                   s.hits, s.misses, s.evictions, s.refusals, s.decode_bytes,
                                   arena ? warm_reserve() : 0, s.warm, pending, warm.created};
  for (int i = 0; i < QD_MAP_STATS_KEYS; i++) {
    qp_pack_cstr(pk, k[i]);
    msgpack_pack_uint64(pk, v[i]);
  }
}
