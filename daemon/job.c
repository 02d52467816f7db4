/* SPDX-License-Identifier: MIT */
/*
 * job.c — decode jobs: a get or get_many planned and decoded in one short LMDB read txn, begun
 * and ended on the thread that uses it (the env is MDB_NOTLS). A job whose decode touches at most
 * inline-decode-bytes runs on the loop thread and answers at once; otherwise the plan's txn is
 * ended and a pool thread plans again and decodes in its own txn, so a model replaced in between
 * is served consistently from the newer snapshot. No txn is ever held while a client is slow.
 *
 * A job's fields, by owner:
 *   ask   what was asked (methods.c fills it on the loop; read-only once the job starts);
 *   plan  the tensors, output shapes and sizes, and the decoded answer or its error: written by
 *         the thread that runs job_run (loop or pool), read by the loop after the work;
 *   loop  the request copy, the reservation and the stream: loop thread only.
 *
 * Payload path: a small get is decoded on the loop thread into a static buffer right after its
 * hand-packed head and written with one call (qd_reply_copy); other answers send the decoded
 * buffer as its own iovec after a bin header, never copied into an sbuffer. A streamed get (a
 * large tensor or row range) is written while it is decoded: its pool thread sends each piece
 * through the stream (reply.h) while it is still in cache; stored bytes that are the answer (f32
 * stored, f32 asked) go from the store's map to the socket with no copy of ours. The worker waits
 * for the client no longer than a budget; then the rest is decoded into a buffer the loop sends,
 * and the txn ends, so a slow client holds neither a pool thread nor a snapshot.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job.h"
#include "qinsd.h"

#define ITEM_OVERHEAD 600 /* generous bound on the msgpack bytes around one tensor in a response */

int qd_store_err(char *msg, size_t cap, int rc, const char *model, const char *name) {
  const char *why = qs_error();
  if (rc == QINS_ENO_MODEL)
    snprintf(msg, cap, "no model \"%s\"", model);
  else if (rc == QINS_ENO_TENSOR)
    snprintf(msg, cap, "no tensor \"%s\" in model \"%s\"", name ? name : "", model);
  else
    snprintf(msg, cap, "%s/%s: %s%s%s", model, name ? name : "", qins_strerror(rc),
             why && *why ? ": " : "", why ? why : "");
  if (rc > -1000) rc = QINS_EINTERNAL; /* errno values do not cross the wire */
  return rc;
}

typedef struct item {
  qs_tensor t;                   /* the record (copied out of the txn) */
  uint64_t shape[QS_MAX_NDIM];   /* output shape */
  int ndim;
  uint64_t n_elem;               /* output elements */
  uint64_t bytes;                /* output bytes */
  uint64_t off;                  /* offset in the payload buffer */
  const char *dtype;             /* output dtype name (static) */
} item;

typedef struct job {
  uv_work_t work;                /* pool request (first: the work callbacks cast it back) */
  struct {                       /* written by the thread running job_run */
    item *items;
    size_t n_items, cap_items;
    uint64_t total;              /* payload bytes */
    uint64_t cost;               /* estimated bytes touched to decode: decides inline vs pool */
    void *payload;               /* qd_buf_get, or inside `scratch` (borrowed) */
    size_t payload_cap;
    int borrowed;                /* payload is in scratch: not released, answered by job_reply */
    int on_loop;                 /* job_run runs on the loop thread (may borrow scratch) */
    int err;                     /* 0 or a wire code; message in req.msg */
    /* a streamed get: response bytes the worker sent itself, and the head they start with */
    uint8_t head[128];           /* the response head (pack_get_head) */
    size_t head_len;
    uint64_t sent;               /* response bytes the worker wrote (head first) */
    uint64_t rest_skip;          /* bytes at the start of `payload` already written */
    int gone;                    /* the worker's write failed: the client left or was cut */
  } plan;
  struct {                       /* loop thread only */
    uint64_t reserved;           /* bytes counted against the client's queue while deferred */
    int plan_on_pool;            /* a large get_many: planned on the pool first (qd_job_start) */
    qd_stream *stream;           /* this job streams (a large single get) */
  } lp;
  qd_ask ask;                    /* after the parts a reused job clears (qd_job_new) */
  qd_req req;                    /* copy of the request (params cleared): last, as job reuse and
                                    qd_job_start skip its 1.2 KB message buffer */
} job;

static job *job_of(qd_ask *a) { return (job *)((char *)a - offsetof(job, ask)); }

