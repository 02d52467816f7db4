/* SPDX-License-Identifier: MIT */
/*
 * qinsd.h — the daemon's shared header (qd_): configuration, logging, statistics and the one
 * server struct that holds the daemon's state. Wire contract: docs/PROTOCOL.md; options:
 * docs/qinsd.conf.example; the design picture below is also in docs/qinsd.md.
 *
 * The serving core, one layer per file; requests travel down, and handlers and jobs answer
 * down through reply.h, the connection layer's interface (out.c implements the replies and
 * streams, conn.c the deferral count its backpressure reads: the two files are the two halves of
 * the connection layer, conn.h). Calls up are notifications only: out.c tells conn.c that a
 * queued write finished (the connection may read again) or failed (it closes); conn.c and out.c
 * tell loop.c what to watch (qd_loop_watch, qd_loop_again; qd_loop_touch: libuv has a new handle
 * or a close to run before the loop waits); a stream that waited for its turn is completed
 * through the callback its job gave (reply.h). docs/qinsd.md walks a small and a streamed get.
 *
 *   loop.c     the one readiness loop: an epoll read set of client sockets (edge-triggered,
 *     |        arrival order) with libuv's own epoll fd inside it; the listener (or the socket
 *     |        systemd passes), signals, shutdown, the daemon's life.
 *     v        a readable connection
 *   conn.c     connections, read side: buffer, framing (proto's qp_scan), envelope, dispatch,
 *     |        the connection state machine (conn.h), backpressure.
 *     v        qd_req: no fd, no libuv
 *   methods.c  the method table (methods.h); handlers answer through reply.h.
 *     |
 *     v        get / get_many: a qd_ask
 *   job.c      decode jobs (job.h): plan and decode in one LMDB read txn, on the loop thread when
 *     |        small, on the pool when large; a large single get streams its pieces.
 *     v        reply.h: a reply, a deferral, a stream
 *   out.c      connections, write side: the only code that writes to a client socket (write
 *              queue, held replies, streams, the lent state); conn.c keeps the deferral count.
 *   store/     (store.h) snapshots, tensor records, decode: called by methods.c and job.c.
 *
 * Side files: config.c (the option table), log.c, stats.c (counters, latency ring, the payload
 * buffer cache), main.c.
 *
 * Threads: everything runs on the loop thread except a pool job's work (job.c: plan, decode, and
 * for a streamed get the writes of its pieces, through the connection's lent state, out.c). A
 * job owns its own LMDB read txn (the env is MDB_NOTLS) and touches no shared state but the
 * decode-time counter (atomic), the buffer cache (mutex) and its stream (out.c, mutex).
 *
 * The functions a small get runs through (the walk in docs/qinsd.md, here and in store/ and
 * proto/) are marked __attribute__((hot)): the compiler places them together, so the path's
 * code, spread over a dozen files, still fits the instruction cache.
 */
#ifndef QINS_QINSD_H
#define QINS_QINSD_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <uv.h>

#include "proto.h"
#include "qins_base.h"
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
  char *store_group;           /* store-group: files qinsd creates in the store get it, mode 0640 */
  gid_t store_gid;             /* store_group resolved at load */
  qd_idlist allow_uid;         /* peers allowed to read, by uid; both lists empty: anyone who connects */
  qd_idlist allow_gid;         /* ... by primary or supplementary gid */
  uint64_t max_request_bytes;  /* largest request accepted */
  uint64_t max_response_bytes; /* largest response sent (<= 2^32 - 1) */
  uint64_t max_connections;    /* concurrent connections */
  uint64_t max_connections_per_uid; /* concurrent connections of one peer uid (not root, not ours) */
  uint64_t idle_timeout_ms;    /* a connection with nothing in flight this long is closed; 0: never */
  uint64_t max_ranges;         /* slice ranges per request */
  uint64_t inline_decode_bytes; /* decodes with output up to this run on the loop thread */
  uint64_t write_queue_bytes;  /* memory held by a client's unsent responses above this pauses
                                  reading its requests */
  uint64_t max_response_memory; /* memory held for responses and pending decodes, all clients:
                                  at or above it, clients holding some are not read and pool
                                  decodes get BUSY (stats.c) */
  uint64_t max_pending;        /* requests of one client being answered at a time */
  uint64_t shutdown_timeout_ms; /* after SIGTERM, connections still busy after this are cut */
  uint64_t threads;            /* decode threads (libuv pool size) */
  uint64_t buffer_cache_bytes; /* decoded-payload buffers kept for reuse */
  uint64_t stream_min_bytes;   /* gets at least this large are sent while being decoded (0: never) */
  uint64_t stream_piece_bytes; /* decode (and send) streamed gets in pieces of about this size */
  uint64_t arena_bytes;        /* the decoded-weights arena's size (map.c); 0: none */
  uint64_t arena_max_leases;   /* arena leases per connection */
  uint64_t arena_warm_bytes;   /* arena pages kept created ahead of use once attached (map.c) */
} qd_config;

