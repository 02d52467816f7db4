/* SPDX-License-Identifier: MIT */
/*
 * client_api.c — libqins (client/qins.h) against a real qinsd on a temporary store and socket:
 * every call, slices equal to slicing the full decode, f16/bf16 output, buffers too small, the
 * server's errors with its messages, connection failures and timeouts, one client per thread.
 * Spec: docs/PROTOCOL.md §4 (methods), §3 (errors); qins.h (the API contract).
 *
 * The model "m" (codec f32, so a decode equals the source exactly; values ts_value(seed, i)):
 *   w [37, 129] seed 0   c3 [5, 7, 11] seed 1   layers.0.x [3, 4] seed 2   layers.0.y [4] seed 3
 *   layers.1.x [2, 2] seed 4   ints [10] raw i32
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "codec.h"
#include "daemon.h"
#include "fini_check.h"
#include "json.h"
#include "qins.h"

typedef struct ct {
  const char *name;
  int ndim;
  uint64_t shape[3];
  uint64_t seed;
} ct;

static const ct tensors[] = {
    {"w", 2, {37, 129}, 0},      {"c3", 3, {5, 7, 11}, 1}, {"layers.0.x", 2, {3, 4}, 2},
    {"layers.0.y", 1, {4}, 3},   {"layers.1.x", 2, {2, 2}, 4},
};
#define N_CT (sizeof tensors / sizeof tensors[0])
#define N_ALL (N_CT + 1) /* with "ints" */

static uint64_t ct_n(const ct *t) {
  uint64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

static int fill(qs_store *s, void *ud) {
  (void)ud;
  qs_import *im;
  int rc = qs_import_begin(s, "m", "{\"dim\": \"4\"}", &im);
  if (rc) return rc;
  for (size_t k = 0; k < N_CT && !rc; k++) {
    uint64_t n = ct_n(&tensors[k]);
    float *v = malloc(n * sizeof *v);
    for (uint64_t i = 0; i < n; i++) v[i] = ts_value(tensors[k].seed, i);
    rc = ts_import_f32(im, tensors[k].name, tensors[k].ndim, tensors[k].shape, QC_F32, v);
    free(v);
  }
  if (!rc) {
    int32_t iv[10];
    uint64_t shp[1] = {10};
    for (int i = 0; i < 10; i++) iv[i] = i * 7 - 3;
    rc = ts_import_i32(im, "ints", 1, shp, iv);
  }
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static ts_daemon D;

static void setup(void) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "starting qinsd");
}

static void teardown(void) {
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  int clean = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  ts_dir_remove(&D, !clean);
  if (!clean) fini_failed("qinsd did not exit 0 (status 0x%x)", st);
}

static qins_client *conn(void) {
  qins_client *c = NULL;
  int rc = qins_connect(&c, D.sock, 5000);
  cr_assert_eq(rc, 0, "qins_connect: %s", qins_strerror(rc));
  return c;
}

/* Expected element: the source value of tensor t at its flat index. */
static float expect_at(const ct *t, uint64_t flat) { return ts_value(t->seed, flat); }

/* Checks a hyperslab result against the source: nr ranges rg over t's leading dims. */
static void check_slab(const ct *t, int nr, const qins_range *rg, const float *got, size_t bytes,
                       const uint64_t *shape, int ndim) {
  uint64_t lo[3], hi[3], n = 1;
  cr_assert_eq(ndim, t->ndim, "ndim");
  for (int d = 0; d < t->ndim; d++) {
    lo[d] = d < nr ? rg[d].start : 0;
    hi[d] = d < nr ? rg[d].stop : t->shape[d];
    cr_assert_eq(shape[d], hi[d] - lo[d], "dim %d", d);
    n *= hi[d] - lo[d];
  }
  cr_assert_eq(bytes, n * sizeof(float));
  uint64_t idx[3] = {lo[0], lo[1], lo[2]};
  for (uint64_t k = 0; k < n; k++) {
    uint64_t off = 0;
    for (int d = 0; d < t->ndim; d++) off = off * t->shape[d] + idx[d];
    float e = expect_at(t, off);
    cr_assert(memcmp(&got[k], &e, 4) == 0, "%s element %llu: %g != %g", t->name,
              (unsigned long long)k, got[k], e);
    for (int d = t->ndim - 1; d >= 0; d--) {
      if (++idx[d] < hi[d]) break;
      idx[d] = lo[d];
    }
  }
}

