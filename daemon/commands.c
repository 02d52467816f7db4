/* SPDX-License-Identifier: MIT */
/*
 * commands.c — qinsd's methods: one static table (name, flags, handler, params, summary) read by
 * dispatch (server.c) and `qinsd --methods`; a test checks each name has its section in
 * docs/PROTOCOL.md §4. Every handler runs on the loop thread and either replies (qd_reply /
 * qd_reply_err), returns an error code with r->msg set, or defers a decode to the thread pool.
 *
 * Store access: one short LMDB read txn per request step, begun and ended on the thread that uses
 * it (the env is MDB_NOTLS). `get`/`get_many` plan and decode in one txn when the output is at most
 * inline-decode-bytes; otherwise the plan's txn is ended and a pool job plans again and decodes in
 * its own txn, so a model replaced in between is served consistently from the newer snapshot.
 * No txn is ever held while a client is slow: the reply is queued after qs_txn_end.
 *
 * Payload path: a small get is decoded on the loop thread into a static buffer right after its
 * hand-packed head and written with one call (job_reply, qd_reply_copy); other answers send the
 * decoded buffer (qd_buf_get) as its own iovec after a bin header packed in the small response
 * head, never copied into an sbuffer. A streamed get (a large tensor or row range) is written by
 * its pool worker straight to the socket (job_decode_stream, qd_direct_begin): stored bytes that
 * are the answer (f32 stored, f32 asked) go from the store's map to the socket with no copy of
 * ours; coded ones are decoded in cache-sized pieces, each sent while still in cache. The worker
 * waits for the client no longer than a budget; then the rest is decoded into a buffer that the
 * loop sends, and the txn ends, so a slow client holds neither a pool thread nor a snapshot.
 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "qinsd.h"

#define ITEM_OVERHEAD 600 /* generous bound on the msgpack bytes around one tensor in a response */

