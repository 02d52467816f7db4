/* SPDX-License-Identifier: MIT */
/*
 * conn.h — the connection layer (conn.c: reading, framing, dispatch, life, and reply.h's deferral
 * count; out.c: the write side, the rest of reply.h), as the readiness loop (loop.c) sees it, plus
 * the connection struct the two halves share. Loop thread only.
 *
 * A connection's state (conn_state), and its transitions, all made by conn_set_state (conn.c):
 *
 *   accept --> PAUSED <--> READING            backpressure (conn_update_reading)
 *                 |          |
 *                 +----+-----+
 *                      v
 *                  DRAINING                   takes no more requests: the client's end of stream
 *                      |                      with nothing complete left, a protocol error, a
 *                      |                      refusal (BUSY/DENIED), shutdown; in-flight answers
 *                      v                      finish and flush first (conn_maybe_close)
 *   (any of the above) --> CLOSING            handle closing; queued and future writes dropped
 *                      v
 *                   CLOSED                    close callback ran; freed once no job refers to it
 *
 * Its output (who writes the socket; out.c), orthogonal to the above:
 *   OUT_QUEUE  replies are written now (uv_try_write) or through libuv's write queue;
 *   OUT_STREAM a stream holds the connection's turn: other replies are held until it ends;
 *   OUT_LENT   the stream's pool thread writes the socket itself: entered only in stream_lend
 *              (the turn is held and libuv's queue is empty), left only in
 *              qd_stream_worker_done. Closing meanwhile shuts the socket down (the worker's next
 *              write fails) and closes the handle when the state is left.
 */
#ifndef QINS_CONN_H
#define QINS_CONN_H

#include "qinsd.h"
#include "reply.h"

typedef enum conn_state {
  CONN_PAUSED = 0, /* not read for now (just accepted, or backpressure); dispatches what is buffered */
  CONN_READING,    /* in the read set and read */
  CONN_DRAINING,   /* takes no more requests; closes once nothing is pending or queued */
  CONN_CLOSING,    /* uv_close called */
  CONN_CLOSED,     /* close callback ran */
} conn_state;

typedef enum out_state { OUT_QUEUE = 0, OUT_STREAM, OUT_LENT } out_state;

typedef struct wreq wreq;
struct qd_conn {
  uv_pipe_t pipe;      /* the client socket; pipe.data = this */
  uint64_t id;         /* client number, from 1, for logs */
  pid_t pid;           /* SO_PEERCRED at connect (logged only, never trusted) */
  uid_t uid;           /* SO_PEERCRED: decides admin rights */
  gid_t gid;           /* SO_PEERCRED */
  char desc[96];       /* "client 7 (pid 123 uid 1000)" */
  conn_state state;    /* see above; conn_set_state */
  int refused;         /* turned away (BUSY/DENIED): never counted as an open connection */
  int eof;             /* the client shut down its side: answer what is buffered, then drain */
  uint64_t active_ns;  /* when bytes last came or it was last seen busy (idle-timeout-ms) */
  struct qd_conn *prev, *next; /* all connections (qd_srv.cn.all) */
  /* read side (conn.c) */
  char *buf;           /* read buffer; unparsed bytes are [rpos, wpos) */
  size_t cap, rpos, wpos;
  qp_scan scan;        /* the request being framed, starting at buf + rpos */
  unsigned pending;    /* requests dispatched but not yet answered (pool jobs) */
  uint64_t reserved;   /* planned response bytes of those pending requests */
  int fd;              /* the socket, while in the read set; else -1 */
  int in_read;         /* inside qd_conn_read (no nested reads) */
  uint64_t turn_work;  /* work its requests cost in this turn (conn.c, fair turns) */
  int yield;           /* its turn's work ran out with requests buffered: on the again list */
  /* read scheduling (loop.c) */
  int again;           /* on the again list: its read budget ran out with bytes left */
  int again_all;       /* its read `all`, for the next turn */
  struct qd_conn *again_prev, *again_next;
  /* write side (out.c) */
  out_state out;       /* see above */
  size_t queued;       /* memory held by its responses not yet written (wreq cost) */
  struct qd_stream *turns; /* streams waiting for their turn, in order */
  struct qd_stream *drain_wait; /* the stream waiting for libuv's queue to empty (stream_lend) */
  wreq *held_head, *held_tail; /* writes held while a stream has the turn, in order */
  wreq *fd_wait, *fd_wait_tail; /* writes parked behind an fd reply (out.c, qd_reply_fd) */
  qd_sink_fn sink;       /* embedded connection (qd_serve_bytes): response bytes go here, no socket */
  void *sink_ud;       /* its argument */
};

