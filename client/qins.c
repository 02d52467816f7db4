/* SPDX-License-Identifier: MIT */
/*
 * qins.c — libqins: the blocking client workers use to fetch decoded weights from qinsd
 * (client/qins.h is its manual; wire contract docs/PROTOCOL.md; overview docs/client.md §1).
 *
 * Design. One connection per qins_client, one request in flight at a time: each call packs its
 * request with msgpack-c (proto's qp_pack_request), sends it, and reads the response with proto's
 * bounded scanner (qp_scan) and cursor reader (qp_rd). The scanner runs with bin_stop = 1: it
 * stops at every non-empty bin header, so everything before a payload (envelope, shape, dtype —
 * `data` is the last key of a tensor map, PROTOCOL.md §1) is buffered and parsed in place, and the
 * payload itself is copied from what is already buffered and then recv()'d straight into the
 * caller's buffer: no intermediate copy of the bulk.
 *
 * Receive buffer. rbuf[rpos, rlen) holds unread bytes. While a response is being read, its bytes
 * stay in rbuf from mstart, except payloads, which are removed from rbuf once delivered; `vgone`
 * counts those removed bytes, so the scanner (which addresses the message by its offset from the
 * message start) is handed a base of rbuf + mstart - vgone. The scanner reads only at offsets past
 * the removed payloads, so it never touches the bytes that base would denote before rbuf.
 *
 * Invariants: a response's msgid must be the request's (or 0 with an error, for errors the server
 * sends before it knows the msgid); any desynchronisation (timeout or error mid-message, a
 * malformed response) closes the connection; the next call reconnects (or, with reconnecting off,
 * fails with QINS_ECLOSED). A connection lost under a call is reopened and the call sent again
 * whole, within the caller's retry budget (see "Reconnecting" below). The scanner
 * bounds every declared length by max_response_bytes + QCL_SLACK before anything is buffered.
 * Messages the caller sees through qins_client_error name the call and, for server errors, carry
 * the server's own message.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>

#include "proto.h"
#include "qins.h"
#include "qins_int.h"
#include "qins_text.h"

#define QCL_SLACK (1u << 20)          /* bytes allowed beyond max_response_bytes: headers, names */
#define QCL_HELLO_MAX (1u << 20)      /* response size limit before hello told us the real one */
#define QCL_RBUF_MIN (64u << 10)      /* initial receive buffer: most responses fit at once */
#define QCL_DEFAULT_TIMEOUT_MS 5000   /* connect timeout when the caller passes <= 0 */
#define QCL_DEFAULT_RETRY_MS 5000     /* reconnect budget: a qinsd restart takes well under 1 s */
#define QCL_BACKOFF_MIN_MS 5          /* first pause between reconnect attempts */
#define QCL_BACKOFF_MAX_MS 200        /* pauses double up to this: a daemon back is found soon */

struct qins_client {
  int fd;                  /* the socket, nonblocking; -1 once closed */
  int timeout_ms;          /* per call; <= 0 waits forever */
  int retry_ms;            /* reconnect budget of a call that lost its connection; 0: none */
  char path[108];          /* the socket's path, for reconnects and messages */
  qins_conn_stats stats;   /* reconnect counters (qins_client_stats) */
  qins_reconnect_fn on_reconnect; /* called after each reconnect, or NULL */
  void *on_reconnect_ud;   /* its argument */
  int in_callback;         /* on_reconnect runs: calls it makes do not reconnect */
  int cut;                 /* the last failure cut a payload short */
  int64_t deadline_ms;     /* of the current call (CLOCK_MONOTONIC ms), or -1 */
  uint32_t msgid;          /* of the last request sent */
  uint8_t *rbuf;           /* receive buffer */
  size_t rcap;             /* its size */
  size_t rpos, rlen;       /* unread bytes are rbuf[rpos, rlen) */
  /* Response being read. */
  qp_scan sc;              /* scanner over the response */
  size_t mstart;           /* rbuf index of the response's first byte */
  uint64_t vgone;          /* payload bytes of the response removed from rbuf */
  int seg;                 /* QP_COMPLETE or QP_BIN: how the current segment ended */
  size_t seg_end;          /* rbuf index one past the current segment */
  int pending;             /* a QP_BIN payload not yet consumed */
  int srv;                 /* the last failure is the server's error response */
  qp_rd rd;                /* cursor within the current segment */
  msgpack_sbuffer sb;      /* request being packed */
  msgpack_packer pk;       /* packs into sb */
  qins_server_info server; /* from hello */
  char err[512];           /* last failure's message */
  qcl_arena *arena;        /* the arena mapping and fd passing state (client/arena.c), or NULL */
};

/* ------------------------------------------------------------------------------------------------
 * Errors and time */

static int qcl_fail(qins_client *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qcl_fail(qins_client *c, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  return code;
}

static int64_t qcl_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void qcl_arm(qins_client *c, int timeout_ms) {
  c->deadline_ms = timeout_ms > 0 ? qcl_now_ms() + timeout_ms : -1;
}

/* Closes the connection after a desynchronising failure; returns code. */
static int qcl_break(qins_client *c, int code) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  return code;
}

/* Waits for events on the socket until the call's deadline: 0, or QINS_ETIMEOUT / -errno. */
static int qcl_wait(qins_client *c, short events) {
  for (;;) {
    int ms = -1;
    if (c->deadline_ms >= 0) {
      int64_t left = c->deadline_ms - qcl_now_ms();
      if (left <= 0) return QINS_ETIMEOUT;
      ms = left > 1000000 ? 1000000 : (int)left;
    }
    struct pollfd p = {.fd = c->fd, .events = events};
    int r = poll(&p, 1, ms);
    if (r > 0) return 0;
    if (r == 0) continue; /* re-check the deadline */
    if (errno != EINTR) return -errno;
  }
}

/* ------------------------------------------------------------------------------------------------
 * Sending */

