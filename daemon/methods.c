/* SPDX-License-Identifier: MIT */
/*
 * methods.c — qinsd's methods: one static table (name, flags, handler, params, summary) read by
 * dispatch (conn.c) and `qinsd --methods`; a test checks each name has its section in
 * docs/PROTOCOL.md §4. Handlers run on the loop thread, read their params in place from the
 * request bytes, and answer through reply.h (or hand a get to a decode job, job.h); they never
 * see a socket. Store access: one short LMDB read txn per request step, ended before the reply is
 * queued, so no txn is held while a client is slow.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job.h"
#include "json.h"
#include "map.h"
#include "methods.h"
#include "qinsd.h"

/* ---- parameter helpers ------------------------------------------------------------------------ */
static void init_packer(msgpack_sbuffer *sb, msgpack_packer *pk) {
  msgpack_sbuffer_init(sb);
  msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
}

/* A successful answer being packed: [1, msgid, nil, <result>]; ok_begin packs up to the result,
 * ok_send sends it. */
typedef struct ok_reply {
  msgpack_sbuffer sb;
  msgpack_packer pk;
} ok_reply;

static msgpack_packer *ok_begin(ok_reply *o, const qd_req *r) {
  init_packer(&o->sb, &o->pk);
  qp_pack_response_ok(&o->pk, r->msgid);
  return &o->pk;
}

static int ok_send(qd_req *r, ok_reply *o) {
  qd_reply(r, &o->sb, NULL);
  return 0;
}

/* One "key": uint entry of a map. */
static void kv_u64(msgpack_packer *pk, const char *key, uint64_t v) {
  qp_pack_cstr(pk, key);
  msgpack_pack_uint64(pk, v);
}

/* Params are read in place from the request bytes, which qp_scan has already validated (every
 * declared length and count fits the message, nesting is bounded), so qp_rd_* cannot run off it.
 * The value of str key `key` in the params map: 1 with *v at it, or 0 when params is [] or the key
 * is absent. The first matching key wins (as qp_map_get did); non-str keys are skipped. */
