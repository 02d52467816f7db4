/* SPDX-License-Identifier: MIT */
/*
 * demo_default.c — `make demo` on a bare clone (issue 20): no model beside the repository, so the
 * demo makes its own with `qinsctl synth --arch llama2-tiny`.
 *   - tests/support/demo.sh with SHARED pointing at an empty directory exits 0, says the model is
 *     synthetic and how to run a real one, and prints the footprint (qins8 and qins16 bytes per
 *     weight, the ratio against 4 FP32 copies), four workers' parity lines against the FP32
 *     reference (qins16 closer than qins8) and the daemon's counters;
 *   - a MODEL that does not exist is refused by name (exit 1);
 *   - the llama2 synth archs have llama2.c's names and shapes (an independent table here) and its
 *     hyper-parameters in the metadata; the embedding (the tied classifier) is plain;
 *   - qins-llama2 runs the served model without a reference or a tokenizer and prints the token
 *     ids; with the model served as f32 it generates exactly the ids of the FP32 reference that
 *     `qinsctl export` wrote from the same generation (whose __metadata__ configures it).
 *     The served run has no --n-heads: the model's metadata (method model_info) configures it;
 *   - client/examples/llama2c_to_safetensors.py turns a llama2.c legacy .bin (written here from the
 *     synthetic model in run.c's order) into a safetensors file with the same tensors, bit for
 *     bit, and the hyper-parameters; a truncated file and an untied classifier are refused.
 * The demo script is found from the working directory (make test runs at the repository root).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon.h"
#include "json.h"
#include "qt.h"
#include "safetensors.h"

#define DEMO_SCRIPT "tests/support/demo.sh"

static ts_daemon D;

static void setup(void) { cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp"); }
static void teardown(void) {
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  ts_dir_remove(&D, st != 0);
}

TestSuite(demo_default, .init = setup, .fini = teardown, .timeout = 600);

/* Runs the demo script with SHARED = shared and an optional MODEL; returns its exit status. */
static int run_demo(const char *shared, const char *model, char **out, char **err) {
  cr_assert_eq(access(DEMO_SCRIPT, R_OK), 0, "%s not found: run from the repository root", DEMO_SCRIPT);
  char build[512];
  const char *b = getenv("QINS_BUILD");
  if (!b || !*b) b = "build";
  cr_assert(realpath(b, build), "QINS_BUILD %s: no such directory", b);
  char *argv[] = {"/bin/sh", DEMO_SCRIPT, build, (char *)shared, (char *)model, NULL};
  return qt_run(argv, NULL, out, err);
}

/* The number after `key` in text (first occurrence at or after from), or NAN. */
static double num_after(const char *text, const char *key) {
  const char *p = strstr(text, key);
  return p ? strtod(p + strlen(key), NULL) : NAN;
}

typedef struct worker {
  int identical, steps, top1;
  double kld;
} worker;

/* The parity figures of worker n (1..4) from its "-- worker n" section. */
static worker worker_lines(const char *out, int n) {
  char head[32];
  snprintf(head, sizeof head, "-- worker %d (", n);
  const char *p = strstr(out, head);
  cr_assert(p, "no %s section in:\n%s", head, out);
  worker w = {-1, -1, -1, NAN};
  const char *par = strstr(p, "   parity: "), *tf = strstr(p, "   teacher-forced: mean KLD ");
  cr_assert(par && tf, "worker %d: no parity or teacher-forced line in:\n%s", n, p);
  cr_assert_eq(sscanf(par, "   parity: %d/%d tokens identical", &w.identical, &w.steps), 2, "%.80s", par);
  int steps2;
  cr_assert_eq(sscanf(tf, "   teacher-forced: mean KLD %lf, top-1 agreement %d/%d", &w.kld, &w.top1, &steps2), 3,
               "%.100s", tf);
  cr_assert_eq(w.steps, 500, "worker %d: %d steps", n, w.steps);
  cr_assert_eq(steps2, 500);
  return w;
}