/* One freed job (with its items array, if small) is kept for the next request: a small get then
 * costs no malloc of the job (about 3 KiB) or of its plan. Jobs are made and freed on the loop
 * thread only (pool threads run job_run on a job they do not free). */
#define JOB_SPARE_ITEMS 8 /* items array kept with the spare job: enough for a get */

__attribute__((hot))
qd_ask *qd_job_new(void) {
  job *j = qd_srv.jb.spare;
  if (!j) {
    j = calloc(1, sizeof(job));
    return j ? &j->ask : NULL;
  }
  qd_srv.jb.spare = NULL;
  item *items = j->plan.items;
  size_t cap = j->plan.cap_items;
  /* Cleared up to the ask's slice and strings (the handler writes those; req is set by
   * qd_job_start): a few hundred bytes, not the 1.3 KB of names. */
  memset(j, 0, offsetof(job, ask) + offsetof(qd_ask, slice));
  j->ask.model[0] = j->ask.name[0] = j->ask.prefix[0] = '\0';
  j->plan.items = items;
  j->plan.cap_items = cap;
  return &j->ask;
}

__attribute__((hot))
static void job_free(job *j) {
  free(j->ask.names);
  if (!j->plan.borrowed) qd_buf_release(j->plan.payload, j->plan.payload_cap);
  if (!qd_srv.jb.spare && j->plan.cap_items <= JOB_SPARE_ITEMS) {
    qd_srv.jb.spare = j;
    return;
  }
  free(j->plan.items);
  free(j);
}

void qd_job_discard(qd_ask *a) {
  if (a) job_free(job_of(a));
}

static int job_fail(job *j, int rc, const char *name) {
  j->plan.err = qd_store_err(j->req.msg, sizeof j->req.msg, rc, j->ask.model, name);
  return j->plan.err;
}

/* ---- plan ------------------------------------------------------------------------------------ */
/* The next free item (items grown if needed), or NULL (out of memory; err set). */
__attribute__((hot))
static item *job_slot(job *j) {
  if (j->plan.n_items == j->plan.cap_items) {
    size_t nc = j->plan.cap_items ? j->plan.cap_items * 2 : 4;
    item *ni = realloc(j->plan.items, nc * sizeof *ni);
    if (!ni) {
      snprintf(j->req.msg, sizeof j->req.msg, "out of memory planning %s", j->ask.model);
      j->plan.err = QINS_ENOMEM;
      return NULL;
    }
    j->plan.items = ni;
    j->plan.cap_items = nc;
  }
  return &j->plan.items[j->plan.n_items];
}

/* Adds tensor t to the plan: output shape, dtype and bytes (the store checks the slice); checks
 * the response limit. t may already be the next slot's record (job_slot), read there to save a
 * copy. */
__attribute__((hot))
static int job_add(job *j, const qs_tensor *t) {
  item *it = job_slot(j);
  if (!it) return j->plan.err;
  if (&it->t != t) it->t = *t; /* the rest of the item is set below */
  int rc = qs_slice_shape(t, j->ask.has_slice ? &j->ask.slice : NULL, it->shape, &it->n_elem);
  if (rc) {
    snprintf(j->req.msg, sizeof j->req.msg, "%s", qs_error());
    return j->plan.err = rc < -999 ? rc : QINS_EBAD_SLICE;
  }
  it->ndim = t->ndim;
  uint64_t esize;
  if (t->codec == QS_RAW) {
    if (j->ask.dt_given) {
      snprintf(j->req.msg, sizeof j->req.msg,
               "%s/%s is a raw %s tensor: it is served only as stored (omit dtype)", j->ask.model,
               t->name, qs_dtype_name(t->src_dtype));
      return j->plan.err = QINS_EDTYPE;
    }
    esize = qs_dtype_size(t->src_dtype);
    if (!esize) esize = 1;
    it->dtype = qs_dtype_name(t->src_dtype);
  } else {
    esize = qc_dtype_size((qc_dtype)j->ask.dt);
    it->dtype = qc_dtype_name((qc_dtype)j->ask.dt);
  }
  if (it->n_elem > UINT64_MAX / esize) {
    snprintf(j->req.msg, sizeof j->req.msg, "%s/%s: response size overflows", j->ask.model, t->name);
    return j->plan.err = QINS_ERESPONSE_TOO_LARGE;
  }
  it->bytes = it->n_elem * esize;
  j->plan.cost += it->bytes; /* chunk checksums are verified once per process (store.h): the
                                decode's output is the cost that repeats */
  it->off = j->plan.total;
  j->plan.total += it->bytes;
  j->plan.n_items++;
  uint64_t resp = j->plan.total + ITEM_OVERHEAD * (uint64_t)j->plan.n_items;
  if (resp > qd_srv.cfg.max_response_bytes) {
    snprintf(j->req.msg, sizeof j->req.msg,
             "%s/%s: the response would be over %llu bytes, above max_response_bytes %llu: "
             "request a slice",
             j->ask.model, t->name, (unsigned long long)resp,
             (unsigned long long)qd_srv.cfg.max_response_bytes);
    return j->plan.err = QINS_ERESPONSE_TOO_LARGE;
  }
  return 0;
}

