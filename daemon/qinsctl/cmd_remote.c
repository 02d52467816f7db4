/* SPDX-License-Identifier: MIT */
/*
 * cmd_remote.c — qinsctl's commands that talk to a running qinsd through libqins (client/qins.h)
 * rather than opening the store: `ping`, `stats [--format prometheus]` and
 * `get MODEL/TENSOR [--slice ...] [-o F.npy]`.
 * The socket comes from --socket PATH or $QINS_SOCKET. docs/client.md §4.
 *
 * Each command is `int qctl_cmd_NAME(qctl_ctx *c, int argc, char **argv)` (qinsctl.h: argv[0] the
 * command's name, --socket/--json already taken by main.c into c) and returns the exit status:
 * QCTL_OK, QCTL_FAIL (the message names the socket, model or tensor) or QCTL_USAGE.
 *
 * Slices are written as in numpy: one comma-separated item per leading dimension, each `a:b`, `a:`,
 * `:b`, `:` or a single index `i` (= i:i+1, the dimension kept); negative bounds count from the
 * end. Open bounds are resolved with the tensor's shape (`info`) before the `get`.
 *
 * .npy output: format version 1.0, C order, '<f4' for f32 (and for bf16, widened exactly: numpy
 * has no bfloat16), '<f2' for f16.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "json.h"
#include "qins.h"
#include "qinsctl.h"

#define REMOTE_TIMEOUT_MS 10000 /* connect + hello, and each call: generous for a loaded host */

static const struct option remote_opts[] = {
    {"slice", required_argument, 0, 'S'}, {"dtype", required_argument, 0, 'd'},
    {"output", required_argument, 0, 'o'}, {"max", required_argument, 0, 'n'},
    {"format", required_argument, 0, 'F'}, {0, 0, 0, 0}};

typedef struct remote_args {
  const char *slice, *out, *format;
  qins_dtype dt;
  long max;
  int first; /* optind of the first operand */
} remote_args;

/* Parses the command's own options: QCTL_OK, or QCTL_USAGE (usage printed). */
static int remote_parse(qctl_ctx *c, int argc, char **argv, int nops, remote_args *a) {
  *a = (remote_args){.dt = QINS_F32, .max = 16};
  optind = 1;
  opterr = 1;
  int ch;
  while ((ch = getopt_long(argc, argv, "o:", remote_opts, NULL)) != -1) {
    char *end;
    switch (ch) {
    case 'S': a->slice = optarg; break;
    case 'o': a->out = optarg; break;
    case 'F': a->format = optarg; break;
    case 'n':
      a->max = strtol(optarg, &end, 10);
      if (*end || a->max < 0) return qctl_usage(c, QCTL_USAGE);
      break;
    case 'd':
      if (!strcmp(optarg, "f32")) a->dt = QINS_F32;
      else if (!strcmp(optarg, "f16")) a->dt = QINS_F16;
      else if (!strcmp(optarg, "bf16")) a->dt = QINS_BF16;
      else {
        fprintf(stderr, "qinsctl %s: --dtype must be f32, f16 or bf16\n", argv[0]);
        return QCTL_USAGE;
      }
      break;
    default: return qctl_usage(c, QCTL_USAGE);
    }
  }
  a->first = optind;
  if (argc - optind != nops) return qctl_usage(c, QCTL_USAGE);
  if (!c->socket || !*c->socket) {
    fprintf(stderr, "qinsctl %s: no socket: give --socket PATH or set QINS_SOCKET\n", argv[0]);
    return QCTL_USAGE;
  }
  return QCTL_OK;
}

static int remote_connect(qctl_ctx *c, qins_client **cl) {
  int rc = qins_connect(cl, c->socket, REMOTE_TIMEOUT_MS);
  if (rc) return qctl_fail(c, "cannot reach qinsd at %s: %s", c->socket, qins_strerror(rc));
  qins_set_timeout(*cl, REMOTE_TIMEOUT_MS);
  return QCTL_OK;
}

int qctl_cmd_ping(qctl_ctx *c, int argc, char **argv) {
  remote_args a;
  int rc = remote_parse(c, argc, argv, 0, &a);
  qins_client *cl;
  if (rc || (rc = remote_connect(c, &cl))) return rc;
  if (qins_ping(cl)) {
    rc = qctl_fail(c, "%s", qins_client_error(cl));
  } else if (c->json) {
    printf("{\"pong\": true, \"server\": ");
    qctl_jstr(stdout, qins_server(cl)->server);
    printf(", \"protocol\": %u}\n", qins_server(cl)->protocol);
  } else {
    printf("pong from %s (protocol %u) at %s\n", qins_server(cl)->server,
           qins_server(cl)->protocol, c->socket);
  }
  qins_close(cl);
  return rc;
}