static const char *const src_dtype_names[QS_DT_COUNT] = {
  "f32", "f16", "bf16", "f64", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64", "bool"};
static const uint8_t src_dtype_size[QS_DT_COUNT] = {4, 2, 2, 8, 1, 1, 2, 2, 4, 4, 8, 8, 1};

static const char *src_dtype_name(qs_dtype d) {
  return (unsigned)d < QS_DT_COUNT && src_dtype_names[d] ? src_dtype_names[d] : qs_dtype_name(d);
}
static const char *codec_name(int codec) {
  return codec == QS_RAW ? "raw" : qc_codec_name((qc_codec)codec);
}
static const char *out_dtype_names[] = {"f32", "f16", "bf16"};

/* ---- parameter helpers ------------------------------------------------------------------------ */
static void init_packer(msgpack_sbuffer *sb, msgpack_packer *pk) {
  msgpack_sbuffer_init(sb);
  msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
}

/* As init_packer, with a small first buffer for a response head that is a few hundred bytes: the
 * sbuffer's default first allocation (8 KiB) is too large for malloc's per-thread cache, and a
 * head per request is allocated here and freed after its write. Grows like any sbuffer. */
#define SMALL_HEAD 512
static void init_packer_small(msgpack_sbuffer *sb, msgpack_packer *pk) {
  init_packer(sb, pk);
  sb->data = malloc(SMALL_HEAD);
  sb->alloc = sb->data ? SMALL_HEAD : 0;
}

/* Params are read in place from the request bytes, which qp_scan has already validated (every
 * declared length and count fits the message, nesting is bounded), so qp_rd_* cannot run off it.
 * The value of str key `key` in the params map: 1 with *v at it, or 0 when params is [] or the key
 * is absent. The first matching key wins (as qp_map_get did); non-str keys are skipped. */
static int param_find(const qd_req *r, const char *key, qp_rd *v) {
  if (!r->params.p) return 0;
  size_t kl = strlen(key);
  if (r->n_keys >= 0) { /* the map was indexed once at dispatch (qd_req_index_params) */
    for (int i = 0; i < r->n_keys; i++)
      if (r->keys[i].kl == kl && memcmp(r->keys[i].k, key, kl) == 0) {
        v->p = r->keys[i].v;
        v->end = r->params.end;
        return 1;
      }
    return 0;
  }
  qp_rd rd = r->params;
  uint32_t n;
  if (qp_rd_map(&rd, &n)) return 0;
  for (uint32_t i = 0; i < n; i++) {
    const char *k;
    uint32_t len;
    if (qp_rd_str(&rd, &k, &len) == 0) {
      if (len == kl && memcmp(k, key, kl) == 0) {
        *v = rd;
        return 1;
      }
    } else if (qp_rd_skip(&rd)) {
      return 0;
    }
    if (qp_rd_skip(&rd)) return 0;
  }
  return 0;
}

static int rd_is_str(const qp_rd *v) {
  qp_rd t = *v;
  const char *s;
  uint32_t n;
  return qp_rd_str(&t, &s, &n) == 0;
}

/* Reads a str into dst (cap bytes incl. NUL): 0, or QINS_EBAD_PARAMS if it is not a str, does
 * not fit or holds a NUL (the cursor then may have moved). Like qp_obj_cstr. */
static int rd_cstr(qp_rd *v, char *dst, size_t cap) {
  const char *s;
  uint32_t n;
  if (qp_rd_str(v, &s, &n) || n >= cap || memchr(s, 0, n)) return QINS_EBAD_PARAMS;
  memcpy(dst, s, n);
  dst[n] = '\0';
  return 0;
}

/* A required or optional str parameter into dst. */
static int param_str(qd_req *r, const char *key, int required, char *dst, size_t cap) {
  qp_rd v;
  dst[0] = '\0';
  if (!param_find(r, key, &v)) {
    if (!required) return 1;
    snprintf(r->msg, sizeof r->msg, "missing parameter \"%s\" (a str)", key);
    return QINS_EBAD_PARAMS;
  }
  if (!rd_is_str(&v)) {
    snprintf(r->msg, sizeof r->msg, "parameter \"%s\" must be a str", key);
    return QINS_EBAD_PARAMS;
  }
  if (rd_cstr(&v, dst, cap)) {
    snprintf(r->msg, sizeof r->msg, "parameter \"%s\" is too long (max %zu bytes) or holds a NUL",
             key, cap - 1);
    return QINS_EBAD_PARAMS;
  }
  return 0;
}

static int param_uint(qd_req *r, const char *key, uint64_t def, uint64_t *out) {
  qp_rd v;
  *out = def;
  if (!param_find(r, key, &v)) return 0;
  if (qp_rd_uint(&v, out)) {
    snprintf(r->msg, sizeof r->msg, "parameter \"%s\" must be an unsigned integer", key);
    return QINS_EBAD_PARAMS;
  }
  return 0;
}

static int param_dtype(qd_req *r, int *dt, int *given) {
  char s[16];
  int rc = param_str(r, "dtype", 0, s, sizeof s);
  *dt = QC_DT_F32;
  *given = 0;
  if (rc == 1) return 0;
  qp_rd v;
  if (rc == QINS_EBAD_PARAMS && param_find(r, "dtype", &v) && rd_is_str(&v)) {
    snprintf(r->msg, sizeof r->msg, "unsupported dtype (f32, f16 or bf16)");
    return QINS_EDTYPE;
  }
  if (rc) return rc;
  for (int i = 0; i < 3; i++)
    if (strcmp(s, out_dtype_names[i]) == 0) {
      *dt = i;
      *given = 1;
      return 0;
    }
  snprintf(r->msg, sizeof r->msg, "unsupported dtype \"%s\" (f32, f16 or bf16)", s);
  return QINS_EDTYPE;
}

static int param_slice(qd_req *r, qs_slice *sl, int *has) {
  qp_rd v;
  uint32_t nr;
  *has = 0;
  memset(sl, 0, sizeof *sl);
  if (!param_find(r, "slice", &v) || qp_rd_is_nil(&v)) return 0;
  if (qp_rd_array(&v, &nr)) {
    snprintf(r->msg, sizeof r->msg, "parameter \"slice\" must be an array of [start, stop]");
    return QINS_EBAD_PARAMS;
  }
  if (nr > qd_cfg.max_ranges) {
    snprintf(r->msg, sizeof r->msg, "slice has %u ranges; at most %llu are allowed",
             nr, (unsigned long long)qd_cfg.max_ranges);
    return QINS_EBAD_SLICE;
  }
  for (uint32_t i = 0; i < nr; i++) {
    uint32_t ne;
    if (qp_rd_array(&v, &ne) || ne != 2 || qp_rd_uint(&v, &sl->start[i]) ||
        qp_rd_uint(&v, &sl->stop[i])) {
      snprintf(r->msg, sizeof r->msg, "slice range %u must be [start, stop] of unsigned integers", i);
      return QINS_EBAD_PARAMS;
    }
    if (sl->start[i] > sl->stop[i]) {
      snprintf(r->msg, sizeof r->msg, "slice range %u is reversed: [%llu, %llu)", i,
               (unsigned long long)sl->start[i], (unsigned long long)sl->stop[i]);
      return QINS_EBAD_SLICE;
    }
  }
  sl->ndim = (int)nr;
  *has = 1;
  return 0;
}

static void pack_info(msgpack_packer *pk, const qs_tensor *t) {
  msgpack_pack_map(pk, 8);
  qp_pack_cstr(pk, "name");
  qp_pack_cstr(pk, t->name);
  qp_pack_cstr(pk, "codec");
  qp_pack_cstr(pk, codec_name(t->codec));
  qp_pack_cstr(pk, "src_dtype");
  qp_pack_cstr(pk, src_dtype_name(t->src_dtype));
  qp_pack_cstr(pk, "shape");
  msgpack_pack_array(pk, (size_t)t->ndim);
  for (int i = 0; i < t->ndim; i++) msgpack_pack_uint64(pk, t->shape[i]);
  qp_pack_cstr(pk, "n_elem");
  msgpack_pack_uint64(pk, t->n_elem);
  qp_pack_cstr(pk, "src_bytes");
  msgpack_pack_uint64(pk, t->src_bytes);
  qp_pack_cstr(pk, "stored_bytes");
  msgpack_pack_uint64(pk, t->stored_bytes);
  qp_pack_cstr(pk, "snr_db");
  msgpack_pack_double(pk, t->snr_db);
}

/* Store error -> reply code and message naming the object. */
static int store_err(qd_req *r, int rc, const char *model, const char *name) {
  const char *why = qs_error();
  if (rc == QINS_ENO_MODEL)
    snprintf(r->msg, sizeof r->msg, "no model \"%s\"", model);
  else if (rc == QINS_ENO_TENSOR)
    snprintf(r->msg, sizeof r->msg, "no tensor \"%s\" in model \"%s\"", name ? name : "", model);
  else
    snprintf(r->msg, sizeof r->msg, "%s/%s: %s%s%s", model, name ? name : "", qins_strerror(rc),
             why && *why ? ": " : "", why ? why : "");
  if (rc > -1000) rc = QINS_EINTERNAL; /* errno values do not cross the wire */
  return rc;
}

/* ---- hello, ping, stats, shutdown ------------------------------------------------------------ */
static int m_hello(qd_req *r) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  msgpack_pack_map(&pk, 7);
  qp_pack_cstr(&pk, "protocol");
  msgpack_pack_uint32(&pk, QP_PROTOCOL_VERSION);
  qp_pack_cstr(&pk, "server");
  qp_pack_cstr(&pk, QD_SERVER_NAME);
  qp_pack_cstr(&pk, "max_request_bytes");
  msgpack_pack_uint64(&pk, qd_cfg.max_request_bytes);
  qp_pack_cstr(&pk, "max_response_bytes");
  msgpack_pack_uint64(&pk, qd_cfg.max_response_bytes);
  qp_pack_cstr(&pk, "max_connections");
  msgpack_pack_uint64(&pk, qd_cfg.max_connections);
  qp_pack_cstr(&pk, "max_ranges");
  msgpack_pack_uint64(&pk, qd_cfg.max_ranges);
  qp_pack_cstr(&pk, "dtypes");
  msgpack_pack_array(&pk, 3);
  for (int i = 0; i < 3; i++) qp_pack_cstr(&pk, out_dtype_names[i]);
  qd_reply(r, &sb, NULL);
  return 0;
}

static int m_ping(qd_req *r) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  qp_pack_cstr(&pk, "pong");
  qd_reply(r, &sb, NULL);
  return 0;
}

