/* SPDX-License-Identifier: MIT */
/*
 * soak.c — `make soak DURATION=S`: a real qinsd on a temporary store, 64 concurrent clients for S
 * seconds, then figures and a verdict. Issue 7 (hardening); PROTOCOL.md is the contract checked.
 *
 * Store: a generated safetensors file imported with build/qinsctl (exactly representable f32
 * tensors stored lossless, so their values are checked; qins8, qins16, f32, a raw i32 tensor, a
 * scalar, and a 4 MiB-output matrix), plus ../shared/models/stories260K.safetensors when present.
 * qinsd runs with max-response-bytes 2M (a whole get of the big matrix is RESPONSE_TOO_LARGE) and
 * stream-min-bytes 256K (its large slices are streamed).
 *
 * Each client (a thread with its own connection, raw msgpack-RPC) loops over a weighted mix: get,
 * get with slices and output dtypes, get_many (names and prefix), list, info, models, hello/ping/
 * stats, pipelined bursts, map (libqins: attach, map a tensor or hyperslab, compare with get, keep
 * a few leases, now and then close holding them; the arena is 64M, so ARENA_FULL is expected at
 * times and eviction runs), requests that must fail with a given code (NO_TENSOR, NO_MODEL,
 * BAD_SLICE, DTYPE, BAD_PARAMS, UNKNOWN_METHOD, RESPONSE_TOO_LARGE, PROTO for a non-str method:
 * the connection stays open), malformed streams on a fresh connection (0xc1, a 4 GiB bin header,
 * a wrong type tag, nesting too deep, a non-array: error with msgid 0, then the server closes),
 * abrupt disconnects (a burst of large requests or half a request, then close without reading),
 * and half-closes (requests, shutdown(SHUT_WR), every answer must still come).
 *
 * Verdict: every response must match its request (msgid, shape, data size, values of the exact
 * tensors, finite floats) and every error must be the one expected for that request; anything
 * else is an unexpected error. The daemon's RSS (VmRSS and RssAnon from /proc/PID/status) is
 * taken after warm-up and at the end without its arena's shared pages (growth allowed: 5% + 8 MiB;
 * the arena's pages, RssShmem, must stay within arena-bytes), its open descriptors
 * (/proc/PID/fd) before the clients start and after they all left (must be equal), and it must
 * exit 0 on SIGTERM. Exit status 0 when all holds, 1 otherwise, 2 on bad usage. The daemon is
 * always stopped (SIGTERM, then SIGKILL; PR_SET_PDEATHSIG covers a crash of this program).
 *
 * Usage: soak [--duration S] [--clients N] [--keep]   (QINS_BUILD, QINS_SHARED from make)
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>

#include "codec.h"
#include "daemon.h"
#include "proto.h"
#include "qins.h"

#define MAX_TENSORS 256        /* tensors tracked (the synthetic model plus stories260K's ~50) */
#define RESP_TIMEOUT_MS 30000  /* a response slower than this under load is a failure */
#define RSS_SLACK_KIB (8 * 1024) /* allowed RSS growth after warm-up: 8 MiB + 5% */
#define MAX_RESPONSE "2M"      /* qinsd --max-response-bytes */
#define ARENA "64M"            /* qinsd --arena-bytes: 64 clients' leases fill it at times */

/* ---- what the store holds ------------------------------------------------------------------- */
typedef struct tinfo {
  char model[64];
  char name[QINS_MAX_NAME + 1];
  int ndim;
  uint64_t shape[QINS_MAX_NDIM];
  uint64_t n_elem;
  int raw;            /* stored raw: served as i32, only without dtype */
  int exact;          /* values known: exact_value(i), stored lossless */
} tinfo;
static tinfo tens[MAX_TENSORS];
static int n_tens;
static int has_stories;

/* Values of the exact tensors: small multiples of 1/8, exactly representable in f32 and bf16. */
static float exact_value(uint64_t i) { return (float)((int)((i * 37) % 1000) - 500) / 8.0f; }

/* ---- counters (all threads) ------------------------------------------------------------------- */
enum {
  OP_GET, OP_SLICE, OP_GET_MANY, OP_LIST, OP_INFO, OP_MODELS, OP_SMALL, OP_PIPELINE, OP_BAD,
  OP_MALFORMED, OP_ABRUPT, OP_HALFCLOSE, OP_MAP, OP_COUNT
};
static const char *const op_names[OP_COUNT] = {
  "get", "slice", "get_many", "list", "info", "models", "hello/ping/stats", "pipelined",
  "bad-request", "malformed", "abrupt-disconnect", "half-close", "map"};
static const int op_weight[OP_COUNT] = {18, 24, 8, 6, 6, 2, 4, 6, 12, 4, 4, 2, 8};

#define N_CODES 64
static atomic_ullong n_ops[OP_COUNT];
static atomic_ullong n_requests;      /* requests sent (complete ones) */
static atomic_ullong n_responses;     /* responses read and checked */
static atomic_ullong n_errors[N_CODES]; /* expected error responses per code (-1000 - code) */
static atomic_ullong n_unexpected;
static atomic_ullong n_data_bytes;
static atomic_int stop_all;
static pthread_mutex_t report_mu = PTHREAD_MUTEX_INITIALIZER;

