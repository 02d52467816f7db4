/* SPDX-License-Identifier: MIT */
/*
 * store_json.c — tests of the strict JSON parser (store/json.h): values, escapes, surrogates,
 * exact integers, and rejection of malformed input with the byte offset in the message.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "qins.h"

static qs_json *parse_ok(const char *s) {
  qs_json *v = NULL;
  char err[256];
  int rc = qs_json_parse(s, strlen(s), &v, err, sizeof err);
  cr_assert_eq(rc, 0, "parse of %s failed: %s", s, err);
  return v;
}

static void parse_bad(const char *s, size_t len, const char *want) {
  qs_json *v = (qs_json *)1;
  char err[256];
  int rc = qs_json_parse(s, len, &v, err, sizeof err);
  cr_assert_eq(rc, QINS_EFORMAT, "accepted %.*s", (int)len, s);
  cr_assert_null(v);
  cr_assert(strstr(err, want), "error for %.*s is '%s', want '%s'", (int)len, s, err, want);
}

Test(store_json, parses_nested_values) {
  qs_json *v = parse_ok(" {\"a\": [1, -2, 3.5, true, false, null], \"b\": {\"c\": \"d\"}} ");
  cr_assert_eq(v->type, QS_JSON_OBJECT);
  cr_assert_eq(v->len, 2);
  const qs_json *a = qs_json_get(v, "a");
  cr_assert_eq(a->type, QS_JSON_ARRAY);
  cr_assert_eq(a->len, 6);
  cr_assert_eq(qs_json_at(a, 0)->i64, 1);
  cr_assert_eq(qs_json_at(a, 1)->i64, -2);
  cr_assert(!(qs_json_at(a, 1)->num_flags & QS_JSON_IS_U64));
  cr_assert_float_eq(qs_json_at(a, 2)->num, 3.5, 0);
  cr_assert(!(qs_json_at(a, 2)->num_flags & QS_JSON_INTEGRAL));
  cr_assert_eq(qs_json_at(a, 3)->boolean, 1);
  cr_assert_eq(qs_json_at(a, 4)->boolean, 0);
  cr_assert_eq(qs_json_at(a, 5)->type, QS_JSON_NULL);
  cr_assert_str_eq(qs_json_get(qs_json_get(v, "b"), "c")->str, "d");
  cr_assert_null(qs_json_get(v, "zz"));
  cr_assert_null(qs_json_at(a, 6));
  qs_json_free(v);
}

Test(store_json, keeps_exact_64bit_integers) {
  qs_json *v = parse_ok("[18446744073709551615, 9223372036854775807, -9223372036854775808, "
                        "18446744073709551616, 1e3]");
  cr_assert_eq(v->items[0].u64, UINT64_MAX);
  cr_assert(!(v->items[0].num_flags & QS_JSON_IS_I64));
  cr_assert_eq(v->items[1].i64, INT64_MAX);
  cr_assert_eq(v->items[2].i64, INT64_MIN);
  cr_assert_eq(v->items[3].num_flags, QS_JSON_INTEGRAL); /* too big for either */
  cr_assert_eq(v->items[4].num_flags, 0);
  cr_assert_float_eq(v->items[4].num, 1000.0, 0);
  qs_json_free(v);
}

Test(store_json, decodes_escapes_and_surrogates) {
  qs_json *v = parse_ok("\"a\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\\u0000z\"");
  const char want[] = "a\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80\0z";
  cr_assert_eq(v->len, sizeof want - 1);
  cr_assert_eq(memcmp(v->str, want, v->len), 0);
  qs_json_free(v);
  v = parse_ok("\"\xe2\x82\xac\"");
  cr_assert_str_eq(v->str, "\xe2\x82\xac");
  qs_json_free(v);
}

