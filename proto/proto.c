/* SPDX-License-Identifier: MIT */
/*
 * proto.c — the bounded msgpack scanner, cursor reader and packers of proto.h.
 * Wire contract: docs/PROTOCOL.md §1-§2.
 *
 * One 256-entry table (qp__type) says, for every msgpack type byte, how long the header is and
 * where the value's body size or item count comes from. The scanner's loop runs on it directly;
 * the cursor reader decodes whole headers with qp__head (head_len + head_parse), whose lengths
 * come from the same table. Invariants of the scanner, kept on every step: s->off <= s->max_bytes;
 * a declared body never ends past max_bytes; a declared container count never exceeds the bytes
 * still allowed (each item takes at least one byte); depth <= max_depth.
 * The scanner and the readers' slow paths are __attribute__((hot)): they are on every request's
 * path, kept together with the daemon's (daemon/qinsd.h).
 */
#include "proto.h"

#include <stdio.h>
#include <string.h>

/* Kinds of msgpack values, as far as the cursor reader cares. */
enum { K_SCALAR, K_STR, K_BIN, K_EXT, K_ARRAY, K_MAP, K_BAD };

typedef struct qp__hd {
  int kind;       /* K_* */
  unsigned hlen;  /* header bytes (type byte included) */
  uint64_t body;  /* body bytes after the header (str/bin/ext) */
  uint64_t count; /* array items, or map pairs */
} qp__hd;

static uint64_t be(const uint8_t *p, unsigned n) {
  uint64_t v = 0;
  for (unsigned i = 0; i < n; i++) v = (v << 8) | p[i];
  return v;
}

/* Classes of type bytes (high nibble of a qp__type entry): where the body size or item count is. */
enum {
  C_SCALAR = 0x00, /* nil, bool, ints, floats: the header is the whole value */
  C_FIXMAP = 0x10, /* 0x80-0x8f: pairs in the low 4 bits of the type byte */
  C_FIXARR = 0x20, /* 0x90-0x9f: items in the low 4 bits */
  C_FIXSTR = 0x30, /* 0xa0-0xbf: length in the low 5 bits */
  C_STR = 0x40,    /* str8/16/32: big-endian length in the hlen - 1 bytes after the type byte */
  C_BIN = 0x50,    /* bin8/16/32: likewise */
  C_EXT = 0x60,    /* ext8/16/32: length in hlen - 2 bytes, then the ext type byte */
  C_FIXEXT = 0x70, /* fixext1-16 (0xd4-0xd8): 1 << (type byte - 0xd4) body bytes */
  C_ARRAY = 0x80,  /* array16/32: big-endian item count in hlen - 1 bytes */
  C_MAP = 0x90,    /* map16/32: big-endian pair count in hlen - 1 bytes */
  C_BAD = 0xa0     /* 0xc1, never used; hlen 0 */
};

