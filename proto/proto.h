/* SPDX-License-Identifier: MIT */
/*
 * proto.h — msgpack-RPC framing for qins (qp_): a bounded scanner that finds message boundaries in a
 * byte stream before msgpack-c sees a byte, a bounded cursor reader for parsing without allocation,
 * and packers for requests and responses. Wire contract: docs/PROTOCOL.md §1-§3.
 *
 * Why a scanner. msgpack-c allocates for declared counts up front (msgpack-c#1013): a 5-byte
 * `dd ff ff ff ff` array header makes the unpacker ask for ~96 GB. qp_scan walks the bytes itself
 * and only reports a message complete once every byte of it is buffered; on the way it checks each
 * declared str/bin/ext length and array/map count against the message size limit (an array of n
 * elements needs at least n more bytes, a map of n pairs 2n) and the nesting depth. A complete
 * message is then at most `max_bytes` long, so handing exactly those bytes to msgpack_unpack bounds
 * what it can allocate by a small multiple of max_bytes. Nothing here allocates.
 *
 * Typical server loop (daemon/conn.c):
 *     qp_scan sc; qp_scan_init(&sc, max_request_bytes, QP_MAX_DEPTH);
 *     on read: for (;;) { size_t n; int r = qp_scan_next(&sc, buf + pos, len - pos, &n);
 *                if (r == QP_MORE) break;            // keep buf[pos..len), read more
 *                if (r < 0) { reply error r with sc.what; close; }
 *                handle(buf + pos, n); pos += n; qp_scan_reset(&sc); }
 * The scanner is resumable: between calls the buffer may grow or move (realloc, memmove) as long
 * as the bytes of the current message keep their offsets relative to the pointer passed in.
 *
 * Client use: responses carrying a large `data` bin (always the last key, PROTOCOL.md §1) can be
 * scanned with `bin_stop` set: the scanner then stops *at* a bin header of at least that many bytes
 * (QP_BIN), so the client parses the small prefix with qp_rd_* and reads the payload straight into
 * its own buffer. Set max_bytes to what you accept (max_response_bytes + 64 KiB, say).
 *
 * Invariants: no function here allocates or reads outside [buf, buf + len); lengths are 64-bit.
 */
#ifndef QINS_PROTO_H
#define QINS_PROTO_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "qins_base.h"

#define QP_PROTOCOL_VERSION 1 /* hello's `protocol`; bumped only for incompatible changes */
#define QP_MAX_DEPTH 8        /* nesting depth of containers in a request (PROTOCOL.md §2) */
#define QP_MAX_HEADER 9       /* longest msgpack header: 0xcf + 8 bytes */

/* msgpack-RPC message type tags (first element of the envelope array). */
enum { QP_REQUEST = 0, QP_RESPONSE = 1, QP_NOTIFY = 2 };

/* Return values of qp_scan_next besides negative error codes. */
enum {
  QP_MORE = 0,     /* the message is not complete: buffer more bytes and call again */
  QP_COMPLETE = 1, /* *size is the byte length of one complete message at buf */
  QP_BIN = 2       /* (bin_stop only) *size is the offset just past a bin header; bin_len is its
                      length. The message continues with bin_len payload bytes. */
};

/* Scanner state. Fields are private except `what` (after an error) and `bin_len` (after QP_BIN). */
typedef struct qp_scan {
  uint64_t max_bytes;          /* a message longer than this is QINS_ETOO_LARGE */
  uint64_t bin_stop;           /* 0: never stop at bins; else stop at bins >= this many bytes */
  int max_depth;               /* containers nested deeper than this are QINS_EPROTO */
  int depth;                   /* open containers */
  uint64_t off;                /* bytes of the current message already walked */
  uint64_t skip;               /* body bytes still to walk past (str/bin/ext) */
  uint64_t left[QP_MAX_DEPTH + 1]; /* items still expected at each open depth (left[0]: top) */
  uint64_t bin_len;            /* after QP_BIN: the bin's declared length */
  char what[96];               /* after an error: what was wrong, e.g. "bin length 4294967295 at
                                  offset 5 exceeds limit 1048576" */
} qp_scan;

