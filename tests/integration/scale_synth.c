/* SPDX-License-Identifier: MIT */
/*
 * scale_synth.c — `qinsctl synth` (issue 6) end to end on the small `tiny` arch, run as a separate
 * process on a temp store: the Phi-3 tensor names and shapes, the default codec policy (qins8 for
 * matrices, f32 for vectors) and --codec/--codec-for, `verify` passing, trained-like statistics
 * (heavy tails: kurtosis > 3; per-row scales that vary; a few large outliers; norms near 1),
 * determinism from the seed, the full Phi-3.5-mini plan (3,821,079,552 weights, from --list, so
 * nothing large is written), and usage errors.
 *
 * The test process never opens the LMDB env: it reads the store through `qinsctl --json` and the
 * values through `qinsctl export` (a safetensors file read with store/safetensors.h). No timing.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "json.h"
#include "qt.h"
#include "safetensors.h"

static char dir[64], store[128], qinsctl[4096];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(store, sizeof store, "%s/store", dir);
  qt_bin("qinsctl", qinsctl, sizeof qinsctl);
  cr_assert_eq(access(qinsctl, X_OK), 0, "%s not built", qinsctl);
}
static void teardown(void) { qt_rmrf(dir); }

TestSuite(scale_synth, .init = setup, .fini = teardown, .timeout = 120);

/* Runs qinsctl --store STORE args... (NULL-terminated); returns the exit status. */
static int ctl(char **out, char **err, ...) {
  va_list ap;
  va_start(ap, err);
  int rc = qt_vctl(store, out, err, ap);
  va_end(ap);
  return rc;
}

static qs_json *parse(const char *text) {
  qs_json *v = NULL;
  char e[256];
  cr_assert_eq(qs_json_parse(text, strlen(text), &v, e, sizeof e), 0, "bad JSON (%s): %s", e, text);
  return v;
}

/* The tiny arch as the Phi-3 layout dictates (independent of cmd_synth.c's own table): name,
 * shape. hidden 256, qkv 768, intermediate 512 (gate_up 1024), vocab 1024, 2 layers. */
typedef struct want {
  char name[96];
  int ndim;
  uint64_t shape[2];
} want;

static size_t tiny_layout(want *w) {
  size_t n = 0;
#define W(nd, a, b, ...)                                                                           \
  do {                                                                                             \
    snprintf(w[n].name, sizeof w[n].name, __VA_ARGS__);                                          \
    w[n].ndim = nd, w[n].shape[0] = a, w[n].shape[1] = b;                                         \
    n++;                                                                                           \
  } while (0)
  W(2, 1024, 256, "model.embed_tokens.weight");
  W(2, 1024, 256, "lm_head.weight");
  W(1, 256, 0, "model.norm.weight");
  for (int l = 0; l < 2; l++) {
    W(2, 768, 256, "model.layers.%d.self_attn.qkv_proj.weight", l);
    W(2, 256, 256, "model.layers.%d.self_attn.o_proj.weight", l);
    W(2, 1024, 256, "model.layers.%d.mlp.gate_up_proj.weight", l);
    W(2, 256, 512, "model.layers.%d.mlp.down_proj.weight", l);
    W(1, 256, 0, "model.layers.%d.input_layernorm.weight", l);
    W(1, 256, 0, "model.layers.%d.post_attention_layernorm.weight", l);
  }
#undef W
  return n;
}

/* `ls MODEL --json` as a parsed document (caller frees). */
static qs_json *ls_model(const char *model) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "--json", "ls", model, NULL), 0, "ls %s: %s", model, err);
  qs_json *v = parse(out);
  free(out);
  free(err);
  return v;
}

static const qs_json *find_tensor(const qs_json *ls, const char *name) {
  const qs_json *ts = qs_json_get(ls, "tensors");
  for (size_t i = 0; i < ts->len; i++)
    if (!strcmp(qs_json_get(&ts->items[i], "name")->str, name)) return &ts->items[i];
  return NULL;
}

