/* SPDX-License-Identifier: MIT */
/*
 * daemon_model_info.c — method model_info (docs/PROTOCOL.md §4.14) on models whose metadata the
 * test writes (docs/FORMAT.md §2.3.1) under a 4 KiB max-response-bytes: members and entries of a
 * small page, a GGUF token list too large for one answer sent as [key, type, nil, count] and paged
 * by key with every answer within the limit, limit/offset bounds, a model without metadata, bad
 * model names and keys, an HF file too large for any answer; libqins' qins_model_info_page and
 * qins_model_metadata (the whole metadata reassembled).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "daemon.h"
#include "json.h"
#include "proto.h"
#include "qins.h"

#define N_TOKENS 3000 /* ~20 KB of token strings: five times the response limit */
#define MAX_RESP 4096

static ts_daemon D;

static char *meta_gguf(void) {
  size_t cap = 64 * 1024, n = 0;
  char *s = malloc(cap);
  cr_assert(s);
  n += (size_t)snprintf(s + n, cap - n,
                        "{\"general.architecture\":\"llama\",\"llama.block_count\":\"2\","
                        "\"source_format\":\"gguf\",\"gguf\":{\"version\":3,\"kv\":["
                        "[\"general.architecture\",\"string\",\"llama\"],"
                        "[\"llama.block_count\",\"u32\",2],"
                        "[\"tokenizer.ggml.tokens\",\"[string]\",[");
  for (int i = 0; i < N_TOKENS; i++) n += (size_t)snprintf(s + n, cap - n, "%s\"t%d\"", i ? "," : "", i);
  snprintf(s + n, cap - n, "]],[\"big.left_out\",\"[i32]\",null,123456]]},"
                           "\"hf\":{\"config\":{\"hidden_size\":32,\"rope_theta\":10000.5}}}");
  return s;
}

static int fill(qs_store *s, void *ud) {
  (void)ud;
  static const float v[4] = {1, 2, 3, 4};
  const uint64_t shape[1] = {4};
  char big[8192];
  char *gg = meta_gguf();
  struct { const char *name, *meta; } m[3] = {{"gg", gg}, {"plain", NULL}, {"huge", big}};
  int n = snprintf(big, sizeof big, "{\"hf\":{\"tokenizer\":{\"vocab\":\"");
  memset(big + n, 'x', 6000);
  strcpy(big + n + 6000, "\"}}}");
  int rc = 0;
  for (int i = 0; i < 3 && !rc; i++) {
    qs_import *im;
    rc = qs_import_begin(s, m[i].name, m[i].meta, &im);
    if (!rc) rc = ts_import_f32(im, "w", 1, shape, QC_F32, v);
    if (!rc) rc = qs_import_commit(im);
  }
  free(gg);
  return rc;
}

static void setup(void) {
  cr_assert_eq(ts_dir_make(&D), 0);
  cr_assert_eq(ts_store_fill(D.store, fill, NULL), 0);
  static const char *const args[] = {"--max-response-bytes", "4K", NULL};
  cr_assert_eq(ts_daemon_start(&D, args), 0);
}

static void teardown(void) {
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  ts_dir_remove(&D, !(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0));
}

TestSuite(daemon_model_info, .init = setup, .fini = teardown, .timeout = 60);

/* One model_info call; key may be NULL, limit 0 leaves it out. Checks the answer's packed size
 * against the limit (msgpack-c packs the same minimal forms the daemon does). */
