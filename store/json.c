/* SPDX-License-Identifier: MIT */
/*
 * json.c — strict JSON parser (see json.h for the rules it enforces).
 *
 * Design: recursive descent with an explicit depth bound; containers grow by doubling; strings
 * are decoded into fresh buffers no longer than their escaped form. After an object is parsed its
 * members are sorted by (key, offset): adjacent equal keys are duplicates (reported at the later
 * one's offset) and the sorted index serves qs_json_get by binary search, so a safetensors header
 * with a million tensors costs O(n log n), never O(n^2).
 */
#include "json.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "qins_base.h"
#include "qins_text.h"

typedef struct qs__jp {
  const unsigned char *s; /* input */
  size_t n;               /* input length */
  size_t i;               /* cursor */
  char *err;              /* caller's error buffer (may be NULL) */
  size_t errlen;
  int rc;                 /* first error */
} qs__jp;

__attribute__((format(printf, 3, 4))) static int qs__jfail(qs__jp *p, size_t at, const char *fmt,
                                                          ...) {
  if (p->rc) return p->rc;
  p->rc = QINS_EFORMAT;
  if (p->err && p->errlen) {
    int k = snprintf(p->err, p->errlen, "byte %zu: ", at);
    if (k >= 0 && (size_t)k < p->errlen) {
      va_list ap;
      va_start(ap, fmt);
      vsnprintf(p->err + k, p->errlen - (size_t)k, fmt, ap);
      va_end(ap);
    }
  }
  return p->rc;
}

static int qs__jnomem(qs__jp *p) {
  if (!p->rc) {
    p->rc = QINS_ENOMEM;
    if (p->err && p->errlen) snprintf(p->err, p->errlen, "out of memory parsing JSON");
  }
  return p->rc;
}

static void qs__jfree_inner(qs_json *v) {
  if (!v) return;
  free(v->str);
  if (v->items) {
    for (size_t i = 0; i < v->len; i++) {
      qs__jfree_inner(&v->items[i]);
      if (v->type == QS_JSON_OBJECT) free((char *)v->items[i].key);
    }
    free(v->items);
  }
  free(v->sorted);
  v->str = NULL;
  v->items = NULL;
  v->sorted = NULL;
}

void qs_json_free(qs_json *v) {
  if (!v) return;
  qs__jfree_inner(v);
  free(v);
}

