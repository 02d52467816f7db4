/* SPDX-License-Identifier: MIT */
/*
 * cmd_store.c — qinsctl's store commands: import, ls, info, export, rm, verify, audit, backup.
 * They open the LMDB environment directly (store.h): read-only for ls/info/export/verify/audit/
 * backup, read-write (taking the writer lock) for import and rm. Output fields: docs/qinsctl.md (the JSON field names
 * there are stable; keep both in the same commit).
 *
 * Errors name the file, model or tensor concerned (qs_error() carries the store's message).
 * Also defines the helpers cmd_synth.c shares (qctl_need_store, qctl_open, qctl_now,
 * qctl_getopt_reset, qctl_codec_arg, qctl_codec_rule_arg; declared in qinsctl.h).
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "qins_text.h"
#include "qinsctl.h"
#include "store.h"

int qctl_need_store(const qctl_ctx *c) {
  if (!c->store || !*c->store) {
    fprintf(stderr, "qinsctl %s: no store: give --store DIR or set QINS_STORE\n", c->cmd->name);
    return QCTL_USAGE;
  }
  return QCTL_OK;
}

int qctl_open(qctl_ctx *c, qs_store **s, unsigned flags) {
  int rc = qctl_need_store(c);
  if (rc) return rc;
  rc = qs_open(s, c->store, flags);
  if (rc) return qctl_fail(c, "%s", qs_error());
  return QCTL_OK;
}

/* For a command without options taking min..max arguments: QCTL_OK, or QCTL_USAGE with the
 * usage printed. */
static int qctl_plain_args(const qctl_ctx *c, int argc, char **argv, int min, int max) {
  if (qctl_no_options(c, argc, argv)) return QCTL_USAGE;
  return argc - 1 < min || argc - 1 > max ? qctl_usage(c, QCTL_USAGE) : QCTL_OK;
}

/* Opens the store read-only and begins a read txn; on failure nothing is left open. */
static int qctl_open_read(qctl_ctx *c, qs_store **s, qs_txn **t) {
  int rc = qctl_open(c, s, QS_OPEN_RDONLY);
  if (rc) return rc;
  if (qs_txn_begin(*s, t)) {
    rc = qctl_fail(c, "%s", qs_error());
    qs_close(*s);
    return rc;
  }
  return QCTL_OK;
}

double qctl_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void qctl_getopt_reset(void) {
  optind = 0; /* GNU: full reinitialization */
  opterr = 1;
}

int qctl_codec_arg(const qctl_ctx *c, const char *arg) {
  int cd = qc_codec_from_name(arg);
  if (cd < 0)
    fprintf(stderr, "qinsctl %s: unknown codec \"%s\" (f32 f16 bf16 qins8 qins16 seed-log seed-rational qinsx)\n",
            c->cmd->name, arg);
  return cd;
}

int qctl_codec_rule_arg(const qctl_ctx *c, char *arg, qs_codec_rule *rule) {
  char *eq = strrchr(arg, '=');
  int cd = eq ? qc_codec_from_name(eq + 1) : -1;
  if (!eq || eq == arg || cd < 0) {
    fprintf(stderr, "qinsctl %s: --codec-for wants GLOB=CODEC with a known codec, got \"%s\"\n", c->cmd->name, arg);
    return -1;
  }
  *eq = 0;
  rule->glob = arg;
  rule->codec = cd;
  return 0;
}

/* An SNR for people: "lossless" only when nothing differs from the source (+inf), "overflow"
 * when values became infinite (-inf: a narrowing out of range), else "%.2f" + unit. */
static const char *qctl_snr(double snr, const char *unit, char *buf, size_t cap) {
  if (isinf(snr) && snr > 0) snprintf(buf, cap, "lossless");
  else if (!isfinite(snr)) snprintf(buf, cap, "overflow");
  else snprintf(buf, cap, "%.2f%s", snr, unit);
  return buf;
}

static void qctl_shape(FILE *f, const qs_tensor *t, int json) {
  fputc('[', f);
  for (int i = 0; i < t->ndim; i++) fprintf(f, "%s%llu", i ? (json ? "," : ", ") : "", (unsigned long long)t->shape[i]);
  fputc(']', f);
}

/* ---------------------------------------------------------------------------------------------
 * import */
typedef struct qctl_progress {
  int tty;
  double last, start;
} qctl_progress;

static void qctl_progress_cb(void *ud, uint64_t done, uint64_t total, const char *what) {
  qctl_progress *p = ud;
  if (!p->tty) return;
  double now = qctl_now();
  if (now - p->last < 0.1 && done < total) return;
  p->last = now;
  int w = 30, fill = total ? (int)((double)done / (double)total * w) : w;
  char bar[64];
  for (int i = 0; i < w; i++) bar[i] = i < fill ? '#' : '.';
  bar[w] = 0;
  double mb = (double)done / 1e6, rate = now > p->start ? mb / (now - p->start) : 0;
  fprintf(stderr, "\r[%s] %3d%% %8.1f MB %7.1f MB/s %-32.32s", bar,
          total ? (int)(100.0 * (double)done / (double)total) : 100, mb, rate, what ? what : "");
  fflush(stderr);
}

void qctl_import_help(FILE *f) {
  fprintf(f, "codecs (--codec NAME, --codec-for GLOB=NAME):");
  for (int i = 0; i < QC_CODEC_COUNT; i++)
    fprintf(f, " %s%s", qc_codec_name((qc_codec)i), qc_codec_is_lossy((qc_codec)i) ? "*" : "");
  fprintf(f, "  (* lossy: refuses NaN/Inf)\n"
             "policy, first that applies: a GGUF Q4_0..Q8_0/Q2_K..Q8_K tensor is stored f32, its\n"
             "  exact dequantized values (--allow-requant lets the rules below re-encode it); the\n"
             "  last --codec-for whose glob matches the name; --codec; qins8 for 2+ dimensions; 1-D\n"
             "  f16/bf16 keep their dtype; f32 otherwise. Integer/bool tensors are stored raw.\n"
             "sources: .safetensors (file, index.json or directory, HF config/tokenizer kept), .gguf,\n"
             "  .npy (file or directory); recognized by content. SNR is measured against the source.\n");
}