Test(scale_synth, tiny_has_phi3_names_shapes_and_default_policy) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "--json", "synth", "--arch", "tiny", "--model", "t", "--seed", "3", NULL), 0,
               "synth: %s", err);
  qs_json *r = parse(out);
  cr_assert_str_eq(qs_json_get(r, "model")->str, "t");
  cr_assert_str_eq(qs_json_get(r, "arch")->str, "tiny");
  cr_assert_eq(qs_json_get(r, "n_tensors")->u64, 15);
  cr_assert_eq(qs_json_get(r, "elements")->u64, 1836288);
  cr_assert_eq(qs_json_get(r, "source_bytes")->u64, 1836288ull * 4);
  /* qins8: 8.5 bits a weight plus a 512-byte table per matrix; the f32 norms are 0.07%. */
  double bpw = qs_json_get(r, "bytes_per_weight")->num;
  cr_assert(bpw > 1.0 && bpw <= 1.1, "bytes/weight %g", bpw);
  cr_assert(qs_json_get(r, "snr_db_matrices")->num > 35, "SNR %g", qs_json_get(r, "snr_db_matrices")->num);
  qs_json_free(r);
  free(out);
  free(err);

  want w[32];
  size_t n = tiny_layout(w);
  qs_json *ls = ls_model("t");
  cr_assert_eq(qs_json_get(ls, "tensors")->len, n);
  for (size_t i = 0; i < n; i++) {
    const qs_json *t = find_tensor(ls, w[i].name);
    cr_assert(t, "missing tensor %s", w[i].name);
    const qs_json *sh = qs_json_get(t, "shape");
    cr_assert_eq(sh->len, (size_t)w[i].ndim, "%s: ndim", w[i].name);
    for (int d = 0; d < w[i].ndim; d++)
      cr_assert_eq(sh->items[d].u64, w[i].shape[d], "%s: dim %d", w[i].name, d);
    cr_assert_str_eq(qs_json_get(t, "src_dtype")->str, "f32");
    cr_assert_str_eq(qs_json_get(t, "codec")->str, w[i].ndim >= 2 ? "qins8" : "f32", "%s", w[i].name);
  }
  qs_json_free(ls);

  /* The model's metadata names its origin. */
  cr_assert_eq(ctl(&out, &err, "--json", "info", "t", NULL), 0, "%s", err);
  qs_json *info = parse(out);
  const qs_json *md = qs_json_get(info, "metadata");
  cr_assert_str_eq(qs_json_get(md, "arch")->str, "tiny");
  cr_assert_str_eq(qs_json_get(md, "seed")->str, "3");
  qs_json_free(info);
  free(out);
  free(err);

  cr_assert_eq(ctl(&out, &err, "verify", NULL), 0, "verify: %s%s", out, err);
  free(out);
  free(err);
}

/* Moments of one tensor's values. */
typedef struct moments {
  double mean, sd, kurt, maxabs, row_cv;
} moments;

static moments measure(const float *x, uint64_t rows, uint64_t cols) {
  moments m = {0};
  uint64_t n = rows * cols;
  double s = 0, s2 = 0, s4 = 0;
  for (uint64_t i = 0; i < n; i++) s += x[i];
  m.mean = s / (double)n;
  for (uint64_t i = 0; i < n; i++) {
    double d = x[i] - m.mean, d2 = d * d;
    s2 += d2, s4 += d2 * d2;
    if (fabs(x[i]) > m.maxabs) m.maxabs = fabs(x[i]);
  }
  m.sd = sqrt(s2 / (double)n);
  m.kurt = (s4 / (double)n) / ((s2 / (double)n) * (s2 / (double)n));
  /* Coefficient of variation of the per-row RMS (a row's scale). */
  double rs = 0, rs2 = 0;
  for (uint64_t r = 0; r < rows; r++) {
    double q = 0;
    for (uint64_t c = 0; c < cols; c++) q += (double)x[r * cols + c] * x[r * cols + c];
    q = sqrt(q / (double)cols);
    rs += q, rs2 += q * q;
  }
  double rm = rs / (double)rows;
  m.row_cv = rows > 1 ? sqrt(fmax(0, rs2 / (double)rows - rm * rm)) / rm : 0;
  return m;
}