TestSuite(client_api, .init = setup, .fini = teardown, .timeout = 60);

/* PROTOCOL.md §4.1 */
Test(client_api, connect_says_hello) {
  qins_client *c = conn();
  const qins_server_info *s = qins_server(c);
  cr_expect_eq(s->protocol, 1);
  cr_expect(strncmp(s->server, "qinsd", 5) == 0, "server %s", s->server);
  cr_expect_gt(s->max_request_bytes, 0);
  cr_expect_gt(s->max_response_bytes, 0);
  cr_expect_gt(s->max_connections, 0);
  cr_expect_gt(s->max_ranges, 0);
  cr_expect_eq(qins_version(), QINS_VERSION_HEX);
  cr_expect_str_empty(qins_client_error(c));
  cr_expect_eq(qins_ping(c), 0);
  qins_close(c);
  qins_close(NULL);
}

/* PROTOCOL.md §4.3 */
Test(client_api, models_lists_the_model) {
  qins_client *c = conn();
  qins_model_info *ms;
  size_t n;
  cr_assert_eq(qins_models(c, &ms, &n), 0, "%s", qins_client_error(c));
  cr_assert_eq(n, 1);
  cr_expect_str_eq(ms[0].name, "m");
  cr_expect_eq(ms[0].tensors, N_ALL);
  uint64_t elems = 10;
  for (size_t k = 0; k < N_CT; k++) elems += ct_n(&tensors[k]);
  cr_expect_eq(ms[0].n_elem, elems);
  cr_expect_gt(ms[0].stored_bytes, 0);
  cr_expect_gt(ms[0].created, 0);
  if (ms[0].metadata) cr_expect(strstr(ms[0].metadata, "dim") != NULL, "%s", ms[0].metadata);
  qins_free(ms);
  qins_close(c);
}

/* PROTOCOL.md §4.4 */
Test(client_api, list_prefix_offset_limit) {
  qins_client *c = conn();
  qins_tensor_info *ts;
  size_t n;
  uint64_t total = 0;
  cr_assert_eq(qins_list(c, "m", NULL, 0, 0, &ts, &n, &total), 0, "%s", qins_client_error(c));
  cr_assert_eq(n, N_ALL);
  cr_expect_eq(total, N_ALL);
  for (size_t i = 1; i < n; i++)
    cr_expect(strcmp(ts[i - 1].name, ts[i].name) < 0, "name order: %s %s", ts[i - 1].name,
              ts[i].name);
  char second[QINS_MAX_NAME + 1];
  strcpy(second, ts[1].name);
  qins_free(ts);

  cr_assert_eq(qins_list(c, "m", "layers.0.", 0, 0, &ts, &n, &total), 0);
  cr_assert_eq(n, 2);
  cr_expect_eq(total, 2);
  cr_expect_str_eq(ts[0].name, "layers.0.x");
  cr_expect_str_eq(ts[1].name, "layers.0.y");
  cr_expect_eq(ts[0].ndim, 2);
  cr_expect_eq(ts[0].shape[0], 3);
  cr_expect_eq(ts[0].shape[1], 4);
  qins_free(ts);

  cr_assert_eq(qins_list(c, "m", NULL, 1, 2, &ts, &n, &total), 0);
  cr_assert_eq(n, 2);
  cr_expect_eq(total, N_ALL);
  cr_expect_str_eq(ts[0].name, second);
  qins_free(ts);

  int rc = qins_list(c, "nope", NULL, 0, 0, &ts, &n, NULL);
  cr_expect_eq(rc, QINS_ENO_MODEL, "%s", qins_err_name(rc));
  cr_expect(strstr(qins_client_error(c), "NO_MODEL") != NULL, "%s", qins_client_error(c));
  cr_expect_null(ts);
  cr_expect_eq(qins_ping(c), 0, "the connection survives a server error");
  qins_close(c);
}

