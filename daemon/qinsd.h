/* SPDX-License-Identifier: MIT */
/*
 * qinsd.h — internal header of the qins daemon (qd_): configuration, logging, statistics, the
 * server core and the method table. Wire contract: docs/PROTOCOL.md; options: docs/qinsd.conf.example.
 *
 * Threads: everything here runs on the libuv loop thread except qd_job_run, which a thread-pool
 * worker calls for large decodes; a job owns its own LMDB read txn (begun, used and ended on the
 * thread that decodes; the env is MDB_NOTLS) and touches no shared state but the decode-time
 * counter (atomic) and, for a streamed get, its grant of the socket, shared with the loop under
 * the job's mutex: while granted, the worker writes to the client's fd itself (qd_direct_begin;
 * the loop then writes nothing to it and does not close it), within a bounded budget (commands.c).
 */
#ifndef QINS_QINSD_H
#define QINS_QINSD_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <msgpack.h>
#include <uv.h>

#include "proto.h"
#include "qins.h"
#include "store.h"

#define QD_SERVER_NAME "qinsd " QINS_VERSION_STRING

/* ---- configuration (config.c) ---------------------------------------------------------------- */
/* A list of uids or gids (allow-uid, allow-gid): entries appended by each flag or config line. */
typedef struct qd_idlist {
  uint32_t *v; /* the ids */
  size_t n;    /* how many */
} qd_idlist;

typedef struct qd_config {
  char *store;                 /* store directory */
  char *socket;                /* socket path */
  char *config;                /* config file read, or NULL */
  char *log;                   /* log file; NULL or "" for stderr */
  int log_level;               /* QD_LOG_* */
  unsigned socket_mode;        /* mode bits of the socket file */
  char *socket_group;          /* socket-group as given (name or gid); NULL or "": left as created */
  gid_t socket_gid;            /* socket_group resolved at load */
  qd_idlist allow_uid;         /* peers allowed to read, by uid; both lists empty: anyone who connects */
  qd_idlist allow_gid;         /* ... by primary or supplementary gid */
  uint64_t max_request_bytes;  /* largest request accepted */
  uint64_t max_response_bytes; /* largest response sent (<= 2^32 - 1) */
  uint64_t max_connections;    /* concurrent connections */
  uint64_t max_ranges;         /* slice ranges per request */
  uint64_t inline_decode_bytes; /* decodes with output up to this run on the loop thread */
  uint64_t write_queue_bytes;  /* memory held by a client's unsent responses above this pauses
                                  reading its requests */
  uint64_t max_pending;        /* requests of one client being answered at a time */
  uint64_t shutdown_timeout_ms; /* after SIGTERM, connections still busy after this are cut */
  uint64_t threads;            /* decode threads (libuv pool size) */
  uint64_t buffer_cache_bytes; /* decoded-payload buffers kept for reuse */
  uint64_t stream_min_bytes;   /* gets at least this large are sent while being decoded (0: never) */
  uint64_t stream_piece_bytes; /* decode (and send) streamed gets in pieces of about this size */
} qd_config;

extern qd_config qd_cfg;
/* Parses defaults, the config file (--config) and flags. Exits 0 after --help/--methods, 2 with a
 * message naming the option on a bad value. Returns 1 if --check was given (validate only). */
int qd_config_load(int argc, char **argv);
void qd_config_help(FILE *out);
/* 1 if a peer with these credentials may call read methods: the daemon's own uid, root, or (with
 * allow lists) a listed uid or a listed gid among gid and groups[0..ngroups); without allow lists
 * everyone who can connect may (the socket's mode and group are the gate). docs/PROTOCOL.md §5. */
int qd_peer_may_read(uid_t uid, gid_t gid, const gid_t *groups, size_t ngroups);

/* ---- logging (log.c) --------------------------------------------------------------------------- */
enum { QD_LOG_DEBUG = 0, QD_LOG_VERBOSE = 1, QD_LOG_NOTICE = 2, QD_LOG_WARNING = 3 };
extern int qd_log_level;
/* Checks the level before evaluating the arguments. One line per call: `pid time level msg`. */
#define qd_log(level, ...)                                            \
  do {                                                                \
    if ((level) >= qd_log_level) qd__log_write((level), __VA_ARGS__); \
  } while (0)
