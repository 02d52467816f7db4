/* SPDX-License-Identifier: MIT */
/*
 * daemon_methods.c — every qinsd method over raw msgpack-RPC (docs/PROTOCOL.md §4): hello, ping,
 * models, list, info, get (full, rows, columns, 3-D hyperslab, empty and full ranges, each equal
 * to slicing the full decode; f16/bf16 output; raw tensors), get_many, stats, shutdown; pipelined
 * requests on one connection; 32 concurrent clients; SIGTERM finishing in-flight work.
 */
#include <pthread.h>
#include <sys/socket.h>
#include <stdio.h>

#include "daemon_fixture.h"

TestSuite(daemon_methods, .init = setup, .fini = teardown, .timeout = 60);

/* Simple call with no params over a fresh connection; returns result via callback check. */
static const msgpack_object *call0(ts_rx *rx, const char *method, uint32_t id) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, method, -1);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r, "no response to %s", method);
  return r;
}

/* PROTOCOL.md §4.1 */
Test(daemon_methods, hello_reports_version_and_limits) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = call0(&rx, "hello", 1);
  cr_assert_eq(ts_resp_code(r), 0);
  const msgpack_object *m = ts_resp_result(r);
  cr_assert_eq(map_u64(m, "protocol"), 1);
  cr_assert(qp_obj_str_eq(qp_map_get(m, "server"), "qinsd " QINS_VERSION_STRING));
  cr_assert_eq(map_u64(m, "max_request_bytes"), 1 << 20);
  cr_assert_eq(map_u64(m, "max_response_bytes"), 1ull << 30);
  cr_assert_eq(map_u64(m, "max_connections"), 256);
  cr_assert_eq(map_u64(m, "max_ranges"), 8);
  const msgpack_object *dt = qp_map_get(m, "dtypes");
  cr_assert(dt && dt->type == MSGPACK_OBJECT_ARRAY && dt->via.array.size == 3);
  cr_assert(qp_obj_str_eq(&dt->via.array.ptr[0], "f32"));
  cr_assert(qp_obj_str_eq(&dt->via.array.ptr[1], "f16"));
  cr_assert(qp_obj_str_eq(&dt->via.array.ptr[2], "bf16"));
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.2 */
Test(daemon_methods, ping_pongs_and_params_may_be_an_empty_map) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = call0(&rx, "ping", 7);
  cr_assert_eq(ts_resp_code(r), 0);
  cr_assert(qp_obj_str_eq(ts_resp_result(r), "pong"));
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 8, "ping", 1);
  qp_pack_cstr(&pk, "unknown_key_is_ignored");
  msgpack_pack_true(&pk);
  r = ts_call(&rx, &sb, 8);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r && ts_resp_code(r) == 0);
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.3 */
Test(daemon_methods, models_lists_the_model) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = call0(&rx, "models", 2);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  const msgpack_object *a = ts_resp_result(r);
  cr_assert_eq(a->type, MSGPACK_OBJECT_ARRAY);
  cr_assert_eq(a->via.array.size, 1);
  const msgpack_object *m = &a->via.array.ptr[0];
  cr_assert(qp_obj_str_eq(qp_map_get(m, "name"), "m"));
  cr_assert_eq(map_u64(m, "tensors"), N_STD);
  uint64_t n = 0;
  for (size_t i = 0; i < N_STD; i++) n += std_n(&std_tensors[i]);
  cr_assert_eq(map_u64(m, "n_elem"), n);
  cr_assert_gt(map_u64(m, "stored_bytes"), 0);
  cr_assert_gt(map_u64(m, "created"), 1600000000);
  ts_rx_destroy(&rx);
}

static const msgpack_object *list(ts_rx *rx, uint32_t id, const char *prefix, int64_t off,
                                  int64_t lim) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "list", 1 + (prefix != NULL) + (off >= 0) + (lim >= 0));
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "m");
  if (prefix) {
    qp_pack_cstr(&pk, "prefix");
    qp_pack_cstr(&pk, prefix);
  }
  if (off >= 0) {
    qp_pack_cstr(&pk, "offset");
    msgpack_pack_uint64(&pk, (uint64_t)off);
  }
  if (lim >= 0) {
    qp_pack_cstr(&pk, "limit");
    msgpack_pack_uint64(&pk, (uint64_t)lim);
  }
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  return ts_resp_result(r);
}

