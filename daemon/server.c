/* SPDX-License-Identifier: MIT */
/*
 * server.c — qinsd's core: the listening socket, connections, request framing and dispatch,
 * responses, backpressure, statistics and shutdown. Wire contract: docs/PROTOCOL.md §1-§3.
 *
 * Design. One libuv loop thread owns every connection. Bytes read go into the connection's
 * buffer; proto's bounded scanner (qp_scan) finds whole requests, checking every declared length
 * and count against max_request_bytes *before* anything reads the fields; a complete, validated
 * request (at most max_request_bytes long) is then read in place with proto's qp_rd_* cursor (no
 * unpack, no allocation; handlers look params up in the same bytes). Methods come from the table
 * in commands.c. Responses are packed with msgpack-c into an sbuffer holding only the envelope
 * and small fields; a decoded payload goes out as its own iovec after a bin header (uv_write of
 * several buffers = writev), never copied into the sbuffer. A small get is packed and decoded
 * into one static buffer and written at once when the socket takes it (qd_reply_copy); a
 * streamed get is written by its pool worker itself (qd_direct_begin .. qd_direct_end).
 *
 * Reading. Client sockets are not read through libuv's streams but from a read set: an epoll
 * instance of our own in which they are edge-triggered, so each is reported once per arrival and
 * requests are taken in the order they arrived. libuv's level-triggered epoll re-reports the
 * sockets of the last batch first: a client answered early sent its next request early and kept
 * its place at the head of every batch, while the others waited a batch more. Under load that
 * gave a lower median but a heavier tail (bench_serve, 16 clients: p99 1.02-1.15x Redis's with
 * libuv's order, 0.73-0.95x in arrival order; docs/qinsd.md). The set also holds libuv's own
 * epoll fd, and serve_loop waits on it, running libuv (UV_RUN_NOWAIT) for writes that wait for
 * the socket, timers, signals and the pool: a small get costs one epoll_wait, one read and one
 * write, as it did under uv_run. A client that keeps its socket full is read RSET_READ_BUDGET
 * bytes a turn, then waits on the again list behind the others.
 *
 * Invariants:
 *  - Backpressure: a connection's requests are read and dispatched only while the memory its
 *    queued responses hold (wreq cost) is at most write_queue_bytes and fewer than max_pending of
 *    its requests are unanswered. A client that stops reading therefore costs at most about
 *    write_queue_bytes plus one response, and since its requests stop being read it cannot hold
 *    the thread pool.
 *  - A connection's memory (qd_conn) is freed only when its handle is closed (close_cb ran) and no
 *    pool job refers to it (pending == 0): jobs finishing after the client left drop their answer.
 *  - LMDB read txns never outlive one request step (commands.c), and are never held while waiting
 *    on a client.
 *  - Embedded connections (qd_serve_bytes, for fuzzing) share every path above except the socket:
 *    their reads are fed by the caller and their writes complete at once into a sink.
 *  - Shutdown (SIGTERM/SIGINT/`shutdown`): close the listener, stop reading, answer requests
 *    already buffered with SHUTDOWN, let in-flight ones finish and flush, then close; after
 *    shutdown_timeout_ms whatever remains is closed. The loop then has no handles and returns.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "qinsd.h"

qd_stats qd_st;
qs_store *qd_store;

struct qd_conn {
  uv_pipe_t pipe;      /* the client socket; pipe.data = this */
  uint64_t id;         /* client number, from 1, for logs */
  pid_t pid;           /* SO_PEERCRED at connect (logged only, never trusted) */
  uid_t uid;           /* SO_PEERCRED: decides admin rights */
  gid_t gid;           /* SO_PEERCRED */
  char desc[96];       /* "client 7 (pid 123 uid 1000)" */
  char *buf;           /* read buffer; unparsed bytes are [rpos, wpos) */
  size_t cap, rpos, wpos;
  qp_scan scan;        /* the request being framed, starting at buf + rpos */
  size_t queued;       /* memory held by its responses not yet written (wreq cost) */
  unsigned pending;    /* requests dispatched but not yet answered (pool jobs) */
  uint64_t reserved;   /* planned response bytes of those pending requests */
  int reading;         /* requests are being read (rset_read; qd_serve_bytes when embedded) */
  int fd;              /* the socket, while in the read set; else -1 */
  int in_read;         /* inside rset_read for this connection (no nested reads) */
  int again;           /* on the again list: its read budget ran out with bytes left */
  int again_all;       /* its rset_read `all`, for the next turn */
  struct qd_conn *again_prev, *again_next;
  int closing;         /* uv_close called */
  int closed;          /* close_cb ran */
  int close_after;     /* no more requests: close once pending == 0 and queued == 0 */
  int eof;             /* the client shut down its side: answer what is buffered, then close */
  int busy;            /* over max_connections: only the BUSY reply is sent */
  int streaming;       /* a streamed response owns the socket: other writes are held */
  int direct;          /* a pool worker writes to the socket itself (qd_direct_begin .. _end) */
  int close_deferred;  /* conn_close ran while direct: the handle is closed at qd_direct_end */
  void (*drain_cb)(void *); /* qd_direct_begin waits for libuv's write queue to empty */
  void *drain_ud;
  struct waiter *waiters; /* streams waiting for the socket, in order */
  struct wreq *held_head, *held_tail; /* writes held while streaming, in order */
  struct qd_conn *prev, *next; /* all connections */
  qd_sink_fn sink;     /* embedded connection (qd_serve_bytes): response bytes go here, no socket */
  void *sink_ud;       /* its argument */
};

typedef struct wreq wreq;
struct wreq {
  uv_write_t req;  /* libuv request; req.data unused */
  qd_conn *c;      /* connection written to */
  size_t bytes;    /* bytes of bufs still to write */
  size_t cost;     /* memory it holds (itself, head, payload): counted in c->queued until freed */
  char *head;      /* packed prefix (sbuffer data, malloc'd), or NULL (none, or copied inline) */
  void *owned;     /* payload buffer released after the write, or NULL */
  size_t owned_cap;
  void (*done)(void *); /* called when the write is finished or dropped (may be NULL) */
  void *ud;        /* its argument */
  struct wreq *next; /* held writes (while a stream owns the connection) */
  unsigned nbufs;
  uv_buf_t bufs[]; /* head, then payload pieces */
};

static uv_loop_t *loop;
static uv_pipe_t server;
static uv_signal_t sig_term, sig_int, sig_hup;
static uv_timer_t shutdown_timer;
static int stopping;
static int listening;
static qd_conn *conns;
static uint64_t next_conn_id = 1;
static uint64_t n_open; /* connections not yet freed (busy ones included) */
static struct stat sock_st; /* our socket file, to remove it only if still ours */
static int rset_fd = -1; /* the read set (epoll), while serve_loop runs */
static int loop_dirty = 1; /* libuv has fd watchers to (re)register: run it before waiting */
static int loop_failed;    /* epoll_wait failed: shutting down, exit status 1 */
static qd_conn *again_head, *again_tail; /* connections to read again next round, in order */
static size_t again_n;                   /* how many */

/* Called after anything that may give libuv a new fd watcher (uv_write) or work (uv_close): libuv
 * registers watchers only inside uv_run, and uv_backend_timeout does not count them. */
