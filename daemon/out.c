/* SPDX-License-Identifier: MIT */
/*
 * out.c — connections, write side: the only code that writes to a client socket. Implements
 * reply.h's replies and streams (its deferral accounting is conn.c's) over each connection's
 * output state (conn.h):
 *
 *   OUT_QUEUE   a reply is written at once when nothing is queued before it and the socket takes
 *               it (uv_try_write: one writev, no request, no POLLOUT round trip); the rest goes to
 *               libuv's write queue (uv_write), flushed by the loop.
 *   OUT_STREAM  a stream holds the connection's turn: other replies are held, in order, and
 *               submitted when it closes; later streams wait their turn (c->turns).
 *   OUT_LENT    the stream's pool thread writes the socket itself (send + poll, no copy into
 *               libuv's queue): entered in stream_lend only, left in qd_stream_worker_done only.
 *
 * The lent state is a hand-off between two threads through the stream's grant (under its mutex):
 * the worker asks (qd_stream_lend: G_WANT, async to the loop, waits on the cond until a deadline),
 * the loop answers once the stream holds the turn and libuv's queue is empty (G_FD with the fd, or
 * G_NOSOCK), or the worker stops waiting (G_GAVEUP) and buffers its answer instead. While lent,
 * the loop writes nothing to the socket and does not close it: closing shuts it down (the
 * worker's next write fails) and the handle closes when the lent state is left.
 *
 * Write cost: a queued write counts the memory it holds (itself, its head, its payload buffer)
 * against the connection's write-queue-bytes (conn.c's backpressure), not the bytes it sends:
 * 100,000 queued 13-byte pongs must not hold 100,000 8 KiB sbuffers.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"
#include "methods.h"

struct wreq {
  uv_write_t req;  /* libuv request; req.data unused */
  qd_conn *c;      /* connection written to */
  size_t bytes;    /* bytes of bufs still to write */
  size_t cost;     /* memory it holds (itself, head, payload): counted in c->queued until freed */
  char *head;      /* packed prefix (sbuffer data, malloc'd), or NULL (none, or copied inline) */
  void *owned;     /* payload buffer released after the write, or NULL */
  size_t owned_cap;
  struct wreq *next; /* held writes (while a stream has the turn), or parked ones (fd_wait) */
  int pass_fd;     /* an fd to pass (SCM_RIGHTS) with the first byte, or -1 (qd_reply_fd) */
  unsigned nbufs;
  uv_buf_t bufs[]; /* head, then payload pieces */
};

/* Frees a write request and what it owns. */
static void wreq_free(wreq *w) {
  free(w->head);
  qd_buf_release(w->owned, w->owned_cap);
  free(w);
}

/* w leaves c's queue: what it held is no longer counted. */
static void wreq_uncount(qd_conn *c, wreq *w) {
  c->queued -= w->cost;
  qd_queued_sub(w->cost);
}

static int conn_gone(const qd_conn *c) { return c->state == CONN_CLOSING || c->state == CONN_CLOSED; }

static void stream_lend(qd_stream *s);
static void out_release_parked(qd_conn *c);
static void wreq_submit(qd_conn *c, wreq *w);

/* ---- fd replies (qd_reply_fd) -----------------------------------------------------------------
 * The fd travels as SCM_RIGHTS with the reply's first byte, so that byte must be written by a
 * sendmsg of ours, never by libuv's queue: such a write waits (parked in c->fd_wait, and every
 * later write of c behind it, in order) until libuv's queue is empty, then goes out through
 * sendmsg; the rest of it, if the socket took only part, is queued as usual. A socket full with
 * an empty libuv queue (the client reads nothing) is retried by one timer every FD_RETRY_MS while
 * any write is parked that way. */
#define FD_RETRY_MS 2
static uv_timer_t fd_timer;
static int fd_timer_on;

static void park(qd_conn *c, wreq *w) {
  w->next = NULL;
  if (c->fd_wait_tail) c->fd_wait_tail->next = w;
  else c->fd_wait = w;
  c->fd_wait_tail = w;
}

/* libuv's queue of c may have emptied: parked writes go, then a stream waiting for the socket. */
static void out_drained(qd_conn *c) {
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) > 0) return;
  if (c->fd_wait) out_release_parked(c);
  if (c->drain_wait && !c->fd_wait && uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) == 0) {
    qd_stream *s = c->drain_wait;
    c->drain_wait = NULL;
    stream_lend(s);
  }
}