static int qcl_send_all(qins_client *c, const void *buf, size_t len) {
  const char *p = buf;
  while (len) {
    ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
    if (n > 0) {
      p += n;
      len -= (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int rc = qcl_wait(c, POLLOUT);
      if (rc) return rc;
      continue;
    }
    return n < 0 ? -errno : QINS_ECLOSED;
  }
  return 0;
}

/* Starts a request: [0, msgid, method, then the caller packs params. */
static void qcl_begin(qins_client *c, const char *method) {
  msgpack_sbuffer_clear(&c->sb);
  c->msgid = c->msgid == UINT32_MAX ? 1 : c->msgid + 1;
  qp_pack_request(&c->pk, c->msgid, method);
}

/* Sends the packed request. Requires a live connection. */
static int qcl_send(qins_client *c, const char *method) {
  if (c->fd < 0) return qcl_fail(c, QINS_ECLOSED, "%s: the connection is closed", method);
  if (c->sb.size > c->server.max_request_bytes && c->server.max_request_bytes)
    return qcl_fail(c, QINS_ETOO_LARGE, "%s: request of %zu bytes exceeds the server's %llu",
                    method, c->sb.size, (unsigned long long)c->server.max_request_bytes);
  int rc = qcl_send_all(c, c->sb.data, c->sb.size);
  if (rc) {
    qcl_break(c, rc);
    return qcl_fail(c, rc, "%s: send: %s", method, qins_strerror(rc));
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Receiving */

/* Reads more bytes into rbuf (growing it when full, up to need bytes past rpos-or-mstart). */
static int qcl_fill(qins_client *c) {
  if (c->rlen == c->rcap) {
    size_t keep_from = c->mstart < c->rpos ? c->mstart : c->rpos;
    if (keep_from > 0) { /* compact */
      memmove(c->rbuf, c->rbuf + keep_from, c->rlen - keep_from);
      c->rlen -= keep_from;
      c->rpos -= keep_from;
      c->mstart -= keep_from;
      if (c->seg_end >= keep_from) c->seg_end -= keep_from;
      c->rd.p -= keep_from;
      c->rd.end -= keep_from;
    } else {
      size_t ncap = c->rcap * 2;
      uint8_t *nb = realloc(c->rbuf, ncap);
      if (!nb) return QINS_ENOMEM;
      c->rd.p = nb + (c->rd.p - c->rbuf);
      c->rd.end = nb + (c->rd.end - c->rbuf);
      c->rbuf = nb;
      c->rcap = ncap;
    }
  }
  for (;;) {
    ssize_t n = qcl__recv(c, c->fd, c->rbuf + c->rlen, c->rcap - c->rlen); /* takes passed fds */
    if (n > 0) {
      c->rlen += (size_t)n;
      return 0;
    }
    if (n == 0) return QINS_ECLOSED;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
    int rc = qcl_wait(c, POLLIN);
    if (rc) return rc;
  }
}

/* Scans the response on to its next stop (a non-empty bin header, or the end) and points the
 * cursor at the new segment. The cursor's unread bytes stay where they are. */
static int qcl_scan(qins_client *c) {
  for (;;) {
    const uint8_t *base = (const uint8_t *)((uintptr_t)(c->rbuf + c->mstart) - (uintptr_t)c->vgone);
    size_t vlen = (size_t)(c->rlen - c->mstart + c->vgone);
    size_t size = 0;
    int r = qp_scan_next(&c->sc, base, vlen, &size);
    if (r == QP_MORE) {
      int rc = qcl_fill(c);
      if (rc) return rc;
      continue;
    }
    if (r < 0) return r;
    c->seg = r;
    c->seg_end = c->mstart + (size_t)(size - c->vgone);
    c->rd.end = c->rbuf + c->seg_end;
    c->pending = r == QP_BIN;
    return 0;
  }
}

/* Starts reading a response: scans its first segment. */
static int qcl_resp_begin(qins_client *c) {
  uint64_t maxb = c->server.max_response_bytes ? c->server.max_response_bytes + QCL_SLACK
                                               : QCL_HELLO_MAX;
  qp_scan_init(&c->sc, maxb, QP_MAX_DEPTH);
  c->sc.bin_stop = 1;
  c->mstart = c->rpos;
  c->vgone = 0;
  c->rd.p = c->rbuf + c->rpos;
  c->rd.end = c->rd.p;
  return qcl_scan(c);
}

/* Delivers the pending payload (sc.bin_len bytes right after the segment) into dst, or discards
 * it when dst is NULL, then scans on. */
static int qcl_payload(qins_client *c, void *dst) {
  uint64_t len = c->sc.bin_len, done = 0;
  size_t at = c->seg_end; /* first payload byte in rbuf, if buffered */
  size_t avail = c->rlen - at;
  size_t take = avail < len ? avail : (size_t)len;
  if (dst && take) memcpy(dst, c->rbuf + at, take);
  memmove(c->rbuf + at, c->rbuf + at + take, c->rlen - at - take);
  c->rlen -= take;
  done = take;
  uint8_t scratch[16384];
  while (done < len) { /* straight from the socket into dst */
    uint8_t *p = dst ? (uint8_t *)dst + done : scratch;
    size_t want = dst ? (size_t)(len - done) : (len - done < sizeof scratch ? (size_t)(len - done) : sizeof scratch);
    ssize_t n = recv(c->fd, p, want, 0);
    if (n > 0) {
      done += (uint64_t)n;
      continue;
    }
    int rc;
    if (n == 0) rc = QINS_ECLOSED;
    else if (errno == EINTR) continue;
    else if (errno != EAGAIN && errno != EWOULDBLOCK) rc = -errno;
    else if ((rc = qcl_wait(c, POLLIN)) == 0) continue;
    else return rc; /* the call's deadline, not the stream */
    c->cut = 1;     /* the stream ended inside the payload */
    return rc;
  }
  c->vgone += len;
  c->pending = 0;
  qp_scan_bin_done(&c->sc);
  return qcl_scan(c);
}

/* Reads the rest of the response (discarding payloads) and consumes it. */
static int qcl_resp_end(qins_client *c) {
  int rc;
  while (c->seg == QP_BIN)
    if ((rc = qcl_payload(c, NULL))) return rc;
  c->rpos = c->seg_end;
  if (c->rpos == c->rlen) c->rpos = c->rlen = 0;
  c->mstart = c->rpos;
  return 0;
}

/* Cursor helpers: a wrong type is a malformed response (QINS_EPROTO). */
#define RD(call)                                                                              \
  do {                                                                                        \
    if ((call)) return QINS_EPROTO;                                                           \
  } while (0)

static int qcl_str_eq(const char *s, uint32_t n, const char *lit) {
  return strlen(lit) == n && !memcmp(s, lit, n);
}

/* Reads a map, calling on(c, key, key_len, ud) for each entry; `on` reads (or skips) the value and
 * returns 0 or an error code, which ends the walk. */
typedef int (*qcl_entry_fn)(qins_client *c, const char *k, uint32_t kl, void *ud);
static int qcl_rd_entries(qins_client *c, qcl_entry_fn on, void *ud) {
  uint32_t n;
  RD(qp_rd_map(&c->rd, &n));
  for (uint32_t i = 0; i < n; i++) {
    const char *k;
    uint32_t kl;
    RD(qp_rd_str(&c->rd, &k, &kl));
    int rc = on(c, k, kl, ud);
    if (rc) return rc;
  }
  return 0;
}

static int qcl_rd_cstr(qins_client *c, char *dst, size_t cap) {
  const char *s;
  uint32_t n;
  RD(qp_rd_str(&c->rd, &s, &n));
  if (n >= cap || memchr(s, 0, n)) return QINS_EPROTO;
  memcpy(dst, s, n);
  dst[n] = 0;
  return 0;
}

/* Skips one value; a bin at the segment's end (its payload pending) is discarded. */
static int qcl_skip(qins_client *c) {
  qp_rd save = c->rd;
  uint32_t n;
  if (qp_rd_bin_header(&c->rd, &n) == 0) {
    if (c->rd.p == c->rd.end && c->pending && n > 0) return qcl_payload(c, NULL);
    c->rd = save;
  }
  RD(qp_rd_skip(&c->rd));
  return 0;
}

/* Reads the envelope [1, msgid, error, ...: 0 with the cursor at the result on success; the
 * server's error code (message in c->err) otherwise, with the response consumed. */
static int qcl_envelope(qins_client *c, const char *what) {
  uint32_t n;
  uint64_t type, id;
  if (qp_rd_array(&c->rd, &n) || n != 4 || qp_rd_uint(&c->rd, &type) || type != QP_RESPONSE ||
      qp_rd_uint(&c->rd, &id))
    return qcl_fail(c, QINS_EPROTO, "%s: malformed response envelope", what);
  if (id != c->msgid && id != 0)
    return qcl_fail(c, QINS_EPROTO, "%s: response msgid %llu, expected %u", what,
                    (unsigned long long)id, c->msgid);
  if (qp_rd_is_nil(&c->rd)) {
    qp_rd_nil(&c->rd);
    if (id == 0) return qcl_fail(c, QINS_EPROTO, "%s: success response with msgid 0", what);
    return 0;
  }
  uint32_t en;
  int64_t code;
  const char *msg;
  uint32_t mlen;
  if (qp_rd_array(&c->rd, &en) || en < 2 || qp_rd_int(&c->rd, &code) ||
      qp_rd_str(&c->rd, &msg, &mlen) || code >= 0 || code < INT32_MIN)
    return qcl_fail(c, QINS_EPROTO, "%s: malformed error in response", what);
  int icode = (int)code;
  c->srv = 1;
  qcl_fail(c, icode, "%s: %s: %.*s", what, qins_err_name(icode), (int)(mlen > 400 ? 400 : mlen),
           msg);
  for (uint32_t i = 2; i < en; i++)
    if (qcl_skip(c)) return qcl_fail(c, QINS_EPROTO, "%s: malformed error in response", what);
  if (qcl_skip(c)) return qcl_fail(c, QINS_EPROTO, "%s: malformed response", what); /* result */
  int rc = qcl_resp_end(c);
  if (rc) return qcl_fail(c, rc, "%s: reading the response: %s", what, qins_strerror(rc));
  if (id == 0) qcl_break(c, 0); /* the server closes after errors it cannot tie to a request */
  return icode;
}

/* Sends the packed request and reads up to the result. 0: the cursor is at the result, which the
 * caller parses and then calls qcl_finish. Else the failure's code (response consumed or the
 * connection closed). */
static int qcl_call(qins_client *c, const char *what) {
  qcl_arm(c, c->timeout_ms);
  c->err[0] = 0;
  c->srv = 0;
  int rc = qcl_send(c, what);
  if (rc) return rc;
  rc = qcl_resp_begin(c);
  if (rc) {
    const char *why = rc == QINS_ETOO_LARGE || rc == QINS_EPROTO ? c->sc.what : qins_strerror(rc);
    qcl_fail(c, rc, "%s: reading the response: %s", what, why);
    return qcl_break(c, rc);
  }
  rc = qcl_envelope(c, what);
  if (rc && !c->srv) return qcl_break(c, rc); /* a malformed envelope: the stream is lost */
  return rc;
}

/* Ends a call whose result parse returned rc: consumes the rest of the response (or closes the
 * connection when the response was malformed or the stream failed). */
static int qcl_io_error(int rc) {
  return rc == QINS_ETIMEOUT || rc == QINS_ECLOSED || rc == QINS_EIO || (rc < 0 && rc > -1000);
}

static int qcl_finish(qins_client *c, const char *what, int rc) {
  if (rc && !c->err[0])
    qcl_fail(c, rc, "%s: %s", what, rc == QINS_EPROTO ? "malformed result" : qins_strerror(rc));
  if (qcl_io_error(rc)) return qcl_break(c, rc); /* mid-message: the stream is lost */
  /* The scanner knows the message's extent whatever the cursor's position: consume the rest. */
  int e = qcl_resp_end(c);
  if (e) {
    qcl_fail(c, e, "%s: reading the response: %s", what, qins_strerror(e));
    return qcl_break(c, e);
  }
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Connection */

/* One entry of hello's answer (PROTOCOL.md §4.1) into c->server. */
static int qcl_hello_entry(qins_client *c, const char *k, uint32_t kl, void *ud) {
  (void)ud;
  if (qcl_str_eq(k, kl, "protocol")) {
    uint64_t v;
    RD(qp_rd_uint(&c->rd, &v));
    c->server.protocol = v > 1000000 ? 1000000 : (unsigned)v;
  } else if (qcl_str_eq(k, kl, "server")) {
    const char *s;
    uint32_t sl;
    RD(qp_rd_str(&c->rd, &s, &sl));
    snprintf(c->server.server, sizeof c->server.server, "%.*s", (int)sl, s);
  } else if (qcl_str_eq(k, kl, "max_request_bytes")) {
    RD(qp_rd_uint(&c->rd, &c->server.max_request_bytes));
  } else if (qcl_str_eq(k, kl, "max_response_bytes")) {
    RD(qp_rd_uint(&c->rd, &c->server.max_response_bytes));
  } else if (qcl_str_eq(k, kl, "max_connections")) {
    RD(qp_rd_uint(&c->rd, &c->server.max_connections));
  } else if (qcl_str_eq(k, kl, "max_ranges")) {
    RD(qp_rd_uint(&c->rd, &c->server.max_ranges));
  } else {
    return qcl_skip(c);
  }
  return 0;
}

static int qcl_parse_hello(qins_client *c) {
  int rc = qcl_rd_entries(c, qcl_hello_entry, NULL);
  if (rc) return rc;
  if (c->server.protocol != QP_PROTOCOL_VERSION)
    return qcl_fail(c, QINS_EVERSION, "hello: server speaks protocol %u, this library %d",
                    c->server.protocol, QP_PROTOCOL_VERSION);
  if (c->server.max_response_bytes > UINT32_MAX) c->server.max_response_bytes = UINT32_MAX;
  return 0;
}

/* Opens the connection to c->path and exchanges hello, bounded by c->deadline_ms: 0, or the
 * failure's code (message in c->err) with c->fd closed. Any previous connection is closed first
 * and the receive buffer emptied; c->server is read anew (and kept as it was on failure). */
static int qcl_open(qins_client *c) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, c->path, sizeof sa.sun_path); /* NUL-terminated: checked at connect */
  qcl_break(c, 0);
  c->rpos = c->rlen = c->mstart = 0;
  c->vgone = 0;
  c->pending = 0;
  c->cut = 0;
  c->err[0] = 0;
  qins_server_info prev = c->server;
  memset(&c->server, 0, sizeof c->server);
  int rc;
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    rc = -errno;
    goto fail;
  }
  for (;;) {
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) == 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN) { /* listen backlog full: retry until the deadline */
      if (c->deadline_ms >= 0 && qcl_now_ms() >= c->deadline_ms) {
        rc = QINS_ETIMEOUT;
        goto fail;
      }
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, NULL);
      continue;
    }
    if (errno == EINPROGRESS) {
      if ((rc = qcl_wait(c, POLLOUT))) goto fail;
      int soerr = 0;
      socklen_t sl = sizeof soerr;
      getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
      if (soerr) {
        rc = -soerr;
        goto fail;
      }
      break;
    }
    rc = -errno;
    goto fail;
  }
  qcl_begin(c, "hello");
  msgpack_pack_array(&c->pk, 0);
  /* The caller's deadline bounds hello: qcl_call would re-arm from timeout_ms. */
  rc = qcl_send_all(c, c->sb.data, c->sb.size);
  if (rc == -EPIPE || rc == -ECONNRESET) {
    /* A server that turned us away at connect (BUSY, DENIED: msgid 0, then a close) may have
     * closed before hello arrived; its answer is still queued for us: report that. */
    int sent_rc = rc;
    if (qcl_resp_begin(c) == 0 && (rc = qcl_envelope(c, "hello")) < 0) goto fail;
    rc = qcl_fail(c, sent_rc, "hello: send: %s", qins_strerror(sent_rc));
    goto fail;
  }
  if (rc) {
    rc = qcl_fail(c, rc, "hello: send: %s", qins_strerror(rc));
    goto fail;
  }
  if ((rc = qcl_resp_begin(c))) goto fail;
  if ((rc = qcl_envelope(c, "hello"))) goto fail;
  rc = qcl_finish(c, "hello", qcl_parse_hello(c));
  if (rc) goto fail;
  return 0;