void qd__log_write(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int qd_log_open(const char *path); /* NULL/"" = stderr; 0 or -errno */
int qd_log_level_from_name(const char *s);
const char *qd_log_level_name(int level);

/* ---- statistics (server.c) --------------------------------------------------------------------- */
#define QD_LAT_SAMPLES 8192 /* latency ring: enough for stable p99 of recent traffic */
#define QD_ERR_SLOTS 64     /* project codes -1000 .. -1063 */
typedef struct qd_stats {
  uint64_t start_ns;           /* daemon start */
  uint64_t connections;        /* open now */
  uint64_t connections_total;  /* accepted since start */
  uint64_t connections_refused; /* turned away: BUSY */
  uint64_t connections_denied; /* turned away: DENIED (not in allow-uid/allow-gid) */
  uint64_t requests;           /* all requests */
  uint64_t *per_method;        /* indexed like qd_methods */
  uint64_t errors[QD_ERR_SLOTS]; /* per project code: errors[-1000 - code] */
  uint64_t bytes_served;       /* response bytes written */
  atomic_uint_fast64_t decode_ns; /* time in qs_tensor_read, any thread */
  uint64_t inline_decodes, pool_decodes; /* where gets were decoded */
  uint64_t lat_ns[QD_LAT_SAMPLES]; /* ring of recent request latencies */
  uint64_t lat_n;              /* samples written (ring index = lat_n % QD_LAT_SAMPLES) */
  uint64_t paused_reads;       /* times a client's reading was paused by backpressure */
  uint64_t reads_yielded;      /* times a client used its read budget and let the others go */
  uint64_t queued_bytes;       /* memory held by queued responses, plus bytes reserved by pending
                                  decodes, all clients */
  uint64_t queued_peak;        /* the most queued_bytes has been */
} qd_stats;
extern qd_stats qd_st;
uint64_t qd_now_ns(void);
void qd_latency_quantiles(double *p50_us /* out */, double *p99_us /* out */);

/* ---- server core (server.c) ------------------------------------------------------------------- */
typedef struct qd_conn qd_conn;
typedef void (*qd_sink_fn)(void *ud, const void *p, size_t n); /* embedded responses (below) */

/* One request being answered. Lives on the stack for inline methods; get/get_many copy what they
 * need into a qd_job. */
#define QD_PARAM_KEYS 8 /* params keys indexed per request (methods take at most 6) */
typedef struct qd_req {
  qd_conn *conn;                 /* the client */
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

extern qs_store *qd_store;
int qd_server_run(void); /* the whole daemon life; returns the exit status */
void qd_shutdown_begin(const char *why);
uint64_t qd_conn_id(const qd_conn *c);
uid_t qd_conn_uid(const qd_conn *c);
const char *qd_conn_desc(const qd_conn *c); /* "client 7 (pid 123 uid 1000)" */

/* Sends a packed response (sb's buffer is taken over; sb is left empty) and records latency.
 * payload (may be NULL) is owned by the server from then on: released after the write. */
typedef struct qd_payload {
  size_t head_len; /* bytes of the sbuffer sent first (0: all of it); bufs may point further in */
  uv_buf_t *bufs;  /* header/payload pieces to writev, in order, after the packed prefix */
  unsigned nbufs;  /* count */
  void *owned;     /* buffer released (qd_buf_release) after the write; may be NULL */
  size_t owned_cap; /* its capacity */
} qd_payload;
void qd_reply(qd_req *r, msgpack_sbuffer *sb, const qd_payload *pl /* may be NULL */);
/* Sends the n packed response bytes at p (not taken over: written now if the socket takes them
 * all, else the rest is copied and queued) and records latency. */
void qd_reply_copy(qd_req *r, const char *p, size_t n);
/* Sends [1, msgid, [code, message], nil], logs it naming the client, counts it. */
void qd_reply_err(qd_req *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* A pending request finishes later (thread pool): the connection keeps a slot for it and counts
 * `bytes` (its planned response) against its write queue until qd_req_done_deferred. */
void qd_req_defer(qd_req *r, uint64_t bytes);
/* Releases the reservation (call before queueing the reply, so it is not counted twice). */
void qd_req_unreserve(qd_conn *c, uint64_t bytes);
/* The deferred request is answered: may resume reading, or free a connection already closed. */
void qd_req_done_deferred(qd_conn *c);

/* Streamed responses (commands.c, large gets): while a stream owns c, every other response to c
 * is held and sent after qd_stream_end, so responses never interleave on the socket. Pieces are
 * not owned: done(ud) is called when each piece's write finished or was dropped. A broken stream
 * (an error after its header went out) closes the connection. */
/* 1 if the stream may write now; else wake(ud) is called later, when it may (streams on one
 * connection take turns, in order; a closing connection wakes everyone). */
int qd_stream_acquire(qd_conn *c, void (*wake)(void *), void *ud);
void qd_stream_write(qd_conn *c, char *head /* taken over; may be NULL */, size_t head_len,
                     uv_buf_t piece, void (*done)(void *), void *ud);
void qd_stream_end(qd_conn *c, int broken);
/* Direct writes: a streamed get's pool worker writes head and payload to the socket itself
 * (send + poll, no copy into libuv's queue; commands.c). Only while its stream owns the socket
 * and libuv has nothing queued for it: qd_direct_begin returns the fd (>= 0) for the worker;
 * -2 when libuv still has writes queued (drained(ud) is called once they are written, or when
 * the connection closes); -1 when there is no socket to write (closing, or embedded). Until
 * qd_direct_end (which counts the worker's bytes as served), closing the connection shuts the
 * socket down (the worker's next write fails) and defers closing the fd. qd_direct_cancel drops
 * a pending drained callback registered with ud. Loop thread only. */
int qd_direct_begin(qd_conn *c, void (*drained)(void *), void *ud);
void qd_direct_cancel(qd_conn *c, void *ud);
void qd_direct_end(qd_conn *c, uint64_t bytes);
int qd_conn_closing(const qd_conn *c);
void qd_latency_record(uint64_t t0);
void qd_count_error(int code);

/* Embedding, for fuzzing (tests/fuzz/request.c): the server without a socket, listener or signals.
 * qd_embed_init sets up what qd_server_run would (qd_cfg loaded and qd_store open first);
 * qd_serve_bytes then plays `in` as one client's whole byte stream, fed in reads of at most
 * `piece` bytes (0: as large as the read buffer allows) through the same read buffer, framing,
 * dispatch, backpressure and replies as a socket client, followed by end of stream; it runs the
 * loop (pool decodes and streamed gets included) until that connection has closed and been freed.
 * Every response byte goes to sink, in stream order, as soon as it is written. The client has no
 * credentials (uid -1): admin methods get DENIED. Returns 0, QINS_ENOMEM, or QINS_EINTERNAL if the
 * connection would never close (a server bug). qd_embed_fini runs the loop dry and frees. */
int qd_embed_init(void);
int qd_serve_bytes(const void *in, size_t len, size_t piece, qd_sink_fn sink, void *ud);
void qd_embed_fini(void);

/* Payload buffers: a small cache so 64 MiB responses do not page-fault a fresh mapping each time. */
void *qd_buf_get(size_t n, size_t *cap /* out */);
void qd_buf_release(void *p, size_t cap);

/* ---- methods (commands.c) --------------------------------------------------------------------- */
enum { QD_READONLY = 1, QD_ADMIN = 2 };
typedef int (*qd_handler)(qd_req *r); /* 0: replied (or deferred); else an error code, r->msg */
typedef struct qd_method {
  const char *name;     /* wire name */
  unsigned flags;       /* QD_READONLY, QD_ADMIN */
  qd_handler handler;   /* runs on the loop thread */
  const char *params;   /* named arguments, for --methods and docs */
  const char *summary;  /* one line */
} qd_method;
extern const qd_method qd_methods[];
extern const int qd_n_methods;
int qd_method_find(const char *name, size_t len); /* index or -1 */

#endif /* QINS_QINSD_H */
