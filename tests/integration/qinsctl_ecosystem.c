/* SPDX-License-Identifier: MIT */
/*
 * qinsctl_ecosystem.c — qinsctl on files from the wider ecosystem (issue 15; docs/qinsctl.md):
 * --version (qins-llama2's too), a bad option named, `ls` columns sized to their content, `import --help` listing
 * codecs and policy, narrowed sources (f64) shown with their real SNR by import/ls/info/audit,
 * GGUF metadata shown by `info`, `export --format gguf`, and `stats --format prometheus` against
 * a running qinsd. Every input is generated here; the store is read only through qinsctl.
 */
#include <criterion/criterion.h>
#include <ctype.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon.h"
#include "qt.h"

static char dir[64], store[128];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(store, sizeof store, "%s/store", dir);
}
static void teardown(void) { qt_rmrf(dir); }
TestSuite(qinsctl_ecosystem, .init = setup, .fini = teardown, .timeout = 120);

#define CTL(out, err, ...) qt_ctl(store, out, err, __VA_ARGS__, NULL)

Test(qinsctl_ecosystem, version_and_bad_options_are_named) {
  char *out = NULL, *err = NULL;
  cr_assert_eq(CTL(&out, &err, "--version"), 0);
  cr_assert(!strncmp(out, "qinsctl ", 8) && isdigit((unsigned char)out[8]), "%s", out);
  free(out);
  free(err);
  char bin[256];
  char *argv[] = {(char *)qt_bin("qins-llama2", bin, sizeof bin), "--version", NULL};
  cr_assert_eq(qt_run(argv, NULL, &out, &err), 0);
  cr_assert(!strncmp(out, "qins-llama2 ", 12) && isdigit((unsigned char)out[12]), "%s", out);
  free(out);
  free(err);
  const char *cmds[] = {"ls", "info", "rm", "verify", "audit", "import", "export"};
  for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
    cr_assert_eq(CTL(&out, &err, cmds[i], "--bogus"), 2, "%s", cmds[i]);
    cr_assert(strstr(err, "unrecognized option '--bogus'"), "%s: %s", cmds[i], err);
    free(out);
    free(err);
  }
  cr_assert_eq(CTL(&out, &err, "import", "--help"), 0);
  cr_assert(strstr(out, "qins8") && strstr(out, "f32") && strstr(out, "policy") &&
                strstr(out, "--allow-requant"),
            "%s", out);
  free(out);
  free(err);
}

/* The column at which `word` starts in the first line holding it. */
static int col_of(const char *text, const char *line_key, const char *word) {
  const char *l = strstr(text, line_key);
  cr_assert(l, "no line with %s in:\n%s", line_key, text);
  if (*l == '\n') l++;
  while (l > text && l[-1] != '\n') l--;
  const char *w = strstr(l, word);
  const char *eol = strchr(l, '\n');
  cr_assert(w && (!eol || w < eol), "no %s on the line of %s", word, line_key);
  return (int)(w - l);
}

Test(qinsctl_ecosystem, ls_columns_size_to_their_content) {
  /* PEFT-style names longer than 40 characters, and a 3-D tensor with a wide shape. */
  const char *longn = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
  float a[6] = {1, 2, 3, 4, 5, 6}, b[24];
  for (int i = 0; i < 24; i++) b[i] = (float)i;
  qt_tensor t[2] = {{longn, QS_ST_F32, 2, {2, 3}, a, sizeof a},
                    {"w", QS_ST_F32, 3, {2, 3, 4}, b, sizeof b}};
  char p[256], model[] = "adapter-with-a-rather-long-model-name-for-columns";
  snprintf(p, sizeof p, "%s/a.safetensors", dir);
  cr_assert_eq(qt_st_write(p, t, 2, NULL), 0);
  char *out = NULL, *err = NULL;
  cr_assert_eq(CTL(&out, &err, "import", p, "--model", model, "--codec", "f32"), 0, "%s", err);
  free(out);
  free(err);
  cr_assert_eq(CTL(&out, &err, "ls", model), 0, "%s", err);
  int shape = col_of(out, "NAME", "SHAPE");
  cr_assert_eq(col_of(out, longn, "2x3"), shape, "%s", out);
  cr_assert_eq(col_of(out, "\nw ", "2x3x4"), shape, "%s", out);
  cr_assert_eq(shape, (int)strlen(longn) + 1, "%s", out);
  int dtype = col_of(out, "NAME", "DTYPE");
  cr_assert_eq(col_of(out, longn, "f32"), dtype, "%s", out);
  cr_assert_eq(col_of(out, "\nw ", "f32"), dtype, "%s", out);
  free(out);
  free(err);
  cr_assert_eq(CTL(&out, &err, "ls"), 0, "%s", err);
  cr_assert_eq(col_of(out, "NAME", "ID"), (int)strlen(model) + 1 + 4, "%s", out); /* %6s */
  free(out);
  free(err);
}