/* PROTOCOL.md §4.4 */
Test(daemon_methods, list_in_name_order_with_prefix_offset_limit) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *m = list(&rx, 3, NULL, -1, -1);
  cr_assert_eq(map_u64(m, "total"), N_STD);
  const msgpack_object *t = qp_map_get(m, "tensors");
  cr_assert_eq(t->via.array.size, N_STD);
  for (uint32_t i = 1; i < t->via.array.size; i++) {
    const msgpack_object *a = qp_map_get(&t->via.array.ptr[i - 1], "name");
    const msgpack_object *b = qp_map_get(&t->via.array.ptr[i], "name");
    size_t n = a->via.str.size < b->via.str.size ? a->via.str.size : b->via.str.size;
    int c = memcmp(a->via.str.ptr, b->via.str.ptr, n);
    cr_assert(c < 0 || (c == 0 && a->via.str.size < b->via.str.size), "not in name order");
  }
  m = list(&rx, 4, "l.", -1, -1);
  cr_assert_eq(map_u64(m, "total"), 3);
  t = qp_map_get(m, "tensors");
  cr_assert_eq(t->via.array.size, 3);
  cr_assert(qp_obj_str_eq(qp_map_get(&t->via.array.ptr[0], "name"), "l.0.x"));
  m = list(&rx, 5, "l.", 1, 1);
  cr_assert_eq(map_u64(m, "total"), 3);
  t = qp_map_get(m, "tensors");
  cr_assert_eq(t->via.array.size, 1);
  cr_assert(qp_obj_str_eq(qp_map_get(&t->via.array.ptr[0], "name"), "l.0.y"));
  m = list(&rx, 6, "zzz", -1, -1);
  cr_assert_eq(map_u64(m, "total"), 0);
  ts_rx_destroy(&rx);
}

static const msgpack_object *info(ts_rx *rx, uint32_t id, const char *name) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "info", 2);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "m");
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, name);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r);
  return r;
}

/* PROTOCOL.md §4.5 */
Test(daemon_methods, info_fields) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = info(&rx, 9, "c3");
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  const msgpack_object *m = ts_resp_result(r);
  cr_assert(qp_obj_str_eq(qp_map_get(m, "name"), "c3"));
  cr_assert(qp_obj_str_eq(qp_map_get(m, "codec"), "f32"));
  cr_assert(qp_obj_str_eq(qp_map_get(m, "src_dtype"), "f32"));
  const msgpack_object *sh = qp_map_get(m, "shape");
  cr_assert_eq(sh->via.array.size, 3);
  cr_assert_eq(sh->via.array.ptr[2].via.u64, 11);
  cr_assert_eq(map_u64(m, "n_elem"), 5 * 7 * 11);
  cr_assert_eq(map_u64(m, "src_bytes"), 5 * 7 * 11 * 4);
  const msgpack_object *snr = qp_map_get(m, "snr_db");
  cr_assert(snr && snr->type == MSGPACK_OBJECT_FLOAT64 && isinf(snr->via.f64));
  r = info(&rx, 10, "q8");
  m = ts_resp_result(r);
  cr_assert(qp_obj_str_eq(qp_map_get(m, "codec"), "qins8"));
  snr = qp_map_get(m, "snr_db");
  cr_assert(isfinite(snr->via.f64) && snr->via.f64 > 20.0, "qins8 snr %f", snr->via.f64);
  r = info(&rx, 11, "ints");
  m = ts_resp_result(r);
  cr_assert(qp_obj_str_eq(qp_map_get(m, "codec"), "raw"));
  cr_assert(qp_obj_str_eq(qp_map_get(m, "src_dtype"), "i32"));
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.6: full gets equal the imported values exactly (codec f32). */
Test(daemon_methods, get_full_equals_source) {
  ts_rx rx;
  open_rx(&rx);
  for (size_t k = 0; k < N_STD; k++) {
    const std_tensor *t = &std_tensors[k];
    if (t->codec != QC_F32) continue;
    got g = do_get(&rx, "m", t->name, -1, NULL, NULL);
    cr_assert_eq(g.code, 0, "get %s", t->name);
    cr_assert_str_eq(g.dtype, "f32");
    cr_assert_eq(g.ndim, t->ndim);
    for (int d = 0; d < t->ndim; d++) cr_assert_eq(g.shape[d], t->shape[d]);
    uint64_t n = std_n(t);
    cr_assert_eq(g.bytes, n * 4);
    for (uint64_t i = 0; i < n; i++) {
      float want = ts_value(k, i), have;
      memcpy(&have, g.data + 4 * i, 4);
      cr_assert(memcmp(&want, &have, 4) == 0, "%s[%llu]: %a != %a", t->name,
                (unsigned long long)i, have, want);
    }
    free(g.data);
  }
  ts_rx_destroy(&rx);
}