/* Per type byte: class | header length (type byte included, low nibble). Rows of 16 type bytes. */
#define T16(e) e, e, e, e, e, e, e, e, e, e, e, e, e, e, e, e
static const uint8_t qp__type[256] = {
  T16(C_SCALAR | 1), T16(C_SCALAR | 1), T16(C_SCALAR | 1), T16(C_SCALAR | 1), /* 0x00-0x3f */
  T16(C_SCALAR | 1), T16(C_SCALAR | 1), T16(C_SCALAR | 1), T16(C_SCALAR | 1), /* 0x40-0x7f */
  T16(C_FIXMAP | 1),                                                          /* 0x80-0x8f */
  T16(C_FIXARR | 1),                                                          /* 0x90-0x9f */
  T16(C_FIXSTR | 1), T16(C_FIXSTR | 1),                                       /* 0xa0-0xbf */
  /* 0xc0 nil, c1 reserved, c2-c3 bool, c4-c6 bin8/16/32, c7-c9 ext8/16/32, ca-cb float32/64,
   * cc-cf uint8/16/32/64 */
  C_SCALAR | 1, C_BAD | 0, C_SCALAR | 1, C_SCALAR | 1, C_BIN | 2, C_BIN | 3, C_BIN | 5,
  C_EXT | 3, C_EXT | 4, C_EXT | 6, C_SCALAR | 5, C_SCALAR | 9, C_SCALAR | 2, C_SCALAR | 3,
  C_SCALAR | 5, C_SCALAR | 9,
  /* 0xd0-d3 int8/16/32/64, d4-d8 fixext1/2/4/8/16, d9-db str8/16/32, dc-dd array16/32,
   * de-df map16/32 */
  C_SCALAR | 2, C_SCALAR | 3, C_SCALAR | 5, C_SCALAR | 9, C_FIXEXT | 2, C_FIXEXT | 2,
  C_FIXEXT | 2, C_FIXEXT | 2, C_FIXEXT | 2, C_STR | 2, C_STR | 3, C_STR | 5, C_ARRAY | 3,
  C_ARRAY | 5, C_MAP | 3, C_MAP | 5,
  T16(C_SCALAR | 1), T16(C_SCALAR | 1), /* 0xe0-0xff: negative fixint */
};
#undef T16

/* Header size from the type byte alone (0 for 0xc1). */
static unsigned head_len(uint8_t b) { return qp__type[b] & 0x0f; }

/* Decodes the header at p (hlen bytes available, hlen = head_len(*p) > 0). */
__attribute__((hot))
static void head_parse(const uint8_t *p, qp__hd *h) {
  uint8_t b = p[0];
  h->hlen = head_len(b);
  h->kind = K_SCALAR;
  h->body = 0;
  h->count = 0;
  if (b <= 0x7f || b >= 0xe0) return;
  if (b <= 0x8f) { h->kind = K_MAP; h->count = b & 0x0f; return; }
  if (b <= 0x9f) { h->kind = K_ARRAY; h->count = b & 0x0f; return; }
  if (b <= 0xbf) { h->kind = K_STR; h->body = b & 0x1f; return; }
  switch (b) {
  case 0xc4: case 0xc5: case 0xc6: h->kind = K_BIN; h->body = be(p + 1, h->hlen - 1); return;
  case 0xd9: case 0xda: case 0xdb: h->kind = K_STR; h->body = be(p + 1, h->hlen - 1); return;
  case 0xc7: case 0xc8: case 0xc9: h->kind = K_EXT; h->body = be(p + 1, h->hlen - 2); return;
  case 0xd4: h->kind = K_EXT; h->body = 1; return;
  case 0xd5: h->kind = K_EXT; h->body = 2; return;
  case 0xd6: h->kind = K_EXT; h->body = 4; return;
  case 0xd7: h->kind = K_EXT; h->body = 8; return;
  case 0xd8: h->kind = K_EXT; h->body = 16; return;
  case 0xdc: case 0xdd: h->kind = K_ARRAY; h->count = be(p + 1, h->hlen - 1); return;
  case 0xde: case 0xdf: h->kind = K_MAP; h->count = be(p + 1, h->hlen - 1); return;
  case 0xc1: h->kind = K_BAD; return;
  default: return; /* nil, bool, numbers */
  }
}

/* ---- scanner ---------------------------------------------------------------------------------- */

void qp_scan_init(qp_scan *s, uint64_t max_bytes, int max_depth) {
  memset(s, 0, sizeof *s);
  s->max_bytes = max_bytes;
  s->max_depth = max_depth < 1 ? 1 : max_depth > QP_MAX_DEPTH ? QP_MAX_DEPTH : max_depth;
  qp_scan_reset(s);
}

void qp_scan_reset(qp_scan *s) {
  s->depth = 0;
  s->off = 0;
  s->skip = 0;
  s->bin_len = 0;
  s->left[0] = 1; /* one top-level value */
  s->what[0] = '\0';
}

void qp_scan_bin_done(qp_scan *s) {
  s->off += s->skip;
  s->skip = 0;
}

