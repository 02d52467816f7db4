/* SPDX-License-Identifier: MIT */
/*
 * client_worker.c — the inference worker (build/qins-llama2) on the real stories260K model
 * (issue 5's acceptance; ../shared/models/README.md):
 *   - the FP32 reference path reproduces stories260K.greedy500.txt (run.c's 500 greedy tokens);
 *   - through qinsd, f32 and qins16 give 500/500 identical greedy tokens;
 *   - qins8's teacher-forced mean KLD and top-1 agreement are at least as good as llama.cpp's Q8_0
 *     applied to the same weights (the worker's --simulate q8_0, run in the same test);
 *   - seed-log, seed-rational, f16 and bf16 are measured and reported (lossy: greedy parity on this
 *     model is fragile, so they are judged on KLD and top-1, with loose sanity bounds);
 *   - the weight budget changes how often weights are fetched, never the result;
 *   - the worker keeps generating while qinsd is restarted 3 times under it (libqins reconnects,
 *     issue 18): the same 500 tokens, and it reports its reconnects.
 * The shared models are found through $QINS_SHARED (default ../shared); absent, tests skip.
 *
 * Each served test imports the model into a temporary store with the import policy's split:
 * tensors of 2 or more dimensions in the codec under test, 1-D tensors (the norms) as f32 — the
 * same split llama.cpp's quantizers make, so Q8_0 and qins8 are compared on the same weights.
 * Figures are printed (cr_log_info) for the report.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "daemon.h"
#include "fini_check.h"
#include "qins.h"
#include "qt.h"
#include "safetensors.h"

#define STEPS 500

static char model_path[512], greedy_path[512];

/* Finds the shared model or skips the test. */
static void need_model(void) {
  const char *sh = getenv("QINS_SHARED");
  if (!sh || !*sh) sh = "../shared";
  snprintf(model_path, sizeof model_path, "%s/models/stories260K.safetensors", sh);
  snprintf(greedy_path, sizeof greedy_path, "%s/models/stories260K.greedy500.txt", sh);
  struct stat st;
  if (stat(model_path, &st) || stat(greedy_path, &st))
    cr_skip_test("no %s or %s (set QINS_SHARED to the directory holding models/)", model_path,
                 greedy_path);
}

/* Runs a command, capturing stdout; returns the exit status (or -1). *out is malloc'd. */
static int run(const char *cmd, char **out) {
  FILE *p = popen(cmd, "r");
  cr_assert(p, "popen %s", cmd);
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  size_t n;
  while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
    len += n;
    if (cap - len < 4096) buf = realloc(buf, cap *= 2);
  }
  buf[len] = 0;
  int st = pclose(p);
  *out = buf;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

typedef struct figures {
  int identical, steps, first_div; /* first_div -1: none */
  double kld;
  int top1;
  double tps; /* served path tokens/s */
  long fetches;
} figures;

/* Parses the worker's summary lines. */
static figures parse(const char *out) {
  figures f = {.first_div = -2, .fetches = -1};
  const char *p = strstr(out, "parity: ");
  cr_assert(p, "no parity line in:\n%s", out);
  char div[16];
  cr_assert_eq(sscanf(p, "parity: %d/%d tokens identical, first divergence: %15s", &f.identical,
                      &f.steps, div),
               3, "parity line: %.120s", p);
  f.first_div = strcmp(div, "none") ? atoi(div) : -1;
  p = strstr(out, "teacher-forced: ");
  cr_assert(p, "no teacher-forced line");
  int t1s;
  cr_assert_eq(sscanf(p, "teacher-forced: mean KLD %lf, top-1 agreement %d/%d", &f.kld, &f.top1,
                      &t1s),
               3, "teacher-forced line: %.120s", p);
  cr_assert_eq(t1s, f.steps);
  p = strstr(out, "speed: ");
  if (p) {
    const char *q = strrchr(p, ',');
    if (q) sscanf(q, ", %*s %lf", &f.tps);
  }
  p = strstr(out, "weights: ");
  if (p) sscanf(p, "weights: %ld fetches", &f.fetches);
  return f;
}