/* PROTOCOL.md §4.5 */
Test(client_api, info_reports_metadata) {
  qins_client *c = conn();
  qins_tensor_info ti;
  cr_assert_eq(qins_info(c, "m", "c3", &ti), 0, "%s", qins_client_error(c));
  cr_expect_str_eq(ti.name, "c3");
  cr_expect_str_eq(ti.codec, "f32");
  cr_expect_str_eq(ti.src_dtype, "f32");
  cr_expect_eq(ti.ndim, 3);
  cr_expect_eq(ti.shape[0], 5);
  cr_expect_eq(ti.shape[1], 7);
  cr_expect_eq(ti.shape[2], 11);
  cr_expect_eq(ti.n_elem, 385);
  cr_expect_eq(ti.src_bytes, 385 * 4);
  cr_expect(isinf(ti.snr_db) && ti.snr_db > 0, "lossless snr %g", ti.snr_db);
  int rc = qins_info(c, "m", "nope", &ti);
  cr_expect_eq(rc, QINS_ENO_TENSOR, "%s", qins_err_name(rc));
  cr_expect(strstr(qins_client_error(c), "nope") != NULL, "server message kept: %s",
            qins_client_error(c));
  qins_close(c);
}

/* PROTOCOL.md §4.6: full tensors, into the caller's buffer and allocated. */
Test(client_api, get_whole_tensors) {
  qins_client *c = conn();
  for (size_t k = 0; k < N_CT; k++) {
    const ct *t = &tensors[k];
    size_t cap = ct_n(t) * sizeof(float);
    float *buf = malloc(cap);
    size_t got = 0;
    uint64_t shape[QINS_MAX_NDIM];
    int nd = -1;
    int rc = qins_get_into(c, "m", t->name, NULL, 0, QINS_F32, buf, cap, &got, shape, &nd);
    cr_assert_eq(rc, 0, "%s: %s", t->name, qins_client_error(c));
    check_slab(t, 0, NULL, buf, got, shape, nd);
    free(buf);
    void *p = NULL;
    rc = qins_get(c, "m", t->name, NULL, 0, QINS_F32, &p, &got, shape, &nd);
    cr_assert_eq(rc, 0, "%s: %s", t->name, qins_client_error(c));
    cr_expect_eq((uintptr_t)p % 64, 0, "64-byte aligned");
    check_slab(t, 0, NULL, p, got, shape, nd);
    qins_free(p);
  }
  qins_close(c);
}

/* PROTOCOL.md §4.6: rows, columns, a 3-D hyperslab, empty and full ranges. */
Test(client_api, get_slices_equal_slicing_the_decode) {
  qins_client *c = conn();
  struct {
    size_t k;
    int nr;
    qins_range r[3];
  } cases[] = {
      {0, 1, {{3, 10}}},                   /* rows */
      {0, 2, {{0, 37}, {5, 17}}},          /* columns */
      {0, 2, {{36, 37}, {128, 129}}},      /* the last element */
      {0, 2, {{0, 37}, {0, 129}}},         /* full ranges */
      {1, 3, {{1, 4}, {2, 5}, {3, 9}}},    /* 3-D hyperslab */
      {1, 2, {{4, 5}, {0, 7}}},            /* leading dims only */
      {0, 1, {{2, 2}}},                    /* empty */
      {1, 3, {{0, 5}, {3, 3}, {0, 11}}},   /* empty in the middle */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const ct *t = &tensors[cases[i].k];
    float buf[5 * 7 * 11 + 37 * 129];
    size_t got = 99;
    uint64_t shape[QINS_MAX_NDIM];
    int nd = -1;
    int rc = qins_get_into(c, "m", t->name, cases[i].r, cases[i].nr, QINS_F32, buf, sizeof buf,
                           &got, shape, &nd);
    cr_assert_eq(rc, 0, "case %zu: %s", i, qins_client_error(c));
    check_slab(t, cases[i].nr, cases[i].r, buf, got, shape, nd);
  }
  qins_close(c);
}

