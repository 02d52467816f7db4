/* SPDX-License-Identifier: MIT */
/*
 * qins_text.h — the project's one growable text buffer and one JSON string escaper, shared by
 * store/, client/, daemon/ and qinsctl (not installed: internal to the project). proto/text.c
 * implements them; like qins_base.h it includes nothing of the project's, so any module can
 * include it without a cycle.
 *
 * A qp_buf starts zeroed ({0}); appends grow it by doubling and keep it NUL-terminated. An
 * allocation failure sets oom and turns later appends into no-ops, so a caller checks oom once at
 * the end; p is the caller's to free().
 */
#ifndef QINS_TEXT_H
#define QINS_TEXT_H

#include <stddef.h>
#include <stdio.h>

typedef struct qp_buf {
  char *p;     /* NUL-terminated text, or NULL before the first append */
  size_t n;    /* bytes of text, the NUL excluded */
  size_t cap;  /* bytes allocated at p */
  int oom;     /* 1 once an append failed for lack of memory */
} qp_buf;

void qp_put(qp_buf *b, const char *s, size_t n);
void qp_puts(qp_buf *b, const char *s);

/* Room for element n of a growable array p of *cap elements of elem bytes: p itself when n <
 * *cap, else p reallocated to twice *cap elements (first ones when *cap is 0) with *cap updated,
 * or NULL when out of memory (then p and *cap are unchanged and still the caller's). */
void *qp_grow(void *p, size_t *cap, size_t n, size_t elem, size_t first);

/* Styles of qp_json_str. */
enum {
  QP_JSON_U = 0,     /* every control character as \u00XX */
  QP_JSON_SHORT = 1, /* \n \r \t as two-character escapes, the other controls as \u00XX */
};

/* Appends s (n bytes, possibly untrusted) as a JSON string literal: quote and backslash escaped,
 * control characters and DEL escaped per style, well-formed UTF-8 kept as is and any other byte
 * replaced by \ufffd, so the result is always valid JSON. */
void qp_json_str(qp_buf *b, const char *s, size_t n, int style);
/* The same literal written to f. */
void qp_json_fput(FILE *f, const char *s, size_t n, int style);

/* Length of the well-formed UTF-8 sequence at s (n > 0 bytes left; s[0] >= 0x80), or 0
 * (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF). */
size_t qp_utf8_len(const unsigned char *s, size_t n);
/* 1 if the n bytes at s are well-formed UTF-8. */
int qp_utf8_valid(const char *s, size_t n);

#endif /* QINS_TEXT_H */
