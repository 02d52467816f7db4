/* SPDX-License-Identifier: MIT */
/*
 * daemon.h — test support (ts_): start a real qinsd on a temporary store and socket, talk raw
 * msgpack-RPC to it, and fill stores. STYLE.md 21; PITFALLS.md (LMDB, Criterion).
 *
 * Layout per test: mkdtemp("/tmp/qins-XXXXXX") (short: sun_path holds 107 bytes) holding
 *   DIR/s      the socket      DIR/store  the LMDB store      DIR/log  qinsd's log
 * The daemon is found at $QINS_BUILD/qinsd (QINS_BUILD defaults to "build").
 *
 * Invariants: the test process never opens an LMDB env itself (it forks the daemon and the store
 * fillers, and a process must not fork with an env open): stores are filled in a forked child
 * (ts_store_fill) that opens, writes, closes and exits. The daemon gets PR_SET_PDEATHSIG, so even
 * a test that crashes or times out before its .fini leaves no qinsd behind; ts_daemon_stop sends
 * SIGTERM, waits (bounded), then SIGKILLs. No fixed sleeps: readiness is polled (connect + ping
 * every 10 ms, up to 10 s).
 */
#ifndef QINS_TS_DAEMON_H
#define QINS_TS_DAEMON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <msgpack.h>

#include "store.h"

typedef struct ts_daemon {
  char dir[64];    /* /tmp/qins-XXXXXX */
  char sock[96];   /* DIR/s */
  char store[96];  /* DIR/store */
  char log[96];    /* DIR/log */
  pid_t pid;       /* qinsd, or 0 */
} ts_daemon;

/* Creates the temp dir and fills in the paths (the store dir is created, empty). 0 or -errno. */
int ts_dir_make(ts_daemon *d);
/* Starts qinsd --socket --store --log [extra args, NULL-terminated] and waits until it answers
 * ping (10 s at most). 0, or -1 (the log is dumped to stderr). */
int ts_daemon_start(ts_daemon *d, const char *const *extra);
/* SIGTERM, wait up to 15 s, SIGKILL. Returns the wait status (or -1 if there was no daemon). */
int ts_daemon_stop(ts_daemon *d);
/* Waits up to timeout_ms for the daemon to exit by itself; returns its wait status, or -1. */
int ts_daemon_wait(ts_daemon *d, int timeout_ms);
/* Stops the daemon if running and removes DIR; dumps the log to stderr if dump_log. */
void ts_dir_remove(ts_daemon *d, int dump_log);
/* Prints DIR/log to stderr. */
void ts_log_dump(const ts_daemon *d);
/* Path of a built binary: $QINS_BUILD/name. */
const char *ts_build_path(const char *name, char *buf, size_t cap);

/* ---- filling stores (in a forked child) ------------------------------------------------------- */
typedef int (*ts_fill_fn)(qs_store *s, void *ud);
/* Forks; the child opens store_dir (created if needed), runs fn, closes, exits with fn's status.
 * Returns fn's result (0 on success) or -1. */
int ts_store_fill(const char *store_dir, ts_fill_fn fn, void *ud);
/* Inside a fill: imports one tensor of f32 data (codec QC_F32: exact, or any codec given) into the
 * open import. */
int ts_import_f32(qs_import *im, const char *name, int ndim, const uint64_t *shape, int codec,
                  const float *data);
/* Inside a fill: imports one raw i32 tensor. */
int ts_import_i32(qs_import *im, const char *name, int ndim, const uint64_t *shape,
                  const int32_t *data);
/* Deterministic test values: element i of a tensor seeded by seed. */
float ts_value(uint64_t seed, uint64_t i);

/* ---- raw msgpack-RPC ------------------------------------------------------------------------- */
/* Connects to a Unix socket: fd or -errno. */
int ts_connect(const char *path);
/* Writes all of buf (blocking). 0 or -errno (EPIPE when the peer closed). */
int ts_send(int fd, const void *buf, size_t len);

typedef struct ts_rx {
  int fd;                 /* the connection */
  msgpack_unpacker up;    /* responses (trusted: only the daemon writes here) */
  msgpack_unpacked res;   /* the last response */
} ts_rx;
void ts_rx_init(ts_rx *rx, int fd);
void ts_rx_destroy(ts_rx *rx);
/* Reads one whole message (waits up to timeout_ms). Returns 1 and *out (valid until the next call)
 * on success, 0 on a clean EOF, -1 on error or timeout. */
int ts_rx_next(ts_rx *rx, int timeout_ms, const msgpack_object **out /* out */);

/* Request building: ts_req_begin packs [0, msgid, method, and a params array of one map of
 * nkeys keys (nkeys < 0: params = []); then pack the keys and values with pk. */
void ts_req_begin(msgpack_sbuffer *sb, msgpack_packer *pk, uint32_t msgid, const char *method,
                  int nkeys);

/* One round trip on a fresh rx: sends sb, reads the response to msgid. Returns the response
 * array (valid until the next rx call) or NULL. */
const msgpack_object *ts_call(ts_rx *rx, const msgpack_sbuffer *sb, uint32_t msgid);
/* Helpers on a response [1, msgid, error, result]: the error code (0 if nil) and the result. */
int ts_resp_code(const msgpack_object *resp);
const char *ts_resp_msg(const msgpack_object *resp); /* static copy of the error text, or "" */
const msgpack_object *ts_resp_result(const msgpack_object *resp);
/* Simple calls: ping over a new connection; 0 when "pong" came back. */
int ts_ping(const char *sock);

#endif /* QINS_TS_DAEMON_H */