static void loop_touch(void) { loop_dirty = 1; }

uint64_t qd_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t qd_conn_id(const qd_conn *c) { return c->id; }
uid_t qd_conn_uid(const qd_conn *c) { return c->uid; }
const char *qd_conn_desc(const qd_conn *c) { return c->desc; }

/* ---- payload buffer cache ------------------------------------------------------------------- */
#define BUF_SLOTS 8            /* buffers kept */
#define BUF_MIN (256 * 1024)   /* smaller ones are plain malloc: no page-fault cost worth saving */
static struct { void *p; size_t cap; } buf_cache[BUF_SLOTS];
static size_t buf_cached;
static uv_mutex_t buf_mu; /* qd_buf_get runs on pool threads too */

void *qd_buf_get(size_t n, size_t *cap) {
  if (n >= BUF_MIN) {
    uv_mutex_lock(&buf_mu);
    int best = -1;
    for (int i = 0; i < BUF_SLOTS; i++)
      if (buf_cache[i].p && buf_cache[i].cap >= n && buf_cache[i].cap / 2 <= n &&
          (best < 0 || buf_cache[i].cap < buf_cache[best].cap))
        best = i;
    if (best >= 0) {
      void *p = buf_cache[best].p;
      *cap = buf_cache[best].cap;
      buf_cache[best].p = NULL;
      buf_cached -= *cap;
      uv_mutex_unlock(&buf_mu);
      return p;
    }
    uv_mutex_unlock(&buf_mu);
  }
  *cap = n ? n : 1;
  return malloc(*cap);
}

void qd_buf_release(void *p, size_t cap) {
  if (!p) return;
  if (cap >= BUF_MIN && cap <= qd_cfg.buffer_cache_bytes) {
    uv_mutex_lock(&buf_mu);
    int slot = -1;
    for (int i = 0; i < BUF_SLOTS && slot < 0; i++)
      if (!buf_cache[i].p) slot = i;
    /* Evict smaller buffers until this one fits the budget. */
    while (slot >= 0 && buf_cached + cap > qd_cfg.buffer_cache_bytes) {
      int victim = -1;
      for (int i = 0; i < BUF_SLOTS; i++)
        if (buf_cache[i].p && (victim < 0 || buf_cache[i].cap < buf_cache[victim].cap)) victim = i;
      if (victim < 0) break;
      free(buf_cache[victim].p);
      buf_cached -= buf_cache[victim].cap;
      buf_cache[victim].p = NULL;
    }
    if (slot >= 0 && buf_cached + cap <= qd_cfg.buffer_cache_bytes) {
      buf_cache[slot].p = p;
      buf_cache[slot].cap = cap;
      buf_cached += cap;
      uv_mutex_unlock(&buf_mu);
      return;
    }
    uv_mutex_unlock(&buf_mu);
  }
  free(p);
}

static void buf_cache_clear(void) {
  for (int i = 0; i < BUF_SLOTS; i++) {
    free(buf_cache[i].p);
    buf_cache[i].p = NULL;
  }
  buf_cached = 0;
}

/* ---- statistics ------------------------------------------------------------------------------- */
static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

void qd_latency_quantiles(double *p50_us, double *p99_us) {
  size_t n = qd_st.lat_n < QD_LAT_SAMPLES ? qd_st.lat_n : QD_LAT_SAMPLES;
  *p50_us = *p99_us = 0;
  if (!n) return;
  uint64_t *v = malloc(n * sizeof *v);
  if (!v) return;
  memcpy(v, qd_st.lat_ns, n * sizeof *v);
  qsort(v, n, sizeof *v, cmp_u64);
  *p50_us = (double)v[(n - 1) / 2] / 1000.0;
  *p99_us = (double)v[(size_t)((double)(n - 1) * 0.99)] / 1000.0;
  free(v);
}

static void queued_add(uint64_t n) {
  qd_st.queued_bytes += n;
  if (qd_st.queued_bytes > qd_st.queued_peak) qd_st.queued_peak = qd_st.queued_bytes;
}

static void count_error(int code) {
  if (code <= -1000 && code > -1000 - QD_ERR_SLOTS) qd_st.errors[-1000 - code]++;
}

/* ---- connections ------------------------------------------------------------------------------ */
static void conn_process(qd_conn *c);
static void conn_update_reading(qd_conn *c);

static void conn_free(qd_conn *c) {
  if (c->prev) c->prev->next = c->next;
  else conns = c->next;
  if (c->next) c->next->prev = c->prev;
  free(c->buf);
  if (!c->busy && qd_st.connections) qd_st.connections--;
  free(c);
  n_open--;
  if (stopping && n_open == 0) {
    uv_timer_stop(&shutdown_timer);
    if (!uv_is_closing((uv_handle_t *)&shutdown_timer)) uv_close((uv_handle_t *)&shutdown_timer, NULL);
  }
}

static void on_conn_closed(uv_handle_t *h) {
  qd_conn *c = h->data;
  c->closed = 1;
  qd_log(QD_LOG_VERBOSE, "%s disconnected", c->desc);
  if (c->pending == 0) conn_free(c);
}

static void conn_release_held(qd_conn *c);
static void conn_wake_streams(qd_conn *c);

static void rset_leave(qd_conn *c);

static void conn_close(qd_conn *c) {
  if (c->closing) return;
  rset_leave(c); /* before the fd can be closed and its number reused */
  c->closing = 1;
  c->reading = 0;
  c->streaming = 0;
  conn_release_held(c); /* closing: they are dropped */
  if (c->direct) {
    /* A pool worker is writing to this fd: closing it now could hand its number to a new
     * connection mid-write. Shut it down instead (the worker's next write fails at once) and
     * close the handle when the worker is done (qd_direct_end). */
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&c->pipe, &fd) == 0) shutdown(fd, SHUT_RDWR);
    c->close_deferred = 1;
  } else {
    uv_close((uv_handle_t *)&c->pipe, on_conn_closed);
    loop_touch();
  }
  conn_wake_streams(c);   /* waiting streams finish (their writes are dropped) */
  if (c->drain_cb) {      /* a stream waiting for the queue to empty: it gets no socket now */
    void (*cb)(void *) = c->drain_cb;
    c->drain_cb = NULL;
    cb(c->drain_ud);
  }
}

/* Closes c if it asked to be closed and nothing is left to send. */
static void conn_maybe_close(qd_conn *c) {
  if (!c->closing && c->close_after && c->pending == 0 && c->queued == 0) conn_close(c);
}

/* Frees a write request and what it owns, and tells its owner (stream pieces). */
static void wreq_free(wreq *w) {
  free(w->head);
  qd_buf_release(w->owned, w->owned_cap);
  if (w->done) w->done(w->ud);
  free(w);
}

/* w leaves c's queue: what it held is no longer counted. */
static void wreq_uncount(qd_conn *c, wreq *w) {
  c->queued -= w->cost;
  qd_st.queued_bytes -= w->cost;
}