Test(qinsctl_ecosystem, narrowed_sources_show_their_real_snr) {
  static double v[64];
  for (int i = 0; i < 64; i++) v[i] = sin(i * 0.3) / 3.0;
  qt_tensor t = {"scale", QS_ST_F64, 1, {64}, v, sizeof v};
  char p[256];
  snprintf(p, sizeof p, "%s/f64.safetensors", dir);
  cr_assert_eq(qt_st_write(p, &t, 1, NULL), 0);
  char *out = NULL, *err = NULL;
  cr_assert_eq(CTL(&out, &err, "import", p), 0, "%s", err);
  cr_assert(strstr(out, "1 tensor narrowed from the source dtype, lowest SNR 1") &&
                strstr(out, "dB (scale)"),
            "%s", out);
  free(out);
  free(err);
  const char *views[][3] = {{"ls", "f64", NULL}, {"info", "f64/scale", NULL}, {"audit", "f64", NULL}};
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(CTL(&out, &err, views[i][0], views[i][1]), 0, "%s", err);
    cr_assert_null(strstr(out, "lossless"), "%s says lossless:\n%s", views[i][0], out);
    regex_t re;
    cr_assert_eq(regcomp(&re, "1[4-6][0-9]\\.[0-9][0-9]", REG_EXTENDED), 0);
    cr_assert_eq(regexec(&re, out, 0, NULL, 0), 0, "%s shows no SNR near 150 dB:\n%s", views[i][0], out);
    regfree(&re);
    free(out);
    free(err);
  }
  cr_assert_eq(CTL(&out, &err, "--json", "info", "f64/scale"), 0, "%s", err);
  cr_assert(strstr(out, "\"src_dtype\":\"f64\"") && strstr(out, "\"snr_db\":1"), "%s", out);
  free(out);
  free(err);
}

Test(qinsctl_ecosystem, gguf_metadata_shown_and_exported) {
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, 1);
  qt_put_u64(&b, 3);
  qt_put_gstr(&b, "general.architecture");
  qt_put_u32(&b, 8);
  qt_put_gstr(&b, "llama");
  qt_put_gstr(&b, "llama.context_length");
  qt_put_u32(&b, 4);
  qt_put_u32(&b, 2048);
  qt_put_gstr(&b, "tokenizer.ggml.tokens");
  qt_put_u32(&b, 9);
  qt_put_u32(&b, 8);
  qt_put_u64(&b, 3);
  qt_put_gstr(&b, "<unk>");
  qt_put_gstr(&b, "<s>");
  qt_put_gstr(&b, "</s>");
  qt_put_gstr(&b, "token_embd.weight");
  qt_put_u32(&b, 2);
  qt_put_u64(&b, 4);
  qt_put_u64(&b, 3);
  qt_put_u32(&b, 0);
  qt_put_u64(&b, 0);
  while (b.n % 32) qt_put(&b, "\0", 1);
  float w[12];
  for (int i = 0; i < 12; i++) w[i] = (float)i / 4;
  qt_put(&b, w, sizeof w);
  while (b.n % 32) qt_put(&b, "\0", 1);
  char p[256], q[256];
  snprintf(p, sizeof p, "%s/tiny.gguf", dir);
  cr_assert_eq(qt_write(p, b.p, b.n), 0);
  char *out = NULL, *err = NULL;
  cr_assert_eq(CTL(&out, &err, "import", p, "--codec", "f32"), 0, "%s", err);
  free(out);
  free(err);
  cr_assert_eq(CTL(&out, &err, "info", "tiny"), 0, "%s", err);
  cr_assert(strstr(out, "gguf: 3 key/values"), "%s", out);
  regex_t re;
  cr_assert_eq(regcomp(&re, "llama\\.context_length +u32 +2048\n", REG_EXTENDED), 0);
  cr_assert_eq(regexec(&re, out, 0, NULL, 0), 0, "%s", out);
  regfree(&re);
  cr_assert_eq(regcomp(&re, "tokenizer\\.ggml\\.tokens +\\[string\\] +3 elements\n", REG_EXTENDED), 0);
  cr_assert_eq(regexec(&re, out, 0, NULL, 0), 0, "%s", out);
  regfree(&re);
  free(out);
  free(err);
  cr_assert_eq(CTL(&out, &err, "--json", "info", "tiny"), 0, "%s", err);
  cr_assert(strstr(out, "[\"tokenizer.ggml.tokens\",\"[string]\",[\"<unk>\",\"<s>\",\"</s>\"]]"), "%s", out);
  free(out);
  free(err);
  snprintf(q, sizeof q, "%s/again.gguf", dir);
  cr_assert_eq(CTL(&out, &err, "export", "tiny", q), 0, "%s", err);
  cr_assert(strstr(out, "gguf"), "%s", out);
  free(out);
  free(err);
  size_t n;
  char *x = qt_read(q, &n);
  cr_assert(x && n == b.n && !memcmp(x, b.p, n), "the exported GGUF differs from the source");
  free(x);
  free(b.p);
  snprintf(q, sizeof q, "%s/again.bin", dir);
  cr_assert_eq(CTL(&out, &err, "export", "tiny", q, "--format", "gguf"), 0, "%s", err);
  free(out);
  free(err);
  x = qt_read(q, &n);
  cr_assert(x && n > 4 && !memcmp(x, "GGUF", 4));
  free(x);
}

