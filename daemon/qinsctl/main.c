/* SPDX-License-Identifier: MIT */
/*
 * main.c — qinsctl's entry point: the command table, the shared options, dispatch, help.
 * Usage and every command's output: docs/qinsctl.md.
 *
 *   qinsctl [--store DIR] [--socket PATH] [--json] COMMAND [ARGS...]
 *
 * The shared options may appear anywhere on the line (before or after the command); main removes
 * them and passes the rest to the command, which parses its own options with getopt_long.
 * Exit status: 0 ok, 1 failure, 2 usage.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qins.h"
#include "qins_text.h"
#include "qinsctl.h"

static int qctl_cmd_help(qctl_ctx *c, int argc, char **argv);

/* The command table: name, function, summary, usage. `qinsctl help` and dispatch read it. */
static const qctl_cmd qctl_cmds[] = {
    /* Store commands (cmd_store.c): work on the LMDB environment directly. */
    {"import", qctl_cmd_import, "import a safetensors/GGUF/.npy model into the store",
     "import FILE|DIR|FILE.qins [--model NAME] [--codec NAME] [--codec-for GLOB=NAME]... [--effort max] "
     "[--allow-requant]"},
    {"ls", qctl_cmd_ls, "list models, or one model's tensors", "ls [MODEL]"},
    {"info", qctl_cmd_info, "show a model (metadata) or one tensor's record", "info MODEL[/TENSOR]"},
    {"export", qctl_cmd_export, "write a model out as safetensors, GGUF or .qins (deterministic)",
     "export MODEL OUT.safetensors|OUT.gguf [--format safetensors|gguf] [--dtype f32|f16|bf16] | "
     "export MODEL OUT.qins --format qins [--piece-size BYTES]"},
    {"pull", qctl_cmd_pull, "fetch a .qins model over HTTP(S)/file://, verified, resumable",
     "pull URL [--model NAME] [--sha256 HEX] [--connections N] [--retries N] "
     "[--connect-timeout S] [--low-speed-time S] [--cacert FILE]"},
    {"rm", qctl_cmd_rm, "remove a model (atomic)", "rm MODEL"},
    {"verify", qctl_cmd_verify, "check every checksum and decode every record", "verify [MODEL]"},
    {"audit", qctl_cmd_audit, "storage footprint per model and tensor, totals, LMDB file use",
     "audit [MODEL]"},
    {"backup", qctl_cmd_backup, "consistent compacted copy of the store, taken while qinsd serves",
     "backup DIR [--verify]"},
    {"synth", qctl_cmd_synth, "write a synthetic model of a real architecture (phi-3.5-mini, ...)",
     "synth --arch NAME [--model NAME] [--seed S] [--codec NAME] [--codec-for GLOB=NAME]... | synth --list"},
    /* Remote commands (daemon/qinsctl/cmd_remote.c): talk to qinsd over --socket / QINS_SOCKET.
     * Add one line per command HERE, and declare its function in qinsctl.h, e.g.
     *   {"ping", qctl_cmd_ping, "ask qinsd whether it is alive", "ping"},
     */
    {"ping", qctl_cmd_ping, "ask qinsd whether it is alive (--socket)", "ping"},
    {"stats", qctl_cmd_stats, "qinsd's counters: connections, requests, errors, bytes, latency",
     "stats [--format text|prometheus]"},
    {"get", qctl_cmd_get, "fetch a tensor or a slice decoded by qinsd (--socket)",
     "get MODEL/TENSOR [--slice SPEC] [--dtype f32|f16|bf16] [-o OUT.npy] [--max N]"},
    {"help", qctl_cmd_help, "list commands, or show one command's usage", "help [COMMAND]"},
};
#define QCTL_NCMDS (sizeof qctl_cmds / sizeof qctl_cmds[0])

int qctl_usage(const qctl_ctx *c, int code) {
  FILE *f = code == QCTL_OK ? stdout : stderr;
  fprintf(f, "usage: qinsctl [--store DIR] [--json] %s\n  %s\n", c->cmd->usage, c->cmd->summary);
  if (code == QCTL_OK && c->cmd->fn == qctl_cmd_import) qctl_import_help(f);
  if (code == QCTL_OK) fprintf(f, "See docs/qinsctl.md for options and output fields.\n");
  return code;
}

int qctl_no_options(const qctl_ctx *c, int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--")) break;
    if (argv[i][0] == '-' && argv[i][1]) {
      fprintf(stderr, "qinsctl %s: unrecognized option '%s'\n", c->cmd->name, argv[i]);
      return qctl_usage(c, QCTL_USAGE);
    }
  }
  return QCTL_OK;
}

int qctl_fail(const qctl_ctx *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "qinsctl %s: ", c->cmd ? c->cmd->name : "");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return QCTL_FAIL;
}

const char *qctl_human(uint64_t bytes, char *buf, size_t cap) {
  static const char *const u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = (double)bytes;
  int i = 0;
  while (v >= 1024 && i < 5) {
    v /= 1024;
    i++;
  }
  if (i == 0) snprintf(buf, cap, "%llu B", (unsigned long long)bytes);
  else snprintf(buf, cap, "%.1f %s", v, u[i]);
  return buf;
}

void qctl_jstr(FILE *f, const char *s) { qp_json_fput(f, s, strlen(s), QP_JSON_SHORT); }