Test(scale_synth, values_are_trained_like) {
  char *out, *err, path[256];
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", NULL), 0, "synth: %s", err);
  free(out);
  free(err);
  snprintf(path, sizeof path, "%s/tiny.safetensors", dir);
  cr_assert_eq(ctl(&out, &err, "export", "tiny", path, NULL), 0, "export: %s", err);
  free(out);
  free(err);
  qs_st_file *f;
  char e[512];
  cr_assert_eq(qs_st_open(path, &f, e, sizeof e), 0, "%s", e);
  cr_assert_eq(qs_st_count(f), 15);
  size_t n_mat = 0;
  for (size_t i = 0; i < qs_st_count(f); i++) {
    const qs_st_tensor *t = qs_st_tensor_at(f, i);
    uint64_t rows = qs_st_n_rows(t), cols = qs_st_row_len(t);
    float *x = malloc(t->nbytes);
    cr_assert_eq(qs_st_read_rows(f, t, 0, rows, x, e, sizeof e), 0, "%s", e);
    for (uint64_t k = 0; k < rows * cols; k++) cr_assert(isfinite(x[k]), "%s: element %llu", t->name, (unsigned long long)k);
    moments m = measure(x, rows, cols);
    if (t->ndim == 1) {
      /* Norm weights: near 1 (a per-tensor mean within 1 +- 0.1, small spread). */
      cr_assert(m.mean > 0.85 && m.mean < 1.15, "%s: mean %g", t->name, m.mean);
      cr_assert(m.sd > 0.005 && m.sd < 0.15, "%s: sd %g", t->name, m.sd);
    } else {
      n_mat++;
      /* Centred, about 1/sqrt(fan_in) in scale. */
      cr_assert(fabs(m.mean) < 0.1 * m.sd, "%s: mean %g sd %g", t->name, m.mean, m.sd);
      cr_assert(m.sd > 0.3 / sqrt((double)cols) && m.sd < 3 / sqrt((double)cols), "%s: sd %g", t->name, m.sd);
      /* Heavy tails: a Gaussian has kurtosis 3. */
      cr_assert(m.kurt > 3, "%s: kurtosis %g", t->name, m.kurt);
      /* Per-row scales vary: iid rows of this length would give a row-RMS CV of a few percent. */
      cr_assert(m.row_cv > 0.15, "%s: row-scale CV %g", t->name, m.row_cv);
      /* A few large outliers: far past what even the heavy-tailed bulk reaches. */
      cr_assert(m.maxabs > 10 * m.sd, "%s: max |w| %g, sd %g", t->name, m.maxabs, m.sd);
      uint64_t big = 0;
      for (uint64_t k = 0; k < rows * cols; k++) big += fabs(x[k]) > 10 * m.sd;
      cr_assert(big < rows * cols / 1000, "%s: %llu values past 10 sd: outliers are rare", t->name,
                (unsigned long long)big);
    }
    free(x);
  }
  cr_assert_eq(n_mat, 10);
  qs_st_close(f);
}

