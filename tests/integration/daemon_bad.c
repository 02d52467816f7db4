/* SPDX-License-Identifier: MIT */
/*
 * daemon_bad.c — hostile and malformed input (docs/PROTOCOL.md §2-§3, STYLE.md 8): each case is
 * answered with an error response (the connection staying open for argument errors, closed for
 * framing errors) or a clean close, while a witness connection opened beforehand keeps being
 * served. Includes a 10-byte request declaring a 4 GiB bin, 2^32-element arrays, requests over the
 * size limit, truncation then disconnect, disconnect mid-response, and a client that never reads.
 */
#include <errno.h>
#include <stdio.h>
#include <sys/socket.h>

#include "daemon_fixture.h"

TestSuite(daemon_bad, .init = setup, .fini = teardown, .timeout = 90);

/* Sends bytes on a fresh connection; expects error `code` (to msgid `id`); then, if `closes`, a
 * close, else a working connection. A witness connection must be served before and after. */
static void expect_error(const void *bytes, size_t len, int code, uint32_t id, int closes) {
  ts_rx w, b;
  open_rx(&w);
  cr_assert(ping_on(&w, 1), "witness served before");
  open_rx(&b);
  int sr = ts_send(b.fd, bytes, len);
  cr_assert(sr == 0 || sr == -EPIPE || sr == -ECONNRESET, "send: %d", sr);
  const msgpack_object *o;
  int r = ts_rx_next(&b, 20000, &o);
  cr_assert_eq(r, 1, "an error response");
  cr_assert_eq(o->type, MSGPACK_OBJECT_ARRAY);
  cr_assert_eq(o->via.array.size, 4);
  cr_assert_eq(o->via.array.ptr[0].via.u64, 1, "response tag");
  cr_assert_eq(o->via.array.ptr[1].via.u64, id, "msgid");
  cr_assert_eq(ts_resp_code(o), code, "code %d (%s), want %d", ts_resp_code(o), ts_resp_msg(o), code);
  cr_assert_gt(strlen(ts_resp_msg(o)), 0, "the error has a message");
  cr_assert_eq(o->via.array.ptr[3].type, MSGPACK_OBJECT_NIL, "result nil on error");
  if (closes)
    cr_assert_neq(ts_rx_next(&b, 20000, &o), 1, "connection closed after a framing error");
  else
    cr_assert(ping_on(&b, 2), "connection still usable after an argument error");
  cr_assert(ping_on(&w, 3), "witness served after");
  ts_rx_destroy(&b);
  ts_rx_destroy(&w);
}

/* A request whose params map is written by fn. */
typedef void (*params_fn)(msgpack_packer *pk);
static void expect_call_error(const char *method, int nkeys, params_fn fn, int code) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 77, method, nkeys);
  if (fn) fn(&pk);
  expect_error(sb.data, sb.size, code, 77, 0);
  msgpack_sbuffer_destroy(&sb);
}

static void kv_str(msgpack_packer *pk, const char *k, const char *v) {
  qp_pack_cstr(pk, k);
  qp_pack_cstr(pk, v);
}
static void mn(msgpack_packer *pk, const char *name) {
  kv_str(pk, "model", "m");
  kv_str(pk, "name", name);
}
static void slice2(msgpack_packer *pk, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  qp_pack_cstr(pk, "slice");
  msgpack_pack_array(pk, 2);
  msgpack_pack_array(pk, 2);
  msgpack_pack_uint64(pk, a);
  msgpack_pack_uint64(pk, b);
  msgpack_pack_array(pk, 2);
  msgpack_pack_uint64(pk, c);
  msgpack_pack_uint64(pk, d);
}