static const msgpack_object *mi_call(ts_rx *rx, const char *model, const char *key,
                                     uint64_t offset, uint64_t limit) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 9, "model_info", 2 + (key != NULL) + (limit > 0));
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, model);
  if (key) {
    qp_pack_cstr(&pk, "key");
    qp_pack_cstr(&pk, key);
  }
  qp_pack_cstr(&pk, "offset");
  msgpack_pack_uint64(&pk, offset);
  if (limit) {
    qp_pack_cstr(&pk, "limit");
    msgpack_pack_uint64(&pk, limit);
  }
  const msgpack_object *r = ts_call(rx, &sb, 9);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r, "no answer to model_info %s", model);
  msgpack_sbuffer out;
  msgpack_sbuffer_init(&out);
  msgpack_packer opk;
  msgpack_packer_init(&opk, &out, msgpack_sbuffer_write);
  msgpack_pack_object(&opk, *r);
  cr_assert_leq(out.size, MAX_RESP, "answer of %zu bytes over max-response-bytes", out.size);
  msgpack_sbuffer_destroy(&out);
  return r;
}

static void open_rx(ts_rx *rx) {
  int fd = ts_connect(D.sock);
  cr_assert_geq(fd, 0);
  ts_rx_init(rx, fd);
}

static uint64_t u64_of(const msgpack_object *m, const char *k) {
  const msgpack_object *v = qp_map_get(m, k);
  cr_assert(v && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER, "\"%s\" missing or not a uint", k);
  return v->via.u64;
}

static const msgpack_object *arr_of(const msgpack_object *m, const char *k) {
  const msgpack_object *v = qp_map_get(m, k);
  cr_assert(v && v->type == MSGPACK_OBJECT_ARRAY, "\"%s\" missing or not an array", k);
  return v;
}

static void expect_entry(const msgpack_object *e, const char *key, const char *type, uint32_t n) {
  cr_assert_eq(e->type, MSGPACK_OBJECT_ARRAY);
  cr_assert_eq(e->via.array.size, n, "%s: %u items", key, e->via.array.size);
  cr_assert(qp_obj_str_eq(&e->via.array.ptr[0], key), "entry key is not %s", key);
  cr_assert(qp_obj_str_eq(&e->via.array.ptr[1], type), "%s: type is not %s", key, type);
}

Test(daemon_model_info, members_and_entries_with_an_oversized_list_elided) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = mi_call(&rx, "gg", NULL, 0, 0);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  const msgpack_object *m = ts_resp_result(r);
  cr_assert(qp_obj_str_eq(qp_map_get(m, "model"), "gg"));
  const msgpack_object *md = qp_map_get(m, "metadata");
  cr_assert(md && md->type == MSGPACK_OBJECT_MAP && md->via.map.size == 3, "the three members");
  cr_assert(qp_obj_str_eq(qp_map_get(md, "general.architecture"), "llama"));
  cr_assert(qp_obj_str_eq(qp_map_get(md, "source_format"), "gguf"));
  cr_assert_null(qp_map_get(md, "gguf"), "gguf goes to the entries");
  cr_assert_eq(u64_of(m, "gguf_version"), 3);
  cr_assert_eq(u64_of(m, "total"), 5, "4 GGUF entries and 1 HF file");
  cr_assert_eq(u64_of(m, "offset"), 0);
  const msgpack_object *en = arr_of(m, "entries");
  cr_assert_eq(en->via.array.size, 5);
  const msgpack_object *e = en->via.array.ptr;
  expect_entry(&e[0], "general.architecture", "string", 3);
  cr_assert(qp_obj_str_eq(&e[0].via.array.ptr[2], "llama"));
  expect_entry(&e[1], "llama.block_count", "u32", 3);
  cr_assert_eq(e[1].via.array.ptr[2].via.u64, 2);
  expect_entry(&e[2], "tokenizer.ggml.tokens", "[string]", 4);
  cr_assert_eq(e[2].via.array.ptr[2].type, MSGPACK_OBJECT_NIL);
  cr_assert_eq(e[2].via.array.ptr[3].via.u64, N_TOKENS);
  expect_entry(&e[3], "big.left_out", "[i32]", 4);
  cr_assert_eq(e[3].via.array.ptr[3].via.u64, 123456);
  expect_entry(&e[4], "hf.config", "json", 3);
  const msgpack_object *cfg = &e[4].via.array.ptr[2];
  cr_assert_eq(qp_map_get(cfg, "hidden_size")->via.u64, 32);
  cr_assert_float_eq(qp_map_get(cfg, "rope_theta")->via.f64, 10000.5, 0);
  ts_rx_destroy(&rx);
}