static void on_write(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  qd_conn *c = w->c;
  wreq_uncount(c, w);
  if (status == 0) {
    qd_st.bytes_served += w->bytes;
  } else if (status != UV_ECANCELED) {
    qd_log(QD_LOG_VERBOSE, "%s: write failed: %s (%zu bytes dropped)", c->desc, uv_strerror(status),
           w->bytes);
    conn_close(c);
  }
  wreq_free(w);
  if (c->drain_cb && uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) == 0) {
    void (*cb)(void *) = c->drain_cb;
    c->drain_cb = NULL;
    cb(c->drain_ud);
  }
  if (!c->closing) {
    conn_process(c);
    conn_maybe_close(c);
  }
}

/* Writes what the socket takes now of bufs, queueing nothing: the bytes written (counted as
 * served), 0 when none fit, -1 when the socket failed (logged; the caller closes c). */
static ssize_t conn_try_write(qd_conn *c, const uv_buf_t *bufs, unsigned nbufs) {
  int n = uv_try_write((uv_stream_t *)&c->pipe, bufs, nbufs);
  if (n >= 0) {
    qd_st.bytes_served += (size_t)n;
    return n;
  }
  if (n == UV_EAGAIN) return 0;
  qd_log(QD_LOG_VERBOSE, "%s: write failed: %s", c->desc, uv_strerror(n));
  return -1;
}

/* Hands w to libuv (counted in c->queued until its callback). */
static void wreq_submit(qd_conn *c, wreq *w) {
  if (c->closing) { /* the client left while this was being computed */
    wreq_uncount(c, w);
    wreq_free(w);
    return;
  }
  if (c->sink) { /* embedded (qd_serve_bytes): the whole write is delivered at once */
    for (unsigned i = 0; i < w->nbufs; i++) c->sink(c->sink_ud, w->bufs[i].base, w->bufs[i].len);
    wreq_uncount(c, w);
    qd_st.bytes_served += w->bytes;
    wreq_free(w);
    return;
  }
  /* Fast path: with nothing queued, write now (one writev, no request, no POLLOUT round trip
   * and its epoll_ctl). Only for plain replies: stream pieces report through their callback. */
  if (!w->done) {
    ssize_t n = conn_try_write(c, w->bufs, w->nbufs);
    if (n < 0) {
      wreq_uncount(c, w);
      wreq_free(w);
      conn_close(c);
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
  }
  int rc = uv_write(&w->req, (uv_stream_t *)&c->pipe, w->bufs, w->nbufs, on_write);
  loop_touch();
  if (rc) {
    wreq_uncount(c, w);
    qd_log(QD_LOG_VERBOSE, "%s: write failed: %s", c->desc, uv_strerror(rc));
    wreq_free(w);
    conn_close(c);
  }
}

/* Builds a write of head (taken over, head_cap bytes allocated; may be NULL) + pieces, and
 * submits it, or holds it while a stream owns the connection (stream = 0) so that responses never
 * interleave. Its cost, counted against write_queue_bytes until it is freed, is the memory it
 * holds, not the bytes it sends: 100,000 queued 13-byte pongs must not hold 100,000 8 KiB
 * sbuffers. A small head with no pieces (pieces may point into a head) is copied into the
 * request itself; a larger one is shrunk to its length. */
#define WREQ_INLINE_HEAD 256
static void conn_send_ex(qd_conn *c, char *head, size_t head_len, size_t head_cap,
                         const uv_buf_t *pieces, unsigned np, void *owned, size_t owned_cap,
                         void (*done)(void *), void *ud, int stream) {
  size_t inl = head && np == 0 && head_len <= WREQ_INLINE_HEAD ? head_len : 0;
  size_t wsize = sizeof(wreq) + (1 + np) * sizeof(uv_buf_t) + inl;
  wreq *w = malloc(wsize);
  if (!w) {
    qd_log(QD_LOG_WARNING, "%s: out of memory queueing a response; closing", c->desc);
    free(head);
    qd_buf_release(owned, owned_cap);
    if (done) done(ud);
    conn_close(c);
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
  w->done = done;
  w->ud = ud;
  w->next = NULL;
  w->nbufs = 0;
  w->bytes = 0;
  if (head) {
    w->bufs[w->nbufs++] = uv_buf_init(head, (unsigned)head_len);
    w->bytes += head_len;
  }
  w->cost = wsize + head_cap + (owned ? owned_cap : 0);
  for (unsigned i = 0; i < np; i++) {
    w->bufs[w->nbufs++] = pieces[i];
    w->bytes += pieces[i].len;
    uintptr_t b = (uintptr_t)pieces[i].base, h = (uintptr_t)head, o = (uintptr_t)owned;
    int in_head = head && b >= h && b < h + head_cap; /* bytes outside head and owned are */
    int in_owned = owned && b >= o && b < o + owned_cap; /* held for this write (streams) */
    if (!in_head && !in_owned) w->cost += pieces[i].len;
  }
  c->queued += w->cost;
  queued_add(w->cost);
  if (c->streaming && !stream && !c->closing) {
    if (c->held_tail) c->held_tail->next = w;
    else c->held_head = w;
    c->held_tail = w;
    return;
  }
  wreq_submit(c, w);
}

static void conn_send(qd_conn *c, char *head, size_t head_len, size_t head_cap,
                      const qd_payload *pl) {
  conn_send_ex(c, head, head_len, head_cap, pl ? pl->bufs : NULL, pl ? pl->nbufs : 0,
               pl ? pl->owned : NULL, pl ? pl->owned_cap : 0, NULL, NULL, 0);
}

/* Submits (or, when the connection is closing, drops) the writes held during a stream. */
static void conn_release_held(qd_conn *c) {
  wreq *w = c->held_head;
  c->held_head = c->held_tail = NULL;
  while (w) {
    wreq *next = w->next;
    wreq_submit(c, w);
    w = next;
  }
}

int qd_conn_closing(const qd_conn *c) { return c->closing; }

typedef struct waiter {
  void (*wake)(void *); /* called once the stream owns the socket (or the connection closed) */
  void *ud;
  struct waiter *next;
} waiter;

int qd_stream_acquire(qd_conn *c, void (*wake)(void *), void *ud) {
  if (c->closing) return 1; /* writes are dropped anyway */
  if (!c->streaming) {
    c->streaming = 1;
    return 1;
  }
  waiter *w = malloc(sizeof *w);
  if (!w) {
    qd_log(QD_LOG_WARNING, "%s: out of memory queueing a stream; closing", c->desc);
    conn_close(c);
    return 1;
  }
  w->wake = wake;
  w->ud = ud;
  w->next = NULL;
  waiter **pp = &c->waiters;
  while (*pp) pp = &(*pp)->next;
  *pp = w;
  return 0;
}

/* Hands the socket to the next waiting stream; on a closing connection wakes them all. */
static void conn_wake_streams(qd_conn *c) {
  while (c->waiters && !c->streaming) {
    waiter *w = c->waiters;
    c->waiters = w->next;
    if (!c->closing) c->streaming = 1;
    void (*wake)(void *) = w->wake;
    void *ud = w->ud;
    free(w);
    wake(ud);
  }
}

void qd_stream_write(qd_conn *c, char *head, size_t head_len, uv_buf_t piece,
                     void (*done)(void *), void *ud) {
  conn_send_ex(c, head, head_len, head_len, piece.len ? &piece : NULL, piece.len ? 1 : 0, NULL, 0,
               done, ud, 1);
}

int qd_direct_begin(qd_conn *c, void (*drained)(void *), void *ud) {
  if (c->closing || c->sink || !c->streaming) return -1;
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) > 0) {
    c->drain_cb = drained;
    c->drain_ud = ud;
    return -2;
  }
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&c->pipe, &fd)) return -1;
  c->direct = 1;
  return fd;
}