/* A 1, 2 or 4-byte big-endian length or count. */
static inline uint64_t be_field(const uint8_t *p, unsigned n) {
  if (n == 1) return p[0];
  if (n == 2) return (uint64_t)p[0] << 8 | p[1];
  return (uint64_t)p[0] << 24 | (uint64_t)p[1] << 16 | (uint64_t)p[2] << 8 | p[3];
}

/* What a str/bin/ext/array/map type byte declares, for error messages. */
static const char *type_name(uint8_t b) {
  switch (qp__type[b] & 0xf0) {
  case C_FIXSTR: case C_STR: return "str";
  case C_BIN: return "bin";
  case C_EXT: case C_FIXEXT: return "ext";
  case C_FIXARR: case C_ARRAY: return "array";
  case C_FIXMAP: case C_MAP: return "map";
  default: return "value";
  }
}

/* The scanner's errors, kept out of its loop: each fills s->what and returns the code. `b` is the
 * type byte at offset `at`. */
static __attribute__((noinline, cold)) int scan_err_reserved(qp_scan *s, uint64_t at) {
  snprintf(s->what, sizeof s->what, "reserved byte 0xc1 at offset %llu", (unsigned long long)at);
  return QINS_EPROTO;
}

static __attribute__((noinline, cold)) int scan_err_long(qp_scan *s) {
  snprintf(s->what, sizeof s->what, "message longer than the limit of %llu bytes",
           (unsigned long long)s->max_bytes);
  return QINS_ETOO_LARGE;
}

static __attribute__((noinline, cold)) int scan_err_body(qp_scan *s, uint8_t b, uint64_t body,
                                                         uint64_t at) {
  snprintf(s->what, sizeof s->what, "%s length %llu at offset %llu exceeds the limit of %llu",
           type_name(b), (unsigned long long)body, (unsigned long long)at,
           (unsigned long long)s->max_bytes);
  return QINS_ETOO_LARGE;
}

/* items: what the scanner counts (2 per map pair); the message gives the declared count. */
static __attribute__((noinline, cold)) int scan_err_count(qp_scan *s, uint8_t b, uint64_t items,
                                                          uint64_t at) {
  int map = (qp__type[b] & 0xf0) == C_FIXMAP || (qp__type[b] & 0xf0) == C_MAP;
  snprintf(s->what, sizeof s->what, "%s of %llu items at offset %llu exceeds the limit of %llu bytes",
           type_name(b), (unsigned long long)(map ? items / 2 : items), (unsigned long long)at,
           (unsigned long long)s->max_bytes);
  return QINS_ETOO_LARGE;
}

static __attribute__((noinline, cold)) int scan_err_depth(qp_scan *s, uint64_t at) {
  snprintf(s->what, sizeof s->what, "nesting deeper than %d at offset %llu", s->max_depth,
           (unsigned long long)at);
  return QINS_EPROTO;
}

/* One value header per iteration. The walk position, the depth and the item count left at the
 * current depth live in locals and are written back to *s on every return (the counts of the
 * enclosing containers stay in s->left). The one-byte forms requests are made of take a short path
 * of their own; the others are decoded from qp__type. The checks and their order are the same for
 * every value: no byte buffered -> QP_MORE; 0xc1 -> QINS_EPROTO; header ending past max_bytes ->
 * QINS_ETOO_LARGE; header not all buffered -> QP_MORE; then the body length or item count against
 * the bytes still allowed (QINS_ETOO_LARGE), then the depth (QINS_EPROTO). */
