/* SPDX-License-Identifier: MIT */
/*
 * conn.c — connections, read side and life: accept (credentials, limits), reading into the
 * connection's buffer, framing, the request envelope and dispatch to the method table, the
 * connection state machine (conn.h) and backpressure. The write side is out.c. Wire contract:
 * docs/PROTOCOL.md §1-§3.
 *
 * Bytes read go into the connection's buffer; proto's bounded scanner (qp_scan) finds whole
 * requests, checking every declared length and count against max-request-bytes *before* anything
 * reads the fields; a complete, validated request is then read in place with proto's qp_rd_*
 * cursor (no unpack, no allocation; handlers look params up in the same bytes).
 *
 * Invariants:
 *  - Backpressure: a connection's requests are read and dispatched only while the memory its
 *    queued responses hold (out.c's wreq cost) is at most write-queue-bytes and fewer than
 *    max-pending of its requests are unanswered. A client that stops reading therefore costs at
 *    most about write-queue-bytes plus one response, and cannot hold the thread pool.
 *  - A connection's memory is freed only when its handle is closed (CLOSED) and no pool job
 *    refers to it (pending == 0): jobs finishing after the client left drop their answer.
 *  - Embedded connections (qd_serve_bytes, for fuzzing) share every path here; their reads are
 *    fed by the caller (loop.c) and their writes complete at once into a sink (out.c).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "map.h"
#include "methods.h"

uint64_t qd_conn_id(const qd_conn *c) { return c->id; }
uid_t qd_conn_uid(const qd_conn *c) { return c->uid; }
const char *qd_conn_desc(const qd_conn *c) { return c->desc; }

/* The one place a connection's state changes. Allowed: PAUSED <-> READING; PAUSED/READING ->
 * DRAINING; any but CLOSED -> CLOSING; CLOSING -> CLOSED. */
static void conn_set_state(qd_conn *c, conn_state to) {
  conn_state from = c->state;
  int ok = (from == CONN_PAUSED && (to == CONN_READING || to == CONN_DRAINING)) ||
           (from == CONN_READING && (to == CONN_PAUSED || to == CONN_DRAINING)) ||
           (from != CONN_CLOSED && from != CONN_CLOSING && to == CONN_CLOSING) ||
           (from == CONN_CLOSING && to == CONN_CLOSED);
  if (!ok) {
    qd_log(QD_LOG_WARNING, "%s: state %d -> %d is not a transition (server bug)", c->desc,
           (int)from, (int)to);
    return;
  }
  c->state = to;
}

qd_conn *qd_conn_new(void) {
  qd_conn *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->fd = -1;
  c->state = CONN_PAUSED;
  c->id = ++qd_srv.cn.next_id;
  qp_scan_init(&c->scan, qd_srv.cfg.max_request_bytes, QP_MAX_DEPTH);
  c->next = qd_srv.cn.all;
  if (qd_srv.cn.all) qd_srv.cn.all->prev = c;
  qd_srv.cn.all = c;
  qd_srv.cn.n_open++;
  return c;
}

void qd_conn_free(qd_conn *c) {
  if (c->prev) c->prev->next = c->next;
  else qd_srv.cn.all = c->next;
  if (c->next) c->next->prev = c->prev;
  qd_map_conn_freed(c->id); /* its arena leases (map.c) */
  free(c->buf);
  if (!c->refused && qd_srv.st.connections) qd_srv.st.connections--;
  free(c);
  qd_srv.cn.n_open--;
  qd_loop_conn_freed();
}

void qd_conn_on_closed(uv_handle_t *h) {
  qd_conn *c = h->data;
  conn_set_state(c, CONN_CLOSED);
  if (!c->refused) qd_log(QD_LOG_VERBOSE, "%s disconnected", c->desc); /* refusals said so (rate-limited) */
  if (c->pending == 0) qd_conn_free(c);
}

void qd_conn_close(qd_conn *c) {
  if (c->state == CONN_CLOSING || c->state == CONN_CLOSED) return;
  qd_loop_unwatch(c); /* before the fd can be closed and its number reused */
  conn_set_state(c, CONN_CLOSING);
  if (qd_out_close(c)) {
    uv_close((uv_handle_t *)&c->pipe, qd_conn_on_closed);
    qd_loop_touch();
  }
}

/* Closes c if it takes no more requests and nothing is left to send. */
static void conn_maybe_close(qd_conn *c) {
  if (c->state == CONN_DRAINING && c->pending == 0 && c->queued == 0) qd_conn_close(c);
}