Test(daemon_model_info, offset_and_limit_page_the_entries) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = mi_call(&rx, "gg", NULL, 1, 1);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  const msgpack_object *m = ts_resp_result(r);
  cr_assert_eq(u64_of(m, "total"), 5);
  cr_assert_eq(u64_of(m, "offset"), 1);
  const msgpack_object *en = arr_of(m, "entries");
  cr_assert_eq(en->via.array.size, 1);
  expect_entry(&en->via.array.ptr[0], "llama.block_count", "u32", 3);
  r = mi_call(&rx, "gg", NULL, 99, 0);
  cr_assert_eq(ts_resp_code(r), 0);
  cr_assert_eq(arr_of(ts_resp_result(r), "entries")->via.array.size, 0, "past the end: none");
  cr_assert_eq(u64_of(ts_resp_result(r), "total"), 5);
  ts_rx_destroy(&rx);
}

/* The token list comes back whole and in order through pages of its elements, each answer
 * within the limit (mi_call checks), so several pages. */
Test(daemon_model_info, a_large_list_is_paged_by_key_within_the_limit) {
  ts_rx rx;
  open_rx(&rx);
  uint64_t got = 0, pages = 0;
  while (got < N_TOKENS) {
    const msgpack_object *r = mi_call(&rx, "gg", "tokenizer.ggml.tokens", got, 0);
    cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
    const msgpack_object *m = ts_resp_result(r);
    cr_assert(qp_obj_str_eq(qp_map_get(m, "type"), "[string]"));
    cr_assert_eq(u64_of(m, "total"), N_TOKENS);
    cr_assert_eq(u64_of(m, "offset"), got);
    const msgpack_object *v = arr_of(m, "values");
    cr_assert_gt(v->via.array.size, 0, "progress at %llu", (unsigned long long)got);
    for (uint32_t i = 0; i < v->via.array.size; i++) {
      char want[16];
      snprintf(want, sizeof want, "t%llu", (unsigned long long)(got + i));
      cr_assert(qp_obj_str_eq(&v->via.array.ptr[i], want), "element %s", want);
    }
    got += v->via.array.size;
    pages++;
  }
  cr_assert_eq(got, N_TOKENS);
  cr_assert_geq(pages, 5, "%llu pages for ~20 KB under a 4 KiB limit", (unsigned long long)pages);
  const msgpack_object *r = mi_call(&rx, "gg", "tokenizer.ggml.tokens", 10, 3);
  cr_assert_eq(ts_resp_code(r), 0);
  const msgpack_object *v = arr_of(ts_resp_result(r), "values");
  cr_assert_eq(v->via.array.size, 3);
  cr_assert(qp_obj_str_eq(&v->via.array.ptr[0], "t10") && qp_obj_str_eq(&v->via.array.ptr[2], "t12"));
  ts_rx_destroy(&rx);
}

Test(daemon_model_info, a_model_without_metadata) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = mi_call(&rx, "plain", NULL, 0, 0);
  cr_assert_eq(ts_resp_code(r), 0, "%s", ts_resp_msg(r));
  const msgpack_object *m = ts_resp_result(r);
  const msgpack_object *md = qp_map_get(m, "metadata");
  cr_assert(md && md->type == MSGPACK_OBJECT_MAP && md->via.map.size == 0);
  cr_assert_null(qp_map_get(m, "gguf_version"));
  cr_assert_eq(u64_of(m, "total"), 0);
  cr_assert_eq(arr_of(m, "entries")->via.array.size, 0);
  ts_rx_destroy(&rx);
}