void qd_direct_cancel(qd_conn *c, void *ud) {
  if (c->drain_ud == ud) c->drain_cb = NULL;
}

void qd_direct_end(qd_conn *c, uint64_t bytes) {
  c->direct = 0;
  qd_st.bytes_served += bytes;
  if (c->close_deferred) {
    c->close_deferred = 0;
    uv_close((uv_handle_t *)&c->pipe, on_conn_closed);
  }
}

void qd_stream_end(qd_conn *c, int broken) {
  c->streaming = 0;
  if (broken) conn_close(c);
  conn_release_held(c);
  conn_wake_streams(c);
}

void qd_latency_record(uint64_t t0) {
  qd_st.lat_ns[qd_st.lat_n % QD_LAT_SAMPLES] = qd_now_ns() - t0;
  qd_st.lat_n++;
}

void qd_count_error(int code) { count_error(code); }

void qd_reply(qd_req *r, msgpack_sbuffer *sb, const qd_payload *pl) {
  qd_latency_record(r->t0);
  size_t len = pl && pl->head_len ? pl->head_len : sb->size, cap = sb->alloc;
  char *head = msgpack_sbuffer_release(sb);
  conn_send(r->conn, head, len, cap, pl);
}

void qd_reply_copy(qd_req *r, const char *p, size_t n) {
  qd_conn *c = r->conn;
  qd_latency_record(r->t0);
  /* Nothing queued or held before it: write now, from p (uv_try_write fails with EAGAIN while
   * libuv has writes queued, so order holds). */
  if (!c->streaming && !c->closing && !c->sink && c->queued == 0) {
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    ssize_t k = conn_try_write(c, &b, 1);
    if (k < 0) {
      conn_close(c);
      return;
    }
    p += k;
    n -= (size_t)k;
    if (n == 0) return;
  }
  char *h = malloc(n); /* the rest is queued (or held, or played to the sink) like any response */
  if (!h) {
    qd_log(QD_LOG_WARNING, "%s: out of memory queueing a response; closing", c->desc);
    conn_close(c);
    return;
  }
  memcpy(h, p, n);
  conn_send(c, h, n, n, NULL);
}

static void send_error(qd_conn *c, uint32_t msgid, int code, const char *msg) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  qp_pack_response_err(&pk, msgid, code, "%s", msg);
  size_t len = sb.size, cap = sb.alloc;
  conn_send(c, msgpack_sbuffer_release(&sb), len, cap, NULL);
  count_error(code);
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
  qd_log(level,
         "%s: %s (msgid %u): %s: %s", r->conn->desc, m, r->msgid, qins_err_name(code), msg);
  qd_latency_record(r->t0);
  send_error(r->conn, r->msgid, code, msg);
}

void qd_req_defer(qd_req *r, uint64_t bytes) {
  r->conn->pending++;
  r->conn->reserved += bytes;
  queued_add(bytes);
}

void qd_req_unreserve(qd_conn *c, uint64_t bytes) {
  c->reserved -= bytes;
  qd_st.queued_bytes -= bytes;
}

void qd_req_done_deferred(qd_conn *c) {
  c->pending--;
  if (c->closed) {
    if (c->pending == 0) conn_free(c);
    return;
  }
  if (!c->closing) {
    conn_process(c);
    conn_maybe_close(c);
  }
}

/* A printable sample of hostile bytes for the log. */
static void sample(const char *p, size_t n, char *out, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < n && i < 24 && o + 4 < cap; i++)
    o += (size_t)snprintf(out + o, cap - o, "%02x", (unsigned char)p[i]);
  if (n > 24 && o + 4 < cap) o += (size_t)snprintf(out + o, cap - o, "...");
  out[o] = '\0';
}

/* A framing or envelope error: reply (msgid if known), log, and close after the reply. */
static void conn_protocol_error(qd_conn *c, uint32_t msgid, int code, const char *what,
                                const char *bytes, size_t n) {
  char smp[64];
  sample(bytes, n, smp, sizeof smp);
  qd_log(QD_LOG_NOTICE, "%s: protocol error %s: %s (bytes %s); closing", c->desc,
         qins_err_name(code), what, smp);
  send_error(c, msgid, code, what);
  c->close_after = 1;
}

/* Reads and dispatches one complete request of n bytes at p. qp_scan has validated the message
 * (declared lengths and counts fit in it, nesting is bounded), so the envelope and params are read
 * in place with qp_rd_*: no unpack, no allocation. */
static void handle_message(qd_conn *c, const char *p, size_t n) {
  qp_rd rd;
  qp_rd_init(&rd, p, n);
  uint32_t na;
  if (qp_rd_array(&rd, &na)) {
    conn_protocol_error(c, 0, QINS_EPROTO, "request is not an array", p, n);
    return;
  }
  uint64_t tag = 0, id = 0;
  int tag_ok = na > 0 && qp_rd_uint(&rd, &tag) == 0;
  if (na == 3 && tag_ok && tag == QP_NOTIFY) {
    qd_log(QD_LOG_DEBUG, "%s: notification ignored", c->desc);
    return;
  }
  if (!tag_ok || tag != QP_REQUEST) {
    conn_protocol_error(c, 0, QINS_EPROTO, "wrong message type tag (expected [0, msgid, method, params])",
                        p, n);
    return;
  }
  if (na != 4) {
    conn_protocol_error(c, 0, QINS_EPROTO, "a request has 4 elements: [0, msgid, method, params]",
                        p, n);
    return;
  }
  if (qp_rd_uint(&rd, &id) || id > UINT32_MAX) {
    conn_protocol_error(c, 0, QINS_EPROTO, "msgid must be an unsigned integer < 2^32", p, n);
    return;
  }
  qd_req r; /* not memset: msg (1.2 KB) is only read after a handler wrote it, or when empty */
  r.conn = c;
  r.msgid = (uint32_t)id;
  r.method = -1;
  r.params.p = r.params.end = NULL;
  r.n_keys = 0;
  r.msg[0] = '\0';
  r.t0 = qd_now_ns();
  qd_st.requests++;
  const char *mp;
  uint32_t ml;
  if (qp_rd_str(&rd, &mp, &ml)) {
    qd_reply_err(&r, QINS_EPROTO, "method must be a str");
    return;
  }
  int m = qd_method_find(mp, ml);
  if (m < 0) {
    char name[64];
    size_t l = ml < 40 ? ml : 40;
    for (size_t i = 0; i < l; i++) {
      char ch = mp[i];
      name[i] = ch >= 0x20 && ch < 0x7f ? ch : '?';
    }
    name[l] = '\0';
    qd_reply_err(&r, QINS_EUNKNOWN_METHOD, "unknown method \"%s%s\"", name,
                 ml > 40 ? "..." : "");
    return;
  }
  r.method = m;
  qd_st.per_method[m]++;
  uint32_t np, nk;
  qp_rd pm;
  if (qp_rd_array(&rd, &np) || np > 1 || (np == 1 && (pm = rd, qp_rd_map(&pm, &nk)))) {
    qd_reply_err(&r, QINS_EPROTO, "params must be [] or [ {named arguments} ]");
    return;
  }
  if (np) { /* index the map's str keys once; handlers look params up by key (first one wins) */
    r.params = rd;
    r.n_keys = 0;
    qp_rd_map(&rd, &nk);
    for (uint32_t i = 0; i < nk; i++) {
      const char *k;
      uint32_t kl;
      if (qp_rd_str(&rd, &k, &kl) == 0) {
        if (r.n_keys == QD_PARAM_KEYS) {
          r.n_keys = -1; /* too many to index: lookups walk the map */
          break;
        }
        r.keys[r.n_keys].k = k;
        r.keys[r.n_keys].kl = kl;
        r.keys[r.n_keys].v = rd.p;
        r.n_keys++;
      } else {
        qp_rd_skip(&rd);
      }
      qp_rd_skip(&rd);
    }
  }
  if ((qd_methods[m].flags & QD_ADMIN) && c->uid != 0 && c->uid != getuid()) {
    qd_reply_err(&r, QINS_EDENIED, "%s is an admin method: uid %u may not call it (only uid %u and root)",
                 qd_methods[m].name, (unsigned)c->uid, (unsigned)getuid());
    return;
  }
  if (stopping) {
    qd_reply_err(&r, QINS_ESHUTDOWN, "the daemon is shutting down");
    return;
  }
  int rc = qd_methods[m].handler(&r);
  if (rc) qd_reply_err(&r, rc, "%s", r.msg[0] ? r.msg : qins_strerror(rc));
}