/* ---- framing and envelope: error with msgid 0, then close ---------------------------------- */
Test(daemon_bad, not_an_array) {
  const uint8_t m[] = {0x05};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, a_map_instead_of_an_array) {
  const uint8_t m[] = {0x81, 0xa1, 'a', 0x01};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, a_str_instead_of_an_array) {
  const uint8_t m[] = {0xa4, 'p', 'i', 'n', 'g'};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, wrong_type_tag_response) {
  const uint8_t m[] = {0x94, 0x01, 0x05, 0xc0, 0xc0};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, wrong_type_tag_seven) {
  const uint8_t m[] = {0x94, 0x07, 0x05, 0xa4, 'p', 'i', 'n', 'g', 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, type_tag_not_an_int) {
  const uint8_t m[] = {0x94, 0xc3, 0x05, 0xa4, 'p', 'i', 'n', 'g', 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, five_element_request) {
  const uint8_t m[] = {0x95, 0x00, 0x05, 0xa4, 'p', 'i', 'n', 'g', 0x90, 0xc0};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, negative_msgid) {
  const uint8_t m[] = {0x94, 0x00, 0xff, 0xa4, 'p', 'i', 'n', 'g', 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, msgid_not_an_int) {
  const uint8_t m[] = {0x94, 0x00, 0xa1, '1', 0xa4, 'p', 'i', 'n', 'g', 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, msgid_over_32_bits) {
  const uint8_t m[] = {0x94, 0x00, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0xa4, 'p', 'i', 'n', 'g', 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, ten_bytes_declaring_a_4gib_bin) {
  const uint8_t m[] = {0x94, 0x00, 0x01, 0xa1, 'g', 0xc6, 0xff, 0xff, 0xff, 0xff};
  cr_assert_eq(sizeof m, 10);
  expect_error(m, sizeof m, QINS_ETOO_LARGE, 0, 1);
}
Test(daemon_bad, array_of_2pow32_minus_1_elements) {
  const uint8_t m[] = {0x94, 0x00, 0x01, 0xa3, 'g', 'e', 't', 0xdd, 0xff, 0xff, 0xff, 0xff};
  expect_error(m, sizeof m, QINS_ETOO_LARGE, 0, 1);
}
Test(daemon_bad, top_level_array_of_2pow32_minus_1) {
  const uint8_t m[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 0x00};
  expect_error(m, sizeof m, QINS_ETOO_LARGE, 0, 1);
}
Test(daemon_bad, map_of_2pow31_pairs) {
  const uint8_t m[] = {0x94, 0x00, 0x01, 0xa3, 'g', 'e', 't', 0x91, 0xdf, 0x80, 0x00, 0x00, 0x00};
  expect_error(m, sizeof m, QINS_ETOO_LARGE, 0, 1);
}
Test(daemon_bad, str_declaring_3gb) {
  const uint8_t m[] = {0x94, 0x00, 0x01, 0xdb, 0xb0, 0x00, 0x00, 0x00, 'g'};
  expect_error(m, sizeof m, QINS_ETOO_LARGE, 0, 1);
}
Test(daemon_bad, ext_declaring_2gb) {
  const uint8_t m[] = {0x94, 0x00, 0x01, 0xc9, 0x80, 0x00, 0x00, 0x00, 0x01};
  expect_error(m, sizeof m, QINS_ETOO_LARGE, 0, 1);
}
/* The envelope (depth 1) holding `params` nested `depth - 1` deep around a nil. */
static size_t nested_ping(uint8_t *m, int depth) {
  size_t n = 0;
  m[n++] = 0x94;
  m[n++] = 0x00;
  m[n++] = 0x01;
  m[n++] = 0xa4;
  memcpy(m + n, "ping", 4);
  n += 4;
  for (int i = 1; i < depth; i++) m[n++] = 0x91;
  m[n++] = 0xc0;
  return n;
}
/* PROTOCOL.md §2: nesting depth 8 is parsed (params [[...]] is then a bad-params PROTO answered to
 * its msgid on an open connection); depth 9 is a framing error: msgid 0, then a close. */
Test(daemon_bad, nesting_deeper_than_8) {
  uint8_t m[32];
  size_t n = nested_ping(m, 8);
  expect_error(m, n, QINS_EPROTO, 1, 0);
  n = nested_ping(m, 9);
  expect_error(m, n, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, reserved_byte_c1) {
  const uint8_t m[] = {0x94, 0x00, 0x01, 0xc1, 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0, 1);
}
Test(daemon_bad, request_over_the_size_limit) {
  /* A real bin of 1 MiB + 1 inside params: over max_request_bytes (1 MiB). */
  size_t n = (1 << 20) + 1;
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 5, "ping", 1);
  qp_pack_cstr(&pk, "junk");
  char *junk = calloc(1, n);
  msgpack_pack_bin_with_body(&pk, junk, n);
  free(junk);
  ts_rx w, b;
  open_rx(&w);
  open_rx(&b);
  int sr = ts_send(b.fd, sb.data, sb.size);
  cr_assert(sr == 0 || sr == -EPIPE || sr == -ECONNRESET);
  /* Either the TOO_LARGE error then a close, or (when the daemon's close beats our read of its
   * reply because our unsent bytes reset the socket) just the close. */
  const msgpack_object *o;
  int r = ts_rx_next(&b, 20000, &o);
  if (r == 1) {
    cr_assert_eq(ts_resp_code(o), QINS_ETOO_LARGE);
    cr_assert_neq(ts_rx_next(&b, 20000, &o), 1);
  }
  cr_assert(ping_on(&w, 9));
  msgpack_sbuffer_destroy(&sb);
  ts_rx_destroy(&b);
  ts_rx_destroy(&w);
}

/* ---- bad calls: error with the request's msgid, connection stays open ---------------------- */
Test(daemon_bad, method_not_a_str) {
  const uint8_t m[] = {0x94, 0x00, 0x33, 0x07, 0x90};
  expect_error(m, sizeof m, QINS_EPROTO, 0x33, 0);
}
Test(daemon_bad, unknown_method) {
  expect_call_error("frobnicate", -1, NULL, QINS_EUNKNOWN_METHOD);
}
Test(daemon_bad, params_not_an_array) {
  const uint8_t m[] = {0x94, 0x00, 0x34, 0xa4, 'p', 'i', 'n', 'g', 0x80};
  expect_error(m, sizeof m, QINS_EPROTO, 0x34, 0);
}
Test(daemon_bad, params_array_of_a_non_map) {
  const uint8_t m[] = {0x94, 0x00, 0x35, 0xa4, 'p', 'i', 'n', 'g', 0x91, 0x01};
  expect_error(m, sizeof m, QINS_EPROTO, 0x35, 0);
}
Test(daemon_bad, params_array_of_two_maps) {
  const uint8_t m[] = {0x94, 0x00, 0x36, 0xa4, 'p', 'i', 'n', 'g', 0x92, 0x80, 0x80};
  expect_error(m, sizeof m, QINS_EPROTO, 0x36, 0);
}
static void p_model_only(msgpack_packer *pk) { kv_str(pk, "model", "m"); }
Test(daemon_bad, get_missing_name) { expect_call_error("get", 1, p_model_only, QINS_EBAD_PARAMS); }
static void p_name_only(msgpack_packer *pk) { kv_str(pk, "name", "a.w"); }
Test(daemon_bad, get_missing_model) { expect_call_error("get", 1, p_name_only, QINS_EBAD_PARAMS); }
Test(daemon_bad, get_no_params) { expect_call_error("get", -1, NULL, QINS_EBAD_PARAMS); }
static void p_model_int(msgpack_packer *pk) {
  qp_pack_cstr(pk, "model");
  msgpack_pack_int(pk, 3);
  kv_str(pk, "name", "a.w");
}
Test(daemon_bad, model_ill_typed) { expect_call_error("get", 2, p_model_int, QINS_EBAD_PARAMS); }
static void p_name_bin(msgpack_packer *pk) {
  kv_str(pk, "model", "m");
  qp_pack_cstr(pk, "name");
  msgpack_pack_bin_with_body(pk, "a.w", 3);
}
Test(daemon_bad, name_as_bin) { expect_call_error("info", 2, p_name_bin, QINS_EBAD_PARAMS); }
static void p_name_long(msgpack_packer *pk) {
  char n[400];
  memset(n, 'x', sizeof n - 1);
  n[sizeof n - 1] = '\0';
  mn(pk, n);
}
Test(daemon_bad, name_too_long) { expect_call_error("get", 2, p_name_long, QINS_EBAD_PARAMS); }
static void p_name_nul(msgpack_packer *pk) {
  kv_str(pk, "model", "m");
  qp_pack_cstr(pk, "name");
  msgpack_pack_str_with_body(pk, "a\0w", 3);
}
Test(daemon_bad, name_with_nul) { expect_call_error("get", 2, p_name_nul, QINS_EBAD_PARAMS); }
static void p_unknown_model(msgpack_packer *pk) {
  kv_str(pk, "model", "no-such-model");
  kv_str(pk, "name", "a.w");
}
Test(daemon_bad, unknown_model) { expect_call_error("get", 2, p_unknown_model, QINS_ENO_MODEL); }
Test(daemon_bad, unknown_model_info) { expect_call_error("info", 2, p_unknown_model, QINS_ENO_MODEL); }
static void p_list_unknown(msgpack_packer *pk) { kv_str(pk, "model", "nope"); }
Test(daemon_bad, unknown_model_list) { expect_call_error("list", 1, p_list_unknown, QINS_ENO_MODEL); }
static void p_unknown_tensor(msgpack_packer *pk) { mn(pk, "no.such.tensor"); }
Test(daemon_bad, unknown_tensor) { expect_call_error("get", 2, p_unknown_tensor, QINS_ENO_TENSOR); }
static void p_oor(msgpack_packer *pk) {
  mn(pk, "a.w");
  slice2(pk, 0, 38, 0, 1);
}
Test(daemon_bad, slice_out_of_range_rows) { expect_call_error("get", 3, p_oor, QINS_EBAD_SLICE); }
static void p_oor_cols(msgpack_packer *pk) {
  mn(pk, "a.w");
  slice2(pk, 0, 1, 100, 130);
}
Test(daemon_bad, slice_out_of_range_cols) { expect_call_error("get", 3, p_oor_cols, QINS_EBAD_SLICE); }
static void p_rev(msgpack_packer *pk) {
  mn(pk, "a.w");
  slice2(pk, 10, 5, 0, 1);
}
Test(daemon_bad, slice_reversed) { expect_call_error("get", 3, p_rev, QINS_EBAD_SLICE); }
static void p_many_ranges(msgpack_packer *pk) {
  mn(pk, "a.b"); /* 1-D: two ranges is one too many */
  slice2(pk, 0, 1, 0, 1);
}
Test(daemon_bad, slice_more_ranges_than_dims) { expect_call_error("get", 3, p_many_ranges, QINS_EBAD_SLICE); }
static void p_nine_ranges(msgpack_packer *pk) {
  mn(pk, "c3");
  qp_pack_cstr(pk, "slice");
  msgpack_pack_array(pk, 9);
  for (int i = 0; i < 9; i++) {
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint64(pk, 0);
    msgpack_pack_uint64(pk, 1);
  }
}
static void p_5000_ranges(msgpack_packer *pk) {
  mn(pk, "c3");
  qp_pack_cstr(pk, "slice");
  msgpack_pack_array(pk, 5000);
  for (int i = 0; i < 5000; i++) {
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint64(pk, 0);
    msgpack_pack_uint64(pk, 1);
  }
}
/* Over max_ranges (8): 9 ranges on a 3-D tensor, and 5,000 (refused before any is stored). The
 * option's own boundary is daemon_promises/max_ranges_option_bounds_a_slice. */
Test(daemon_bad, slice_over_max_ranges) {
  expect_call_error("get", 3, p_nine_ranges, QINS_EBAD_SLICE);
  expect_call_error("get", 3, p_5000_ranges, QINS_EBAD_SLICE);
  /* Nothing was written past the slice: the daemon still stops cleanly (glibc aborts at exit on a
   * corrupted heap). */
  int st = ts_daemon_stop(&D);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "qinsd exit status 0x%x", st);
}
static void p_slice_str(msgpack_packer *pk) {
  mn(pk, "a.w");
  kv_str(pk, "slice", "0:4");
}
Test(daemon_bad, slice_not_an_array) { expect_call_error("get", 3, p_slice_str, QINS_EBAD_PARAMS); }
static void p_slice_triple(msgpack_packer *pk) {
  mn(pk, "a.w");
  qp_pack_cstr(pk, "slice");
  msgpack_pack_array(pk, 1);
  msgpack_pack_array(pk, 3);
  msgpack_pack_uint64(pk, 0);
  msgpack_pack_uint64(pk, 1);
  msgpack_pack_uint64(pk, 2);
}
Test(daemon_bad, slice_range_of_three) { expect_call_error("get", 3, p_slice_triple, QINS_EBAD_PARAMS); }
static void p_slice_neg(msgpack_packer *pk) {
  mn(pk, "a.w");
  qp_pack_cstr(pk, "slice");
  msgpack_pack_array(pk, 1);
  msgpack_pack_array(pk, 2);
  msgpack_pack_int64(pk, -1);
  msgpack_pack_uint64(pk, 2);
}
Test(daemon_bad, slice_negative_start) { expect_call_error("get", 3, p_slice_neg, QINS_EBAD_PARAMS); }
static void p_slice_float(msgpack_packer *pk) {
  mn(pk, "a.w");
  qp_pack_cstr(pk, "slice");
  msgpack_pack_array(pk, 1);
  msgpack_pack_array(pk, 2);
  msgpack_pack_double(pk, 0.0);
  msgpack_pack_uint64(pk, 2);
}
Test(daemon_bad, slice_float_bound) { expect_call_error("get", 3, p_slice_float, QINS_EBAD_PARAMS); }
static void p_dtype_f64(msgpack_packer *pk) {
  mn(pk, "a.w");
  kv_str(pk, "dtype", "f64");
}
Test(daemon_bad, dtype_unsupported) { expect_call_error("get", 3, p_dtype_f64, QINS_EDTYPE); }
static void p_dtype_int(msgpack_packer *pk) {
  mn(pk, "a.w");
  qp_pack_cstr(pk, "dtype");
  msgpack_pack_int(pk, 1);
}
Test(daemon_bad, dtype_ill_typed) { expect_call_error("get", 3, p_dtype_int, QINS_EBAD_PARAMS); }
static void p_raw_dtype(msgpack_packer *pk) {
  mn(pk, "ints");
  kv_str(pk, "dtype", "f32");
}
Test(daemon_bad, raw_tensor_with_dtype) { expect_call_error("get", 3, p_raw_dtype, QINS_EDTYPE); }
static void p_many_both(msgpack_packer *pk) {
  kv_str(pk, "model", "m");
  kv_str(pk, "prefix", "l.");
  qp_pack_cstr(pk, "names");
  msgpack_pack_array(pk, 0);
}
Test(daemon_bad, get_many_names_and_prefix) { expect_call_error("get_many", 3, p_many_both, QINS_EBAD_PARAMS); }
Test(daemon_bad, get_many_neither) { expect_call_error("get_many", 1, p_model_only, QINS_EBAD_PARAMS); }
static void p_many_names_str(msgpack_packer *pk) {
  kv_str(pk, "model", "m");
  kv_str(pk, "names", "a.w");
}
Test(daemon_bad, get_many_names_not_array) { expect_call_error("get_many", 2, p_many_names_str, QINS_EBAD_PARAMS); }
static void p_many_unknown(msgpack_packer *pk) {
  kv_str(pk, "model", "m");
  qp_pack_cstr(pk, "names");
  msgpack_pack_array(pk, 2);
  qp_pack_cstr(pk, "a.w");
  qp_pack_cstr(pk, "missing");
}
Test(daemon_bad, get_many_unknown_tensor) { expect_call_error("get_many", 2, p_many_unknown, QINS_ENO_TENSOR); }
static void p_list_neg(msgpack_packer *pk) {
  kv_str(pk, "model", "m");
  qp_pack_cstr(pk, "offset");
  msgpack_pack_int(pk, -5);
}
Test(daemon_bad, list_negative_offset) { expect_call_error("list", 2, p_list_neg, QINS_EBAD_PARAMS); }
static void p_ext_model(msgpack_packer *pk) {
  qp_pack_cstr(pk, "model");
  msgpack_pack_ext_with_body(pk, "m", 1, 5);
  kv_str(pk, "name", "a.w");
}
Test(daemon_bad, ext_typed_param) { expect_call_error("get", 2, p_ext_model, QINS_EBAD_PARAMS); }

/* ---- limits -------------------------------------------------------------------------------- */
static const char *const small_resp_args[] = {"--max-response-bytes", "64K", NULL};
static void setup_small_resp(void) {
  fixture_args = small_resp_args;
  setup();
}
Test(daemon_bad, response_too_large_says_slice, .init = setup_small_resp) {
  ts_rx rx;
  open_rx(&rx);
  got g = do_get(&rx, "m", "big", -1, NULL, NULL);
  cr_assert_eq(g.code, QINS_ERESPONSE_TOO_LARGE);
  /* A slice of it fits. */
  const uint64_t rg[1][2] = {{0, 10}};
  g = do_get(&rx, "m", "big", 1, rg, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(g.bytes, 10 * 600 * 4);
  free(g.data);
  ts_rx_destroy(&rx);
}

static const char *const two_conn_args[] = {"--max-connections", "2", NULL};
static void setup_two_conn(void) {
  fixture_args = two_conn_args;
  setup();
}

/* `stats` connections as seen over rx (rx itself included), or UINT64_MAX. */
static uint64_t stats_connections(ts_rx *rx, uint32_t id) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "stats", -1);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  if (!r || ts_resp_code(r) != 0) return UINT64_MAX;
  const msgpack_object *n = qp_map_get(ts_resp_result(r), "connections");
  return n && n->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? n->via.u64 : UINT64_MAX;
}

/* Waits (up to 20 s) until the daemon counts exactly `want` connections: a client's close is
 * seen asynchronously (the fixture's startup ping, a test's own earlier connections), so a
 * connection opened right after another one closed may still find that one counted. */
static void await_connections(ts_rx *rx, uint64_t want) {
  uint64_t n = UINT64_MAX;
  for (int i = 0; i < 2000; i++) {
    n = stats_connections(rx, 1000 + (uint32_t)i);
    if (n == want) return;
    cr_assert_neq(n, UINT64_MAX, "stats answered");
    usleep(10000);
  }
  cr_assert_fail("the daemon still counts %llu connections after 20 s, want %llu",
                 (unsigned long long)n, (unsigned long long)want);
}

Test(daemon_bad, connections_over_the_limit_get_busy, .init = setup_two_conn) {
  ts_rx a, b, c;
  open_rx(&a);
  cr_assert(ping_on(&a, 1));
  /* The fixture's startup ping connection is gone before b takes the second slot. */
  await_connections(&a, 1);
  open_rx(&b);
  cr_assert(ping_on(&b, 2));
  await_connections(&a, 2);
  open_rx(&c);
  const msgpack_object *o;
  cr_assert_eq(ts_rx_next(&c, 20000, &o), 1);
  cr_assert_eq(ts_resp_code(o), QINS_EBUSY);
  cr_assert_eq(o->via.array.ptr[1].via.u64, 0);
  cr_assert_neq(ts_rx_next(&c, 20000, &o), 1, "closed");
  ts_rx_destroy(&c);
  cr_assert(ping_on(&a, 3));
  ts_rx_destroy(&b);
  /* A slot frees once b is gone (the daemon sees the close asynchronously: wait for it). */
  await_connections(&a, 1);
  ts_rx d;
  open_rx(&d);
  cr_assert(ping_on(&d, 4), "a new client is served after one left");
  ts_rx_destroy(&d);
  ts_rx_destroy(&a);
}

/* ---- misbehaving clients ------------------------------------------------------------------- */
Test(daemon_bad, notification_is_ignored) {
  ts_rx rx;
  open_rx(&rx);
  const uint8_t m[] = {0x93, 0x02, 0xa4, 'p', 'i', 'n', 'g', 0x90};
  cr_assert_eq(ts_send(rx.fd, m, sizeof m), 0);
  cr_assert(ping_on(&rx, 5), "the next request is answered, and first");
  ts_rx_destroy(&rx);
}

Test(daemon_bad, truncated_request_then_disconnect) {
  ts_rx w;
  open_rx(&w);
  for (int i = 0; i < 5; i++) {
    int fd = ts_connect(D.sock);
    cr_assert_geq(fd, 0);
    const uint8_t m[] = {0x94, 0x00, 0x01, 0xa3, 'g', 'e', 't', 0x91, 0x82, 0xa5, 'm', 'o'};
    cr_assert_eq(ts_send(fd, m, sizeof m - (size_t)i), 0);
    close(fd);
  }
  cr_assert(ping_on(&w, 1));
  ts_rx_destroy(&w);
}

Test(daemon_bad, disconnect_mid_response) {
  ts_rx w;
  open_rx(&w);
  for (int i = 0; i < 5; i++) {
    ts_rx b;
    open_rx(&b);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    ts_req_begin(&sb, &pk, 1, "get", 2);
    mn(&pk, "big");
    cr_assert_eq(ts_send(b.fd, sb.data, sb.size), 0);
    msgpack_sbuffer_destroy(&sb);
    char buf[4096];
    cr_assert_gt(recv(b.fd, buf, sizeof buf, 0), 0, "the response started");
    ts_rx_destroy(&b); /* leave with ~2.4 MB unread */
  }
  cr_assert(ping_on(&w, 1));
  got g = do_get(&w, "m", "big", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  free(g.data);
  ts_rx_destroy(&w);
}

static const char *const small_queue_args[] = {"--write-queue-bytes", "4M", NULL};
static void setup_small_queue(void) {
  fixture_args = small_queue_args;
  setup();
}
/* A client that never reads: the daemon stops reading its requests once its queue is over the
 * limit, keeps its own buffering bounded, and serves everyone else. */
Test(daemon_bad, client_never_reading, .init = setup_small_queue) {
  ts_rx w, b;
  open_rx(&w);
  open_rx(&b);
  int fl = 1 << 16;
  setsockopt(b.fd, SOL_SOCKET, SO_RCVBUF, &fl, sizeof fl);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (int i = 0; i < 200; i++) { /* 200 x 2.4 MB asked for */
    qp_pack_request(&pk, (uint32_t)i, "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    mn(&pk, "big");
  }
  /* Non-blocking send: the daemon may stop reading before taking it all. */
  size_t off = 0;
  while (off < sb.size) {
    ssize_t n = send(b.fd, sb.data + off, sb.size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n <= 0) break;
    off += (size_t)n;
  }
  msgpack_sbuffer_destroy(&sb);
  /* Others are served, repeatedly, while b's responses sit unread. */
  for (int i = 0; i < 20; i++) cr_assert(ping_on(&w, (uint32_t)(10 + i)));
  got g = do_get(&w, "m", "big", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  free(g.data);
  /* Backpressure engaged and bounded the daemon's buffering: at most the limit plus one
   * response (2.4 MB) plus the witness's response. */
  const msgpack_object *st = stats_on(&w);
  cr_assert_geq(qp_map_get(st, "paused_reads")->via.u64, 1, "reading was paused");
  uint64_t peak = qp_map_get(st, "queued_peak")->via.u64;
  cr_assert_leq(peak, (4u << 20) + 2 * (1024 * 600 * 4 + 4096), "queued peak %llu",
                (unsigned long long)peak);
  uint64_t gets = qp_map_get(qp_map_get(st, "requests"), "get")->via.u64;
  cr_assert_lt(gets, 200, "not all of the non-reader's requests were taken (%llu)",
               (unsigned long long)gets);
  ts_rx_destroy(&b);
  ts_rx_destroy(&w);
}

/* A client that pipelines tiny requests and never reads: the replies are 13 bytes on the wire but
 * each queued one holds memory (its write request, its buffer), and that is what the queue limit
 * counts. Counted by wire bytes, 4 MiB of queue was about 320,000 pongs holding an 8 KiB sbuffer
 * each (2.6 GB); now the daemon stops reading at 4 MiB held and its peak RSS barely moves. */
Test(daemon_bad, tiny_requests_never_read_are_bounded_by_memory, .init = setup_small_queue) {
  ts_rx w, b;
  open_rx(&w);
  open_rx(&b);
  int fl = 1 << 16;
  setsockopt(b.fd, SOL_SOCKET, SO_RCVBUF, &fl, sizeof fl);
  long hwm0 = daemon_kib("VmHWM");
  cr_assert_gt(hwm0, 0, "qinsd's VmHWM");
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < 6000; i++) { /* 6,000 pings, about 60 KB, sent again and again */
    qp_pack_request(&pk, 1000 + i, "ping");
    msgpack_pack_array(&pk, 0);
  }
  /* Send (non-blocking) until the daemon has stopped taking them for 300 ms, or 400,000 pings. */
  size_t sent = 0, off = 0;
  int idle_ms = 0;
  while (sent < 400000u * 10 && idle_ms < 300) {
    ssize_t n = send(b.fd, sb.data + off, sb.size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      sent += (size_t)n;
      off = (off + (size_t)n) % sb.size;
      idle_ms = 0;
    } else {
      cr_assert(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "send: %s", strerror(errno));
      usleep(10000);
      idle_ms += 10;
    }
  }
  msgpack_sbuffer_destroy(&sb);
  cr_assert(ping_on(&w, 7), "others are served");
  const msgpack_object *st = stats_on(&w);
  uint64_t pings = qp_map_get(qp_map_get(st, "requests"), "ping")->via.u64;
  uint64_t peak = qp_map_get(st, "queued_peak")->via.u64;
  long hwm1 = daemon_kib("VmHWM");
  cr_log_info("tiny requests: %zu bytes sent, %llu pings taken, queued peak %llu, VmHWM %ld -> %ld "
              "KiB", sent, (unsigned long long)pings, (unsigned long long)peak, hwm0, hwm1);
  cr_assert_geq(qp_map_get(st, "paused_reads")->via.u64, 1, "reading was paused (%zu bytes sent)",
                sent);
  cr_assert_leq(peak, (4u << 20) + 4096, "queued peak %llu", (unsigned long long)peak);
#if defined(__SANITIZE_ADDRESS__) /* make asan: its quarantine keeps up to 256 MiB of freed memory */
  const long max_growth_kib = 512 * 1024;
#else
  const long max_growth_kib = 24 * 1024;
#endif
  cr_assert_leq(hwm1 - hwm0, max_growth_kib, "qinsd's peak RSS grew from %ld to %ld KiB", hwm0,
                hwm1);
  ts_rx_destroy(&b);
  ts_rx_destroy(&w);
}