__attribute__((hot))
static int param_find(const qd_req *r, const char *key, qp_rd *v) {
  if (!r->params.p) return 0;
  size_t kl = strlen(key);
  if (r->n_keys >= 0) { /* the map was indexed once at dispatch (conn_dispatch) */
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

__attribute__((hot))
static int rd_is_str(const qp_rd *v) {
  qp_rd t = *v;
  const char *s;
  uint32_t n;
  return qp_rd_str(&t, &s, &n) == 0;
}

/* Reads a str into dst (cap bytes incl. NUL): 0, or QINS_EBAD_PARAMS if it is not a str, does
 * not fit or holds a NUL (the cursor then may have moved). Like qp_obj_cstr. */
__attribute__((hot))
static int rd_cstr(qp_rd *v, char *dst, size_t cap) {
  const char *s;
  uint32_t n;
  if (qp_rd_str(v, &s, &n) || n >= cap || memchr(s, 0, n)) return QINS_EBAD_PARAMS;
  memcpy(dst, s, n);
  dst[n] = '\0';
  return 0;
}

/* Names (model, name, prefix, names[i]) pass the store's qs_name_check (UTF-8, no control
 * characters), so no message or log line echoes bytes a strict decoder rejects. 0 or QINS_ENAME
 * naming the field. An empty name is left to the lookup (NO_MODEL / NO_TENSOR). */
__attribute__((hot))
static int param_name_check(qd_req *r, const char *field, const char *v, int is_model) {
  if (!*v || qs_name_check(is_model ? "model" : "tensor", v, is_model) == 0) return 0;
  snprintf(r->msg, sizeof r->msg, "parameter \"%s\": %s", field, qs_error());
  return QINS_ENAME;
}

/* A required or optional str parameter into dst: 0, 1 when optional and absent, or an error. */
__attribute__((hot))
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

/* A str parameter that names a model, a tensor or a tensor-name prefix: param_str, then the
 * name check. */
__attribute__((hot))
static int param_name_is(qd_req *r, const char *key, int required, char *dst, size_t cap,
                         int is_model) {
  int rc = param_str(r, key, required, dst, cap);
  return rc ? rc : param_name_check(r, key, dst, is_model);
}
/* The "model" parameter (required), and any other name parameter (a tensor name or prefix). */
static int param_model(qd_req *r, char *dst, size_t cap) {
  return param_name_is(r, "model", 1, dst, cap, 1);
}
static int param_name(qd_req *r, const char *key, int required, char *dst, size_t cap) {
  return param_name_is(r, key, required, dst, cap, 0);
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

__attribute__((hot))
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
  int d = qc_dtype_from_name(s);
  if (d >= 0) {
    *dt = d;
    *given = 1;
    return 0;
  }
  snprintf(r->msg, sizeof r->msg, "unsupported dtype \"%s\" (f32, f16 or bf16)", s);
  return QINS_EDTYPE;
}

__attribute__((hot))
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
  if (nr > qd_srv.cfg.max_ranges) {
    snprintf(r->msg, sizeof r->msg, "slice has %u ranges; at most %llu are allowed",
             nr, (unsigned long long)qd_srv.cfg.max_ranges);
    return QINS_EBAD_SLICE;
  }
  for (uint32_t i = 0; i < nr; i++) {
    uint32_t ne;
    if (qp_rd_array(&v, &ne) || ne != 2 || qp_rd_uint(&v, &sl->start[i]) ||
        qp_rd_uint(&v, &sl->stop[i])) {
      snprintf(r->msg, sizeof r->msg, "slice range %u must be [start, stop] of unsigned integers", i);
      return QINS_EBAD_PARAMS;
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
  qp_pack_cstr(pk, qs_codec_name(t->codec));
  qp_pack_cstr(pk, "src_dtype");
  qp_pack_cstr(pk, qs_dtype_name(t->src_dtype));
  qp_pack_cstr(pk, "shape");
  msgpack_pack_array(pk, (size_t)t->ndim);
  for (int i = 0; i < t->ndim; i++) msgpack_pack_uint64(pk, t->shape[i]);
  kv_u64(pk, "n_elem", t->n_elem);
  kv_u64(pk, "src_bytes", t->src_bytes);
  kv_u64(pk, "stored_bytes", t->stored_bytes);
  qp_pack_cstr(pk, "snr_db");
  msgpack_pack_double(pk, t->snr_db);
}

/* Store error -> reply code, with r->msg naming the object. */
static int store_err(qd_req *r, int rc, const char *model, const char *name) {
  return qd_store_err(r->msg, sizeof r->msg, rc, model, name);
}

/* ---- hello, ping, stats, shutdown ------------------------------------------------------------ */
static int m_hello(qd_req *r) {
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  msgpack_pack_map(pk, 8);
  kv_u64(pk, "arena_bytes", qd_map_arena_bytes());
  qp_pack_cstr(pk, "protocol");
  msgpack_pack_uint32(pk, QP_PROTOCOL_VERSION);
  qp_pack_cstr(pk, "server");
  qp_pack_cstr(pk, QD_SERVER_NAME);
  kv_u64(pk, "max_request_bytes", qd_srv.cfg.max_request_bytes);
  kv_u64(pk, "max_response_bytes", qd_srv.cfg.max_response_bytes);
  kv_u64(pk, "max_connections", qd_srv.cfg.max_connections);
  kv_u64(pk, "max_ranges", qd_srv.cfg.max_ranges);
  qp_pack_cstr(pk, "dtypes");
  msgpack_pack_array(pk, QC_DT_COUNT);
  for (int i = 0; i < QC_DT_COUNT; i++) qp_pack_cstr(pk, qc_dtype_name((qc_dtype)i));
  return ok_send(r, &o);
}

static int m_ping(qd_req *r) {
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  qp_pack_cstr(pk, "pong");
  return ok_send(r, &o);
}

/* stats' members (docs/PROTOCOL.md §4.8) that need more than reading a uint64_t of qd_srv: each
 * packs its value; lat holds the latency quantiles, taken once a reply. */
static void st_uptime(msgpack_packer *pk, const double *lat) {
  (void)lat;
  msgpack_pack_uint64(pk, (qd_now_ns() - qd_srv.st.start_ns) / 1000000000ull);
}

static void st_requests(msgpack_packer *pk, const double *lat) {
  (void)lat;
  msgpack_pack_map(pk, (size_t)qd_n_methods);
  for (int i = 0; i < qd_n_methods; i++) {
    qp_pack_cstr(pk, qd_methods[i].name);
    msgpack_pack_uint64(pk, qd_srv.st.per_method[i]);
  }
}

static void st_errors(msgpack_packer *pk, const double *lat) {
  (void)lat;
  size_t ne = 0;
  for (int i = 0; i < QD_ERR_SLOTS; i++) ne += qd_srv.st.errors[i] != 0;
  msgpack_pack_map(pk, ne);
  for (int i = 0; i < QD_ERR_SLOTS; i++)
    if (qd_srv.st.errors[i]) {
      qp_pack_cstr(pk, qins_err_name(-1000 - i));
      msgpack_pack_uint64(pk, qd_srv.st.errors[i]);
    }
}

static void st_decode_ns(msgpack_packer *pk, const double *lat) {
  (void)lat;
  msgpack_pack_uint64(pk, atomic_load(&qd_srv.st.decode_ns));
}

static void st_p50(msgpack_packer *pk, const double *lat) { msgpack_pack_double(pk, lat[0]); }
static void st_p99(msgpack_packer *pk, const double *lat) { msgpack_pack_double(pk, lat[1]); }

/* stats' members in reply order: a uint64_t of qd_srv (a counter of qd_srv.st under its own name,
 * or a limit) at `off`, or what `pack` packs. The arena's members (map.c) come first. */
typedef struct stat_row {
  const char *key;
  size_t off;
  void (*pack)(msgpack_packer *pk, const double *lat);
} stat_row;
#define ST(field) {#field, offsetof(qd_server, st.field), NULL}
#define PACKED(key, fn) {key, 0, fn}
static const stat_row stats_rows[] = {
  PACKED("uptime_s", st_uptime),
  ST(connections),
  ST(connections_total),
  ST(connections_refused),
  ST(connections_denied),
  ST(connections_idle_closed),
  ST(accept_failed),
  ST(requests_total),
  PACKED("requests", st_requests),
  PACKED("errors", st_errors),
  ST(bytes_served),
  PACKED("decode_ns", st_decode_ns),
  ST(inline_decodes),
  ST(pool_decodes),
  ST(pool_plans),
  ST(paused_reads),
  ST(reads_yielded),
  ST(queued_bytes),
  ST(queued_peak),
  {"max_response_memory", offsetof(qd_server, cfg.max_response_memory), NULL},
  ST(memory_waits),
  ST(memory_refused),
  ST(memory_trims),
  PACKED("latency_p50_us", st_p50),
  PACKED("latency_p99_us", st_p99),
};
#undef ST
#undef PACKED

static int m_stats(qd_req *r) {
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  double lat[2];
  qd_latency_quantiles(&lat[0], &lat[1]);
  size_t n = sizeof stats_rows / sizeof stats_rows[0];
  msgpack_pack_map(pk, n + QD_MAP_STATS_KEYS);
  qd_map_stats_pack(pk);
  for (size_t i = 0; i < n; i++) {
    const stat_row *row = &stats_rows[i];
    qp_pack_cstr(pk, row->key);
    if (row->pack) {
      row->pack(pk, lat);
    } else {
      uint64_t v;
      memcpy(&v, (const char *)&qd_srv + row->off, sizeof v);
      msgpack_pack_uint64(pk, v);
    }
  }
  return ok_send(r, &o);
}

static int m_shutdown(qd_req *r) {
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  msgpack_pack_true(pk);
  ok_send(r, &o);
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
  kv_u64(pk, "tensors", m->n_tensors);
  kv_u64(pk, "n_elem", m->n_elem);
  kv_u64(pk, "src_bytes", m->src_bytes);
  kv_u64(pk, "stored_bytes", m->stored_bytes);
  kv_u64(pk, "created", m->created > 0 ? (uint64_t)m->created : 0);
  w->n++;
  return 0;
}

static int m_models(qd_req *r) {
  qs_txn *t;
  int rc = qs_txn_begin(qd_srv.store, &t);
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
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  msgpack_pack_array(pk, (size_t)w.n);
  msgpack_sbuffer_write(&o.sb, body.data, body.size);
  msgpack_sbuffer_destroy(&body);
  return ok_send(r, &o);
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
  int rc = param_model(r, model, sizeof model);
  if (rc) return rc;
  if ((rc = param_name(r, "prefix", 0, prefix, sizeof prefix)) < 0) return rc;
  walk w = {0};
  if ((rc = param_uint(r, "offset", 0, &w.offset))) return rc;
  if ((rc = param_uint(r, "limit", 1000, &w.limit))) return rc;
  if (w.limit > 100000) w.limit = 100000; /* keeps one reply bounded */
  qs_txn *t;
  if ((rc = qs_txn_begin(qd_srv.store, &t))) return store_err(r, rc, model, NULL);
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
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  msgpack_pack_map(pk, 2);
  kv_u64(pk, "total", w.total);
  qp_pack_cstr(pk, "tensors");
  msgpack_pack_array(pk, (size_t)w.n);
  msgpack_sbuffer_write(&o.sb, body.data, body.size);
  msgpack_sbuffer_destroy(&body);
  return ok_send(r, &o);
}

static int m_info(qd_req *r) {
  char model[QS_MAX_NAME + 1], name[QS_MAX_NAME + 1];
  int rc = param_model(r, model, sizeof model);
  if (rc || (rc = param_name(r, "name", 1, name, sizeof name))) return rc;
  qs_txn *t;
  if ((rc = qs_txn_begin(qd_srv.store, &t))) return store_err(r, rc, model, name);
  qs_tensor ten;
  rc = qs_tensor_get(t, model, name, &ten);
  qs_txn_end(t);
  if (rc) return store_err(r, rc, model, name);
  ok_reply o;
  msgpack_packer *pk = ok_begin(&o, r);
  pack_info(pk, &ten);
  return ok_send(r, &o);
}

/* get and map: {model, name, slice?, dtype?} into a new ask; NULL with *rc set on an error. */
__attribute__((hot))
static qd_ask *ask_one(qd_req *r, int *rc) {
  qd_ask *a = qd_job_new();
  if (!a) {
    *rc = QINS_ENOMEM;
    return NULL;
  }
  if ((*rc = param_model(r, a->model, sizeof a->model)) ||
      (*rc = param_name(r, "name", 1, a->name, sizeof a->name)) ||
      (*rc = param_slice(r, &a->slice, &a->has_slice)) ||
      (*rc = param_dtype(r, &a->dt, &a->dt_given))) {
    qd_job_discard(a);
    return NULL;
  }
  return a;
}

static qd_ask *ask_many(qd_req *r, int *rc_out);

/* get, map, get_many, map_many: the params parsed into an ask (ask_one or ask_many), which a
 * decode job (qd_job_start) or the arena (qd_map_start) then answers. */
__attribute__((hot))
static int ask_and_start(qd_req *r, qd_ask *(*parse)(qd_req *, int *),
                         int (*start)(qd_req *, qd_ask *)) {
  int rc;
  qd_ask *a = parse(r, &rc);
  return a ? start(r, a) : rc;
}

__attribute__((hot))
static int m_get(qd_req *r) { return ask_and_start(r, ask_one, qd_job_start); }
static int m_map(qd_req *r) { return ask_and_start(r, ask_one, qd_map_start); }
static int m_get_many(qd_req *r) { return ask_and_start(r, ask_many, qd_job_start); }
static int m_map_many(qd_req *r) { return ask_and_start(r, ask_many, qd_map_start); }

static int m_attach(qd_req *r) { return qd_map_attach(r); }

/* release: {lease: u} or {leases: [u]} (at most RELEASE_MAX). */
#define RELEASE_MAX 65536
static int m_release(qd_req *r) {
  qp_rd one, list;
  int has_one = param_find(r, "lease", &one), has_list = param_find(r, "leases", &list);
  if (has_one == has_list) {
    snprintf(r->msg, sizeof r->msg, "release needs exactly one of \"lease\" and \"leases\"");
    return QINS_EBAD_PARAMS;
  }
  uint64_t id;
  if (has_one) {
    if (qp_rd_uint(&one, &id)) {
      snprintf(r->msg, sizeof r->msg, "parameter \"lease\" must be an unsigned integer");
      return QINS_EBAD_PARAMS;
    }
    return qd_map_release(r, &id, 1);
  }
  uint32_t n;
  if (qp_rd_array(&list, &n) || n > RELEASE_MAX) {
    snprintf(r->msg, sizeof r->msg, "parameter \"leases\" must be an array of at most %d "
             "unsigned integers", RELEASE_MAX);
    return QINS_EBAD_PARAMS;
  }
  uint64_t *ids = malloc((n ? n : 1) * sizeof *ids);
  if (!ids) return QINS_ENOMEM;
  for (uint32_t i = 0; i < n; i++)
    if (qp_rd_uint(&list, &ids[i])) {
      free(ids);
      snprintf(r->msg, sizeof r->msg, "leases[%u] must be an unsigned integer", i);
      return QINS_EBAD_PARAMS;
    }
  int rc = qd_map_release(r, ids, n);
  free(ids);
  return rc;
}

/* get_many and map_many: {model, names | prefix, dtype?} into a new ask (many); NULL with *rc_out
 * set on an error. */
static qd_ask *ask_many(qd_req *r, int *rc_out) {
  qd_ask *a = qd_job_new();
  if (!a) {
    *rc_out = QINS_ENOMEM;
    return NULL;
  }
  a->many = 1;
  int rc;
  const char *meth = qd_methods[r->method].name;
  if ((rc = param_model(r, a->model, sizeof a->model)) ||
      (rc = param_dtype(r, &a->dt, &a->dt_given)))
    goto fail;
  qp_rd names;
  if (param_find(r, "slice", &names)) {
    snprintf(r->msg, sizeof r->msg, "%s takes no slice: use %s for slices", meth,
             meth[0] == 'm' ? "map" : "get");
    rc = QINS_EBAD_PARAMS;
    goto fail;
  }
  int has_names = param_find(r, "names", &names);
  rc = param_name(r, "prefix", 0, a->prefix, sizeof a->prefix);
  if (rc < 0) goto fail;
  a->by_prefix = rc == 0;
  if (has_names == a->by_prefix) {
    snprintf(r->msg, sizeof r->msg, "%s needs exactly one of \"names\" and \"prefix\"", meth);
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
    a->n_names = nn;
    a->names = calloc(a->n_names ? a->n_names : 1, sizeof *a->names);
    if (!a->names) {
      rc = QINS_ENOMEM;
      goto fail;
    }
    for (uint32_t i = 0; i < a->n_names; i++)
      if (rd_cstr(&names, a->names[i], sizeof a->names[i])) {
        snprintf(r->msg, sizeof r->msg, "names[%u] must be a str of at most %d bytes", i,
                 QS_MAX_NAME);
        rc = QINS_EBAD_PARAMS;
        goto fail;
      } else {
        char field[24];
        snprintf(field, sizeof field, "names[%u]", i);
        if ((rc = param_name_check(r, field, a->names[i], 0))) goto fail;
      }
  }
  return a;
fail:
  qd_job_discard(a);
  *rc_out = rc;
  return NULL;
}

/* ---- model_info: a model's metadata, paged -------------------------------------------------- */
/* The stored metadata (docs/FORMAT.md §2.3.1) as the method sends it (docs/PROTOCOL.md §4.14):
 * the top-level members but "gguf" and "hf" in `metadata`, and one entry list, paged: the GGUF
 * key/values ([key, type, value], file order), then each HF file as ["hf.NAME", "json", value]. */
static void pack_json(msgpack_packer *pk, const qs_json *v) {
  switch (v->type) {
  case QS_JSON_NULL: msgpack_pack_nil(pk); break;
  case QS_JSON_BOOL: v->boolean ? msgpack_pack_true(pk) : msgpack_pack_false(pk); break;
  case QS_JSON_NUMBER:
    if (v->num_flags & QS_JSON_IS_U64) msgpack_pack_uint64(pk, v->u64);
    else if (v->num_flags & QS_JSON_IS_I64) msgpack_pack_int64(pk, v->i64);
    else msgpack_pack_double(pk, v->num);
    break;
  case QS_JSON_STRING: msgpack_pack_str_with_body(pk, v->str, v->len); break;
  case QS_JSON_ARRAY:
    msgpack_pack_array(pk, v->len);
    for (size_t i = 0; i < v->len; i++) pack_json(pk, &v->items[i]);
    break;
  case QS_JSON_OBJECT:
    msgpack_pack_map(pk, v->len);
    for (size_t i = 0; i < v->len; i++) {
      msgpack_pack_str_with_body(pk, v->items[i].key, v->items[i].key_len);
      pack_json(pk, &v->items[i]);
    }
    break;
  }
}

/* Entry i of the list: key, type and value (value NULL with *count for an array the import left
 * out, FORMAT.md §2.3.1). */
typedef struct meta_entry {
  const char *key, *type;
  size_t key_len, type_len;
  const qs_json *value;
  uint64_t count;
} meta_entry;

static int meta_entry_at(const qs_json *kv, const qs_json *hf, size_t i, meta_entry *e,
                         char *hfkey, size_t cap) {
  memset(e, 0, sizeof *e);
  size_t nkv = kv ? kv->len : 0;
  if (i < nkv) {
    const qs_json *x = &kv->items[i], *k = qs_json_at(x, 0), *t = qs_json_at(x, 1);
    const qs_json *v = qs_json_at(x, 2), *n = qs_json_at(x, 3);
    if (x->type != QS_JSON_ARRAY || !k || k->type != QS_JSON_STRING || !t || !v ||
        (t->type != QS_JSON_STRING) || (n && !(n->num_flags & QS_JSON_IS_U64)))
      return -1;
    *e = (meta_entry){k->str, t->str, k->len, t->len, n ? NULL : v, n ? n->u64 : 0};
    return 0;
  }
  const qs_json *h = &hf->items[i - nkv];
  snprintf(hfkey, cap, "hf.%s", h->key);
  *e = (meta_entry){hfkey, "json", strlen(hfkey), 4, h, 0};
  return 0;
}

/* Packs an entry into sb: [key, type, value], or [key, type, nil, count] when `elide` (an array
 * too large for one reply: its elements are paged with `key`) or when the import left it out. */
static void pack_entry(msgpack_sbuffer *sb, const meta_entry *e, int elide) {
  msgpack_packer pk;
  msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
  int short_form = elide || !e->value;
  msgpack_pack_array(&pk, short_form ? 4 : 3);
  msgpack_pack_str_with_body(&pk, e->key, e->key_len);
  msgpack_pack_str_with_body(&pk, e->type, e->type_len);
  if (!short_form) {
    pack_json(&pk, e->value);
    return;
  }
  msgpack_pack_nil(&pk);
  msgpack_pack_uint64(&pk, e->value ? e->value->len : e->count);
}

/* Moves the item packed in `one` onto the page in `body` (then 1, `one` emptied) if the page
 * stays within budget bytes; else 0. */
static int page_add(msgpack_sbuffer *body, msgpack_sbuffer *one, uint64_t budget) {
  if (body->size + one->size > budget) return 0;
  msgpack_sbuffer_write(body, one->data, one->size);
  msgpack_sbuffer_clear(one);
  return 1;
}

#define META_REPLY_SLACK 256 /* envelope and the reply's fixed members */

static int m_model_info(qd_req *r) {
  char model[QS_MAX_NAME + 1], key[QS_MAX_NAME + 1];
  uint64_t offset, limit;
  int rc = param_model(r, model, sizeof model);
  if (rc) return rc;
  int by_key = (rc = param_str(r, "key", 0, key, sizeof key)) == 0;
  if (rc < 0) return rc;
  if ((rc = param_uint(r, "offset", 0, &offset)) || (rc = param_uint(r, "limit", 1000, &limit)))
    return rc;
  if (limit > 100000) limit = 100000; /* keeps one reply bounded, like list */
  qs_txn *t;
  if ((rc = qs_txn_begin(qd_srv.store, &t))) return store_err(r, rc, model, NULL);
  qs_model mi;
  qs_json *j = NULL;
  char err[160];
  rc = qs_model_get(t, model, &mi);
  if (rc == 0 && qs_json_parse(mi.metadata, strlen(mi.metadata), &j, err, sizeof err))
    rc = QINS_ECORRUPT;
  qs_txn_end(t);
  if (rc == QINS_ECORRUPT && !j) {
    snprintf(r->msg, sizeof r->msg, "model %s: stored metadata is not JSON (%s)", model, err);
    return rc;
  }
  if (rc) return store_err(r, rc, model, NULL);
  if (j->type != QS_JSON_OBJECT) {
    qs_json_free(j);
    snprintf(r->msg, sizeof r->msg, "model %s: stored metadata is not a JSON object", model);
    return QINS_ECORRUPT;
  }
  const qs_json *gg = qs_json_get(j, "gguf"), *kv = qs_json_get(gg, "kv"), *hf = qs_json_get(j, "hf");
  if (kv && kv->type != QS_JSON_ARRAY) kv = NULL;
  if (hf && hf->type != QS_JSON_OBJECT) hf = NULL;
  uint64_t total = (kv ? kv->len : 0) + (hf ? hf->len : 0);
  msgpack_sbuffer body, one, flat;
  msgpack_packer bpk, fpk;
  init_packer(&body, &bpk);
  init_packer(&flat, &fpk);
  msgpack_sbuffer_init(&one);
  if (!by_key) { /* the members: sent whole on every page, so they come off the budget */
    size_t nm = 0;
    for (size_t i = 0; i < j->len; i++)
      nm += strcmp(j->items[i].key, "gguf") && strcmp(j->items[i].key, "hf");
    msgpack_pack_map(&fpk, nm);
    for (size_t i = 0; i < j->len; i++)
      if (strcmp(j->items[i].key, "gguf") && strcmp(j->items[i].key, "hf")) {
        msgpack_pack_str_with_body(&fpk, j->items[i].key, j->items[i].key_len);
        pack_json(&fpk, &j->items[i]);
      }
  }
  uint64_t budget = qd_srv.cfg.max_response_bytes - META_REPLY_SLACK;
  budget = flat.size < budget ? budget - flat.size : 0;
  uint64_t n = 0, elem_total = 0;
  meta_entry e;
  char hfkey[64];
  const char *what = NULL;
  if (by_key) { /* one array entry's elements */
    uint64_t i;
    for (i = 0; i < total; i++)
      if (!meta_entry_at(kv, hf, i, &e, hfkey, sizeof hfkey) && e.key_len == strlen(key) &&
          !memcmp(e.key, key, e.key_len))
        break;
    if (i == total) {
      snprintf(r->msg, sizeof r->msg, "model %s has no metadata entry \"%s\"", model, key);
      rc = QINS_EBAD_PARAMS;
    } else if (!e.value) {
      snprintf(r->msg, sizeof r->msg, "model %s: \"%s\" (%llu elements) was too large to keep at "
               "import", model, key, (unsigned long long)e.count);
      rc = QINS_EUNSUPPORTED;
    } else if (e.value->type != QS_JSON_ARRAY) {
      snprintf(r->msg, sizeof r->msg, "model %s: \"%s\" is not an array: ask without \"key\"",
               model, key);
      rc = QINS_EBAD_PARAMS;
    }
    elem_total = rc ? 0 : e.value->len;
    for (uint64_t k = offset; !rc && k < elem_total && n < limit; k++) {
      msgpack_packer opk;
      msgpack_packer_init(&opk, &one, msgpack_sbuffer_write);
      pack_json(&opk, &e.value->items[k]);
      if (!page_add(&body, &one, budget)) {
        if (n == 0) what = "an element";
        break;
      }
      n++;
    }
  } else {
    for (uint64_t i = offset; i < total && n < limit; i++) {
      if (meta_entry_at(kv, hf, i, &e, hfkey, sizeof hfkey)) {
        snprintf(r->msg, sizeof r->msg, "model %s: stored GGUF entry %llu is malformed", model,
                 (unsigned long long)i);
        rc = QINS_ECORRUPT;
        break;
      }
      pack_entry(&one, &e, 0);
      if (one.size > budget && e.value && e.value->type == QS_JSON_ARRAY) {
        msgpack_sbuffer_clear(&one);
        pack_entry(&one, &e, 1); /* too large for any reply: its elements are paged by key */
      }
      if (!page_add(&body, &one, budget)) {
        if (n == 0) what = "entry";
        break;
      }
      n++;
    }
  }
  msgpack_sbuffer_destroy(&one);
  if (!rc && !budget) {
    snprintf(r->msg, sizeof r->msg, "model %s: metadata members alone exceed max-response-bytes "
             "(%llu)", model, (unsigned long long)qd_srv.cfg.max_response_bytes);
    rc = QINS_ERESPONSE_TOO_LARGE;
  } else if (!rc && what) {
    snprintf(r->msg, sizeof r->msg, "model %s: metadata %s %llu%s%s alone exceeds "
             "max-response-bytes (%llu)", model, what, (unsigned long long)offset,
             by_key ? " of " : "", by_key ? key : "", (unsigned long long)qd_srv.cfg.max_response_bytes);
    rc = QINS_ERESPONSE_TOO_LARGE;
  }
  ok_reply o;
  if (!rc) {
    msgpack_packer *pk = ok_begin(&o, r);
    int head = by_key ? 0 : 1 + (gg != NULL);
    msgpack_pack_map(pk, (size_t)(4 + head + by_key * 2));
    qp_pack_cstr(pk, "model");
    qp_pack_cstr(pk, model);
    if (by_key) {
      qp_pack_cstr(pk, "key");
      qp_pack_cstr(pk, key);
      qp_pack_cstr(pk, "type");
      msgpack_pack_str_with_body(pk, e.type, e.type_len);
    } else {
      qp_pack_cstr(pk, "metadata");
      msgpack_sbuffer_write(&o.sb, flat.data, flat.size);
      if (gg) {
        const qs_json *ver = qs_json_get(gg, "version");
        kv_u64(pk, "gguf_version", ver && (ver->num_flags & QS_JSON_IS_U64) ? ver->u64 : 0);
      }
    }
    kv_u64(pk, "total", by_key ? elem_total : total);
    kv_u64(pk, "offset", offset);
    qp_pack_cstr(pk, by_key ? "values" : "entries");
    msgpack_pack_array(pk, (size_t)n);
    msgpack_sbuffer_write(&o.sb, body.data, body.size);
  }
  msgpack_sbuffer_destroy(&body);
  msgpack_sbuffer_destroy(&flat);
  qs_json_free(j);
  return rc ? rc : ok_send(r, &o);
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
  {"model_info", QD_READONLY, m_model_info, "model, key?, offset?, limit?",
   "a model's metadata: members, and GGUF key/values and HF files paged"},
  {"stats", QD_READONLY, m_stats, "", "connections, requests, errors, bytes, latency"},
  {"shutdown", QD_ADMIN, m_shutdown, "", "stop accepting, finish in-flight requests, exit 0"},
  {"attach", QD_READONLY, m_attach, "",
   "the shared decoded-weights arena: its fd (SCM_RIGHTS) and size"},
  {"map", QD_READONLY, m_map, "model, name, slice?, dtype?",
   "a tensor or hyperslab decoded into the arena: lease, offset, length"},
  {"map_many", QD_READONLY, m_map_many, "model, names | prefix, dtype?",
   "several whole tensors into the arena in one round trip"},
  {"release", QD_READONLY, m_release, "lease | leases", "ends arena leases"},
};
const int qd_n_methods = (int)(sizeof qd_methods / sizeof qd_methods[0]);

__attribute__((hot))
int qd_method_find(const char *name, size_t len) {
  static size_t lens[sizeof qd_methods / sizeof qd_methods[0]]; /* loop thread only */
  if (!lens[0])
    for (int i = 0; i < qd_n_methods; i++) lens[i] = strlen(qd_methods[i].name);
  for (int i = 0; i < qd_n_methods; i++)
    if (lens[i] == len && memcmp(qd_methods[i].name, name, len) == 0) return i;
  return -1;
}