/* PROTOCOL.md §4.6: dtype f16 and bf16, rounded to nearest even from the f32 decode. */
Test(client_api, get_f16_and_bf16) {
  qins_client *c = conn();
  const ct *t = &tensors[0];
  uint64_t n = ct_n(t);
  uint16_t *buf = malloc(n * 2);
  for (int dt = QINS_F16; dt <= QINS_BF16; dt++) {
    size_t got = 0;
    int rc = qins_get_into(c, "m", t->name, NULL, 0, (qins_dtype)dt, buf, n * 2, &got, NULL, NULL);
    cr_assert_eq(rc, 0, "%s", qins_client_error(c));
    cr_assert_eq(got, n * 2);
    for (uint64_t i = 0; i < n; i++) {
      float v = expect_at(t, i);
      uint16_t e = dt == QINS_F16 ? qc_f32_to_f16(v) : qc_f32_to_bf16(v);
      cr_assert_eq(buf[i], e, "dtype %d element %llu", dt, (unsigned long long)i);
    }
  }
  free(buf);
  qins_close(c);
}

/* The daemon's connections_total, asked over c. */
static uint64_t connections_total(qins_client *c) {
  char *js = NULL;
  cr_assert_eq(qins_stats(c, &js), 0, "%s", qins_client_error(c));
  qs_json *j = NULL;
  cr_assert_eq(qs_json_parse(js, strlen(js), &j, NULL, 0), 0, "%s", js);
  const qs_json *v = qs_json_get(j, "connections_total");
  cr_assert(v && v->type == QS_JSON_NUMBER, "%s", js);
  uint64_t n = (uint64_t)v->num;
  qs_json_free(j);
  free(js);
  return n;
}

/* qins.h: QINS_EBUFFER leaves the connection usable: the same connection (the daemon saw no new
 * one) answers the next calls, and the refused buffer is not written. */
Test(client_api, buffer_too_small_keeps_the_connection) {
  qins_client *c = conn();
  const uint64_t conns = connections_total(c);
  float small[10];
  for (int i = 0; i < 10; i++) small[i] = -1.0f;
  size_t got = 0;
  int rc = qins_get_into(c, "m", "w", NULL, 0, QINS_F32, small, sizeof small, &got, NULL, NULL);
  cr_assert_eq(rc, QINS_EBUFFER, "%s", qins_err_name(rc));
  cr_assert(strstr(qins_client_error(c), "buffer") != NULL, "%s", qins_client_error(c));
  for (int i = 0; i < 10; i++) cr_assert_eq(small[i], -1.0f, "element %d written", i);
  cr_assert_eq(qins_ping(c), 0);
  qins_range r = {0, 1};
  rc = qins_get_into(c, "m", "w", &r, 1, QINS_F32, small, sizeof small, &got, NULL, NULL);
  cr_assert_eq(rc, QINS_EBUFFER);
  float row[129];
  uint64_t shape[QINS_MAX_NDIM];
  int nd;
  rc = qins_get_into(c, "m", "w", &r, 1, QINS_F32, row, sizeof row, &got, shape, &nd);
  cr_assert_eq(rc, 0, "%s", qins_client_error(c));
  check_slab(&tensors[0], 1, &r, row, got, shape, nd);
  cr_assert_eq(connections_total(c), conns, "the client reconnected instead of keeping its connection");
  qins_close(c);
}