Test(demo_default, bare_clone_runs_the_synthetic_model) {
  char shared[128], *out, *err;
  snprintf(shared, sizeof shared, "%s/shared", D.dir); /* as ../shared would be: no models/ */
  int rc = run_demo(shared, NULL, &out, &err);
  cr_assert_eq(rc, 0, "demo exited %d\nstdout:\n%s\nstderr:\n%s", rc, out, err);
  /* It says plainly what the model is and how to use a real one. */
  cr_assert(strstr(out, "using a synthetic one"), "%s", out);
  cr_assert(strstr(out, "It is not a trained model: its tokens\n   are ids, not text"), "%s", out);
  cr_assert(strstr(out, "make demo MODEL=path/to/stories15M.bin"), "%s", out);
  cr_assert(strstr(out, "== importing ") && strstr(out, "/llama2-tiny.safetensors\n"), "%s", out);

  /* Footprint: the qins8 import about 1.07 bytes a weight, qins16 about 2, one copy of each far
   * below four FP32 copies. */
  const char *l8 = strstr(out, "\n  llama2-tiny "), *l16 = strstr(out, "\n  llama2-tiny-qins16 ");
  cr_assert(l8 && l16, "no footprint lines in:\n%s", out);
  double bpw8 = num_after(l8, "bytes stored ("), bpw16 = num_after(l16, "bytes stored (");
  cr_assert(bpw8 > 1.0 && bpw8 < 1.15, "qins8 %g bytes/weight", bpw8);
  cr_assert(bpw16 > 2.0 && bpw16 < 2.15, "qins16 %g bytes/weight", bpw16);
  double fp32 = num_after(out, "4 workers x FP32 copy:"), one = num_after(out, "one copy of each import:");
  cr_assert_eq(fp32, 4.0 * 260032 * 4, "4 FP32 copies of 260032 weights: %g", fp32);
  double ratio = num_after(out, "  ratio:");
  cr_assert(fabs(ratio - fp32 / one) < 0.01 && ratio > 4, "ratio %g (%g / %g)", ratio, fp32, one);

  /* Parity against FP32: qins16 (workers 2, 4) is near-lossless, qins8 (1, 3) close. */
  worker w[5];
  for (int i = 1; i <= 4; i++) w[i] = worker_lines(out, i);
  for (int i = 2; i <= 4; i += 2) {
    cr_assert(w[i].kld < 1e-4, "worker %d (qins16): KLD %g", i, w[i].kld);
    cr_assert(w[i].top1 >= 490, "worker %d (qins16): top-1 %d/500", i, w[i].top1);
  }
  for (int i = 1; i <= 3; i += 2) {
    cr_assert(w[i].kld < 0.1 && w[i].kld > 10 * w[i + 1].kld, "worker %d (qins8): KLD %g", i, w[i].kld);
    cr_assert(w[i].top1 >= 400, "worker %d (qins8): top-1 %d/500", i, w[i].top1);
  }
  cr_assert(w[2].identical >= w[1].identical, "qins16 greedy %d vs qins8 %d", w[2].identical, w[1].identical);

  /* The daemon's counters, then a clean stop. */
  cr_assert(num_after(out, "   requests.get_many ") > 0, "%s", out);
  cr_assert(num_after(out, "   bytes_served ") > 0, "%s", out);
  cr_assert(strstr(out, "== done (on the synthetic llama2-tiny: make demo MODEL=path/to/model.bin|.safetensors"), "%s", out);
  free(out);
  free(err);
}

Test(demo_default, a_missing_model_is_named) {
  char model[128], *out, *err;
  snprintf(model, sizeof model, "%s/nope.safetensors", D.dir);
  cr_assert_eq(run_demo(D.dir, model, &out, &err), 1, "%s%s", out, err);
  cr_assert(strstr(err, "demo: no model at ") && strstr(err, "nope.safetensors"), "%s", err);
  free(out);
  free(err);
}

/* llama2.c's layout as its model.py names it, stories260K's shapes: an independent table. */
typedef struct want {
  char name[64];
  uint64_t rows, cols; /* rows 0: a 1-D tensor of cols */
} want;

