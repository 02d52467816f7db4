/* SPDX-License-Identifier: MIT */
/*
 * store_safetensors.c — tests of the validating safetensors reader (store/safetensors.h,
 * FORMATS-AND-PEERS.md §1.1): the shared stories260K file, a written-then-read round trip, and
 * each validation rule with the message it must produce.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "qins.h"
#include "qt.h"
#include "safetensors.h"

static char tmpdir[64];

static void setup(void) { cr_assert_eq(qt_tmpdir(tmpdir), 0); }
static void teardown(void) { qt_rmrf(tmpdir); }

/* Writes u64 header length, header text, then data_len bytes of pattern. */
static const char *write_st(const char *name, const char *hdr, uint64_t hlen_override,
                            size_t data_len) {
  static char path[256];
  snprintf(path, sizeof path, "%s/%s", tmpdir, name);
  FILE *f = fopen(path, "wb");
  cr_assert_not_null(f);
  uint64_t hl = hlen_override ? hlen_override : strlen(hdr);
  unsigned char lb[8];
  for (int i = 0; i < 8; i++) lb[i] = (unsigned char)(hl >> (8 * i));
  fwrite(lb, 1, 8, f);
  fwrite(hdr, 1, strlen(hdr), f);
  for (size_t i = 0; i < data_len; i++) fputc((int)(i * 7 + 1), f);
  fclose(f);
  return path;
}

static void expect_bad(const char *hdr, size_t data_len, const char *want) {
  const char *p = write_st("bad.safetensors", hdr, 0, data_len);
  qs_st_file *f = (qs_st_file *)1;
  char err[512];
  int rc = qs_st_open(p, &f, err, sizeof err);
  cr_assert_eq(rc, QINS_EFORMAT, "accepted %s (rc %d: %s)", hdr, rc, err);
  cr_assert_null(f);
  cr_assert(strstr(err, p), "error '%s' does not name the file", err);
  cr_assert(strstr(err, want), "error for %s is '%s', want '%s'", hdr, err, want);
}

TestSuite(store_safetensors, .init = setup, .fini = teardown);

Test(store_safetensors, reads_a_valid_file_and_its_rows) {
  const char *hdr = "{\"__metadata__\":{\"format\":\"pt\",\"q\":\"a\\\"b\"},"
                    "\"b\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[16,28]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                    "\"z\":{\"dtype\":\"I8\",\"shape\":[0,5],\"data_offsets\":[28,28]},"
                    "\"s\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[28,29]}}    ";
  const char *p = write_st("ok.safetensors", hdr, 0, 29);
  qs_st_file *f;
  char err[256];
  cr_assert_eq(qs_st_open(p, &f, err, sizeof err), 0, "%s", err);
  cr_assert_eq(qs_st_count(f), 4);
  cr_assert_str_eq(qs_st_tensor_at(f, 0)->name, "a");
  cr_assert_str_eq(qs_st_tensor_at(f, 1)->name, "b");
  cr_assert_str_eq(qs_st_tensor_at(f, 2)->name, "z"); /* zero-size before the one at its offset */
  cr_assert_str_eq(qs_st_tensor_at(f, 3)->name, "s");
  const qs_st_tensor *b = qs_st_find(f, "b");
  cr_assert_eq(b->dtype, QS_ST_F16);
  cr_assert_eq(b->ndim, 2);
  cr_assert_eq(b->n_elem, 6);
  cr_assert_eq(b->offset, 8 + strlen(hdr) + 16);
  cr_assert_eq(qs_st_n_rows(b), 2);
  unsigned char row[6];
  cr_assert_eq(qs_st_read_rows(f, b, 1, 2, row, err, sizeof err), 0, "%s", err);
  for (int i = 0; i < 6; i++) cr_assert_eq(row[i], (unsigned char)((22 + i) * 7 + 1));
  cr_assert_eq(qs_st_read_rows(f, b, 1, 3, row, err, sizeof err), QINS_EINVALID);
  const qs_st_tensor *s = qs_st_find(f, "s");
  cr_assert_eq(s->ndim, 0);
  cr_assert_eq(s->n_elem, 1);
  cr_assert_eq(qs_st_find(f, "z")->n_elem, 0);
  cr_assert_null(qs_st_find(f, "nope"));
  cr_assert_str_eq(qs_st_metadata_json(f), "{\"format\":\"pt\",\"q\":\"a\\\"b\"}");
  const char *k, *v;
  cr_assert_eq(qs_st_metadata_at(f, 1, &k, &v), 0);
  cr_assert_str_eq(k, "q");
  cr_assert_str_eq(v, "a\"b");
  qs_st_close(f);
}