/* qins.h qins_get_into: a payload of exactly buf_bytes fits, one byte more does not; nothing is
 * ever written past buf_bytes (a guard region after the buffer stays as it was). */
Test(client_api, get_into_capacity_boundary_with_a_guard) {
  qins_client *c = conn();
  const ct *t = &tensors[0]; /* w [37, 129] */
  const size_t exact = ct_n(t) * 4, guard = 4096;
  uint8_t *mem = malloc(exact + 1 + guard);
  const qins_range row = {5, 6};
  const size_t row_bytes = t->shape[1] * 4;
  for (int pass = 0; pass < 2; pass++) {
    const size_t want = pass ? row_bytes : exact;
    const qins_range *sl = pass ? &row : NULL;
    for (long d = -1; d <= 1; d++) {
      size_t cap = (size_t)((long)want + d);
      memset(mem, 0xA5, exact + 1 + guard);
      size_t got = 12345;
      uint64_t shape[QINS_MAX_NDIM];
      int nd = -1;
      int rc = qins_get_into(c, "m", "w", sl, pass, QINS_F32, mem, cap, &got, shape, &nd);
      size_t clean_from = 0;
      if (d < 0) {
        cr_assert_eq(rc, QINS_EBUFFER, "%zu bytes into %zu: %s", want, cap, qins_err_name(rc));
        cr_assert(strstr(qins_client_error(c), "does not fit"), "%s", qins_client_error(c));
      } else {
        cr_assert_eq(rc, 0, "%zu bytes into %zu: %s", want, cap, qins_client_error(c));
        cr_assert_eq(got, want);
        check_slab(t, pass, sl, (const float *)mem, got, shape, nd);
        clean_from = want;
      }
      for (size_t i = clean_from; i < exact + 1 + guard; i++)
        cr_assert_eq(mem[i], 0xA5, "byte %zu written (payload %zu, buffer %zu)", i, want, cap);
    }
  }
  free(mem);
  qins_close(c);
}

/* PROTOCOL.md §4.7 */
Test(client_api, get_many_into_buffers_and_by_prefix) {
  qins_client *c = conn();
  size_t idx[3] = {2, 0, 3};
  qins_get_req req[3];
  float *bufs[3];
  for (int i = 0; i < 3; i++) {
    const ct *t = &tensors[idx[i]];
    bufs[i] = malloc(ct_n(t) * 4);
    req[i] = (qins_get_req){.name = t->name, .buf = bufs[i], .buf_bytes = ct_n(t) * 4};
  }
  int rc = qins_get_many_into(c, "m", req, 3, QINS_F32);
  cr_assert_eq(rc, 0, "%s", qins_client_error(c));
  for (int i = 0; i < 3; i++)
    check_slab(&tensors[idx[i]], 0, NULL, bufs[i], req[i].out_bytes, req[i].shape, req[i].ndim);

  /* One buffer too small: that tensor is refused, the others still arrive. */
  memset(bufs[2], 0, ct_n(&tensors[3]) * 4);
  req[0].buf_bytes = 4;
  rc = qins_get_many_into(c, "m", req, 3, QINS_F32);
  cr_expect_eq(rc, QINS_EBUFFER, "%s", qins_err_name(rc));
  check_slab(&tensors[3], 0, NULL, bufs[2], req[2].out_bytes, req[2].shape, req[2].ndim);
  for (int i = 0; i < 3; i++) free(bufs[i]);

  qins_tensor *ts;
  size_t n;
  rc = qins_get_many(c, "m", NULL, 0, "layers.", QINS_F32, &ts, &n);
  cr_assert_eq(rc, 0, "%s", qins_client_error(c));
  cr_assert_eq(n, 3);
  const char *want[3] = {"layers.0.x", "layers.0.y", "layers.1.x"};
  size_t widx[3] = {2, 3, 4};
  for (size_t i = 0; i < n; i++) {
    cr_expect_str_eq(ts[i].name, want[i]);
    cr_expect_str_eq(ts[i].dtype, "f32");
    cr_expect_eq((uintptr_t)ts[i].data % 64, 0);
    check_slab(&tensors[widx[i]], 0, NULL, ts[i].data, ts[i].bytes, ts[i].shape, ts[i].ndim);
  }
  qins_tensors_free(ts, n);

  const char *names[2] = {"c3", "nope"};
  rc = qins_get_many(c, "m", names, 2, NULL, QINS_F32, &ts, &n);
  cr_expect_eq(rc, QINS_ENO_TENSOR, "%s", qins_err_name(rc));
  cr_expect_null(ts);
  cr_expect_eq(qins_ping(c), 0);
  qins_close(c);
}