static size_t llama2_tiny_layout(want *w) {
  size_t n = 0;
#define W(r, c, ...) (snprintf(w[n].name, sizeof w[n].name, __VA_ARGS__), w[n].rows = r, w[n].cols = c, n++)
  W(512, 64, "tok_embeddings.weight");
  W(0, 64, "norm.weight");
  for (int l = 0; l < 5; l++) {
    W(0, 64, "layers.%d.attention_norm.weight", l);
    W(64, 64, "layers.%d.attention.wq.weight", l);
    W(32, 64, "layers.%d.attention.wk.weight", l); /* 4 KV heads of 8 */
    W(32, 64, "layers.%d.attention.wv.weight", l);
    W(64, 64, "layers.%d.attention.wo.weight", l);
    W(0, 64, "layers.%d.ffn_norm.weight", l);
    W(172, 64, "layers.%d.feed_forward.w1.weight", l);
    W(64, 172, "layers.%d.feed_forward.w2.weight", l);
    W(172, 64, "layers.%d.feed_forward.w3.weight", l);
  }
#undef W
  return n;
}

/* Writes llama2-tiny as f32 into D's store (model "f") and exports it to D.dir/ref.safetensors. */
static void synth_f32_and_export(char *ref, size_t cap) {
  char *out, *err;
  cr_assert_eq(qt_ctl(D.store, &out, &err, "synth", "--arch", "llama2-tiny", "--model", "f", "--codec", "f32",
                      NULL),
               0, "synth: %s", err);
  free(out), free(err);
  snprintf(ref, cap, "%s/ref.safetensors", D.dir);
  cr_assert_eq(qt_ctl(D.store, &out, &err, "export", "f", ref, NULL), 0, "export: %s", err);
  free(out), free(err);
}

Test(demo_default, llama2_tiny_has_llama2c_names_shapes_and_hyperparameters) {
  char ref[256], e[512];
  synth_f32_and_export(ref, sizeof ref);
  qs_st_file *f;
  cr_assert_eq(qs_st_open(ref, &f, e, sizeof e), 0, "%s", e);
  want w[64];
  size_t n = llama2_tiny_layout(w);
  cr_assert_eq(qs_st_count(f), n, "%zu tensors", qs_st_count(f));
  for (size_t i = 0; i < n; i++) {
    const qs_st_tensor *t = qs_st_find(f, w[i].name);
    cr_assert(t, "no %s", w[i].name);
    cr_assert_eq(t->dtype, QS_ST_F32);
    if (w[i].rows == 0) {
      cr_assert(t->ndim == 1 && t->shape[0] == w[i].cols, "%s", w[i].name);
      continue;
    }
    cr_assert(t->ndim == 2 && t->shape[0] == w[i].rows && t->shape[1] == w[i].cols, "%s: [%llu, %llu]", w[i].name,
              (unsigned long long)t->shape[0], (unsigned long long)t->shape[1]);
  }
  /* The hyper-parameters qins-llama2 reads, as strings (safetensors __metadata__). */
  const char *md = qs_st_metadata_json(f);
  qs_json *j = NULL;
  cr_assert_eq(qs_json_parse(md, strlen(md), &j, e, sizeof e), 0, "%s", e);
  static const char *const keys[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                     "max_seq_len"};
  static const char *const vals[] = {"64", "172", "5", "8", "4", "512", "512"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    const qs_json *v = qs_json_get(j, keys[i]);
    cr_assert(v && v->type == QS_JSON_STRING, "metadata lacks %s: %s", keys[i], md);
    cr_assert_str_eq(v->str, vals[i], "%s", keys[i]);
  }
  cr_assert_str_eq(qs_json_get(j, "arch")->str, "llama2-tiny");
  qs_json_free(j);

  /* The embedding is the classifier: plain, without the outlier input columns (2..4 times the
   * others' scale) that every other matrix has. */
  for (size_t i = 0; i < n; i++) {
    if (w[i].rows == 0) continue;
    const qs_st_tensor *t = qs_st_find(f, w[i].name);
    float *x = malloc(t->nbytes);
    cr_assert_eq(qs_st_read(f, t, 0, t->nbytes, x, e, sizeof e), 0, "%s", e);
    double mean = 0, mx = 0, s2 = 0;
    for (uint64_t c = 0; c < w[i].cols; c++) {
      double q = 0;
      for (uint64_t r = 0; r < w[i].rows; r++) q += (double)x[r * w[i].cols + c] * x[r * w[i].cols + c];
      q = sqrt(q / (double)w[i].rows);
      mean += q / (double)w[i].cols, mx = fmax(mx, q);
    }
    for (uint64_t k = 0; k < t->n_elem; k++) s2 += (double)x[k] * x[k];
    double sd = sqrt(s2 / (double)t->n_elem);
    if (!strcmp(w[i].name, "tok_embeddings.weight")) {
      cr_assert(mx < 1.4 * mean, "embedding: column RMS up to %g times the mean", mx / mean);
      cr_assert(sd > 0.5 / 8 && sd < 2.0 / 8, "embedding sd %g, about 1/sqrt(64)", sd);
    } else {
      cr_assert(mx > 1.5 * mean, "%s: column RMS at most %g times the mean", w[i].name, mx / mean);
    }
    free(x);
  }
  qs_st_close(f);

  char *out, *err;
  cr_assert_eq(qt_ctl(D.store, &out, &err, "synth", "--list", NULL), 0, "%s", err);
  cr_assert(strstr(out, "llama2-tiny") && strstr(out, " 47 tensors") && strstr(out, "260032 weights"), "%s", out);
  /* stories110M: 32000 x 768 + 12 x (4 x 768^2 + 3 x 768 x 2048 + 2 x 768) + 768. */
  cr_assert(strstr(out, "llama2-110m") && strstr(out, "110 tensors") && strstr(out, "109529856 weights"), "%s", out);
  free(out), free(err);
}