Test(store_safetensors, header_builder_round_trips) {
  uint64_t s1[2] = {3, 2}, s2[1] = {5};
  qs_st_entry e[2] = {{"w\"x", QS_ST_BF16, 2, s1, 12}, {"n", QS_ST_F32, 1, s2, 20}};
  uint8_t *h;
  size_t hl;
  cr_assert_eq(qs_st_header_build(e, 2, "{\"k\":\"v\"}", &h, &hl), 0);
  cr_assert_eq(hl % 8, 0);
  char path[256];
  snprintf(path, sizeof path, "%s/rt.safetensors", tmpdir);
  FILE *f = fopen(path, "wb");
  fwrite(h, 1, hl, f);
  for (int i = 0; i < 32; i++) fputc(i, f);
  fclose(f);
  free(h);
  qs_st_file *sf;
  char err[256];
  cr_assert_eq(qs_st_open(path, &sf, err, sizeof err), 0, "%s", err);
  cr_assert_eq(qs_st_count(sf), 2);
  cr_assert_eq(qs_st_find(sf, "w\"x")->nbytes, 12);
  cr_assert_eq(qs_st_find(sf, "n")->offset, hl + 12);
  cr_assert_str_eq(qs_st_metadata_json(sf), "{\"k\":\"v\"}");
  qs_st_close(sf);
}

Test(store_safetensors, rejects_each_malformation_with_a_clear_message) {
  const char *ok = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  char buf[512];
  expect_bad("[1]", 0, "header is a JSON array, not an object");
  expect_bad("{\"a\":1,", 0, "header is not valid JSON");
  snprintf(buf, sizeof buf, "{%s,%s}", ok, ok);
  expect_bad(buf, 8, "duplicate key \"a\"");
  expect_bad("{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
             "unknown dtype \"F33\"");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
             "need 12 bytes but data_offsets span 8");
  /* A span larger than the shape needs is as wrong as a shorter one (the extra bytes would be
   * another tensor's, or garbage). */
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", 12,
             "need 8 bytes but data_offsets span 12");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8,
             "past the data buffer");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8,
             "END 0 < BEGIN 8");
  snprintf(buf, sizeof buf,
           "{%s,\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", ok);
  expect_bad(buf, 12, "overlapping");
  snprintf(buf, sizeof buf,
           "{%s,\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", ok);
  expect_bad(buf, 16, "gap");
  snprintf(buf, sizeof buf, "{%s}", ok);
  expect_bad(buf, 9, "trailing bytes");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,2],\"data_offsets\":[0,8]}}",
             8, "overflows 64 bits");
  expect_bad("{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,1]}}", 1,
             "not a whole number of bytes");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8,
             "shape[0] is not a non-negative");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "missing field \"data_offsets\"");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8,
             "unknown field \"x\"");
  snprintf(buf, sizeof buf, "{\"__metadata__\":{\"k\":1},%s}", ok);
  expect_bad(buf, 8, "__metadata__ value of \"k\" is a JSON number");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
             "9 dimensions");
}

Test(store_safetensors, rejects_bad_lengths) {
  char err[512];
  qs_st_file *f;
  const char *p = write_st("short.safetensors", "", 0, 0);
  cr_assert_eq(truncate(p, 5), 0);
  cr_assert_eq(qs_st_open(p, &f, err, sizeof err), QINS_EFORMAT);
  cr_assert(strstr(err, "too small for the 8-byte header length"), "%s", err);
  p = write_st("big.safetensors", "{}", 100000001, 0);
  cr_assert_eq(qs_st_open(p, &f, err, sizeof err), QINS_EFORMAT);
  cr_assert(strstr(err, "exceeds the limit of 100000000 bytes"), "%s", err);
  p = write_st("past.safetensors", "{}", 50, 0);
  cr_assert_eq(qs_st_open(p, &f, err, sizeof err), QINS_EFORMAT);
  cr_assert(strstr(err, "runs past the end of the file"), "%s", err);
  p = write_st("empty.safetensors", "{}", 0, 0);
  cr_assert_eq(qs_st_open(p, &f, err, sizeof err), 0, "%s", err);
  cr_assert_eq(qs_st_count(f), 0);
  qs_st_close(f);
  snprintf(err, sizeof err, "%s/missing.safetensors", tmpdir);
  cr_assert_lt(qs_st_open(err, &f, err, sizeof err), 0);
}

Test(store_safetensors, reads_stories260K) {
  const char *sh = getenv("QINS_SHARED");
  char path[4096], err[512];
  snprintf(path, sizeof path, "%s/models/stories260K.safetensors", sh ? sh : QINS_SHARED_DIR);
  if (access(path, R_OK)) cr_skip_test("%s absent: skipping", path);
  qs_st_file *f;
  cr_assert_eq(qs_st_open(path, &f, err, sizeof err), 0, "%s", err);
  cr_assert_eq(qs_st_count(f), 47);
  const qs_st_tensor *t = qs_st_find(f, "tok_embeddings.weight");
  cr_assert_not_null(t);
  cr_assert_eq(t->dtype, QS_ST_F32);
  cr_assert_eq(t->ndim, 2);
  cr_assert_eq(t->shape[0], 512);
  cr_assert_eq(t->shape[1], 64);
  /* Row 3 read by rows equals the same bytes read by byte range. */
  unsigned char a[256], b[256];
  cr_assert_eq(qs_st_read_rows(f, t, 3, 4, a, err, sizeof err), 0);
  cr_assert_eq(qs_st_read(f, t, 3 * 256, 256, b, err, sizeof err), 0);
  cr_assert_eq(memcmp(a, b, 256), 0);
  float x[64];
  memcpy(x, a, sizeof x); /* little-endian host: the file bytes are the floats */
  for (int i = 0; i < 64; i++) cr_assert(x[i] == x[i] && x[i] < 100 && x[i] > -100);
  qs_st_close(f);
}
