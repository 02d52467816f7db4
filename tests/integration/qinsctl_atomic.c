/* SPDX-License-Identifier: MIT */
/*
 * qinsctl_atomic.c — atomicity of imports (issue 3 acceptance): `qinsctl import` killed with
 * SIGKILL at random moments leaves exactly the previous state and a store that verifies; and a
 * reader process running during repeated imports sees the old model or the whole new one, never
 * a mix.
 *
 * Processes: the test process never opens the LMDB env. It runs qinsctl as children, and the
 * reader is a child forked before anything opens the env in it (PITFALLS.md: no fork after open).
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "qins.h"
#include "qt.h"
#include "store.h"

static char dir[64], store[128], qinsctl[4096];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(store, sizeof store, "%s/store", dir);
  qt_bin("qinsctl", qinsctl, sizeof qinsctl);
  cr_assert_eq(access(qinsctl, X_OK), 0, "%s not built", qinsctl);
}
static void teardown(void) { qt_rmrf(dir); }

TestSuite(qinsctl_atomic, .init = setup, .fini = teardown, .timeout = 240);

static int ctl6(char **out, char **err, const char *a1, const char *a2, const char *a3,
                const char *a4, const char *a5, const char *a6) {
  return qt_ctl(store, out, err, a1, a2, a3, a4, a5, a6, (const char *)NULL);
}
static int ctl(char **out, char **err, const char *a1, const char *a2, const char *a3,
               const char *a4, const char *a5) {
  return ctl6(out, err, a1, a2, a3, a4, a5, NULL);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The model list plus model m's tensors with checksums. */
static char *snapshot(void) {
  char *a, *b;
  cr_assert_eq(ctl(&a, NULL, "--json", "ls", NULL, NULL, NULL), 0);
  int rc = ctl(&b, NULL, "--json", "ls", "m", NULL, NULL);
  cr_assert_eq(rc, 0);
  return qt_cat(a, b);
}

/* A synthetic model of n_t matrices rows x cols (f32, Gaussian, seeded) plus a norm vector. */
static void write_model(const char *path, int n_t, uint64_t rows, uint64_t cols, uint64_t seed) {
  qt_tensor *t = calloc((size_t)n_t + 1, sizeof *t);
  char names[16][32];
  for (int i = 0; i < n_t; i++) {
    float *w = malloc(rows * cols * sizeof *w);
    qt_fill_gauss(w, rows * cols, seed * 100 + (uint64_t)i, 0.05f);
    snprintf(names[i], sizeof names[i], "layers.%d.weight", i);
    t[i] = (qt_tensor){names[i], QS_ST_F32, 2, {rows, cols}, w, rows * cols * 4};
  }
  float *nv = malloc(cols * sizeof *nv);
  qt_fill_gauss(nv, cols, seed, 1.0f);
  t[n_t] = (qt_tensor){"norm.weight", QS_ST_F32, 1, {cols}, nv, cols * 4};
  cr_assert_eq(qt_st_write(path, t, (size_t)n_t + 1, "{\"format\":\"pt\"}"), 0);
  for (int i = 0; i <= n_t; i++) free((void *)t[i].data);
  free(t);
}

static void verify_ok(const char *when) {
  char *out, *err;
  int rc = ctl(&out, &err, "--json", "verify", NULL, NULL, NULL);
  cr_assert_eq(rc, 0, "verify failed %s: %s %s", when, out, err);
  free(out);
  free(err);
}