static int m_stats(qd_req *r) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  double p50, p99;
  qd_latency_quantiles(&p50, &p99);
  msgpack_pack_map(&pk, 18);
  qp_pack_cstr(&pk, "uptime_s");
  msgpack_pack_uint64(&pk, (qd_now_ns() - qd_st.start_ns) / 1000000000ull);
  qp_pack_cstr(&pk, "connections");
  msgpack_pack_uint64(&pk, qd_st.connections);
  qp_pack_cstr(&pk, "connections_total");
  msgpack_pack_uint64(&pk, qd_st.connections_total);
  qp_pack_cstr(&pk, "connections_refused");
  msgpack_pack_uint64(&pk, qd_st.connections_refused);
  qp_pack_cstr(&pk, "connections_denied");
  msgpack_pack_uint64(&pk, qd_st.connections_denied);
  qp_pack_cstr(&pk, "requests_total");
  msgpack_pack_uint64(&pk, qd_st.requests);
  qp_pack_cstr(&pk, "requests");
  msgpack_pack_map(&pk, (size_t)qd_n_methods);
  for (int i = 0; i < qd_n_methods; i++) {
    qp_pack_cstr(&pk, qd_methods[i].name);
    msgpack_pack_uint64(&pk, qd_st.per_method[i]);
  }
  qp_pack_cstr(&pk, "errors");
  size_t ne = 0;
  for (int i = 0; i < QD_ERR_SLOTS; i++) ne += qd_st.errors[i] != 0;
  msgpack_pack_map(&pk, ne);
  for (int i = 0; i < QD_ERR_SLOTS; i++)
    if (qd_st.errors[i]) {
      qp_pack_cstr(&pk, qins_err_name(-1000 - i));
      msgpack_pack_uint64(&pk, qd_st.errors[i]);
    }
  qp_pack_cstr(&pk, "bytes_served");
  msgpack_pack_uint64(&pk, qd_st.bytes_served);
  qp_pack_cstr(&pk, "decode_ns");
  msgpack_pack_uint64(&pk, atomic_load(&qd_st.decode_ns));
  qp_pack_cstr(&pk, "inline_decodes");
  msgpack_pack_uint64(&pk, qd_st.inline_decodes);
  qp_pack_cstr(&pk, "pool_decodes");
  msgpack_pack_uint64(&pk, qd_st.pool_decodes);
  qp_pack_cstr(&pk, "paused_reads");
  msgpack_pack_uint64(&pk, qd_st.paused_reads);
  qp_pack_cstr(&pk, "reads_yielded");
  msgpack_pack_uint64(&pk, qd_st.reads_yielded);
  qp_pack_cstr(&pk, "queued_bytes");
  msgpack_pack_uint64(&pk, qd_st.queued_bytes);
  qp_pack_cstr(&pk, "queued_peak");
  msgpack_pack_uint64(&pk, qd_st.queued_peak);
  qp_pack_cstr(&pk, "latency_p50_us");
  msgpack_pack_double(&pk, p50);
  qp_pack_cstr(&pk, "latency_p99_us");
  msgpack_pack_double(&pk, p99);
  qd_reply(r, &sb, NULL);
  return 0;
}

static int m_shutdown(qd_req *r) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  msgpack_pack_true(&pk);
  qd_reply(r, &sb, NULL);
  qd_log(QD_LOG_NOTICE, "%s asked for shutdown", qd_conn_desc(r->conn));
  qd_shutdown_begin("shutdown method");
  return 0;
}

/* ---- models, list, info --------------------------------------------------------------------- */
typedef struct walk {
  msgpack_packer *pk; /* packs the items */
  uint64_t n;         /* items packed */
  uint64_t total;     /* items seen */
  uint64_t offset, limit;
} walk;

static int model_cb(void *ud, const qs_model *m) {
  walk *w = ud;
  msgpack_packer *pk = w->pk;
  msgpack_pack_map(pk, 6);
  qp_pack_cstr(pk, "name");
  qp_pack_cstr(pk, m->name);
  qp_pack_cstr(pk, "tensors");
  msgpack_pack_uint64(pk, m->n_tensors);
  qp_pack_cstr(pk, "n_elem");
  msgpack_pack_uint64(pk, m->n_elem);
  qp_pack_cstr(pk, "src_bytes");
  msgpack_pack_uint64(pk, m->src_bytes);
  qp_pack_cstr(pk, "stored_bytes");
  msgpack_pack_uint64(pk, m->stored_bytes);
  qp_pack_cstr(pk, "created");
  msgpack_pack_uint64(pk, m->created > 0 ? (uint64_t)m->created : 0);
  w->n++;
  return 0;
}

static int m_models(qd_req *r) {
  qs_txn *t;
  int rc = qs_txn_begin(qd_store, &t);
  if (rc) return store_err(r, rc, "", NULL);
  msgpack_sbuffer body;
  msgpack_packer bpk;
  init_packer(&body, &bpk);
  walk w = {.pk = &bpk};
  rc = qs_models_each(t, model_cb, &w);
  qs_txn_end(t);
  if (rc) {
    msgpack_sbuffer_destroy(&body);
    return store_err(r, rc, "*", NULL);
  }
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  msgpack_pack_array(&pk, (size_t)w.n);
  msgpack_sbuffer_write(&sb, body.data, body.size);
  msgpack_sbuffer_destroy(&body);
  qd_reply(r, &sb, NULL);
  return 0;
}

static int list_cb(void *ud, const qs_tensor *t) {
  walk *w = ud;
  if (w->total >= w->offset && w->n < w->limit) {
    pack_info(w->pk, t);
    w->n++;
  }
  w->total++;
  return 0;
}

static int m_list(qd_req *r) {
  char model[QS_MAX_NAME + 1], prefix[QS_MAX_NAME + 1];
  int rc = param_str(r, "model", 1, model, sizeof model);
  if (rc) return rc;
  if ((rc = param_str(r, "prefix", 0, prefix, sizeof prefix)) < 0) return rc;
  walk w = {0};
  if ((rc = param_uint(r, "offset", 0, &w.offset))) return rc;
  if ((rc = param_uint(r, "limit", 1000, &w.limit))) return rc;
  if (w.limit > 100000) w.limit = 100000; /* keeps one reply bounded */
  qs_txn *t;
  if ((rc = qs_txn_begin(qd_store, &t))) return store_err(r, rc, model, NULL);
  msgpack_sbuffer body;
  msgpack_packer bpk;
  init_packer(&body, &bpk);
  w.pk = &bpk;
  qs_model mi;
  rc = qs_model_get(t, model, &mi);
  if (rc == 0) rc = qs_tensors_each(t, model, prefix, list_cb, &w);
  qs_txn_end(t);
  if (rc) {
    msgpack_sbuffer_destroy(&body);
    return store_err(r, rc, model, NULL);
  }
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  msgpack_pack_map(&pk, 2);
  qp_pack_cstr(&pk, "total");
  msgpack_pack_uint64(&pk, w.total);
  qp_pack_cstr(&pk, "tensors");
  msgpack_pack_array(&pk, (size_t)w.n);
  msgpack_sbuffer_write(&sb, body.data, body.size);
  msgpack_sbuffer_destroy(&body);
  qd_reply(r, &sb, NULL);
  return 0;
}

