/* SPDX-License-Identifier: MIT */
/*
 * store_commit_fault.c — faults at the store's commits, injected into `qinsctl import` by the
 * LD_PRELOAD shim $QINS_BUILD/tests/fault.so (tests/fault/shim.c), which tells an import's
 * transactions apart by the named DBs they wrote (docs/FORMAT.md §2.8 staging and publish):
 *   - the disk fills exactly at the publish commit (ENOSPC on every write of the transaction that
 *     puts the model record): the import fails naming the file and the disk, the previous model
 *     is listed and served exactly as before, and nothing staged is left;
 *   - every commit that writes is made durable: the commit calls fsync/fdatasync and the
 *     environment has none of MDB_NOSYNC, MDB_NOMETASYNC, MDB_MAPASYNC;
 *   - an import killed (SIGKILL) right after its first staged data commit leaves staged chunks, and
 *     the next writer reclaims every one of them (counted in the "chunks" and "staging" DBs, not
 *     only through `qinsctl ls`).
 * The test process never opens the LMDB env: qinsctl runs as a child, and the DB counts come from
 * a forked reader (qt_db_entries).
 */
#include <criterion/criterion.h>
#include <lmdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qt.h"

static char dir[64], store[128], qinsctl[4096], flog[128];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(store, sizeof store, "%s/store", dir);
  snprintf(flog, sizeof flog, "%s/commits.log", dir);
  qt_bin("qinsctl", qinsctl, sizeof qinsctl);
  cr_assert_eq(access(qinsctl, X_OK), 0, "%s not built", qinsctl);
  char so[4096];
  cr_assert_eq(access(qt_bin("tests/fault.so", so, sizeof so), R_OK), 0, "%s not built", so);
}
static void teardown(void) { qt_rmrf(dir); }

TestSuite(store_commit_fault, .init = setup, .fini = teardown, .timeout = 120);

/* Runs qinsctl --store STORE args... (NULL-terminated) with env (may be NULL). */
static int ctl_env(char **env, char **out, char **err, ...) {
  char *argv[24] = {qinsctl, "--store", store};
  int n = 3;
  va_list ap;
  va_start(ap, err);
  for (const char *a; n < 23 && (a = va_arg(ap, const char *));) argv[n++] = (char *)a;
  va_end(ap);
  argv[n] = NULL;
  return qt_run(argv, env, out, err);
}

static void write_model(const char *path, int nt, uint64_t rows, uint64_t cols, uint64_t seed) {
  cr_assert_eq(qt_st_write_gauss(path, nt, rows, cols, seed), 0, "writing %s", path);
}

static void import_ok(const char *src, const char *model) {
  char *err = NULL;
  int rc = ctl_env(NULL, NULL, &err, "import", src, "--model", model, "--codec", "f32", NULL);
  cr_assert_eq(rc, 0, "import %s as %s: %s", src, model, err);
  free(err);
}

/* `ls --json` + `ls m --json` (every tensor's checksum included). */
static char *snapshot(void) {
  char *a = NULL, *b = NULL;
  cr_assert_eq(ctl_env(NULL, &a, NULL, "--json", "ls", NULL), 0);
  cr_assert_eq(ctl_env(NULL, &b, NULL, "--json", "ls", "m", NULL), 0);
  return qt_cat(a, b);
}

static void verify_ok(void) {
  char *out = NULL, *err = NULL;
  int rc = ctl_env(NULL, &out, &err, "--json", "verify", NULL);
  cr_assert(rc == 0 && strstr(out, "\"ok\":true"), "verify: %s %s", out, err);
  free(out);
  free(err);
}

Test(store_commit_fault, disk_full_at_the_publish_commit_keeps_the_old_model) {
  char a[128], b[128];
  snprintf(a, sizeof a, "%s/a.safetensors", dir);
  snprintf(b, sizeof b, "%s/b.safetensors", dir);
  write_model(a, 2, 64, 96, 1);
  write_model(b, 3, 64, 96, 50);
  import_ok(a, "m");
  char *before = snapshot();
  long long chunks0 = qt_db_entries(store, "chunks"), tensors0 = qt_db_entries(store, "tensors");
  cr_assert_gt(chunks0, 0);

  char logv[160];
  snprintf(logv, sizeof logv, "QINS_FAULT_LOG=%s", flog);
  const char *extra[] = {"QINS_FAULT_PUBLISH=ENOSPC", logv, NULL};
  char **env = qt_env_preload(extra);
  char *err = NULL;
  int rc = ctl_env(env, NULL, &err, "import", b, "--model", "m", "--codec", "f32", NULL);
  free(env);
  char *pl = qt_read(flog, NULL);
  /* The fault hit the publish commit (it puts into staging and models): logged failing ENOSPC. */
  char *pub = pl ? strstr(pl, "puts=SM ") : NULL;
  cr_assert(pub && !strncmp(strchr(pub, '\n') - 6, " rc=28", 6), "commits: %s", pl ? pl : "");
  cr_assert_eq(rc, 1, "import with the publish commit failing: exit %d: %s", rc, err);
  cr_assert(strstr(err, "b.safetensors") && strstr(err, "no space left on device"),
            "the error names the file and the full disk: %s", err);
  free(err);
  free(pl);

  char *after = snapshot();
  cr_assert_str_eq(after, before, "the failed publish changed the store");
  verify_ok();
  cr_assert_eq(qt_db_entries(store, "chunks"), chunks0, "chunks of the failed import left behind");
  cr_assert_eq(qt_db_entries(store, "tensors"), tensors0);
  cr_assert_eq(qt_db_entries(store, "staging"), 0);
  /* Without the fault the same import replaces the model. */
  import_ok(b, "m");
  verify_ok();
  cr_assert_eq(qt_db_entries(store, "tensors"), 3);
  free(before);
  free(after);
}

