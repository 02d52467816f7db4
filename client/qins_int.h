/* SPDX-License-Identifier: MIT */
/*
 * qins_int.h — libqins internals shared by its files (qcl_): client/qins.c owns the connection and
 * the call machinery (one request in flight, bounded response scanner); client/arena.c adds the
 * arena methods (attach, map, map_many, release; docs/PROTOCOL.md §4.10-4.13) on top of it and
 * the receiving of passed file descriptors. Not installed.
 */
#ifndef QINS_QINS_INT_H
#define QINS_QINS_INT_H

#include <stddef.h>
#include <sys/types.h>

#include <msgpack.h>

#include "proto.h"
#include "qins.h"

typedef struct qcl_arena qcl_arena; /* client/arena.c */

/* qins.c: a call is qcl__begin (returns the packer; pack the params array), qcl__call (sends,
 * reads to the result: 0 with qcl__rd at the result, else the error, response consumed), then
 * parse with qcl__rd / qcl__skip and end with qcl__finish(c, what, rc) (returns rc, or the error
 * that consuming the rest of the response hit). qcl__fail sets the message and returns code. */
msgpack_packer *qcl__begin(qins_client *c, const char *method);
int qcl__call(qins_client *c, const char *what);
int qcl__finish(qins_client *c, const char *what, int rc);
qp_rd *qcl__rd(qins_client *c);
int qcl__skip(qins_client *c);
/* 1 if rc says the connection was lost under a call (EOF, reset, EPIPE, SHUTDOWN, ...). */
int qcl__lost(int rc);
int qcl__fail(qins_client *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int qcl__sock(const qins_client *c); /* the socket, or -1 when closed */
qcl_arena **qcl__arena(qins_client *c);
/* The connection's counters; .generation says which connection is live (+1 per reconnect). */
qins_conn_stats *qcl__stats(qins_client *c);
/* Runs attempt(c, ud) as every public call runs its attempt: when it returns a lost connection,
 * reconnects (within the retry budget, the reconnect callback included) and runs it again whole.
 * Returns the last attempt's result or the budget's QINS_ECLOSED. */
int qcl__retrying(qins_client *c, const char *what, int (*attempt)(qins_client *, void *),
                  void *ud);

/* arena.c: recv() that also takes a file descriptor passed with the bytes (SCM_RIGHTS: the fd
 * travels with `attach`'s answer and a plain recv would silently close it); kept for qins_attach.
 * Returns what recv returns. */
ssize_t qcl__recv(qins_client *c, int fd, void *buf, size_t len);
/* Unmaps the arena and closes any fd held; qins_close calls it. */
void qcl__arena_free(qins_client *c);

#endif /* QINS_QINS_INT_H */