static int m_info(qd_req *r) {
  char model[QS_MAX_NAME + 1], name[QS_MAX_NAME + 1];
  int rc = param_str(r, "model", 1, model, sizeof model);
  if (rc || (rc = param_str(r, "name", 1, name, sizeof name))) return rc;
  qs_txn *t;
  if ((rc = qs_txn_begin(qd_store, &t))) return store_err(r, rc, model, name);
  qs_tensor ten;
  rc = qs_tensor_get(t, model, name, &ten);
  qs_txn_end(t);
  if (rc) return store_err(r, rc, model, name);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer(&sb, &pk);
  qp_pack_response_ok(&pk, r->msgid);
  pack_info(&pk, &ten);
  qd_reply(r, &sb, NULL);
  return 0;
}

/* ---- get, get_many ---------------------------------------------------------------------------- */
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
  uv_work_t work;                /* pool request */
  int many;                      /* get_many */
  char model[QS_MAX_NAME + 1];
  char name[QS_MAX_NAME + 1];    /* get */
  char prefix[QS_MAX_NAME + 1];  /* get_many by prefix */
  int by_prefix;
  char (*names)[QS_MAX_NAME + 1]; /* get_many by names */
  uint32_t n_names;
  qs_slice slice;                /* get */
  int has_slice;
  int dt, dt_given;              /* output dtype */
  item *items;
  size_t n_items, cap_items;
  uint64_t total;                /* payload bytes */
  uint64_t cost;                 /* estimated bytes touched to decode: decides inline vs pool */
  void *payload;                 /* qd_buf_get, or inside `scratch` (borrowed) */
  size_t payload_cap;
  int borrowed;                  /* payload is in scratch: not released, answered by job_reply */
  int on_loop;                   /* job_run runs on the loop thread (may borrow scratch) */
  int err;                       /* 0 or a wire code; msg in req.msg */
  uint64_t reserved;             /* bytes counted against the client's queue while deferred */
  /* Streaming (a large single get), job_decode_stream: the worker packs the head, checks the
   * first piece, asks the loop for the socket (async; grant under mu) and, once granted, writes
   * head and payload to it itself; what it could not write within its budget (or everything,
   * without a socket) goes into `payload` for the loop to send: response bytes [done, end). */
  int stream;                    /* this job streams */
  uv_async_t async;              /* worker -> loop: the worker wants the socket */
  uv_mutex_t mu;                 /* guards grant, fd */
  uv_cond_t cv;                  /* signalled when grant changes from G_WANT */
  int grant;                     /* G_* (below) */
  int fd;                        /* the socket, when grant == G_FD */
  uint8_t head[128];             /* the response head (pack_get_head) */
  size_t head_len;
  uint64_t done;                 /* response bytes the worker wrote itself (head first) */
  uint64_t rest_skip;            /* bytes at the start of `payload` already written */
  int gone;                      /* the worker's write failed: the client left or was cut */
  int direct;                    /* qd_direct_begin gave the socket (loop) */
  int owner;                     /* the stream owns the connection's socket (loop) */
  int waiting;                   /* queued behind another stream of the connection (loop) */
  int work_ended;                /* the worker finished (loop) */
  int writes_out;                /* stream writes not finished (loop) */
  int work_done, async_closed;   /* lifetime: freed when both are set and writes_out == 0 */
  qd_req req;                    /* copy of the request (params cleared): last, as job_new and
                                    start_job skip its 1.2 KB message buffer */
} job;

/* grant: G_WANT the worker waits for the socket; G_FD granted (fd); G_NOSOCK none (the connection
 * is closing, or embedded); G_GAVEUP the worker stopped waiting (budget) and buffers everything. */
enum { G_NONE = 0, G_WANT, G_FD, G_NOSOCK, G_GAVEUP };

/* One freed job (with its items array, if small) is kept for the next request: a small get then
 * costs no malloc of the job (about 3 KiB) or of its plan. Jobs are made and freed on the loop
 * thread only (pool threads run job_run on a job they do not free). */
#define JOB_SPARE_ITEMS 8 /* items array kept with the spare job: enough for a get */
static job *job_spare;

static job *job_new(void) {
  job *j = job_spare;
  if (!j) return calloc(1, sizeof(job));
  job_spare = NULL;
  item *items = j->items;
  size_t cap = j->cap_items;
  memset(j, 0, offsetof(job, req)); /* req is set by start_job */
  j->items = items;
  j->cap_items = cap;
  return j;
}

static void job_free(job *j) {
  if (!j) return;
  free(j->names);
  if (!j->borrowed) qd_buf_release(j->payload, j->payload_cap);
  if (j->stream) {
    uv_cond_destroy(&j->cv);
    uv_mutex_destroy(&j->mu);
  }
  if (!job_spare && j->cap_items <= JOB_SPARE_ITEMS) {
    job_spare = j;
    return;
  }
  free(j->items);
  free(j);
}

static int job_fail(job *j, int rc, const char *name) {
  j->err = store_err(&j->req, rc, j->model, name);
  return j->err;
}

/* The next free item (items grown if needed), or NULL (out of memory; err set). */
static item *job_slot(job *j) {
  if (j->n_items == j->cap_items) {
    size_t nc = j->cap_items ? j->cap_items * 2 : 4;
    item *ni = realloc(j->items, nc * sizeof *ni);
    if (!ni) {
      snprintf(j->req.msg, sizeof j->req.msg, "out of memory planning %s", j->model);
      j->err = QINS_ENOMEM;
      return NULL;
    }
    j->items = ni;
    j->cap_items = nc;
  }
  return &j->items[j->n_items];
}

/* Adds tensor t to the plan: output shape, dtype and bytes; checks the response limit. t may
 * already be the next slot's record (job_slot), read there to save a copy. */