static void fd_timer_cb(uv_timer_t *t) {
  int any = 0;
  for (qd_conn *c = qd_srv.cn.all; c; c = c->next)
    if (c->fd_wait) {
      out_drained(c);
      any |= c->fd_wait != NULL;
    }
  if (!any) {
    uv_timer_stop(t);
    fd_timer_on = 0;
  }
}

static void fd_timer_arm(void) {
  if (fd_timer_on) return;
  if (!fd_timer.loop) uv_timer_init(qd_srv.loop, &fd_timer), uv_unref((uv_handle_t *)&fd_timer);
  uv_timer_start(&fd_timer, fd_timer_cb, FD_RETRY_MS, FD_RETRY_MS);
  fd_timer_on = 1;
  qd_loop_touch();
}

/* sendmsg of w's first buffer with w->pass_fd: bytes sent (the fd went with them), 0 when the
 * socket is full, -1 on failure (logged). */
static ssize_t out_sendmsg_fd(qd_conn *c, wreq *w) {
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&c->pipe, &fd)) return -1;
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(sizeof(int))];
  } ctl;
  memset(&ctl, 0, sizeof ctl);
  struct iovec iov = {w->bufs[0].base, w->bufs[0].len};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                     .msg_controllen = sizeof ctl.b};
  struct cmsghdr *h = CMSG_FIRSTHDR(&m);
  h->cmsg_level = SOL_SOCKET;
  h->cmsg_type = SCM_RIGHTS;
  h->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(h), &w->pass_fd, sizeof(int));
  for (;;) {
    ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      qd_srv.st.bytes_served += (size_t)n;
      return n;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    qd_log(QD_LOG_VERBOSE, "%s: passing a file descriptor failed: %s", c->desc, strerror(errno));
    return -1;
  }
}

/* Submits a detached list of writes, in order. */
static void submit_all(qd_conn *c, wreq *w) {
  while (w) {
    wreq *next = w->next;
    wreq_submit(c, w);
    w = next;
  }
}

/* Submits the parked writes again, in order (the first may park again, and the rest behind it). */
static void out_release_parked(qd_conn *c) {
  wreq *w = c->fd_wait;
  c->fd_wait = c->fd_wait_tail = NULL;
  submit_all(c, w);
}

static void on_write(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  qd_conn *c = w->c;
  wreq_uncount(c, w);
  if (status == 0) {
    qd_srv.st.bytes_served += w->bytes;
  } else if (status != UV_ECANCELED) {
    qd_log(QD_LOG_VERBOSE, "%s: write failed: %s (%zu bytes dropped)", c->desc, uv_strerror(status),
           w->bytes);
    qd_conn_close(c);
  }
  wreq_free(w);
  out_drained(c);
  qd_conn_resume(c); /* room in the queue: c may read again, or close once drained */
}

/* Writes what the socket takes now of bufs, queueing nothing: the bytes written (counted as
 * served), 0 when none fit, -1 when the socket failed (logged; the caller closes c). */
__attribute__((hot))
static ssize_t out_try_write(qd_conn *c, const uv_buf_t *bufs, unsigned nbufs) {
  int n = uv_try_write((uv_stream_t *)&c->pipe, bufs, nbufs);
  if (n >= 0) {
    qd_srv.st.bytes_served += (size_t)n;
    return n;
  }
  if (n == UV_EAGAIN) return 0;
  qd_log(QD_LOG_VERBOSE, "%s: write failed: %s", c->desc, uv_strerror(n));
  return -1;
}

/* Sends w: at once if the socket takes it, the rest through libuv (counted in c->queued until
 * on_write); dropped when c is closing; played to the sink when embedded. */