static void unexpected(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void unexpected(const char *fmt, ...) {
  unsigned long long n = atomic_fetch_add(&n_unexpected, 1) + 1;
  if (n > 20) return; /* the first ones say enough */
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&report_mu);
  fprintf(stderr, "soak: UNEXPECTED: ");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  pthread_mutex_unlock(&report_mu);
  va_end(ap);
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- the synthetic model ---------------------------------------------------------------------- */
typedef struct gen {
  const char *name;
  const char *dtype; /* safetensors dtype */
  int ndim;
  uint64_t shape[3];
  int exact;
} gen;
static const gen synth[] = {
  {"exact.a", "F32", 2, {64, 96}, 1},     {"exact.b", "F32", 3, {3, 5, 7}, 1},
  {"exact.row", "F32", 1, {300}, 1},      {"q8.w1", "F32", 2, {256, 256}, 0},
  {"q8.big", "F32", 2, {1024, 1024}, 0},  {"q16.w", "F32", 2, {128, 200}, 0},
  {"bias", "F32", 1, {256}, 0},           {"ids", "I32", 2, {10, 4}, 0},
  {"scalar", "F32", 0, {0}, 1},
};
#define N_SYNTH (sizeof synth / sizeof synth[0])

static int write_synth(const char *path) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  char hdr[4096];
  size_t h = 0;
  uint64_t off = 0;
  h += (size_t)snprintf(hdr + h, sizeof hdr - h, "{");
  for (size_t i = 0; i < N_SYNTH; i++) {
    uint64_t n = 1;
    for (int d = 0; d < synth[i].ndim; d++) n *= synth[i].shape[d];
    h += (size_t)snprintf(hdr + h, sizeof hdr - h, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "",
                          synth[i].name, synth[i].dtype);
    for (int d = 0; d < synth[i].ndim; d++)
      h += (size_t)snprintf(hdr + h, sizeof hdr - h, "%s%llu", d ? "," : "",
                            (unsigned long long)synth[i].shape[d]);
    h += (size_t)snprintf(hdr + h, sizeof hdr - h, "],\"data_offsets\":[%llu,%llu]}",
                          (unsigned long long)off, (unsigned long long)(off + 4 * n));
    off += 4 * n;
  }
  h += (size_t)snprintf(hdr + h, sizeof hdr - h, "}");
  while (h % 8) hdr[h++] = ' ';
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)h >> (8 * i));
  int ok = fwrite(len, 8, 1, f) == 1 && fwrite(hdr, h, 1, f) == 1;
  for (size_t i = 0; ok && i < N_SYNTH; i++) {
    uint64_t n = 1;
    for (int d = 0; d < synth[i].ndim; d++) n *= synth[i].shape[d];
    for (uint64_t k = 0; ok && k < n; k++) {
      float v = synth[i].exact ? exact_value(k) : ts_value(i + 1, k);
      int32_t iv = (int32_t)(k * 2654435761u);
      ok = fwrite(strcmp(synth[i].dtype, "I32") ? (const void *)&v : (const void *)&iv, 4, 1, f) == 1;
    }
  }
  return fclose(f) == 0 && ok ? 0 : -1;
}

/* Runs build/qinsctl with args; 0 when it exits 0. */
static int run_qinsctl(const char *const *args) {
  char bin[512];
  ts_build_path("qinsctl", bin, sizeof bin);
  const char *argv[32];
  int n = 0;
  argv[n++] = bin;
  for (int i = 0; args[i] && n < 31; i++) argv[n++] = args[i];
  argv[n] = NULL;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    execv(bin, (char *const *)argv);
    _exit(127);
  }
  int st;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
  return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* ---- raw msgpack-RPC on one connection --------------------------------------------------------- */
typedef struct conn {
  int fd;
  ts_rx rx;
  uint32_t next_id;
} conn;

static int conn_open(conn *c, const char *sock) {
  c->fd = ts_connect(sock);
  if (c->fd < 0) {
    errno = -c->fd;
    return -1;
  }
  ts_rx_init(&c->rx, c->fd);
  c->next_id = 1;
  return 0;
}
static void conn_close(conn *c) {
  if (c->fd < 0) return;
  ts_rx_destroy(&c->rx); /* closes the fd */
  c->fd = -1;
}

static const char *sock_path;

/* What a request expects back. */
typedef struct expect {
  uint32_t msgid;
  int code;            /* 0: success, else the error code */
  int kind;            /* 0 none, 1 get (tensor t, slice, dtype), 2 get_many (count) */
  const tinfo *t;
  int nr;              /* slice ranges */
  uint64_t start[QINS_MAX_NDIM], stop[QINS_MAX_NDIM];
  int dt;              /* 0 f32, 1 f16, 2 bf16 */
  uint32_t count;      /* get_many items */
} expect;