__attribute__((hot))
int qp_scan_next(qp_scan *s, const void *buf, size_t len, size_t *size) {
  const uint8_t *p = buf;
  const uint64_t max = s->max_bytes;
  /* A str/bin/ext body left over from the last call (QP_MORE inside it, or QP_BIN). */
  if (s->skip) {
    uint64_t avail = len > s->off ? len - s->off : 0;
    uint64_t take = avail < s->skip ? avail : s->skip;
    s->off += take;
    s->skip -= take;
    if (s->skip) return QP_MORE;
  }
  uint64_t off = s->off;
  int depth = s->depth;
  uint64_t left = s->left[depth]; /* items still expected at this depth */
  /* Bytes below `end` are buffered and within the limit: a header or body that ends by then needs
   * no other check. */
  const uint64_t end = len < max ? len : max;
  int r;
  for (;;) {
    while (left == 0) { /* the current container (or the message) is complete */
      if (depth == 0) {
        *size = (size_t)off;
        r = QP_COMPLETE;
        goto out;
      }
      s->left[depth] = 0;
      left = s->left[--depth];
    }
    if (off >= end) { /* nothing buffered, or at the limit with bytes still to come */
      if (off >= len) r = QP_MORE;
      else if (p[off] == 0xc1) r = scan_err_reserved(s, off);
      else r = scan_err_long(s);
      goto out;
    }
    const uint8_t b = p[off];
    const uint64_t at = off; /* the header's offset, for error messages */
    uint64_t n; /* body bytes (str/bin/ext), or items (array: count, map: 2 * pairs) */
    /* Fast path: the one-byte forms (fixint, fixmap, fixarray, fixstr). Their header is buffered
     * and within the limit since off < end. */
    if (b <= 0x7f || b >= 0xe0) { /* positive or negative fixint */
      off++;
      left--;
      continue;
    }
    if (b <= 0xbf) {
      off++;
      left--;
      if (b >= 0xa0) { /* fixstr */
        n = b & 0x1f;
        goto body;
      }
      n = b <= 0x8f ? (uint64_t)(b & 0x0f) * 2 : b & 0x0f; /* fixmap (pairs), fixarray */
      goto container;
    }
    /* 0xc0-0xdf: nil, bool and the forms with a wider header, decoded from the table. */
    const unsigned t = qp__type[b];
    const unsigned hl = t & 0x0f;
    /* One unsigned comparison catches 0xc1 (hl - 1 wraps) and a header ending past `end`. */
    if ((uint64_t)hl - 1 >= end - off) {
      if (hl == 0) r = scan_err_reserved(s, off);
      else if (off + hl > max) r = scan_err_long(s);
      else r = QP_MORE;
      goto out;
    }
    off += hl;
    left--;
    switch (t & 0xf0) {
    case C_SCALAR: continue; /* the header is the whole value */
    case C_STR: n = be_field(p + at + 1, hl - 1); goto body;
    case C_EXT: n = be_field(p + at + 1, hl - 2); goto body;
    case C_FIXEXT: n = (uint64_t)1 << (b - 0xd4); goto body;
    case C_ARRAY: n = be_field(p + at + 1, hl - 1); goto container;
    case C_MAP: n = be_field(p + at + 1, hl - 1) * 2; goto container;
    default: /* C_BIN */
      n = be_field(p + at + 1, hl - 1);
      if (s->bin_stop && n >= s->bin_stop && n <= max - off) { /* (too long: an error below) */
        s->skip = n; /* the payload is still to walk past (or qp_scan_bin_done) */
        s->bin_len = n;
        *size = (size_t)off;
        r = QP_BIN;
        goto out;
      }
      goto body;
    }
  body: /* a str/bin/ext of n bytes after the header (off <= end here) */
    if (n <= end - off) { /* buffered and within the limit: step over it */
      off += n;
      continue;
    }
    if (n > max - off) {
      r = scan_err_body(s, b, n, at);
      goto out;
    }
    s->skip = n - (len - off); /* walk what is buffered; the rest on a later call */
    off = len;
    r = QP_MORE;
    goto out;
  container: /* an array or map of n items */
    if (n > max - off) {
      r = scan_err_count(s, b, n, at);
      goto out;
    }
    if (depth + 1 > s->max_depth) {
      r = scan_err_depth(s, at);
      goto out;
    }
    s->left[depth++] = left;
    left = n;
  }
out:
  s->off = off;
  s->depth = depth;
  s->left[depth] = left;
  return r;
}

