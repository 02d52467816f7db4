/* SPDX-License-Identifier: MIT */
/*
 * proto_scan.c — unit tests of proto/'s bounded scanner, cursor reader and packers
 * (docs/PROTOCOL.md §1-§2): message boundaries at every split point, hostile declared lengths
 * rejected from their header bytes alone, depth limit, and reader/packer round trips.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "proto.h"

/* Packs a typical request into sb. */
static void pack_get(msgpack_sbuffer *sb, uint32_t msgid) {
  msgpack_packer pk;
  msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
  qp_pack_request(&pk, msgid, "get");
  msgpack_pack_array(&pk, 1);
  msgpack_pack_map(&pk, 3);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "m");
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, "layers.0.w");
  qp_pack_cstr(&pk, "slice");
  msgpack_pack_array(&pk, 2);
  msgpack_pack_array(&pk, 2);
  msgpack_pack_uint32(&pk, 0);
  msgpack_pack_uint32(&pk, 300);
  msgpack_pack_array(&pk, 2);
  msgpack_pack_uint32(&pk, 7);
  msgpack_pack_uint32(&pk, 70000);
}

Test(proto_scan, complete_at_every_split_point) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  pack_get(&sb, 7);
  pack_get(&sb, 8);
  size_t one = sb.size / 2;
  for (size_t cut = 0; cut <= sb.size; cut++) {
    qp_scan s;
    qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
    size_t n = 0;
    int r = qp_scan_next(&s, sb.data, cut, &n);
    if (cut < one) {
      cr_assert_eq(r, QP_MORE, "cut %zu", cut);
      r = qp_scan_next(&s, sb.data, sb.size, &n); /* the rest arrives */
    }
    cr_assert_eq(r, QP_COMPLETE, "cut %zu", cut);
    cr_assert_eq(n, one);
    qp_scan_reset(&s);
    r = qp_scan_next(&s, sb.data + one, sb.size - one, &n);
    cr_assert_eq(r, QP_COMPLETE);
    cr_assert_eq(n, sb.size - one);
  }
  msgpack_sbuffer_destroy(&sb);
}

Test(proto_scan, rejects_4gib_bin_from_its_header) {
  const uint8_t req[] = {0x94, 0x00, 0x01, 0xa3, 'g', 'e', 't', 0xc6, 0xff, 0xff, 0xff, 0xff};
  qp_scan s;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  size_t n;
  cr_assert_eq(qp_scan_next(&s, req, sizeof req, &n), QINS_ETOO_LARGE);
  cr_assert(strstr(s.what, "bin length 4294967295"), "%s", s.what);
}

Test(proto_scan, rejects_2pow32_array_and_map) {
  const uint8_t arr[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 0x00};
  const uint8_t map[] = {0x94, 0x00, 0x01, 0xdf, 0x80, 0x00, 0x00, 0x00};
  qp_scan s;
  size_t n;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, arr, sizeof arr, &n), QINS_ETOO_LARGE);
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, map, sizeof map, &n), QINS_ETOO_LARGE);
  cr_assert(strstr(s.what, "map"), "%s", s.what);
}

Test(proto_scan, counts_fit_exactly_at_the_limit) {
  /* fixarray of 3 nils: 4 bytes; a limit of 4 accepts it, 3 refuses it from the header. */
  const uint8_t m[] = {0x93, 0xc0, 0xc0, 0xc0};
  qp_scan s;
  size_t n;
  qp_scan_init(&s, 4, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, m, 1, &n), QP_MORE);
  cr_assert_eq(qp_scan_next(&s, m, 4, &n), QP_COMPLETE);
  cr_assert_eq(n, 4);
  qp_scan_init(&s, 3, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, m, 1, &n), QINS_ETOO_LARGE);
}