static int conn_can_dispatch(const qd_conn *c) {
  return !c->closing && !c->close_after && c->queued + c->reserved <= qd_cfg.write_queue_bytes &&
         c->pending < qd_cfg.max_pending;
}

/* Frames and dispatches what is buffered, as far as backpressure allows. */
static void conn_process(qd_conn *c) {
  while (conn_can_dispatch(c) && c->rpos < c->wpos) {
    size_t n = 0;
    const char *p = c->buf + c->rpos;
    int r = qp_scan_next(&c->scan, p, c->wpos - c->rpos, &n);
    if (r == QP_MORE) break;
    if (r < 0) {
      conn_protocol_error(c, 0, r, c->scan.what, p, c->wpos - c->rpos);
      c->rpos = c->wpos;
      break;
    }
    if (stopping) { /* buffered before the stop: answer SHUTDOWN without running it */
      qp_rd rd;
      uint32_t na;
      uint64_t v;
      uint32_t id = 0;
      qp_rd_init(&rd, p, n);
      if (qp_rd_array(&rd, &na) == 0 && na == 4 && qp_rd_skip(&rd) == 0 &&
          qp_rd_uint(&rd, &v) == 0 && v <= UINT32_MAX)
        id = (uint32_t)v;
      send_error(c, id, QINS_ESHUTDOWN, "the daemon is shutting down");
    } else {
      handle_message(c, p, n);
    }
    c->rpos += n;
    qp_scan_reset(&c->scan);
  }
  if (c->rpos == c->wpos) c->rpos = c->wpos = 0;
  if (stopping && !c->close_after && c->rpos == c->wpos) c->close_after = 1;
  if (c->eof && !c->close_after && conn_can_dispatch(c)) {
    /* Nothing complete is left to run. */
    if (c->wpos > c->rpos)
      qd_log(QD_LOG_VERBOSE, "%s: disconnected with %zu bytes of an unfinished request", c->desc,
             c->wpos - c->rpos);
    c->close_after = 1;
  }
  conn_update_reading(c);
}

/* Room for the next read at c's wpos: 64 KiB at least, up to max_request_bytes plus that (an empty
 * buffer when that is used up: the caller reports UV_ENOBUFS). */
static void conn_alloc(qd_conn *c, uv_buf_t *out) {
  const size_t chunk = 64 * 1024;
  if (c->cap - c->wpos < chunk && c->rpos > 0) {
    memmove(c->buf, c->buf + c->rpos, c->wpos - c->rpos);
    c->wpos -= c->rpos;
    c->rpos = 0;
  }
  if (c->cap - c->wpos < chunk) {
    size_t ncap = c->cap ? c->cap * 2 : chunk;
    size_t lim = (size_t)qd_cfg.max_request_bytes + chunk;
    if (ncap > lim) ncap = lim;
    if (ncap < c->wpos + chunk && c->cap < lim) ncap = lim;
    if (ncap > c->cap) {
      char *nb = realloc(c->buf, ncap);
      if (nb) {
        c->buf = nb;
        c->cap = ncap;
      }
    }
  }
  *out = uv_buf_init(c->buf + c->wpos, (unsigned)(c->cap - c->wpos));
}

/* nread bytes arrived in c's buffer at wpos, or nread is UV_EOF or a (negative) read error. */
static void conn_on_bytes(qd_conn *c, ssize_t nread) {
  if (nread == UV_EOF) {
    /* The client finished sending (it may still read: shutdown(SHUT_WR)). Answer what is
     * buffered, then close (conn_process). */
    c->eof = 1;
    conn_process(c);
    conn_maybe_close(c);
    return;
  }
  if (nread < 0) {
    qd_log(QD_LOG_VERBOSE, "%s: read error: %s", c->desc, uv_strerror((int)nread));
    conn_close(c);
    return;
  }
  c->wpos += (size_t)nread;
  conn_process(c);
  conn_maybe_close(c);
}

/* ---- the read set and the loop driver (see Reading, at the top) ---------------------------- */

static void again_remove(qd_conn *c) {
  if (!c->again) return;
  if (c->again_prev) c->again_prev->again_next = c->again_next;
  else again_head = c->again_next;
  if (c->again_next) c->again_next->again_prev = c->again_prev;
  else again_tail = c->again_prev;
  c->again = 0;
  c->again_prev = c->again_next = NULL;
  again_n--;
}

/* Reads what c's socket holds, while c wants requests. Edge-triggered: a socket is reported again
 * only when more bytes arrive, so it is read until a short read (drained) or EAGAIN; with `all`
 * (the client hung up, or an edge may have been missed while c was paused) until EAGAIN or end of
 * stream, since a short read says nothing about a FIN behind the bytes. A client sending without
 * pause gets RSET_READ_BUDGET bytes a turn (4 full reads; libuv's streams allowed 32): then it goes
 * on the again list, read after the next round's events, so the others and libuv get theirs. */