static void wreq_submit(qd_conn *c, wreq *w) {
  if (conn_gone(c)) { /* the client left while this was being computed */
    wreq_uncount(c, w);
    wreq_free(w);
    return;
  }
  if (c->sink) { /* embedded (qd_serve_bytes): the whole write is delivered at once */
    for (unsigned i = 0; i < w->nbufs; i++) c->sink(c->sink_ud, w->bufs[i].base, w->bufs[i].len);
    wreq_uncount(c, w);
    qd_srv.st.bytes_served += w->bytes;
    wreq_free(w);
    return;
  }
  if (c->fd_wait) { /* behind a parked fd reply */
    park(c, w);
    return;
  }
  ssize_t n;
  if (w->pass_fd >= 0) {
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) > 0) {
      park(c, w); /* released by on_write once the queue is empty */
      return;
    }
    n = out_sendmsg_fd(c, w);
    if (n == 0) {
      park(c, w);
      fd_timer_arm();
      return;
    }
    if (n > 0) w->pass_fd = -1;
  } else {
    /* With nothing queued, write now (uv_try_write fails with EAGAIN while libuv has writes
     * queued, so order holds). */
    n = out_try_write(c, w->bufs, w->nbufs);
  }
  if (n < 0) {
    wreq_uncount(c, w);
    wreq_free(w);
    qd_conn_close(c);
    return;
  }
  if ((size_t)n == w->bytes) {
    wreq_uncount(c, w);
    wreq_free(w);
    return;
  }
  if (n > 0) { /* partial: queue the rest */
    size_t skip = (size_t)n;
    unsigned i = 0;
    while (i < w->nbufs && skip >= w->bufs[i].len) skip -= w->bufs[i++].len;
    w->bufs[i].base += skip;
    w->bufs[i].len -= skip;
    memmove(w->bufs, w->bufs + i, (w->nbufs - i) * sizeof *w->bufs);
    w->nbufs -= i;
    w->bytes -= (size_t)n;
  }
  int rc = uv_write(&w->req, (uv_stream_t *)&c->pipe, w->bufs, w->nbufs, on_write);
  qd_loop_touch();
  if (rc) {
    wreq_uncount(c, w);
    qd_log(QD_LOG_VERBOSE, "%s: write failed: %s", c->desc, uv_strerror(rc));
    wreq_free(w);
    qd_conn_close(c);
  }
}

/* Builds a write of head (taken over, head_cap bytes allocated; may be NULL) + pieces, and
 * submits it, or holds it while a stream has the turn (stream = 0) so that responses never
 * interleave. A small head with no pieces (pieces may point into a head) is copied into the
 * request itself; a larger one is shrunk to its length. */
#define WREQ_INLINE_HEAD 256
static int out_next_fd = -1; /* the fd the next out_send passes (qd_reply_fd), or -1 */
static void out_send(qd_conn *c, char *head, size_t head_len, size_t head_cap,
                     const struct iovec *pieces, unsigned np, void *owned, size_t owned_cap,
                     int stream) {
  size_t inl = head && np == 0 && head_len <= WREQ_INLINE_HEAD ? head_len : 0;
  size_t wsize = sizeof(wreq) + (1 + np) * sizeof(uv_buf_t) + inl;
  wreq *w = malloc(wsize);
  if (!w) {
    qd_log(QD_LOG_WARNING, "%s: out of memory queueing a response; closing", c->desc);
    free(head);
    qd_buf_release(owned, owned_cap);
    qd_conn_close(c);
    return;
  }
  if (inl) { /* the request's own bytes now hold the head */
    char *h = (char *)(w->bufs + 1 + np);
    memcpy(h, head, head_len);
    free(head);
    head = h;
    head_cap = 0;
  } else if (head && np == 0 && head_cap > head_len) {
    char *h = realloc(head, head_len ? head_len : 1);
    if (h) {
      head = h;
      head_cap = head_len;
    }
  }
  w->c = c;
  w->head = inl ? NULL : head;
  w->owned = owned;
  w->owned_cap = owned_cap;
  w->next = NULL;
  w->pass_fd = -1;
  w->nbufs = 0;
  w->bytes = 0;
  if (head) {
    w->bufs[w->nbufs++] = uv_buf_init(head, (unsigned)head_len);
    w->bytes += head_len;
  }
  w->cost = wsize + head_cap + (owned ? owned_cap : 0);
  for (unsigned i = 0; i < np; i++) {
    w->bufs[w->nbufs++] = uv_buf_init(pieces[i].iov_base, (unsigned)pieces[i].iov_len);
    w->bytes += pieces[i].iov_len;
    uintptr_t b = (uintptr_t)pieces[i].iov_base, h = (uintptr_t)head, o = (uintptr_t)owned;
    int in_head = head && b >= h && b < h + head_cap; /* bytes outside head and owned are */
    int in_owned = owned && b >= o && b < o + owned_cap; /* held for this write (streams) */
    if (!in_head && !in_owned) w->cost += pieces[i].iov_len;
  }
  c->queued += w->cost;
  qd_queued_add(w->cost);
  w->pass_fd = out_next_fd;
  out_next_fd = -1;
  if (c->out != OUT_QUEUE && !stream && !conn_gone(c)) {
    if (c->held_tail) c->held_tail->next = w;
    else c->held_head = w;
    c->held_tail = w;
    return;
  }
  wreq_submit(c, w);
}