int qctl_cmd_import(qctl_ctx *c, int argc, char **argv) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       QCTL_CODEC_OPTIONS,
                                       {"effort", required_argument, 0, 'e'},
                                       {"allow-requant", no_argument, 0, 'a'},
                                       {0, 0, 0, 0}};
  qs_import_opts o;
  qs_import_opts_init(&o);
  qs_codec_rule *rules = calloc((size_t)argc + 1, sizeof *rules);
  if (!rules) return QCTL_FAIL;
  int ch, rc = QCTL_OK;
  qctl_getopt_reset();
  while ((ch = getopt_long(argc, argv, "m:c:r:e:a", opts, NULL)) != -1) {
    switch (ch) {
    case 'm': o.model = optarg; break;
    case 'c':
      if ((o.codec = qctl_codec_arg(c, optarg)) < 0) rc = QCTL_USAGE;
      break;
    case 'r':
      if (qctl_codec_rule_arg(c, optarg, &rules[o.n_rules])) rc = QCTL_USAGE;
      else o.n_rules++;
      break;
    case 'e':
      if (!strcmp(optarg, "max")) o.effort = QC_EFFORT_MAX;
      else if (!strcmp(optarg, "default")) o.effort = QC_EFFORT_DEFAULT;
      else {
        fprintf(stderr, "qinsctl import: --effort is default or max\n");
        rc = QCTL_USAGE;
      }
      break;
    case 'a': o.allow_requant = 1; break;
    default: rc = QCTL_USAGE;
    }
  }
  o.rules = rules;
  if (rc == QCTL_OK && optind != argc - 1) rc = QCTL_USAGE;
  if (rc != QCTL_OK) {
    free(rules);
    return qctl_usage(c, rc);
  }
  const char *path = argv[optind];
  size_t pl = strlen(path);
  if (pl > 5 && !strcmp(path + pl - 5, ".qins")) { /* a portable model file: cmd_pull.c */
    free(rules);
    return qctl_import_qins(c, path, o.model);
  }
  qs_store *s;
  if ((rc = qctl_open(c, &s, QS_OPEN_CREATE))) {
    free(rules);
    return rc;
  }
  qctl_progress pr = {isatty(2), 0, qctl_now()};
  o.progress = qctl_progress_cb;
  o.progress_ud = &pr;
  qs_import_result res;
  double t0 = qctl_now();
  int e = qs_import_path(s, path, &o, &res);
  double dt = qctl_now() - t0;
  if (pr.tty) fprintf(stderr, "\r%90s\r", "");
  free(rules);
  if (e) {
    rc = qctl_fail(c, "%s", qs_error());
    qs_close(s);
    return rc;
  }
  double bpw = res.n_elem ? (double)res.stored_bytes / (double)res.n_elem : 0;
  double ratio = res.stored_bytes ? (double)res.src_bytes / (double)res.stored_bytes : 0;
  double mbs = dt > 0 ? (double)res.src_bytes / 1e6 / dt : 0;
  if (c->json) {
    printf("{\"model\":");
    qctl_jstr(stdout, res.model);
    qctl_json_sizes(res.n_tensors, res.n_elem, res.src_bytes, res.stored_bytes);
    printf(",\"narrowed\":%llu,\"snr_db_narrowed\":", (unsigned long long)res.n_narrowed);
    if (isinf(res.snr_db_narrowed) && res.snr_db_narrowed < 0) fputs("\"-inf\"", stdout);
    else qctl_jnum(stdout, res.snr_db_narrowed);
    putchar(',');
    qctl_json_import_figures(bpw, ratio, res.snr_db_2d, dt, mbs);
  } else {
    char a[32], b[32];
    printf("imported %s: %llu tensors, %s -> %s (%.2fx, %.3f bytes/weight), matrices SNR %.2f dB, "
           "%.1f MB/s\n",
           res.model, (unsigned long long)res.n_tensors, qctl_human(res.src_bytes, a, sizeof a),
           qctl_human(res.stored_bytes, b, sizeof b), ratio, bpw, res.snr_db_2d, mbs);
    if (res.n_narrowed) {
      char snr[32];
      printf("  %llu tensor%s narrowed from the source dtype, lowest SNR %s (%s)\n",
             (unsigned long long)res.n_narrowed, res.n_narrowed == 1 ? "" : "s",
             qctl_snr(res.snr_db_narrowed, " dB", snr, sizeof snr), res.narrowed_tensor);
    }
  }
  qs_close(s);
  return QCTL_OK;
}

/* ---------------------------------------------------------------------------------------------
 * ls */
typedef struct qctl_walk {
  qctl_ctx *c;
  qs_txn *t;
  int n;
  int w_name, w_shape; /* column widths: the human tables size to their content */
} qctl_walk;

/* "4x8", or "scalar". */
static void qctl_shape_x(const qs_tensor *t, char *shp, size_t cap) {
  int k = 0;
  shp[0] = 0;
  for (int i = 0; i < t->ndim && k < (int)cap - 24; i++)
    k += snprintf(shp + k, cap - (size_t)k, "%s%llu", i ? "x" : "", (unsigned long long)t->shape[i]);
  if (!t->ndim) snprintf(shp, cap, "scalar");
}

static int qctl_width_model_cb(void *ud, const qs_model *m) {
  qctl_walk *w = ud;
  int n = (int)strlen(m->name);
  if (n > w->w_name) w->w_name = n;
  return 0;
}

static int qctl_width_tensor_cb(void *ud, const qs_tensor *t) {
  qctl_walk *w = ud;
  char shp[128];
  qctl_shape_x(t, shp, sizeof shp);
  int n = (int)strlen(t->name), k = (int)strlen(shp);
  if (n > w->w_name) w->w_name = n;
  if (k > w->w_shape) w->w_shape = k;
  return 0;
}