/* ---- cursor reader ---------------------------------------------------------------------------- */

/* Reads a header; fails (cursor unmoved) if it is truncated or reserved. */
static int rd_head(const qp_rd *r, qp__hd *h) {
  if (r->p >= r->end) return QINS_EPROTO;
  unsigned hl = head_len(*r->p);
  if (hl == 0 || (size_t)(r->end - r->p) < hl) return QINS_EPROTO;
  head_parse(r->p, h);
  return 0;
}

/* Fast paths below: the fix* forms (one type byte) are what requests are made of; they are
 * decided from the type byte alone and agree with the general path. */
/* An array or map header (kind), whose fix form is the type byte fix | count (count < 16). */
static inline int rd_container(qp_rd *r, uint8_t fix, int kind, uint32_t *n) {
  if (r->p < r->end && (*r->p & 0xf0) == fix) {
    *n = *r->p++ & 0x0f;
    return 0;
  }
  qp__hd h;
  if (rd_head(r, &h) || h.kind != kind) return QINS_EPROTO;
  r->p += h.hlen;
  *n = (uint32_t)h.count;
  return 0;
}

int qp__rd_array(qp_rd *r, uint32_t *n) { return rd_container(r, 0x90, K_ARRAY, n); }
int qp__rd_map(qp_rd *r, uint32_t *n) { return rd_container(r, 0x80, K_MAP, n); }

int qp_rd_is_nil(const qp_rd *r) { return r->p < r->end && *r->p == 0xc0; }

int qp_rd_nil(qp_rd *r) {
  if (!qp_rd_is_nil(r)) return QINS_EPROTO;
  r->p++;
  return 0;
}

int qp_rd_bool(qp_rd *r, int *v) {
  if (r->p >= r->end || (*r->p != 0xc2 && *r->p != 0xc3)) return QINS_EPROTO;
  *v = *r->p == 0xc3;
  r->p++;
  return 0;
}

int qp_rd_int(qp_rd *r, int64_t *v) {
  qp__hd h;
  if (rd_head(r, &h) || h.kind != K_SCALAR) return QINS_EPROTO;
  uint8_t b = *r->p;
  const uint8_t *q = r->p + 1;
  int64_t x;
  if (b <= 0x7f) x = b;
  else if (b >= 0xe0) x = (int8_t)b;
  else switch (b) {
    case 0xcc: x = q[0]; break;
    case 0xcd: x = (int64_t)be(q, 2); break;
    case 0xce: x = (int64_t)be(q, 4); break;
    case 0xcf: {
      uint64_t u = be(q, 8);
      if (u > INT64_MAX) return QINS_EPROTO;
      x = (int64_t)u;
      break;
    }
    case 0xd0: x = (int8_t)q[0]; break;
    case 0xd1: x = (int16_t)be(q, 2); break;
    case 0xd2: x = (int32_t)be(q, 4); break;
    case 0xd3: x = (int64_t)be(q, 8); break;
    default: return QINS_EPROTO;
    }
  r->p += h.hlen;
  *v = x;
  return 0;
}

__attribute__((hot))
int qp__rd_uint(qp_rd *r, uint64_t *v) {
  if (r->p < r->end && *r->p <= 0x7f) {
    *v = *r->p++;
    return 0;
  }
  if (r->p < r->end && *r->p >= 0xcc && *r->p <= 0xce) { /* uint 8/16/32 */
    unsigned w = 1u << (*r->p - 0xcc);
    if ((size_t)(r->end - r->p) <= w) return QINS_EPROTO;
    *v = be(r->p + 1, w);
    r->p += 1 + w;
    return 0;
  }
  if (r->p < r->end && *r->p == 0xcf) {
    qp__hd h;
    if (rd_head(r, &h)) return QINS_EPROTO;
    *v = be(r->p + 1, 8);
    r->p += 9;
    return 0;
  }
  qp_rd save = *r;
  int64_t x;
  if (qp_rd_int(r, &x)) return QINS_EPROTO;
  if (x < 0) {
    *r = save;
    return QINS_EPROTO;
  }
  *v = (uint64_t)x;
  return 0;
}