static int job_add(job *j, const qs_tensor *t) {
  item *it = job_slot(j);
  if (!it) return j->err;
  if (&it->t != t) it->t = *t; /* the rest of the item is set below */
  const qs_slice *sl = j->has_slice ? &j->slice : NULL;
  if (sl) {
    if (sl->ndim > t->ndim) {
      snprintf(j->req.msg, sizeof j->req.msg, "slice has %d ranges but %s/%s has %d dimensions",
               sl->ndim, j->model, t->name, t->ndim);
      return j->err = QINS_EBAD_SLICE;
    }
    for (int d = 0; d < sl->ndim; d++)
      if (sl->stop[d] > t->shape[d]) {
        snprintf(j->req.msg, sizeof j->req.msg,
                 "slice range %d [%llu, %llu) is out of range for dimension %llu of %s/%s", d,
                 (unsigned long long)sl->start[d], (unsigned long long)sl->stop[d],
                 (unsigned long long)t->shape[d], j->model, t->name);
        return j->err = QINS_EBAD_SLICE;
      }
  }
  int rc = qs_slice_shape(t, sl, it->shape, &it->n_elem);
  if (rc) {
    snprintf(j->req.msg, sizeof j->req.msg, "%s/%s: %s", j->model, t->name, qs_error());
    return j->err = rc < -999 ? rc : QINS_EBAD_SLICE;
  }
  it->ndim = t->ndim;
  uint64_t esize;
  if (t->codec == QS_RAW) {
    if (j->dt_given) {
      snprintf(j->req.msg, sizeof j->req.msg,
               "%s/%s is a raw %s tensor: it is served only as stored (omit dtype)", j->model,
               t->name, src_dtype_name(t->src_dtype));
      return j->err = QINS_EDTYPE;
    }
    esize = (unsigned)t->src_dtype < QS_DT_COUNT ? src_dtype_size[t->src_dtype] : 1;
    it->dtype = src_dtype_name(t->src_dtype);
  } else {
    esize = qc_dtype_size((qc_dtype)j->dt);
    it->dtype = out_dtype_names[j->dt];
  }
  if (it->n_elem > UINT64_MAX / esize) {
    snprintf(j->req.msg, sizeof j->req.msg, "%s/%s: response size overflows", j->model, t->name);
    return j->err = QINS_ERESPONSE_TOO_LARGE;
  }
  it->bytes = it->n_elem * esize;
  j->cost += it->bytes; /* chunk checksums are verified once per process (store.h): the decode's
                           output is the cost that repeats */
  it->off = j->total;
  j->total += it->bytes;
  j->n_items++;
  uint64_t resp = j->total + ITEM_OVERHEAD * (uint64_t)j->n_items;
  if (resp > qd_cfg.max_response_bytes) {
    snprintf(j->req.msg, sizeof j->req.msg,
             "%s/%s: the response would be over %llu bytes, above max_response_bytes %llu: "
             "request a slice",
             j->model, t->name, (unsigned long long)resp,
             (unsigned long long)qd_cfg.max_response_bytes);
    return j->err = QINS_ERESPONSE_TOO_LARGE;
  }
  return 0;
}

static int prefix_cb(void *ud, const qs_tensor *t) {
  job *j = ud;
  return job_add(j, t) ? 1 : 0;
}

/* Plans the job in txn t (fills items). */
static int job_plan(job *j, qs_txn *t) {
  j->n_items = 0;
  j->total = 0;
  j->cost = 0;
  j->err = 0;
  int rc;
  if (!j->many) { /* read straight into the item: a tensor record is 1.2 KB */
    item *it = job_slot(j);
    if (!it) return j->err;
    if ((rc = qs_tensor_get(t, j->model, j->name, &it->t))) return job_fail(j, rc, j->name);
    return job_add(j, &it->t);
  }
  if (j->by_prefix) {
    qs_model m;
    if ((rc = qs_model_get(t, j->model, &m))) return job_fail(j, rc, NULL);
    rc = qs_tensors_each(t, j->model, j->prefix, prefix_cb, j);
    if (j->err) return j->err;
    if (rc) return job_fail(j, rc, j->prefix);
    return 0;
  }
  for (uint32_t i = 0; i < j->n_names; i++) {
    qs_tensor ten;
    if ((rc = qs_tensor_get(t, j->model, j->names[i], &ten))) return job_fail(j, rc, j->names[i]);
    if ((rc = job_add(j, &ten))) return rc;
  }
  return 0;
}

/* How long in all a streaming worker may wait for the socket (its turn on the connection, then
 * room in it) before the rest goes into a buffer of its own: STREAM_WAIT_NS plus 1 ns a byte. */
#define STREAM_WAIT_NS 20000000ull

static size_t pack_get_head(uint8_t *out, uint32_t msgid, const item *it);

/* Sends n bytes at buf on the granted socket, waiting for room (poll) until deadline; *done counts
 * what went. 0: all sent; 1: the deadline passed; -1: the socket failed (errno). */
static int direct_send(int fd, const void *buf, size_t n, uint64_t deadline, uint64_t *done) {
  const char *p = buf;
  while (n) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= (size_t)k;
      *done += (uint64_t)k;
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k == 0) errno = EPIPE;
    if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) return -1;
    uint64_t now = qd_now_ns();
    if (now >= deadline) return 1;
    struct pollfd pf = {fd, POLLOUT, 0};
    int r = poll(&pf, 1, (int)((deadline - now + 999999) / 1000000));
    if (r < 0 && errno != EINTR) return -1;
    if (r > 0 && (pf.revents & POLLNVAL)) {
      errno = EBADF;
      return -1;
    }
  }
  return 0;
}

/* Asks the loop for the socket (stream_grant) and waits for the answer until deadline. */
static int stream_ask(job *j, uint64_t deadline) {
  uv_mutex_lock(&j->mu);
  j->grant = G_WANT;
  uv_mutex_unlock(&j->mu);
  uv_async_send(&j->async);
  uv_mutex_lock(&j->mu);
  while (j->grant == G_WANT) {
    uint64_t now = qd_now_ns();
    if (now >= deadline || (uv_cond_timedwait(&j->cv, &j->mu, deadline - now) != 0 &&
                            j->grant == G_WANT))
      j->grant = G_GAVEUP;
  }
  int g = j->grant;
  uv_mutex_unlock(&j->mu);
  return g;
}

/* Streams the single planned item (job struct above). Output elements are sent as zero-copy
 * spans of the map when the stored bytes are the answer (qs_tensor_span), else decoded in pieces
 * of stream-piece-bytes into a buffer that stays in cache until the socket copy reads it. The
 * first piece is checked before anything is sent: an error in it is still an ordinary reply. */