Test(proto_scan, depth_limit) {
  uint8_t m[16];
  memset(m, 0x91, sizeof m); /* nested one-element arrays */
  m[8] = 0xc0;               /* 8 levels then nil: allowed */
  qp_scan s;
  size_t n;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, m, 9, &n), QP_COMPLETE);
  cr_assert_eq(n, 9);
  m[8] = 0x91;
  m[9] = 0xc0;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, m, 10, &n), QINS_EPROTO);
}

Test(proto_scan, reserved_byte) {
  const uint8_t m[] = {0x92, 0x01, 0xc1};
  qp_scan s;
  size_t n;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, m, sizeof m, &n), QINS_EPROTO);
}

Test(proto_scan, stops_at_large_bin) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  qp_pack_response_ok(&pk, 42);
  msgpack_pack_map(&pk, 2);
  qp_pack_cstr(&pk, "dtype");
  qp_pack_cstr(&pk, "f32");
  qp_pack_cstr(&pk, "data");
  static uint8_t payload[100000];
  for (size_t i = 0; i < sizeof payload; i++) payload[i] = (uint8_t)i;
  msgpack_pack_bin_with_body(&pk, payload, sizeof payload);
  qp_scan s;
  size_t n;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  s.bin_stop = 4096;
  cr_assert_eq(qp_scan_next(&s, sb.data, sb.size - sizeof payload, &n), QP_BIN);
  cr_assert_eq(s.bin_len, sizeof payload);
  cr_assert_eq(n, sb.size - sizeof payload);
  /* The prefix parses with the cursor reader. */
  qp_rd r;
  qp_rd_init(&r, sb.data, n);
  uint32_t k, m;
  uint64_t u;
  cr_assert_eq(qp_rd_array(&r, &k), 0);
  cr_assert_eq(k, 4);
  cr_assert_eq(qp_rd_uint(&r, &u), 0);
  cr_assert_eq(u, 1);
  cr_assert_eq(qp_rd_uint(&r, &u), 0);
  cr_assert_eq(u, 42);
  cr_assert_eq(qp_rd_nil(&r), 0);
  cr_assert_eq(qp_rd_map(&r, &m), 0);
  cr_assert_eq(m, 2);
  const char *str;
  uint32_t sl;
  cr_assert_eq(qp_rd_skip(&r), 0); /* "dtype" */
  cr_assert_eq(qp_rd_str(&r, &str, &sl), 0);
  cr_assert(sl == 3 && memcmp(str, "f32", 3) == 0);
  cr_assert_eq(qp_rd_str(&r, &str, &sl), 0);
  cr_assert_eq(qp_rd_bin_header(&r, &sl), 0);
  cr_assert_eq(sl, sizeof payload);
  cr_assert_eq((const char *)r.p, sb.data + n);
  /* Continuing with the payload in place completes the message. */
  cr_assert_eq(qp_scan_next(&s, sb.data, sb.size, &n), QP_COMPLETE);
  cr_assert_eq(n, sb.size);
  msgpack_sbuffer_destroy(&sb);
}

Test(proto_scan, bin_header_matches_msgpack_c) {
  const uint32_t lens[] = {0, 1, 255, 256, 65535, 65536, 0xffffffffu};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_bin(&pk, lens[i]);
    uint8_t h[5];
    size_t n = qp_bin_header(h, lens[i]);
    cr_assert_eq(n, sb.size);
    cr_assert_eq(memcmp(h, sb.data, n), 0);
    msgpack_sbuffer_destroy(&sb);
  }
}

Test(proto_scan, error_response_round_trip) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  qp_pack_response_err(&pk, 9, QINS_ENO_TENSOR, "no tensor %s in model %s", "x", "m");
  msgpack_zone z;
  msgpack_zone_init(&z, 2048);
  msgpack_object o;
  size_t off = 0;
  cr_assert_eq(msgpack_unpack(sb.data, sb.size, &off, &z, &o), MSGPACK_UNPACK_SUCCESS);
  cr_assert_eq(o.type, MSGPACK_OBJECT_ARRAY);
  cr_assert_eq(o.via.array.size, 4);
  const msgpack_object *e = &o.via.array.ptr[2];
  cr_assert_eq(e->type, MSGPACK_OBJECT_ARRAY);
  cr_assert_eq(e->via.array.ptr[0].via.i64, QINS_ENO_TENSOR);
  cr_assert(qp_obj_str_eq(&e->via.array.ptr[1], "no tensor x in model m"));
  cr_assert_eq(o.via.array.ptr[3].type, MSGPACK_OBJECT_NIL);
  msgpack_zone_destroy(&z);
  msgpack_sbuffer_destroy(&sb);
}