/* The "tokens:" line of qins-llama2's output (malloc'd copy). */
static char *tokens_line(const char *out) {
  const char *p = strstr(out, "\ntokens: ");
  cr_assert(p, "no tokens line in:\n%s", out);
  p++;
  const char *e = strchr(p, '\n');
  return strndup(p, e ? (size_t)(e - p) : strlen(p));
}

Test(demo_default, worker_runs_the_served_model_without_a_tokenizer) {
  char ref[256], bin[512], *out, *err;
  synth_f32_and_export(ref, sizeof ref);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "starting qinsd");
  ts_build_path("qins-llama2", bin, sizeof bin);
  /* Served, no reference: the config from the server's metadata. */
  char *served[] = {bin, "--socket", D.sock, "--model", "f", "--steps", "64", NULL};
  int rc = qt_run(served, NULL, &out, &err);
  cr_assert_eq(rc, 0, "qins-llama2 exited %d: %s", rc, err);
  cr_assert(strstr(out, "generated 64 tokens (qinsd)"), "%s", out);
  char *ts = tokens_line(out);
  free(out), free(err);
  /* The ids are varied (a random model can collapse onto one token: this one does not). */
  int ids[64], k = 0, distinct = 0;
  for (char *p = ts + 7; k < 64; k++) ids[k] = (int)strtol(p, &p, 10);
  for (int i = 0; i < 64; i++) {
    cr_assert(ids[i] >= 0 && ids[i] < 512, "id %d", ids[i]);
    int seen = 0;
    for (int j = 0; j < i; j++) seen |= ids[j] == ids[i];
    distinct += !seen;
  }
  cr_assert(distinct >= 10, "%d distinct ids in %s", distinct, ts);
  /* The FP32 reference from the same generation: the same ids, bit-exact weights. */
  char *local[] = {bin, "--reference", ref, "--steps", "64", NULL};
  cr_assert_eq(qt_run(local, NULL, &out, &err), 0, "%s", err);
  char *tr = tokens_line(out);
  cr_assert_str_eq(ts, tr);
  free(ts), free(tr), free(out), free(err);
}

/* Writes llama2-tiny (from the exported reference) as a llama2.c legacy .bin: the 7-int header,
 * the tensors in run.c's order (each layer kind for all layers in turn), the two RoPE tables. */