void qctl_jnum(FILE *f, double v) {
  if (v != v || v == 1.0 / 0.0 || v == -1.0 / 0.0) {
    fputs("null", f);
    return;
  }
  char b[40];
  snprintf(b, sizeof b, "%.6f", v);
  /* Trim trailing zeros for readability; keep it a valid JSON number. */
  char *e = b + strlen(b) - 1;
  while (e > b && *e == '0') *e-- = 0;
  if (*e == '.') *e = 0;
  fputs(b, f);
}

void qctl_json_sizes(uint64_t n_tensors, uint64_t n_elem, uint64_t src_bytes,
                     uint64_t stored_bytes) {
  printf(",\"n_tensors\":%llu,\"elements\":%llu,\"source_bytes\":%llu,\"stored_bytes\":%llu",
         (unsigned long long)n_tensors, (unsigned long long)n_elem, (unsigned long long)src_bytes,
         (unsigned long long)stored_bytes);
}

void qctl_json_import_figures(double bytes_per_weight, double ratio, double snr_db_matrices,
                              double seconds, double mb_per_s) {
  const char *keys[5] = {"bytes_per_weight", "ratio", "snr_db_matrices", "seconds", "mb_per_s"};
  const double v[5] = {bytes_per_weight, ratio, snr_db_matrices, seconds, mb_per_s};
  for (int i = 0; i < 5; i++) {
    printf("%s\"%s\":", i ? "," : "", keys[i]);
    qctl_jnum(stdout, v[i]);
  }
  printf("}\n");
}

static void qctl_list(FILE *f) {
  fprintf(f, "usage: qinsctl [--store DIR] [--socket PATH] [--json] COMMAND [ARGS...]\n\ncommands:\n");
  for (size_t i = 0; i < QCTL_NCMDS; i++)
    fprintf(f, "  %-8s %s\n", qctl_cmds[i].name, qctl_cmds[i].summary);
  fprintf(f, "\n`qinsctl COMMAND --help` shows a command's options. The store is --store DIR or "
             "$QINS_STORE.\nExit status: 0 ok, 1 failure, 2 usage.\n");
}

static const qctl_cmd *qctl_find(const char *name) {
  for (size_t i = 0; i < QCTL_NCMDS; i++)
    if (!strcmp(qctl_cmds[i].name, name)) return &qctl_cmds[i];
  return NULL;
}

static int qctl_cmd_help(qctl_ctx *c, int argc, char **argv) {
  if (argc > 2) return qctl_usage(c, QCTL_USAGE);
  if (argc == 2) {
    const qctl_cmd *k = qctl_find(argv[1]);
    if (!k) return qctl_fail(c, "unknown command \"%s\"", argv[1]);
    qctl_ctx cc = *c;
    cc.cmd = k;
    return qctl_usage(&cc, QCTL_OK);
  }
  qctl_list(stdout);
  return QCTL_OK;
}

int main(int argc, char **argv) {
  qctl_ctx c = {0};
  c.store = getenv("QINS_STORE");
  c.socket = getenv("QINS_SOCKET");
  /* Pull the shared options out of argv, wherever they are. "--" ends option scanning. */
  char **rest = calloc((size_t)argc + 1, sizeof *rest);
  if (!rest) return QCTL_FAIL;
  int n = 0, ended = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!ended && !strcmp(a, "--")) {
      ended = 1;
      rest[n++] = argv[i];
      continue;
    }
    if (!ended && (!strcmp(a, "--store") || !strcmp(a, "--socket"))) {
      if (i + 1 >= argc) {
        fprintf(stderr, "qinsctl: %s needs a value\n", a);
        free(rest);
        return QCTL_USAGE;
      }
      if (a[2] == 's' && a[3] == 't') c.store = argv[++i];
      else c.socket = argv[++i];
      continue;
    }
    if (!ended && !strncmp(a, "--store=", 8)) { c.store = a + 8; continue; }
    if (!ended && !strncmp(a, "--socket=", 9)) { c.socket = a + 9; continue; }
    if (!ended && !strcmp(a, "--json")) { c.json = 1; continue; }
    rest[n++] = argv[i];
  }
  rest[n] = NULL;
  if (n == 0) {
    qctl_list(stderr);
    free(rest);
    return QCTL_USAGE;
  }
  if (!strcmp(rest[0], "--help") || !strcmp(rest[0], "-h")) {
    qctl_list(stdout);
    free(rest);
    return QCTL_OK;
  }
  if (!strcmp(rest[0], "--version")) {
    printf("qinsctl %s\n", QINS_VERSION_STRING);
    free(rest);
    return QCTL_OK;
  }
  c.cmd = qctl_find(rest[0]);
  if (!c.cmd) {
    fprintf(stderr, "qinsctl: unknown command \"%s\" (try qinsctl help)\n", rest[0]);
    free(rest);
    return QCTL_USAGE;
  }
  for (int i = 1; i < n; i++)
    if (!strcmp(rest[i], "--")) break;
    else if (!strcmp(rest[i], "--help") || !strcmp(rest[i], "-h")) {
      int rc = qctl_usage(&c, QCTL_OK);
      free(rest);
      return rc;
    }
  int rc = c.cmd->fn(&c, n, rest);
  free(rest);
  return rc;
}