Test(proto_scan, reader_rejects_truncation_without_moving) {
  const uint8_t m[] = {0xda, 0x00, 0x10, 'a'}; /* str16 of 16 bytes, 1 present */
  qp_rd r;
  qp_rd_init(&r, m, sizeof m);
  const char *s;
  uint32_t n;
  cr_assert_eq(qp_rd_str(&r, &s, &n), QINS_EPROTO);
  cr_assert_eq(r.p, m);
  cr_assert_eq(qp_rd_skip(&r), QINS_EPROTO);
  const uint8_t big[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
  qp_rd_init(&r, big, sizeof big);
  cr_assert_eq(qp_rd_skip(&r), QINS_EPROTO);
}

/* A random msgpack value of nesting depth <= depth (xorshift-driven). */
static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

static void pack_random(msgpack_packer *pk, int depth) {
  static const char blob[70000] = {1};
  switch (rnd() % (depth > 0 ? 12 : 9)) {
  case 0: msgpack_pack_nil(pk); break;
  case 1: msgpack_pack_true(pk); break;
  case 2: msgpack_pack_uint64(pk, rnd() >> (rnd() % 64)); break;
  case 3: msgpack_pack_int64(pk, -(int64_t)(rnd() >> (1 + rnd() % 63))); break;
  case 4: msgpack_pack_double(pk, 1.5); break;
  case 5: msgpack_pack_float(pk, 2.5f); break;
  case 6: msgpack_pack_str_with_body(pk, blob, rnd() % 3 ? rnd() % 40 : rnd() % sizeof blob); break;
  case 7: msgpack_pack_bin_with_body(pk, blob, rnd() % 3 ? rnd() % 40 : rnd() % sizeof blob); break;
  case 8: msgpack_pack_ext_with_body(pk, blob, rnd() % 20, 3); break;
  case 9: case 10: {
    uint32_t n = (uint32_t)(rnd() % (rnd() % 8 ? 5 : 20));
    msgpack_pack_array(pk, n);
    for (uint32_t i = 0; i < n; i++) pack_random(pk, depth - 1);
    break;
  }
  default: {
    uint32_t n = (uint32_t)(rnd() % 4);
    msgpack_pack_map(pk, n);
    for (uint32_t i = 0; i < 2 * n; i++) pack_random(pk, depth - 1);
    break;
  }
  }
}

/* The scanner, the cursor reader's skip and msgpack-c agree on the size of every valid value of
 * depth <= 8, given whole or a byte at a time. */
Test(proto_scan, agrees_with_msgpack_c_on_random_values) {
  for (int iter = 0; iter < 2000; iter++) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_random(&pk, QP_MAX_DEPTH);
    qp_scan s;
    size_t n = 0;
    qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
    cr_assert_eq(qp_scan_next(&s, sb.data, sb.size, &n), QP_COMPLETE, "iter %d: %s", iter, s.what);
    cr_assert_eq(n, sb.size);
    if (iter % 50 == 0) { /* incrementally */
      qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
      int r = QP_MORE;
      size_t len = 0;
      while (r == QP_MORE && len < sb.size) r = qp_scan_next(&s, sb.data, ++len, &n);
      cr_assert_eq(r, QP_COMPLETE);
      cr_assert_eq(n, sb.size);
      cr_assert_eq(len, sb.size, "complete only once the last byte is in");
    }
    qp_rd rd;
    qp_rd_init(&rd, sb.data, sb.size);
    cr_assert_eq(qp_rd_skip(&rd), 0);
    cr_assert_eq((const char *)rd.p, sb.data + sb.size);
    msgpack_zone z;
    msgpack_zone_init(&z, 2048);
    msgpack_object o;
    size_t off = 0;
    cr_assert_eq(msgpack_unpack(sb.data, sb.size, &off, &z, &o), MSGPACK_UNPACK_SUCCESS);
    cr_assert_eq(off, sb.size);
    msgpack_zone_destroy(&z);
    msgpack_sbuffer_destroy(&sb);
  }
}