/* ---- conn.c ---------------------------------------------------------------------------------- */
/* A client connected on the listener: accepts it, checks its credentials and limits, and starts
 * reading it (or refuses it). */
void qd_conn_accept(uv_stream_t *listener);
/* The connection limit in force: max-connections, or fewer when the fd limit allows fewer
 * (loop.c's fd_conns, less the few kept to answer BUSY). */
uint64_t qd_conn_limit(void);
/* Reads what c's socket holds, while c wants requests (edge-triggered: until drained, EAGAIN, or
 * RSET_READ_BUDGET bytes, after which it goes on the loop's again list); `all`: until EAGAIN or
 * end of stream (hang-up seen, or an edge may have been missed). */
void qd_conn_read(qd_conn *c, int all);
/* Frames and dispatches what is buffered, as far as backpressure allows; then closes c if it has
 * drained. Called when something that held it back is gone (an answer written, a job done,
 * shutdown). */
void qd_conn_resume(qd_conn *c);
/* Closes c (idempotent): leaves the read set, drops held writes, wakes its waiting streams. */
void qd_conn_close(qd_conn *c);
/* Takes no more requests; closes once nothing is pending or queued. */
void qd_conn_drain(qd_conn *c);
/* The socket's handle closed (uv_close callback). */
void qd_conn_on_closed(uv_handle_t *h);
/* Frees a closed connection no job refers to. */
void qd_conn_free(qd_conn *c);
/* 1 while c reads and dispatches requests (state and backpressure). */
int qd_conn_can_dispatch(const qd_conn *c);
/* nread bytes arrived in c's buffer at wpos, or nread is UV_EOF or a (negative) read error. */
void qd_conn_on_bytes(qd_conn *c, ssize_t nread);
/* Room for the next read at c's wpos (an empty buffer when max-request-bytes is used up). */
void qd_conn_alloc(qd_conn *c, uv_buf_t *out);
/* A new connection in the list, numbered, with its framing set up (state PAUSED). */
qd_conn *qd_conn_new(void);
/* Closes connections idle (nothing pending, queued or streaming) for idle-timeout-ms (the tick). */
void qd_conn_sweep_idle(uint64_t now_ns);

/* ---- out.c ----------------------------------------------------------------------------------- */
/* Sends a protocol-level error (framing, refusal) with msgid, and counts it. */
void qd_out_error(qd_conn *c, uint32_t msgid, int code, const char *msg);
/* Closing: held writes are dropped; a lent socket is shut down; waiting streams are woken (they
 * find the connection closing). 1 if the handle may be closed now, 0 if the lent state closes it. */
int qd_out_close(qd_conn *c);

/* ---- loop.c (registration: a connection joins or leaves the loop's read set) ----------------- */
int qd_loop_watch(qd_conn *c);      /* adds c's socket to the read set: 0, or -1 (logged) */
void qd_loop_unwatch(qd_conn *c);   /* removes it (before its fd can be closed), and from again */
void qd_loop_again(qd_conn *c, int all); /* c used its read budget: read it again next round */
void qd_loop_touch(void);           /* libuv was given a watcher or a close: run it before waiting */
void qd_loop_conn_freed(void);      /* a connection was freed: shutdown ends when none is left */

#endif /* QINS_CONN_H */
