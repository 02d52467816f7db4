/* SPDX-License-Identifier: MIT */
/*
 * text.c — the growable buffer and the JSON string escaper of qins_text.h.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qins_text.h"

void qp_put(qp_buf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->n + n + 1 > b->cap) {
    size_t nc = b->cap ? b->cap : 256;
    while (nc < b->n + n + 1) nc *= 2;
    char *np = realloc(b->p, nc);
    if (!np) {
      b->oom = 1;
      return;
    }
    b->p = np;
    b->cap = nc;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}

void qp_puts(qp_buf *b, const char *s) { qp_put(b, s, strlen(s)); }

void *qp_grow(void *p, size_t *cap, size_t n, size_t elem, size_t first) {
  if (n < *cap) return p;
  size_t nc = *cap ? 2 * *cap : first;
  if (nc > SIZE_MAX / elem) return NULL;
  void *np = realloc(p, nc * elem);
  if (np) *cap = nc;
  return np;
}

size_t qp_utf8_len(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else return 0;
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t k = 2; k < len; k++)
    if ((s[k] & 0xC0) != 0x80) return 0;
  return len;
}

int qp_utf8_valid(const char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    size_t l = (unsigned char)s[i] < 0x80 ? 1 : qp_utf8_len((const unsigned char *)s + i, n - i);
    if (!l) return 0;
    i += l;
  }
  return 1;
}

void qp_json_str(qp_buf *b, const char *s, size_t n, int style) {
  static const char hex[] = "0123456789abcdef";
  qp_put(b, "\"", 1);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
    if (c >= 0x80) {
      size_t l = qp_utf8_len((const unsigned char *)s + i, n - i);
      if (l) {
        qp_put(b, s + i, l);
        i += l - 1;
      } else {
        qp_put(b, "\\ufffd", 6);
      }
    } else if (c == '"' || c == '\\') {
      esc[1] = (char)c;
      qp_put(b, esc, 2);
    } else if (style == QP_JSON_SHORT && (c == '\n' || c == '\r' || c == '\t')) {
      esc[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
      qp_put(b, esc, 2);
    } else if (c < 0x20 || c == 0x7F) {
      qp_put(b, esc, 6);
    } else {
      qp_put(b, s + i, 1);
    }
  }
  qp_put(b, "\"", 1);
}

void qp_json_fput(FILE *f, const char *s, size_t n, int style) {
  qp_buf b = {0};
  qp_json_str(&b, s, n, style);
  if (b.oom) fputs("null", f); /* out of memory: still valid JSON */
  else fwrite(b.p, 1, b.n, f);
  free(b.p);
}