/* PROTOCOL.md §3: each error code comes back with the server's message. */
Test(client_api, server_errors_carry_codes_and_messages) {
  qins_client *c = conn();
  float buf[64];
  struct {
    const char *model, *name;
    int nr;
    qins_range r[3];
    int code;
  } cases[] = {
      {"nope", "w", 0, {{0, 0}}, QINS_ENO_MODEL},
      {"m", "nope", 0, {{0, 0}}, QINS_ENO_TENSOR},
      {"m", "w", 1, {{0, 38}}, QINS_EBAD_SLICE},             /* out of range */
      {"m", "w", 1, {{5, 4}}, QINS_EBAD_SLICE},              /* reversed */
      {"m", "w", 3, {{0, 1}, {0, 1}, {0, 1}}, QINS_EBAD_SLICE}, /* more ranges than dims */
      {"m", "ints", 0, {{0, 0}}, QINS_EDTYPE},               /* raw asked as float */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int rc = qins_get_into(c, cases[i].model, cases[i].name, cases[i].r, cases[i].nr, QINS_F32,
                           buf, sizeof buf, NULL, NULL, NULL);
    cr_expect_eq(rc, cases[i].code, "case %zu: %s (%s)", i, qins_err_name(rc),
                 qins_client_error(c));
    cr_expect(strstr(qins_client_error(c), qins_err_name(cases[i].code)) != NULL, "case %zu: %s",
              i, qins_client_error(c));
    cr_expect_gt(strlen(qins_client_error(c)), strlen(qins_err_name(cases[i].code)) + 8,
                 "case %zu: the server's message is kept: %s", i, qins_client_error(c));
  }
  cr_expect_eq(qins_get_into(c, "m", "w", NULL, -1, QINS_F32, buf, sizeof buf, NULL, NULL, NULL),
               QINS_EINVALID);
  cr_expect_eq(qins_get_into(c, "m", "w", NULL, 0, (qins_dtype)7, buf, sizeof buf, NULL, NULL,
                             NULL),
               QINS_EDTYPE);
  cr_expect_eq(qins_ping(c), 0, "still connected");
  qins_close(c);
}

/* PROTOCOL.md §4.8 */
Test(client_api, stats_as_json) {
  qins_client *c = conn();
  float buf[4];
  cr_assert_eq(qins_get_into(c, "m", "layers.0.y", NULL, 0, QINS_F32, buf, sizeof buf, NULL, NULL,
                             NULL),
               0);
  char *js = NULL;
  cr_assert_eq(qins_stats(c, &js), 0, "%s", qins_client_error(c));
  qs_json *j = NULL;
  char err[128];
  cr_assert_eq(qs_json_parse(js, strlen(js), &j, err, sizeof err), 0, "%s: %s", err, js);
  cr_expect_eq(j->type, QS_JSON_OBJECT);
  const qs_json *req = qs_json_get(j, "requests");
  cr_assert(req && req->type == QS_JSON_OBJECT, "requests: %s", js);
  const qs_json *g = qs_json_get(req, "get");
  cr_expect(g && g->type == QS_JSON_NUMBER && g->num >= 1, "requests.get: %s", js);
  const qs_json *b = qs_json_get(j, "bytes_served");
  cr_expect(b && b->type == QS_JSON_NUMBER && b->num >= 16, "bytes_served: %s", js);
  qs_json_free(j);
  qins_free(js);
  qins_close(c);
}