#define RSET_READ_BUDGET (256u << 10)
static void again_add(qd_conn *c, int all);
static void rset_read(qd_conn *c, int all) {
  if (c->in_read) return; /* resumed from inside its own read: the loop below goes on */
  c->in_read = 1;
  size_t budget = RSET_READ_BUDGET;
  while (c->reading && !c->closing) {
    if (budget == 0) {
      qd_st.reads_yielded++;
      again_add(c, all);
      break;
    }
    uv_buf_t b;
    conn_alloc(c, &b);
    if (b.len == 0) { /* libuv reports an empty buffer as UV_ENOBUFS */
      conn_on_bytes(c, UV_ENOBUFS);
      break;
    }
    if (b.len > budget) b.len = (unsigned)budget; /* a large buffer (after a large request) */
    ssize_t n = read(c->fd, b.base, b.len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    conn_on_bytes(c, n < 0 ? -errno : n == 0 ? UV_EOF : n); /* UV errors are -errno on Unix */
    if (n <= 0 || (!all && (size_t)n < b.len)) break;
    budget = (size_t)n < budget ? budget - (size_t)n : 0;
  }
  c->in_read = 0;
}

static void again_add(qd_conn *c, int all) {
  c->again_all |= all;
  if (c->again) return;
  c->again = 1;
  c->again_prev = again_tail;
  c->again_next = NULL;
  if (again_tail) again_tail->again_next = c;
  else again_head = c;
  again_tail = c;
  again_n++;
}

/* A turn for each of the first RSET_AGAIN_TURNS connections on the again list (those whose budget
 * runs out again go to the back, for a later round): like epoll's 64 events, a round is bounded. */
#define RSET_AGAIN_TURNS 64
static void again_run(void) {
  for (size_t k = again_n < RSET_AGAIN_TURNS ? again_n : RSET_AGAIN_TURNS; k > 0 && again_head;
       k--) {
    qd_conn *c = again_head;
    int all = c->again_all;
    again_remove(c);
    c->again_all = 0;
    if (!c->closing && c->reading) rset_read(c, all);
  }
}

/* The set holds the client sockets (edge-triggered, data.ptr = the connection) and libuv's own
 * epoll fd (level-triggered, data.ptr = NULL). 0, or a negative errno. */
static int rset_open(void) {
  rset_fd = epoll_create1(EPOLL_CLOEXEC);
  if (rset_fd < 0) return -errno;
  struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
  if (epoll_ctl(rset_fd, EPOLL_CTL_ADD, uv_backend_fd(loop), &e) != 0) {
    int err = -errno;
    close(rset_fd);
    rset_fd = -1;
    return err;
  }
  return 0;
}

/* Runs the daemon until libuv has nothing left (after shutdown). One epoll_wait a round: client
 * requests are read and answered here, in arrival order, and libuv runs one round (UV_RUN_NOWAIT)
 * when its fd is ready, when its timers or queues are due (the wait's timeout comes from libuv),
 * or when a watcher was added (loop_touch). Rounds alternate, so neither side starves the other.
 * A small get answered at once touches nothing of libuv's: one epoll_wait, read and write. */
static void serve_loop(void) {
  struct epoll_event ev[64];
  for (;;) {
    if (loop_dirty) {
      loop_dirty = 0;
      uv_run(loop, UV_RUN_NOWAIT);
    }
    if (!uv_loop_alive(loop)) break;
    int n = epoll_wait(rset_fd, ev, 64, loop_dirty || again_head ? 0 : uv_backend_timeout(loop));
    if (n < 0 && errno != EINTR) { /* cannot happen with a valid set: stop, and never spin */
      if (!loop_failed) {
        qd_log(QD_LOG_WARNING, "epoll_wait on the read set: %s; shutting down", strerror(errno));
        loop_failed = 1;
        qd_shutdown_begin("epoll_wait failed");
      }
      usleep(1000);
    }
    uv_update_time(loop); /* timers started while handling requests count from now */
    for (int i = 0; i < n; i++) {
      qd_conn *c = ev[i].data.ptr;
      if (!c) {
        loop_dirty = 1;
        continue;
      }
      /* A connection closed earlier in this batch is still allocated (it is freed by a close
       * callback, which runs inside uv_run); it just has nothing more to read. */
      int hup = (ev[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
      if (c->again) /* more bytes came while it waits its turn: it keeps its place in line */
        c->again_all |= hup;
      else if (!c->closing && c->reading)
        rset_read(c, hup);
    }
    again_run();
    /* Timers, closes or callbacks that came due while requests kept arriving; the next wait's
     * timeout counts from this time too (uv_run, if it runs, takes its own). */
    uv_update_time(loop);
    if (n <= 0 || uv_backend_timeout(loop) == 0) loop_dirty = 1;
  }
}

/* Starts reading c: joins the read set (once), then reads what already arrived (an edge that came
 * while c was paused is not reported again). 0, or -1 if c cannot be read (logged). */
static int rset_start(qd_conn *c) {
  if (c->fd < 0) {
    uv_os_fd_t fd;
    struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (rset_fd < 0 || uv_fileno((uv_handle_t *)&c->pipe, &fd) != 0 ||
        epoll_ctl(rset_fd, EPOLL_CTL_ADD, fd, &e) != 0) {
      qd_log(QD_LOG_WARNING, "%s: cannot watch the socket (%s): refused with BUSY", c->desc,
             rset_fd < 0 ? "no read set" : strerror(errno)); /* e.g. fs.epoll.max_user_watches */
      return -1;
    }
    c->fd = fd;
  }
  c->reading = 1;
  rset_read(c, 1);
  return 0;
}

static void rset_leave(qd_conn *c) {
  if (c->fd >= 0 && rset_fd >= 0) epoll_ctl(rset_fd, EPOLL_CTL_DEL, c->fd, NULL);
  c->fd = -1;
  again_remove(c); /* closing: the list must not outlive the connection */
}

static void conn_update_reading(qd_conn *c) {
  int want = conn_can_dispatch(c) && !stopping && !c->eof;
  if (c->closing) return;
  if (want && !c->reading) {
    if (c->sink) {
      c->reading = 1; /* embedded: qd_serve_bytes feeds its reads */
    } else if (rset_start(c) != 0) {
      qd_st.connections_refused++;
      send_error(c, 0, QINS_EBUSY, "the server cannot watch this connection: try again later");
      c->close_after = 1;
      conn_maybe_close(c);
      return;
    }
  } else if (!want && c->reading) {
    c->reading = 0; /* it stays in the read set, just not read (rset_start reads what came) */
    if (!c->close_after && !stopping) {
      qd_st.paused_reads++;
      qd_log(QD_LOG_DEBUG, "%s: reading paused (%zu bytes held by queued answers, %u pending)",
             c->desc, c->queued, c->pending);
    }
  }
}

/* Access control at connect (docs/PROTOCOL.md §5): a peer that may not call read methods may call
 * nothing (admin methods need even more), so it gets DENIED with msgid 0 and a close, like BUSY,
 * and the refusal is logged with its pid, uid and gid. Supplementary groups come from
 * SO_PEERGROUPS (Linux 4.13+); without it only the primary gid counts. 1 if allowed. */
static int peer_allowed(qd_conn *c, uv_os_fd_t fd) {
  gid_t groups[256];
  size_t ng = 0;
  if (qd_cfg.allow_gid.n && c->uid != (uid_t)-1) {
    socklen_t gl = sizeof groups;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &gl) == 0) ng = gl / sizeof(gid_t);
  }
  if (qd_peer_may_read(c->uid, c->gid, groups, ng)) return 1;
  c->busy = 1; /* never counted as an open connection */
  qd_st.connections_denied++;
  qd_log(QD_LOG_WARNING, "%s refused: pid %d uid %u gid %u is not in allow-uid/allow-gid; closing",
         c->desc, (int)c->pid, (unsigned)c->uid, (unsigned)c->gid);
  char msg[160];
  snprintf(msg, sizeof msg, "uid %u (gid %u) may not use this daemon (not in allow-uid/allow-gid)",
           (unsigned)c->uid, (unsigned)c->gid);
  send_error(c, 0, QINS_EDENIED, msg);
  c->close_after = 1;
  conn_maybe_close(c);
  return 0;
}

static void on_connection(uv_stream_t *srv, int status) {
  if (status < 0) {
    qd_log(QD_LOG_WARNING, "accept failed: %s", uv_strerror(status));
    return;
  }
  qd_conn *c = calloc(1, sizeof *c);
  if (!c) {
    qd_log(QD_LOG_WARNING, "out of memory accepting a client");
    return;
  }
  c->fd = -1;
  uv_pipe_init(loop, &c->pipe, 0);
  c->pipe.data = c;
  c->id = next_conn_id++;
  qp_scan_init(&c->scan, qd_cfg.max_request_bytes, QP_MAX_DEPTH);
  c->next = conns;
  if (conns) conns->prev = c;
  conns = c;
  n_open++;
  if (uv_accept(srv, (uv_stream_t *)&c->pipe) != 0) {
    snprintf(c->desc, sizeof c->desc, "client %llu", (unsigned long long)c->id);
    c->busy = 1;
    conn_close(c);
    return;
  }
  uv_os_fd_t fd = -1;
  struct ucred cr = {0, (uid_t)-1, (gid_t)-1};
  socklen_t crl = sizeof cr;
  if (uv_fileno((uv_handle_t *)&c->pipe, &fd) == 0)
    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &crl);
  c->pid = cr.pid;
  c->uid = cr.uid;
  c->gid = cr.gid;
  snprintf(c->desc, sizeof c->desc, "client %llu (pid %d uid %u)", (unsigned long long)c->id,
           (int)c->pid, (unsigned)c->uid);
  qd_st.connections_total++;
  if (!peer_allowed(c, fd)) return;
  if (qd_st.connections >= qd_cfg.max_connections) {
    c->busy = 1;
    qd_st.connections_refused++;
    qd_log(QD_LOG_WARNING, "%s refused: %llu connections open (max-connections)", c->desc,
           (unsigned long long)qd_st.connections);
    send_error(c, 0, QINS_EBUSY, "too many connections: try again later");
    c->close_after = 1;
    conn_maybe_close(c);
    return;
  }
  qd_st.connections++;
  qd_log(QD_LOG_VERBOSE, "%s connected (gid %u)", c->desc, (unsigned)c->gid);
  conn_update_reading(c);
}