/* Submits (or, when the connection is closing, drops) the writes held during a stream. */
static void out_release_held(qd_conn *c) {
  wreq *w = c->held_head;
  c->held_head = c->held_tail = NULL;
  submit_all(c, w);
}

/* ---- replies (reply.h) ------------------------------------------------------------------------ */
void qd_reply(qd_req *r, msgpack_sbuffer *sb, const qd_payload *pl) {
  qd_latency_record(r->t0);
  size_t len = pl && pl->head_len ? pl->head_len : sb->size, cap = sb->alloc;
  char *head = msgpack_sbuffer_release(sb);
  out_send(r->conn, head, len, cap, pl ? pl->bufs : NULL, pl ? pl->nbufs : 0,
           pl ? pl->owned : NULL, pl ? pl->owned_cap : 0, 0);
}

void qd_reply_fd(qd_req *r, msgpack_sbuffer *sb, int fd) {
  qd_latency_record(r->t0);
  size_t len = sb->size, cap = sb->alloc;
  char *head = msgpack_sbuffer_release(sb);
  out_next_fd = r->conn->sink ? -1 : fd; /* embedded: the bytes alone */
  out_send(r->conn, head, len, cap, NULL, 0, NULL, 0, 0);
  out_next_fd = -1;
}

__attribute__((hot))
void qd_reply_copy(qd_req *r, const char *p, size_t n) {
  qd_conn *c = r->conn;
  qd_latency_record(r->t0);
  /* Nothing queued or held before it: write now, from p. */
  if (c->out == OUT_QUEUE && !conn_gone(c) && !c->sink && c->queued == 0) {
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    ssize_t k = out_try_write(c, &b, 1);
    if (k < 0) {
      qd_conn_close(c);
      return;
    }
    p += k;
    n -= (size_t)k;
    if (n == 0) return;
  }
  char *h = malloc(n); /* the rest is queued (or held, or played to the sink) like any response */
  if (!h) {
    qd_log(QD_LOG_WARNING, "%s: out of memory queueing a response; closing", c->desc);
    qd_conn_close(c);
    return;
  }
  memcpy(h, p, n);
  out_send(c, h, n, n, NULL, 0, NULL, 0, 0);
}

void qd_out_error(qd_conn *c, uint32_t msgid, int code, const char *msg) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  char esc[1024]; /* what a message echoes of a request stays a valid msgpack str */
  qd_escape(esc, sizeof esc, msg, strlen(msg));
  qp_pack_response_err(&pk, msgid, code, "%s", esc);
  size_t len = sb.size, cap = sb.alloc;
  out_send(c, msgpack_sbuffer_release(&sb), len, cap, NULL, 0, NULL, 0, 0);
  qd_count_error(code);
}

void qd_reply_err(qd_req *r, int code, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  const char *m = r->method >= 0 ? qd_methods[r->method].name : "?";
  int level = code == QINS_EINTERNAL || code == QINS_ECORRUPT || code == QINS_ECHECKSUM ||
                      code == QINS_EDENIED
                  ? QD_LOG_WARNING
                  : QD_LOG_VERBOSE;
  if (code == QINS_ECHECKSUM || code == QINS_ECORRUPT) /* alerts: never rate-limited */
    qd_log(level, "%s: %s (msgid %u): %s: %s", r->conn->desc, m, r->msgid, qins_err_name(code), msg);
  else
    qd_log_rl(level, qins_err_name(code), (uint32_t)r->conn->uid, "%s: %s (msgid %u): %s: %s",
              r->conn->desc, m, r->msgid, qins_err_name(code), msg);
  qd_latency_record(r->t0);
  qd_out_error(r->conn, r->msgid, code, msg);
}