fail:
  qcl_break(c, rc);
  c->server = prev;
  return rc;
}

/* QINS_RETRY_MS from the environment, else the default. */
static int qcl_env_retry(void) {
  const char *s = getenv("QINS_RETRY_MS");
  char *end;
  long v = s && *s ? strtol(s, &end, 10) : -1;
  return s && *s && !*end && v >= 0 && v <= INT32_MAX ? (int)v : QCL_DEFAULT_RETRY_MS;
}

int qins_connect(qins_client **out, const char *socket_path, int timeout_ms) {
  *out = NULL;
  if (!socket_path) return QINS_EINVALID;
  qins_client *c = NULL;
  if (strlen(socket_path) >= sizeof c->path) return QINS_ENAME;
  c = calloc(1, sizeof *c);
  if (!c) return QINS_ENOMEM;
  c->fd = -1;
  strcpy(c->path, socket_path);
  c->retry_ms = qcl_env_retry();
  c->rcap = QCL_RBUF_MIN;
  c->rbuf = malloc(c->rcap);
  if (!c->rbuf) {
    free(c);
    return QINS_ENOMEM;
  }
  msgpack_sbuffer_init(&c->sb);
  msgpack_packer_init(&c->pk, &c->sb, msgpack_sbuffer_write);
  qcl_arm(c, timeout_ms > 0 ? timeout_ms : QCL_DEFAULT_TIMEOUT_MS);
  int rc = qcl_open(c);
  if (rc) {
    qins_close(c);
    return rc;
  }
  c->stats.generation = 1;
  *out = c;
  return 0;
}

void qins_close(qins_client *c) {
  if (!c) return;
  if (c->fd >= 0) close(c->fd);
  qcl__arena_free(c);
  msgpack_sbuffer_destroy(&c->sb);
  free(c->rbuf);
  free(c);
}

/* ------------------------------------------------------------------------------------------------
 * Reconnecting (docs/client.md §1.1). A method's attempt is packed, sent and parsed whole; when
 * the connection is lost under it, qcl_again opens a new one (hello again, limits re-read) and the
 * method runs again from the start, so nothing of the lost attempt is reused: outputs are
 * rewritten, library allocations of the lost attempt were freed by it. Every retried method is a
 * read; shutdown is never retried. */

/* The connection was lost under the call (rather than the server refusing it or answering
 * something malformed): reconnecting and sending the call again is the remedy. */
int qcl__lost(int rc) {
  return rc == QINS_ECLOSED || rc == QINS_ESHUTDOWN || rc == -EPIPE || rc == -ECONNRESET ||
         rc == -ENOTCONN || rc == -ECONNABORTED;
}