static int prefix_cb(void *ud, const qs_tensor *t) {
  job *j = ud;
  return job_add(j, t) ? 1 : 0;
}

/* Plans the job in txn t (fills items). */
__attribute__((hot))
static int job_plan(job *j, qs_txn *t) {
  const qd_ask *a = &j->ask;
  j->plan.n_items = 0;
  j->plan.total = 0;
  j->plan.cost = 0;
  j->plan.err = 0;
  int rc;
  if (!a->many) { /* read straight into the item: a tensor record is 1.2 KB */
    item *it = job_slot(j);
    if (!it) return j->plan.err;
    if ((rc = qs_tensor_get(t, a->model, a->name, &it->t))) return job_fail(j, rc, a->name);
    return job_add(j, &it->t);
  }
  if (a->by_prefix) {
    qs_model m;
    if ((rc = qs_model_get(t, a->model, &m))) return job_fail(j, rc, NULL);
    rc = qs_tensors_each(t, a->model, a->prefix, prefix_cb, j);
    if (j->plan.err) return j->plan.err;
    if (rc) return job_fail(j, rc, a->prefix);
    return 0;
  }
  for (uint32_t i = 0; i < a->n_names; i++) {
    qs_tensor ten;
    if ((rc = qs_tensor_get(t, a->model, a->names[i], &ten))) return job_fail(j, rc, a->names[i]);
    if ((rc = job_add(j, &ten))) return rc;
  }
  return 0;
}