/* Random bytes: the scanner never claims more than it was given, never reads past len, and a
 * complete verdict is one msgpack-c accepts with the same size. */
Test(proto_scan, random_bytes_are_bounded) {
  uint8_t buf[64];
  for (int iter = 0; iter < 200000; iter++) {
    size_t len = (size_t)(rnd() % sizeof buf);
    for (size_t i = 0; i < len; i++) buf[i] = (uint8_t)rnd();
    uint8_t *copy = malloc(len ? len : 1); /* exact-size copy: ASan catches any overread */
    memcpy(copy, buf, len);
    qp_scan s;
    size_t n = 0;
    qp_scan_init(&s, 1 << 10, QP_MAX_DEPTH);
    int r = qp_scan_next(&s, copy, len, &n);
    cr_assert(r == QP_MORE || r == QP_COMPLETE || r == QINS_EPROTO || r == QINS_ETOO_LARGE);
    if (r == QP_COMPLETE) {
      cr_assert_leq(n, len);
      msgpack_zone z;
      msgpack_zone_init(&z, 256);
      msgpack_object o;
      size_t off = 0;
      cr_assert_eq(msgpack_unpack((const char *)copy, n, &off, &z, &o), MSGPACK_UNPACK_SUCCESS);
      cr_assert_eq(off, n);
      msgpack_zone_destroy(&z);
    }
    qp_rd rd;
    qp_rd_init(&rd, copy, len);
    if (qp_rd_skip(&rd) == 0) cr_assert_leq((size_t)(rd.p - copy), len);
    free(copy);
  }
}

/* Messages mixing the one-byte forms the scanner takes on its fast path (fixint, fixstr, fixarray,
 * fixmap) with nil/bool and the wider forms (str8, int16, array16, map16, ext, fixext, bin). */