/* ---- streams (reply.h) ------------------------------------------------------------------------ */
/* grant: G_WANT the worker waits for the socket; G_FD granted (fd); G_NOSOCK none (the connection
 * is closing, or embedded); G_GAVEUP the worker stopped waiting (deadline) and buffers its answer. */
enum { G_NONE = 0, G_WANT, G_FD, G_NOSOCK, G_GAVEUP };
/* turn: the stream's place among the connection's streams. */
enum { T_NONE = 0, T_WAITING, T_HELD };

struct qd_stream {
  qd_conn *c;
  void (*complete)(void *); /* the job's end, on the loop (reply.h) */
  void *ud;
  /* loop thread */
  int turn;                 /* T_* */
  int worker_done;          /* qd_stream_worker_done ran */
  int lent;                 /* its worker holds the socket: c->out == OUT_LENT */
  struct qd_stream *next_turn; /* c->turns */
  uv_async_t async;         /* worker -> loop: the worker asks for the socket */
  /* shared with the worker, under mu */
  uv_mutex_t mu;
  uv_cond_t cv;             /* signalled when grant leaves G_WANT */
  int grant;                /* G_* */
  int fd;                   /* the socket, when grant == G_FD */
};

/* 1 if s holds its connection's turn now; else it waits in c->turns (stream_on_turn). On a
 * closing connection every stream holds it (its writes are dropped anyway). */
static int stream_take_turn(qd_stream *s) {
  qd_conn *c = s->c;
  if (s->turn != T_NONE) return s->turn == T_HELD;
  if (!conn_gone(c) && c->out != OUT_QUEUE) {
    s->turn = T_WAITING;
    qd_stream **pp = &c->turns;
    while (*pp) pp = &(*pp)->next_turn;
    *pp = s;
    return 0;
  }
  if (!conn_gone(c)) c->out = OUT_STREAM;
  s->turn = T_HELD;
  return 1;
}

/* Lends the socket to s's worker if it asks and may have it: the one place OUT_LENT is entered.
 * Waits (c->drain_wait) while libuv still has writes queued; answers G_NOSOCK when there is no
 * socket to lend (closing, embedded). */
static void stream_lend(qd_stream *s) {
  qd_conn *c = s->c;
  int fd = -1;
  if (!conn_gone(c) && !c->sink && c->out == OUT_STREAM) {
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) > 0 || c->fd_wait) {
      c->drain_wait = s; /* parked fd replies go first too */
      return;
    }
    uv_os_fd_t f;
    if (uv_fileno((uv_handle_t *)&c->pipe, &f) == 0) fd = f;
  }
  uv_mutex_lock(&s->mu);
  int taken = s->grant == G_WANT;
  if (taken) {
    s->grant = fd >= 0 ? G_FD : G_NOSOCK;
    s->fd = fd;
    uv_cond_signal(&s->cv);
  }
  uv_mutex_unlock(&s->mu);
  if (taken && fd >= 0) {
    c->out = OUT_LENT;
    s->lent = 1;
  }
}

/* s's turn came (it waited behind another stream, or the connection is closing). */
static void stream_on_turn(qd_stream *s) {
  s->turn = T_HELD;
  if (s->worker_done) s->complete(s->ud);
  else stream_lend(s);
}

/* Hands the turn to the next waiting stream; on a closing connection wakes them all. */
static void stream_wake_next(qd_conn *c) {
  while (c->turns && (conn_gone(c) || c->out == OUT_QUEUE)) {
    qd_stream *s = c->turns;
    c->turns = s->next_turn;
    s->next_turn = NULL;
    if (!conn_gone(c)) c->out = OUT_STREAM;
    stream_on_turn(s);
  }
}

static void stream_async_cb(uv_async_t *a) {
  qd_stream *s = a->data;
  if (!s->worker_done && stream_take_turn(s)) stream_lend(s);
}

qd_stream *qd_stream_open(qd_req *r, void (*complete)(void *), void *ud) {
  qd_stream *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->c = r->conn;
  s->complete = complete;
  s->ud = ud;
  s->fd = -1;
  uv_async_init(qd_srv.loop, &s->async, stream_async_cb);
  s->async.data = s;
  uv_mutex_init(&s->mu);
  uv_cond_init(&s->cv);
  qd_loop_touch();
  return s;
}