/* ---- shutdown ------------------------------------------------------------------------------- */
static void on_shutdown_timeout(uv_timer_t *t) {
  (void)t;
  qd_log(QD_LOG_WARNING, "shutdown timeout: closing %llu connection(s) still busy",
         (unsigned long long)n_open);
  for (qd_conn *c = conns; c; c = c->next) conn_close(c);
}

static void remove_socket_file(void) {
  struct stat st;
  if (stat(qd_cfg.socket, &st) == 0 && st.st_ino == sock_st.st_ino && st.st_dev == sock_st.st_dev)
    unlink(qd_cfg.socket);
}

static void on_shutdown_kick(uv_timer_t *t) {
  qd_conn *next;
  for (qd_conn *c = conns; c; c = next) {
    next = c->next;
    if (c->closing) continue;
    conn_process(c); /* answers buffered requests with SHUTDOWN, stops reading */
    conn_maybe_close(c);
  }
  if (n_open == 0) {
    if (!uv_is_closing((uv_handle_t *)t)) uv_close((uv_handle_t *)t, NULL);
    return;
  }
  uv_timer_start(t, on_shutdown_timeout, qd_cfg.shutdown_timeout_ms, 0);
}

void qd_shutdown_begin(const char *why) {
  if (stopping) return;
  stopping = 1;
  qd_log(QD_LOG_NOTICE, "shutting down (%s): %llu connection(s) to finish", why,
         (unsigned long long)n_open);
  if (listening) {
    uv_close((uv_handle_t *)&server, NULL);
    listening = 0;
    remove_socket_file();
  }
  uv_close((uv_handle_t *)&sig_term, NULL);
  uv_close((uv_handle_t *)&sig_int, NULL);
  uv_close((uv_handle_t *)&sig_hup, NULL);
  /* The per-connection work runs from the loop, not here: this may be called from inside a
   * handler (method `shutdown`) while its connection is mid-dispatch. */
  uv_timer_start(&shutdown_timer, on_shutdown_kick, 0, 0);
}