/* Checks a get result against what was asked. */
static void check_get(const expect *e, const msgpack_object *res) {
  const msgpack_object *shape = qp_map_get(res, "shape"), *dtype = qp_map_get(res, "dtype");
  const msgpack_object *data = qp_map_get(res, "data");
  if (!shape || shape->type != MSGPACK_OBJECT_ARRAY || !data || data->type != MSGPACK_OBJECT_BIN ||
      !dtype) {
    unexpected("get %s: result without shape/data", e->t->name);
    return;
  }
  const tinfo *t = e->t;
  uint64_t want_shape[QINS_MAX_NDIM], n = 1;
  for (int d = 0; d < t->ndim; d++) {
    want_shape[d] = d < e->nr ? e->stop[d] - e->start[d] : t->shape[d];
    n *= want_shape[d];
  }
  if ((int)shape->via.array.size != t->ndim) {
    unexpected("get %s: rank %u, expected %d", t->name, shape->via.array.size, t->ndim);
    return;
  }
  for (int d = 0; d < t->ndim; d++)
    if (shape->via.array.ptr[d].via.u64 != want_shape[d]) {
      unexpected("get %s: dim %d is %llu, expected %llu", t->name, d,
                 (unsigned long long)shape->via.array.ptr[d].via.u64,
                 (unsigned long long)want_shape[d]);
      return;
    }
  size_t es = t->raw ? 4 : e->dt == 0 ? 4 : 2;
  if (data->via.bin.size != n * es) {
    unexpected("get %s: %u data bytes, expected %llu", t->name, data->via.bin.size,
               (unsigned long long)(n * es));
    return;
  }
  atomic_fetch_add(&n_data_bytes, data->via.bin.size);
  const uint8_t *p = (const uint8_t *)data->via.bin.ptr;
  if (t->raw) return;
  /* Values: exact tensors element by element (source index through the slice), others finite. */
  uint64_t idx[QINS_MAX_NDIM] = {0};
  for (uint64_t o = 0; o < n; o++) {
    float v;
    if (e->dt == 0) {
      memcpy(&v, p + 4 * o, 4);
    } else {
      uint16_t h;
      memcpy(&h, p + 2 * o, 2);
      v = e->dt == 2 ? qc_bf16_to_f32(h) : qc_f16_to_f32(h);
    }
    if (!isfinite(v)) {
      unexpected("get %s: element %llu is not finite", t->name, (unsigned long long)o);
      return;
    }
    if (t->exact) {
      uint64_t src = 0;
      for (int d = 0; d < t->ndim; d++) {
        uint64_t s0 = d < e->nr ? e->start[d] : 0;
        src = src * t->shape[d] + s0 + idx[d];
      }
      float want = exact_value(src); /* rounded to the output dtype, as the server must */
      if (e->dt == 1) want = qc_f16_to_f32(qc_f32_to_f16(want));
      if (e->dt == 2) want = qc_bf16_to_f32(qc_f32_to_bf16(want));
      if (v != want) {
        unexpected("get %s: element %llu (source %llu) is %g, expected %g", t->name,
                   (unsigned long long)o, (unsigned long long)src, (double)v, (double)want);
        return;
      }
      for (int d = t->ndim - 1; d >= 0; d--) {
        if (++idx[d] < want_shape[d]) break;
        idx[d] = 0;
      }
    }
  }
}

/* Checks one response against its expectation. */
static void check_response(const expect *e, const msgpack_object *r) {
  atomic_fetch_add(&n_responses, 1);
  int code = ts_resp_code(r);
  if (code != e->code) {
    unexpected("msgid %u (%s): got %s (%s), expected %s", e->msgid, e->t ? e->t->name : "-",
               code ? qins_err_name(code) : "success", ts_resp_msg(r),
               e->code ? qins_err_name(e->code) : "success");
    return;
  }
  if (code) {
    if (code <= -1000 && code > -1000 - N_CODES) atomic_fetch_add(&n_errors[-1000 - code], 1);
    return;
  }
  const msgpack_object *res = ts_resp_result(r);
  if (e->kind == 1) {
    check_get(e, res);
  } else if (e->kind == 2) {
    const msgpack_object *items = qp_map_get(res, "tensors");
    if (!items || items->type != MSGPACK_OBJECT_ARRAY || items->via.array.size != e->count)
      unexpected("get_many: %u items, expected %u", items ? items->via.array.size : 0, e->count);
  }
}

/* Reads responses for the n expectations (any order). 0, or -1 (reported). */
static int read_responses(conn *c, expect *ex, int n) {
  int left = n;
  while (left > 0) {
    const msgpack_object *r;
    int rc = ts_rx_next(&c->rx, RESP_TIMEOUT_MS, &r);
    if (rc != 1) {
      unexpected("connection %s while %d responses were due", rc == 0 ? "closed" : "failed or timed out",
                 left);
      return -1;
    }
    if (r->type != MSGPACK_OBJECT_ARRAY || r->via.array.size != 4) {
      unexpected("response is not [1, msgid, error, result]");
      return -1;
    }
    uint32_t id = (uint32_t)r->via.array.ptr[1].via.u64;
    int k = 0;
    while (k < n && ex[k].msgid != id) k++;
    if (k == n) {
      unexpected("response to unknown msgid %u", id);
      return -1;
    }
    check_response(&ex[k], r);
    ex[k].msgid = 0; /* answered */
    left--;
  }
  return 0;
}