/* qins.h: connect failures are negated errno values or project codes, never a crash. */
Test(client_api, connect_failures) {
  qins_client *c = (qins_client *)1;
  char path[128];
  snprintf(path, sizeof path, "%s/none", D.dir);
  cr_expect_eq(qins_connect(&c, path, 1000), -ENOENT);
  cr_expect_null(c);
  char longp[200];
  memset(longp, 'x', sizeof longp - 1);
  longp[sizeof longp - 1] = 0;
  cr_expect_eq(qins_connect(&c, longp, 1000), QINS_ENAME);
  cr_expect_eq(qins_connect(&c, NULL, 1000), QINS_EINVALID);
}

/* qins.h: a peer that accepts but never answers hello makes connect time out. */
Test(client_api, connect_times_out_on_a_silent_peer) {
  char path[128];
  snprintf(path, sizeof path, "%s/silent", D.dir);
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, path);
  cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  cr_assert_eq(listen(fd, 4), 0);
  qins_client *c = NULL;
  cr_expect_eq(qins_connect(&c, path, 200), QINS_ETIMEOUT);
  cr_expect_null(c);
  close(fd);
}

/* qins.h: the daemon going away is an error on the next call, not a crash or a hang. */
Test(client_api, shutdown_then_calls_fail_cleanly) {
  qins_client *c = conn();
  qins_client *c2 = conn();
  cr_assert_eq(qins_shutdown(c), 0, "%s", qins_client_error(c));
  int st = ts_daemon_wait(&D, 10000);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "qinsd exit status 0x%x", st);
  D.pid = 0;
  qins_set_retry(c2, 200); /* nobody restarts it: the budget is spent */
  int rc = qins_ping(c2);
  cr_expect_eq(rc, QINS_ECLOSED, "ping after shutdown: %s (%s)", qins_err_name(rc),
               qins_client_error(c2));
  cr_expect(strstr(qins_client_error(c2), D.sock) != NULL, "%s", qins_client_error(c2));
  cr_expect_eq(qins_ping(c2), QINS_ECLOSED);
  qins_close(c);
  qins_close(c2);
}

typedef struct worker_arg {
  int id;
  int failures;
} worker_arg;

static void *worker(void *p) {
  worker_arg *a = p;
  qins_client *c = NULL;
  if (qins_connect(&c, D.sock, 5000)) {
    a->failures = -1;
    return NULL;
  }
  const ct *t = &tensors[0];
  float row[129];
  for (int i = 0; i < 40; i++) {
    uint64_t r0 = (uint64_t)(a->id * 7 + i) % 37;
    qins_range r = {r0, r0 + 1};
    size_t got = 0;
    if (qins_get_into(c, "m", t->name, &r, 1, QINS_F32, row, sizeof row, &got, NULL, NULL) ||
        got != sizeof row) {
      a->failures++;
      continue;
    }
    for (int j = 0; j < 129; j++) {
      float e = expect_at(t, r0 * 129 + (uint64_t)j);
      if (memcmp(&row[j], &e, 4)) {
        a->failures++;
        break;
      }
    }
  }
  qins_close(c);
  return NULL;
}

/* qins.h: one client per thread, all at once. */
Test(client_api, one_client_per_thread) {
  enum { NT = 8 };
  pthread_t th[NT];
  worker_arg args[NT];
  for (int i = 0; i < NT; i++) {
    args[i] = (worker_arg){.id = i};
    cr_assert_eq(pthread_create(&th[i], NULL, worker, &args[i]), 0);
  }
  for (int i = 0; i < NT; i++) {
    pthread_join(th[i], NULL);
    cr_expect_eq(args[i].failures, 0, "thread %d: %d failures", i, args[i].failures);
  }
}