static void report(const char *what, const figures *f) {
  char div[16];
  if (f->first_div < 0) snprintf(div, sizeof div, "none");
  else snprintf(div, sizeof div, "%d", f->first_div);
  cr_log_info("%-13s parity %d/%d (first divergence %s), mean KLD %.3e, top-1 %d/%d (%.1f%%)",
              what, f->identical, f->steps, div, f->kld, f->top1, f->steps,
              100.0 * f->top1 / f->steps);
}

static const char *bin(char *buf, size_t cap) { return ts_build_path("qins-llama2", buf, cap); }

/* Fills the store with model `codec` (2-D tensors in that codec, 1-D as f32). */
typedef struct fill_arg {
  const char *codec;
} fill_arg;

static int fill_model(qs_store *s, void *ud) {
  const fill_arg *a = ud;
  int codec = qc_codec_from_name(a->codec);
  if (codec < 0) return QINS_EINVALID;
  qs_st_file *f;
  char err[256];
  int rc = qs_st_open(model_path, &f, err, sizeof err);
  if (rc) {
    fprintf(stderr, "%s\n", err);
    return rc;
  }
  qs_import *im;
  rc = qs_import_begin(s, a->codec, qs_st_metadata_json(f), &im);
  for (size_t i = 0; !rc && i < qs_st_count(f); i++) {
    const qs_st_tensor *t = qs_st_tensor_at(f, i);
    float *v = malloc(t->nbytes ? t->nbytes : 4);
    rc = qs_st_read(f, t, 0, t->nbytes, v, err, sizeof err);
    if (!rc) rc = ts_import_f32(im, t->name, t->ndim, t->shape, t->ndim >= 2 ? codec : QC_F32, v);
    free(v);
  }
  if (!rc) rc = qs_import_commit(im);
  else if (im) qs_import_abort(im);
  qs_st_close(f);
  return rc;
}

static ts_daemon D;

static void serve(const char *codec) {
  need_model();
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  fill_arg a = {codec};
  cr_assert_eq(ts_store_fill(D.store, fill_model, &a), 0, "importing the model as %s", codec);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "starting qinsd");
}

static void teardown(void) {
  if (!D.dir[0]) return;
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  int clean = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  ts_dir_remove(&D, !clean);
  if (!clean) fini_failed("qinsd did not exit 0 (status 0x%x)", st);
}

/* The served path against the FP32 reference, greedy, STEPS tokens. */
static figures served(const char *codec, const char *extra) {
  char b[256], cmd[2048];
  snprintf(cmd, sizeof cmd, "%s --socket %s --model %s --reference %s --steps %d -q %s 2>&1",
           bin(b, sizeof b), D.sock, codec, model_path, STEPS, extra ? extra : "");
  char *out;
  int st = run(cmd, &out);
  cr_assert_eq(st, 0, "%s exited %d:\n%s", cmd, st, out);
  figures f = parse(out);
  cr_assert_eq(f.steps, STEPS);
  if (f.first_div >= 0) { /* the worker prints the logit margins at the divergence */
    const char *d = strstr(out, "divergence at step");
    cr_log_info("%s: %.600s", codec, d ? d : "");
  }
  free(out);
  return f;
}

TestSuite(client_worker, .fini = teardown, .timeout = 240);

static void expect_tokens(const char *what, const char *tokens);

/* Runs the worker with `args` and --tokens-out, and counts the tokens equal to greedy500.txt. */
static void expect_greedy500(const char *what, const char *args) {
  char b[256], cmd[2048], tokens[] = "/tmp/qins-tokens-XXXXXX";
  int fd = mkstemp(tokens);
  cr_assert_geq(fd, 0);
  close(fd);
  snprintf(cmd, sizeof cmd, "%s %s --steps %d --tokens-out %s 2>&1", bin(b, sizeof b), args, STEPS,
           tokens);
  char *out;
  int st = run(cmd, &out);
  cr_assert_eq(st, 0, "%s exited %d:\n%s", cmd, st, out);
  free(out);
  expect_tokens(what, tokens);
}