/* Prints a JSON value as `key value` lines, nested keys joined with '.'. */
static void stats_flat(const qs_json *v, char *key, size_t len, size_t cap) {
  if (v->type == QS_JSON_OBJECT) {
    for (size_t i = 0; i < v->len; i++) {
      const qs_json *m = &v->items[i];
      int n = snprintf(key + len, cap - len, "%s%s", len ? "." : "", m->key);
      if (n < 0 || (size_t)n >= cap - len) continue;
      stats_flat(m, key, len + (size_t)n, cap);
      key[len] = 0;
    }
    return;
  }
  printf("%-32s ", key);
  switch (v->type) {
  case QS_JSON_NUMBER:
    if (v->num_flags & QS_JSON_IS_I64) printf("%" PRId64 "\n", v->i64);
    else if (v->num_flags & QS_JSON_IS_U64) printf("%" PRIu64 "\n", v->u64);
    else printf("%.6g\n", v->num);
    break;
  case QS_JSON_STRING: printf("%s\n", v->str); break;
  case QS_JSON_BOOL: printf("%s\n", v->boolean ? "true" : "false"); break;
  case QS_JSON_NULL: printf("null\n"); break;
  default: printf("[%zu items]\n", v->len); break;
  }
}

/* --- Prometheus text exposition (format 0.0.4; docs/OPERATIONS.md §Metrics) ------------------
 * Every numeric stats field becomes qinsd_FIELD; counters (monotonic fields) get the "_total"
 * suffix and "# TYPE ... counter", the rest are gauges. The per-method and per-error maps become
 * one labelled counter each (qinsd_method_requests_total{method=...}, qinsd_errors_total{code=...});
 * any other map a labelled gauge with label "key". Names keep [a-zA-Z0-9_] only. */
static int prom_gauge(const char *k) {
  static const char *const g[] = {"connections", "queued_bytes", "queued_peak", "uptime_s"};
  for (size_t i = 0; i < sizeof g / sizeof g[0]; i++)
    if (!strcmp(k, g[i])) return 1;
  return !strncmp(k, "latency", 7) || strstr(k, "_p50") || strstr(k, "_p99");
}

static void prom_name(char *out, size_t cap, const char *k, int counter) {
  size_t n = (size_t)snprintf(out, cap, "qinsd_");
  for (; *k && n + 1 < cap; k++) out[n++] = (isalnum((unsigned char)*k) || *k == '_') ? *k : '_';
  out[n] = 0;
  if (counter && (n < 6 || strcmp(out + n - 6, "_total"))) snprintf(out + n, cap - n, "_total");
}

static void prom_value(const qs_json *v) {
  if (v->type == QS_JSON_BOOL) printf("%d\n", v->boolean);
  else if (v->num_flags & QS_JSON_IS_U64) printf("%" PRIu64 "\n", v->u64);
  else if (v->num_flags & QS_JSON_IS_I64) printf("%" PRId64 "\n", v->i64);
  else printf("%.17g\n", v->num);
}

static void prom_label(const char *s) { /* a label value: backslash, quote and newline escaped */
  for (; *s; s++) {
    if (*s == '\\' || *s == '"') printf("\\%c", *s);
    else if (*s == '\n') printf("\\n");
    else putchar(*s);
  }
}

static void stats_prometheus(const qs_json *j) {
  for (size_t i = 0; j->type == QS_JSON_OBJECT && i < j->len; i++) {
    const qs_json *m = &j->items[i];
    char name[160];
    if (m->type == QS_JSON_NUMBER || m->type == QS_JSON_BOOL) {
      int counter = !prom_gauge(m->key);
      prom_name(name, sizeof name, m->key, counter);
      printf("# HELP %s qinsd stats field %s.\n# TYPE %s %s\n%s ", name, m->key, name,
             counter ? "counter" : "gauge", name);
      prom_value(m);
    } else if (m->type == QS_JSON_OBJECT) {
      const char *label = !strcmp(m->key, "requests") ? "method" : !strcmp(m->key, "errors") ? "code" : "key";
      int counter = !strcmp(m->key, "requests") || !strcmp(m->key, "errors");
      prom_name(name, sizeof name, !strcmp(m->key, "requests") ? "method_requests" : m->key, counter);
      printf("# HELP %s qinsd stats field %s, by %s.\n# TYPE %s %s\n", name, m->key, label, name,
             counter ? "counter" : "gauge");
      for (size_t k = 0; k < m->len; k++) {
        const qs_json *v = &m->items[k];
        if (v->type != QS_JSON_NUMBER && v->type != QS_JSON_BOOL) continue;
        printf("%s{%s=\"", name, label);
        prom_label(v->key);
        printf("\"} ");
        prom_value(v);
      }
    }
  }
}