static void pack_mixed(msgpack_sbuffer *sb, int which) {
  msgpack_packer pk;
  msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
  static const char blob[300] = {7};
  switch (which) {
  case 0: /* the request of the scanner's benchmark */
    qp_pack_request(&pk, 7, "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 3);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "bench");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, "w");
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint32(&pk, 5);
    msgpack_pack_uint32(&pk, 6);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint32(&pk, 0);
    msgpack_pack_uint32(&pk, 1024);
    break;
  case 1: /* a response with every kind of value and a 300-byte bin last */
    qp_pack_response_ok(&pk, 9);
    msgpack_pack_map(&pk, 9);
    qp_pack_cstr(&pk, "ints");
    msgpack_pack_array(&pk, 7);
    msgpack_pack_int64(&pk, -1);
    msgpack_pack_int64(&pk, -33);
    msgpack_pack_int64(&pk, 127);
    msgpack_pack_uint64(&pk, 200);
    msgpack_pack_uint64(&pk, 70000);
    msgpack_pack_uint64(&pk, 1ull << 40);
    msgpack_pack_int64(&pk, -(1ll << 40));
    qp_pack_cstr(&pk, "flags");
    msgpack_pack_array(&pk, 4);
    msgpack_pack_true(&pk);
    msgpack_pack_false(&pk);
    msgpack_pack_nil(&pk);
    msgpack_pack_double(&pk, 0.5);
    qp_pack_cstr(&pk, "long name, longer than a fixstr's 31 bytes"); /* str8 */
    msgpack_pack_float(&pk, 1.5f);
    qp_pack_cstr(&pk, "empty");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_array(&pk, 0);
    msgpack_pack_map(&pk, 0);
    qp_pack_cstr(&pk, "a16");
    msgpack_pack_array(&pk, 16); /* array16 */
    for (int i = 0; i < 16; i++) msgpack_pack_int(&pk, i * 1000 - 3);
    qp_pack_cstr(&pk, "m16");
    msgpack_pack_map(&pk, 16); /* map16 */
    for (int i = 0; i < 16; i++) {
      msgpack_pack_int(&pk, i);
      msgpack_pack_str_with_body(&pk, blob, (size_t)i);
    }
    qp_pack_cstr(&pk, "ext");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_ext_with_body(&pk, blob, 4, 1);  /* fixext4 */
    msgpack_pack_ext_with_body(&pk, blob, 20, 2); /* ext8 */
    qp_pack_cstr(&pk, "small");
    msgpack_pack_bin_with_body(&pk, blob, 3);
    qp_pack_cstr(&pk, "data");
    msgpack_pack_bin_with_body(&pk, blob, sizeof blob);
    break;
  default: /* nested QP_MAX_DEPTH deep, fix and wide containers alternating */
    for (int d = 0; d < QP_MAX_DEPTH; d++) {
      if (d % 2) msgpack_pack_array(&pk, 2);
      else msgpack_pack_map(&pk, 1);
      msgpack_pack_str_with_body(&pk, blob, (size_t)d * 9);
    }
    msgpack_pack_nil(&pk);
    break;
  }
}

/* Scans m whole, then split at every byte offset (one call with the first part, one with all) and
 * a byte at a time, each from a fresh exact-size copy: same verdict, size and error text. */
static void scan_splits(const char *m, size_t size, uint64_t max_bytes, uint64_t bin_stop) {
  qp_scan s;
  size_t n0 = 0;
  qp_scan_init(&s, max_bytes, QP_MAX_DEPTH);
  s.bin_stop = bin_stop;
  int r0 = qp_scan_next(&s, m, size, &n0);
  char what0[sizeof s.what];
  memcpy(what0, s.what, sizeof what0);
  uint64_t bin0 = s.bin_len;
  cr_assert(r0 != QP_MORE, "limit %llu", (unsigned long long)max_bytes);
  for (size_t cut = 0; cut <= size + 1; cut++) { /* cut size + 1: a byte at a time */
    qp_scan_init(&s, max_bytes, QP_MAX_DEPTH);
    s.bin_stop = bin_stop;
    size_t n = 0, len = cut <= size ? cut : 0;
    int r = QP_MORE;
    while (r == QP_MORE) {
      char *copy = malloc(len ? len : 1); /* a new place each call: the buffer may move */
      memcpy(copy, m, len);
      r = qp_scan_next(&s, copy, len, &n);
      free(copy);
      if (r == QP_MORE) {
        cr_assert_lt(len, size, "cut %zu limit %llu", cut, (unsigned long long)max_bytes);
        len = cut <= size ? size : len + 1;
      }
    }
    cr_assert_eq(r, r0, "cut %zu limit %llu: %d vs %d", cut, (unsigned long long)max_bytes, r, r0);
    cr_assert_str_eq(s.what, what0, "cut %zu", cut);
    if (r == QP_COMPLETE || r == QP_BIN) cr_assert_eq(n, n0, "cut %zu", cut);
    if (r == QP_BIN) cr_assert_eq(s.bin_len, bin0);
  }
}

Test(proto_scan, mixed_forms_same_verdict_at_every_split_point_and_limit) {
  for (int which = 0; which < 3; which++) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_mixed(&sb, which);
    /* Every limit up to the size: ETOO_LARGE below it (from a header, a declared length or
     * count, or the message's length), complete from it on. */
    for (uint64_t max = 0; max <= sb.size + 1; max++) {
      scan_splits(sb.data, sb.size, max, 0);
      qp_scan s;
      size_t n;
      qp_scan_init(&s, max, QP_MAX_DEPTH);
      int r = qp_scan_next(&s, sb.data, sb.size, &n);
      if (max < sb.size) cr_assert_eq(r, QINS_ETOO_LARGE, "which %d limit %llu", which,
                                      (unsigned long long)max);
      else cr_assert(r == QP_COMPLETE && n == sb.size, "which %d: %s", which, s.what);
    }
    msgpack_sbuffer_destroy(&sb);
  }
}