/* Sets up a scanner for messages of at most max_bytes bytes and max_depth (<= QP_MAX_DEPTH)
 * nested containers. bin_stop is 0. */
void qp_scan_init(qp_scan *s, uint64_t max_bytes, int max_depth);
/* Forgets the current message (call after consuming a complete one, or after QP_BIN once the
 * payload has been read past: then the next call must start at the next message). */
void qp_scan_reset(qp_scan *s);
/* Walks the message starting at buf, of which len bytes are buffered. Returns QP_MORE,
 * QP_COMPLETE (*size = message length), QP_BIN (see above), or a negative code:
 * QINS_ETOO_LARGE (a declared length or count cannot fit in max_bytes, or the message is longer)
 * or QINS_EPROTO (0xc1, nesting too deep); s->what says which field. After an error the stream
 * cannot be resynchronised: reply and close. */
int qp_scan_next(qp_scan *s, const void *buf, size_t len, size_t *size /* out */);
/* After QP_BIN the payload is pending in the scanner: calling qp_scan_next again with the payload
 * buffered at its place simply continues. A client that read the payload elsewhere calls
 * qp_scan_bin_done instead, and from then on passes buf such that the byte following the payload
 * is at buf + qp_scan_offset(s). */
void qp_scan_bin_done(qp_scan *s);
static inline uint64_t qp_scan_offset(const qp_scan *s) { return s->off; }

/* --- Bounded cursor reader -------------------------------------------------------------------
 * Parses msgpack in place with no allocation. Each qp_rd_* returns 0 or QINS_EPROTO (wrong type or
 * truncated: the cursor then does not move). Pointers returned point into the buffer. */
typedef struct qp_rd {
  const uint8_t *p;   /* next byte */
  const uint8_t *end; /* one past the last buffered byte */
} qp_rd;

static inline void qp_rd_init(qp_rd *r, const void *buf, size_t len) {
  r->p = (const uint8_t *)buf;
  r->end = r->p + len;
}
static inline int qp_rd_array(qp_rd *r, uint32_t *n /* out */);
static inline int qp_rd_map(qp_rd *r, uint32_t *n /* out */);
int qp_rd_nil(qp_rd *r);         /* consumes a nil; QINS_EPROTO if the next value is not nil */
int qp_rd_is_nil(const qp_rd *r); /* 1 if the next value is nil (does not consume) */
static inline int qp_rd_uint(qp_rd *r, uint64_t *v /* out */); /* non-negative ints, any width */
int qp_rd_int(qp_rd *r, int64_t *v /* out */);    /* any int that fits in int64 */
int qp_rd_bool(qp_rd *r, int *v /* out */);
int qp_rd_double(qp_rd *r, double *v /* out */);  /* float32, float64 or any int */
/* str: *s points into the buffer (not NUL-terminated). */
static inline int qp_rd_str(qp_rd *r, const char **s /* out */, uint32_t *len /* out */);
/* bin header only: the cursor moves past the header, not the body (*len bytes may not be
 * buffered yet; use qp_rd_bin to take a fully buffered one). */
int qp_rd_bin_header(qp_rd *r, uint32_t *len /* out */);
int qp_rd_bin(qp_rd *r, const void **p /* out */, uint32_t *len /* out */);
/* Skips one whole value (containers included, depth-bounded by QP_MAX_DEPTH * 4). */
static inline int qp_rd_skip(qp_rd *r);

/* The five above read the one-byte forms a request is made of (fixarray, fixmap, positive
 * fixint, fixstr, and for a skip also nil and negative fixint) inline, every other form in
 * proto.c (qp__rd_*, which also take the one-byte forms): a small request is read without a
 * call per value. */
