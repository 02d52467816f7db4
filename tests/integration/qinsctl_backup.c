/* SPDX-License-Identifier: MIT */
/*
 * qinsctl_backup.c — `qinsctl backup DIR` (docs/qinsctl.md "backup", store.h qs_backup): a
 * consistent, compacted copy of the store taken while qinsd serves, which verifies and serves on
 * "another host" (the directory copied elsewhere byte for byte, the original store removed); and a
 * backup taken while an import replaces a model holds the previous model wholly (the import is
 * frozen with SIGSTOP in the middle, staged data present) or, after it, the new one wholly.
 *
 * Processes: the test process never opens an LMDB env; qinsctl and qinsd run as children, the
 * loaders are libqins threads (PITFALLS.md: no fork with an env open).
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>

#include "daemon_fixture.h"
#include "qins.h"
#include "qt.h"

TestSuite(qinsctl_backup, .init = setup, .fini = teardown, .timeout = 240);

/* `ls --json` and `ls MODEL --json` (names, ids, shapes, codecs, tensor checksums). */
static char *listing(const char *store, const char *model) {
  char *a, *b;
  cr_assert_eq(qt_ctl(store, &a, NULL, "--json", "ls", NULL), 0, "ls %s", store);
  cr_assert_eq(qt_ctl(store, &b, NULL, "--json", "ls", model, NULL), 0, "ls %s %s", store, model);
  return qt_cat(a, b);
}

/* A JSON number field of a one-line document ("key":N), or UINT64_MAX if absent. */
static uint64_t json_u64(const char *doc, const char *key) {
  char k[64];
  snprintf(k, sizeof k, "\"%s\":", key);
  const char *p = strstr(doc, k);
  return p ? strtoull(p + strlen(k), NULL, 10) : UINT64_MAX;
}

static void verify_ok(const char *store) {
  char *out, *err;
  int rc = qt_ctl(store, &out, &err, "--json", "verify", NULL);
  cr_assert_eq(rc, 0, "verify %s: %s %s", store, out, err);
  cr_assert(strstr(out, "\"ok\":true"), "%s", out);
  free(out);
  free(err);
}

static void copy_file(const char *from, const char *to) {
  size_t len;
  char *b = qt_read(from, &len);
  cr_assert(b, "read %s", from);
  cr_assert_eq(qt_write(to, b, len), 0, "write %s", to);
  free(b);
}

/* ---- load: libqins clients fetching and checking until told to stop ------------------------- */
typedef struct loader {
  pthread_t thr;
  const char *sock;
  atomic_int *stop;
  atomic_uint_fast64_t ok, bad; /* fetches equal to the source / anything else */
} loader;

static void *load_run(void *arg) {
  loader *l = arg;
  qins_client *c;
  if (qins_connect(&c, l->sock, 10000)) {
    atomic_fetch_add(&l->bad, 1);
    return NULL;
  }
  float *v = malloc(1024 * 600 * sizeof *v);
  while (!atomic_load(l->stop)) {
    int rc = qins_get_into(c, "m", "big", NULL, 0, QINS_F32, v, 1024 * 600 * 4, NULL, NULL, NULL);
    int good = rc == 0;
    for (uint64_t i = 0; good && i < 1024 * 600; i += 97) good = v[i] == ts_value(3, i);
    atomic_fetch_add(good ? &l->ok : &l->bad, 1);
  }
  free(v);
  qins_close(c);
  return NULL;
}

/* Waits (up to 60 s) until every loader has `more` good fetches past base[i]: evidence that each
 * client is being served, no timing assumption. 1 when they have; 0 (why in msg) on a bad fetch
 * or when 60 s passed. Asserts nothing: the caller stops and joins the loaders first. */