int qp_rd_double(qp_rd *r, double *v) {
  if (r->p < r->end && (*r->p == 0xca || *r->p == 0xcb)) {
    qp__hd h;
    if (rd_head(r, &h)) return QINS_EPROTO;
    if (*r->p == 0xca) {
      uint32_t u = (uint32_t)be(r->p + 1, 4);
      float f;
      memcpy(&f, &u, 4);
      *v = f;
    } else {
      uint64_t u = be(r->p + 1, 8);
      memcpy(v, &u, 8);
    }
    r->p += h.hlen;
    return 0;
  }
  int64_t x;
  if (r->p < r->end && *r->p == 0xcf) {
    uint64_t u;
    if (qp_rd_uint(r, &u)) return QINS_EPROTO;
    *v = (double)u;
    return 0;
  }
  if (qp_rd_int(r, &x)) return QINS_EPROTO;
  *v = (double)x;
  return 0;
}

static int rd_body(qp_rd *r, int kind, const void **p, uint32_t *len) {
  qp__hd h;
  if (rd_head(r, &h) || h.kind != kind) return QINS_EPROTO;
  if ((uint64_t)(r->end - r->p) - h.hlen < h.body) return QINS_EPROTO;
  *p = r->p + h.hlen;
  *len = (uint32_t)h.body;
  r->p += h.hlen + h.body;
  return 0;
}

__attribute__((hot))
int qp__rd_str(qp_rd *r, const char **s, uint32_t *len) {
  if (r->p < r->end && (*r->p & 0xe0) == 0xa0) {
    uint32_t n = *r->p & 0x1f;
    if ((size_t)(r->end - r->p) - 1 < n) return QINS_EPROTO;
    *s = (const char *)r->p + 1;
    *len = n;
    r->p += 1 + n;
    return 0;
  }
  const void *p;
  int rc = rd_body(r, K_STR, &p, len);
  if (rc == 0) *s = p;
  return rc;
}

int qp_rd_bin(qp_rd *r, const void **p, uint32_t *len) { return rd_body(r, K_BIN, p, len); }

int qp_rd_bin_header(qp_rd *r, uint32_t *len) {
  qp__hd h;
  if (rd_head(r, &h) || h.kind != K_BIN) return QINS_EPROTO;
  r->p += h.hlen;
  *len = (uint32_t)h.body;
  return 0;
}

__attribute__((hot))
int qp__rd_skip(qp_rd *r) {
  const uint8_t *p = r->p;
  uint64_t pending = 1; /* values still to skip */
  while (pending) {
    if (p >= r->end) return QINS_EPROTO;
    uint8_t b = *p;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) { /* one-byte scalar */
      p++;
      pending--;
      continue;
    }
    if (b <= 0x9f) { /* fixmap, fixarray: each item takes at least a byte */
      uint64_t items = b <= 0x8f ? 2u * (b & 0x0f) : (b & 0x0fu);
      p++;
      pending--;
      if (items > (uint64_t)(r->end - p)) return QINS_EPROTO;
      pending += items;
      continue;
    }
    if (b <= 0xbf) { /* fixstr */
      uint64_t n = b & 0x1f;
      p++;
      pending--;
      if (n > (uint64_t)(r->end - p)) return QINS_EPROTO;
      p += n;
      continue;
    }
    unsigned hl = head_len(b);
    if (hl == 0 || (size_t)(r->end - p) < hl) return QINS_EPROTO;
    qp__hd h;
    head_parse(p, &h);
    p += hl;
    pending--;
    uint64_t rest = (uint64_t)(r->end - p);
    if (h.body > rest) return QINS_EPROTO;
    p += h.body;
    if (h.kind == K_ARRAY || h.kind == K_MAP) {
      uint64_t items = h.kind == K_MAP ? 2 * h.count : h.count;
      if (items > rest) return QINS_EPROTO; /* each item takes at least a byte */
      pending += items;
    }
  }
  r->p = p;
  return 0;
}