/* Gets tensor `name` sliced by rg and checks it equals slicing its full decode, for one dtype. */
static void check_slice(ts_rx *rx, const char *name, int nr, const uint64_t (*rg)[2],
                        const char *dtype) {
  const std_tensor *t = std_find(name);
  got full = do_get(rx, "m", name, -1, NULL, dtype);
  cr_assert_eq(full.code, 0);
  got s = do_get(rx, "m", name, nr, rg, dtype);
  cr_assert_eq(s.code, 0, "slice of %s", name);
  size_t es = !dtype || !strcmp(dtype, "f32") ? 4 : 2;
  uint64_t n;
  uint8_t *want = slice_ref(full.data, t->ndim, t->shape, es, nr, rg, &n);
  cr_assert_eq(s.ndim, t->ndim);
  for (int d = 0; d < t->ndim; d++) {
    uint64_t ext = d < nr ? rg[d][1] - rg[d][0] : t->shape[d];
    cr_assert_eq(s.shape[d], ext, "%s dim %d", name, d);
  }
  cr_assert_eq(s.bytes, n * es, "%s: %zu bytes, want %llu", name, s.bytes,
               (unsigned long long)(n * es));
  cr_assert(n == 0 || memcmp(s.data, want, n * es) == 0, "%s slice differs from the full decode",
            name);
  free(want);
  free(full.data);
  free(s.data);
}