/* The tokens in file `tokens` (removed) are greedy500.txt's. */
static void expect_tokens(const char *what, const char *tokens) {
  FILE *a = fopen(tokens, "r"), *e = fopen(greedy_path, "r");
  cr_assert(a && e);
  int match = 0, n = 0, first_bad = -1, x, y;
  while (fscanf(e, "%d", &y) == 1) {
    if (fscanf(a, "%d", &x) != 1) break;
    if (x == y) match++;
    else if (first_bad < 0) first_bad = n;
    n++;
  }
  fclose(a);
  fclose(e);
  unlink(tokens);
  cr_log_info("%-13s %d/%d tokens equal to greedy500.txt", what, match, STEPS);
  cr_assert_eq(n, STEPS, "token count");
  cr_assert_eq(match, STEPS, "first mismatch at step %d", first_bad);
}

/* README.md of the models: the reference path is run.c's forward pass, bit for bit. */
Test(client_worker, reference_reproduces_greedy500) {
  need_model();
  char args[600];
  snprintf(args, sizeof args, "--reference %s", model_path);
  expect_greedy500("reference", args);
}

/* The served path alone (no reference, no --n-heads: the config comes from the server's
 * metadata, model_info) is run.c's too. */
Test(client_worker, served_alone_reproduces_greedy500) {
  serve("f32");
  char args[600];
  snprintf(args, sizeof args, "--socket %s --model f32", D.sock);
  expect_greedy500("served f32", args);
}

Test(client_worker, f32_through_qinsd_is_identical) {
  serve("f32");
  figures f = served("f32", NULL);
  report("f32", &f);
  cr_expect_eq(f.identical, STEPS);
  cr_expect_eq(f.first_div, -1);
  cr_expect_eq(f.kld, 0.0, "identical logits give KLD 0");
  cr_expect_eq(f.top1, STEPS);
}

Test(client_worker, qins16_through_qinsd_is_identical) {
  serve("qins16");
  figures f = served("qins16", NULL);
  report("qins16", &f);
  cr_expect_eq(f.identical, STEPS, "see the logit margins logged at the divergence");
  cr_expect_eq(f.top1, STEPS);
  cr_expect_lt(f.kld, 1e-4, "near-lossless: well under f16's KLD (3e-5 measured)");
}

/* Issue 5: qins8 at least as good as llama.cpp's Q8_0 on the same weights, same test. */
Test(client_worker, qins8_beats_q8_0) {
  serve("qins8");
  figures f = served("qins8", NULL);
  report("qins8", &f);
  char b[256], cmd[2048];
  snprintf(cmd, sizeof cmd, "%s --reference %s --simulate q8_0 --steps %d -q 2>&1",
           bin(b, sizeof b), model_path, STEPS);
  char *out;
  int st = run(cmd, &out);
  cr_assert_eq(st, 0, "%s exited %d:\n%s", cmd, st, out);
  figures q = parse(out);
  free(out);
  report("q8_0 (sim)", &q);
  cr_expect_leq(f.kld, q.kld, "qins8 mean KLD %.4e vs Q8_0 %.4e", f.kld, q.kld);
  cr_expect_geq(f.top1, q.top1, "qins8 top-1 %d vs Q8_0 %d", f.top1, q.top1);
}

/* Lossy codecs, each held to its measured figures (teacher-forced over STEPS steps on this
 * deterministic path: the codecs decode bit-exactly on every kernel, and the worker's arithmetic
 * has no FMA contraction) with about 1.5x headroom, so a codec or conversion that gets worse
 * fails. Measured: f16 KLD 3.20e-05, top-1 496/500; bf16 2.40e-03, 485; seed-log 8.93e-02, 423;
 * seed-rational 2.80e-01, 357. */
static void lossy(const char *codec, double kld_max, int top1_min) {
  serve(codec);
  figures f = served(codec, NULL);
  report(codec, &f);
  cr_expect(isfinite(f.kld) && f.kld < kld_max, "%s mean KLD %g, bound %g", codec, f.kld, kld_max);
  cr_expect_geq(f.top1, top1_min, "%s top-1 %d/%d, bound %d", codec, f.top1, STEPS, top1_min);
}