/* ---- packing ---------------------------------------------------------------------------------- */

int qp_pack_cstr(msgpack_packer *pk, const char *s) {
  size_t n = strlen(s);
  return msgpack_pack_str_with_body(pk, s, n);
}

int qp_pack_request(msgpack_packer *pk, uint32_t msgid, const char *method) {
  int rc = msgpack_pack_array(pk, 4);
  rc |= msgpack_pack_uint8(pk, QP_REQUEST);
  rc |= msgpack_pack_uint32(pk, msgid);
  rc |= qp_pack_cstr(pk, method);
  return rc ? QINS_ENOMEM : 0;
}

int qp_pack_response_ok(msgpack_packer *pk, uint32_t msgid) {
  int rc = msgpack_pack_array(pk, 4);
  rc |= msgpack_pack_uint8(pk, QP_RESPONSE);
  rc |= msgpack_pack_uint32(pk, msgid);
  rc |= msgpack_pack_nil(pk);
  return rc ? QINS_ENOMEM : 0;
}

int qp_pack_response_verr(msgpack_packer *pk, uint32_t msgid, int code, const char *fmt,
                          va_list ap) {
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  int rc = msgpack_pack_array(pk, 4);
  rc |= msgpack_pack_uint8(pk, QP_RESPONSE);
  rc |= msgpack_pack_uint32(pk, msgid);
  rc |= msgpack_pack_array(pk, 2);
  rc |= msgpack_pack_int32(pk, code);
  rc |= qp_pack_cstr(pk, msg);
  rc |= msgpack_pack_nil(pk);
  return rc ? QINS_ENOMEM : 0;
}

int qp_pack_response_err(msgpack_packer *pk, uint32_t msgid, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = qp_pack_response_verr(pk, msgid, code, fmt, ap);
  va_end(ap);
  return rc;
}

size_t qp_bin_header(uint8_t out[5], uint32_t len) {
  if (len <= 0xff) {
    out[0] = 0xc4;
    out[1] = (uint8_t)len;
    return 2;
  }
  if (len <= 0xffff) {
    out[0] = 0xc5;
    out[1] = (uint8_t)(len >> 8);
    out[2] = (uint8_t)len;
    return 3;
  }
  out[0] = 0xc6;
  out[1] = (uint8_t)(len >> 24);
  out[2] = (uint8_t)(len >> 16);
  out[3] = (uint8_t)(len >> 8);
  out[4] = (uint8_t)len;
  return 5;
}

/* ---- object helpers --------------------------------------------------------------------------- */

int qp_obj_str_eq(const msgpack_object *o, const char *s) {
  size_t n = strlen(s);
  return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, s, n) == 0;
}

const msgpack_object *qp_map_get(const msgpack_object *o, const char *key) {
  if (o->type != MSGPACK_OBJECT_MAP) return NULL;
  for (uint32_t i = 0; i < o->via.map.size; i++)
    if (qp_obj_str_eq(&o->via.map.ptr[i].key, key)) return &o->via.map.ptr[i].val;
  return NULL;
}

int qp_obj_cstr(const msgpack_object *o, char *dst, size_t cap) {
  if (o->type != MSGPACK_OBJECT_STR || o->via.str.size >= cap) return QINS_EBAD_PARAMS;
  if (memchr(o->via.str.ptr, 0, o->via.str.size)) return QINS_EBAD_PARAMS;
  memcpy(dst, o->via.str.ptr, o->via.str.size);
  dst[o->via.str.size] = '\0';
  return 0;
}

int qp_obj_uint(const msgpack_object *o, uint64_t *v) {
  if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return QINS_EBAD_PARAMS;
  *v = o->via.u64;
  return 0;
}