static void qs__jws(qs__jp *p) {
  while (p->i < p->n) {
    unsigned char c = p->s[p->i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
      p->i++;
    else
      break;
  }
}

static int qs__hex4(const unsigned char *s, unsigned *out) {
  unsigned v = 0;
  for (int k = 0; k < 4; k++) {
    unsigned c = s[k], d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else return -1;
    v = v * 16 + d;
  }
  *out = v;
  return 0;
}

static size_t qs__utf8_put(char *o, unsigned cp) {
  if (cp < 0x80) { o[0] = (char)cp; return 1; }
  if (cp < 0x800) {
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (char)(0xE0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (char)(0xF0 | (cp >> 18));
  o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  o[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* Length of the valid UTF-8 sequence at s[0..avail), or 0 if invalid (RFC 3629 table). */
static size_t qs__utf8_len(const unsigned char *s, size_t avail) {
  unsigned c = s[0];
  if (c < 0x80) return 1;
  size_t n;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c == 0xE0) { n = 3; lo = 0xA0; }
  else if (c >= 0xE1 && c <= 0xEC) n = 3;
  else if (c == 0xED) { n = 3; hi = 0x9F; } /* no UTF-16 surrogates */
  else if (c >= 0xEE && c <= 0xEF) n = 3;
  else if (c == 0xF0) { n = 4; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) n = 4;
  else if (c == 0xF4) { n = 4; hi = 0x8F; } /* <= U+10FFFF */
  else return 0;
  if (avail < n) return 0;
  if (s[1] < lo || s[1] > hi) return 0;
  for (size_t k = 2; k < n; k++)
    if (s[k] < 0x80 || s[k] > 0xBF) return 0;
  return n;
}

/* Parses a string at p->i (which is '"'); *out gets a malloc'd NUL-terminated buffer. */
static int qs__jstring(qs__jp *p, char **out, size_t *out_len) {
  size_t start = p->i;
  p->i++; /* opening quote */
  /* First pass: find the closing quote to size the buffer (escaped form >= decoded form). */
  size_t j = p->i;
  while (j < p->n && p->s[j] != '"') {
    if (p->s[j] == '\\') j++;
    j++;
  }
  if (j >= p->n) return qs__jfail(p, start, "unterminated string");
  char *buf = malloc(j - p->i + 1);
  if (!buf) return qs__jnomem(p);
  size_t o = 0;
  while (p->s[p->i] != '"') {
    unsigned char c = p->s[p->i];
    if (c < 0x20) {
      free(buf);
      return qs__jfail(p, p->i, "control character 0x%02x in string", c);
    }
    if (c == '\\') {
      size_t esc = p->i;
      unsigned char e = p->s[p->i + 1];
      p->i += 2;
      switch (e) {
      case '"': buf[o++] = '"'; break;
      case '\\': buf[o++] = '\\'; break;
      case '/': buf[o++] = '/'; break;
      case 'b': buf[o++] = '\b'; break;
      case 'f': buf[o++] = '\f'; break;
      case 'n': buf[o++] = '\n'; break;
      case 'r': buf[o++] = '\r'; break;
      case 't': buf[o++] = '\t'; break;
      case 'u': {
        unsigned cp;
        if (p->i + 4 > j || qs__hex4(p->s + p->i, &cp)) {
          free(buf);
          return qs__jfail(p, esc, "bad \\u escape (need 4 hex digits)");
        }
        p->i += 4;
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
          free(buf);
          return qs__jfail(p, esc, "lone low surrogate \\u%04X", cp);
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          unsigned lo;
          if (p->i + 6 > j || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u' ||
              qs__hex4(p->s + p->i + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
            free(buf);
            return qs__jfail(p, esc, "high surrogate \\u%04X not followed by a low surrogate", cp);
          }
          p->i += 6;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        o += qs__utf8_put(buf + o, cp);
        break;
      }
      default:
        free(buf);
        return qs__jfail(p, esc, "bad escape '\\%c'", e >= 0x20 && e < 0x7F ? e : '?');
      }
      continue;
    }
    if (c < 0x80) {
      buf[o++] = (char)c;
      p->i++;
      continue;
    }
    size_t k = qs__utf8_len(p->s + p->i, j - p->i);
    if (!k) {
      free(buf);
      return qs__jfail(p, p->i, "invalid UTF-8 in string");
    }
    memcpy(buf + o, p->s + p->i, k);
    o += k;
    p->i += k;
  }
  p->i++; /* closing quote */
  buf[o] = 0;
  *out = buf;
  *out_len = o;
  return 0;
}

static int qs__jnumber(qs__jp *p, qs_json *v) {
  size_t start = p->i, i = p->i;
  const unsigned char *s = p->s;
  int neg = 0, integral = 1;
  if (i < p->n && s[i] == '-') { neg = 1; i++; }
  if (i >= p->n || s[i] < '0' || s[i] > '9') return qs__jfail(p, start, "bad number");
  size_t int_start = i;
  if (s[i] == '0') {
    i++;
    if (i < p->n && s[i] >= '0' && s[i] <= '9')
      return qs__jfail(p, start, "number with a leading zero");
  } else {
    while (i < p->n && s[i] >= '0' && s[i] <= '9') i++;
  }
  size_t int_end = i;
  if (i < p->n && s[i] == '.') {
    integral = 0;
    i++;
    if (i >= p->n || s[i] < '0' || s[i] > '9')
      return qs__jfail(p, start, "number: digit expected after '.'");
    while (i < p->n && s[i] >= '0' && s[i] <= '9') i++;
  }
  if (i < p->n && (s[i] == 'e' || s[i] == 'E')) {
    integral = 0;
    i++;
    if (i < p->n && (s[i] == '+' || s[i] == '-')) i++;
    if (i >= p->n || s[i] < '0' || s[i] > '9')
      return qs__jfail(p, start, "number: digit expected in exponent");
    while (i < p->n && s[i] >= '0' && s[i] <= '9') i++;
  }
  v->type = QS_JSON_NUMBER;
  /* strtod needs a NUL-terminated copy; numbers are short unless hostile, so bound the copy. */
  size_t tl = i - start;
  char small[64], *tmp = small;
  if (tl >= sizeof small) {
    tmp = malloc(tl + 1);
    if (!tmp) return qs__jnomem(p);
  }
  memcpy(tmp, s + start, tl);
  tmp[tl] = 0;
  errno = 0;
  v->num = strtod(tmp, NULL);
  if (tmp != small) free(tmp);
  if (integral) {
    v->num_flags = QS_JSON_INTEGRAL;
    uint64_t u = 0;
    int ovf = 0;
    for (size_t k = int_start; k < int_end; k++) {
      unsigned d = s[k] - '0';
      if (u > (UINT64_MAX - d) / 10) { ovf = 1; break; }
      u = u * 10 + d;
    }
    if (!ovf) {
      if (!neg) {
        v->u64 = u;
        v->num_flags |= QS_JSON_IS_U64;
        if (u <= (uint64_t)INT64_MAX) { v->i64 = (int64_t)u; v->num_flags |= QS_JSON_IS_I64; }
      } else if (u <= (uint64_t)INT64_MAX + 1) {
        v->i64 = u == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)u;
        v->num_flags |= QS_JSON_IS_I64;
        if (u == 0) { v->u64 = 0; v->num_flags |= QS_JSON_IS_U64; }
      }
    }
  }
  p->i = i;
  return 0;
}

static int qs__jlit(qs__jp *p, const char *lit) {
  size_t l = strlen(lit);
  if (p->n - p->i < l || memcmp(p->s + p->i, lit, l))
    return qs__jfail(p, p->i, "unexpected character");
  p->i += l;
  return 0;
}

static int qs__key_cmp(const void *a, const void *b, void *base) {
  const qs_json *items = base;
  const qs_json *x = &items[*(const size_t *)a], *y = &items[*(const size_t *)b];
  size_t m = x->key_len < y->key_len ? x->key_len : y->key_len;
  int c = memcmp(x->key, y->key, m);
  if (c) return c;
  if (x->key_len != y->key_len) return x->key_len < y->key_len ? -1 : 1;
  return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int qs__jvalue(qs__jp *p, qs_json *v, int depth);

static int qs__jpush(qs__jp *p, qs_json *c, size_t *cap) {
  qs_json *ni = qp_grow(c->items, cap, c->len, sizeof *ni, 4);
  if (!ni) return qs__jnomem(p);
  c->items = ni;
  memset(&c->items[c->len], 0, sizeof c->items[0]);
  c->len++;
  return 0;
}

static int qs__jarray(qs__jp *p, qs_json *v, int depth) {
  v->type = QS_JSON_ARRAY;
  size_t cap = 0;
  p->i++;
  qs__jws(p);
  if (p->i < p->n && p->s[p->i] == ']') { p->i++; return 0; }
  for (;;) {
    if (qs__jpush(p, v, &cap)) return p->rc;
    if (qs__jvalue(p, &v->items[v->len - 1], depth + 1)) return p->rc;
    qs__jws(p);
    if (p->i >= p->n) return qs__jfail(p, p->i, "unterminated array");
    if (p->s[p->i] == ',') { p->i++; continue; }
    if (p->s[p->i] == ']') { p->i++; return 0; }
    return qs__jfail(p, p->i, "expected ',' or ']' in array");
  }
}

static int qs__jobject(qs__jp *p, qs_json *v, int depth) {
  v->type = QS_JSON_OBJECT;
  size_t cap = 0;
  p->i++;
  qs__jws(p);
  if (p->i < p->n && p->s[p->i] == '}') { p->i++; return 0; }
  for (;;) {
    qs__jws(p);
    if (p->i >= p->n || p->s[p->i] != '"') return qs__jfail(p, p->i, "expected a string key");
    size_t koff = p->i;
    char *key;
    size_t klen;
    if (qs__jstring(p, &key, &klen)) return p->rc;
    if (qs__jpush(p, v, &cap)) { free(key); return p->rc; }
    qs_json *m = &v->items[v->len - 1];
    m->key = key;
    m->key_len = klen;
    qs__jws(p);
    if (p->i >= p->n || p->s[p->i] != ':') return qs__jfail(p, p->i, "expected ':' after key");
    p->i++;
    if (qs__jvalue(p, m, depth + 1)) return p->rc;
    m->offset = koff; /* members are located by their key */
    qs__jws(p);
    if (p->i >= p->n) return qs__jfail(p, p->i, "unterminated object");
    if (p->s[p->i] == ',') { p->i++; continue; }
    if (p->s[p->i] == '}') { p->i++; break; }
    return qs__jfail(p, p->i, "expected ',' or '}' in object");
  }
  v->sorted = malloc(v->len * sizeof *v->sorted);
  if (!v->sorted) return qs__jnomem(p);
  for (size_t k = 0; k < v->len; k++) v->sorted[k] = k;
  qsort_r(v->sorted, v->len, sizeof *v->sorted, qs__key_cmp, v->items);
  for (size_t k = 1; k < v->len; k++) {
    const qs_json *a = &v->items[v->sorted[k - 1]], *b = &v->items[v->sorted[k]];
    if (a->key_len == b->key_len && !memcmp(a->key, b->key, a->key_len))
      return qs__jfail(p, b->offset, "duplicate key \"%.*s\"", (int)(b->key_len > 80 ? 80 : b->key_len),
                       b->key);
  }
  return 0;
}

static int qs__jvalue(qs__jp *p, qs_json *v, int depth) {
  if (depth > QS_JSON_MAX_DEPTH)
    return qs__jfail(p, p->i, "nesting deeper than %d", QS_JSON_MAX_DEPTH);
  qs__jws(p);
  if (p->i >= p->n) return qs__jfail(p, p->i, "unexpected end of input");
  v->offset = p->i;
  switch (p->s[p->i]) {
  case '{': return qs__jobject(p, v, depth);
  case '[': return qs__jarray(p, v, depth);
  case '"':
    v->type = QS_JSON_STRING;
    return qs__jstring(p, &v->str, &v->len);
  case 't': v->type = QS_JSON_BOOL; v->boolean = 1; return qs__jlit(p, "true");
  case 'f': v->type = QS_JSON_BOOL; v->boolean = 0; return qs__jlit(p, "false");
  case 'n': v->type = QS_JSON_NULL; return qs__jlit(p, "null");
  default:
    if (p->s[p->i] == '-' || (p->s[p->i] >= '0' && p->s[p->i] <= '9')) return qs__jnumber(p, v);
    if (p->s[p->i] < 0x20 || p->s[p->i] >= 0x7F)
      return qs__jfail(p, p->i, "unexpected byte 0x%02x", p->s[p->i]);
    return qs__jfail(p, p->i, "unexpected character '%c'", p->s[p->i]);
  }
}

int qs_json_parse(const char *text, size_t len, qs_json **out, char *err, size_t errlen) {
  *out = NULL;
  if (err && errlen) err[0] = 0;
  qs__jp p = {(const unsigned char *)text, len, 0, err, errlen, 0};
  qs_json *root = calloc(1, sizeof *root);
  if (!root) return qs__jnomem(&p);
  if (!qs__jvalue(&p, root, 1)) {
    qs__jws(&p);
    if (p.i != p.n) qs__jfail(&p, p.i, "trailing characters after the JSON value");
  }
  if (p.rc) {
    qs_json_free(root);
    return p.rc;
  }
  *out = root;
  return 0;
}

const qs_json *qs_json_get(const qs_json *obj, const char *key) {
  if (!obj || obj->type != QS_JSON_OBJECT || !obj->sorted) return NULL;
  size_t kl = strlen(key), lo = 0, hi = obj->len;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const qs_json *m = &obj->items[obj->sorted[mid]];
    size_t ml = m->key_len < kl ? m->key_len : kl;
    int c = memcmp(m->key, key, ml);
    if (!c && m->key_len != kl) c = m->key_len < kl ? -1 : 1;
    if (!c) return m;
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  return NULL;
}

const qs_json *qs_json_at(const qs_json *v, size_t i) {
  if (!v || (v->type != QS_JSON_ARRAY && v->type != QS_JSON_OBJECT) || i >= v->len) return NULL;
  return &v->items[i];
}

const char *qs_json_type_name(qs_json_type t) {
  static const char *const names[] = {"null", "bool", "number", "string", "array", "object"};
  return (unsigned)t < 6 ? names[t] : "?";
}