static int await_fetches(loader *L, int n, const uint64_t *base, uint64_t more, char *msg,
                         size_t cap) {
  for (int t = 0;; t++) {
    int all = 1;
    for (int i = 0; i < n; i++) {
      if (atomic_load(&L[i].bad)) {
        snprintf(msg, cap, "client %d: a bad fetch", i);
        return 0;
      }
      all &= atomic_load(&L[i].ok) >= base[i] + more;
    }
    if (all) return 1;
    if (t == 6000) break;
    usleep(10000);
  }
  size_t k = (size_t)snprintf(msg, cap, "not every client had %llu more good fetches in 60 s:",
                              (unsigned long long)more);
  for (int i = 0; i < n && k < cap; i++)
    k += (size_t)snprintf(msg + k, cap - k, " %llu", (unsigned long long)(atomic_load(&L[i].ok) - base[i]));
  return 0;
}

/* Every standard tensor as served (bytes), from a connection to sock. */
static void fetch_all(const char *sock, got out[N_STD]) {
  cr_assert_str_eq(sock, D.sock);
  ts_rx rx;
  open_rx(&rx);
  for (size_t k = 0; k < N_STD; k++) {
    out[k] = do_get(&rx, "m", std_tensors[k].name, -1, NULL, NULL);
    cr_assert_eq(out[k].code, 0, "get m/%s", std_tensors[k].name);
  }
  ts_rx_destroy(&rx);
}

Test(qinsctl_backup, backup_while_serving_verifies_and_serves_on_another_host) {
  /* Free pages in the source: a model imported and removed. */
  char st[160], bk[160];
  snprintf(st, sizeof st, "%s/tmp.safetensors", D.dir);
  float *w = malloc(512 * 1024 * sizeof *w);
  qt_fill_gauss(w, 512 * 1024, 7, 0.1f);
  qt_tensor t = {"w", QS_ST_F32, 2, {512, 1024}, w, 512 * 1024 * 4};
  cr_assert_eq(qt_st_write(st, &t, 1, NULL), 0);
  free(w);
  cr_assert_eq(qt_ctl(D.store, NULL, NULL, "import", st, "--model", "tmp", "--codec", "f32", NULL), 0);
  cr_assert_eq(qt_ctl(D.store, NULL, NULL, "rm", "tmp", NULL), 0);
  got before[N_STD];
  fetch_all(D.sock, before);
  char *src_ls = listing(D.store, "m");

  /* The backup, with four clients fetching meanwhile: each has been served (3 good fetches)
   * before it starts, and each is served again (3 more) after it ended, without a pause: the
   * fetches span the backup. */
  atomic_int stop = 0;
  loader L[4];
  const uint64_t zero[4] = {0, 0, 0, 0};
  for (int i = 0; i < 4; i++) {
    L[i].sock = D.sock;
    L[i].stop = &stop;
    atomic_init(&L[i].ok, 0);
    atomic_init(&L[i].bad, 0);
    cr_assert_eq(pthread_create(&L[i].thr, NULL, load_run, &L[i]), 0);
  }
  char why[256] = "";
  int served_before = await_fetches(L, 4, zero, 3, why, sizeof why);
  snprintf(bk, sizeof bk, "%s/bk", D.dir);
  char *out = NULL, *err = NULL;
  int rc = -1, served_after = 0;
  if (served_before) {
    rc = qt_ctl(D.store, &out, &err, "--json", "backup", bk, NULL);
    uint64_t at_end[4];
    for (int i = 0; i < 4; i++) at_end[i] = atomic_load(&L[i].ok);
    served_after = rc == 0 && await_fetches(L, 4, at_end, 3, why, sizeof why);
  }
  atomic_store(&stop, 1);
  for (int i = 0; i < 4; i++) pthread_join(L[i].thr, NULL);
  cr_assert(served_before, "before the backup: %s", why);
  cr_assert_eq(rc, 0, "backup: %s %s", out, err);
  cr_assert(served_after, "after the backup: %s", why);
  for (int i = 0; i < 4; i++)
    cr_assert_eq(atomic_load(&L[i].bad), 0, "client %d: %llu bad fetches", i,
                 (unsigned long long)atomic_load(&L[i].bad));
  /* Compacted: the removed model's pages are not copied. */
  uint64_t fb = json_u64(out, "file_bytes"), sb = json_u64(out, "source_file_bytes");
  cr_assert(fb < sb, "backup %llu bytes, source %llu", (unsigned long long)fb, (unsigned long long)sb);
  cr_assert_eq(json_u64(out, "models"), 1);
  cr_assert_eq(json_u64(out, "staging_dropped"), 0);
  free(out);
  free(err);
  /* A second backup into the same directory is refused; the first stays intact. */
  cr_assert_eq(qt_ctl(D.store, NULL, &err, "backup", bk, NULL), 1);
  cr_assert(strstr(err, "already holds a store"), "%s", err);
  free(err);

  /* "Another host": the directory's files copied to a new place; the original store removed. */
  char h2[160], f1[200], f2[200];
  snprintf(h2, sizeof h2, "%s/h2", D.dir);
  cr_assert_eq(mkdir(h2, 0700), 0);
  snprintf(f1, sizeof f1, "%s/data.mdb", bk);
  snprintf(f2, sizeof f2, "%s/data.mdb", h2);
  copy_file(f1, f2);
  struct stat sst;
  snprintf(f1, sizeof f1, "%s/lock.mdb", bk);
  cr_assert_neq(stat(f1, &sst), 0, "the backup holds data.mdb only");
  qt_rmrf(bk);
  int ws = ts_daemon_stop(&D);
  cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  qt_rmrf(D.store);
  verify_ok(h2);
  cr_assert_eq(qt_ctl(h2, &out, NULL, "--json", "audit", NULL), 0);
  cr_assert_eq(json_u64(out, "free_pages"), 0, "compacted: no free pages: %s", out);
  cr_assert_eq(json_u64(out, "staging"), 0);
  free(out);
  char *bk_ls = listing(h2, "m");
  cr_assert_str_eq(bk_ls, src_ls, "the backup lists the same models, tensors and checksums");
  free(bk_ls);
  free(src_ls);
  /* ... and serves the same numbers. */
  snprintf(D.store, sizeof D.store, "%s/h2", D.dir);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "qinsd on the copied backup");
  got after[N_STD];
  fetch_all(D.sock, after);
  for (size_t k = 0; k < N_STD; k++) {
    cr_assert_eq(after[k].bytes, before[k].bytes, "%s", std_tensors[k].name);
    cr_assert_eq(memcmp(after[k].data, before[k].data, before[k].bytes), 0, "%s",
                 std_tensors[k].name);
    free(after[k].data);
    free(before[k].data);
  }
}