static int qctl_ls_model_cb(void *ud, const qs_model *m) {
  qctl_walk *w = ud;
  double ratio = m->stored_bytes ? (double)m->src_bytes / (double)m->stored_bytes : 0;
  if (w->c->json) {
    printf("%s{\"name\":", w->n ? "," : "");
    qctl_jstr(stdout, m->name);
    printf(",\"id\":%llu,\"n_tensors\":%llu,\"elements\":%llu,\"source_bytes\":%llu,"
           "\"stored_bytes\":%llu,\"ratio\":",
           (unsigned long long)m->id, (unsigned long long)m->n_tensors,
           (unsigned long long)m->n_elem, (unsigned long long)m->src_bytes,
           (unsigned long long)m->stored_bytes);
    qctl_jnum(stdout, ratio);
    printf(",\"created\":%lld}", (long long)m->created);
  } else {
    char a[32], b[32], when[32];
    time_t tt = (time_t)m->created;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M", &tm);
    printf("%-*s %6llu %8llu %12llu %11s %11s %6.2fx  %s\n", w->w_name, m->name, (unsigned long long)m->id,
           (unsigned long long)m->n_tensors, (unsigned long long)m->n_elem,
           qctl_human(m->src_bytes, a, sizeof a), qctl_human(m->stored_bytes, b, sizeof b), ratio,
           when);
  }
  w->n++;
  return 0;
}

static int qctl_ls_tensor_cb(void *ud, const qs_tensor *t) {
  qctl_walk *w = ud;
  if (w->c->json) {
    qs_tensor_cost cost;
    if (qs_tensor_cost_get(w->t, t, &cost)) return 1;
    printf("%s{\"name\":", w->n ? "," : "");
    qctl_jstr(stdout, t->name);
    printf(",\"shape\":");
    qctl_shape(stdout, t, 1);
    printf(",\"src_dtype\":\"%s\",\"codec\":\"%s\",\"elements\":%llu,\"source_bytes\":%llu,"
           "\"stored_bytes\":%llu,\"snr_db\":",
           qs_dtype_name(t->src_dtype), qs_codec_name(t->codec), (unsigned long long)t->n_elem,
           (unsigned long long)t->src_bytes, (unsigned long long)t->stored_bytes);
    qctl_jnum(stdout, t->snr_db);
    printf(",\"checksum\":\"%08x\"}", cost.checksum);
  } else {
    char shp[128], b[32];
    qctl_shape_x(t, shp, sizeof shp);
    char snr[32];
    qctl_snr(t->snr_db, " dB", snr, sizeof snr);
    printf("%-*s %-*s %-5s %-8s %11s  %s\n", w->w_name, t->name, w->w_shape, shp, qs_dtype_name(t->src_dtype),
           qs_codec_name(t->codec), qctl_human(t->stored_bytes, b, sizeof b), snr);
  }
  w->n++;
  return 0;
}