void qd_conn_drain(qd_conn *c) {
  if (c->state == CONN_PAUSED || c->state == CONN_READING) conn_set_state(c, CONN_DRAINING);
}

__attribute__((hot))
int qd_conn_can_dispatch(const qd_conn *c) {
  return (c->state == CONN_READING || c->state == CONN_PAUSED) &&
         c->queued + c->reserved <= qd_srv.cfg.write_queue_bytes &&
         c->pending < qd_srv.cfg.max_pending &&
         !(qd_mem_over() && c->queued + c->reserved > 0);
}

/* ---- dispatch ----------------------------------------------------------------------------------- */
/* A printable sample of hostile bytes for the log. */
static void sample(const char *p, size_t n, char *out, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < n && i < 24 && o + 4 < cap; i++)
    o += (size_t)snprintf(out + o, cap - o, "%02x", (unsigned char)p[i]);
  if (n > 24 && o + 4 < cap) o += (size_t)snprintf(out + o, cap - o, "...");
  out[o] = '\0';
}

/* A framing or envelope error: reply (msgid if known), log, and drain (close after the reply). */
static void conn_protocol_error(qd_conn *c, uint32_t msgid, int code, const char *what,
                                const char *bytes, size_t n) {
  char smp[64];
  sample(bytes, n, smp, sizeof smp);
  qd_log_rl(QD_LOG_NOTICE, "protocol error", (uint32_t)c->uid, "%s: protocol error %s: %s (bytes %s); closing", c->desc,
         qins_err_name(code), what, smp);
  qd_out_error(c, msgid, code, what);
  qd_conn_drain(c);
}

/* Reads and dispatches one complete request of n bytes at p. qp_scan has validated the message
 * (declared lengths and counts fit in it, nesting is bounded), so the envelope and params are read
 * in place with qp_rd_*: no unpack, no allocation. */
__attribute__((hot))
static void conn_dispatch(qd_conn *c, const char *p, size_t n) {
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
  qd_srv.st.requests_total++;
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
  qd_srv.st.per_method[m]++;
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
  if (qd_srv.stopping) {
    qd_reply_err(&r, QINS_ESHUTDOWN, "the daemon is shutting down");
    return;
  }
  if (qd_srv.store_err && strcmp(qd_methods[m].name, "hello") && strcmp(qd_methods[m].name, "ping") &&
      strcmp(qd_methods[m].name, "stats") && strcmp(qd_methods[m].name, "shutdown") &&
      strcmp(qd_methods[m].name, "release")) { /* releasing an arena lease reads nothing */
    qd_reply_err(&r, qd_srv.store_err, "%s", qd_srv.store_msg); /* never served from a broken store */
    return;
  }
  int rc = qd_methods[m].handler(&r);
  if (rc) qd_reply_err(&r, rc, "%s", r.msg[0] ? r.msg : qins_strerror(rc));
}

/* Starts or stops reading c as its state and backpressure say. */
__attribute__((hot))
static void conn_update_reading(qd_conn *c) {
  int want = qd_conn_can_dispatch(c) && !qd_srv.stopping && !c->eof;
  if (want && c->state == CONN_PAUSED) {
    if (c->sink) { /* embedded: qd_serve_bytes feeds its reads */
      conn_set_state(c, CONN_READING);
    } else if (qd_loop_watch(c) != 0) {
      qd_srv.st.connections_refused++;
      qd_out_error(c, 0, QINS_EBUSY, "the server cannot watch this connection: try again later");
      qd_conn_drain(c);
      conn_maybe_close(c);
    } else {
      conn_set_state(c, CONN_READING);
      qd_conn_read(c, 1); /* an edge that came while c was paused is not reported again */
    }
  } else if (!want && c->state == CONN_READING) {
    conn_set_state(c, CONN_PAUSED); /* it stays in the read set, just not read */
    if (!qd_srv.stopping) {
      qd_srv.st.paused_reads++;
      if (qd_mem_over() && c->queued + c->reserved > 0) qd_srv.st.memory_waits++;
      qd_log(QD_LOG_DEBUG, "%s: reading paused (%zu bytes held by queued answers, %u pending)",
             c->desc, c->queued, c->pending);
    }
  }
}