/* ---- building requests ----------------------------------------------------------------------- */
typedef struct rng {
  uint64_t s;
} rng;
static uint64_t rnd(rng *r) {
  r->s += 0x9E3779B97F4A7C15ull;
  uint64_t z = r->s;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static uint64_t rnd_below(rng *r, uint64_t n) { return n ? rnd(r) % n : 0; }

static void pack_str(msgpack_packer *pk, const char *s) { qp_pack_cstr(pk, s); }

/* Appends [0, msgid, method, params] to sb (params: [] when nkeys < 0, else a map of nkeys keys
 * the caller packs): several requests can share one buffer (a pipelined burst). */
static void req_begin(msgpack_sbuffer *sb, msgpack_packer *pk, uint32_t msgid, const char *method,
                      int nkeys) {
  msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
  qp_pack_request(pk, msgid, method);
  if (nkeys < 0) {
    msgpack_pack_array(pk, 0);
  } else {
    msgpack_pack_array(pk, 1);
    msgpack_pack_map(pk, (size_t)nkeys);
  }
}

/* Output bytes of a get of t with e's slice and dtype. */
static uint64_t get_bytes(const tinfo *t, const expect *e) {
  uint64_t n = 1;
  for (int d = 0; d < t->ndim; d++) n *= d < e->nr ? e->stop[d] - e->start[d] : t->shape[d];
  return n * (t->raw || e->dt == 0 ? 4 : 2);
}

/* A random get (sliced or not) that must succeed; appended to sb. */
static void make_get(rng *g, msgpack_sbuffer *sb, expect *e, uint32_t id, int sliced) {
  msgpack_packer pk;
  memset(e, 0, sizeof *e);
  e->msgid = id;
  e->kind = 1;
  for (;;) {
    const tinfo *t = &tens[rnd_below(g, (uint64_t)n_tens)];
    e->t = t;
    e->dt = t->raw ? 0 : (int)rnd_below(g, 3);
    e->nr = sliced && t->ndim ? 1 + (int)rnd_below(g, (uint64_t)t->ndim) : 0;
    for (int d = 0; d < e->nr; d++) {
      uint64_t a = rnd_below(g, t->shape[d] + 1), b = rnd_below(g, t->shape[d] + 1);
      if (rnd_below(g, 4) == 0) b = a; /* empty ranges too */
      e->start[d] = a < b ? a : b;
      e->stop[d] = a < b ? b : a;
    }
    if (get_bytes(t, e) <= 1900000) break; /* under max-response-bytes (2M) with room */
  }
  req_begin(sb, &pk, id, "get", 2 + (e->nr > 0) + (e->dt > 0));
  pack_str(&pk, "model");
  pack_str(&pk, e->t->model);
  pack_str(&pk, "name");
  pack_str(&pk, e->t->name);
  if (e->nr) {
    pack_str(&pk, "slice");
    msgpack_pack_array(&pk, (size_t)e->nr);
    for (int d = 0; d < e->nr; d++) {
      msgpack_pack_array(&pk, 2);
      msgpack_pack_uint64(&pk, e->start[d]);
      msgpack_pack_uint64(&pk, e->stop[d]);
    }
  }
  if (e->dt) {
    pack_str(&pk, "dtype");
    pack_str(&pk, e->dt == 1 ? "f16" : "bf16");
  }
}

/* A request that must fail with a known code; the connection stays open. */
static void make_bad(rng *g, msgpack_sbuffer *sb, expect *e, uint32_t id) {
  msgpack_packer pk;
  memset(e, 0, sizeof *e);
  e->msgid = id;
  const tinfo *t = &tens[rnd_below(g, (uint64_t)n_tens)];
  switch (rnd_below(g, 8)) {
  case 0:
    e->code = QINS_ENO_TENSOR;
    req_begin(sb, &pk, id, "get", 2);
    pack_str(&pk, "model"), pack_str(&pk, t->model), pack_str(&pk, "name"), pack_str(&pk, "no.such");
    break;
  case 1:
    e->code = QINS_ENO_MODEL;
    req_begin(sb, &pk, id, "info", 2);
    pack_str(&pk, "model"), pack_str(&pk, "nosuchmodel"), pack_str(&pk, "name"), pack_str(&pk, "x");
    break;
  case 2: /* a range past the first dimension, or a reversed one */
    if (!t->ndim) t = &tens[0];
    e->code = QINS_EBAD_SLICE;
    req_begin(sb, &pk, id, "get", 3);
    pack_str(&pk, "model"), pack_str(&pk, t->model), pack_str(&pk, "name"), pack_str(&pk, t->name);
    pack_str(&pk, "slice");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_array(&pk, 2);
    if (rnd_below(g, 2)) {
      msgpack_pack_uint64(&pk, 0);
      msgpack_pack_uint64(&pk, t->shape[0] + 1 + rnd_below(g, 100));
    } else {
      msgpack_pack_uint64(&pk, 2);
      msgpack_pack_uint64(&pk, 1);
    }
    break;
  case 3:
    e->code = QINS_EDTYPE;
    req_begin(sb, &pk, id, "get", 3);
    pack_str(&pk, "model"), pack_str(&pk, t->model), pack_str(&pk, "name"), pack_str(&pk, t->name);
    pack_str(&pk, "dtype"), pack_str(&pk, "f64");
    break;
  case 4:
    e->code = QINS_EBAD_PARAMS;
    req_begin(sb, &pk, id, "get", 1);
    pack_str(&pk, "model"), pack_str(&pk, t->model);
    break;
  case 5:
    e->code = QINS_EUNKNOWN_METHOD;
    req_begin(sb, &pk, id, "no_such_method", -1);
    break;
  case 6:
    e->code = QINS_ERESPONSE_TOO_LARGE;
    req_begin(sb, &pk, id, "get", 2);
    pack_str(&pk, "model"), pack_str(&pk, "synth"), pack_str(&pk, "name"), pack_str(&pk, "q8.big");
    break;
  default: /* method not a str: PROTO with the msgid, connection stays open (PROTOCOL.md §1.1) */
    e->code = QINS_EPROTO;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 4);
    msgpack_pack_uint32(&pk, 0);
    msgpack_pack_uint32(&pk, id);
    msgpack_pack_uint32(&pk, 7);
    msgpack_pack_array(&pk, 0);
    break;
  }
}