/* ---- response heads --------------------------------------------------------------------------- */
/* msgpack writers for pack_get_head: the smallest encoding, as msgpack-c's packers choose. */
__attribute__((hot))
static size_t put_uint(uint8_t *p, uint64_t v) {
  if (v < 128) {
    p[0] = (uint8_t)v;
    return 1;
  }
  int n = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffu ? 4 : 8;
  p[0] = n == 1 ? 0xcc : n == 2 ? 0xcd : n == 4 ? 0xce : 0xcf;
  for (int i = 0; i < n; i++) p[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
  return 1 + (size_t)n;
}

static size_t put_fixstr(uint8_t *p, const char *s) { /* s: under 32 bytes */
  size_t n = strlen(s);
  p[0] = (uint8_t)(0xa0 | n);
  memcpy(p + 1, s, n);
  return 1 + n;
}

/* [1, msgid, nil, {shape: [...], dtype: "...", data: <bin header>}]: every get answer's head,
 * however it is sent (small, buffered or streamed). At most 1 + 5 + 1 + 1 + 6 + 1 + 8 * 9 + 6 +
 * 5 + 5 + 5 = 112 bytes. */
__attribute__((hot))
static size_t pack_get_head(uint8_t *out, uint32_t msgid, const item *it) {
  uint8_t *p = out;
  *p++ = 0x94;
  *p++ = 0x01;
  p += put_uint(p, msgid);
  *p++ = 0xc0;
  *p++ = 0x83;
  p += put_fixstr(p, "shape");
  *p++ = (uint8_t)(0x90 | it->ndim); /* ndim <= QS_MAX_NDIM < 16 */
  for (int d = 0; d < it->ndim; d++) p += put_uint(p, it->shape[d]);
  p += put_fixstr(p, "dtype");
  p += put_fixstr(p, it->dtype);
  p += put_fixstr(p, "data");
  p += qp_bin_header(p, (uint32_t)it->bytes);
  return (size_t)(p - out);
}

/* One get_many tensor map up to its payload: {name, shape, dtype, data: <bin header>}. */
static void pack_item_head(msgpack_packer *pk, const item *it) {
  msgpack_pack_map(pk, 4);
  qp_pack_cstr(pk, "name");
  qp_pack_cstr(pk, it->t.name);
  qp_pack_cstr(pk, "shape");
  msgpack_pack_array(pk, (size_t)it->ndim);
  for (int d = 0; d < it->ndim; d++) msgpack_pack_uint64(pk, it->shape[d]);
  qp_pack_cstr(pk, "dtype");
  qp_pack_cstr(pk, it->dtype);
  qp_pack_cstr(pk, "data"); /* the last key: the payload follows its bin header */
  msgpack_pack_bin(pk, (size_t)it->bytes);
}

/* ---- decode ----------------------------------------------------------------------------------- */
/* How long in all a streaming worker may wait for the socket (its turn on the connection, then
 * room in it) before the rest goes into a buffer of its own: STREAM_WAIT_NS plus 1 ns a byte. */
#define STREAM_WAIT_NS 20000000ull

/* Streams the single planned item. Output elements are sent as zero-copy spans of the map when
 * the stored bytes are the answer (qs_tensor_span), else decoded in pieces of stream-piece-bytes
 * into a buffer that stays in cache until the socket copy reads it. Either way each piece's stored
 * bytes are checked (store.h: segment CRCs) right before that piece is sent, while they are in
 * cache, not in one pass over a whole chunk first; a piece that fails after the head went out
 * cuts the stream (PROTOCOL.md §4.6). The first piece is checked before anything is sent: an
 * error in it is still an ordinary reply. */
static int job_decode_stream(job *j, qs_txn *t) {
  uint64_t dec = 0, d0; /* dec: time in the store's reads (decode_ns) */
  item *it = &j->plan.items[0];
  const qs_slice *sl = j->ask.has_slice ? &j->ask.slice : NULL;
  const qc_dtype dt = (qc_dtype)j->ask.dt;
  const uint64_t deadline = qd_now_ns() + STREAM_WAIT_NS + j->plan.total;
  const uint64_t esize = it->n_elem ? it->bytes / it->n_elem : 1;
  uint64_t piece = qd_srv.cfg.stream_piece_bytes / esize;
  if (piece == 0) piece = 1;
  j->plan.head_len = pack_get_head(j->plan.head, j->req.msgid, it);
  char *buf = NULL; /* decode pieces */
  size_t buf_cap = 0;
  const void *span = NULL; /* or the zero-copy span at p */
  uint64_t p = 0, n = 0;   /* output elements [p, p + n) are ready to send */
  int rc = 0, zero_copy = 0;
  if (it->n_elem) {
    d0 = qd_now_ns();
    rc = qs_tensor_span(t, &it->t, sl, dt, 0, piece < it->n_elem ? piece : it->n_elem, &span, &n);
    dec += qd_now_ns() - d0;
    if (rc < 0) return job_fail(j, rc, it->t.name);
    zero_copy = rc == 1;
    if (!zero_copy) {
      n = piece < it->n_elem ? piece : it->n_elem;
      buf = qd_buf_get((size_t)(n * esize), &buf_cap);
      if (!buf) {
        snprintf(j->req.msg, sizeof j->req.msg, "cannot allocate %llu bytes for %s/%s",
                 (unsigned long long)(n * esize), j->ask.model, it->t.name);
        return j->plan.err = QINS_ENOMEM;
      }
      d0 = qd_now_ns();
      rc = qs_tensor_read(t, &it->t, sl, dt, 0, n, buf);
      dec += qd_now_ns() - d0;
      if (rc) {
        qd_buf_release(buf, buf_cap);
        return job_fail(j, rc, it->t.name);
      }
    }
  }
  qd_stream *s = j->lp.stream; /* set before the work was queued */
  if (qd_stream_lend(s, deadline)) {
    int sr = qd_stream_send(s, j->plan.head, j->plan.head_len, deadline, &j->plan.sent);
    while (sr == 0 && p < it->n_elem) {
      const void *src = zero_copy ? span : buf;
      sr = qd_stream_send(s, src, (size_t)(n * esize), deadline, &j->plan.sent);
      if (sr) break;
      p += n;
      if (p == it->n_elem) break;
      d0 = qd_now_ns();
      if (zero_copy) {
        rc = qs_tensor_span(t, &it->t, sl, dt, p, it->n_elem - p < piece ? it->n_elem : p + piece,
                            &span, &n);
        if (rc == 0) rc = QINS_EINTERNAL; /* a span that stops being one: cannot happen */
        if (rc == 1) rc = 0;
      } else {
        n = it->n_elem - p < piece ? it->n_elem - p : piece;
        rc = qs_tensor_read(t, &it->t, sl, dt, p, p + n, buf);
      }
      dec += qd_now_ns() - d0;
      if (rc == 0) continue;
      job_fail(j, rc, it->t.name); /* after the head: the loop closes the connection */
      break;
    }
    if (sr < 0) {
      j->plan.gone = 1;
      snprintf(j->req.msg, sizeof j->req.msg, "writing to the socket failed after %llu bytes: %s",
               (unsigned long long)j->plan.sent, strerror(errno));
    }
  }
  qd_buf_release(buf, buf_cap);
  /* What the worker did not write (all of it without a socket) goes into a buffer for the loop:
   * response bytes [sent, head_len + total); a partly written element is decoded whole and its
   * written bytes skipped. */
  if (!j->plan.err && !j->plan.gone && j->plan.sent < j->plan.head_len + j->plan.total) {
    uint64_t from = j->plan.sent > j->plan.head_len ? j->plan.sent - j->plan.head_len : 0;
    uint64_t e0 = from / esize;
    j->plan.rest_skip = from - e0 * esize;
    if (e0 < it->n_elem) {
      j->plan.payload = qd_buf_get((size_t)((it->n_elem - e0) * esize), &j->plan.payload_cap);
      if (!j->plan.payload) {
        snprintf(j->req.msg, sizeof j->req.msg, "cannot allocate %llu bytes for %s/%s",
                 (unsigned long long)((it->n_elem - e0) * esize), j->ask.model, it->t.name);
        j->plan.err = QINS_ENOMEM;
      } else {
        d0 = qd_now_ns();
        if ((rc = qs_tensor_read(t, &it->t, sl, dt, e0, it->n_elem, j->plan.payload)))
          job_fail(j, rc, it->t.name);
        dec += qd_now_ns() - d0;
      }
    }
  }
  atomic_fetch_add(&qd_srv.st.decode_ns, dec);
  return j->plan.err;
}

/* A small get decoded on the loop thread is answered from this buffer: the head is packed right
 * before the payload, and the whole answer is usually written at once from here (qd_reply_copy),
 * so it costs no allocation. Loop thread only; used from decode to reply within one job start. */
#define SCRATCH_HEAD 512                 /* room for a get's response head (at most ~200 bytes) */
#define SCRATCH_PAYLOAD (64u * 1024)
static char scratch[SCRATCH_HEAD + SCRATCH_PAYLOAD] __attribute__((aligned(64)));

/* Decodes the planned items in txn t into a fresh payload buffer (or scratch). */
__attribute__((hot))
static int job_decode(job *j, qs_txn *t) {
  uint64_t t0 = qd_now_ns();
  if (j->plan.on_loop && !j->ask.many && j->plan.total <= SCRATCH_PAYLOAD) {
    j->plan.payload = scratch + SCRATCH_HEAD;
    j->plan.payload_cap = 0;
    j->plan.borrowed = 1;
  } else if (j->plan.total) {
    j->plan.payload = qd_buf_get((size_t)j->plan.total, &j->plan.payload_cap);
    if (!j->plan.payload) {
      snprintf(j->req.msg, sizeof j->req.msg, "cannot allocate %llu bytes for %s",
               (unsigned long long)j->plan.total, j->ask.model);
      return j->plan.err = QINS_ENOMEM;
    }
  }
  for (size_t i = 0; i < j->plan.n_items; i++) {
    item *it = &j->plan.items[i];
    if (!it->n_elem) continue;
    int rc = qs_tensor_read(t, &it->t, j->ask.has_slice ? &j->ask.slice : NULL,
                            (qc_dtype)j->ask.dt, 0, it->n_elem, (char *)j->plan.payload + it->off);
    if (rc) return job_fail(j, rc, it->t.name);
  }
  atomic_fetch_add(&qd_srv.st.decode_ns, qd_now_ns() - t0);
  return 0;
}

enum { RUN_DONE = 0, RUN_DEFER = 1 };

/* Plans and (unless deferred) decodes, in one read txn begun and ended on this thread. */
__attribute__((hot))
static int job_run(job *j, int on_loop) {
  j->plan.on_loop = on_loop;
  qs_txn *t;
  int rc = qs_txn_begin(qd_srv.store, &t);
  if (rc) {
    job_fail(j, rc, j->ask.name);
    return RUN_DONE;
  }
  if (job_plan(j, t) == 0) {
    if (on_loop && j->plan.cost > qd_srv.cfg.inline_decode_bytes) {
      qs_txn_end(t);
      return RUN_DEFER;
    }
    if (j->lp.stream) job_decode_stream(j, t);
    else job_decode(j, t);
  }
  qs_txn_end(t);
  return RUN_DONE;
}

/* ---- answers (loop thread) -------------------------------------------------------------------- */
/* Sends the job's answer (or error) and frees it. */
__attribute__((hot))
static void job_reply(job *j) {
  qd_req *r = &j->req;
  if (j->plan.err) {
    qd_reply_err(r, j->plan.err, "%s", r->msg);
    job_free(j);
    return;
  }
  if (j->plan.borrowed) { /* a small get: [1, msgid, nil, head] packed before the payload */
    uint8_t head[SCRATCH_HEAD];
    size_t hl = pack_get_head(head, r->msgid, &j->plan.items[0]);
    char *p = (char *)j->plan.payload - hl;
    memcpy(p, head, hl);
    qd_reply_copy(r, p, hl + (size_t)j->plan.total);
    job_free(j);
    return;
  }
  /* A head with a small first buffer (a few hundred bytes): the sbuffer's default first
   * allocation (8 KiB) is too large for malloc's per-thread cache, and a head per request is
   * allocated here and freed after its write. Grows like any sbuffer. */
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  sb.data = malloc(512);
  sb.alloc = sb.data ? 512 : 0;
  /* A few items (every get) use the stack; get_many with more allocates. */
  const size_t ni = j->plan.n_items;
  size_t ends_s[JOB_SPARE_ITEMS + 1];
  struct iovec bufs_s[2 * JOB_SPARE_ITEMS + 1];
  int small = ni <= JOB_SPARE_ITEMS;
  size_t *ends = small ? ends_s : malloc((ni + 1) * sizeof *ends);
  struct iovec *bufs = small ? bufs_s : malloc((2 * ni + 1) * sizeof *bufs);
  int oom = !ends || !bufs;
  if (!oom && !j->ask.many) {
    uint8_t head[SCRATCH_HEAD];
    size_t hl = pack_get_head(head, r->msgid, &j->plan.items[0]);
    oom = msgpack_sbuffer_write(&sb, (const char *)head, hl) != 0;
    ends[0] = sb.size;
  } else if (!oom) {
    qp_pack_response_ok(&pk, r->msgid);
    msgpack_pack_map(&pk, 1);
    qp_pack_cstr(&pk, "tensors");
    msgpack_pack_array(&pk, ni);
    ends[0] = sb.size;
    for (size_t i = 0; i < ni; i++) {
      pack_item_head(&pk, &j->plan.items[i]);
      ends[i] = sb.size;
    }
  }
  if (oom) {
    msgpack_sbuffer_destroy(&sb);
    qd_reply_err(r, QINS_ENOMEM, "out of memory answering %s", j->ask.model);
  } else {
    /* Pieces: head[0, ends[0]), payload 0, head[ends[0], ends[1]), payload 1, ... The heads live
     * in sb's buffer, which the write owns from qd_reply on (its address does not change). */
    unsigned nb = 0;
    size_t n = j->ask.many ? ni : 1;
    for (size_t i = 0; i < n; i++) {
      if (i > 0) bufs[nb++] = (struct iovec){sb.data + ends[i - 1], ends[i] - ends[i - 1]};
      if (j->plan.items[i].bytes)
        bufs[nb++] = (struct iovec){(char *)j->plan.payload + j->plan.items[i].off,
                                    (size_t)j->plan.items[i].bytes};
    }
    qd_payload pl = {.head_len = ends[0], .bufs = bufs, .nbufs = nb, .owned = j->plan.payload,
                     .owned_cap = j->plan.payload_cap};
    j->plan.payload = NULL;
    qd_reply(r, &sb, &pl);
  }
  if (!small) {
    free(bufs);
    free(ends);
  }
  job_free(j);
}

/* A streamed get's end, once the worker is done and the stream holds its turn (reply.h): the
 * rest of the answer (what the worker buffered), or its error. */
static void stream_complete(void *ud) {
  job *j = ud;
  qd_conn *c = j->req.conn;
  qd_stream *s = j->lp.stream;
  const uint64_t all = j->plan.head_len + j->plan.total, sent = j->plan.sent;
  qd_req_unreserve(c, j->lp.reserved);
  if (j->plan.gone) { /* the client left, or the connection was cut, mid-answer */
    qd_log(QD_LOG_VERBOSE, "%s: get (msgid %u): %s; closing the connection", qd_conn_desc(c),
           j->req.msgid, j->req.msg);
    qd_stream_close(s, 1);
  } else if (j->plan.err && sent == 0) { /* nothing sent: an ordinary error reply */
    qd_stream_close(s, 0); /* first, or the error reply would wait behind it */
    qd_reply_err(&j->req, j->plan.err, "%s", j->req.msg);
  } else if (j->plan.err) {
    /* The head went out: the only honest end is to close (PROTOCOL.md §4.6). */
    qd_log(QD_LOG_WARNING,
           "%s: get (msgid %u): %s: %s after %llu of %llu bytes were sent; closing the connection",
           qd_conn_desc(c), j->req.msgid, qins_err_name(j->plan.err), j->req.msg,
           (unsigned long long)sent, (unsigned long long)all);
    qd_count_error(j->plan.err);
    qd_latency_record(j->req.t0);
    qd_stream_close(s, 1);
  } else {
    char *head = NULL;
    size_t hl = 0;
    if (sent < j->plan.head_len) {
      hl = j->plan.head_len - (size_t)sent;
      head = malloc(hl);
      if (head) memcpy(head, j->plan.head + sent, hl);
    }
    uint64_t from = sent > j->plan.head_len ? sent - j->plan.head_len : 0; /* payload sent */
    if (hl && !head) {
      qd_log(QD_LOG_WARNING, "%s: out of memory finishing a get; closing", qd_conn_desc(c));
      qd_stream_close(s, 1);
    } else {
      if (hl || from < j->plan.total) { /* the write owns the rest's buffer from here */
        size_t n = from < j->plan.total ? (size_t)(j->plan.total - from) : 0;
        qd_stream_write(s, head, hl, (char *)j->plan.payload + j->plan.rest_skip, n,
                        j->plan.payload, j->plan.payload_cap);
        j->plan.payload = NULL;
      }
      qd_latency_record(j->req.t0);
      qd_stream_close(s, 0);
    }
  }
  job_free(j);
  qd_req_done_deferred(c); /* last: may free the connection */
}

/* A pool job that never ran (shutdown cancelled it) answers SHUTDOWN. */
static void job_canceled(job *j, int status) {
  if (status != UV_ECANCELED || j->plan.err) return;
  j->plan.err = QINS_ESHUTDOWN;
  snprintf(j->req.msg, sizeof j->req.msg, "the daemon is shutting down");
}

/* A large answer while the server holds max-response-memory (stats.c): BUSY, counted. */
static int mem_busy(char *msg, size_t cap) {
  qd_srv.st.memory_refused++;
  snprintf(msg, cap,
           "the server holds max-response-memory (%llu bytes) for other answers: try again later",
           (unsigned long long)qd_srv.cfg.max_response_memory);
  return QINS_EBUSY;
}

static void work_cb(uv_work_t *w) { job_run((job *)w, 0); }

static void after_work_cb(uv_work_t *w, int status) {
  job *j = (job *)w;
  qd_conn *c = j->req.conn;
  job_canceled(j, status);
  if (j->lp.stream) {
    /* With bytes left to send, the rest waits for the stream's turn; an error before anything
     * went out, or a client gone, needs none. */
    const uint64_t all = j->plan.head_len + j->plan.total;
    int rest = !j->plan.gone && !(j->plan.err && j->plan.sent == 0) && j->plan.sent < all;
    if (qd_stream_worker_done(j->lp.stream, j->plan.sent, rest)) stream_complete(j);
    return; /* else stream_complete runs when the stream's turn comes */
  }
  qd_req_unreserve(c, j->lp.reserved);
  job_reply(j);
  qd_req_done_deferred(c);
}

/* Work a plan costs the thread that runs it, in bytes-equivalent: a record looked up per item,
 * and, decoded, the output plus a cache line per output row (a one-column slice touches a line
 * per row for 4 bytes of output). conn.c ends a client's turn by it (fair turns). */
#define ITEM_WORK 1024
static uint64_t job_work(const job *j, int decoded) {
  uint64_t w = ITEM_WORK * (uint64_t)(j->plan.n_items ? j->plan.n_items : 1);
  for (size_t i = 0; decoded && i < j->plan.n_items; i++) {
    const item *it = &j->plan.items[i];
    uint64_t last = it->ndim ? it->shape[it->ndim - 1] : 1;
    w += it->bytes + (last ? it->n_elem / last : 0) * 64;
  }
  return w;
}

/* ---- large get_many: planned on the pool ----------------------------------------------------
 * A get_many of more than PLAN_ON_LOOP_NAMES names, or by prefix, is planned on a pool thread
 * (a record lookup each: 60,000 names would hold the loop ~70 ms), then comes back to the loop,
 * which reserves its planned bytes and checks the memory bound as for any pool decode, and
 * queues the decode (which plans again in its own txn, like every pool job). */
#define PLAN_ON_LOOP_NAMES 64

static void plan_work_cb(uv_work_t *w) {
  job *j = (job *)w;
  qs_txn *t;
  int rc = qs_txn_begin(qd_srv.store, &t);
  if (rc) {
    job_fail(j, rc, NULL);
    return;
  }
  job_plan(j, t);
  qs_txn_end(t);
}

static void after_work_cb(uv_work_t *w, int status);
static int job_queue_decode(job *j, qd_req *r);

static void after_plan_cb(uv_work_t *w, int status) {
  job *j = (job *)w;
  qd_conn *c = j->req.conn;
  job_canceled(j, status);
  if (!j->plan.err && qd_mem_over()) j->plan.err = mem_busy(j->req.msg, sizeof j->req.msg);
  if (!j->plan.err) {
    j->lp.reserved = j->plan.total;
    qd_req_reserve(c, j->lp.reserved);
    if (job_queue_decode(j, &j->req) == 0) return; /* after_work_cb answers */
    qd_req_unreserve(c, j->lp.reserved);
    j->plan.err = QINS_EINTERNAL;
  }
  job_reply(j);
  qd_req_done_deferred(c);
}

static int job_queue_decode(job *j, qd_req *r) {
  int rc = uv_queue_work(qd_srv.loop, &j->work, work_cb, after_work_cb);
  if (rc) snprintf(r->msg, sizeof r->msg, "cannot queue the decode of %s: %s", j->ask.model, uv_strerror(rc));
  return rc;
}

__attribute__((hot))
int qd_job_start(qd_req *r, qd_ask *a) {
  job *j = job_of(a);
  memcpy(&j->req, r, offsetof(qd_req, msg)); /* msg: 1.2 KB, empty here (no error yet) */
  j->req.msg[0] = '\0';
  j->req.params.p = j->req.params.end = NULL; /* the request bytes go when this returns */
  j->req.n_keys = 0;
  if (a->many && (a->by_prefix || a->n_names > PLAN_ON_LOOP_NAMES)) {
    qd_srv.st.pool_decodes++;
    qd_srv.st.pool_plans++;
    qd_srv.jb.work += ITEM_WORK;
    qd_req_defer(r, 0);
    int rc = uv_queue_work(qd_srv.loop, &j->work, plan_work_cb, after_plan_cb);
    if (rc) {
      qd_req_done_deferred(r->conn);
      snprintf(r->msg, sizeof r->msg, "cannot queue the plan of %s: %s", a->model, uv_strerror(rc));
      job_free(j);
      return QINS_EINTERNAL;
    }
    return 0;
  }
  if (job_run(j, 1) == RUN_DONE) {
    qd_srv.st.inline_decodes++;
    qd_srv.jb.work += job_work(j, !j->plan.err);
    job_reply(j);
    return 0;
  }
  qd_srv.jb.work += job_work(j, 0); /* planned here; decoded on the pool */
  if (qd_mem_over()) { /* the global bound (stats.c): a large answer waits for no one */
    job_free(j);
    return mem_busy(r->msg, sizeof r->msg);
  }
  qd_srv.st.pool_decodes++;
  /* Stream whole tensors or row ranges that are large: sending starts with the first piece. */
  int stream = !a->many && j->plan.n_items == 1 && qd_srv.cfg.stream_min_bytes &&
               j->plan.total >= qd_srv.cfg.stream_min_bytes && j->plan.items[0].t.ndim >= 1 &&
               (!a->has_slice || a->slice.ndim <= 1);
  if (stream && !(j->lp.stream = qd_stream_open(r, stream_complete, j))) {
    job_free(j);
    snprintf(r->msg, sizeof r->msg, "out of memory starting the answer of %s", a->model);
    return QINS_ENOMEM;
  }
  j->lp.reserved = j->plan.total;
  qd_req_defer(r, j->lp.reserved);
  int rc = uv_queue_work(qd_srv.loop, &j->work, work_cb, after_work_cb);
  if (rc) {
    qd_req_unreserve(r->conn, j->lp.reserved);
    qd_req_done_deferred(r->conn);
    snprintf(r->msg, sizeof r->msg, "cannot queue the decode of %s: %s", a->model, uv_strerror(rc));
    if (j->lp.stream) qd_stream_close(j->lp.stream, 0);
    job_free(j);
    return QINS_EINTERNAL;
  }
  return 0;
}