int qctl_cmd_ls(qctl_ctx *c, int argc, char **argv) {
  if (qctl_plain_args(c, argc, argv, 0, 1)) return QCTL_USAGE;
  qs_store *s;
  qs_txn *t;
  int rc = qctl_open_read(c, &s, &t);
  if (rc) return rc;
  qctl_walk w = {c, t, 0, 4, 5};
  int e;
  if (argc == 1) {
    if (c->json) printf("{\"models\":[");
    else if (!(e = qs_models_each(t, qctl_width_model_cb, &w)))
      printf("%-*s %6s %8s %12s %11s %11s %7s  %s\n", w.w_name, "NAME", "ID", "TENSORS", "ELEMENTS", "SOURCE", "STORED", "RATIO", "CREATED (UTC)");
    e = qs_models_each(t, qctl_ls_model_cb, &w);
    if (c->json) printf("]}\n");
  } else {
    if (c->json) {
      printf("{\"model\":");
      qctl_jstr(stdout, argv[1]);
      printf(",\"tensors\":[");
    }
    qs_model m;
    e = qs_model_get(t, argv[1], &m);
    if (!e && !c->json && !(e = qs_tensors_each(t, argv[1], NULL, qctl_width_tensor_cb, &w)))
      printf("%-*s %-*s %-5s %-8s %11s  %s\n", w.w_name, "NAME", w.w_shape, "SHAPE", "DTYPE", "CODEC", "STORED", "SNR");
    if (!e) e = qs_tensors_each(t, argv[1], NULL, qctl_ls_tensor_cb, &w);
    if (c->json) printf("]}\n");
  }
  if (e) rc = qctl_fail(c, "%s", qs_error());
  qs_txn_end(t);
  qs_close(s);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * info */

/* A JSON value on one line, at most max bytes of it ("..." after). */
static void qctl_jval_line(const qs_json *v, size_t max) {
  char buf[512];
  size_t k = 0;
  switch (v->type) {
  case QS_JSON_STRING: k = (size_t)snprintf(buf, sizeof buf, "%.*s", (int)(v->len < 400 ? v->len : 400), v->str); break;
  case QS_JSON_NUMBER:
    if (v->num_flags & QS_JSON_IS_I64) k = (size_t)snprintf(buf, sizeof buf, "%lld", (long long)v->i64);
    else if (v->num_flags & QS_JSON_IS_U64) k = (size_t)snprintf(buf, sizeof buf, "%llu", (unsigned long long)v->u64);
    else k = (size_t)snprintf(buf, sizeof buf, "%.9g", v->num);
    break;
  case QS_JSON_BOOL: k = (size_t)snprintf(buf, sizeof buf, "%s", v->boolean ? "true" : "false"); break;
  case QS_JSON_NULL: k = (size_t)snprintf(buf, sizeof buf, "null"); break;
  case QS_JSON_ARRAY: /* short arrays of strings and numbers in full, e.g. architectures */
    k = (size_t)snprintf(buf, sizeof buf, "[");
    for (size_t i = 0; i < v->len && k < 200; i++) {
      const qs_json *e = &v->items[i];
      if (e->type == QS_JSON_STRING) k += (size_t)snprintf(buf + k, sizeof buf - k, "%s%.80s", i ? ", " : "", e->str);
      else if (e->type == QS_JSON_NUMBER) k += (size_t)snprintf(buf + k, sizeof buf - k, "%s%.9g", i ? ", " : "", e->num);
      else {
        k = (size_t)snprintf(buf, sizeof buf, "array of %zu", v->len);
        break;
      }
    }
    if (buf[0] == '[') k += (size_t)snprintf(buf + k, sizeof buf - k, k < 200 ? "]" : ", ...]");
    break;
  default: k = (size_t)snprintf(buf, sizeof buf, "%s of %zu", qs_json_type_name(v->type), v->len);
  }
  if (k >= sizeof buf) k = sizeof buf - 1;
  for (size_t i = 0; i < k; i++)
    if ((unsigned char)buf[i] < 0x20) buf[i] = ' ';
  if (k > max) printf("%.*s...", (int)max, buf);
  else printf("%s", buf);
}

/* The model's metadata for people: string members as "key: value"; the GGUF KV list with each
 * value (arrays as their type and length); HF files with their scalar members. --json prints the
 * whole JSON (docs/qinsctl.md). */
static void qctl_metadata_print(const char *md) {
  qs_json *root = NULL;
  if (qs_json_parse(md, strlen(md), &root, NULL, 0) || root->type != QS_JSON_OBJECT) {
    printf("metadata:  %s\n", md);
    qs_json_free(root);
    return;
  }
  printf("metadata:  %s\n", root->len ? "" : "(none)");
  const qs_json *gg = qs_json_get(root, "gguf"), *hf = NULL;
  if (gg && gg->type != QS_JSON_OBJECT) gg = NULL;
  for (size_t i = 0; i < root->len; i++) {
    const qs_json *v = &root->items[i];
    if (&root->items[i] == gg) continue;
    if (!strcmp(v->key, "hf") && v->type == QS_JSON_OBJECT) hf = v;
    else if (gg && v->type == QS_JSON_STRING && strcmp(v->key, "source_format"))
      continue; /* a GGUF KV: listed below with its type */
    else {
      printf("  %s: ", v->key);
      qctl_jval_line(v, 120);
      putchar('\n');
    }
  }
  const qs_json *kv = gg ? qs_json_get(gg, "kv") : NULL;
  if (kv && kv->type == QS_JSON_ARRAY) {
    printf("  gguf: %zu key/values\n", kv->len);
    for (size_t i = 0; i < kv->len; i++) {
      const qs_json *e = &kv->items[i];
      if (e->type != QS_JSON_ARRAY || e->len < 3) continue;
      const qs_json *k = &e->items[0], *t = &e->items[1], *v = &e->items[2];
      if (k->type != QS_JSON_STRING || t->type != QS_JSON_STRING) continue;
      printf("    %-40s %-9s ", k->str, t->str);
      if (v->type == QS_JSON_ARRAY) printf("%zu elements", v->len);
      else if (v->type == QS_JSON_NULL && e->len > 3) printf("%.0f elements (too large, not kept)", e->items[3].num);
      else qctl_jval_line(v, 80);
      putchar('\n');
    }
  }
  for (size_t i = 0; hf && i < hf->len; i++) {
    const qs_json *f = &hf->items[i];
    printf("  hf %s:%s\n", f->key, f->type == QS_JSON_OBJECT ? "" : " (not an object)");
    if (!strcmp(f->key, "tokenizer")) {
      const qs_json *model = qs_json_get(f, "model"), *vocab = model ? qs_json_get(model, "vocab") : NULL;
      const qs_json *ty = model ? qs_json_get(model, "type") : NULL;
      if (ty) {
        printf("    model.type: ");
        qctl_jval_line(ty, 40);
        putchar('\n');
      }
      if (vocab) printf("    model.vocab: %zu entries\n", vocab->len);
      continue;
    }
    for (size_t j = 0; f->type == QS_JSON_OBJECT && j < f->len; j++) {
      printf("    %s: ", f->items[j].key);
      qctl_jval_line(&f->items[j], 80);
      putchar('\n');
    }
  }
  qs_json_free(root);
}

int qctl_cmd_info(qctl_ctx *c, int argc, char **argv) {
  if (qctl_plain_args(c, argc, argv, 1, 1)) return QCTL_USAGE;
  char model[QS_MAX_NAME * 2 + 2];
  snprintf(model, sizeof model, "%s", argv[1]);
  char *slash = strchr(model, '/');
  const char *tname = NULL;
  if (slash) {
    *slash = 0;
    tname = slash + 1;
  }
  qs_store *s;
  qs_txn *t;
  int rc = qctl_open_read(c, &s, &t);
  if (rc) return rc;
  qs_model m;
  int e = qs_model_get(t, model, &m);
  if (!e && !tname) {
    double ratio = m.stored_bytes ? (double)m.src_bytes / (double)m.stored_bytes : 0;
    if (c->json) {
      printf("{\"name\":");
      qctl_jstr(stdout, m.name);
      printf(",\"id\":%llu", (unsigned long long)m.id);
      qctl_json_sizes(m.n_tensors, m.n_elem, m.src_bytes, m.stored_bytes);
      printf(",\"ratio\":");
      qctl_jnum(stdout, ratio);
      printf(",\"created\":%lld,\"metadata\":%s}\n", (long long)m.created, m.metadata);
    } else {
      char a[32], b[32], when[40];
      time_t tt = (time_t)m.created;
      struct tm tm;
      gmtime_r(&tt, &tm);
      strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
      printf("model:     %s\nid:        %llu\ntensors:   %llu\nelements:  %llu\nsource:    %s\n"
             "stored:    %s (%.2fx)\ncreated:   %s\n",
             m.name, (unsigned long long)m.id, (unsigned long long)m.n_tensors,
             (unsigned long long)m.n_elem, qctl_human(m.src_bytes, a, sizeof a),
             qctl_human(m.stored_bytes, b, sizeof b), ratio, when);
      qctl_metadata_print(m.metadata);
    }
  } else if (!e) {
    qs_tensor ten;
    qs_tensor_cost cost;
    e = qs_tensor_get(t, model, tname, &ten);
    if (!e) e = qs_tensor_cost_get(t, &ten, &cost);
    if (!e && c->json) {
      printf("{\"model\":");
      qctl_jstr(stdout, ten.model);
      printf(",\"name\":");
      qctl_jstr(stdout, ten.name);
      printf(",\"index\":%u,\"shape\":", ten.index);
      qctl_shape(stdout, &ten, 1);
      printf(",\"src_dtype\":\"%s\",\"codec\":\"%s\"", qs_dtype_name(ten.src_dtype),
             qs_codec_name(ten.codec));
      const struct { const char *key; uint64_t v; } counts[] = {
          {"elements", ten.n_elem}, {"row_len", ten.row_len}, {"rows", ten.n_rows},
          {"rows_per_chunk", ten.rows_per_chunk}, {"chunks", ten.n_chunks},
          {"source_bytes", ten.src_bytes}, {"stored_bytes", ten.stored_bytes},
          {"data_bytes", cost.data_bytes}, {"params_bytes", cost.params_bytes}};
      for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        printf(",\"%s\":%llu", counts[i].key, (unsigned long long)counts[i].v);
      printf(",\"params_id\":\"%016llx\",\"params_first\":%s,\"checksum\":\"%08x\",\"snr_db\":",
             (unsigned long long)cost.params_id, cost.params_first ? "true" : "false", cost.checksum);
      qctl_jnum(stdout, ten.snr_db);
      printf(",\"max_err\":");
      qctl_jnum(stdout, ten.max_err);
      printf("}\n");
    } else if (!e) {
      printf("tensor:         %s/%s\nindex:          %u\nshape:          ", ten.model, ten.name, ten.index);
      qctl_shape(stdout, &ten, 0);
      printf("\nsource dtype:   %s\ncodec:          %s\nelements:       %llu\nrows:           %llu x %llu\n"
             "chunks:         %llu (%llu rows each)\nsource bytes:   %llu\nstored bytes:   %llu "
             "(data %llu, params %llu%s)\n",
             qs_dtype_name(ten.src_dtype), qs_codec_name(ten.codec), (unsigned long long)ten.n_elem,
             (unsigned long long)ten.n_rows, (unsigned long long)ten.row_len,
             (unsigned long long)ten.n_chunks, (unsigned long long)ten.rows_per_chunk,
             (unsigned long long)ten.src_bytes, (unsigned long long)ten.stored_bytes,
             (unsigned long long)cost.data_bytes, (unsigned long long)cost.params_bytes,
             cost.params_bytes ? (cost.params_first ? ", paid here" : ", shared") : "");
      if (cost.params_id) printf("params id:      %016llx\n", (unsigned long long)cost.params_id);
      if (ten.n_elem) printf("bits/weight:    %.3f\n", 8.0 * (double)ten.stored_bytes / (double)ten.n_elem);
      if (isinf(ten.snr_db) && ten.snr_db > 0) printf("SNR:            lossless\n");
      else printf("SNR:            %.3f dB%s\nmax error:      %g\n", ten.snr_db,
                  qs_dtype_size(ten.src_dtype) > qc_dtype_size((qc_dtype)ten.codec) &&
                          ten.codec <= QC_BF16
                      ? " (narrowed from the source dtype)"
                      : "",
                  ten.max_err);
    }
  }
  if (e) rc = qctl_fail(c, "%s", qs_error());
  qs_txn_end(t);
  qs_close(s);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * export, rm */
int qctl_cmd_export(qctl_ctx *c, int argc, char **argv) {
  static const struct option opts[] = {{"dtype", required_argument, 0, 'd'},
                                       {"format", required_argument, 0, 'f'},
                                       {"piece-size", required_argument, 0, 'p'},
                                       {0, 0, 0, 0}};
  int ch, dt = -1, gguf = -1, qins = 0;
  unsigned long long piece = 0;
  qctl_getopt_reset();
  while ((ch = getopt_long(argc, argv, "d:f:p:", opts, NULL)) != -1) {
    if (ch == 'd' && (dt = qc_dtype_from_name(optarg)) >= 0) continue;
    if (ch == 'f' && !strcmp(optarg, "qins")) { /* a portable model file: cmd_pull.c */
      qins = 1;
      continue;
    }
    if (ch == 'p' && (piece = strtoull(optarg, NULL, 10)) > 0) continue;
    if (ch == 'f' && (!strcmp(optarg, "gguf") || !strcmp(optarg, "safetensors"))) {
      gguf = !strcmp(optarg, "gguf");
      continue;
    }
    if (ch == 'd') fprintf(stderr, "qinsctl export: --dtype is f32, f16 or bf16, got \"%s\"\n", optarg);
    if (ch == 'f') fprintf(stderr, "qinsctl export: --format is safetensors, gguf or qins, got \"%s\"\n", optarg);
    if (ch == 'p') fprintf(stderr, "qinsctl export: --piece-size is a byte count, got \"%s\"\n", optarg);
    return qctl_usage(c, QCTL_USAGE);
  }
  if (optind != argc - 2) return qctl_usage(c, QCTL_USAGE);
  if (qins) return qctl_export_qins(c, argv[optind], argv[optind + 1], piece);
  const char *out = argv[optind + 1];
  size_t ol = strlen(out);
  if (gguf < 0) gguf = ol >= 5 && !strcasecmp(out + ol - 5, ".gguf"); /* else safetensors */
  qs_store *s;
  int rc = qctl_open(c, &s, QS_OPEN_RDONLY);
  if (rc) return rc;
  qctl_progress pr = {isatty(2), 0, qctl_now()};
  int e = gguf ? qs_export_gguf(s, argv[optind], out, dt, qctl_progress_cb, &pr)
               : qs_export_safetensors(s, argv[optind], out, dt < 0 ? QC_DT_F32 : (qc_dtype)dt,
                                       qctl_progress_cb, &pr);
  if (pr.tty) fprintf(stderr, "\r%90s\r", "");
  const char *dts = dt >= 0 ? qc_dtype_name((qc_dtype)dt) : gguf ? "source dtypes" : "f32";
  if (e) {
    rc = qctl_fail(c, "%s", qs_error());
  } else if (c->json) {
    printf("{\"model\":");
    qctl_jstr(stdout, argv[optind]);
    printf(",\"path\":");
    qctl_jstr(stdout, out);
    printf(",\"format\":\"%s\",\"dtype\":\"%s\"}\n", gguf ? "gguf" : "safetensors",
           dt >= 0 ? qc_dtype_name((qc_dtype)dt) : gguf ? "source" : "f32");
  } else {
    printf("exported %s to %s (%s, %s)\n", argv[optind], out, gguf ? "gguf" : "safetensors", dts);
  }
  qs_close(s);
  return rc;
}

int qctl_cmd_rm(qctl_ctx *c, int argc, char **argv) {
  if (qctl_plain_args(c, argc, argv, 1, 1)) return QCTL_USAGE;
  qs_store *s;
  int rc = qctl_open(c, &s, 0);
  if (rc) return rc;
  if (qs_model_remove(s, argv[1])) {
    rc = qctl_fail(c, "%s", qs_error());
  } else if (c->json) {
    printf("{\"removed\":");
    qctl_jstr(stdout, argv[1]);
    printf("}\n");
  } else {
    printf("removed %s\n", argv[1]);
  }
  qs_close(s);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * verify */
typedef struct qctl_vp {
  qctl_ctx *c;
  int n;
} qctl_vp;

static void qctl_verify_cb(void *ud, const char *msg) {
  qctl_vp *v = ud;
  fprintf(stderr, "qinsctl verify: %s\n", msg);
  if (v->c->json) {
    printf("%s", v->n ? "," : "");
    qctl_jstr(stdout, msg);
  }
  v->n++;
}

int qctl_cmd_verify(qctl_ctx *c, int argc, char **argv) {
  if (qctl_plain_args(c, argc, argv, 0, 1)) return QCTL_USAGE;
  qs_store *s;
  int rc = qctl_open(c, &s, QS_OPEN_RDONLY);
  if (rc) return rc;
  qctl_vp vp = {c, 0};
  uint64_t probs = 0, checked = 0;
  if (c->json) printf("{\"problems\":[");
  int e = qs_verify(s, argc == 2 ? argv[1] : NULL, qctl_verify_cb, &vp, &probs, &checked);
  if (c->json)
    printf("],\"tensors_checked\":%llu,\"ok\":%s}\n", (unsigned long long)checked,
           !e && !probs ? "true" : "false");
  if (e) rc = qctl_fail(c, "%s", qs_error());
  else if (probs) rc = QCTL_FAIL;
  if (!c->json && !e)
    printf("%s: %llu tensors checked, %llu problems\n", probs ? "FAILED" : "ok",
           (unsigned long long)checked, (unsigned long long)probs);
  qs_close(s);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * backup: qs_backup (a consistent, compacted copy while qinsd serves), then optionally verify the
 * copy as a fresh host would: opened on its own and every record checked. */
int qctl_cmd_backup(qctl_ctx *c, int argc, char **argv) {
  static const struct option opts[] = {{"verify", no_argument, 0, 'v'}, {0, 0, 0, 0}};
  int verify = 0, ch;
  qctl_getopt_reset();
  while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    if (ch == 'v') verify = 1;
    else return qctl_usage(c, QCTL_USAGE);
  }
  if (argc - optind != 1) return qctl_usage(c, QCTL_USAGE);
  const char *dir = argv[optind];
  qs_store *s;
  int rc = qctl_open(c, &s, QS_OPEN_RDONLY);
  if (rc) return rc;
  double t0 = qctl_now();
  qs_backup_info bi;
  int e = qs_backup(s, dir, &bi);
  double secs = qctl_now() - t0;
  qs_close(s);
  if (e) return qctl_fail(c, "%s", qs_error());
  uint64_t probs = 0, checked = 0;
  if (verify) {
    qs_store *b;
    if (qs_open(&b, dir, QS_OPEN_RDONLY)) return qctl_fail(c, "%s", qs_error());
    qctl_vp vp = {c, 0};
    qctl_ctx quiet = *c;
    quiet.json = 0; /* problems go to stderr only; the JSON carries the count */
    vp.c = &quiet;
    e = qs_verify(b, NULL, qctl_verify_cb, &vp, &probs, &checked);
    qs_close(b);
    char lk[4200];
    snprintf(lk, sizeof lk, "%s/lock.mdb", dir); /* ours; the copy stays data.mdb alone */
    unlink(lk);
    if (e) return qctl_fail(c, "verifying the backup %s: %s", dir, qs_error());
  }
  if (c->json) {
    printf("{\"backup\":");
    qctl_jstr(stdout, dir);
    printf(",\"models\":%llu,\"file_bytes\":%llu,\"source_file_bytes\":%llu,"
           "\"staging_dropped\":%llu,\"seconds\":",
           (unsigned long long)bi.n_models, (unsigned long long)bi.file_bytes,
           (unsigned long long)bi.source_file_bytes, (unsigned long long)bi.staging_dropped);
    qctl_jnum(stdout, secs);
    if (verify)
      printf(",\"verified\":{\"tensors_checked\":%llu,\"problems\":%llu}",
             (unsigned long long)checked, (unsigned long long)probs);
    printf("}\n");
  } else {
    char h1[32], h2[32];
    printf("backup %s: %llu models, %s (source file %s), %.2f s\n", dir,
           (unsigned long long)bi.n_models, qctl_human(bi.file_bytes, h1, sizeof h1),
           qctl_human(bi.source_file_bytes, h2, sizeof h2), secs);
    if (bi.staging_dropped)
      printf("left out %llu staged id(s) (an import in progress or unreclaimed garbage)\n",
             (unsigned long long)bi.staging_dropped);
    if (verify)
      printf("verify %s: %s: %llu tensors checked, %llu problems\n", dir,
             probs ? "FAILED" : "ok", (unsigned long long)checked, (unsigned long long)probs);
  }
  return probs ? QCTL_FAIL : QCTL_OK;
}

/* ---------------------------------------------------------------------------------------------
 * audit */
typedef struct qctl_at {
  qs_tensor t;
  qs_tensor_cost cost;
  double stored;   /* data + params amortized over the model's tensors sharing the blob */
} qctl_at;

typedef struct qctl_alist {
  qctl_at *v;
  size_t n, cap;
  qs_txn *txn;
  int rc;
} qctl_alist;

static int qctl_audit_tensor_cb(void *ud, const qs_tensor *t) {
  qctl_alist *l = ud;
  qctl_at *nv = qp_grow(l->v, &l->cap, l->n, sizeof *nv, 64);
  if (!nv) {
    l->rc = QINS_ENOMEM;
    return 1;
  }
  l->v = nv;
  qctl_at *a = &l->v[l->n];
  a->t = *t;
  if ((l->rc = qs_tensor_cost_get(l->txn, t, &a->cost))) return 1;
  l->n++;
  return 0;
}

typedef struct qctl_mlist {
  qs_model *v;
  char **names;
  size_t n, cap;
} qctl_mlist;

static int qctl_mlist_cb(void *ud, const qs_model *m) {
  qctl_mlist *l = ud;
  if (l->n == l->cap) {
    size_t nc = l->cap ? 2 * l->cap : 16;
    qs_model *nv = realloc(l->v, nc * sizeof *nv);
    char **nn = realloc(l->names, nc * sizeof *nn);
    if (nv) l->v = nv;
    if (nn) l->names = nn;
    if (!nv || !nn) return 1;
    l->cap = nc;
  }
  l->v[l->n] = *m;
  l->names[l->n] = strdup(m->name);
  l->n++;
  return 0;
}

typedef struct qctl_sum {
  uint64_t n_tensors, elements, src, stored;
  double snr_w, snr_n; /* element-weighted SNR over lossy tensors */
} qctl_sum;

static void qctl_sum_json(const char *key, const qctl_sum *s) {
  printf("\"%s\":{\"n_tensors\":%llu,\"elements\":%llu,\"source_bytes\":%llu,\"stored_bytes\":%llu,"
         "\"bytes_per_weight\":",
         key, (unsigned long long)s->n_tensors, (unsigned long long)s->elements,
         (unsigned long long)s->src, (unsigned long long)s->stored);
  qctl_jnum(stdout, s->elements ? (double)s->stored / (double)s->elements : 0);
  printf(",\"ratio\":");
  qctl_jnum(stdout, s->stored ? (double)s->src / (double)s->stored : 0);
  printf(",\"snr_db\":");
  qctl_jnum(stdout, s->snr_n > 0 ? s->snr_w / s->snr_n : INFINITY);
  printf("}");
}

int qctl_cmd_audit(qctl_ctx *c, int argc, char **argv) {
  if (qctl_plain_args(c, argc, argv, 0, 1)) return QCTL_USAGE;
  qs_store *s;
  int rc = qctl_open(c, &s, QS_OPEN_RDONLY);
  if (rc) return rc;
  qs_store_info si;
  qs_txn *t = NULL;
  qctl_mlist ml = {0};
  int e = qs_store_info_get(s, &si);
  if (!e) e = qs_txn_begin(s, &t);
  if (!e && argc == 2) {
    qs_model m;
    if (!(e = qs_model_get(t, argv[1], &m))) qctl_mlist_cb(&ml, &m);
  } else if (!e) {
    e = qs_models_each(t, qctl_mlist_cb, &ml);
  }
  if (e) {
    rc = qctl_fail(c, "%s", qs_error());
    goto out;
  }
  qctl_sum total = {0};
  if (c->json) {
    printf("{\"store\":");
    qctl_jstr(stdout, c->store);
    printf(",\"models\":[");
  }
  for (size_t mi = 0; mi < ml.n; mi++) {
    qs_model *m = &ml.v[mi];
    qctl_alist al = {0};
    al.txn = t;
    e = qs_tensors_each(t, ml.names[mi], NULL, qctl_audit_tensor_cb, &al);
    if (e || al.rc) {
      rc = qctl_fail(c, "%s", qs_error());
      free(al.v);
      goto out;
    }
    /* Amortize each shared params blob over the model's tensors using it. */
    for (size_t i = 0; i < al.n; i++) {
      uint64_t users = 0;
      for (size_t j = 0; j < al.n; j++)
        if (al.v[i].cost.params_id && al.v[j].cost.params_id == al.v[i].cost.params_id) users++;
      al.v[i].stored = (double)al.v[i].cost.data_bytes +
                       (users ? (double)al.v[i].cost.params_bytes / (double)users : 0);
    }
    qctl_sum ms = {0}, mat = {0};
    uint64_t blobs = 0, blob_bytes = 0;
    double mat_stored = 0;
    for (size_t i = 0; i < al.n; i++) {
      const qctl_at *a = &al.v[i];
      int lossy = a->t.codec != QS_RAW && isfinite(a->t.snr_db); /* any tensor not exact */
      ms.n_tensors++;
      ms.elements += a->t.n_elem;
      ms.src += a->t.src_bytes;
      if (a->cost.params_first) {
        blobs++;
        blob_bytes += a->cost.params_bytes;
      }
      if (lossy) {
        ms.snr_w += a->t.snr_db * (double)a->t.n_elem;
        ms.snr_n += (double)a->t.n_elem;
      }
      if (a->t.ndim >= 2) {
        mat.n_tensors++;
        mat.elements += a->t.n_elem;
        mat.src += a->t.src_bytes;
        mat_stored += a->stored;
        if (lossy) {
          mat.snr_w += a->t.snr_db * (double)a->t.n_elem;
          mat.snr_n += (double)a->t.n_elem;
        }
      }
    }
    ms.stored = m->stored_bytes;
    mat.stored = (uint64_t)llround(mat_stored);
    total.n_tensors += ms.n_tensors;
    total.elements += ms.elements;
    total.src += ms.src;
    total.stored += ms.stored;
    total.snr_w += ms.snr_w;
    total.snr_n += ms.snr_n;
    if (c->json) {
      printf("%s{\"name\":", mi ? "," : "");
      qctl_jstr(stdout, m->name);
      printf(",\"id\":%llu,\"params_blobs\":%llu,\"params_bytes\":%llu,", (unsigned long long)m->id,
             (unsigned long long)blobs, (unsigned long long)blob_bytes);
      qctl_sum_json("all", &ms);
      printf(",");
      qctl_sum_json("matrices", &mat);
      printf(",\"tensors\":[");
      for (size_t i = 0; i < al.n; i++) {
        const qctl_at *a = &al.v[i];
        printf("%s{\"name\":", i ? "," : "");
        qctl_jstr(stdout, a->t.name);
        printf(",\"shape\":");
        qctl_shape(stdout, &a->t, 1);
        printf(",\"codec\":\"%s\",\"src_dtype\":\"%s\",\"elements\":%llu,\"source_bytes\":%llu,"
               "\"stored_bytes\":",
               qs_codec_name(a->t.codec), qs_dtype_name(a->t.src_dtype),
               (unsigned long long)a->t.n_elem, (unsigned long long)a->t.src_bytes);
        qctl_jnum(stdout, a->stored);
        printf(",\"data_bytes\":%llu,\"params_bytes\":%llu,\"bytes_per_weight\":",
               (unsigned long long)a->cost.data_bytes, (unsigned long long)a->cost.params_bytes);
        qctl_jnum(stdout, a->t.n_elem ? a->stored / (double)a->t.n_elem : 0);
        printf(",\"ratio\":");
        qctl_jnum(stdout, a->stored > 0 ? (double)a->t.src_bytes / a->stored : 0);
        printf(",\"snr_db\":");
        qctl_jnum(stdout, a->t.snr_db);
        printf(",\"max_err\":");
        qctl_jnum(stdout, a->t.max_err);
        printf("}");
      }
      printf("]}");
    } else {
      char a1[32], a2[32];
      printf("model %s (id %llu): %llu tensors, %llu codec parameter blobs (%s)\n", m->name,
             (unsigned long long)m->id, (unsigned long long)ms.n_tensors, (unsigned long long)blobs,
             qctl_human(blob_bytes, a1, sizeof a1));
      printf("  %-40s %-8s %12s %12s %9s %7s %10s\n", "TENSOR", "CODEC", "SOURCE", "STORED", "B/WEIGHT", "RATIO", "SNR dB");
      for (size_t i = 0; i < al.n; i++) {
        const qctl_at *a = &al.v[i];
        char snr[32];
        qctl_snr(a->t.snr_db, "", snr, sizeof snr);
        printf("  %-40s %-8s %12llu %12.0f %9.4f %6.2fx %10s\n", a->t.name, qs_codec_name(a->t.codec),
               (unsigned long long)a->t.src_bytes, a->stored,
               a->t.n_elem ? a->stored / (double)a->t.n_elem : 0,
               a->stored > 0 ? (double)a->t.src_bytes / a->stored : 0, snr);
      }
      printf("  matrices (>= 2 dims): %llu tensors, %llu weights, %s -> %s, %.4f bytes/weight, SNR %.2f dB (element-weighted)\n",
             (unsigned long long)mat.n_tensors, (unsigned long long)mat.elements,
             qctl_human(mat.src, a1, sizeof a1), qctl_human(mat.stored, a2, sizeof a2),
             mat.elements ? (double)mat.stored / (double)mat.elements : 0,
             mat.snr_n > 0 ? mat.snr_w / mat.snr_n : INFINITY);
      printf("  model total: %llu weights, %s -> %s (%.2fx), %.4f bytes/weight\n\n",
             (unsigned long long)ms.elements, qctl_human(ms.src, a1, sizeof a1),
             qctl_human(ms.stored, a2, sizeof a2), ms.stored ? (double)ms.src / (double)ms.stored : 0,
             ms.elements ? (double)ms.stored / (double)ms.elements : 0);
    }
    free(al.v);
  }
  uint64_t used = (si.last_pgno + 1) * si.page_size;
  if (c->json) {
    printf("],");
    qctl_sum_json("totals", &total);
    printf(",\"lmdb\":{\"file_bytes\":%llu,\"map_bytes\":%llu,\"page_size\":%llu,"
           "\"pages_used\":%llu,\"used_bytes\":%llu,\"free_pages\":%llu,\"free_bytes\":%llu,"
           "\"params_blobs\":%llu,\"params_bytes\":%llu,\"staging\":%llu}}\n",
           (unsigned long long)si.file_size, (unsigned long long)si.map_size,
           (unsigned long long)si.page_size, (unsigned long long)(si.last_pgno + 1),
           (unsigned long long)used, (unsigned long long)si.free_pages,
           (unsigned long long)(si.free_pages * si.page_size), (unsigned long long)si.n_params,
           (unsigned long long)si.params_bytes, (unsigned long long)si.n_staging);
  } else {
    char a1[32], a2[32], a3[32], a4[32];
    printf("totals: %llu models, %llu tensors, %llu weights, %s -> %s (%.2fx)\n",
           (unsigned long long)ml.n, (unsigned long long)total.n_tensors,
           (unsigned long long)total.elements, qctl_human(total.src, a1, sizeof a1),
           qctl_human(total.stored, a2, sizeof a2),
           total.stored ? (double)total.src / (double)total.stored : 0);
    printf("lmdb: file %s, used %s, free pages %llu (%s reusable), %llu shared parameter blobs\n",
           qctl_human(si.file_size, a3, sizeof a3), qctl_human(used, a4, sizeof a4),
           (unsigned long long)si.free_pages, qctl_human(si.free_pages * si.page_size, a1, sizeof a1),
           (unsigned long long)si.n_params);
  }
out:
  for (size_t i = 0; i < ml.n; i++) free(ml.names[i]);
  free(ml.names);
  free(ml.v);
  qs_txn_end(t);
  qs_close(s);
  return rc;
}