/* One small request of any read method (no data check beyond the code). */
static void make_simple(rng *g, msgpack_sbuffer *sb, expect *e, uint32_t id, int op) {
  msgpack_packer pk;
  memset(e, 0, sizeof *e);
  e->msgid = id;
  const tinfo *t = &tens[rnd_below(g, (uint64_t)n_tens)];
  if (op == OP_LIST) {
    req_begin(sb, &pk, id, "list", 3);
    pack_str(&pk, "model"), pack_str(&pk, t->model);
    pack_str(&pk, "offset"), msgpack_pack_uint64(&pk, rnd_below(g, 20));
    pack_str(&pk, "limit"), msgpack_pack_uint64(&pk, rnd_below(g, 50));
  } else if (op == OP_INFO) {
    req_begin(sb, &pk, id, "info", 2);
    pack_str(&pk, "model"), pack_str(&pk, t->model), pack_str(&pk, "name"), pack_str(&pk, t->name);
  } else if (op == OP_MODELS) {
    req_begin(sb, &pk, id, "models", -1);
  } else if (op == OP_GET_MANY) {
    e->kind = 2;
    if (rnd_below(g, 2)) {
      req_begin(sb, &pk, id, "get_many", 2);
      pack_str(&pk, "model"), pack_str(&pk, "synth");
      pack_str(&pk, "prefix"), pack_str(&pk, "exact.");
      e->count = 3;
    } else {
      e->count = 1 + (uint32_t)rnd_below(g, 4);
      req_begin(sb, &pk, id, "get_many", 2);
      pack_str(&pk, "model"), pack_str(&pk, "synth");
      pack_str(&pk, "names");
      msgpack_pack_array(&pk, e->count);
      static const char *const small[] = {"exact.a", "exact.b", "bias", "ids", "scalar", "q16.w"};
      for (uint32_t i = 0; i < e->count; i++) pack_str(&pk, small[rnd_below(g, 6)]);
    }
  } else {
    static const char *const m[] = {"hello", "ping", "stats"};
    req_begin(sb, &pk, id, m[rnd_below(g, 3)], -1);
  }
}

/* A malformed stream on a fresh connection: one error response with msgid 0, then a close. */
static void do_malformed(rng *g) {
  static const struct { const char *bytes; size_t n; int code; } bad[] = {
    {"\xc1", 1, QINS_EPROTO},
    {"\x94\x00\x01\xa4ping\x91\x81\xa1" "a\xc6\xff\xff\xff\xff", 18, QINS_ETOO_LARGE},
    {"\x94\x01\x01\xa4ping\x90", 9, QINS_EPROTO},
    {"\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x00", 12, QINS_EPROTO},
    {"\x81\xa1" "a\x01", 4, QINS_EPROTO},
  };
  int k = (int)rnd_below(g, 5);
  conn c;
  if (conn_open(&c, sock_path)) {
    unexpected("cannot connect: %s", strerror(errno));
    return;
  }
  if (ts_send(c.fd, bad[k].bytes, bad[k].n) == 0) {
    atomic_fetch_add(&n_requests, 1);
    expect e = {.msgid = 0, .code = bad[k].code};
    const msgpack_object *r;
    if (ts_rx_next(&c.rx, RESP_TIMEOUT_MS, &r) != 1) {
      unexpected("malformed stream %d: no error response", k);
    } else {
      check_response(&e, r);
      uint64_t t = now_ms();
      int rc = ts_rx_next(&c.rx, RESP_TIMEOUT_MS, &r); /* then the server closes (EOF or reset) */
      if (rc == 1) unexpected("malformed stream %d: a second response instead of a close", k);
      else if (rc < 0 && now_ms() - t >= RESP_TIMEOUT_MS) unexpected("malformed stream %d: not closed", k);
    }
  }
  conn_close(&c);
}

/* ---- the arena: map through libqins, checked against get ------------------------------------- */
#define MAP_HELD 4 /* leases a client keeps at once (the oldest is released past it) */
typedef struct mapper {
  qins_client *c;         /* its own libqins connection, attached; NULL: none yet */
  uint64_t held[MAP_HELD]; /* leases held, oldest first */
  int n_held;
  uint8_t *buf;           /* get's copy, to compare */
} mapper;

static void mapper_close(mapper *m) {
  if (m->c) qins_close(m->c); /* the leases end with the connection */
  m->c = NULL;
  m->n_held = 0;
}

/* A random tensor or hyperslab (as make_get picks them) mapped, compared byte for byte with get
 * of the same, and kept under lease for a while; now and then the connection is closed with its
 * leases held. ARENA_FULL (every byte leased by the 64 clients) is an expected answer. */