static int job_decode_stream(job *j, qs_txn *t) {
  uint64_t dec = 0, d0; /* dec: time in the store's reads (decode_ns) */
  item *it = &j->items[0];
  const qs_slice *sl = j->has_slice ? &j->slice : NULL;
  const qc_dtype dt = (qc_dtype)j->dt;
  const uint64_t deadline = qd_now_ns() + STREAM_WAIT_NS + j->total;
  const uint64_t esize = it->n_elem ? it->bytes / it->n_elem : 1;
  uint64_t piece = qd_cfg.stream_piece_bytes / esize;
  if (piece == 0) piece = 1;
  j->head_len = pack_get_head(j->head, j->req.msgid, it);
  char *buf = NULL; /* decode pieces */
  size_t buf_cap = 0;
  const void *span = NULL; /* or the zero-copy span at p */
  uint64_t p = 0, n = 0;   /* output elements [p, p + n) are ready to send */
  int rc = 0, zero_copy = 0;
  if (it->n_elem) {
    d0 = qd_now_ns();
    rc = qs_tensor_span(t, &it->t, sl, dt, 0, it->n_elem, &span, &n);
    dec += qd_now_ns() - d0;
    if (rc < 0) return job_fail(j, rc, it->t.name);
    zero_copy = rc == 1;
    if (!zero_copy) {
      n = piece < it->n_elem ? piece : it->n_elem;
      buf = qd_buf_get((size_t)(n * esize), &buf_cap);
      if (!buf) {
        snprintf(j->req.msg, sizeof j->req.msg, "cannot allocate %llu bytes for %s/%s",
                 (unsigned long long)(n * esize), j->model, it->t.name);
        return j->err = QINS_ENOMEM;
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
  int g = stream_ask(j, deadline);
  int fd = j->fd;
  if (g == G_FD) {
    int sr = direct_send(fd, j->head, j->head_len, deadline, &j->done);
    while (sr == 0 && p < it->n_elem) {
      const void *src = zero_copy ? span : buf;
      sr = direct_send(fd, src, (size_t)(n * esize), deadline, &j->done);
      if (sr) break;
      p += n;
      if (p == it->n_elem) break;
      d0 = qd_now_ns();
      if (zero_copy) {
        rc = qs_tensor_span(t, &it->t, sl, dt, p, it->n_elem, &span, &n);
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
      j->gone = 1;
      snprintf(j->req.msg, sizeof j->req.msg, "writing to the socket failed after %llu bytes: %s",
               (unsigned long long)j->done, strerror(errno));
    }
  }
  qd_buf_release(buf, buf_cap);
  /* What the worker did not write (all of it without a socket) goes into a buffer for the loop:
   * response bytes [done, head_len + total); a partly written element is decoded whole and its
   * written bytes skipped. */
  if (!j->err && !j->gone && j->done < j->head_len + j->total) {
    uint64_t from = j->done > j->head_len ? j->done - j->head_len : 0; /* payload bytes written */
    uint64_t e0 = from / esize;
    j->rest_skip = from - e0 * esize;
    if (e0 < it->n_elem) {
      j->payload = qd_buf_get((size_t)((it->n_elem - e0) * esize), &j->payload_cap);
      if (!j->payload) {
        snprintf(j->req.msg, sizeof j->req.msg, "cannot allocate %llu bytes for %s/%s",
                 (unsigned long long)((it->n_elem - e0) * esize), j->model, it->t.name);
        j->err = QINS_ENOMEM;
      } else {
        d0 = qd_now_ns();
        if ((rc = qs_tensor_read(t, &it->t, sl, dt, e0, it->n_elem, j->payload)))
          job_fail(j, rc, it->t.name);
        dec += qd_now_ns() - d0;
      }
    }
  }
  atomic_fetch_add(&qd_st.decode_ns, dec);
  return j->err;
}

/* A small get decoded on the loop thread is answered from this buffer: the head is packed right
 * before the payload, and the whole answer is usually written at once from here (qd_reply_copy),
 * so it costs no allocation. Loop thread only; used from decode to reply within one start_job. */
#define SCRATCH_HEAD 512                 /* room for a get's response head (at most ~200 bytes) */
#define SCRATCH_PAYLOAD (64u * 1024)
static char scratch[SCRATCH_HEAD + SCRATCH_PAYLOAD] __attribute__((aligned(64)));

/* Decodes the planned items in txn t into a fresh payload buffer (or scratch). */
static int job_decode(job *j, qs_txn *t) {
  uint64_t t0 = qd_now_ns();
  if (j->on_loop && !j->many && j->total <= SCRATCH_PAYLOAD) {
    j->payload = scratch + SCRATCH_HEAD;
    j->payload_cap = 0;
    j->borrowed = 1;
  } else if (j->total) {
    j->payload = qd_buf_get((size_t)j->total, &j->payload_cap);
    if (!j->payload) {
      snprintf(j->req.msg, sizeof j->req.msg, "cannot allocate %llu bytes for %s",
               (unsigned long long)j->total, j->model);
      return j->err = QINS_ENOMEM;
    }
  }
  for (size_t i = 0; i < j->n_items; i++) {
    item *it = &j->items[i];
    if (!it->n_elem) continue;
    int rc = qs_tensor_read(t, &it->t, j->has_slice ? &j->slice : NULL, (qc_dtype)j->dt, 0,
                            it->n_elem, (char *)j->payload + it->off);
    if (rc) return job_fail(j, rc, it->t.name);
  }
  atomic_fetch_add(&qd_st.decode_ns, qd_now_ns() - t0);
  return 0;
}

enum { RUN_DONE = 0, RUN_DEFER = 1 };

/* Plans and (unless deferred) decodes, in one read txn begun and ended on this thread. */
static int job_run(job *j, int on_loop) {
  j->on_loop = on_loop;
  qs_txn *t;
  int rc = qs_txn_begin(qd_store, &t);
  if (rc) {
    job_fail(j, rc, j->name);
    return RUN_DONE;
  }
  if (job_plan(j, t) == 0) {
    if (on_loop && j->cost > qd_cfg.inline_decode_bytes) {
      qs_txn_end(t);
      return RUN_DEFER;
    }
    if (j->stream) job_decode_stream(j, t);
    else job_decode(j, t);
  }
  qs_txn_end(t);
  return RUN_DONE;
}

/* One get_many tensor map up to its payload: {name, shape, dtype, data: <bin header>}. (A get's
 * head is pack_get_head's.) */
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

/* msgpack writers for pack_get_head: the smallest encoding, as msgpack-c's packers choose. */
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

/* Sends the job's answer (or error) and frees it. */
static void job_reply(job *j) {
  qd_req *r = &j->req;
  if (j->err) {
    qd_reply_err(r, j->err, "%s", r->msg);
    job_free(j);
    return;
  }
  if (j->borrowed) { /* a small get: [1, msgid, nil, head] packed before the payload, sent as one */
    uint8_t head[SCRATCH_HEAD];
    size_t hl = pack_get_head(head, r->msgid, &j->items[0]);
    char *p = (char *)j->payload - hl;
    memcpy(p, head, hl);
    qd_reply_copy(r, p, hl + (size_t)j->total);
    job_free(j);
    return;
  }
  msgpack_sbuffer sb;
  msgpack_packer pk;
  init_packer_small(&sb, &pk);
  /* A few items (every get) use the stack; get_many with more allocates. */
  size_t ends_s[JOB_SPARE_ITEMS + 1];
  uv_buf_t bufs_s[2 * JOB_SPARE_ITEMS + 1];
  int small = j->n_items <= JOB_SPARE_ITEMS;
  size_t *ends = small ? ends_s : malloc((j->n_items + 1) * sizeof *ends);
  uv_buf_t *bufs = small ? bufs_s : malloc((2 * j->n_items + 1) * sizeof *bufs);
  if (!ends || !bufs) {
    if (!small) {
      free(ends);
      free(bufs);
    }
    msgpack_sbuffer_destroy(&sb);
    qd_reply_err(r, QINS_ENOMEM, "out of memory answering %s", j->model);
    job_free(j);
    return;
  }
  if (!j->many) {
    uint8_t head[SCRATCH_HEAD];
    size_t hl = pack_get_head(head, r->msgid, &j->items[0]);
    if (msgpack_sbuffer_write(&sb, (const char *)head, hl)) { /* one item: nothing else to free */
      msgpack_sbuffer_destroy(&sb);
      qd_reply_err(r, QINS_ENOMEM, "out of memory answering %s", j->model);
      job_free(j);
      return;
    }
    ends[0] = sb.size;
  } else {
    qp_pack_response_ok(&pk, r->msgid);
    msgpack_pack_map(&pk, 1);
    qp_pack_cstr(&pk, "tensors");
    msgpack_pack_array(&pk, j->n_items);
    ends[0] = sb.size;
    for (size_t i = 0; i < j->n_items; i++) {
      pack_item_head(&pk, &j->items[i]);
      ends[i] = sb.size;
    }
  }
  /* Pieces: head[0, ends[0]), payload 0, head[ends[0], ends[1]), payload 1, ... The heads live
   * in sb's buffer, which the write owns from qd_reply on (its address does not change). */
  unsigned nb = 0;
  size_t n = j->many ? j->n_items : 1;
  for (size_t i = 0; i < n; i++) {
    if (i > 0) bufs[nb++] = uv_buf_init(sb.data + ends[i - 1], (unsigned)(ends[i] - ends[i - 1]));
    if (j->items[i].bytes)
      bufs[nb++] = uv_buf_init((char *)j->payload + j->items[i].off, (unsigned)j->items[i].bytes);
  }
  qd_payload pl = {.head_len = ends[0], .bufs = bufs, .nbufs = nb, .owned = j->payload,
                   .owned_cap = j->payload_cap};
  j->payload = NULL;
  qd_reply(r, &sb, &pl);
  if (!small) {
    free(bufs);
    free(ends);
  }
  job_free(j);
}

/* ---- streaming (loop side) ---- */
static void job_maybe_free(job *j) {
  if (j->work_done && j->async_closed && j->writes_out == 0) job_free(j);
}

static void stream_piece_done(void *ud) {
  job *j = ud;
  j->writes_out--;
  job_maybe_free(j);
}

static void stream_async_closed(uv_handle_t *h) {
  job *j = h->data;
  j->async_closed = 1;
  job_maybe_free(j);
}

static void stream_complete(job *j);
static void stream_drained(void *ud);

/* Answers the worker's request for the socket, once the stream owns it and libuv's queue is
 * empty (qd_direct_begin; stream_drained when it was not). A worker that gave up meanwhile buffers
 * everything: the socket goes back at once. */
static void stream_grant(job *j) {
  qd_conn *c = j->req.conn;
  int fd = qd_direct_begin(c, stream_drained, j);
  if (fd == -2) return;
  uv_mutex_lock(&j->mu);
  int taken = j->grant == G_WANT;
  if (taken) {
    j->grant = fd >= 0 ? G_FD : G_NOSOCK;
    j->fd = fd;
    uv_cond_signal(&j->cv);
  }
  uv_mutex_unlock(&j->mu);
  if (taken && fd >= 0) j->direct = 1;
  else if (fd >= 0) qd_direct_end(c, 0);
}

static void stream_drained(void *ud) { stream_grant(ud); }

/* The stream's turn on the connection came (it queued behind another stream). */
static void stream_wake(void *ud) {
  job *j = ud;
  j->waiting = 0;
  j->owner = 1;
  if (j->work_ended) stream_complete(j);
  else stream_grant(j);
}

/* Takes the connection's socket for this stream: 1 if owned now, 0 if stream_wake comes later. */
static int stream_own(job *j) {
  if (j->owner) return 1;
  if (j->waiting) return 0;
  if (!qd_stream_acquire(j->req.conn, stream_wake, j)) {
    j->waiting = 1;
    return 0;
  }
  j->owner = 1;
  return 1;
}

static void stream_async_cb(uv_async_t *a) {
  job *j = a->data;
  if (!j->work_ended && stream_own(j)) stream_grant(j);
}

/* The worker is done and the stream owns the socket (or needs none): the rest of the answer
 * (what the worker buffered), or its error. */
static void stream_complete(job *j) {
  qd_conn *c = j->req.conn;
  qd_req_unreserve(c, j->reserved);
  if (j->gone) { /* the client left, or the connection was cut, mid-answer */
    qd_log(QD_LOG_VERBOSE, "%s: get (msgid %u): %s; closing the connection", qd_conn_desc(c),
           j->req.msgid, j->req.msg);
    qd_stream_end(c, 1);
  } else if (j->err && j->done == 0) { /* nothing sent: an ordinary error reply */
    if (j->owner) qd_stream_end(c, 0); /* first, or the error reply would wait behind us */
    qd_reply_err(&j->req, j->err, "%s", j->req.msg);
  } else if (j->err) {
    /* The head went out: the only honest end is to close (PROTOCOL.md §4.6). */
    qd_log(QD_LOG_WARNING,
           "%s: get (msgid %u): %s: %s after %llu of %llu bytes were sent; closing the connection",
           qd_conn_desc(c), j->req.msgid, qins_err_name(j->err), j->req.msg,
           (unsigned long long)j->done, (unsigned long long)(j->head_len + j->total));
    qd_count_error(j->err);
    qd_latency_record(j->req.t0);
    qd_stream_end(c, 1);
  } else {
    char *head = NULL;
    size_t hl = 0;
    if (j->done < j->head_len) {
      hl = j->head_len - (size_t)j->done;
      head = malloc(hl);
      if (head) memcpy(head, j->head + j->done, hl);
    }
    uint64_t from = j->done > j->head_len ? j->done - j->head_len : 0; /* payload written */
    uv_buf_t piece = uv_buf_init(NULL, 0);
    if (from < j->total)
      piece = uv_buf_init((char *)j->payload + j->rest_skip, (unsigned)(j->total - from));
    if (hl && !head) {
      qd_log(QD_LOG_WARNING, "%s: out of memory finishing a get; closing", qd_conn_desc(c));
      qd_stream_end(c, 1);
    } else {
      if (hl || piece.len) {
        j->writes_out++;
        qd_stream_write(c, head, hl, piece, stream_piece_done, j);
      }
      qd_latency_record(j->req.t0);
      qd_stream_end(c, 0);
    }
  }
  j->work_done = 1;
  uv_close((uv_handle_t *)&j->async, stream_async_closed);
  qd_req_done_deferred(c); /* last: may free the connection */
}

/* The worker returned (after_work_cb). */
static void stream_finish(job *j) {
  qd_conn *c = j->req.conn;
  j->work_ended = 1;
  qd_direct_cancel(c, j); /* if stream_grant still waited for libuv's queue */
  if (j->direct) {
    j->direct = 0;
    qd_direct_end(c, j->done);
  }
  if (j->waiting) return; /* queued behind another stream: stream_wake completes it */
  /* With bytes left to send, wait for the socket; an error before anything went out, or a
   * client gone, needs no turn. */
  int rest = !j->gone && !(j->err && j->done == 0) && j->done < j->head_len + j->total;
  if (!rest || stream_own(j)) stream_complete(j);
}

static void work_cb(uv_work_t *w) {
  job *j = (job *)w;
  job_run(j, 0);
}

static void after_work_cb(uv_work_t *w, int status) {
  job *j = (job *)w;
  qd_conn *c = j->req.conn;
  if (status == UV_ECANCELED && !j->err) {
    j->err = QINS_ESHUTDOWN;
    snprintf(j->req.msg, sizeof j->req.msg, "the daemon is shutting down");
  }
  if (j->stream) {
    stream_finish(j); /* answers and releases the request slot, now or once the socket is free */
    return;
  }
  qd_req_unreserve(c, j->reserved);
  job_reply(j);
  qd_req_done_deferred(c);
}

static int start_job(qd_req *r, job *j) {
  memcpy(&j->req, r, offsetof(qd_req, msg)); /* msg: 1.2 KB, empty here (no error yet) */
  j->req.msg[0] = '\0';
  j->req.params.p = j->req.params.end = NULL; /* the request bytes go when this returns */
  j->req.n_keys = 0;
  if (job_run(j, 1) == RUN_DONE) {
    qd_st.inline_decodes++;
    job_reply(j);
    return 0;
  }
  qd_st.pool_decodes++;
  /* Stream whole tensors or row ranges that are large: sending starts with the first chunk. */
  j->stream = !j->many && j->n_items == 1 && qd_cfg.stream_min_bytes &&
              j->total >= qd_cfg.stream_min_bytes && j->items[0].t.ndim >= 1 &&
              (!j->has_slice || j->slice.ndim <= 1);
  if (j->stream) {
    uv_async_init(uv_default_loop(), &j->async, stream_async_cb);
    j->async.data = j;
    uv_mutex_init(&j->mu);
    uv_cond_init(&j->cv);
    j->fd = -1;
  }
  uint64_t reserved = j->reserved = j->total;
  qd_req_defer(r, reserved);
  int rc = uv_queue_work(uv_default_loop(), &j->work, work_cb, after_work_cb);
  if (rc) {
    qd_req_unreserve(r->conn, reserved);
    qd_req_done_deferred(r->conn);
    snprintf(r->msg, sizeof r->msg, "cannot queue the decode of %s: %s", j->model, uv_strerror(rc));
    if (j->stream) {
      j->work_done = 1;
      uv_close((uv_handle_t *)&j->async, stream_async_closed);
    } else {
      job_free(j);
    }
    return QINS_EINTERNAL;
  }
  return 0;
}

static int m_get(qd_req *r) {
  job *j = job_new();
  if (!j) return QINS_ENOMEM;
  int rc;
  if ((rc = param_str(r, "model", 1, j->model, sizeof j->model)) ||
      (rc = param_str(r, "name", 1, j->name, sizeof j->name)) ||
      (rc = param_slice(r, &j->slice, &j->has_slice)) ||
      (rc = param_dtype(r, &j->dt, &j->dt_given))) {
    job_free(j);
    return rc;
  }
  return start_job(r, j);
}

static int m_get_many(qd_req *r) {
  job *j = job_new();
  if (!j) return QINS_ENOMEM;
  j->many = 1;
  int rc;
  if ((rc = param_str(r, "model", 1, j->model, sizeof j->model)) ||
      (rc = param_dtype(r, &j->dt, &j->dt_given)))
    goto fail;
  qp_rd names;
  if (param_find(r, "slice", &names)) {
    snprintf(r->msg, sizeof r->msg, "get_many takes no slice: use get for slices");
    rc = QINS_EBAD_PARAMS;
    goto fail;
  }
  int has_names = param_find(r, "names", &names);
  rc = param_str(r, "prefix", 0, j->prefix, sizeof j->prefix);
  if (rc < 0) goto fail;
  j->by_prefix = rc == 0;
  if (has_names == j->by_prefix) {
    snprintf(r->msg, sizeof r->msg, "get_many needs exactly one of \"names\" and \"prefix\"");
    rc = QINS_EBAD_PARAMS;
    goto fail;
  }
  if (has_names) {
    uint32_t nn;
    if (qp_rd_array(&names, &nn)) {
      snprintf(r->msg, sizeof r->msg, "parameter \"names\" must be an array of str");
      rc = QINS_EBAD_PARAMS;
      goto fail;
    }
    j->n_names = nn;
    j->names = calloc(j->n_names ? j->n_names : 1, sizeof *j->names);
    if (!j->names) {
      rc = QINS_ENOMEM;
      goto fail;
    }
    for (uint32_t i = 0; i < j->n_names; i++)
      if (rd_cstr(&names, j->names[i], sizeof j->names[i])) {
        snprintf(r->msg, sizeof r->msg, "names[%u] must be a str of at most %d bytes", i,
                 QS_MAX_NAME);
        rc = QINS_EBAD_PARAMS;
        goto fail;
      }
  }
  return start_job(r, j);
fail:
  job_free(j);
  return rc;
}

/* ---- the table -------------------------------------------------------------------------------- */
const qd_method qd_methods[] = {
  {"hello", QD_READONLY, m_hello, "", "protocol version, server version and limits"},
  {"ping", QD_READONLY, m_ping, "", "liveness check: \"pong\""},
  {"models", QD_READONLY, m_models, "", "the models in the store"},
  {"list", QD_READONLY, m_list, "model, prefix?, offset?, limit?", "a model's tensors"},
  {"info", QD_READONLY, m_info, "model, name", "one tensor's metadata"},
  {"get", QD_READONLY, m_get, "model, name, slice?, dtype?", "a tensor or hyperslab, decoded"},
  {"get_many", QD_READONLY, m_get_many, "model, names | prefix, dtype?",
   "several whole tensors in one round trip"},
  {"stats", QD_READONLY, m_stats, "", "connections, requests, errors, bytes, latency"},
  {"shutdown", QD_ADMIN, m_shutdown, "", "stop accepting, finish in-flight requests, exit 0"},
};
const int qd_n_methods = (int)(sizeof qd_methods / sizeof qd_methods[0]);

int qd_method_find(const char *name, size_t len) {
  for (int i = 0; i < qd_n_methods; i++)
    if (strlen(qd_methods[i].name) == len && memcmp(qd_methods[i].name, name, len) == 0) return i;
  return -1;
}