int qp__rd_array(qp_rd *r, uint32_t *n);
int qp__rd_map(qp_rd *r, uint32_t *n);
int qp__rd_uint(qp_rd *r, uint64_t *v);
int qp__rd_str(qp_rd *r, const char **s, uint32_t *len);
int qp__rd_skip(qp_rd *r);
static inline int qp_rd_array(qp_rd *r, uint32_t *n) {
  if (r->p < r->end && (*r->p & 0xf0) == 0x90) {
    *n = *r->p++ & 0x0f;
    return 0;
  }
  return qp__rd_array(r, n);
}
static inline int qp_rd_map(qp_rd *r, uint32_t *n) {
  if (r->p < r->end && (*r->p & 0xf0) == 0x80) {
    *n = *r->p++ & 0x0f;
    return 0;
  }
  return qp__rd_map(r, n);
}
static inline int qp_rd_uint(qp_rd *r, uint64_t *v) {
  if (r->p < r->end && *r->p <= 0x7f) {
    *v = *r->p++;
    return 0;
  }
  return qp__rd_uint(r, v);
}
static inline int qp_rd_str(qp_rd *r, const char **s, uint32_t *len) {
  if (r->p < r->end && (*r->p & 0xe0) == 0xa0 && (size_t)(r->end - r->p) - 1 >= (*r->p & 0x1fu)) {
    *len = *r->p & 0x1f;
    *s = (const char *)r->p + 1;
    r->p += 1 + *len;
    return 0;
  }
  return qp__rd_str(r, s, len);
}
static inline int qp_rd_skip(qp_rd *r) {
  if (r->p < r->end) {
    const uint8_t b = *r->p;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0) {
      r->p++;
      return 0;
    }
    if ((b & 0xe0) == 0xa0 && (size_t)(r->end - r->p) - 1 >= (b & 0x1fu)) {
      r->p += 1 + (b & 0x1f);
      return 0;
    }
  }
  return qp__rd_skip(r);
}

/* --- Packing (msgpack-c packer; any write callback) ----------------------------------------- */
/* [0, msgid, method, ...: the caller then packs params (an array). */
int qp_pack_request(msgpack_packer *pk, uint32_t msgid, const char *method);
/* [1, msgid, nil, ...: the caller then packs the result. */
int qp_pack_response_ok(msgpack_packer *pk, uint32_t msgid);
/* A whole error response [1, msgid, [code, message], nil]; message printf-formatted. */
int qp_pack_response_err(msgpack_packer *pk, uint32_t msgid, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int qp_pack_response_verr(msgpack_packer *pk, uint32_t msgid, int code, const char *fmt,
                          va_list ap) __attribute__((format(printf, 4, 0)));
int qp_pack_cstr(msgpack_packer *pk, const char *s); /* a NUL-terminated str */

/* Writes a msgpack bin header for len payload bytes into out; returns its size (2, 3 or 5).
 * Send header and payload as two iovecs: the payload is never copied into a packer buffer. */
size_t qp_bin_header(uint8_t out[5], uint32_t len);

/* --- msgpack-c object helpers ----------------------------------------------------------------- */
/* 1 if o is a str equal to the NUL-terminated s. */
int qp_obj_str_eq(const msgpack_object *o, const char *s);
/* The value of str key `key` in map o, or NULL (o not a map, or key absent). */
const msgpack_object *qp_map_get(const msgpack_object *o, const char *key);
/* Copies a str object into dst (cap bytes incl. NUL): 0, or QINS_EBAD_PARAMS if o is not a str
 * or does not fit or contains a NUL byte. */
int qp_obj_cstr(const msgpack_object *o, char *dst, size_t cap);
/* A non-negative integer object: 0 or QINS_EBAD_PARAMS. */
int qp_obj_uint(const msgpack_object *o, uint64_t *v /* out */);

#endif /* QINS_PROTO_H */