static void do_map(rng *g, mapper *m) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  expect e;
  do {
    msgpack_sbuffer_clear(&sb);
    make_get(g, &sb, &e, 1, (int)rnd_below(g, 2));
  } while (e.t->raw || get_bytes(e.t, &e) == 0);
  msgpack_sbuffer_destroy(&sb);
  if (!m->c) {
    int rc = qins_connect(&m->c, sock_path, RESP_TIMEOUT_MS);
    if (rc == 0) rc = qins_attach(m->c, NULL);
    if (rc) {
      unexpected("map: connect and attach: %s", qins_strerror(rc));
      mapper_close(m);
      return;
    }
  }
  qins_range sl[QINS_MAX_NDIM];
  for (int d = 0; d < e.nr; d++) sl[d] = (qins_range){e.start[d], e.stop[d]};
  qins_dtype dt = (qins_dtype)e.dt;
  qins_mapped mp;
  atomic_fetch_add(&n_requests, 2);
  int mapped = 0;
  int rc = qins_map(m->c, e.t->model, e.t->name, sl, e.nr, dt, &mp);
  if (rc == QINS_EARENA_FULL) {
    atomic_fetch_add(&n_errors[-1000 - rc], 1);
    atomic_fetch_add(&n_responses, 1);
  } else if (rc) {
    unexpected("map %s/%s: %s (%s)", e.t->model, e.t->name, qins_strerror(rc),
               qins_client_error(m->c));
    mapper_close(m);
    return;
  } else {
    atomic_fetch_add(&n_responses, 1);
    if (m->n_held == MAP_HELD) {
      if ((rc = qins_release(m->c, m->held, 1)))
        unexpected("release: %s (%s)", qins_strerror(rc), qins_client_error(m->c));
      memmove(m->held, m->held + 1, (MAP_HELD - 1) * sizeof *m->held);
      m->n_held--;
    }
    m->held[m->n_held++] = mp.lease;
    mapped = 1;
  }
  size_t n = 0;
  rc = qins_get_into(m->c, e.t->model, e.t->name, sl, e.nr, dt, m->buf, 2u << 20, &n, NULL, NULL);
  atomic_fetch_add(&n_responses, 1);
  if (rc) unexpected("get %s/%s after map: %s", e.t->model, e.t->name, qins_strerror(rc));
  else if (mapped && (mp.bytes != n || memcmp(mp.data, m->buf, n)))
    unexpected("map %s/%s: %zu mapped bytes differ from get's %zu", e.t->model, e.t->name,
               mp.bytes, n);
  if (rnd_below(g, 16) == 0) mapper_close(m);
}

/* ---- a client ---------------------------------------------------------------------------------- */
typedef struct client {
  int id;
  pthread_t th;
  uint64_t deadline;
} client;

static int pick_op(rng *g) {
  int total = 0;
  for (int i = 0; i < OP_COUNT; i++) total += op_weight[i];
  int x = (int)rnd_below(g, (uint64_t)total);
  for (int i = 0; i < OP_COUNT; i++) {
    if (x < op_weight[i]) return i;
    x -= op_weight[i];
  }
  return OP_GET;
}

static void *client_main(void *arg) {
  client *cl = arg;
  rng g = {0x5eed0000ull + (uint64_t)cl->id * 7919};
  conn c = {.fd = -1};
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  expect ex[16];
  mapper mp = {.buf = malloc(2u << 20)};
  while (!atomic_load(&stop_all) && now_ms() < cl->deadline) {
    if (c.fd < 0 && conn_open(&c, sock_path)) {
      unexpected("client %d: cannot connect: %s", cl->id, strerror(errno));
      break;
    }
    int op = pick_op(&g);
    atomic_fetch_add(&n_ops[op], 1);
    msgpack_sbuffer_clear(&sb);
    int n = 0;
    switch (op) {
    case OP_GET:
    case OP_SLICE: make_get(&g, &sb, &ex[n++], c.next_id++, op == OP_SLICE); break;
    case OP_BAD: make_bad(&g, &sb, &ex[n++], c.next_id++); break;
    case OP_PIPELINE:
      for (int k = 0; k < 8; k++) {
        uint64_t kind = rnd_below(&g, 4);
        if (kind == 0) make_bad(&g, &sb, &ex[n++], c.next_id++);
        else if (kind == 1) make_simple(&g, &sb, &ex[n++], c.next_id++, OP_INFO);
        else make_get(&g, &sb, &ex[n++], c.next_id++, 1);
      }
      break;
    case OP_MALFORMED: do_malformed(&g); continue;
    case OP_MAP: do_map(&g, &mp); continue;
    case OP_ABRUPT: {
      /* Large requests (or half of one), then gone without reading. */
      if (rnd_below(&g, 2)) {
        for (int k = 0; k < 6; k++) make_get(&g, &sb, &ex[n++], c.next_id++, 1);
      } else {
        make_get(&g, &sb, &ex[n++], c.next_id++, 1);
        sb.size = sb.size / 2 + 1;
      }
      ts_send(c.fd, sb.data, sb.size);
      conn_close(&c);
      continue;
    }
    case OP_HALFCLOSE:
      for (int k = 0; k < 4; k++) make_get(&g, &sb, &ex[n++], c.next_id++, 1);
      break;
    default: make_simple(&g, &sb, &ex[n++], c.next_id++, op); break;
    }
    if (ts_send(c.fd, sb.data, sb.size)) {
      unexpected("client %d: send failed: %s", cl->id, strerror(errno));
      conn_close(&c);
      continue;
    }
    atomic_fetch_add(&n_requests, (unsigned long long)n);
    if (op == OP_HALFCLOSE) shutdown(c.fd, SHUT_WR);
    if (read_responses(&c, ex, n)) {
      conn_close(&c);
      continue;
    }
    if (op == OP_HALFCLOSE) { /* every answer came; now the server closes */
      const msgpack_object *r;
      if (ts_rx_next(&c.rx, RESP_TIMEOUT_MS, &r) != 0) unexpected("half-close: not closed after");
      conn_close(&c);
    }
  }
  conn_close(&c);
  mapper_close(&mp);
  free(mp.buf);
  msgpack_sbuffer_destroy(&sb);
  return NULL;
}

/* ---- the daemon's figures ------------------------------------------------------------------------ */
static long status_kib(pid_t pid, const char *field);
/* The daemon's RSS without its arena's shared pages (bounded by arena-bytes, kept once created). */
static long rss_kib(pid_t pid) {
  long rss = status_kib(pid, "VmRSS"), shm = status_kib(pid, "RssShmem");
  return rss < 0 || shm < 0 ? -1 : rss - shm;
}
static long status_kib(pid_t pid, const char *field) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  long v = -1;
  size_t fl = strlen(field);
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, field, fl) && line[fl] == ':') v = strtol(line + fl + 1, NULL, 10);
  fclose(f);
  return v;
}

