/* SPDX-License-Identifier: MIT */
/*
 * qinsctl.h — internal header of qinsctl, the admin CLI (docs/qinsctl.md): the command table's
 * entry type, the options every command shares, and small output helpers (human sizes, JSON).
 *
 * Every command is `int fn(qctl_ctx *c, int argc, char **argv)` with argv[0] the command name and
 * the shared options (--store, --socket, --json) already removed by main.c; it returns the exit
 * status: QCTL_OK (0), QCTL_FAIL (1) or QCTL_USAGE (2). Store commands (cmd_store.c) open the LMDB
 * environment directly and never fork; remote commands (cmd_remote.c) talk to qinsd.
 */
#ifndef QINS_QINSCTL_H
#define QINS_QINSCTL_H

#include <stdint.h>
#include <stdio.h>

enum { QCTL_OK = 0, QCTL_FAIL = 1, QCTL_USAGE = 2 };

typedef struct qctl_cmd qctl_cmd;

typedef struct qctl_ctx {
  const char *store;    /* --store DIR or $QINS_STORE (NULL if neither) */
  const char *socket;   /* --socket PATH or $QINS_SOCKET (NULL if neither) */
  int json;             /* --json: one JSON document on stdout */
  const qctl_cmd *cmd;  /* the command running */
} qctl_ctx;

struct qctl_cmd {
  const char *name;                              /* as typed */
  int (*fn)(qctl_ctx *c, int argc, char **argv); /* runs it */
  const char *summary;                           /* one line for `qinsctl help` */
  const char *usage;                             /* arguments and options, for --help */
};

/* Prints "usage: qinsctl <usage>" and the summary to stderr (or stdout for --help) and returns
 * code. */
int qctl_usage(const qctl_ctx *c, int code);
/* Prints "qinsctl <cmd>: <msg>" to stderr; returns QCTL_FAIL. */
int qctl_fail(const qctl_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "1.5 MiB" style (IEC) into buf. */
const char *qctl_human(uint64_t bytes, char *buf, size_t cap);

/* Minimal JSON writer on a FILE: commas are handled by the caller through qctl_jsep. */
void qctl_jstr(FILE *f, const char *s);
void qctl_jnum(FILE *f, double v); /* finite: %.17g-ish shortest; non-finite: null */

/* Store commands (cmd_store.c). */
int qctl_cmd_import(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_ls(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_info(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_export(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_rm(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_verify(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_audit(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_backup(qctl_ctx *c, int argc, char **argv);
/* Synthetic models written straight into the store (cmd_synth.c). */
int qctl_cmd_synth(qctl_ctx *c, int argc, char **argv);

/* Remote commands (cmd_remote.c): declare them here, e.g.
 *   int qctl_cmd_ping(qctl_ctx *c, int argc, char **argv); */
int qctl_cmd_ping(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_stats(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_get(qctl_ctx *c, int argc, char **argv);

#endif /* QINS_QINSCTL_H */