Test(client_worker, seed_log_measured) { lossy("seed-log", 0.13, 410); }
Test(client_worker, seed_rational_measured) { lossy("seed-rational", 0.40, 340); }
Test(client_worker, f16_measured) { lossy("f16", 5e-5, 490); }
Test(client_worker, bf16_measured) { lossy("bf16", 4e-3, 478); }

/* The budget decides what is kept between uses, never what is computed. */
Test(client_worker, budget_changes_fetches_not_tokens) {
  serve("f32");
  figures all = served("f32", "--budget 4M");
  figures stream = served("f32", "--no-prefetch");
  cr_expect_eq(all.identical, STEPS);
  cr_expect_eq(stream.identical, STEPS);
  cr_expect_eq(all.kld, 0.0);
  cr_expect_eq(stream.kld, 0.0);
  /* 5 layers + the head: everything stays once fetched, or everything is fetched every step. */
  cr_expect_eq(all.fetches, 6, "fetches with a budget holding the model: %ld", all.fetches);
  cr_expect_eq(stream.fetches, 6L * STEPS, "fetches when streaming: %ld", stream.fetches);
}

/* The daemon's count of get_many requests since it started (0 while it cannot be asked). */
static unsigned long long served_get_many(void) {
  qins_client *c = NULL;
  if (qins_connect(&c, D.sock, 5000)) return 0;
  char *js = NULL;
  unsigned long long n = 0;
  if (qins_stats(c, &js) == 0) {
    const char *p = strstr(js, "\"get_many\":"); /* in "requests" (the first map) */
    if (p) n = strtoull(p + strlen("\"get_many\":"), NULL, 10);
  }
  qins_free(js);
  qins_close(c);
  return n;
}

/* Issue 18: qinsd restarted 3 times (SIGTERM + start) while the worker generates; the worker's
 * 500 greedy tokens equal an uninterrupted run's (which equals greedy500.txt, checked first), and
 * it reports at least one reconnect per restart. Each restart waits until the running daemon has
 * served this worker 30 get_many (5 steps' layers), polled. */
Test(client_worker, greedy500_across_three_restarts) {
  serve("f32");
  char args[600];
  snprintf(args, sizeof args, "--socket %s --model f32", D.sock);
  expect_greedy500("uninterrupted", args);

  char b[256], cmd[2048], tokens[] = "/tmp/qins-tokens-XXXXXX", out[] = "/tmp/qins-out-XXXXXX";
  int fd = mkstemp(tokens), fo = mkstemp(out);
  cr_assert(fd >= 0 && fo >= 0);
  close(fd);
  close(fo);
  snprintf(cmd, sizeof cmd, "exec %s %s --steps %d --tokens-out %s -q > %s 2>&1", bin(b, sizeof b),
           args, STEPS, tokens, out);
  unsigned long long base = served_get_many(); /* the uninterrupted run's, on this daemon */
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(127);
  }
  int st = -1, exited = 0;
  for (int r = 0; r < 3 && !exited; r++) {
    while (served_get_many() < base + 30 && !exited) {
      exited = waitpid(pid, &st, WNOHANG) == pid;
      struct timespec ts = {0, 5000000};
      nanosleep(&ts, NULL);
    }
    if (exited) break;
    int dst = ts_daemon_stop(&D);
    cr_assert(dst >= 0 && WIFEXITED(dst) && WEXITSTATUS(dst) == 0, "qinsd exit 0x%x", dst);
    cr_assert_eq(ts_daemon_start(&D, NULL), 0, "qinsd restarts");
    base = 0;
  }
  if (!exited) waitpid(pid, &st, 0);
  char *text = qt_read(out, NULL);
  cr_assert(text);
  cr_assert(!exited, "the worker finished before the 3 restarts:\n%s", text);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the worker failed (0x%x):\n%s", st, text);
  const char *p = strstr(text, "reconnects: ");
  cr_assert(p, "no reconnects line:\n%s", text);
  long reconnects = strtol(p + strlen("reconnects: "), NULL, 10);
  cr_log_info("across 3 restarts: %ld reconnects", reconnects);
  cr_expect_geq(reconnects, 3, "one reconnect per restart at least:\n%s", text);
  free(text);
  unlink(out);
  expect_tokens("across restarts", tokens);
}
