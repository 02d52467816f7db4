/* SPDX-License-Identifier: MIT */
/*
 * qinsctl.h — internal header of qinsctl, the admin CLI (docs/qinsctl.md): the command table's
 * entry type, the options every command shares, small output helpers (human sizes, JSON) and the
 * helpers the store commands share with synth (opening the store, clock, option parsing).
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
/* For commands without options: an argument starting with '-' (before "--") is named as an
 * unrecognized option, then usage; returns QCTL_USAGE, or QCTL_OK when there is none. */
int qctl_no_options(const qctl_ctx *c, int argc, char **argv);
/* Prints "qinsctl <cmd>: <msg>" to stderr; returns QCTL_FAIL. */
int qctl_fail(const qctl_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "1.5 MiB" style (IEC) into buf. */
const char *qctl_human(uint64_t bytes, char *buf, size_t cap);

/* Minimal JSON writer on a FILE: commas are handled by the caller through qctl_jsep. */
void qctl_jstr(FILE *f, const char *s);
void qctl_jnum(FILE *f, double v); /* finite: %.17g-ish shortest; non-finite: null */
/* A model's sizes in a --json line (import, synth, info):
 * ,"n_tensors":N,"elements":N,"source_bytes":N,"stored_bytes":N */
void qctl_json_sizes(uint64_t n_tensors, uint64_t n_elem, uint64_t src_bytes,
                     uint64_t stored_bytes);
/* The figures that end import's and synth's --json line, from "bytes_per_weight" to the closing
 * brace and newline. */
void qctl_json_import_figures(double bytes_per_weight, double ratio, double snr_db_matrices,
                              double seconds, double mb_per_s);

/* Store helpers (cmd_store.c), shared by the store commands and synth (cmd_synth.c). */
typedef struct qs_store qs_store;
/* Prints "qinsctl <cmd>: no store: ..." and returns QCTL_USAGE if neither --store nor
 * QINS_STORE gave one; QCTL_OK otherwise. */
int qctl_need_store(const qctl_ctx *c);
/* qctl_need_store, then qs_open(s, c->store, flags): QCTL_OK, QCTL_USAGE or QCTL_FAIL (the
 * store's message printed). */
int qctl_open(qctl_ctx *c, qs_store **s, unsigned flags);
/* Monotonic clock, seconds. */
double qctl_now(void);
/* Full GNU getopt reinitialization (optind = 0) before a command's getopt_long loop. */
void qctl_getopt_reset(void);
/* --codec NAME: the codec (qc_codec_from_name), or -1 after printing "unknown codec". */
int qctl_codec_arg(const qctl_ctx *c, const char *arg);
/* --codec-for GLOB=CODEC: fills *rule (glob points into arg, its '=' overwritten) and returns 0,
 * or prints the usage error and returns -1. */
typedef struct qs_codec_rule qs_codec_rule;
int qctl_codec_rule_arg(const qctl_ctx *c, char *arg, qs_codec_rule *rule);
/* Their entries in a getopt_long option table: --codec is 'c', --codec-for is 'r'. */
#define QCTL_CODEC_OPTIONS \
  {"codec", required_argument, 0, 'c'}, {"codec-for", required_argument, 0, 'r'}

/* Store commands (cmd_store.c). */
int qctl_cmd_import(qctl_ctx *c, int argc, char **argv);
void qctl_import_help(FILE *f); /* the codecs and the codec policy, for `import --help` */
int qctl_cmd_ls(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_info(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_export(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_rm(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_verify(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_audit(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_backup(qctl_ctx *c, int argc, char **argv);
/* Portable model files and pull (cmd_pull.c): export --format qins, import FILE.qins, pull URL. */
int qctl_export_qins(qctl_ctx *c, const char *model, const char *path, uint64_t piece_size);
int qctl_import_qins(qctl_ctx *c, const char *path, const char *model);
int qctl_cmd_pull(qctl_ctx *c, int argc, char **argv);
/* Synthetic models written straight into the store (cmd_synth.c). */
int qctl_cmd_synth(qctl_ctx *c, int argc, char **argv);

/* Remote commands (cmd_remote.c): declare them here, e.g.
 *   int qctl_cmd_ping(qctl_ctx *c, int argc, char **argv); */
int qctl_cmd_ping(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_stats(qctl_ctx *c, int argc, char **argv);
int qctl_cmd_get(qctl_ctx *c, int argc, char **argv);

#endif /* QINS_QINSCTL_H */