/* PROTOCOL.md §4.6: rows, columns, 3-D hyperslab, empty and full ranges. */
Test(daemon_methods, slices_equal_slicing_the_full_decode) {
  ts_rx rx;
  open_rx(&rx);
  const uint64_t rows[1][2] = {{3, 17}};
  const uint64_t cols[2][2] = {{0, 37}, {5, 100}};
  const uint64_t hyper[3][2] = {{1, 4}, {2, 7}, {3, 9}};
  const uint64_t empty[2][2] = {{4, 4}, {0, 129}};
  const uint64_t empty_col[2][2] = {{0, 37}, {129, 129}};
  const uint64_t full[2][2] = {{0, 37}, {0, 129}};
  const uint64_t big_rows[1][2] = {{100, 900}};
  const uint64_t big_cols[2][2] = {{0, 1024}, {599, 600}};
  const uint64_t q8[2][2] = {{10, 50}, {31, 77}};
  const char *dts[] = {NULL, "f16", "bf16"};
  for (int i = 0; i < 3; i++) {
    check_slice(&rx, "a.w", 1, rows, dts[i]);
    check_slice(&rx, "a.w", 2, cols, dts[i]);
    check_slice(&rx, "c3", 3, hyper, dts[i]);
    check_slice(&rx, "a.w", 2, empty, dts[i]);
    check_slice(&rx, "a.w", 2, empty_col, dts[i]);
    check_slice(&rx, "a.w", 2, full, dts[i]);
    check_slice(&rx, "a.w", 0, NULL, dts[i]);
    check_slice(&rx, "big", 1, big_rows, dts[i]);
    check_slice(&rx, "big", 2, big_cols, dts[i]);
    check_slice(&rx, "q8", 2, q8, dts[i]);
  }
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.6: f16 and bf16 outputs are the f32 decode rounded to nearest even. */
Test(daemon_methods, f16_bf16_are_rounded_f32) {
  ts_rx rx;
  open_rx(&rx);
  const char *names[] = {"a.w", "q8", "big"};
  for (int k = 0; k < 3; k++) {
    got f = do_get(&rx, "m", names[k], -1, NULL, "f32");
    got h = do_get(&rx, "m", names[k], -1, NULL, "f16");
    got b = do_get(&rx, "m", names[k], -1, NULL, "bf16");
    cr_assert_eq(f.code | h.code | b.code, 0);
    cr_assert_str_eq(h.dtype, "f16");
    cr_assert_str_eq(b.dtype, "bf16");
    uint64_t n = f.bytes / 4;
    cr_assert_eq(h.bytes, n * 2);
    cr_assert_eq(b.bytes, n * 2);
    for (uint64_t i = 0; i < n; i++) {
      float v;
      memcpy(&v, f.data + 4 * i, 4);
      uint16_t hh, bb;
      memcpy(&hh, h.data + 2 * i, 2);
      memcpy(&bb, b.data + 2 * i, 2);
      cr_assert_eq(hh, qc_f32_to_f16(v), "%s[%llu] f16", names[k], (unsigned long long)i);
      cr_assert_eq(bb, qc_f32_to_bf16(v), "%s[%llu] bf16", names[k], (unsigned long long)i);
      cr_assert(fabsf(elem_f32("f16", h.data, i) - v) <= fabsf(v) * 0x1p-10f + 0x1p-24f);
    }
    free(f.data);
    free(h.data);
    free(b.data);
  }
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.5-4.6: a 0-D tensor has shape [] and one element; slicing it is BAD_SLICE. */
Test(daemon_methods, scalar_tensor) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = info(&rx, 12, "scalar");
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  cr_assert_eq(qp_map_get(ts_resp_result(r), "shape")->via.array.size, 0);
  cr_assert_eq(map_u64(ts_resp_result(r), "n_elem"), 1);
  got g = do_get(&rx, "m", "scalar", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(g.ndim, 0);
  cr_assert_eq(g.bytes, 4);
  cr_assert_eq(elem_f32("f32", g.data, 0), ts_value(9, 0));
  free(g.data);
  const uint64_t rg[1][2] = {{0, 1}};
  g = do_get(&rx, "m", "scalar", 1, rg, NULL);
  cr_assert_eq(g.code, QINS_EBAD_SLICE);
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.6: raw tensors come back as stored, with their own dtype. */
Test(daemon_methods, raw_tensor_as_stored) {
  ts_rx rx;
  open_rx(&rx);
  got g = do_get(&rx, "m", "ints", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_str_eq(g.dtype, "i32");
  cr_assert_eq(g.bytes, 40);
  for (int i = 0; i < 10; i++) {
    int32_t v;
    memcpy(&v, g.data + 4 * i, 4);
    cr_assert_eq(v, (int32_t)(i * 1000003u) - 7);
  }
  free(g.data);
  const uint64_t rg[1][2] = {{2, 5}};
  g = do_get(&rx, "m", "ints", 1, rg, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(g.bytes, 12);
  int32_t v;
  memcpy(&v, g.data, 4);
  cr_assert_eq(v, (int32_t)(2 * 1000003u) - 7);
  free(g.data);
  ts_rx_destroy(&rx);
}

static const msgpack_object *get_many(ts_rx *rx, uint32_t id, const char *const *names, int n,
                                      const char *prefix, const char *dtype) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "get_many", 2 + (dtype != NULL));
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "m");
  if (names) {
    qp_pack_cstr(&pk, "names");
    msgpack_pack_array(&pk, (size_t)n);
    for (int i = 0; i < n; i++) qp_pack_cstr(&pk, names[i]);
  } else {
    qp_pack_cstr(&pk, "prefix");
    qp_pack_cstr(&pk, prefix);
  }
  if (dtype) {
    qp_pack_cstr(&pk, "dtype");
    qp_pack_cstr(&pk, dtype);
  }
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r);
  return r;
}

/* PROTOCOL.md §4.7 */
Test(daemon_methods, get_many_by_names_and_prefix_equal_single_gets) {
  ts_rx rx, rx2;
  open_rx(&rx);
  open_rx(&rx2);
  const char *names[] = {"c3", "a.b", "big", "ints"};
  const char *dts[] = {NULL, "bf16"};
  for (int di = 0; di < 2; di++) {
    const msgpack_object *r = get_many(&rx, 20 + di, dts[di] ? names : names, dts[di] ? 3 : 4,
                                       NULL, dts[di]);
    cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
    const msgpack_object *t = qp_map_get(ts_resp_result(r), "tensors");
    cr_assert_eq(t->via.array.size, dts[di] ? 3 : 4);
    for (uint32_t i = 0; i < t->via.array.size; i++) {
      const msgpack_object *e = &t->via.array.ptr[i];
      cr_assert(qp_obj_str_eq(qp_map_get(e, "name"), names[i]), "order of names");
      got a;
      memset(&a, 0, sizeof a);
      parse_tensor_map(e, &a);
      got b = do_get(&rx2, "m", names[i], -1, NULL, dts[di]);
      cr_assert_eq(b.code, 0);
      cr_assert_str_eq(a.dtype, b.dtype);
      cr_assert_eq(a.bytes, b.bytes);
      cr_assert(memcmp(a.data, b.data, a.bytes) == 0, "%s differs", names[i]);
      free(a.data);
      free(b.data);
    }
  }
  const msgpack_object *r = get_many(&rx, 30, NULL, 0, "l.0.", NULL);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  const msgpack_object *t = qp_map_get(ts_resp_result(r), "tensors");
  cr_assert_eq(t->via.array.size, 2);
  cr_assert(qp_obj_str_eq(qp_map_get(&t->via.array.ptr[0], "name"), "l.0.x"));
  cr_assert(qp_obj_str_eq(qp_map_get(&t->via.array.ptr[1], "name"), "l.0.y"));
  got a;
  memset(&a, 0, sizeof a);
  parse_tensor_map(&t->via.array.ptr[1], &a);
  cr_assert_eq(a.bytes, 16);
  for (int i = 0; i < 4; i++) cr_assert_eq(elem_f32("f32", a.data, (uint64_t)i), ts_value(7, (uint64_t)i));
  free(a.data);
  r = get_many(&rx, 31, NULL, 0, "nothing-matches", NULL);
  cr_assert_eq(ts_resp_code(r), 0);
  cr_assert_eq(qp_map_get(ts_resp_result(r), "tensors")->via.array.size, 0);
  ts_rx_destroy(&rx);
  ts_rx_destroy(&rx2);
}

/* PROTOCOL.md §4.8 */
Test(daemon_methods, stats_count_requests_errors_and_bytes) {
  ts_rx rx;
  open_rx(&rx);
  for (int i = 0; i < 3; i++) free(do_get(&rx, "m", "a.b", -1, NULL, NULL).data);
  got g = do_get(&rx, "m", "nope", -1, NULL, NULL);
  cr_assert_eq(g.code, QINS_ENO_TENSOR);
  free(do_get(&rx, "m", "big", -1, NULL, NULL).data);
  const msgpack_object *r = call0(&rx, "stats", 50);
  cr_assert_eq(ts_resp_code(r), 0);
  const msgpack_object *m = ts_resp_result(r);
  cr_assert_eq(map_u64(m, "connections"), 1);
  cr_assert_geq(map_u64(m, "connections_total"), 2); /* the fixture's ping, then us */
  const msgpack_object *req = qp_map_get(m, "requests");
  cr_assert_eq(map_u64(req, "get"), 5);
  cr_assert_eq(map_u64(req, "stats"), 1);
  cr_assert_eq(map_u64(qp_map_get(m, "errors"), "NO_TENSOR"), 1);
  cr_assert_geq(map_u64(m, "bytes_served"), 3 * 129 * 4 + 1024 * 600 * 4);
  cr_assert_gt(map_u64(m, "decode_ns"), 0);
  cr_assert_geq(map_u64(m, "pool_decodes"), 1);
  cr_assert_geq(map_u64(m, "inline_decodes"), 3);
  const msgpack_object *p50 = qp_map_get(m, "latency_p50_us"), *p99 = qp_map_get(m, "latency_p99_us");
  cr_assert(p50 && p99 && p50->type == MSGPACK_OBJECT_FLOAT64);
  cr_assert(p50->via.f64 > 0 && p99->via.f64 >= p50->via.f64);
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §4.9: our own uid may call shutdown; the daemon exits 0. */
Test(daemon_methods, shutdown_by_owner_exits_zero) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = call0(&rx, "shutdown", 60);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  cr_assert_eq(ts_resp_result(r)->type, MSGPACK_OBJECT_BOOLEAN);
  const msgpack_object *o;
  cr_assert_neq(ts_rx_next(&rx, 10000, &o), 1, "nothing follows the shutdown reply");
  int st = ts_daemon_wait(&D, 10000);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status 0x%x", st);
  cr_assert_neq(access(D.sock, F_OK), 0, "socket file removed on exit");
  ts_rx_destroy(&rx);
}

/* PROTOCOL.md §1: many requests in flight on one connection; each response carries its msgid. */
Test(daemon_methods, pipelined_requests) {
  ts_rx rx;
  open_rx(&rx);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  const int N = 60;
  for (int i = 0; i < N; i++) {
    const char *name = i % 3 == 0 ? "big" : i % 3 == 1 ? "a.b" : "l.1.x";
    if (i % 10 == 9) {
      qp_pack_request(&pk, (uint32_t)(1000 + i), "ping");
      msgpack_pack_array(&pk, 0);
      continue;
    }
    qp_pack_request(&pk, (uint32_t)(1000 + i), "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, name);
  }
  cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  int seen[60] = {0};
  for (int k = 0; k < N; k++) {
    const msgpack_object *o;
    cr_assert_eq(ts_rx_next(&rx, 30000, &o), 1, "response %d", k);
    uint32_t id = (uint32_t)o->via.array.ptr[1].via.u64;
    cr_assert(id >= 1000 && id < 1000 + (uint32_t)N);
    int i = (int)(id - 1000);
    cr_assert(!seen[i], "msgid %u twice", id);
    seen[i] = 1;
    cr_assert_eq(ts_resp_code(o), 0);
    if (i % 10 == 9) {
      cr_assert(qp_obj_str_eq(ts_resp_result(o), "pong"));
      continue;
    }
    const std_tensor *t = std_find(i % 3 == 0 ? "big" : i % 3 == 1 ? "a.b" : "l.1.x");
    got g;
    memset(&g, 0, sizeof g);
    parse_tensor_map(ts_resp_result(o), &g);
    cr_assert_eq(g.bytes, std_n(t) * 4);
    uint64_t seed = (uint64_t)(t - std_tensors);
    cr_assert_eq(elem_f32("f32", g.data, std_n(t) - 1), ts_value(seed, std_n(t) - 1));
    free(g.data);
  }
  ts_rx_destroy(&rx);
}

typedef struct worker_arg {
  int idx;     /* client number */
  int errors;  /* mismatches seen */
} worker_arg;

static void *client_thread(void *p) {
  worker_arg *a = p;
  int fd = ts_connect(D.sock);
  if (fd < 0) {
    a->errors++;
    return NULL;
  }
  ts_rx rx;
  ts_rx_init(&rx, fd);
  for (int i = 0; i < 12; i++) {
    const char *name = (a->idx + i) % 4 == 0 ? "big" : "a.w";
    const std_tensor *t = std_find(name);
    uint64_t seed = (uint64_t)(t - std_tensors);
    uint64_t r0 = (uint64_t)(a->idx + i) % 30, r1 = r0 + 5;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    uint32_t id = (uint32_t)(a->idx * 1000 + i);
    ts_req_begin(&sb, &pk, id, "get", 3);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, name);
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, r0);
    msgpack_pack_uint64(&pk, r1);
    const msgpack_object *r = ts_call(&rx, &sb, id);
    msgpack_sbuffer_destroy(&sb);
    if (!r || ts_resp_code(r) != 0) {
      a->errors++;
      continue;
    }
    const msgpack_object *data = qp_map_get(ts_resp_result(r), "data");
    uint64_t row = t->shape[1];
    if (!data || data->via.bin.size != 5 * row * 4) {
      a->errors++;
      continue;
    }
    for (uint64_t e = 0; e < 5 * row; e++) {
      float v;
      memcpy(&v, data->via.bin.ptr + 4 * e, 4);
      if (v != ts_value(seed, r0 * row + e)) {
        a->errors++;
        break;
      }
    }
  }
  ts_rx_destroy(&rx);
  return NULL;
}