static int count_fds(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
  int n = 0;
  DIR *d = opendir(path);
  if (!d) return -1;
  struct dirent *e;
  while ((e = readdir(d)))
    if (e->d_name[0] != '.') n++;
  closedir(d);
  return n;
}

/* Fills tens[] from the daemon's `list` of model. */
static int learn_model(const char *model) {
  conn c;
  if (conn_open(&c, sock_path)) return -1;
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  ts_req_begin(&sb, &pk, 1, "list", 2);
  pack_str(&pk, "model"), pack_str(&pk, model), pack_str(&pk, "limit"), msgpack_pack_uint32(&pk, MAX_TENSORS);
  const msgpack_object *r = ts_call(&c.rx, &sb, 1);
  msgpack_sbuffer_destroy(&sb);
  int rc = -1;
  const msgpack_object *items = r && !ts_resp_code(r) ? qp_map_get(ts_resp_result(r), "tensors") : NULL;
  if (items && items->type == MSGPACK_OBJECT_ARRAY) {
    rc = 0;
    for (uint32_t i = 0; i < items->via.array.size && n_tens < MAX_TENSORS; i++) {
      const msgpack_object *it = &items->via.array.ptr[i];
      tinfo *t = &tens[n_tens];
      memset(t, 0, sizeof *t);
      snprintf(t->model, sizeof t->model, "%s", model);
      const msgpack_object *shape = qp_map_get(it, "shape"), *codec = qp_map_get(it, "codec");
      if (qp_obj_cstr(qp_map_get(it, "name"), t->name, sizeof t->name) || !shape || !codec) {
        rc = -1;
        break;
      }
      t->ndim = (int)shape->via.array.size;
      t->n_elem = 1;
      for (int d = 0; d < t->ndim; d++) {
        t->shape[d] = shape->via.array.ptr[d].via.u64;
        t->n_elem *= t->shape[d];
      }
      t->raw = qp_obj_str_eq(codec, "raw");
      for (size_t k = 0; k < N_SYNTH; k++)
        if (!strcmp(model, "synth") && !strcmp(synth[k].name, t->name)) t->exact = synth[k].exact;
      n_tens++;
    }
  }
  conn_close(&c);
  return rc;
}

static ts_daemon dmn;
static int keep;

static void finish(int code) {
  if (dmn.pid) ts_daemon_stop(&dmn);
  if (!keep) ts_dir_remove(&dmn, code != 0);
  exit(code);
}

static void on_signal(int sig) {
  (void)sig;
  atomic_store(&stop_all, 1);
}