/* Fair turns: a client's turn ends after TURN_WORK bytes-equivalent of work (REQ_WORK a request
 * plus what job.c counts in qd_srv.jb.work: records planned, bytes decoded on the loop thread),
 * not after bytes read: a burst of tiny requests that each cost a decode (one-column slices)
 * then waits on the loop's again list behind the other clients (c->yield) instead of running
 * all at once. Embedded connections (qd_serve_bytes) have no other client and no again list. */
#define TURN_WORK (256u << 10)
#define REQ_WORK 512u

/* Frames and dispatches what is buffered, as far as backpressure and its turn allow. */
__attribute__((hot))
static void conn_process(qd_conn *c) {
  int partial = 0; /* what is left buffered is the start of a request, not a whole one */
  while (qd_conn_can_dispatch(c) && c->rpos < c->wpos) {
    if (c->turn_work >= TURN_WORK && !c->sink) {
      c->yield = 1; /* the rest of the buffer waits for its next turn (qd_conn_read) */
      qd_loop_again(c, 0);
      break;
    }
    size_t n = 0;
    const char *p = c->buf + c->rpos;
    int r = qp_scan_next(&c->scan, p, c->wpos - c->rpos, &n);
    if (r == QP_MORE) {
      partial = 1;
      break;
    }
    if (r < 0) {
      conn_protocol_error(c, 0, r, c->scan.what, p, c->wpos - c->rpos);
      c->rpos = c->wpos;
      break;
    }
    if (qd_srv.stopping) { /* buffered before the stop: answer SHUTDOWN without running it */
      qp_rd rd;
      uint32_t na;
      uint64_t v;
      uint32_t id = 0;
      qp_rd_init(&rd, p, n);
      if (qp_rd_array(&rd, &na) == 0 && na == 4 && qp_rd_skip(&rd) == 0 &&
          qp_rd_uint(&rd, &v) == 0 && v <= UINT32_MAX)
        id = (uint32_t)v;
      qd_out_error(c, id, QINS_ESHUTDOWN, "the daemon is shutting down");
    } else {
      uint64_t w0 = qd_srv.jb.work;
      conn_dispatch(c, p, n);
      c->turn_work += REQ_WORK + (qd_srv.jb.work - w0);
    }
    c->rpos += n;
    qp_scan_reset(&c->scan);
  }
  if (c->rpos == c->wpos) c->rpos = c->wpos = 0;
  /* Stopping, nothing whole is left to answer: a half-sent request is never read to its end, so
   * it must not hold the connection (and the shutdown) open. */
  if (qd_srv.stopping && (c->rpos == c->wpos || partial)) qd_conn_drain(c);
  if (c->eof && !c->yield && qd_conn_can_dispatch(c)) {
    /* Nothing complete is left to run. */
    if (c->wpos > c->rpos)
      qd_log(QD_LOG_VERBOSE, "%s: disconnected with %zu bytes of an unfinished request", c->desc,
             c->wpos - c->rpos);
    qd_conn_drain(c);
  }
  conn_update_reading(c);
}

__attribute__((hot))
void qd_conn_resume(qd_conn *c) {
  if (c->state == CONN_CLOSING || c->state == CONN_CLOSED) return;
  conn_process(c);
  conn_maybe_close(c);
}

/* ---- deferred requests (reply.h) ---------------------------------------------------------------
 * A request answered later (a pool job) counts in c->pending, its planned bytes in c->reserved:
 * backpressure state, so the read side keeps it. A job signals its end here, through reply.h;
 * the connection then may read and dispatch again, or close, or is freed if it already closed. */
void qd_req_defer(qd_req *r, uint64_t bytes) {
  r->conn->pending++;
  r->conn->reserved += bytes;
  qd_queued_add(bytes);
}

void qd_req_reserve(qd_conn *c, uint64_t bytes) {
  c->reserved += bytes;
  qd_queued_add(bytes);
}

void qd_req_unreserve(qd_conn *c, uint64_t bytes) {
  c->reserved -= bytes;
  qd_queued_sub(bytes);
}

void qd_req_done_deferred(qd_conn *c) {
  c->pending--;
  if (c->state == CONN_CLOSED) {
    if (c->pending == 0) qd_conn_free(c);
    return;
  }
  qd_conn_resume(c);
}