Test(daemon_methods, thirty_two_concurrent_clients) {
  pthread_t th[32];
  worker_arg args[32];
  for (int i = 0; i < 32; i++) {
    args[i] = (worker_arg){i, 0};
    cr_assert_eq(pthread_create(&th[i], NULL, client_thread, &args[i]), 0);
  }
  int errors = 0;
  for (int i = 0; i < 32; i++) {
    pthread_join(th[i], NULL);
    errors += args[i].errors;
  }
  cr_assert_eq(errors, 0, "%d bad responses", errors);
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = call0(&rx, "stats", 1);
  cr_assert_eq(map_u64(qp_map_get(ts_resp_result(r), "requests"), "get"), 32 * 12);
  ts_rx_destroy(&rx);
}

/* SIGTERM: stop accepting, finish in-flight, exit 0. Requests are dispatched in order, so those
 * answered SHUTDOWN (buffered, not started) come after every one answered with data (started), and
 * each data answer is the whole tensor. Which split a run sees depends on timing; the exact split
 * is daemon_promises/sigterm_answers_buffered_requests_shutdown. */
Test(daemon_methods, sigterm_finishes_in_flight_requests) {
  ts_rx rx;
  open_rx(&rx);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (int i = 0; i < 4; i++) {
    qp_pack_request(&pk, (uint32_t)(70 + i), "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, "big");
  }
  cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  const std_tensor *big = std_find("big");
  const uint64_t seed = (uint64_t)(big - std_tensors), n = std_n(big);
  int code_of[4] = {1, 1, 1, 1}; /* 1: no answer yet */
  const msgpack_object *o;
  int answered = 0;
  for (;;) {
    int r = ts_rx_next(&rx, 30000, &o);
    if (r != 1) break;
    uint64_t id = o->via.array.ptr[1].via.u64;
    cr_assert(id >= 70 && id < 74 && code_of[id - 70] == 1, "msgid %llu", (unsigned long long)id);
    int code = ts_resp_code(o);
    code_of[id - 70] = code;
    cr_assert(code == 0 || code == QINS_ESHUTDOWN, "code %d", code);
    if (code == 0) {
      const msgpack_object *data = qp_map_get(ts_resp_result(o), "data");
      cr_assert(data && data->via.bin.size == n * 4, "the whole tensor");
      for (uint64_t e = 0; e < n; e += 997) {
        float v;
        memcpy(&v, data->via.bin.ptr + 4 * e, 4);
        cr_assert_eq(v, ts_value(seed, e), "element %llu", (unsigned long long)e);
      }
    }
    /* The first answer proves the requests were read; then stop the daemon. */
    if (++answered == 1) {
      cr_assert_eq(code, 0);
      kill(D.pid, SIGTERM);
    }
  }
  cr_assert_eq(answered, 4, "every request got an answer (data or SHUTDOWN)");
  for (int i = 1; i < 4; i++)
    cr_assert(!(code_of[i - 1] == QINS_ESHUTDOWN && code_of[i] == 0),
              "request %d ran after request %d was refused as not started", 70 + i, 69 + i);
  int st = ts_daemon_wait(&D, 10000);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status 0x%x", st);
  cr_assert_lt(ts_connect(D.sock), 0, "no longer accepting");
  ts_rx_destroy(&rx);
}

/* A client may send its requests, shut down its sending side, and still read every answer. */
Test(daemon_methods, half_closed_client_gets_its_answers) {
  ts_rx rx;
  open_rx(&rx);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (int i = 0; i < 3; i++) {
    qp_pack_request(&pk, (uint32_t)(80 + i), "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, i == 1 ? "big" : "a.b");
  }
  cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  cr_assert_eq(shutdown(rx.fd, SHUT_WR), 0);
  int n = 0;
  const msgpack_object *o;
  while (ts_rx_next(&rx, 30000, &o) == 1) {
    cr_assert_eq(ts_resp_code(o), 0);
    n++;
  }
  cr_assert_eq(n, 3, "every answer arrives before the close");
  ts_rx_destroy(&rx);
}