Test(scale_synth, same_seed_same_bytes_other_seed_other_values) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--model", "a", "--seed", "7", NULL), 0, "%s", err);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--model", "b", "--seed", "7", NULL), 0, "%s", err);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--model", "c", "--seed", "8", NULL), 0, "%s", err);
  free(out), free(err);
  /* Also with one encoding thread: the bytes do not depend on the thread count. */
  char *argv[] = {qinsctl, "--store", store, "synth", "--arch", "tiny", "--model", "d", "--seed", "7", NULL};
  char *env[] = {"QINS_IMPORT_THREADS=1", NULL};
  cr_assert_eq(qt_run(argv, env, &out, &err), 0, "%s", err);
  free(out), free(err);
  qs_json *a = ls_model("a"), *b = ls_model("b"), *c = ls_model("c"), *d = ls_model("d");
  const qs_json *ta = qs_json_get(a, "tensors");
  size_t differ = 0;
  for (size_t i = 0; i < ta->len; i++) {
    const char *name = qs_json_get(&ta->items[i], "name")->str;
    const char *ca = qs_json_get(&ta->items[i], "checksum")->str;
    cr_assert_str_eq(qs_json_get(find_tensor(b, name), "checksum")->str, ca, "%s", name);
    cr_assert_str_eq(qs_json_get(find_tensor(d, name), "checksum")->str, ca, "%s", name);
    differ += strcmp(qs_json_get(find_tensor(c, name), "checksum")->str, ca) != 0;
  }
  cr_assert_eq(differ, ta->len, "every tensor changes with the seed");
  qs_json_free(a), qs_json_free(b), qs_json_free(c), qs_json_free(d);
}

Test(scale_synth, codec_and_codec_for_as_import) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--model", "r", "--codec-for",
                   "*embed_tokens*=qins16", "--codec-for", "*norm.weight=bf16", NULL),
               0, "%s", err);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--model", "h", "--codec", "f16", NULL), 0, "%s", err);
  free(out), free(err);
  qs_json *r = ls_model("r"), *h = ls_model("h");
  const qs_json *tr = qs_json_get(r, "tensors");
  for (size_t i = 0; i < tr->len; i++) {
    const char *name = qs_json_get(&tr->items[i], "name")->str;
    const char *codec = strstr(name, "embed_tokens") ? "qins16"
                       : strstr(name, "norm.weight") ? "bf16"
                                                      : "qins8";
    cr_assert_str_eq(qs_json_get(&tr->items[i], "codec")->str, codec, "%s", name);
    cr_assert_str_eq(qs_json_get(find_tensor(h, name), "codec")->str, "f16", "%s", name);
  }
  qs_json_free(r), qs_json_free(h);
  cr_assert_eq(ctl(&out, &err, "verify", NULL), 0, "%s%s", out, err);
  free(out), free(err);
}

Test(scale_synth, lists_the_full_phi35_mini_plan) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "synth", "--list", NULL), 0, "%s", err);
  /* 32 x (9216 + 3072 + 16384) x 3072 + 32 x 3072 x 8192 + 2 x 32064 x 3072 + 65 x 3072. */
  cr_assert(strstr(out, "phi-3.5-mini") && strstr(out, "195 tensors") && strstr(out, "3821079552 weights"),
            "%s", out);
  cr_assert(strstr(out, "phi-mini-4l") && strstr(out, "650013696 weights"), "%s", out);
  cr_assert(strstr(out, "tiny") && strstr(out, "1836288 weights"), "%s", out);
  free(out), free(err);
}

Test(scale_synth, usage_errors_exit_2_and_leave_no_model) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "gpt-17", NULL), 2);
  cr_assert(strstr(err, "unknown arch \"gpt-17\""), "%s", err);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", NULL), 2);
  cr_assert(strstr(err, "--arch is required"), "%s", err);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--seed", "x1", NULL), 2);
  cr_assert(strstr(err, "--seed"), "%s", err);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "--codec", "q9", NULL), 2);
  free(out), free(err);
  cr_assert_eq(ctl(&out, &err, "synth", "--arch", "tiny", "extra", NULL), 2);
  free(out), free(err);
  char *argv[] = {qinsctl, "synth", "--arch", "tiny", NULL};
  char *env[] = {"QINS_STORE=", NULL};
  cr_assert_eq(qt_run(argv, env, &out, &err), 2);
  cr_assert(strstr(err, "no store"), "%s", err);
  free(out), free(err);
  cr_assert_eq(access(store, F_OK), -1, "no store was created by failed commands");
}
