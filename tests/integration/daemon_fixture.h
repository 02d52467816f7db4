/* SPDX-License-Identifier: MIT */
/*
 * daemon_fixture.h — shared by tests/integration/daemon_*.c: the standard test model, a Criterion
 * .init/.fini pair that gives each test its own temp dir, store and qinsd, and raw-msgpack helpers
 * for `get`. Header-only (static) so each test file keeps its own fixture state.
 *
 * The standard model "m" (codec f32 unless said, so a full decode equals the source exactly):
 *   a.w [37, 129]     a.b [129]       c3 [5, 7, 11]        big [1024, 600] (2.4 MB: pool decode)
 *   q8 [64, 96] qins8 ints [10] i32   l.0.x [3, 4]  l.0.y [4]  l.1.x [2, 2]  scalar [] (0-D)
 * Values: ts_value(seed = index in std_tensors, element index).
 */
#ifndef QINS_DAEMON_FIXTURE_H
#define QINS_DAEMON_FIXTURE_H

#include <criterion/criterion.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon.h"
#include "fini_check.h"
#include "proto.h"
#include "qt.h"

typedef struct std_tensor {
  const char *name;
  int ndim;
  uint64_t shape[4];
  int codec; /* QC_* or QS_RAW */
} std_tensor;

static const std_tensor std_tensors[] = {
  {"a.w", 2, {37, 129}, QC_F32},  {"a.b", 1, {129}, QC_F32},     {"c3", 3, {5, 7, 11}, QC_F32},
  {"big", 2, {1024, 600}, QC_F32}, {"q8", 2, {64, 96}, QC_QINS8}, {"ints", 1, {10}, QS_RAW},
  {"l.0.x", 2, {3, 4}, QC_F32},   {"l.0.y", 1, {4}, QC_F32},     {"l.1.x", 2, {2, 2}, QC_F32},
  {"scalar", 0, {0}, QC_F32},
};
#define N_STD (sizeof std_tensors / sizeof std_tensors[0])

__attribute__((unused)) static uint64_t std_n(const std_tensor *t) {
  uint64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

__attribute__((unused)) static const std_tensor *std_find(const char *name) {
  for (size_t i = 0; i < N_STD; i++)
    if (!strcmp(std_tensors[i].name, name)) return &std_tensors[i];
  return NULL;
}

/* Imports model `model` made of the standard tensors (all, or those whose name starts with
 * ud's prefix when ud is a non-empty string). */
static int fill_model(qs_store *s, const char *model, uint64_t seed_base) {
  qs_import *im;
  int rc = qs_import_begin(s, model, "{\"test\": true}", &im);
  if (rc) return rc;
  for (size_t k = 0; k < N_STD && !rc; k++) {
    const std_tensor *t = &std_tensors[k];
    uint64_t n = std_n(t);
    if (t->codec == QS_RAW) {
      int32_t *v = malloc(n * sizeof *v);
      for (uint64_t i = 0; i < n; i++) v[i] = (int32_t)(i * 1000003u) - 7;
      rc = ts_import_i32(im, t->name, t->ndim, t->shape, v);
      free(v);
    } else {
      float *v = malloc(n * sizeof *v);
      for (uint64_t i = 0; i < n; i++) v[i] = ts_value(seed_base + k, i);
      rc = ts_import_f32(im, t->name, t->ndim, t->shape, t->codec, v);
      free(v);
    }
  }
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static int fill_std(qs_store *s, void *ud) {
  (void)ud;
  return fill_model(s, "m", 0);
}

static ts_daemon D;
static const char *const *fixture_args; /* extra qinsd flags for the next setup */
static int fixture_no_fill;             /* start on an empty store */

__attribute__((unused)) static void setup(void) {
  /* Criterion runs a suite's .init and then a test's own .init: a test-specific setup calls this
   * again, and the suite's daemon must go first. */
  if (D.dir[0]) ts_dir_remove(&D, 0);
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  if (!fixture_no_fill) cr_assert_eq(ts_store_fill(D.store, fill_std, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, fixture_args), 0, "starting qinsd");
}

static void teardown(void) {
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  int clean = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  ts_dir_remove(&D, !clean);
  if (!clean) fini_failed("qinsd did not exit 0 on SIGTERM (status 0x%x)", st);
}

/* Opens a connection to the fixture's daemon. */
static void open_rx(ts_rx *rx) {
  int fd = ts_connect(D.sock);
  cr_assert_geq(fd, 0, "connect %s: %s", D.sock, strerror(-fd));
  ts_rx_init(rx, fd);
}

/* Runs $QINS_BUILD/name with args (NULL-terminated, at most 14); its stdout is dropped, its stderr
 * goes to ours. Returns qt_run's status (exit status, 128 + signal, or -1). */
__attribute__((unused)) static int run_built(const char *name, const char *const *args) {
  char bin[512];
  char *argv[16] = {(char *)ts_build_path(name, bin, sizeof bin)};
  int n = 1;
  for (int i = 0; args[i] && n < 15; i++) argv[n++] = (char *)args[i];
  argv[n] = NULL;
  char *err = NULL;
  int st = qt_run(argv, NULL, NULL, &err);
  if (err && *err) fputs(err, stderr);
  free(err);
  return st;
}

/* A "Vm...: N kB" line of the fixture daemon's /proc status (VmHWM, VmRSS), or -1. */
__attribute__((unused)) static long daemon_kib(const char *field) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)D.pid);
  FILE *f = fopen(path, "r");
  long v = -1;
  size_t fl = strlen(field);
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, field, fl) && line[fl] == ':') v = strtol(line + fl + 1, NULL, 10);
  if (f) fclose(f);
  return v;
}