/* Parses defaults, the config file (--config) and flags into qd_srv.cfg. Exits 0 after
 * --help/--methods, 2 with a message naming the option on a bad value. Returns 1 if --check was
 * given (validate only). */
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
/* Rate-limited lines, for what a client can repeat at will (refusals, denied or failed requests,
 * protocol errors): per kind (a string constant) and peer uid, QD_LOG_BURST lines per
 * QD_LOG_WINDOW_S seconds; the rest are counted and, when the window ends, one line says how
 * many were suppressed. CHECKSUM and CORRUPT lines never go through here: they always appear. */
#define QD_LOG_BURST 10
#define QD_LOG_WINDOW_S 10
#define qd_log_rl(level, kind, peer, ...)                                                  \
  do {                                                                                    \
    if ((level) >= qd_log_level && qd_log_admit((kind), (peer))) qd__log_write((level), __VA_ARGS__); \
  } while (0)
int qd_log_admit(const char *kind, uint32_t peer); /* 1: write the line; 0: counted, suppressed */
void qd_log_flush(int all); /* suppression counts of ended windows (all: every window) */
int qd_log_open(const char *path); /* NULL/"" = stderr; 0 or -errno */
/* Copies n bytes of src into dst (cap bytes, NUL-terminated) with control characters, DEL
 * and bytes that are not UTF-8 written as \xNN (cut at a whole character when full):
 * text a client chose, made safe for a log line or a msgpack str. Returns the length written. */
size_t qd_escape(char *dst, size_t cap, const char *src, size_t n);
int qd_log_level_from_name(const char *s);
const char *qd_log_level_name(int level);

/* ---- statistics and payload buffers (stats.c) ------------------------------------------------ */
#define QD_LAT_SAMPLES 8192 /* latency ring: enough for stable p99 of recent traffic */
#define QD_ERR_SLOTS 64     /* project codes -1000 .. -1063 */
typedef struct qd_stats {
  uint64_t start_ns;           /* daemon start */
  uint64_t connections;        /* open now */
  uint64_t connections_total;  /* accepted since start */
  uint64_t connections_refused; /* turned away: BUSY */
  uint64_t connections_denied; /* turned away: DENIED (not in allow-uid/allow-gid) */
  uint64_t connections_idle_closed; /* closed after idle-timeout-ms */
  uint64_t accept_failed;      /* accepts that failed (EMFILE/ENFILE: the fd limit) */
  uint64_t requests_total;     /* all requests */
  uint64_t *per_method;        /* indexed like qd_methods */
  uint64_t errors[QD_ERR_SLOTS]; /* per project code: errors[-1000 - code] */
  uint64_t bytes_served;       /* response bytes written */
  atomic_uint_fast64_t decode_ns; /* time in the store's reads, summed over threads */
  uint64_t inline_decodes, pool_decodes; /* where gets were decoded */
  uint64_t pool_plans;         /* get_many planned on the pool (many names, or a prefix) */
  uint64_t lat_ns[QD_LAT_SAMPLES]; /* ring of recent request latencies */
  uint64_t lat_n;              /* samples written (ring index = lat_n % QD_LAT_SAMPLES) */
  uint64_t paused_reads;       /* times a client's reading was paused by backpressure */
  uint64_t reads_yielded;      /* times a client used its read budget and let the others go */
  uint64_t queued_bytes;       /* memory held by queued responses, plus bytes reserved by pending
                                  decodes, all clients */
  uint64_t queued_peak;        /* the most queued_bytes has been */
  uint64_t memory_waits;       /* times a client's reading was paused by max-response-memory */
  uint64_t memory_refused;     /* large gets answered BUSY while at max-response-memory */
  uint64_t memory_trims;       /* times memory was given back to the system (all clients gone) */
} qd_stats;

uint64_t qd_now_ns(void);
void qd_latency_record(uint64_t t0);
void qd_latency_quantiles(double *p50_us /* out */, double *p99_us /* out */);
void qd_count_error(int code);
void qd_queued_add(uint64_t n);
void qd_queued_sub(uint64_t n);
/* 1 while queued_bytes is at or above max-response-memory (stats.c). */
int qd_mem_over(void);
/* Loop thread, before waiting (loop.c): when the global bound was left, resumes the connections
 * it paused; when nothing is held and no client is connected, empties the payload buffer cache
 * and gives freed memory back to the system (malloc_trim). */
void qd_mem_wake(void);
int qd_stats_init(void); /* 0 or QINS_ENOMEM */
void qd_stats_fini(void);