/* ---- backup during an import -------------------------------------------------------------- */
static pid_t spawn_import(const char *store, const char *file) {
  char bin[512];
  qt_bin("qinsctl", bin, sizeof bin);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    int nul = open("/dev/null", O_WRONLY);
    dup2(nul, 1);
    execl(bin, bin, "--store", store, "import", file, "--model", "m", "--codec", "f32", (char *)NULL);
    _exit(127);
  }
  return pid;
}

/* The staged-entry count of the store (audit), or UINT64_MAX if audit failed. */
static uint64_t staging_of(const char *store) {
  char *out = NULL;
  uint64_t n = UINT64_MAX;
  if (qt_ctl(store, &out, NULL, "--json", "audit", NULL) == 0) n = json_u64(out, "staging");
  free(out);
  return n;
}

Test(qinsctl_backup, backup_during_an_import_holds_the_old_or_the_new_model_wholly) {
  /* The new "m": 5 x 16 MiB f32 matrices, more than one staging transaction (QS_TXN_BYTES). */
  char src[160], bk1[160], bk2[160];
  snprintf(src, sizeof src, "%s/new.safetensors", D.dir);
  enum { NT = 5, ROWS = 2048, COLS = 2048 };
  qt_tensor t[NT];
  char names[NT][16];
  for (int i = 0; i < NT; i++) {
    float *w = malloc((size_t)ROWS * COLS * sizeof *w);
    qt_fill_gauss(w, (uint64_t)ROWS * COLS, 100 + (uint64_t)i, 0.05f);
    snprintf(names[i], sizeof names[i], "l%d.w", i);
    t[i] = (qt_tensor){names[i], QS_ST_F32, 2, {ROWS, COLS}, w, (uint64_t)ROWS * COLS * 4};
  }
  cr_assert_eq(qt_st_write(src, t, NT, NULL), 0);
  for (int i = 0; i < NT; i++) free((void *)t[i].data);

  char *old_ls = listing(D.store, "m");
  /* Start the import and freeze it once it has staged data (polling, no sleeps). If it finishes
   * before a poll sees it staged, the new model becomes the old one and we try again. */
  int frozen = 0;
  pid_t imp = -1;
  for (int attempt = 0; attempt < 5 && !frozen; attempt++) {
    imp = spawn_import(D.store, src);
    for (;;) {
      int st;
      if (waitpid(imp, &st, WNOHANG) == imp) {
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "import failed (0x%x)", st);
        break;
      }
      uint64_t n = staging_of(D.store);
      if (n != UINT64_MAX && n > 0) {
        kill(imp, SIGSTOP);
        /* It may have gone on between the audit and the stop (to its commit, even): frozen only
         * if it still holds staged data and "m" is still the previous model; else let it finish. */
        char *now_ls = listing(D.store, "m");
        uint64_t n2 = staging_of(D.store);
        frozen = n2 != UINT64_MAX && n2 > 0 && !strcmp(now_ls, old_ls);
        free(now_ls);
        if (!frozen) {
          kill(imp, SIGCONT);
          cr_assert_eq(waitpid(imp, &st, 0), imp);
          cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "import failed (0x%x)", st);
        }
        break;
      }
    }
    if (!frozen) {
      free(old_ls);
      old_ls = listing(D.store, "m");
    }
  }
  if (!frozen) cr_skip_test("the import always finished before it was seen staged (5 tries)");
  cr_assert_gt(staging_of(D.store), 0, "the frozen import holds staged data");

  /* Mid-import: the backup holds the previous model, wholly, and none of the staged data. */
  snprintf(bk1, sizeof bk1, "%s/bk1", D.dir);
  char *out, *err;
  int rc = qt_ctl(D.store, &out, &err, "--json", "backup", bk1, "--verify", NULL);
  kill(imp, SIGCONT);
  cr_assert_eq(rc, 0, "backup during the import: %s %s", out, err);
  cr_assert_geq(json_u64(out, "staging_dropped"), 1, "%s", out);
  cr_assert_eq(json_u64(out, "problems"), 0, "%s", out);
  free(out);
  free(err);
  char *ls1 = listing(bk1, "m");
  cr_assert_str_eq(ls1, old_ls, "the mid-import backup holds the previous model");
  cr_assert_eq(staging_of(bk1), 0);
  verify_ok(bk1);
  free(ls1);

  int st;
  cr_assert_eq(waitpid(imp, &st, 0), imp);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the import, resumed, succeeds (0x%x)", st);

  /* After it: the new model, wholly. */
  char *new_ls = listing(D.store, "m");
  cr_assert_str_neq(new_ls, old_ls);
  snprintf(bk2, sizeof bk2, "%s/bk2", D.dir);
  cr_assert_eq(qt_ctl(D.store, NULL, NULL, "backup", bk2, NULL), 0);
  char *ls2 = listing(bk2, "m");
  cr_assert_str_eq(ls2, new_ls, "the backup after the import holds the new model");
  verify_ok(bk2);
  cr_assert_eq(ts_ping(D.sock), 0, "qinsd served throughout");
  free(ls2);
  free(new_ls);
  free(old_ls);
}