static void on_signal(uv_signal_t *h, int signum) {
  (void)h;
  if (signum == SIGHUP) { /* log rotation */
    int rc = qd_log_open(qd_cfg.log);
    if (rc) qd_log(QD_LOG_WARNING, "log %s: cannot reopen: %s", qd_cfg.log, strerror(-rc));
    else qd_log(QD_LOG_NOTICE, "log reopened (SIGHUP)");
    return;
  }
  qd_shutdown_begin(signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

/* ---- listening socket ------------------------------------------------------------------------ */
/* 0 if path is free (absent, or a stale socket now removed); else an error was logged. */
static int claim_socket_path(const char *path) {
  struct stat st;
  if (lstat(path, &st) != 0) return 0;
  if (!S_ISSOCK(st.st_mode)) {
    qd_log(QD_LOG_WARNING, "socket %s: exists and is not a socket; refusing to replace it", path);
    return -1;
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  int err = errno;
  close(fd);
  if (rc == 0) {
    qd_log(QD_LOG_WARNING, "socket %s: another daemon is listening on it; refusing to start", path);
    return -1;
  }
  if (err != ECONNREFUSED) {
    qd_log(QD_LOG_WARNING, "socket %s: cannot probe it: %s", path, strerror(err));
    return -1;
  }
  if (unlink(path) != 0) {
    qd_log(QD_LOG_WARNING, "socket %s: stale, but cannot remove it: %s", path, strerror(errno));
    return -1;
  }
  qd_log(QD_LOG_NOTICE, "socket %s: removed a stale socket file", path);
  return 0;
}

static int listen_socket(void) {
  const char *path = qd_cfg.socket;
  if (claim_socket_path(path)) return -1;
  uv_pipe_init(loop, &server, 0);
  /* Created owner-only, then opened up to socket-mode before listen(): no window in which a
   * permissive umask lets others connect (FORMATS-AND-PEERS.md §6). */
  mode_t old = umask(077);
  int rc = uv_pipe_bind(&server, path);
  umask(old);
  if (rc == 0 && qd_cfg.socket_group && *qd_cfg.socket_group &&
      chown(path, (uid_t)-1, qd_cfg.socket_gid) != 0) {
    rc = -errno;
    qd_log(QD_LOG_WARNING, "socket %s: cannot give it group %s (gid %u): %s", path,
           qd_cfg.socket_group, (unsigned)qd_cfg.socket_gid, strerror(errno));
  }
  if (rc == 0 && chmod(path, qd_cfg.socket_mode) != 0) rc = -errno;
  if (rc == 0) rc = uv_listen((uv_stream_t *)&server, 128, on_connection);
  if (rc) {
    qd_log(QD_LOG_WARNING, "socket %s: %s", path, uv_strerror(rc));
    uv_close((uv_handle_t *)&server, NULL);
    return -1;
  }
  stat(path, &sock_st);
  listening = 1;
  qd_log(QD_LOG_NOTICE, "listening on %s (mode %04o, gid %u); read access: %s", path,
         qd_cfg.socket_mode, (unsigned)sock_st.st_gid,
         qd_cfg.allow_uid.n || qd_cfg.allow_gid.n ? "allow-uid/allow-gid, own uid and root"
                                                  : "anyone who can connect");
  return 0;
}

int qd_server_run(void) {
  signal(SIGPIPE, SIG_IGN);
  char th[32];
  snprintf(th, sizeof th, "%llu", (unsigned long long)qd_cfg.threads);
  setenv("UV_THREADPOOL_SIZE", th, 1); /* read once, at the first uv_queue_work */
  uv_mutex_init(&buf_mu);
  qd_st.start_ns = qd_now_ns();
  qd_st.per_method = calloc((size_t)qd_n_methods, sizeof(uint64_t));
  loop = uv_default_loop();
  /* The store directory must exist (a typo must not serve an empty store); an empty directory
   * is initialised once (read-write, then closed) so qinsd can start before the first import.
   * qinsd itself only ever reads: the env is reopened QS_OPEN_RDONLY. */
  struct stat sst;
  if (stat(qd_cfg.store, &sst) != 0 || !S_ISDIR(sst.st_mode)) {
    qd_log(QD_LOG_WARNING, "store %s: not a directory (%s); create it or import a model first",
           qd_cfg.store, strerror(errno ? errno : ENOTDIR));
    return 1;
  }
  char mdb[4200];
  snprintf(mdb, sizeof mdb, "%s/data.mdb", qd_cfg.store);
  int rc = 0;
  if (access(mdb, F_OK) != 0) {
    qs_store *init;
    rc = qs_open(&init, qd_cfg.store, QS_OPEN_CREATE);
    if (rc == 0) {
      qs_close(init);
      qd_log(QD_LOG_NOTICE, "store %s: initialised an empty store", qd_cfg.store);
    }
  }
  if (rc == 0) rc = qs_open(&qd_store, qd_cfg.store, QS_OPEN_RDONLY);
  if (rc) {
    qd_log(QD_LOG_WARNING, "store %s: cannot open: %s: %s", qd_cfg.store, qins_strerror(rc),
           qs_error());
    return 1;
  }
  qd_log(QD_LOG_NOTICE, "%s: store %s open; pid %d uid %u", QD_SERVER_NAME, qd_cfg.store,
         (int)getpid(), (unsigned)getuid());
  uv_timer_init(loop, &shutdown_timer);
  uv_signal_init(loop, &sig_term);
  uv_signal_init(loop, &sig_int);
  uv_signal_start(&sig_term, on_signal, SIGTERM);
  uv_signal_start(&sig_int, on_signal, SIGINT);
  uv_signal_init(loop, &sig_hup);
  uv_signal_start(&sig_hup, on_signal, SIGHUP);
  if ((rc = rset_open()) != 0)
    qd_log(QD_LOG_WARNING, "cannot create the read set (epoll): %s", strerror(-rc));
  if (rc || listen_socket()) {
    if (rset_fd >= 0) close(rset_fd);
    rset_fd = -1;
    stopping = 1;
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
    uv_close((uv_handle_t *)&sig_hup, NULL);
    uv_close((uv_handle_t *)&shutdown_timer, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    qs_close(qd_store);
    return 1;
  }
  serve_loop();
  close(rset_fd);
  rset_fd = -1;
  int lc = uv_loop_close(loop);
  if (lc) qd_log(QD_LOG_WARNING, "loop closed with handles open: %s", uv_strerror(lc));
  qs_close(qd_store);
  buf_cache_clear();
  free(qd_st.per_method);
  qd_log(QD_LOG_NOTICE, "exited %s: %llu requests, %llu bytes served",
         loop_failed ? "after a loop failure" : "cleanly", (unsigned long long)qd_st.requests,
         (unsigned long long)qd_st.bytes_served);
  return loop_failed ? 1 : 0;
}

/* ---- embedding: one client's byte stream with no socket (fuzzing; qinsd.h) ------------------- */
int qd_embed_init(void) {
  if (loop) return 0;
  qd_st.per_method = calloc((size_t)qd_n_methods, sizeof(uint64_t));
  if (!qd_st.per_method) return QINS_ENOMEM;
  loop = uv_default_loop();
  uv_mutex_init(&buf_mu);
  qd_st.start_ns = qd_now_ns();
  return 0;
}

void qd_embed_fini(void) {
  if (!loop) return;
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  buf_cache_clear();
  uv_mutex_destroy(&buf_mu);
  free(qd_st.per_method);
  qd_st.per_method = NULL;
  loop = NULL;
}

/* The connection numbered id, or NULL once it was freed (a loop run may free it). */
static qd_conn *conn_by_id(uint64_t id) {
  for (qd_conn *c = conns; c; c = c->next)
    if (c->id == id) return c;
  return NULL;
}

int qd_serve_bytes(const void *in, size_t len, size_t piece, qd_sink_fn sink, void *ud) {
  qd_conn *c = calloc(1, sizeof *c);
  if (!c) return QINS_ENOMEM;
  c->fd = -1;
  uv_pipe_init(loop, &c->pipe, 0); /* never opened: reads and writes go through this function */
  c->pipe.data = c;
  c->id = next_conn_id++;
  c->pid = getpid();
  c->uid = (uid_t)-1; /* no credentials: admin methods are refused */
  c->gid = (gid_t)-1;
  c->sink = sink;
  c->sink_ud = ud;
  snprintf(c->desc, sizeof c->desc, "client %llu (embedded)", (unsigned long long)c->id);
  qp_scan_init(&c->scan, qd_cfg.max_request_bytes, QP_MAX_DEPTH);
  c->next = conns;
  if (conns) conns->prev = c;
  conns = c;
  n_open++;
  qd_st.connections++;
  qd_st.connections_total++;
  const uint64_t id = c->id;
  const char *p = in;
  if (piece == 0) piece = len ? len : 1;
  /* Reads happen only while the connection wants them (backpressure), as with libuv. */
  while ((c = conn_by_id(id)) && !c->closing && !c->close_after) {
    if (!conn_can_dispatch(c)) {
      if (uv_run(loop, UV_RUN_ONCE) == 0 && (c = conn_by_id(id)) && !conn_can_dispatch(c) &&
          !c->closing && !c->close_after)
        return QINS_EINTERNAL; /* paused with nothing left to resume it */
      continue;
    }
    if (len == 0) {
      conn_on_bytes(c, UV_EOF);
      break;
    }
    uv_buf_t b;
    conn_alloc(c, &b);
    size_t n = len < piece ? len : piece;
    if (n > b.len) n = b.len;
    if (n == 0) { /* libuv reports an empty buffer as UV_ENOBUFS */
      conn_on_bytes(c, UV_ENOBUFS);
      break;
    }
    memcpy(b.base, p, n);
    p += n;
    len -= n;
    conn_on_bytes(c, (ssize_t)n);
  }
  /* Every answer goes out, then the connection closes by itself. */
  while ((c = conn_by_id(id)))
    if (uv_run(loop, UV_RUN_ONCE) == 0 && (c = conn_by_id(id)) && !c->closing)
      return QINS_EINTERNAL; /* would stay open forever after its client's end of stream */
  return 0;
}