/* Payload buffers: a small cache so 64 MiB responses do not page-fault a fresh mapping each time.
 * Any thread. */
void *qd_buf_get(size_t n, size_t *cap /* out */);
void qd_buf_release(void *p, size_t cap);

/* ---- the server: every piece of the daemon's state, grouped by the file that owns it ---------- */
#define QD_BUF_SLOTS 8 /* payload buffers kept (stats.c) */
typedef struct qd_conn qd_conn;
typedef struct qd_server {
  qd_config cfg;               /* config.c: set at start, read-only after (tests may tune) */
  qd_stats st;                 /* stats.c and everyone (loop thread, but decode_ns) */
  qs_store *store;             /* opened by loop.c, read by job.c and methods.c */
  uv_loop_t *loop;             /* loop.c: libuv's loop (timers, signals, pool, queued writes) */
  int stopping;                /* loop.c: shutdown began (read by conn.c and methods.c) */
  int store_err;               /* loop.c: qs_store_check failed (QINS_EIO/ECORRUPT): store methods
                                  get it (conn.c) with store_msg */
  char store_msg[512];
  struct {                     /* loop.c */
    uv_pipe_t listener;        /* the listening socket */
    int listening;             /* listener open */
    int activated;             /* the listener came from systemd (LISTEN_FDS): not ours to unlink */
    struct stat sock_st;       /* our socket file, to remove it only if still ours */
    uv_signal_t sig_term, sig_int, sig_hup;
    int signals;               /* the signal handles are open (until shutdown finishes) */
    uv_timer_t shutdown_timer;
    uv_timer_t tick;           /* every second while serving: store check, idle connections */
    int rset_fd;               /* the read set (epoll), while the loop runs; else -1 */
    int dirty;                 /* libuv has fd watchers to (re)register: run it before waiting */
    int failed;                /* epoll_wait failed: shutting down, exit status 1 */
    uint64_t fd_conns;         /* connections (refused ones included) the fd limit leaves room for */
    int accept_held;           /* a connect waits in the backlog until a connection is freed */
    qd_conn *again_head, *again_tail; /* connections to read again next round, in order */
    size_t again_n;            /* how many */
  } lp;
  struct {                     /* conn.c */
    qd_conn *all;              /* every connection not yet freed */
    uint64_t next_id;          /* next client number, from 1 */
    uint64_t n_open;           /* connections not yet freed (refused ones included) */
  } cn;
  struct {                     /* job.c */
    struct job *spare;         /* one freed job kept for the next request */
    uint64_t work;             /* work done on the loop thread, in bytes-equivalent (planning,
                                  inline decodes): conn.c counts a client's turn by it */
  } jb;
  struct {                     /* stats.c: the payload buffer cache */
    struct { void *p; size_t cap; } slot[QD_BUF_SLOTS];
    size_t cached;             /* bytes held */
    uv_mutex_t mu;             /* qd_buf_get runs on pool threads too */
  } bufs;
  struct {                     /* stats.c: the global response memory bound */
    int wake;                  /* qd_mem_wake has work: the bound was left, or a trim is due */
    uint64_t high;             /* the most queued_bytes has been since the last trim */
  } mem;
} qd_server;
extern qd_server qd_srv;

/* ---- the daemon's life (loop.c) -------------------------------------------------------------- */
int qd_server_run(void); /* the whole daemon life; returns the exit status */
/* Stops accepting, finishes what is in flight, then the loop returns (SIGTERM, `shutdown`). */
void qd_shutdown_begin(const char *why);

/* Embedding, for fuzzing (tests/fuzz/request.c): the server without a socket, listener or signals.
 * qd_embed_init sets up what qd_server_run would (qd_srv.cfg loaded and qd_srv.store open first);
 * qd_serve_bytes then plays `in` as one client's whole byte stream, fed in reads of at most
 * `piece` bytes (0: as large as the read buffer allows) through the same read buffer, framing,
 * dispatch, backpressure and replies as a socket client, followed by end of stream; it runs the
 * loop (pool decodes and streamed gets included) until that connection has closed and been freed.
 * Every response byte goes to sink, in stream order, as soon as it is written. The client has no
 * credentials (uid -1): admin methods get DENIED. Returns 0, QINS_ENOMEM, or QINS_EINTERNAL if the
 * connection would never close (a server bug). qd_embed_fini runs the loop dry and frees. */
typedef void (*qd_sink_fn)(void *ud, const void *p, size_t n);
int qd_embed_init(void);
int qd_serve_bytes(const void *in, size_t len, size_t piece, qd_sink_fn sink, void *ud);
void qd_embed_fini(void);

#endif /* QINS_QINSD_H */