Test(qinsctl_atomic, sigkill_during_import_leaves_the_previous_state) {
  char a[256], b[256];
  snprintf(a, sizeof a, "%s/a.safetensors", dir);
  snprintf(b, sizeof b, "%s/b.safetensors", dir);
  /* 6 x 1024 x 3072 f32 = 75.5 MB of source, stored as f32 (--codec f32): fast to encode, and
   * more than one staging transaction (QS_TXN_BYTES = 64 MiB) before the final flip. */
  write_model(a, 6, 1024, 3072, 1);
  write_model(b, 6, 1024, 3072, 2);
  char *err;
  cr_assert_eq(ctl6(NULL, &err, "import", a, "--model", "m", "--codec", "f32"), 0, "%s", err);
  free(err);
  char *before = snapshot();
  /* How long a whole import takes here: kill moments are drawn within it. */
  double t0 = now();
  cr_assert_eq(ctl6(NULL, NULL, "import", b, "--model", "probe", "--codec", "f32"), 0);
  double dur = now() - t0;
  /* The new state as `ls m --json` will show it once an import of b has committed. */
  char *probe;
  cr_assert_eq(ctl(&probe, NULL, "--json", "ls", "probe", NULL, NULL), 0);
  char *newstate = malloc(strlen(probe) + 1);
  const char *tail = strstr(probe, "\"tensors\"");
  cr_assert_not_null(tail);
  sprintf(newstate, "{\"model\":\"m\",%s", tail);
  free(probe);
  cr_assert_eq(ctl(NULL, NULL, "rm", "probe", NULL, NULL, NULL), 0);
  unsigned seed = (unsigned)time(NULL);
  srand(seed);
  fprintf(stderr, "kill test: import takes %.2f s; seed %u\n", dur, seed);
  int killed = 0, finished = 0;
  for (int attempt = 0; killed < 10 && attempt < 40; attempt++) {
    double at = dur * 0.95 * (double)rand() / RAND_MAX;
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
      int devnull = open("/dev/null", 1);
      dup2(devnull, 1);
      dup2(devnull, 2);
      execl(qinsctl, qinsctl, "--store", store, "import", b, "--model", "m", "--codec", "f32",
            (char *)NULL);
      _exit(127);
    }
    struct timespec ts = {(time_t)at, (long)((at - (double)(time_t)at) * 1e9)};
    nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    int st;
    waitpid(pid, &st, 0);
    if (WIFEXITED(st)) {
      /* It finished before the kill: that is the new state; put the old one back. */
      cr_assert_eq(WEXITSTATUS(st), 0);
      finished++;
      dur *= 0.8;
      cr_assert_eq(ctl6(NULL, NULL, "import", a, "--model", "m", "--codec", "f32"), 0);
      free(before);
      before = snapshot();
      continue;
    }
    char *after = snapshot();
    if (strcmp(after, before)) {
      /* Killed after the import's final transaction committed (while it reclaimed the old model
       * or exited): then the store must hold exactly the whole new model. */
      char *m;
      cr_assert_eq(ctl(&m, NULL, "--json", "ls", "m", NULL, NULL), 0);
      cr_assert_str_eq(m, newstate, "kill at %.3f s left neither the old nor the whole new model", at);
      free(m);
      free(after);
      finished++;
      dur *= 0.8; /* imports run faster than the probe did: draw earlier moments */
      verify_ok("after a kill past the commit");
      cr_assert_eq(ctl6(NULL, NULL, "import", a, "--model", "m", "--codec", "f32"), 0);
      free(before);
      before = snapshot();
      continue;
    }
    killed++;
    free(after);
    char when[64];
    snprintf(when, sizeof when, "after a kill at %.3f s", at);
    verify_ok(when);
  }
  fprintf(stderr, "kill test: %d imports killed before their commit (store unchanged), %d committed "
                  "first (store holds the whole new model)\n", killed, finished);
  cr_assert_geq(killed, 10);
  /* The next writer clears what the killed imports staged; the store still verifies. */
  cr_assert_eq(ctl6(NULL, &err, "import", b, "--model", "m", "--codec", "f32"), 0, "%s", err);
  free(err);
  char *out;
  cr_assert_eq(ctl(&out, NULL, "--json", "audit", NULL, NULL, NULL), 0);
  qs_json *v;
  cr_assert_eq(qs_json_parse(out, strlen(out), &v, NULL, 0), 0);
  cr_assert_eq(qs_json_get(qs_json_get(v, "lmdb"), "staging")->u64, 0);
  cr_assert_eq(qs_json_get(v, "models")->len, 1);
  qs_json_free(v);
  free(out);
  verify_ok("after the final import");
  free(before);
  free(newstate);
}

/* ---------------------------------------------------------------------------------------------
 * Reader during imports */
#define RT 6       /* tensors */
#define RROWS 512  /* rows of 1024 f32: 2 MiB per tensor */
#define RCOLS 1024

static void write_const_model(const char *path, float value) {
  float *w = malloc((size_t)RROWS * RCOLS * sizeof *w);
  for (size_t i = 0; i < (size_t)RROWS * RCOLS; i++) w[i] = value;
  qt_tensor t[RT];
  char names[RT][16];
  for (int i = 0; i < RT; i++) {
    snprintf(names[i], sizeof names[i], "t%d", i);
    t[i] = (qt_tensor){names[i], QS_ST_F32, 2, {RROWS, RCOLS}, w, (uint64_t)RROWS * RCOLS * 4};
  }
  cr_assert_eq(qt_st_write(path, t, RT, NULL), 0);
  free(w);
}