/* ---------------------------------------------------------------------------------------------
 * stats --format prometheus */
static int fill(qs_store *s, void *ud) {
  (void)ud;
  qs_import *im;
  int rc = qs_import_begin(s, "m", NULL, &im);
  if (rc) return rc;
  float v[4] = {1, 2, 3, 4};
  uint64_t shape[1] = {4};
  if ((rc = ts_import_f32(im, "w", 1, shape, QC_F32, v))) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

Test(qinsctl_ecosystem, stats_in_prometheus_text_format) {
  ts_daemon D;
  cr_assert_eq(ts_dir_make(&D), 0);
  cr_assert_eq(ts_store_fill(D.store, fill, NULL), 0);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0);
  char bin[256];
  char *argv[] = {(char *)qt_bin("qinsctl", bin, sizeof bin), "--socket", D.sock, "stats",
                  "--format", "prometheus", NULL};
  char *out = NULL, *err = NULL;
  int rc = qt_run(argv, NULL, &out, &err);
  char *argv2[] = {argv[0], "--socket", D.sock, "stats", "--format", "xml", NULL};
  char *out2 = NULL, *err2 = NULL;
  int rc2 = qt_run(argv2, NULL, &out2, &err2);
  int st = ts_daemon_stop(&D);
  ts_dir_remove(&D, 0);
  cr_assert_eq(rc, 0, "%s", err);
  cr_assert_eq(rc2, 2, "%s", err2);
  cr_assert(strstr(err2, "--format is text or prometheus"), "%s", err2);
  cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  cr_assert(strstr(out, "# TYPE qinsd_requests_total counter\nqinsd_requests_total "), "%s", out);
  cr_assert(strstr(out, "# TYPE qinsd_connections gauge\nqinsd_connections 1\n"), "%s", out);
  cr_assert(strstr(out, "# TYPE qinsd_method_requests_total counter\n"), "%s", out);
  cr_assert(strstr(out, "qinsd_method_requests_total{method=\"stats\"} "), "%s", out);
  /* Every line is a comment (# HELP / # TYPE) or a sample "name{labels} value". */
  regex_t sample, type;
  cr_assert_eq(regcomp(&sample, "^qinsd_[a-z0-9_]+(\\{[a-z]+=\"[^\"]*\"\\})? -?[0-9][0-9.e+-]*$",
                       REG_EXTENDED | REG_NOSUB),
               0);
  cr_assert_eq(regcomp(&type, "^# (HELP qinsd_[a-z0-9_]+ .+|TYPE qinsd_[a-z0-9_]+ (counter|gauge))$",
                       REG_EXTENDED | REG_NOSUB),
               0);
  int samples = 0;
  for (char *l = strtok(out, "\n"); l; l = strtok(NULL, "\n")) {
    if (l[0] == '#') cr_assert_eq(regexec(&type, l, 0, NULL, 0), 0, "bad comment line: %s", l);
    else {
      cr_assert_eq(regexec(&sample, l, 0, NULL, 0), 0, "bad sample line: %s", l);
      samples++;
    }
  }
  regfree(&sample);
  regfree(&type);
  cr_assert_gt(samples, 5);
  free(out);
  free(err);
  free(out2);
  free(err2);
}

Test(qinsctl_ecosystem, hf_snapshot_named_and_its_config_shown) {
  char p[256];
  const char *parts[] = {"models--acme--tiny-llama", "models--acme--tiny-llama/snapshots",
                         "models--acme--tiny-llama/snapshots/5e1f"};
  for (int i = 0; i < 3; i++) {
    snprintf(p, sizeof p, "%s/%s", dir, parts[i]);
    cr_assert_eq(mkdir(p, 0700), 0);
  }
  float w[4] = {1, 2, 3, 4};
  qt_tensor t = {"model.norm.weight", QS_ST_F32, 1, {4}, w, sizeof w};
  snprintf(p, sizeof p, "%s/%s/model.safetensors", dir, parts[2]);
  cr_assert_eq(qt_st_write(p, &t, 1, "{\"format\":\"pt\"}"), 0);
  const char *cfg = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 4}";
  snprintf(p, sizeof p, "%s/%s/config.json", dir, parts[2]);
  cr_assert_eq(qt_write(p, cfg, strlen(cfg)), 0);
  snprintf(p, sizeof p, "%s/%s", dir, parts[2]);
  char *out = NULL, *err = NULL;
  cr_assert_eq(CTL(&out, &err, "import", p), 0, "%s", err);
  cr_assert(strstr(out, "imported tiny-llama:"), "%s", out);
  free(out);
  free(err);
  cr_assert_eq(CTL(&out, &err, "info", "tiny-llama"), 0, "%s", err);
  cr_assert(strstr(out, "  format: pt\n") && strstr(out, "  hf config:\n") &&
                strstr(out, "    architectures: [LlamaForCausalLM]\n") &&
                strstr(out, "    hidden_size: 4\n"),
            "%s", out);
  free(out);
  free(err);
}