/* A reconnect attempt's failure that a restarting daemon explains: try again after a pause. */
static int qcl_transient(int rc) {
  return qcl__lost(rc) || rc == -ENOENT || rc == -ECONNREFUSED || rc == -EAGAIN ||
         rc == QINS_ETIMEOUT || rc == QINS_EBUSY;
}

static void qcl_sleep_ms(int64_t ms) {
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

typedef struct qcl_retry {
  int64_t deadline_ms; /* end of the call's reconnect budget; -1 until its first loss */
  int cuts;            /* payloads of this call cut short by a lost connection */
} qcl_retry;

/* After an attempt of method `what` returned *rc: 1 when the connection had been lost and is open
 * again (run the attempt again), else 0 with *rc the call's result. */
static int qcl_again(qins_client *c, const char *what, qcl_retry *rt, int *rc) {
  int cut = c->cut;
  c->cut = 0;
  if (!qcl__lost(*rc) || c->retry_ms <= 0 || c->in_callback) return 0;
  if (cut && ++rt->cuts > 1) {
    /* A streamed get whose later chunk fails its checksum is cut off too (PROTOCOL.md §4.6):
     * the same answer cut twice is reported, not fetched until the budget is spent. */
    qcl_break(c, 0);
    *rc = qcl_fail(c, QINS_ECLOSED,
                   "%s: the connection to %s closed inside the payload twice: the server may "
                   "have found a damaged chunk (its log names it; treat as CHECKSUM)",
                   what, c->path);
    return 0;
  }
  if (rt->deadline_ms < 0) rt->deadline_ms = qcl_now_ms() + c->retry_ms;
  int lost = *rc, last = *rc, attempts = 0;
  int64_t pause = QCL_BACKOFF_MIN_MS;
  for (;;) {
    attempts++;
    c->deadline_ms = rt->deadline_ms; /* bounds connect and hello */
    int r = qcl_open(c);
    if (r == 0) break;
    last = r;
    if (!qcl_transient(r)) {
      char why[sizeof c->err];
      snprintf(why, sizeof why, "%s", c->err[0] ? c->err : qins_strerror(r));
      *rc = qcl_fail(c, r, "%s: reconnecting to %s: %s", what, c->path, why);
      return 0;
    }
    int64_t left = rt->deadline_ms - qcl_now_ms();
    if (left <= 0) {
      c->stats.budgets_spent++;
      *rc = qcl_fail(c, QINS_ECLOSED,
                     "%s: lost the connection to %s (%s) and could not reconnect within the "
                     "%d ms retry budget (%d attempts, last: %s)",
                     what, c->path, qins_err_name(lost), c->retry_ms, attempts,
                     qins_err_name(last));
      return 0;
    }
    qcl_sleep_ms(pause < left ? pause : left);
    pause = pause * 2 > QCL_BACKOFF_MAX_MS ? QCL_BACKOFF_MAX_MS : pause * 2;
  }
  c->stats.reconnects++;
  c->stats.generation++;
  if (c->on_reconnect) {
    c->in_callback = 1;
    int r = c->on_reconnect(c, c->on_reconnect_ud);
    c->in_callback = 0;
    if (r) {
      char why[sizeof c->err];
      snprintf(why, sizeof why, "%s", c->err[0] ? c->err : qins_strerror(r));
      *rc = qcl_fail(c, r, "%s: the reconnect callback failed: %s", what, why);
      return 0;
    }
  }
  c->stats.retried_calls++;
  return 1;
}

/* Runs `attempt` (an expression setting rc) until it succeeds, fails for a reason other than a
 * lost connection, or the reconnect budget is spent. */
#define QCL_RETRYING(c, what, rc, attempt)                                                    \
  do {                                                                                        \
    qcl_retry rt_ = {-1, 0};                                                                  \
    do (rc) = (attempt);                                                                      \
    while (qcl_again((c), (what), &rt_, &(rc)));                                              \
  } while (0)

int qcl__retrying(qins_client *c, const char *what, int (*attempt)(qins_client *, void *),
                  void *ud) {
  int rc;
  QCL_RETRYING(c, what, rc, attempt(c, ud));
  return rc;
}

void qins_set_retry(qins_client *c, int budget_ms) {
  c->retry_ms = budget_ms < 0 ? QCL_DEFAULT_RETRY_MS : budget_ms;
}

void qins_set_reconnect_cb(qins_client *c, qins_reconnect_fn fn, void *ud) {
  c->on_reconnect = fn;
  c->on_reconnect_ud = ud;
}

void qins_client_stats(const qins_client *c, qins_conn_stats *out) { *out = c->stats; }

const char *qins_client_error(const qins_client *c) { return c ? c->err : "no client"; }
void qins_set_timeout(qins_client *c, int timeout_ms) { c->timeout_ms = timeout_ms; }
const qins_server_info *qins_server(const qins_client *c) { return &c->server; }
void qins_free(void *p) { free(p); }

/* ------------------------------------------------------------------------------------------------
 * Methods */

static void qcl_pack_kv_str(qins_client *c, const char *k, const char *v) {
  qp_pack_cstr(&c->pk, k);
  qp_pack_cstr(&c->pk, v);
}

static const char *qcl_dtype_name(qins_dtype dt) {
  switch (dt) {
  case QINS_F32: return "f32";
  case QINS_F16: return "f16";
  case QINS_BF16: return "bf16";
  }
  return NULL;
}

static size_t qcl_dtype_size(const char *name) {
  if (!strcmp(name, "f32") || !strcmp(name, "i32") || !strcmp(name, "u32")) return 4;
  if (!strcmp(name, "f16") || !strcmp(name, "bf16") || !strcmp(name, "i16") || !strcmp(name, "u16"))
    return 2;
  if (!strcmp(name, "f64") || !strcmp(name, "i64") || !strcmp(name, "u64")) return 8;
  if (!strcmp(name, "i8") || !strcmp(name, "u8") || !strcmp(name, "bool")) return 1;
  return 0;
}

static int qcl_ping_once(qins_client *c) {
  qcl_begin(c, "ping");
  msgpack_pack_array(&c->pk, 0);
  int rc = qcl_call(c, "ping");
  if (rc) return rc;
  char s[16];
  rc = qcl_rd_cstr(c, s, sizeof s);
  if (!rc && strcmp(s, "pong")) rc = qcl_fail(c, QINS_EPROTO, "ping: answer is not \"pong\"");
  return qcl_finish(c, "ping", rc);
}

int qins_ping(qins_client *c) {
  int rc;
  QCL_RETRYING(c, "ping", rc, qcl_ping_once(c));
  return rc;
}

int qins_shutdown(qins_client *c) {
  qcl_begin(c, "shutdown");
  msgpack_pack_array(&c->pk, 0);
  int rc = qcl_call(c, "shutdown");
  if (rc) return rc;
  return qcl_finish(c, "shutdown", qcl_skip(c));
}

/* A `shape` array of at most QINS_MAX_NDIM unsigned ints into shape/ndim. */
static int qcl_rd_shape(qins_client *c, uint64_t shape[QINS_MAX_NDIM], int *ndim) {
  uint32_t nd;
  RD(qp_rd_array(&c->rd, &nd));
  if (nd > QINS_MAX_NDIM) return QINS_EPROTO;
  *ndim = (int)nd;
  for (uint32_t d = 0; d < nd; d++) RD(qp_rd_uint(&c->rd, &shape[d]));
  return 0;
}

/* One entry of an `info` map (PROTOCOL.md §4.5) into the qins_tensor_info at ud. */
static int qcl_info_entry(qins_client *c, const char *k, uint32_t kl, void *ud) {
  qins_tensor_info *out = ud;
  if (qcl_str_eq(k, kl, "name")) return qcl_rd_cstr(c, out->name, sizeof out->name);
  if (qcl_str_eq(k, kl, "codec")) return qcl_rd_cstr(c, out->codec, sizeof out->codec);
  if (qcl_str_eq(k, kl, "src_dtype")) return qcl_rd_cstr(c, out->src_dtype, sizeof out->src_dtype);
  if (qcl_str_eq(k, kl, "shape")) return qcl_rd_shape(c, out->shape, &out->ndim);
  if (qcl_str_eq(k, kl, "n_elem")) RD(qp_rd_uint(&c->rd, &out->n_elem));
  else if (qcl_str_eq(k, kl, "src_bytes")) RD(qp_rd_uint(&c->rd, &out->src_bytes));
  else if (qcl_str_eq(k, kl, "stored_bytes")) RD(qp_rd_uint(&c->rd, &out->stored_bytes));
  else if (qcl_str_eq(k, kl, "snr_db")) RD(qp_rd_double(&c->rd, &out->snr_db));
  else return qcl_skip(c);
  return 0;
}

/* One `info` map into out. */
static int qcl_parse_info(qins_client *c, qins_tensor_info *out) {
  memset(out, 0, sizeof *out);
  return qcl_rd_entries(c, qcl_info_entry, out);
}

static int qcl_info_once(qins_client *c, const char *model, const char *name,
                         qins_tensor_info *out) {
  if (!model || !name || !out) return qcl_fail(c, QINS_EINVALID, "info: NULL argument");
  qcl_begin(c, "info");
  msgpack_pack_array(&c->pk, 1);
  msgpack_pack_map(&c->pk, 2);
  qcl_pack_kv_str(c, "model", model);
  qcl_pack_kv_str(c, "name", name);
  int rc = qcl_call(c, "info");
  if (rc) return rc;
  return qcl_finish(c, "info", qcl_parse_info(c, out));
}

int qins_info(qins_client *c, const char *model, const char *name, qins_tensor_info *out) {
  int rc;
  QCL_RETRYING(c, "info", rc, qcl_info_once(c, model, name, out));
  return rc;
}

/* Where a tensor map's payload goes: returns the destination for len bytes of tensor t (index
 * idx), or NULL to discard it (then *rc says why: QINS_EBUFFER, QINS_ENOMEM). */
typedef void *(*qcl_dest_fn)(void *ud, int idx, qins_tensor *t, uint64_t len, int *rc);

/* A tensor map being read: where it goes and what was seen. */
typedef struct qcl_tensor_rd {
  int idx;
  qins_tensor *t;
  qcl_dest_fn dest;
  void *ud;
  int result;    /* QINS_EBUFFER / QINS_ENOMEM: the payload was discarded */
  int seen_data;
} qcl_tensor_rd;

/* Its payload (key "data"): checked against shape and dtype, then read where dest says. */
static int qcl_tensor_data(qins_client *c, qcl_tensor_rd *r) {
  qins_tensor *t = r->t;
  uint32_t len;
  RD(qp_rd_bin_header(&c->rd, &len));
  r->seen_data = 1;
  uint64_t elems = 1;
  for (int d = 0; d < t->ndim; d++) {
    if (t->shape[d] && elems > UINT64_MAX / t->shape[d]) return QINS_EPROTO;
    elems *= t->shape[d];
  }
  size_t es = qcl_dtype_size(t->dtype);
  if (!es || elems > UINT64_MAX / es || elems * es != len) {
    qcl_fail(c, QINS_EPROTO, "tensor %s: %u payload bytes do not match its shape and dtype %s",
             t->name, len, t->dtype);
    return QINS_EPROTO;
  }
  int why = 0, rc;
  t->bytes = len;
  void *dst = r->dest(r->ud, r->idx, t, len, &why);
  if (len > 0) {
    if (!(c->pending && c->rd.p == c->rd.end)) return QINS_EPROTO;
    if ((rc = qcl_payload(c, dst))) {
      qcl_fail(c, rc, "tensor %s: reading the payload: %s", t->name, qins_strerror(rc));
      return rc;
    }
  }
  if (!dst && why) r->result = why;
  return 0;
}

static int qcl_tensor_entry(qins_client *c, const char *k, uint32_t kl, void *ud) {
  qcl_tensor_rd *r = ud;
  qins_tensor *t = r->t;
  if (qcl_str_eq(k, kl, "name")) return qcl_rd_cstr(c, t->name, sizeof t->name);
  if (qcl_str_eq(k, kl, "dtype")) return qcl_rd_cstr(c, t->dtype, sizeof t->dtype);
  if (qcl_str_eq(k, kl, "shape")) return qcl_rd_shape(c, t->shape, &t->ndim);
  if (qcl_str_eq(k, kl, "data")) return qcl_tensor_data(c, r);
  return qcl_skip(c);
}

/* Parses a tensor map {name?, shape, dtype, data} (PROTOCOL.md §4.6/4.7) into t, delivering data
 * where dest says. */
static int qcl_parse_tensor(qins_client *c, int idx, qins_tensor *t, qcl_dest_fn dest, void *ud) {
  qcl_tensor_rd r = {idx, t, dest, ud, 0, 0};
  int rc = qcl_rd_entries(c, qcl_tensor_entry, &r);
  if (rc) return rc;
  return r.seen_data ? r.result : QINS_EPROTO;
}

static int qcl_pack_get_common(qins_client *c, const char *model, qins_dtype dt, int extra) {
  const char *dn = qcl_dtype_name(dt);
  if (!dn) return qcl_fail(c, QINS_EDTYPE, "bad dtype %d", (int)dt);
  msgpack_pack_array(&c->pk, 1);
  msgpack_pack_map(&c->pk, (size_t)(2 + extra));
  qcl_pack_kv_str(c, "model", model);
  qcl_pack_kv_str(c, "dtype", dn);
  return 0;
}

typedef struct qcl_into {
  void *buf;
  size_t cap;
  int alloc; /* allocate instead */
  void *got; /* allocated buffer */
} qcl_into;

static void *qcl_aligned(uint64_t len) {
  size_t n = (size_t)((len + 63) / 64 * 64);
  return aligned_alloc(64, n ? n : 64);
}

static void *qcl_dest_one(void *ud, int idx, qins_tensor *t, uint64_t len, int *rc) {
  qcl_into *in = ud;
  (void)idx, (void)t;
  if (in->alloc) {
    in->got = qcl_aligned(len);
    if (!in->got) *rc = QINS_ENOMEM;
    return in->got;
  }
  if (len > in->cap) {
    *rc = QINS_EBUFFER;
    return NULL;
  }
  return in->buf;
}

static int qcl_get_one(qins_client *c, const char *model, const char *name,
                       const qins_range *slice, int nslice, qins_dtype dt, qcl_into *in,
                       size_t *out_bytes, uint64_t *shape_out, int *ndim_out) {
  if (!model || !name || nslice < 0 || nslice > QINS_MAX_NDIM || (nslice && !slice))
    return qcl_fail(c, QINS_EINVALID, "get: bad arguments");
  qcl_begin(c, "get");
  int rc = qcl_pack_get_common(c, model, dt, 1 + (nslice > 0));
  if (rc) return rc;
  qcl_pack_kv_str(c, "name", name);
  if (nslice > 0) {
    qp_pack_cstr(&c->pk, "slice");
    msgpack_pack_array(&c->pk, (size_t)nslice);
    for (int i = 0; i < nslice; i++) {
      msgpack_pack_array(&c->pk, 2);
      msgpack_pack_uint64(&c->pk, slice[i].start);
      msgpack_pack_uint64(&c->pk, slice[i].stop);
    }
  }
  if ((rc = qcl_call(c, "get"))) return rc;
  qins_tensor t;
  memset(&t, 0, sizeof t);
  snprintf(t.name, sizeof t.name, "%s", name);
  rc = qcl_parse_tensor(c, 0, &t, qcl_dest_one, in);
  if (rc == QINS_EBUFFER)
    qcl_fail(c, rc, "get %s/%s: the %llu-byte payload does not fit the %zu-byte buffer", model,
             name, (unsigned long long)t.bytes, in->cap);
  if (!rc) {
    if (out_bytes) *out_bytes = t.bytes;
    if (shape_out) memcpy(shape_out, t.shape, sizeof t.shape);
    if (ndim_out) *ndim_out = t.ndim;
  }
  rc = qcl_finish(c, "get", rc);
  if (rc && in->got) {
    free(in->got);
    in->got = NULL;
  }
  return rc;
}

int qins_get_into(qins_client *c, const char *model, const char *name, const qins_range *slice,
                  int nslice, qins_dtype dt, void *buf, size_t buf_bytes, size_t *out_bytes,
                  uint64_t shape_out[QINS_MAX_NDIM], int *ndim_out) {
  qcl_into in = {.buf = buf, .cap = buf_bytes};
  int rc;
  QCL_RETRYING(c, "get", rc,
               qcl_get_one(c, model, name, slice, nslice, dt, &in, out_bytes, shape_out, ndim_out));
  return rc;
}

int qins_get(qins_client *c, const char *model, const char *name, const qins_range *slice,
             int nslice, qins_dtype dt, void **out, size_t *out_bytes,
             uint64_t shape_out[QINS_MAX_NDIM], int *ndim_out) {
  qcl_into in = {.alloc = 1};
  *out = NULL;
  int rc;
  QCL_RETRYING(c, "get", rc,
               qcl_get_one(c, model, name, slice, nslice, dt, &in, out_bytes, shape_out, ndim_out));
  if (!rc) *out = in.got ? in.got : qcl_aligned(0);
  if (!rc && !*out) return qcl_fail(c, QINS_ENOMEM, "get: out of memory");
  return rc;
}

/* get_many's answer being read. */
typedef struct qcl_many_rd {
  qcl_dest_fn dest;
  void *ud;
  qins_tensor **pts;
  int max;    /* tensors asked, or -1 */
  int *count; /* tensors seen */
  int result; /* first QINS_EBUFFER / QINS_ENOMEM */
  int found;  /* "tensors" seen */
} qcl_many_rd;

static int qcl_many_entry(qins_client *c, const char *k, uint32_t kl, void *ud) {
  qcl_many_rd *r = ud;
  if (!qcl_str_eq(k, kl, "tensors")) return qcl_skip(c);
  uint32_t m;
  RD(qp_rd_array(&c->rd, &m));
  if (r->max >= 0 && m != (uint32_t)r->max) {
    qcl_fail(c, QINS_EPROTO, "get_many: %u tensors in the answer, %d asked", m, r->max);
    return QINS_EPROTO;
  }
  if (r->found) return QINS_EPROTO;
  r->found = 1;
  if (!*r->pts && !(*r->pts = calloc(m ? m : 1, sizeof **r->pts)))
    return QINS_ENOMEM; /* m <= the answer's bytes */
  qins_tensor *ts = *r->pts;
  for (uint32_t j = 0; j < m; j++) {
    *r->count = (int)j + 1;
    int rc = qcl_parse_tensor(c, (int)j, &ts[j], r->dest, r->ud);
    if (rc == QINS_EBUFFER || rc == QINS_ENOMEM) r->result = r->result ? r->result : rc;
    else if (rc) return rc;
  }
  return 0;
}

/* Reads {tensors: [tensor map...]}, each delivered by dest. *count gets the array length (checked
 * by the caller when it must match). */
static int qcl_parse_many(qins_client *c, qcl_dest_fn dest, void *ud, qins_tensor **pts, int max,
                          int *count) {
  qcl_many_rd r = {dest, ud, pts, max, count, 0, 0};
  int rc = qcl_rd_entries(c, qcl_many_entry, &r);
  if (rc) return rc;
  return r.found ? r.result : QINS_EPROTO;
}

typedef struct qcl_many_into {
  qins_get_req *reqs;
} qcl_many_into;

static void *qcl_dest_req(void *ud, int idx, qins_tensor *t, uint64_t len, int *rc) {
  qcl_many_into *m = ud;
  qins_get_req *r = &m->reqs[idx];
  (void)t;
  if (len > r->buf_bytes) {
    *rc = QINS_EBUFFER;
    return NULL;
  }
  return r->buf;
}

static int qcl_get_many_into_once(qins_client *c, const char *model, qins_get_req *reqs, int n,
                                  qins_dtype dt) {
  if (!model || n <= 0 || !reqs) return qcl_fail(c, QINS_EINVALID, "get_many: bad arguments");
  qcl_begin(c, "get_many");
  int rc = qcl_pack_get_common(c, model, dt, 1);
  if (rc) return rc;
  qp_pack_cstr(&c->pk, "names");
  msgpack_pack_array(&c->pk, (size_t)n);
  for (int i = 0; i < n; i++) {
    if (!reqs[i].name) return qcl_fail(c, QINS_EINVALID, "get_many: NULL name");
    qp_pack_cstr(&c->pk, reqs[i].name);
  }
  qins_tensor *ts = calloc((size_t)n, sizeof *ts);
  if (!ts) return qcl_fail(c, QINS_ENOMEM, "get_many: out of memory");
  if ((rc = qcl_call(c, "get_many"))) {
    free(ts);
    return rc;
  }
  qcl_many_into m = {reqs};
  int count = 0;
  rc = qcl_parse_many(c, qcl_dest_req, &m, &ts, n, &count);
  for (int i = 0; i < count && rc != QINS_EPROTO; i++) {
    if (ts[i].name[0] && strcmp(ts[i].name, reqs[i].name)) {
      qcl_fail(c, QINS_EPROTO, "get_many: answer %d is %s, asked %s", i, ts[i].name, reqs[i].name);
      rc = QINS_EPROTO;
      break;
    }
    reqs[i].out_bytes = ts[i].bytes;
    reqs[i].ndim = ts[i].ndim;
    memcpy(reqs[i].shape, ts[i].shape, sizeof ts[i].shape);
  }
  if (rc == QINS_EBUFFER) qcl_fail(c, rc, "get_many: a payload does not fit its buffer");
  free(ts);
  return qcl_finish(c, "get_many", rc);
}

int qins_get_many_into(qins_client *c, const char *model, qins_get_req *reqs, int n,
                       qins_dtype dt) {
  int rc;
  QCL_RETRYING(c, "get_many", rc, qcl_get_many_into_once(c, model, reqs, n, dt));
  return rc;
}

static void *qcl_dest_alloc(void *ud, int idx, qins_tensor *t, uint64_t len, int *rc) {
  (void)ud, (void)idx;
  t->data = qcl_aligned(len);
  if (!t->data) *rc = QINS_ENOMEM;
  return t->data;
}

static int qcl_get_many_once(qins_client *c, const char *model, const char *const *names,
                             int n_names, const char *prefix, qins_dtype dt, qins_tensor **out,
                             size_t *n_out) {
  *out = NULL;
  *n_out = 0;
  if (!model || (names ? n_names <= 0 : !prefix))
    return qcl_fail(c, QINS_EINVALID, "get_many: give names or a prefix");
  qcl_begin(c, "get_many");
  int rc = qcl_pack_get_common(c, model, dt, 1);
  if (rc) return rc;
  if (names) {
    qp_pack_cstr(&c->pk, "names");
    msgpack_pack_array(&c->pk, (size_t)n_names);
    for (int i = 0; i < n_names; i++) qp_pack_cstr(&c->pk, names[i]);
  } else {
    qcl_pack_kv_str(c, "prefix", prefix);
  }
  if ((rc = qcl_call(c, "get_many"))) return rc;
  qins_tensor *ts = NULL;
  int count = 0;
  rc = qcl_parse_many(c, qcl_dest_alloc, NULL, &ts, -1, &count);
  rc = qcl_finish(c, "get_many", rc);
  if (rc) {
    qins_tensors_free(ts, (size_t)count);
    return rc;
  }
  for (int i = 0; i < count; i++)
    if (!ts[i].data && !(ts[i].data = qcl_aligned(0))) {
      qins_tensors_free(ts, (size_t)count);
      return qcl_fail(c, QINS_ENOMEM, "get_many: out of memory");
    }
  *out = ts;
  *n_out = (size_t)count;
  return 0;
}

int qins_get_many(qins_client *c, const char *model, const char *const *names, int n_names,
                  const char *prefix, qins_dtype dt, qins_tensor **out, size_t *n_out) {
  int rc;
  QCL_RETRYING(c, "get_many", rc,
               qcl_get_many_once(c, model, names, n_names, prefix, dt, out, n_out));
  return rc;
}

void qins_tensors_free(qins_tensor *t, size_t n) {
  if (!t) return;
  for (size_t i = 0; i < n; i++) free(t[i].data);
  free(t);
}

static int qcl_models_once(qins_client *c, qins_model_info **out, size_t *n_out) {
  *out = NULL;
  *n_out = 0;
  qcl_begin(c, "models");
  msgpack_pack_array(&c->pk, 0);
  int rc = qcl_call(c, "models");
  if (rc) return rc;
  /* The result is fully buffered (no bins): size one allocation for the array plus every
   * metadata string, bounded by the segment's bytes. */
  uint32_t n;
  qp_rd save = c->rd;
  if (qp_rd_array(&c->rd, &n)) return qcl_finish(c, "models", QINS_EPROTO);
  size_t seg = (size_t)(c->rd.end - c->rd.p);
  size_t bytes = (size_t)n * sizeof(qins_model_info) + seg + 1;
  qins_model_info *ms = calloc(1, bytes);
  if (!ms) {
    c->rd = save;
    return qcl_finish(c, "models", qcl_skip(c) ? QINS_EPROTO : QINS_ENOMEM);
  }
  char *strs = (char *)(ms + n), *strs_end = (char *)ms + bytes;
  for (uint32_t i = 0; i < n && !rc; i++) {
    uint32_t m;
    if (qp_rd_map(&c->rd, &m)) {
      rc = QINS_EPROTO;
      break;
    }
    for (uint32_t j = 0; j < m && !rc; j++) {
      const char *k;
      uint32_t kl;
      if (qp_rd_str(&c->rd, &k, &kl)) {
        rc = QINS_EPROTO;
        break;
      }
      qins_model_info *mi = &ms[i];
      uint64_t v;
      if (qcl_str_eq(k, kl, "name")) rc = qcl_rd_cstr(c, mi->name, sizeof mi->name);
      else if (qcl_str_eq(k, kl, "tensors")) rc = qp_rd_uint(&c->rd, &mi->tensors);
      else if (qcl_str_eq(k, kl, "n_elem")) rc = qp_rd_uint(&c->rd, &mi->n_elem);
      else if (qcl_str_eq(k, kl, "src_bytes")) rc = qp_rd_uint(&c->rd, &mi->src_bytes);
      else if (qcl_str_eq(k, kl, "stored_bytes")) rc = qp_rd_uint(&c->rd, &mi->stored_bytes);
      else if (qcl_str_eq(k, kl, "created")) {
        rc = qp_rd_uint(&c->rd, &v);
        mi->created = (int64_t)(v > INT64_MAX ? INT64_MAX : v);
      } else if (qcl_str_eq(k, kl, "metadata") && !qp_rd_is_nil(&c->rd)) {
        const char *s;
        uint32_t sl;
        rc = qp_rd_str(&c->rd, &s, &sl);
        if (!rc && (size_t)(strs_end - strs) > sl) {
          memcpy(strs, s, sl);
          strs[sl] = 0;
          mi->metadata = strs;
          strs += sl + 1;
        } else if (!rc) {
          rc = QINS_EPROTO;
        }
      } else rc = qcl_skip(c);
    }
  }
  rc = qcl_finish(c, "models", rc);
  if (rc) {
    free(ms);
    return rc;
  }
  *out = ms;
  *n_out = n;
  return 0;
}

int qins_models(qins_client *c, qins_model_info **out, size_t *n_out) {
  int rc;
  QCL_RETRYING(c, "models", rc, qcl_models_once(c, out, n_out));
  return rc;
}

/* Begins a paged request (list, model_info): params {model, sel_key: sel (when not NULL), offset,
 * limit (when > 0)}. */
static void qcl_begin_paged(qins_client *c, const char *method, const char *model,
                            const char *sel_key, const char *sel, uint64_t offset,
                            uint64_t limit) {
  qcl_begin(c, method);
  msgpack_pack_array(&c->pk, 1);
  msgpack_pack_map(&c->pk, (size_t)(2 + (sel != NULL) + (limit > 0)));
  qcl_pack_kv_str(c, "model", model);
  if (sel) qcl_pack_kv_str(c, sel_key, sel);
  qp_pack_cstr(&c->pk, "offset");
  msgpack_pack_uint64(&c->pk, offset);
  if (limit > 0) {
    qp_pack_cstr(&c->pk, "limit");
    msgpack_pack_uint64(&c->pk, limit);
  }
}

static int qcl_list_once(qins_client *c, const char *model, const char *prefix, uint64_t offset,
                         uint64_t limit, qins_tensor_info **out, size_t *n_out, uint64_t *total) {
  *out = NULL;
  *n_out = 0;
  if (!model) return qcl_fail(c, QINS_EINVALID, "list: NULL model");
  qcl_begin_paged(c, "list", model, "prefix", prefix, offset, limit);
  int rc = qcl_call(c, "list");
  if (rc) return rc;
  uint32_t n;
  qins_tensor_info *ts = NULL;
  uint32_t count = 0;
  if (qp_rd_map(&c->rd, &n)) return qcl_finish(c, "list", QINS_EPROTO);
  for (uint32_t i = 0; i < n && !rc; i++) {
    const char *k;
    uint32_t kl;
    if (qp_rd_str(&c->rd, &k, &kl)) {
      rc = QINS_EPROTO;
      break;
    }
    if (qcl_str_eq(k, kl, "total")) {
      uint64_t v;
      rc = qp_rd_uint(&c->rd, &v);
      if (!rc && total) *total = v;
    } else if (qcl_str_eq(k, kl, "tensors") && !ts) {
      if (qp_rd_array(&c->rd, &count)) {
        rc = QINS_EPROTO;
        break;
      }
      ts = calloc(count ? count : 1, sizeof *ts); /* count <= segment bytes: scanner-checked */
      if (!ts) rc = QINS_ENOMEM;
      for (uint32_t j = 0; j < count && !rc; j++) rc = qcl_parse_info(c, &ts[j]);
    } else {
      rc = qcl_skip(c);
    }
  }
  if (rc == QINS_ENOMEM) qcl_fail(c, rc, "list: out of memory");
  rc = qcl_finish(c, "list", rc);
  if (rc) {
    free(ts);
    return rc;
  }
  *out = ts;
  *n_out = count;
  return 0;
}

int qins_list(qins_client *c, const char *model, const char *prefix, uint64_t offset,
              uint64_t limit, qins_tensor_info **out, size_t *n_out, uint64_t *total) {
  int rc;
  QCL_RETRYING(c, "list", rc, qcl_list_once(c, model, prefix, offset, limit, out, n_out, total));
  return rc;
}

/* --- stats: any msgpack value rendered as JSON ---------------------------------------------- */

static int qcl_to_json(qins_client *c, qp_buf *s, int depth) {
  if (depth > QP_MAX_DEPTH * 4) return QINS_EPROTO;
  qp_rd *r = &c->rd;
  char num[64];
  uint32_t n;
  uint64_t u;
  int64_t i;
  double d;
  int b;
  const char *str;
  if (qp_rd_is_nil(r)) {
    qp_rd_nil(r);
    qp_put(s, "null", 4);
  } else if (qp_rd_bool(r, &b) == 0) {
    qp_put(s, b ? "true" : "false", b ? 4 : 5);
  } else if (qp_rd_uint(r, &u) == 0) {
    qp_put(s, num, (size_t)snprintf(num, sizeof num, "%llu", (unsigned long long)u));
  } else if (qp_rd_int(r, &i) == 0) {
    qp_put(s, num, (size_t)snprintf(num, sizeof num, "%lld", (long long)i));
  } else if (qp_rd_double(r, &d) == 0) {
    if (d != d || d - d != 0) qp_put(s, "null", 4); /* JSON has no NaN/Inf */
    else qp_put(s, num, (size_t)snprintf(num, sizeof num, "%.17g", d));
  } else if (qp_rd_str(r, &str, &n) == 0) {
    qp_json_str(s, str, n, QP_JSON_U);
  } else if (qp_rd_array(r, &n) == 0) {
    qp_put(s, "[", 1);
    for (uint32_t k = 0; k < n; k++) {
      if (k) qp_put(s, ",", 1);
      int rc = qcl_to_json(c, s, depth + 1);
      if (rc) return rc;
    }
    qp_put(s, "]", 1);
  } else if (qp_rd_map(r, &n) == 0) {
    qp_put(s, "{", 1);
    for (uint32_t k = 0; k < n; k++) {
      uint32_t kl;
      if (k) qp_put(s, ",", 1);
      if (qp_rd_str(r, &str, &kl) == 0) qp_json_str(s, str, kl, QP_JSON_U);
      else return QINS_EPROTO;
      qp_put(s, ":", 1);
      int rc = qcl_to_json(c, s, depth + 1);
      if (rc) return rc;
    }
    qp_put(s, "}", 1);
  } else {
    int rc = qcl_skip(c); /* bin, ext: not representable, shown as null */
    if (rc) return rc;
    qp_put(s, "null", 4);
  }
  return 0;
}

static int qcl_stats_once(qins_client *c, char **json) {
  *json = NULL;
  qcl_begin(c, "stats");
  msgpack_pack_array(&c->pk, 0);
  int rc = qcl_call(c, "stats");
  if (rc) return rc;
  qp_buf s = {0};
  rc = qcl_to_json(c, &s, 0);
  if (!rc && s.oom) rc = qcl_fail(c, QINS_ENOMEM, "stats: out of memory");
  rc = qcl_finish(c, "stats", rc);
  if (rc) {
    free(s.p);
    return rc;
  }
  *json = s.p;
  return 0;
}

int qins_stats(qins_client *c, char **json) {
  int rc;
  QCL_RETRYING(c, "stats", rc, qcl_stats_once(c, json));
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * For client/arena.c (qins_int.h): the call machinery, for methods kept in their own file. */

msgpack_packer *qcl__begin(qins_client *c, const char *method) {
  qcl_begin(c, method);
  return &c->pk;
}
int qcl__call(qins_client *c, const char *what) { return qcl_call(c, what); }
int qcl__finish(qins_client *c, const char *what, int rc) { return qcl_finish(c, what, rc); }
qp_rd *qcl__rd(qins_client *c) { return &c->rd; }
int qcl__skip(qins_client *c) { return qcl_skip(c); }
int qcl__sock(const qins_client *c) { return c->fd; }
qcl_arena **qcl__arena(qins_client *c) { return &c->arena; }
qins_conn_stats *qcl__stats(qins_client *c) { return &c->stats; }
int qcl__fail(qins_client *c, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  return code;
}

/* --- model_info: one page as JSON, or the whole metadata assembled -------------------------- */

/* The assembled metadata (qins_model_metadata): the members, the GGUF entries and the HF files,
 * each rendered as JSON while the pages are read. */
typedef struct qcl_meta {
  qp_buf flat, kv, hf;
  uint64_t version, total, n; /* gguf_version, entries in all, entries in this page */
  int gguf;
} qcl_meta;

/* One entry [key, type, value] or [key, type, nil, count] of a page into m. */
static int qcl_meta_entry(qins_client *c, qcl_meta *m) {
  uint32_t n, kl, tl;
  const char *k, *t;
  if (qp_rd_array(&c->rd, &n) || (n != 3 && n != 4) || qp_rd_str(&c->rd, &k, &kl) ||
      qp_rd_str(&c->rd, &t, &tl))
    return QINS_EPROTO;
  if (kl > 3 && !memcmp(k, "hf.", 3) && tl == 4 && !memcmp(t, "json", 4) && n == 3) {
    if (m->hf.n) qp_put(&m->hf, ",", 1);
    qp_json_str(&m->hf, k + 3, kl - 3, QP_JSON_U);
    qp_put(&m->hf, ":", 1);
    return qcl_to_json(c, &m->hf, 1);
  }
  qp_put(&m->kv, m->kv.n ? ",[" : "[", m->kv.n ? 2 : 1);
  qp_json_str(&m->kv, k, kl, QP_JSON_U);
  qp_put(&m->kv, ",", 1);
  qp_json_str(&m->kv, t, tl, QP_JSON_U);
  for (uint32_t i = 2; i < n; i++) {
    qp_put(&m->kv, ",", 1);
    int rc = qcl_to_json(c, &m->kv, 1);
    if (rc) return rc;
  }
  qp_put(&m->kv, "]", 1);
  return 0;
}

/* One model_info call. m NULL: the result rendered as JSON into *json; else accumulated into m. */
static int qcl_model_info_once(qins_client *c, const char *model, const char *key,
                               uint64_t offset, uint64_t limit, char **json, qcl_meta *m) {
  if (json) *json = NULL;
  if (!model) return qcl_fail(c, QINS_EINVALID, "model_info: NULL model");
  qcl_begin_paged(c, "model_info", model, "key", key, offset, limit);
  int rc = qcl_call(c, "model_info");
  if (rc) return rc;
  qp_buf s = {0};
  if (!m) {
    rc = qcl_to_json(c, &s, 0);
  } else {
    uint32_t n;
    m->n = 0;
    if (qp_rd_map(&c->rd, &n)) rc = QINS_EPROTO;
    for (uint32_t i = 0; i < n && !rc; i++) {
      const char *k;
      uint32_t kl, ne, nm;
      if (qp_rd_str(&c->rd, &k, &kl)) {
        rc = QINS_EPROTO;
      } else if (qcl_str_eq(k, kl, "metadata") && offset == 0) {
        if (qp_rd_map(&c->rd, &nm)) rc = QINS_EPROTO;
        for (uint32_t j = 0; j < nm && !rc; j++) { /* the members, without the braces */
          const char *mk;
          uint32_t mkl;
          if (qp_rd_str(&c->rd, &mk, &mkl)) rc = QINS_EPROTO;
          if (rc) break;
          if (m->flat.n) qp_put(&m->flat, ",", 1);
          qp_json_str(&m->flat, mk, mkl, QP_JSON_U);
          qp_put(&m->flat, ":", 1);
          rc = qcl_to_json(c, &m->flat, 1);
        }
      } else if (qcl_str_eq(k, kl, "gguf_version")) {
        m->gguf = 1;
        rc = qp_rd_uint(&c->rd, &m->version);
      } else if (qcl_str_eq(k, kl, "total")) {
        rc = qp_rd_uint(&c->rd, &m->total);
      } else if (qcl_str_eq(k, kl, "entries")) {
        if (qp_rd_array(&c->rd, &ne)) rc = QINS_EPROTO;
        for (uint32_t j = 0; j < ne && !rc; j++, m->n++) rc = qcl_meta_entry(c, m);
      } else {
        rc = qcl_skip(c);
      }
    }
  }
  if (!rc && (s.oom || (m && (m->flat.oom || m->kv.oom || m->hf.oom))))
    rc = qcl_fail(c, QINS_ENOMEM, "model_info: out of memory");
  rc = qcl_finish(c, "model_info", rc);
  if (rc || m) {
    free(s.p);
    return rc;
  }
  *json = s.p;
  return 0;
}

int qins_model_info_page(qins_client *c, const char *model, const char *key, uint64_t offset,
                         uint64_t limit, char **json) {
  int rc;
  QCL_RETRYING(c, "model_info", rc, qcl_model_info_once(c, model, key, offset, limit, json, NULL));
  return rc;
}

int qins_model_metadata(qins_client *c, const char *model, char **json) {
  *json = NULL;
  qcl_meta m = {0};
  int rc = 0;
  uint64_t off = 0;
  do {
    QCL_RETRYING(c, "model_info", rc, qcl_model_info_once(c, model, NULL, off, 0, NULL, &m));
    if (!rc && m.n == 0 && off < m.total)
      rc = qcl_fail(c, QINS_EPROTO, "model_info: an empty page at entry %llu of %llu",
                    (unsigned long long)off, (unsigned long long)m.total);
    off += m.n;
  } while (!rc && off < m.total);
  qp_buf s = {0};
  char num[64];
  qp_put(&s, "{", 1);
  qp_put(&s, m.flat.p ? m.flat.p : "", m.flat.n);
  if (m.gguf) {
    qp_put(&s, num, (size_t)snprintf(num, sizeof num, "%s\"gguf\":{\"version\":%llu,\"kv\":[",
                                       m.flat.n ? "," : "", (unsigned long long)m.version));
    qp_put(&s, m.kv.p ? m.kv.p : "", m.kv.n);
    qp_put(&s, "]}", 2);
  }
  if (m.hf.n) {
    qp_put(&s, ",\"hf\":{" + !(m.flat.n || m.gguf), 7 - !(m.flat.n || m.gguf));
    qp_put(&s, m.hf.p, m.hf.n);
    qp_put(&s, "}", 1);
  }
  qp_put(&s, "}", 1);
  free(m.flat.p);
  free(m.kv.p);
  free(m.hf.p);
  if (!rc && s.oom) rc = qcl_fail(c, QINS_ENOMEM, "model_info: out of memory");
  if (rc) {
    free(s.p);
    return rc;
  }
  *json = s.p;
  return 0;
}