int qctl_cmd_stats(qctl_ctx *c, int argc, char **argv) {
  remote_args a;
  int rc = remote_parse(c, argc, argv, 0, &a);
  if (!rc && a.format && strcmp(a.format, "prometheus") && strcmp(a.format, "text")) {
    fprintf(stderr, "qinsctl stats: --format is text or prometheus, got \"%s\"\n", a.format);
    rc = QCTL_USAGE;
  }
  int prom = !rc && a.format && !strcmp(a.format, "prometheus");
  qins_client *cl;
  if (rc || (rc = remote_connect(c, &cl))) return rc;
  char *js = NULL;
  if (qins_stats(cl, &js)) {
    rc = qctl_fail(c, "%s", qins_client_error(cl));
    qins_close(cl);
    return rc;
  }
  qins_close(cl);
  if (c->json && !prom) {
    printf("%s\n", js);
    qins_free(js);
    return QCTL_OK;
  }
  qs_json *j = NULL;
  char err[128], key[512] = "";
  if (qs_json_parse(js, strlen(js), &j, err, sizeof err)) {
    qins_free(js);
    return qctl_fail(c, "unreadable answer: %s", err);
  }
  if (prom) stats_prometheus(j);
  else stats_flat(j, key, 0, sizeof key);
  qs_json_free(j);
  qins_free(js);
  return QCTL_OK;
}

/* Parses SPEC against shape (ndim dims) into ranges; returns the count or -1 (message printed). */
static int parse_slice(const char *spec, const uint64_t *shape, int ndim, qins_range *r) {
  int n = 0;
  const char *p = spec;
  for (;;) {
    if (n >= ndim) {
      fprintf(stderr, "qinsctl get: --slice %s has more items than the tensor's %d dimensions\n",
              spec, ndim);
      return -1;
    }
    const char *end = p + strcspn(p, ",");
    char item[64];
    size_t len = (size_t)(end - p);
    if (len >= sizeof item) goto bad;
    memcpy(item, p, len);
    item[len] = 0;
    int64_t dim = (int64_t)shape[n], lo = 0, hi = dim;
    char *colon = strchr(item, ':'), *e;
    if (colon) {
      *colon = 0;
      if (strchr(colon + 1, ':')) goto bad; /* steps */
      if (item[0]) {
        lo = strtoll(item, &e, 10);
        if (*e) goto bad;
      }
      if (colon[1]) {
        hi = strtoll(colon + 1, &e, 10);
        if (*e) goto bad;
      }
    } else {
      lo = strtoll(item, &e, 10);
      if (*e || !item[0]) goto bad;
      if (lo < 0) lo += dim;
      hi = lo + 1;
    }
    if (colon && lo < 0) lo += dim;
    if (colon && hi < 0) hi += dim;
    if (lo < 0 || hi < 0) {
      fprintf(stderr, "qinsctl get: --slice item %d (%s) is out of range for dimension %" PRId64 "\n",
              n, item, dim);
      return -1;
    }
    r[n].start = (uint64_t)lo; /* the server checks start <= stop <= dim and names what is wrong */
    r[n].stop = (uint64_t)hi;
    n++;
    if (!*end) return n;
    p = end + 1;
  }
bad:
  fprintf(stderr, "qinsctl get: bad --slice %s (items: a:b, a:, :b, :, or an index; no steps)\n",
          spec);
  return -1;
}