Test(proto_scan, mixed_forms_stop_at_bin_at_every_split_point) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  pack_mixed(&sb, 1);
  scan_splits(sb.data, sb.size, 1 << 20, 100); /* the 300-byte bin stops; the 3-byte one not */
  qp_scan s;
  size_t n;
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  s.bin_stop = 100;
  cr_assert_eq(qp_scan_next(&s, sb.data, sb.size, &n), QP_BIN);
  cr_assert_eq(s.bin_len, 300);
  cr_assert_eq(n, sb.size - 300);
  qp_scan_bin_done(&s);
  cr_assert_eq(qp_scan_offset(&s), sb.size);
  cr_assert_eq(qp_scan_next(&s, sb.data, sb.size, &n), QP_COMPLETE);
  cr_assert_eq(n, sb.size);
  msgpack_sbuffer_destroy(&sb);
}

/* Errors found on the one-byte forms' path say the same as the general path's. */
Test(proto_scan, fix_form_errors) {
  qp_scan s;
  size_t n;
  const uint8_t str[] = {0x92, 0x01, 0xa5, 'a', 'b', 'c', 'd', 'e'};
  qp_scan_init(&s, 6, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, str, 3, &n), QINS_ETOO_LARGE);
  cr_assert_str_eq(s.what, "str length 5 at offset 2 exceeds the limit of 6");
  const uint8_t map[] = {0x91, 0x8f};
  qp_scan_init(&s, 30, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, map, sizeof map, &n), QINS_ETOO_LARGE);
  cr_assert_str_eq(s.what, "map of 15 items at offset 1 exceeds the limit of 30 bytes");
  qp_scan_init(&s, 32, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, map, sizeof map, &n), QP_MORE); /* 2 + 2 * 15 <= 32 */
  const uint8_t arr[] = {0x9f};
  qp_scan_init(&s, 15, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, arr, sizeof arr, &n), QINS_ETOO_LARGE);
  cr_assert_str_eq(s.what, "array of 15 items at offset 0 exceeds the limit of 15 bytes");
  const uint8_t longer[] = {0x93, 0x01, 0x02, 0x03};
  qp_scan_init(&s, 3, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, longer, 1, &n), QINS_ETOO_LARGE); /* 3 items need 4 bytes */
  const uint8_t flat[] = {0x01, 0x02};
  qp_scan_init(&s, 1, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, flat, sizeof flat, &n), QP_COMPLETE);
  cr_assert_eq(n, 1);
  uint8_t deep[QP_MAX_DEPTH + 2];
  memset(deep, 0x81, sizeof deep); /* maps of one pair, nested one level too deep */
  qp_scan_init(&s, 1 << 20, QP_MAX_DEPTH);
  cr_assert_eq(qp_scan_next(&s, deep, sizeof deep, &n), QINS_EPROTO);
  cr_assert_str_eq(s.what, "nesting deeper than 8 at offset 8");
  const uint8_t reserved[] = {0x92, 0xa1, 'x', 0xc1};
  qp_scan_init(&s, 3, QP_MAX_DEPTH); /* 0xc1 at the limit: reserved wins over the limit */
  cr_assert_eq(qp_scan_next(&s, reserved, sizeof reserved, &n), QINS_EPROTO);
  cr_assert_str_eq(s.what, "reserved byte 0xc1 at offset 3");
}