int qd_stream_lend(qd_stream *s, uint64_t deadline) {
  uv_mutex_lock(&s->mu);
  s->grant = G_WANT;
  uv_mutex_unlock(&s->mu);
  uv_async_send(&s->async);
  uv_mutex_lock(&s->mu);
  while (s->grant == G_WANT) {
    uint64_t now = qd_now_ns();
    if (now >= deadline || (uv_cond_timedwait(&s->cv, &s->mu, deadline - now) != 0 &&
                            s->grant == G_WANT))
      s->grant = G_GAVEUP;
  }
  int g = s->grant;
  uv_mutex_unlock(&s->mu);
  return g == G_FD;
}

int qd_stream_send(qd_stream *s, const void *buf, size_t n, uint64_t deadline, uint64_t *sent) {
  const char *p = buf;
  const int fd = s->fd; /* set before the grant was signalled */
  while (n) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= (size_t)k;
      *sent += (uint64_t)k;
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k == 0) errno = EPIPE;
    if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) return -1;
    uint64_t now = qd_now_ns();
    if (now >= deadline) return 1;
    struct pollfd pf = {fd, POLLOUT, 0};
    int r = poll(&pf, 1, (int)((deadline - now + 999999) / 1000000));
    if (r < 0 && errno != EINTR) return -1;
    if (r > 0 && (pf.revents & POLLNVAL)) {
      errno = EBADF;
      return -1;
    }
  }
  return 0;
}

int qd_stream_worker_done(qd_stream *s, uint64_t sent, int want_turn) {
  qd_conn *c = s->c;
  s->worker_done = 1;
  if (c->drain_wait == s) c->drain_wait = NULL; /* it still waited for libuv's queue */
  if (s->lent) { /* the one place OUT_LENT is left */
    s->lent = 0;
    qd_srv.st.bytes_served += sent;
    if (conn_gone(c)) { /* closed meanwhile: the handle closes now (qd_out_close) */
      c->out = OUT_QUEUE;
      uv_close((uv_handle_t *)&c->pipe, qd_conn_on_closed);
      qd_loop_touch();
    } else {
      c->out = OUT_STREAM;
    }
  }
  if (s->turn == T_WAITING) return 0; /* stream_on_turn completes it */
  return !want_turn || stream_take_turn(s);
}

void qd_stream_write(qd_stream *s, char *head, size_t head_len, const void *p, size_t n,
                     void *owned, size_t owned_cap) {
  struct iovec piece = {(void *)p, n};
  out_send(s->c, head, head_len, head_len, n ? &piece : NULL, n ? 1 : 0, owned, owned_cap, 1);
}

static void stream_freed(uv_handle_t *h) {
  qd_stream *s = h->data;
  uv_cond_destroy(&s->cv);
  uv_mutex_destroy(&s->mu);
  free(s);
}

void qd_stream_close(qd_stream *s, int broken) {
  qd_conn *c = s->c;
  if (s->turn == T_HELD && c->out == OUT_STREAM) c->out = OUT_QUEUE;
  if (broken) qd_conn_close(c);
  if (c->out == OUT_QUEUE) out_release_held(c);
  stream_wake_next(c);
  uv_close((uv_handle_t *)&s->async, stream_freed);
  qd_loop_touch();
}

int qd_out_close(qd_conn *c) {
  if (c->out == OUT_STREAM) c->out = OUT_QUEUE;
  out_release_held(c); /* closing: they are dropped */
  out_release_parked(c); /* dropped too */
  int now = 1;
  if (c->out == OUT_LENT) {
    /* A pool thread is writing to this fd: closing it now could hand its number to a new
     * connection mid-write. Shut it down instead (the worker's next write fails at once); the
     * handle closes when the lent state is left (qd_stream_worker_done). */
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&c->pipe, &fd) == 0) shutdown(fd, SHUT_RDWR);
    now = 0;
  }
  stream_wake_next(c); /* waiting streams finish (their writes are dropped) */
  if (c->drain_wait) { /* a stream waiting for the queue to empty: it gets no socket now */
    qd_stream *s = c->drain_wait;
    c->drain_wait = NULL;
    stream_lend(s);
  }
  return now;
}