typedef struct rd_state {
  qs_txn *t;
  float *buf;
  float value;   /* value seen in this snapshot so far, 0 = none yet */
  int n, mixed;
} rd_state;

static int rd_tensor(void *ud, const qs_tensor *t) {
  rd_state *r = ud;
  if (qs_tensor_read(r->t, t, NULL, QC_DT_F32, 0, t->n_elem, r->buf)) {
    r->mixed = 2;
    return 1;
  }
  for (uint64_t i = 0; i < t->n_elem; i++) {
    if (r->value == 0) r->value = r->buf[i];
    if (r->buf[i] != r->value) {
      r->mixed = 1;
      return 1;
    }
  }
  r->n++;
  return 0;
}

/* The reader child: opens the store (never forks after), checks snapshots until `stop` exists;
 * exits 0 having seen both versions and no mix, 1 on a mix, 2 on an error, 3 if it never saw
 * both versions. */
static void reader_main(const char *stop) {
  qs_store *s;
  if (qs_open(&s, store, QS_OPEN_RDONLY)) _exit(2);
  float *buf = malloc((size_t)RROWS * RCOLS * sizeof *buf);
  long seen1 = 0, seen2 = 0, loops = 0;
  while (access(stop, F_OK) != 0 || loops < 2) {
    qs_txn *t;
    if (qs_txn_begin(s, &t)) _exit(2);
    qs_model m;
    if (qs_model_get(t, "m", &m)) {
      fprintf(stderr, "reader: %s\n", qs_error());
      _exit(2);
    }
    rd_state r = {t, buf, 0, 0, 0};
    if (qs_tensors_each(t, "m", NULL, rd_tensor, &r)) _exit(2);
    qs_txn_end(t);
    if (r.mixed == 1) {
      fprintf(stderr, "reader: saw a mix of versions\n");
      _exit(1);
    }
    if (r.mixed || r.n != RT || m.n_tensors != RT) {
      fprintf(stderr, "reader: incomplete model (%d of %d tensors): %s\n", r.n, RT, qs_error());
      _exit(1);
    }
    if (r.value == 1.0f) seen1++;
    else if (r.value == 2.0f) seen2++;
    else _exit(1);
    loops++;
  }
  qs_store_info si;
  if (qs_store_info_get(s, &si)) _exit(2);
  fprintf(stderr, "reader: %ld snapshots of version 1, %ld of version 2; adopted a grown map %llu times\n",
          seen1, seen2, (unsigned long long)si.map_adopted);
  qs_close(s);
  if (!si.map_adopted) _exit(4);
  _exit(seen1 && seen2 ? 0 : 3);
}

Test(qinsctl_atomic, reader_sees_old_or_whole_new_model_never_a_mix) {
  char v1[256], v2[256], stop[256];
  snprintf(v1, sizeof v1, "%s/v1.safetensors", dir);
  snprintf(v2, sizeof v2, "%s/v2.safetensors", dir);
  snprintf(stop, sizeof stop, "%s/stop", dir);
  write_const_model(v1, 1.0f);
  write_const_model(v2, 2.0f);
  /* Small maps in every process (qinsctl inherits this), so the writer grows the map during the
   * test and the reader must adopt it (MDB_MAP_RESIZED) between its transactions. */
  setenv("QINS_STORE_MAP_INITIAL", "1048576", 1);
  char *err;
  cr_assert_eq(ctl6(NULL, &err, "import", v1, "--model", "m", "--codec", "f32"), 0, "%s", err);
  free(err);
  pid_t rp = fork();
  cr_assert_geq(rp, 0);
  if (rp == 0) reader_main(stop);
  for (int i = 0; i < 6; i++) {
    const char *src = i % 2 == 0 ? v2 : v1;
    cr_assert_eq(ctl6(NULL, &err, "import", src, "--model", "m", "--codec", "f32"), 0, "%s", err);
    free(err);
  }
  cr_assert_eq(qt_write(stop, "", 0), 0);
  int st;
  waitpid(rp, &st, 0);
  cr_assert(WIFEXITED(st), "reader died (status %d)", st);
  cr_assert_eq(WEXITSTATUS(st), 0, "reader exit %d (1 = mixed versions, 2 = error, 3 = saw only one version, 4 = never saw the map grow)",
               WEXITSTATUS(st));
  verify_ok("after concurrent reads");
}