int main(int argc, char **argv) {
  double duration = 60;
  int n_clients = 64;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--duration") && i + 1 < argc) duration = atof(argv[++i]);
    else if (!strcmp(argv[i], "--clients") && i + 1 < argc) n_clients = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--keep")) keep = 1;
    else {
      fprintf(stderr, "usage: soak [--duration S] [--clients N] [--keep]\n");
      return 2;
    }
  }
  if (duration < 5 || n_clients < 1 || n_clients > 200) {
    fprintf(stderr, "soak: --duration must be >= 5 and --clients 1..200\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  if (ts_dir_make(&dmn)) {
    perror("soak: mkdtemp");
    return 1;
  }
  /* The store: the synthetic model, and stories260K when the shared models are here. */
  char file[160];
  snprintf(file, sizeof file, "%s/synth.safetensors", dmn.dir);
  if (write_synth(file)) {
    fprintf(stderr, "soak: cannot write %s\n", file);
    finish(1);
  }
  const char *imp[] = {"import", file, "--store", dmn.store, "--model", "synth",
                       "--codec-for", "exact.*=f32", "--codec-for", "q16.*=qins16", NULL};
  if (run_qinsctl(imp)) {
    fprintf(stderr, "soak: qinsctl import of the synthetic model failed\n");
    finish(1);
  }
  const char *shared = getenv("QINS_SHARED");
  char stories[600];
  snprintf(stories, sizeof stories, "%s/models/stories260K.safetensors", shared ? shared : "../shared");
  if (access(stories, R_OK) == 0) {
    const char *imp2[] = {"import", stories, "--store", dmn.store, "--model", "stories", NULL};
    if (run_qinsctl(imp2)) {
      fprintf(stderr, "soak: qinsctl import of %s failed\n", stories);
      finish(1);
    }
    has_stories = 1;
  }
  const char *extra[] = {"--log-level", "notice", "--max-response-bytes", MAX_RESPONSE,
                         "--stream-min-bytes", "256K", "--buffer-cache-bytes", "32M", "--arena-bytes", ARENA, NULL};
  if (ts_daemon_start(&dmn, extra)) {
    fprintf(stderr, "soak: qinsd did not start\n");
    finish(1);
  }
  sock_path = dmn.sock;
  if (learn_model("synth") || (has_stories && learn_model("stories")) || n_tens == 0) {
    fprintf(stderr, "soak: cannot list the store's tensors\n");
    finish(1);
  }
  /* qinsd opens its arena's memfd once, on the first hello: one hello first puts it in the
   * baseline. The connections are closed by the daemon shortly after ours: wait for a steady count. */
  qins_client *hc;
  if (qins_connect(&hc, sock_path, 10000) == 0) qins_close(hc);
  int fds_start = count_fds(dmn.pid);
  for (int steady = 0, i = 0; steady < 5 && i < 200; i++) {
    usleep(20000);
    int n = count_fds(dmn.pid);
    steady = n == fds_start ? steady + 1 : 0;
    fds_start = n;
  }
  printf("soak: %.0f s, %d clients, qinsd pid %d, store: synth (%d tensors)%s\n", duration,
         n_clients, (int)dmn.pid, (int)N_SYNTH, has_stories ? " + stories260K" : "");
  fflush(stdout);

  uint64_t t0 = now_ms(), end = t0 + (uint64_t)(duration * 1000);
  client *cls = calloc((size_t)n_clients, sizeof *cls);
  for (int i = 0; i < n_clients; i++) {
    cls[i].id = i;
    cls[i].deadline = end;
    if (pthread_create(&cls[i].th, NULL, client_main, &cls[i])) {
      fprintf(stderr, "soak: cannot start client %d\n", i);
      atomic_store(&stop_all, 1);
      n_clients = i;
      break;
    }
  }
  /* Warm-up: a quarter of the run, at least 5 s and at most 60 s. The daemon's RSS climbs for
   * about 10-15 s (64 clients' buffers, malloc arenas of the pool threads, the reply buffer cache)
   * before it levels off; measured from 6 s, a 60 s run read that climb as growth (+9.1 MiB one
   * run, +6.3 MiB another), while a 150 s run measured from 15 s grew 1.9 MiB. */
  double warm_s = duration / 4 < 5 ? 5 : duration / 4 > 60 ? 60 : duration / 4;
  long rss_warm = -1, anon_warm = -1;
  while (!atomic_load(&stop_all) && now_ms() < end) {
    if (rss_warm < 0 && now_ms() >= t0 + (uint64_t)(warm_s * 1000)) {
      rss_warm = rss_kib(dmn.pid);
      anon_warm = status_kib(dmn.pid, "RssAnon");
      printf("soak: warm-up done after %.0f s: %llu requests so far\n", warm_s,
             (unsigned long long)atomic_load(&n_requests));
      fflush(stdout);
    }
    usleep(100000);
    if (kill(dmn.pid, 0) != 0) {
      unexpected("qinsd died during the run");
      atomic_store(&stop_all, 1);
    }
  }
  for (int i = 0; i < n_clients; i++) pthread_join(cls[i].th, NULL);
  free(cls);
  double secs = (double)(now_ms() - t0) / 1000.0;

  /* Every client has gone: the daemon's descriptors must be back where they were. */
  int fds_end = -1;
  uint64_t settle = now_ms() + 10000;
  do {
    fds_end = count_fds(dmn.pid);
    if (fds_end == fds_start) break;
    usleep(50000);
  } while (now_ms() < settle);
  long shm_end = status_kib(dmn.pid, "RssShmem");
  long rss_end = rss_kib(dmn.pid), anon_end = status_kib(dmn.pid, "RssAnon");

  int fail = 0;
  unsigned long long req = atomic_load(&n_requests);
  printf("soak: requests %llu in %.0f s (%.0f/s), responses checked %llu, data %.1f MiB\n", req, secs,
         (double)req / secs, (unsigned long long)atomic_load(&n_responses),
         (double)atomic_load(&n_data_bytes) / 1048576.0);
  printf("soak: operations:");
  for (int i = 0; i < OP_COUNT; i++)
    printf("%s %s %llu", i ? "," : "", op_names[i], (unsigned long long)atomic_load(&n_ops[i]));
  printf("\nsoak: errors (expected):");
  int any = 0;
  for (int i = 0; i < N_CODES; i++)
    if (atomic_load(&n_errors[i])) {
      printf("%s %s %llu", any ? "," : "", qins_err_name(-1000 - i),
             (unsigned long long)atomic_load(&n_errors[i]));
      any = 1;
    }
  unsigned long long unexp = atomic_load(&n_unexpected);
  printf("%s\nsoak: errors (unexpected): %llu\n", any ? "" : " none", unexp);
  if (unexp) fail = 1;
  long grow = rss_end - rss_warm, agrow = anon_end - anon_warm;
  printf("soak: daemon RSS without the arena after warm-up %ld KiB (anon %ld KiB), at end %ld KiB "
         "(anon %ld KiB): %+ld KiB (anon %+ld KiB); arena pages %ld KiB (arena-bytes %s)\n",
         rss_warm, anon_warm, rss_end, anon_end, grow, agrow, shm_end, ARENA);
  if (shm_end < 0 || shm_end > 64 * 1024) {
    printf("soak: FAIL: the daemon's shared pages exceed arena-bytes\n");
    fail = 1;
  }
  if (rss_warm < 0 || rss_end < 0 || grow > RSS_SLACK_KIB + rss_warm / 20 ||
      agrow > RSS_SLACK_KIB + anon_warm / 20) {
    printf("soak: FAIL: daemon RSS grew beyond 8 MiB + 5%% after warm-up\n");
    fail = 1;
  }
  printf("soak: daemon open fds at start %d, at end %d\n", fds_start, fds_end);
  if (fds_start < 0 || fds_end != fds_start) {
    printf("soak: FAIL: descriptors leaked\n");
    fail = 1;
  }
  int st = ts_daemon_stop(&dmn);
  dmn.pid = 0;
  printf("soak: qinsd stopped by SIGTERM: %s\n",
         WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "exit 0" : "did NOT exit 0");
  if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)) fail = 1;
  if (atomic_load(&stop_all) && now_ms() < end) {
    printf("soak: interrupted\n");
    fail = 1;
  }
  printf("soak: %s\n", fail ? "FAILED" : "OK");
  fflush(stdout);
  finish(fail);
  return fail;
}