void qd_conn_alloc(qd_conn *c, uv_buf_t *out) {
  const size_t chunk = 64 * 1024;
  if (c->cap - c->wpos < chunk && c->rpos > 0) {
    memmove(c->buf, c->buf + c->rpos, c->wpos - c->rpos);
    c->wpos -= c->rpos;
    c->rpos = 0;
  }
  if (c->cap - c->wpos < chunk) {
    size_t ncap = c->cap ? c->cap * 2 : chunk;
    size_t lim = (size_t)qd_srv.cfg.max_request_bytes + chunk;
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

__attribute__((hot))
void qd_conn_on_bytes(qd_conn *c, ssize_t nread) {
  if (nread == UV_EOF) {
    /* The client finished sending (it may still read: shutdown(SHUT_WR)). Answer what is
     * buffered, then close (conn_process). */
    c->eof = 1;
    qd_conn_resume(c);
    return;
  }
  if (nread < 0) {
    qd_log(QD_LOG_VERBOSE, "%s: read error: %s", c->desc, uv_strerror((int)nread));
    qd_conn_close(c);
    return;
  }
  c->wpos += (size_t)nread;
  c->active_ns = qd_now_ns();
  qd_conn_resume(c);
}

void qd_conn_sweep_idle(uint64_t now) {
  uint64_t lim = qd_srv.cfg.idle_timeout_ms * 1000000ull;
  if (!lim) return;
  qd_conn *next;
  for (qd_conn *c = qd_srv.cn.all; c; c = next) {
    next = c->next;
    if (c->state != CONN_READING && c->state != CONN_PAUSED) continue;
    /* A worker reading leased arena bytes may send nothing for hours: closing it would end the
     * leases under the bytes it reads. */
    if (c->pending || c->queued || c->reserved || c->out != OUT_QUEUE || c->turns ||
        qd_map_conn_leased(c->id)) {
      c->active_ns = now; /* busy: idle time starts once it is done */
      continue;
    }
    if (now - c->active_ns < lim) continue;
    qd_log(QD_LOG_VERBOSE, "%s: idle for %llu ms (idle-timeout-ms): closing", c->desc,
           (unsigned long long)((now - c->active_ns) / 1000000));
    qd_srv.st.connections_idle_closed++;
    qd_conn_close(c);
  }
}

/* Open connections of peer uid (refused ones not counted). */
static uint64_t uid_connections(uid_t uid) {
  uint64_t n = 0;
  for (qd_conn *c = qd_srv.cn.all; c; c = c->next)
    n += c->uid == uid && !c->refused && c->state != CONN_CLOSING && c->state != CONN_CLOSED;
  return n;
}

/* Edge-triggered: a socket is reported again only when more bytes arrive, so it is read until a
 * short read (drained) or EAGAIN; with `all` until EAGAIN or end of stream, since a short read
 * says nothing about a FIN behind the bytes. A client sending without pause gets
 * RSET_READ_BUDGET bytes a turn (4 full reads): then it goes on the loop's again list, read
 * after the next round's events, so the others and libuv get theirs. */
#define RSET_READ_BUDGET (256u << 10)
__attribute__((hot))
void qd_conn_read(qd_conn *c, int all) {
  if (c->in_read) return; /* resumed from inside its own read: the loop below goes on */
  c->in_read = 1;
  size_t budget = RSET_READ_BUDGET;
  c->turn_work = 0; /* a new turn */
  if (c->yield) {  /* requests left from its last turn go first */
    c->yield = 0;
    qd_conn_resume(c);
  }
  while (c->state == CONN_READING) {
    if (budget == 0 || c->yield) {
      qd_srv.st.reads_yielded++;
      qd_loop_again(c, all);
      break;
    }
    uv_buf_t b;
    qd_conn_alloc(c, &b);
    if (b.len == 0) { /* libuv reports an empty buffer as UV_ENOBUFS */
      qd_conn_on_bytes(c, UV_ENOBUFS);
      break;
    }
    if (b.len > budget) b.len = (unsigned)budget; /* a large buffer (after a large request) */
    ssize_t n = read(c->fd, b.base, b.len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    qd_conn_on_bytes(c, n < 0 ? -errno : n == 0 ? UV_EOF : n); /* UV errors are -errno on Unix */
    if (n <= 0 || (!all && (size_t)n < b.len)) break;
    budget = (size_t)n < budget ? budget - (size_t)n : 0;
  }
  c->in_read = 0;
}

/* ---- accept --------------------------------------------------------------------------------- */
/* Turns c away with code and msg (msgid 0), then closes it. */
static void conn_refuse(qd_conn *c, int code, const char *msg) {
  c->refused = 1; /* never counted as an open connection */
  qd_out_error(c, 0, code, msg);
  qd_conn_drain(c);
  conn_maybe_close(c);
}

/* Access control at connect (docs/PROTOCOL.md §5): a peer that may not call read methods may call
 * nothing (admin methods need even more), so it gets DENIED with msgid 0 and a close, like BUSY,
 * and the refusal is logged with its pid, uid and gid. Supplementary groups come from
 * SO_PEERGROUPS (Linux 4.13+); without it only the primary gid counts. 1 if allowed. */
static int peer_allowed(qd_conn *c, uv_os_fd_t fd) {
  gid_t groups[256];
  size_t ng = 0;
  if (qd_srv.cfg.allow_gid.n && c->uid != (uid_t)-1) {
    socklen_t gl = sizeof groups;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &gl) == 0) ng = gl / sizeof(gid_t);
  }
  if (qd_peer_may_read(c->uid, c->gid, groups, ng)) return 1;
  qd_srv.st.connections_denied++;
  qd_log_rl(QD_LOG_WARNING, "refused: not in allow-uid/allow-gid", (uint32_t)c->uid,
            "%s refused: pid %d uid %u gid %u is not in allow-uid/allow-gid; closing",
         c->desc, (int)c->pid, (unsigned)c->uid, (unsigned)c->gid);
  char msg[160];
  snprintf(msg, sizeof msg, "uid %u (gid %u) may not use this daemon (not in allow-uid/allow-gid)",
           (unsigned)c->uid, (unsigned)c->gid);
  conn_refuse(c, QINS_EDENIED, msg);
  return 0;
}

/* Fds kept, below the fd limit's room for connections, for connects to be answered BUSY. */
#define BUSY_FDS 8
uint64_t qd_conn_limit(void) {
  uint64_t f = qd_srv.lp.fd_conns;
  if (f && f - (f > BUSY_FDS ? BUSY_FDS : f - 1) < qd_srv.cfg.max_connections)
    return f - (f > BUSY_FDS ? BUSY_FDS : f - 1);
  return qd_srv.cfg.max_connections;
}

void qd_conn_accept(uv_stream_t *listener) {
  qd_conn *c = qd_conn_new();
  if (!c) {
    qd_log(QD_LOG_WARNING, "out of memory accepting a client");
    return;
  }
  uv_pipe_init(qd_srv.loop, &c->pipe, 0);
  c->pipe.data = c;
  if (uv_accept(listener, (uv_stream_t *)&c->pipe) != 0) {
    snprintf(c->desc, sizeof c->desc, "client %llu", (unsigned long long)c->id);
    c->refused = 1;
    qd_conn_close(c);
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
  qd_srv.st.connections_total++;
  if (!peer_allowed(c, fd)) return;
  if (qd_srv.st.connections >= qd_conn_limit()) {
    qd_srv.st.connections_refused++;
    qd_log_rl(QD_LOG_WARNING, "refused: BUSY", (uint32_t)c->uid, "%s refused: %llu connections open (%s)", c->desc,
           (unsigned long long)qd_srv.st.connections,
           qd_conn_limit() < qd_srv.cfg.max_connections ? "the fd limit, RLIMIT_NOFILE"
                                                         : "max-connections");
    conn_refuse(c, QINS_EBUSY, "too many connections: try again later");
    return;
  }
  uint64_t per_uid;
  if (c->uid != 0 && c->uid != getuid() &&
      (per_uid = uid_connections(c->uid) - 1) >= qd_srv.cfg.max_connections_per_uid) {
    qd_srv.st.connections_refused++;
    qd_log_rl(QD_LOG_WARNING, "refused: BUSY", (uint32_t)c->uid,
              "%s refused: uid %u has %llu connections open (max-connections-per-uid)",
           c->desc, (unsigned)c->uid, (unsigned long long)per_uid);
    char msg[160];
    snprintf(msg, sizeof msg, "too many connections from uid %u (max-connections-per-uid %llu): "
             "try again later", (unsigned)c->uid, (unsigned long long)qd_srv.cfg.max_connections_per_uid);
    conn_refuse(c, QINS_EBUSY, msg);
    return;
  }
  qd_srv.st.connections++;
  c->active_ns = qd_now_ns();
  qd_log(QD_LOG_VERBOSE, "%s connected (gid %u)", c->desc, (unsigned)c->gid);
  conn_update_reading(c);
}