Test(store_commit_fault, every_commit_that_writes_is_synced) {
  char a[128];
  snprintf(a, sizeof a, "%s/a.safetensors", dir);
  write_model(a, 2, 64, 96, 3);
  char logv[160];
  snprintf(logv, sizeof logv, "QINS_FAULT_LOG=%s", flog);
  const char *extra[] = {logv, NULL};
  char **env = qt_env_preload(extra);
  char *err = NULL;
  int rc = ctl_env(env, NULL, &err, "import", a, "--model", "m", "--codec", "f32", NULL);
  cr_assert_eq(rc, 0, "%s", err);
  free(err);
  err = NULL;
  rc = ctl_env(env, NULL, &err, "rm", "m", NULL);
  cr_assert_eq(rc, 0, "%s", err);
  free(err);
  free(env);
  char *pl = qt_read(flog, NULL);
  cr_assert_not_null(pl);
  int writing = 0, publish = 0;
  for (char *line = strtok(pl, "\n"); line; line = strtok(NULL, "\n")) {
    char puts[16];
    int syncs;
    unsigned flags;
    int lrc;
    cr_assert_eq(sscanf(line, "commit puts=%15s syncs=%d flags=0x%x rc=%d", puts, &syncs, &flags,
                        &lrc), 4, "%s", line);
    cr_assert_eq(flags & (MDB_NOSYNC | MDB_NOMETASYNC | MDB_MAPASYNC), 0,
                 "the store is opened without durable commits: flags 0x%x", flags);
    if (!strcmp(puts, "-")) continue; /* a read or a delete-only transaction */
    writing++;
    if (strchr(puts, 'M')) publish++;
    cr_assert_geq(syncs, 1, "a commit writing %s was not synced (%s)", puts, line);
  }
  cr_assert_geq(writing, 3, "staging, data and publish commits seen");
  cr_assert_eq(publish, 1);
  free(pl);
}

Test(store_commit_fault, killed_import_staged_chunks_are_all_reclaimed) {
  char a[128], b[128];
  snprintf(a, sizeof a, "%s/a.safetensors", dir);
  snprintf(b, sizeof b, "%s/b.safetensors", dir);
  write_model(a, 2, 256, 96, 7);
  write_model(b, 3, 256, 96, 70);
  import_ok(a, "m");
  char *before = snapshot();
  long long c0 = qt_db_entries(store, "chunks"), t0 = qt_db_entries(store, "tensors");
  cr_assert_gt(c0, 0);

  const char *extra[] = {"QINS_FAULT_KILL_AFTER=chunks", NULL};
  char **env = qt_env_preload(extra);
  int rc = ctl_env(env, NULL, NULL, "import", b, "--model", "b", "--codec", "f32", NULL);
  free(env);
  cr_assert_eq(rc, 128 + SIGKILL, "the import was killed after its first staged commit (%d)", rc);
  /* Staged, not published: chunks exist beyond m's, a staging entry names them. */
  long long c1 = qt_db_entries(store, "chunks");
  cr_assert_gt(c1, c0, "the killed import left no staged chunks: nothing to reclaim");
  cr_assert_eq(qt_db_entries(store, "staging"), 1);
  char *mid = snapshot();
  cr_assert_str_eq(mid, before, "a killed import changed what is listed");
  free(mid);

  /* The next writer reclaims them: importing b for real leaves exactly m's and b's chunks. */
  import_ok(b, "b");
  cr_assert_eq(qt_db_entries(store, "staging"), 0);
  cr_assert_eq(qt_db_entries(store, "chunks"), c0 + (c1 - c0),
               "chunks after the reclaim and a whole import of b (m has %lld, the kill staged %lld)",
               c0, c1 - c0);
  cr_assert_eq(qt_db_entries(store, "tensors"), t0 + 3);
  verify_ok();
  free(before);
}