static void expect_err(ts_rx *rx, const char *model, const char *key, int code, const char *needle) {
  const msgpack_object *r = mi_call(rx, model, key, 0, 0);
  cr_assert_eq(ts_resp_code(r), code, "%s %s: %d %s", model, key ? key : "", ts_resp_code(r),
               ts_resp_msg(r));
  cr_assert(strstr(ts_resp_msg(r), needle), "message \"%s\" lacks \"%s\"", ts_resp_msg(r), needle);
}

Test(daemon_model_info, bad_names_keys_and_params_are_named) {
  ts_rx rx;
  open_rx(&rx);
  expect_err(&rx, "nope", NULL, QINS_ENO_MODEL, "nope");
  expect_err(&rx, "gg", "no.such.key", QINS_EBAD_PARAMS, "no.such.key");
  expect_err(&rx, "gg", "llama.block_count", QINS_EBAD_PARAMS, "not an array");
  expect_err(&rx, "gg", "big.left_out", QINS_EUNSUPPORTED, "123456 elements");
  expect_err(&rx, "huge", NULL, QINS_ERESPONSE_TOO_LARGE, "max-response-bytes");
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 3, "model_info", 2);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "gg");
  qp_pack_cstr(&pk, "offset");
  qp_pack_cstr(&pk, "zero");
  const msgpack_object *r = ts_call(&rx, &sb, 3);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r);
  cr_assert_eq(ts_resp_code(r), QINS_EBAD_PARAMS);
  cr_assert(strstr(ts_resp_msg(r), "offset"), "%s", ts_resp_msg(r));
  ts_req_begin(&sb, &pk, 4, "model_info", -1);
  r = ts_call(&rx, &sb, 4);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r);
  cr_assert_eq(ts_resp_code(r), QINS_EBAD_PARAMS);
  cr_assert(strstr(ts_resp_msg(r), "model"), "%s", ts_resp_msg(r));
  ts_rx_destroy(&rx);
  cr_assert_eq(ts_ping(D.sock), 0, "the daemon keeps serving");
}

Test(daemon_model_info, libqins_pages_and_reassembles) {
  qins_client *c;
  cr_assert_eq(qins_connect(&c, D.sock, 0), 0);
  char *js = NULL;
  cr_assert_eq(qins_model_metadata(c, "plain", &js), 0, "%s", qins_client_error(c));
  cr_assert_str_eq(js, "{}");
  qins_free(js);
  cr_assert_eq(qins_model_metadata(c, "nope", &js), QINS_ENO_MODEL);
  cr_assert_null(js);
  cr_assert_eq(qins_model_metadata(c, "gg", &js), 0, "%s", qins_client_error(c));
  qs_json *j = NULL;
  char err[128];
  cr_assert_eq(qs_json_parse(js, strlen(js), &j, err, sizeof err), 0, "%s: %s", err, js);
  cr_assert_str_eq(qs_json_get(j, "general.architecture")->str, "llama");
  const qs_json *gg = qs_json_get(j, "gguf"), *kv = qs_json_get(gg, "kv");
  cr_assert_eq(qs_json_get(gg, "version")->u64, 3);
  cr_assert(kv && kv->len == 4, "the GGUF entries in the stored shape");
  const qs_json *tok = qs_json_at(kv, 2);
  cr_assert_str_eq(qs_json_at(tok, 0)->str, "tokenizer.ggml.tokens");
  cr_assert_eq(qs_json_at(tok, 2)->type, QS_JSON_NULL, "too large here: [key, type, null, count]");
  cr_assert_eq(qs_json_at(tok, 3)->u64, N_TOKENS);
  cr_assert_eq(qs_json_get(qs_json_get(qs_json_get(j, "hf"), "config"), "hidden_size")->u64, 32);
  qs_json_free(j);
  qins_free(js);
  cr_assert_eq(qins_model_info_page(c, "gg", "tokenizer.ggml.tokens", 2, 2, &js), 0);
  cr_assert(strstr(js, "\"values\":[\"t2\",\"t3\"]"), "%s", js);
  qins_free(js);
  qins_close(c);
}
