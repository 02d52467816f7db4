/* SPDX-License-Identifier: MIT */
/*
 * reply.h — the one way a method (methods.c) or a decode job (job.c) answers a request. The
 * connection layer implements it (out.c the replies and streams; conn.c the deferral count,
 * which its backpressure reads) and decides how the bytes go out: written now when the
 * socket takes them, else queued in libuv's write queue, held while a stream owns the
 * connection, or played to a sink (embedded connections). Nothing here hands out a socket, a
 * cond or a libuv handle. Loop thread only, except qd_stream_lend and qd_stream_send (the
 * stream's pool thread).
 *
 * Deliveries:
 *  - a small reply: packed bytes, copied or taken over (qd_reply_copy, qd_reply);
 *  - a head with payload pieces (qd_reply with a qd_payload): the pieces go out as iovecs after
 *    the head (writev), never copied into it; an owned payload buffer is released after the write;
 *  - an error (qd_reply_err): logged naming the client, counted;
 *  - a stream (qd_stream_*): a large answer whose pieces a pool job produces while they are sent.
 * A further delivery path (docs/qinsd.md, "Adding a delivery path") is one more function here and
 * one more case in out.c: e.g. a small reply that carries an fd (SCM_RIGHTS on its bytes), and
 * per-connection resources released when the connection is freed (conn.c, qd_conn_free).
 */
#ifndef QINS_REPLY_H
#define QINS_REPLY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <msgpack.h>

#include "proto.h"

typedef struct qd_conn qd_conn;

/* One request being answered. Lives on the stack for inline methods; get/get_many copy what they
 * need into a job (job.c). */
#define QD_PARAM_KEYS 8 /* params keys indexed per request (methods take at most 6) */
typedef struct qd_req {
  qd_conn *conn;                 /* the client (opaque here) */
  uint32_t msgid;                /* echoed in the response */
  int method;                    /* index in qd_methods */
  qp_rd params;                  /* the named-argument map in the request bytes (read with qp_rd_*
                                    after qp_scan validated the message); params.p is NULL when
                                    params is [] */
  int n_keys;                    /* str keys of params indexed below in map order, or -1 when
                                    there were more than QD_PARAM_KEYS (lookups then walk it) */
  struct {
    const char *k;               /* key bytes (in the request; not NUL-terminated) */
    uint32_t kl;
    const uint8_t *v;            /* its value */
  } keys[QD_PARAM_KEYS];
  uint64_t t0;                   /* qd_now_ns() at dispatch */
  char msg[1200];                /* error message set by a handler that returns an error */
} qd_req;

uint64_t qd_conn_id(const qd_conn *c);
uid_t qd_conn_uid(const qd_conn *c);
const char *qd_conn_desc(const qd_conn *c); /* "client 7 (pid 123 uid 1000)" */

/* Payload pieces sent after a packed head. */
typedef struct qd_payload {
  size_t head_len;     /* bytes of the sbuffer sent first (0: all of it); pieces may point further in */
  struct iovec *bufs;  /* header/payload pieces to writev, in order, after the packed prefix */
  unsigned nbufs;      /* count */
  void *owned;         /* buffer released (qd_buf_release) after the write; may be NULL */
  size_t owned_cap;    /* its capacity */
} qd_payload;
/* Sends a packed response (sb's buffer is taken over; sb is left empty) and records latency.
 * pl (may be NULL) describes pieces after the head; its owned buffer is the server's from then on. */
void qd_reply(qd_req *r, msgpack_sbuffer *sb, const qd_payload *pl /* may be NULL */);
/* Sends a packed response (sb taken over, as qd_reply) with fd passed as SCM_RIGHTS on its first
 * byte (the fd is not taken over: it must stay open until the daemon exits). Ordered like any
 * reply; it waits until nothing is queued before it, and later replies wait behind it. An
 * embedded connection gets the bytes alone. */
void qd_reply_fd(qd_req *r, msgpack_sbuffer *sb, int fd);
/* Sends the n packed response bytes at p (not taken over: written now if the socket takes them
 * all, else the rest is copied and queued) and records latency. */
void qd_reply_copy(qd_req *r, const char *p, size_t n);
/* Sends [1, msgid, [code, message], nil], logs it naming the client, counts it. */
void qd_reply_err(qd_req *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* A request answered later (thread pool): the connection keeps a slot for it and counts `bytes`
 * (its planned response) against its write queue until qd_req_done_deferred. */
void qd_req_defer(qd_req *r, uint64_t bytes);
/* Adds bytes to a deferred request's reservation (its plan, made on the pool, is known). */
void qd_req_reserve(qd_conn *c, uint64_t bytes);
/* Releases the reservation (call before queueing the reply, so it is not counted twice). */
void qd_req_unreserve(qd_conn *c, uint64_t bytes);
/* The deferred request is answered: the connection may read again, or is freed if it closed. */
void qd_req_done_deferred(qd_conn *c);

/* ---- streams: a large answer sent while a pool job produces it --------------------------------
 * Streams of one connection take turns, in order; while one holds the turn every other reply to
 * that connection is held and sent after it, so answers never interleave. For speed the stream's
 * pool thread writes its pieces itself while the connection is in its lent state (out.c: entered
 * in one place once the turn is held and libuv's queue is empty, left in qd_stream_worker_done).
 *
 *   loop:  s = qd_stream_open(r, complete, ud)                  then queue the work
 *   pool:  if (qd_stream_lend(s, deadline)) qd_stream_send(s, ...) ... ; else buffer the rest
 *   loop:  if (qd_stream_worker_done(s, bytes_sent, want_turn)) complete(ud)   after the work
 *   loop:  complete(ud): qd_stream_write(s, rest...) and/or qd_stream_close(s, broken)
 */
typedef struct qd_stream qd_stream;
/* NULL when out of memory. complete(ud) runs on the loop when the worker is done and the stream's
 * turn comes later than that (see qd_stream_worker_done), or the connection closes. */
qd_stream *qd_stream_open(qd_req *r, void (*complete)(void *ud), void *ud);
/* Pool thread: asks for the socket and waits until deadline (qd_now_ns) for it. 1: this thread
 * may qd_stream_send until qd_stream_worker_done; 0: no socket (closing, embedded, or the
 * deadline passed): the worker buffers its answer for qd_stream_write. */
int qd_stream_lend(qd_stream *s, uint64_t deadline);
/* Pool thread, while lent: sends n bytes, waiting for room until deadline; *sent counts what
 * went. 0: all sent; 1: the deadline passed; -1: the socket failed (errno set). */
int qd_stream_send(qd_stream *s, const void *p, size_t n, uint64_t deadline, uint64_t *sent);
/* Loop: the worker finished, having sent `sent` bytes itself. Ends the lent state. 1: the caller
 * completes the stream now; 0: complete(ud) runs when the stream's turn comes (want_turn: bytes
 * are left to send, so the stream needs its turn). */
int qd_stream_worker_done(qd_stream *s, uint64_t sent, int want_turn);
/* Loop, from complete: queues head (taken over, may be NULL) and piece [p, p + n), which lies in
 * `owned` (released after the write; may be NULL). */
void qd_stream_write(qd_stream *s, char *head, size_t head_len, const void *p, size_t n,
                     void *owned, size_t owned_cap);
/* Loop, from complete: ends the stream (its turn passes on) and frees it; broken (an error after
 * its head went out) closes the connection. */
void qd_stream_close(qd_stream *s, int broken);

#endif /* QINS_REPLY_H */