Test(store_json, rejects_malformed_input_naming_the_offset) {
  parse_bad("{\"a\":1,\"a\":2}", 13, "byte 7: duplicate key \"a\"");
  parse_bad("[1,]", 4, "byte 3");
  parse_bad("[01]", 4, "leading zero");
  parse_bad("[1.]", 4, "digit expected");
  parse_bad("[-]", 3, "bad number");
  parse_bad("[+1]", 4, "unexpected character '+'");
  parse_bad("[NaN]", 5, "unexpected character 'N'");
  parse_bad("\"abc", 4, "unterminated string");
  parse_bad("\"\\ud800\"", 8, "not followed by a low surrogate");
  parse_bad("\"\\udc00\"", 8, "lone low surrogate");
  parse_bad("\"\\u12\"", 6, "bad \\u escape");
  parse_bad("\"\\x\"", 4, "bad escape");
  parse_bad("\"a\x01\"", 4, "control character");
  parse_bad("\"\xc0\xaf\"", 4, "invalid UTF-8");
  parse_bad("\"\xed\xa0\x80\"", 5, "invalid UTF-8");
  parse_bad("\"\xf4\x90\x80\x80\"", 6, "invalid UTF-8");
  parse_bad("{} x", 4, "byte 3: trailing characters");
  parse_bad("{\"a\" 1}", 7, "expected ':'");
  parse_bad("{1:2}", 5, "expected a string key");
  parse_bad("", 0, "unexpected end of input");
  parse_bad("tru", 3, "unexpected character");
  parse_bad("[1 2]", 5, "expected ',' or ']'");
  parse_bad("{\"a\":1", 6, "unterminated object");
  parse_bad("[1", 2, "unterminated array");
  parse_bad("[\0]", 3, "byte 1: unexpected byte 0x00");
}

Test(store_json, bounds_nesting_depth) {
  char deep[2 * (QS_JSON_MAX_DEPTH + 2)];
  size_t n = QS_JSON_MAX_DEPTH + 1;
  for (size_t i = 0; i < n; i++) { deep[i] = '['; deep[2 * n - 1 - i] = ']'; }
  parse_bad(deep, 2 * n, "nesting deeper than");
  n = QS_JSON_MAX_DEPTH;
  for (size_t i = 0; i < n; i++) { deep[i] = '['; deep[2 * n - 1 - i] = ']'; }
  qs_json *v = NULL;
  cr_assert_eq(qs_json_parse(deep, 2 * n, &v, NULL, 0), 0);
  qs_json_free(v);
}

Test(store_json, finds_keys_in_large_objects_and_catches_late_duplicates) {
  size_t n = 20000, cap = n * 24 + 64, o = 0;
  char *s = malloc(cap);
  o += (size_t)sprintf(s + o, "{");
  for (size_t i = 0; i < n; i++) o += (size_t)sprintf(s + o, "%s\"k%zu\":%zu", i ? "," : "", i, i);
  o += (size_t)sprintf(s + o, "}");
  qs_json *v = NULL;
  cr_assert_eq(qs_json_parse(s, o, &v, NULL, 0), 0);
  cr_assert_eq(qs_json_get(v, "k12345")->u64, 12345);
  cr_assert_eq(qs_json_get(v, "k0")->u64, 0);
  qs_json_free(v);
  o--; /* replace '}' by a duplicate of the first key */
  o += (size_t)sprintf(s + o, ",\"k0\":1}");
  char err[256];
  cr_assert_eq(qs_json_parse(s, o, &v, err, sizeof err), QINS_EFORMAT);
  cr_assert(strstr(err, "duplicate key \"k0\""), "%s", err);
  free(s);
}

Test(store_json, reads_the_shared_vectors_file) {
  const char *sh = getenv("QINS_SHARED");
  char path[4096];
  snprintf(path, sizeof path, "%s/docs/qins-vectors.json", sh ? sh : QINS_SHARED_DIR);
  FILE *f = fopen(path, "rb");
  if (!f) cr_skip_test("%s absent", path);
  char *buf = malloc(1 << 20);
  size_t n = fread(buf, 1, 1 << 20, f);
  fclose(f);
  qs_json *v = NULL;
  char err[256];
  cr_assert_eq(qs_json_parse(buf, n, &v, err, sizeof err), 0, "%s", err);
  cr_assert_eq(v->type, QS_JSON_OBJECT);
  cr_assert_not_null(qs_json_get(v, "seed-log"));
  qs_json_free(v);
  free(buf);
}