/* Writes a .npy (v1.0) of n elements. */
static int write_npy(const char *path, const void *data, size_t n, qins_dtype dt,
                     const uint64_t *shape, int ndim) {
  FILE *f = fopen(path, "wb");
  if (!f) {
    fprintf(stderr, "qinsctl get: %s: %s\n", path, strerror(errno));
    return 1;
  }
  char hdr[512], sh[256] = "";
  size_t sl = 0;
  for (int i = 0; i < ndim; i++)
    sl += (size_t)snprintf(sh + sl, sizeof sh - sl, "%" PRIu64 "%s", shape[i],
                           ndim == 1 ? "," : (i + 1 < ndim ? ", " : ""));
  int hl = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }",
                    dt == QINS_F16 ? "<f2" : "<f4", sh);
  size_t total = 10 + (size_t)hl + 1, pad = (64 - total % 64) % 64;
  unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
  size_t hlen = (size_t)hl + pad + 1;
  pre[8] = (unsigned char)(hlen & 0xff);
  pre[9] = (unsigned char)(hlen >> 8);
  int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(hdr, 1, (size_t)hl, f) == (size_t)hl;
  for (size_t i = 0; ok && i < pad; i++) ok = fputc(' ', f) != EOF;
  ok = ok && fputc('\n', f) != EOF;
  if (dt == QINS_BF16) { /* widened to f32 */
    const uint16_t *h = data;
    for (size_t i = 0; ok && i < n; i++) {
      float v = qc_bf16_to_f32(h[i]);
      ok = fwrite(&v, 4, 1, f) == 1;
    }
  } else if (ok && n) {
    size_t es = dt == QINS_F16 ? 2 : 4;
    ok = fwrite(data, es, n, f) == n;
  }
  if (fclose(f) || !ok) {
    fprintf(stderr, "qinsctl get: writing %s failed\n", path);
    return 1;
  }
  return 0;
}

int qctl_cmd_get(qctl_ctx *c, int argc, char **argv) {
  remote_args a;
  int rc = remote_parse(c, argc, argv, 1, &a);
  if (rc) return rc;
  const char *what = argv[a.first], *slash = strchr(what, '/');
  if (!slash || slash == what || !slash[1] || (size_t)(slash - what) > QINS_MAX_NAME) {
    fprintf(stderr, "qinsctl get: give MODEL/TENSOR (got %s)\n", what);
    return QCTL_USAGE;
  }
  char model[QINS_MAX_NAME + 1];
  memcpy(model, what, (size_t)(slash - what));
  model[slash - what] = 0;
  const char *name = slash + 1;
  qins_client *cl;
  if ((rc = remote_connect(c, &cl))) return rc;
  qins_range r[QINS_MAX_NDIM];
  int nr = 0;
  if (a.slice) {
    qins_tensor_info ti;
    if (qins_info(cl, model, name, &ti)) {
      rc = qctl_fail(c, "%s", qins_client_error(cl));
      qins_close(cl);
      return rc;
    }
    if ((nr = parse_slice(a.slice, ti.shape, ti.ndim, r)) < 0) {
      qins_close(cl);
      return QCTL_USAGE;
    }
  }
  void *data = NULL;
  size_t bytes = 0;
  uint64_t shape[QINS_MAX_NDIM];
  int ndim = 0;
  if (qins_get(cl, model, name, nr ? r : NULL, nr, a.dt, &data, &bytes, shape, &ndim)) {
    rc = qctl_fail(c, "%s", qins_client_error(cl));
    qins_close(cl);
    return rc;
  }
  qins_close(cl);
  size_t es = a.dt == QINS_F32 ? 4 : 2, n = bytes / es;
  const char *dn = a.dt == QINS_F32 ? "f32" : a.dt == QINS_F16 ? "f16" : "bf16";
  if (a.out) {
    rc = write_npy(a.out, data, n, a.dt, shape, ndim);
    if (!rc) fprintf(stderr, "qinsctl get: wrote %s (%zu values)\n", a.out, n);
  } else {
    if (c->json) {
      printf("{\"model\": ");
      qctl_jstr(stdout, model);
      printf(", \"name\": ");
      qctl_jstr(stdout, name);
      printf(", \"dtype\": \"%s\", \"shape\": [", dn);
    } else {
      printf("%s/%s shape [", model, name);
    }
    for (int i = 0; i < ndim; i++) printf("%s%" PRIu64, i ? ", " : "", shape[i]);
    if (c->json) printf("], \"n\": %zu, \"values\": [", n);
    else printf("] dtype %s, %zu values\n", dn, n);
    size_t shown = n < (size_t)a.max ? n : (size_t)a.max;
    for (size_t i = 0; i < shown; i++) {
      float v;
      if (a.dt == QINS_F32) {
        memcpy(&v, (const char *)data + 4 * i, 4);
      } else {
        uint16_t h;
        memcpy(&h, (const char *)data + 2 * i, 2);
        v = a.dt == QINS_F16 ? qc_f16_to_f32(h) : qc_bf16_to_f32(h);
      }
      if (c->json) {
        if (i) printf(", ");
        qctl_jnum(stdout, v);
      } else {
        printf("%.9g%s", v, i + 1 == shown ? "\n" : " ");
      }
    }
    if (c->json) printf("]}\n");
    else if (n > shown) printf("... (%zu more; -o FILE.npy for all)\n", n - shown);
  }
  qins_free(data);
  return rc ? QCTL_FAIL : QCTL_OK;
}