/* ping over rx: 1 when "pong" came back. */
__attribute__((unused)) static int ping_on(ts_rx *rx, uint32_t id) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "ping", -1);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  return r && ts_resp_code(r) == 0 && qp_obj_str_eq(ts_resp_result(r), "pong");
}

/* The unsigned integer at key k of map m (asserted present and unsigned). */
__attribute__((unused)) static uint64_t map_u64(const msgpack_object *m, const char *k) {
  const msgpack_object *v = qp_map_get(m, k);
  cr_assert(v, "key %s missing", k);
  cr_assert_eq(v->type, MSGPACK_OBJECT_POSITIVE_INTEGER, "key %s not uint", k);
  return v->via.u64;
}

/* stats over rx (asserted to succeed): the result map, valid until rx's next call. */
__attribute__((unused)) static const msgpack_object *stats_on(ts_rx *rx) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 99, "stats", -1);
  const msgpack_object *r = ts_call(rx, &sb, 99);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r && ts_resp_code(r) == 0, "stats answered");
  return ts_resp_result(r);
}

/* The float at bytes p (unaligned) of dtype name dt, widened to f32. */
__attribute__((unused)) static float elem_f32(const char *dt, const uint8_t *p, uint64_t i) {
  if (!strcmp(dt, "f32")) {
    float f;
    memcpy(&f, p + 4 * i, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, p + 2 * i, 2);
  return !strcmp(dt, "f16") ? qc_f16_to_f32(h) : qc_bf16_to_f32(h);
}

typedef struct got {
  int code;               /* 0 or the error code */
  char dtype[8];          /* result dtype */
  int ndim;               /* result shape */
  uint64_t shape[8];
  uint8_t *data;          /* malloc'd copy of the payload */
  size_t bytes;
} got;

/* Parses a get-style result map {shape, dtype, data} into g (data copied). */
__attribute__((unused)) static void parse_tensor_map(const msgpack_object *m, got *g) {
  const msgpack_object *shape = qp_map_get(m, "shape"), *dt = qp_map_get(m, "dtype"),
                       *data = qp_map_get(m, "data");
  cr_assert(shape && dt && data, "result lacks shape/dtype/data");
  cr_assert_eq(shape->type, MSGPACK_OBJECT_ARRAY);
  cr_assert_eq(data->type, MSGPACK_OBJECT_BIN);
  /* data is the last key (PROTOCOL.md §1). */
  cr_assert(qp_obj_str_eq(&m->via.map.ptr[m->via.map.size - 1].key, "data"));
  g->ndim = (int)shape->via.array.size;
  for (int i = 0; i < g->ndim; i++) g->shape[i] = shape->via.array.ptr[i].via.u64;
  cr_assert_eq(qp_obj_cstr(dt, g->dtype, sizeof g->dtype), 0);
  g->bytes = data->via.bin.size;
  g->data = malloc(g->bytes ? g->bytes : 1);
  memcpy(g->data, data->via.bin.ptr, g->bytes);
}

/* get over rx: nr ranges (nr < 0: no slice key), dtype NULL for default. */
__attribute__((unused)) static got do_get(ts_rx *rx, const char *model, const char *name, int nr, const uint64_t (*rg)[2],
                  const char *dtype) {
  static uint32_t msgid = 100;
  msgid++;
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, msgid, "get", 2 + (nr >= 0) + (dtype != NULL));
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, model);
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, name);
  if (nr >= 0) {
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, (size_t)nr);
    for (int i = 0; i < nr; i++) {
      msgpack_pack_array(&pk, 2);
      msgpack_pack_uint64(&pk, rg[i][0]);
      msgpack_pack_uint64(&pk, rg[i][1]);
    }
  }
  if (dtype) {
    qp_pack_cstr(&pk, "dtype");
    qp_pack_cstr(&pk, dtype);
  }
  const msgpack_object *r = ts_call(rx, &sb, msgid);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r, "no response to get %s/%s", model, name);
  got g;
  memset(&g, 0, sizeof g);
  g.code = ts_resp_code(r);
  if (g.code == 0) parse_tensor_map(ts_resp_result(r), &g);
  return g;
}

/* The hyperslab of a row-major full array (esize-byte elements) as a new buffer. */
__attribute__((unused)) static uint8_t *slice_ref(const uint8_t *full, int ndim, const uint64_t *shape, size_t esize,
                          int nr, const uint64_t (*rg)[2], uint64_t *out_n) {
  uint64_t lo[8], hi[8], n = 1;
  for (int d = 0; d < ndim; d++) {
    lo[d] = d < nr ? rg[d][0] : 0;
    hi[d] = d < nr ? rg[d][1] : shape[d];
    n *= hi[d] - lo[d];
  }
  uint8_t *out = malloc(n * esize + 1);
  *out_n = n;
  if (n == 0) return out;
  uint64_t idx[8];
  for (int d = 0; d < ndim; d++) idx[d] = lo[d];
  for (uint64_t k = 0; k < n; k++) {
    uint64_t off = 0;
    for (int d = 0; d < ndim; d++) off = off * shape[d] + idx[d];
    memcpy(out + k * esize, full + off * esize, esize);
    for (int d = ndim - 1; d >= 0; d--) {
      if (++idx[d] < hi[d]) break;
      idx[d] = lo[d];
    }
  }
  return out;
}

#endif /* QINS_DAEMON_FIXTURE_H */