static void write_bin(const char *ref, const char *bin, int32_t vocab_sign) {
  char e[512];
  qs_st_file *f;
  cr_assert_eq(qs_st_open(ref, &f, e, sizeof e), 0, "%s", e);
  FILE *o = fopen(bin, "wb");
  cr_assert(o, "%s", bin);
  int32_t h[7] = {64, 172, 5, 8, 4, 512 * vocab_sign, 512};
  fwrite(h, sizeof h, 1, o);
  static const char *const kinds[] = {"attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                      "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"};
  char names[48][64];
  size_t n = 0;
  snprintf(names[n++], 64, "tok_embeddings.weight");
  for (size_t k = 0; k < 9; k++)
    for (int l = 0; l < 5; l++) snprintf(names[n++], 64, "layers.%d.%s.weight", l, kinds[k]);
  snprintf(names[n++], 64, "norm.weight");
  for (size_t i = 0; i < n; i++) {
    const qs_st_tensor *t = qs_st_find(f, names[i]);
    cr_assert(t, "%s", names[i]);
    void *x = malloc(t->nbytes);
    cr_assert_eq(qs_st_read(f, t, 0, t->nbytes, x, e, sizeof e), 0, "%s", e);
    fwrite(x, 1, t->nbytes, o);
    free(x);
  }
  float rope[512 * 8] = {0}; /* seq_len x head_size / 2, twice */
  fwrite(rope, sizeof rope, 1, o);
  cr_assert_eq(fclose(o), 0);
  qs_st_close(f);
}

static int convert(const char *bin, const char *out_path, char **out, char **err) {
  const char *py = getenv("PYTHON");
  char *argv[] = {(char *)(py && *py ? py : "/usr/bin/python3"), "client/examples/llama2c_to_safetensors.py",
                  (char *)bin, (char *)out_path, NULL};
  return qt_run(argv, NULL, out, err);
}

Test(demo_default, llama2c_bin_converts_to_the_same_safetensors) {
  char ref[256], bin[256], conv[256], e[512], *out, *err;
  synth_f32_and_export(ref, sizeof ref);
  snprintf(bin, sizeof bin, "%s/m.bin", D.dir);
  snprintf(conv, sizeof conv, "%s/m.safetensors", D.dir);
  write_bin(ref, bin, 1);
  int rc = convert(bin, conv, &out, &err);
  cr_assert_eq(rc, 0, "converter exited %d: %s%s", rc, out, err);
  free(out), free(err);
  /* Every tensor byte for byte, and the hyper-parameters. */
  qs_st_file *a, *b;
  cr_assert_eq(qs_st_open(ref, &a, e, sizeof e), 0, "%s", e);
  cr_assert_eq(qs_st_open(conv, &b, e, sizeof e), 0, "%s", e);
  cr_assert_eq(qs_st_count(b), qs_st_count(a));
  for (size_t i = 0; i < qs_st_count(a); i++) {
    const qs_st_tensor *ta = qs_st_tensor_at(a, i), *tb = qs_st_find(b, ta->name);
    cr_assert(tb && tb->dtype == QS_ST_F32 && tb->ndim == ta->ndim && tb->nbytes == ta->nbytes, "%s", ta->name);
    for (int d = 0; d < ta->ndim; d++) cr_assert_eq(tb->shape[d], ta->shape[d], "%s", ta->name);
    char *xa = malloc(ta->nbytes), *xb = malloc(tb->nbytes);
    cr_assert_eq(qs_st_read(a, ta, 0, ta->nbytes, xa, e, sizeof e), 0, "%s", e);
    cr_assert_eq(qs_st_read(b, tb, 0, tb->nbytes, xb, e, sizeof e), 0, "%s", e);
    cr_assert_eq(memcmp(xa, xb, ta->nbytes), 0, "%s differs", ta->name);
    free(xa), free(xb);
  }
  qs_json *ja = NULL, *jb = NULL;
  const char *ma = qs_st_metadata_json(a), *mb = qs_st_metadata_json(b);
  cr_assert_eq(qs_json_parse(ma, strlen(ma), &ja, e, sizeof e), 0);
  cr_assert_eq(qs_json_parse(mb, strlen(mb), &jb, e, sizeof e), 0);
  static const char *const keys[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                     "max_seq_len"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
    cr_assert_str_eq(qs_json_get(jb, keys[i])->str, qs_json_get(ja, keys[i])->str, "%s", keys[i]);
  qs_json_free(ja), qs_json_free(jb);
  qs_st_close(a), qs_st_close(b);

  /* A truncated file and an untied classifier are refused, each named. */
  char bad[256];
  snprintf(bad, sizeof bad, "%s/t.bin", D.dir);
  size_t len;
  char *all = qt_read(bin, &len);
  cr_assert_eq(qt_write(bad, all, len - 4), 0);
  free(all);
  cr_assert_eq(convert(bad, conv, &out, &err), 1);
  cr_assert(strstr(err, "t.bin") && strstr(err, "bytes, but its header"), "%s", err);
  free(out), free(err);
  write_bin(ref, bad, -1);
  cr_assert_eq(convert(bad, conv, &out, &err), 1);
  cr_assert(strstr(err, "untied classifier"), "%s", err);
  free(out), free(err);
}
