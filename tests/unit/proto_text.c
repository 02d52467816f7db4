/* SPDX-License-Identifier: MIT */
/*
 * proto_text.c — the shared growable buffer, array growth and JSON string escaper
 * (proto/qins_text.h): the exact bytes of both escape styles, ill-formed UTF-8 replaced by
 * \ufffd, and growth keeping the text and the capacity right.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "qins_text.h"

static char *esc(const char *s, size_t n, int style) {
  qp_buf b = {0};
  qp_json_str(&b, s, n, style);
  cr_assert(!b.oom);
  cr_assert_eq(strlen(b.p), b.n);
  return b.p;
}

Test(proto_text, json_styles) {
  static const char in[] = "a\"b\\c\nd\re\tf\x01g\x7fh";
  char *u = esc(in, sizeof in - 1, QP_JSON_U);
  cr_assert_str_eq(u, "\"a\\\"b\\\\c\\u000ad\\u000de\\u0009f\\u0001g\\u007fh\"");
  char *s = esc(in, sizeof in - 1, QP_JSON_SHORT);
  cr_assert_str_eq(s, "\"a\\\"b\\\\c\\nd\\re\\tf\\u0001g\\u007fh\"");
  free(u);
  free(s);
  char *z = esc("x\0y", 3, QP_JSON_U); /* an embedded NUL is escaped, not a terminator */
  cr_assert_str_eq(z, "\"x\\u0000y\"");
  free(z);
}

Test(proto_text, json_utf8) {
  /* é, €, 😀 kept; a lone continuation byte, an overlong form, a surrogate and a truncated
   * sequence each become \ufffd per byte that starts no well-formed sequence. */
  static const char ok[] = "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
  char *a = esc(ok, sizeof ok - 1, QP_JSON_SHORT);
  cr_assert_str_eq(a, "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"");
  free(a);
  char *b = esc("\x80|\xc0\xaf|\xed\xa0\x80|\xe2\x82", 11, QP_JSON_U);
  cr_assert_str_eq(b, "\"\\ufffd|\\ufffd\\ufffd|\\ufffd\\ufffd\\ufffd|\\ufffd\\ufffd\"");
  free(b);
  cr_assert(qp_utf8_valid(ok, sizeof ok - 1));
  cr_assert(!qp_utf8_valid("\xed\xa0\x80", 3));
}

Test(proto_text, buffer_and_grow) {
  qp_buf b = {0};
  for (int i = 0; i < 1000; i++) qp_puts(&b, "0123456789");
  cr_assert_eq(b.n, 10000);
  cr_assert_eq(strlen(b.p), 10000);
  cr_assert(b.cap > b.n);
  cr_assert_eq(memcmp(b.p + 9990, "0123456789", 10), 0);
  free(b.p);

  int *v = NULL;
  size_t n = 0, cap = 0;
  for (int i = 0; i < 100; i++) {
    int *nv = qp_grow(v, &cap, n, sizeof *v, 4);
    cr_assert_not_null(nv);
    v = nv;
    cr_assert(n < cap);
    v[n++] = i;
  }
  cr_assert_eq(cap, 128); /* 4 doubled five times */
  for (int i = 0; i < 100; i++) cr_assert_eq(v[i], i);
  size_t big = (size_t)-1 / 2;
  cr_assert_null(qp_grow(v, &big, big, 8, 4)); /* the size would overflow: refused, untouched */
  cr_assert_eq(big, (size_t)-1 / 2);
  free(v);
}
