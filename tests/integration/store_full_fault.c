/* SPDX-License-Identifier: MIT */
/*
 * store_full_fault.c — fault: the store's filesystem fills up in the middle of an import (issue 7).
 * The store lives on a 96 MiB tmpfs; model "a" (1 MiB) is imported and served by qinsd; then model
 * "b" (160 MiB of f32, staged in transactions of QS_TXN_BYTES = 64 MiB: the first commits, the
 * disk fills during the second) must fail with a clear error naming the store (exit 1; LMDB
 * reports the short write as an I/O error, the message says a full disk does that) while qinsd
 * keeps serving; afterwards the listing and every checksum are exactly as before,
 * verify passes, qinsd serves the same bytes, a small import still succeeds in the reclaimed space,
 * and once the tmpfs is enlarged (remount) "b" imports. docs/FORMAT.md §2.8, docs/OPERATIONS.md.
 *
 * Mounting: in a forked child that enters a private mount namespace (unshare(CLONE_NEWNS), mount
 * propagation made private) and mounts the tmpfs there, so nothing leaks to the host and the mount
 * disappears with the child. CI runs as root; where mounting is not permitted the test is skipped
 * with the reason (never passed silently). The child runs qinsctl and qinsd as its own children
 * (they inherit the namespace), checks each step and reports the first failure through a file;
 * the test process never opens the LMDB env.
 *
 * store_ro_mount, in the same kind of child: the store's filesystem remounted read-only under a
 * served store (an operator's read-only image). qinsd logs that it runs without a lock table and
 * serves the same bytes as before; writers (import, rm) fail with an error naming the store and the
 * read-only filesystem, and the listing stays as it was (docs/OPERATIONS.md).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon.h"
#include "qins.h"
#include "qt.h"

#define SKIP_STATUS 77 /* the child could not mount: skip */

static char dir[64], mnt[96], why[160], qinsctl[4096];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(mnt, sizeof mnt, "%s/t", dir);
  snprintf(why, sizeof why, "%s/why", dir);
  qt_bin("qinsctl", qinsctl, sizeof qinsctl);
  cr_assert_eq(access(qinsctl, X_OK), 0, "%s not built", qinsctl);
}
static void teardown(void) { qt_rmrf(dir); }

TestSuite(store_full_fault, .init = setup, .fini = teardown, .timeout = 180);

/* ---- the child: no Criterion asserts (it is not the test process); the first failed check is
 * written to `why` and the child exits 1. */
static void child_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static ts_daemon cd; /* the child's qinsd */
static void child_fail(const char *fmt, ...) {
  FILE *f = fopen(why, "w");
  if (f) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fclose(f);
  }
  if (cd.pid > 0) ts_daemon_stop(&cd);
  _exit(1);
}
#define CHECK(cond, ...) \
  do {                   \
    if (!(cond)) child_fail(__VA_ARGS__); \
  } while (0)

static void child_skip(const char *what, int err) {
  FILE *f = fopen(why, "w");
  if (f) {
    fprintf(f, "%s: %s (needs root or CAP_SYS_ADMIN to mount a tmpfs in a private mount namespace)",
            what, strerror(err));
    fclose(f);
  }
  _exit(SKIP_STATUS);
}

static char *snapshot(const char *store) {
  char *a = NULL, *b = NULL;
  CHECK(qt_ctl(store, &a, NULL, "--json", "ls", NULL) == 0, "ls failed");
  CHECK(qt_ctl(store, &b, NULL, "--json", "ls", "a", NULL) == 0, "ls a failed");
  return qt_cat(a, b);
}

/* All of a/w0 from qinsd (bytes; malloc'd). */
static uint8_t *served(size_t *len) {
  qins_client *c;
  int rc = qins_connect(&c, cd.sock, 10000);
  CHECK(rc == 0, "connect to qinsd: %s", qins_strerror(rc));
  void *p = NULL;
  size_t n = 0;
  rc = qins_get(c, "a", "w0", NULL, 0, QINS_F32, &p, &n, NULL, NULL);
  CHECK(rc == 0, "get a/w0: %s", qins_client_error(c));
  uint8_t *copy = malloc(n);
  memcpy(copy, p, n);
  qins_free(p);
  qins_close(c);
  *len = n;
  return copy;
}

static void write_model(const char *path, int nt, uint64_t rows, uint64_t cols, uint64_t seed) {
  cr_assert_eq(qt_st_write_gauss(path, nt, rows, cols, seed), 0, "writing %s", path);
}

/* The child's start: a private mount namespace with a tmpfs (`opts`) at mnt, and cd describing a
 * qinsd for a store on it. */
static void child_enter(const char *opts) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (unshare(CLONE_NEWNS) != 0) child_skip("unshare(CLONE_NEWNS)", errno);
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) child_skip("making / private", errno);
  if (mkdir(mnt, 0700) != 0) child_fail("mkdir %s: %s", mnt, strerror(errno));
  if (mount("qins-test", mnt, "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0)
    child_skip("mount -t tmpfs", errno);
  memset(&cd, 0, sizeof cd);
  snprintf(cd.dir, sizeof cd.dir, "%s", dir);
  snprintf(cd.sock, sizeof cd.sock, "%s/s", dir);
  snprintf(cd.store, sizeof cd.store, "%s/t/store", dir);
  snprintf(cd.log, sizeof cd.log, "%s/log", dir);
}

/* The test process: waits for the child and passes on its verdict (a skip names what it could
 * not do and what is therefore NOT tested). */
static void child_verdict(pid_t pid, const char *untested) {
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  size_t n = 0;
  char *msg = qt_read(why, &n);
  if (WIFEXITED(st) && WEXITSTATUS(st) == SKIP_STATUS)
    cr_skip_test("cannot mount a tmpfs here, so %s is NOT tested: %s", untested, msg ? msg : "?");
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s (child status 0x%x)",
            msg ? msg : "no message", st);
  free(msg);
}

static void child(const char *a_src, const char *b_src, const char *c_src) {
  child_enter("size=96m,mode=0700");
  char *err = NULL;
  int rc = qt_ctl(cd.store, NULL, &err, "import", a_src, "--model", "a", "--codec", "f32", NULL);
  CHECK(rc == 0, "importing a: %s", err);
  free(err);
  CHECK(ts_daemon_start(&cd, NULL) == 0, "starting qinsd on the tmpfs store");
  char *before = snapshot(cd.store);
  size_t n0;
  uint8_t *v0 = served(&n0);

  /* The import that fills the disk. */
  rc = qt_ctl(cd.store, NULL, &err, "import", b_src, "--model", "b", "--codec", "f32", NULL);
  CHECK(rc == 1, "importing b on a full disk: exit %d, expected 1: %s", rc, err);
  CHECK(strstr(err, "no space left on device") || strstr(err, "full disk"),
        "the error says the disk is full: %s", err);
  CHECK(strstr(err, cd.store), "the error names the store: %s", err);
  free(err);

  /* The previous state, intact: listing and checksums, verify, the served bytes. */
  char *after = snapshot(cd.store);
  CHECK(!strcmp(before, after), "listing changed:\nbefore %s\nafter  %s", before, after);
  char *out = NULL;
  rc = qt_ctl(cd.store, &out, &err, "--json", "verify", NULL);
  CHECK(rc == 0 && strstr(out, "\"ok\":true"), "verify after the failed import: %s %s", out, err);
  free(out);
  free(err);
  size_t n1;
  uint8_t *v1 = served(&n1);
  CHECK(n1 == n0 && !memcmp(v0, v1, n0), "qinsd serves other bytes after the failed import");
  free(v1);

  /* Still writable: a small import fits in what the failed one gave back, and nothing staged is
   * left (reclaimed by the failed import's abort, or else by this next writer). */
  rc = qt_ctl(cd.store, NULL, &err, "import", c_src, "--model", "c", "--codec", "f32", NULL);
  CHECK(rc == 0, "a small import after the failure: %s", err);
  free(err);
  rc = qt_ctl(cd.store, &out, NULL, "--json", "audit", NULL);
  CHECK(rc == 0 && strstr(out, "\"staging\":0"), "staged leftovers after the failure: %s", out);
  free(out);
  /* More space (the operator's fix): "b" now imports, and everything verifies. */
  CHECK(mount(NULL, mnt, NULL, MS_REMOUNT | MS_NOSUID | MS_NODEV, "size=512m") == 0,
        "remount bigger: %s", strerror(errno));
  rc = qt_ctl(cd.store, NULL, &err, "import", b_src, "--model", "b", "--codec", "f32", NULL);
  CHECK(rc == 0, "importing b with room: %s", err);
  free(err);
  rc = qt_ctl(cd.store, &out, &err, "--json", "verify", NULL);
  CHECK(rc == 0, "verify at the end: %s %s", out, err);
  free(out);
  free(err);
  v1 = served(&n1);
  CHECK(n1 == n0 && !memcmp(v0, v1, n0), "a/w0 changed");
  free(v1);
  free(v0);
  free(before);
  free(after);
  int st = ts_daemon_stop(&cd);
  cd.pid = 0;
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "qinsd exit status 0x%x", st);
  umount2(mnt, MNT_DETACH);
  _exit(0);
}

Test(store_full_fault, disk_full_mid_import_leaves_the_previous_state) {
  char a_src[128], b_src[128], c_src[128];
  snprintf(a_src, sizeof a_src, "%s/a.safetensors", dir);
  snprintf(b_src, sizeof b_src, "%s/b.safetensors", dir);
  snprintf(c_src, sizeof c_src, "%s/c.safetensors", dir);
  write_model(a_src, 2, 256, 512, 1);      /* 1 MiB */
  write_model(b_src, 10, 2048, 2048, 100); /* 160 MiB: more than the 96 MiB tmpfs */
  write_model(c_src, 1, 128, 256, 200);    /* 128 KiB */
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) child(a_src, b_src, c_src);
  child_verdict(pid, "the disk-full fault");
}

/* ---- store_ro_mount */
static void ro_child(const char *a_src) {
  child_enter("size=32m,mode=0700");
  char *err = NULL;
  int rc = qt_ctl(cd.store, NULL, &err, "import", a_src, "--model", "a", "--codec", "qins8", NULL);
  CHECK(rc == 0, "importing a: %s", err);
  free(err);
  CHECK(ts_daemon_start(&cd, NULL) == 0, "starting qinsd on the writable store");
  char *before = snapshot(cd.store);
  size_t n0;
  uint8_t *v0 = served(&n0);
  int st = ts_daemon_stop(&cd);
  cd.pid = 0;
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "first qinsd exit status 0x%x", st);
  size_t ln = 0;
  char *log = qt_read(cd.log, &ln);
  CHECK(log && !strstr(log, "no lock table"), "a writable store warned of no lock table: %s", log);
  free(log);
  unlink(cd.log);

  CHECK(mount(NULL, mnt, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) == 0,
        "remount read-only: %s", strerror(errno));
  CHECK(ts_daemon_start(&cd, NULL) == 0, "starting qinsd on the read-only store");
  log = qt_read(cd.log, &ln);
  CHECK(log && strstr(log, "warning") && strstr(log, "no lock table") && strstr(log, cd.store),
        "qinsd did not warn that the read-only store runs without a lock table: %s", log);
  free(log);
  size_t n1;
  uint8_t *v1 = served(&n1);
  CHECK(n1 == n0 && !memcmp(v0, v1, n0), "qinsd serves other bytes from the read-only store");
  free(v1);
  const char *writes[][6] = {{"import", a_src, "--model", "b", "--codec", "qins8"},
                             {"rm", "a", NULL, NULL, NULL, NULL}};
  for (int i = 0; i < 2; i++) {
    const char *const *w = writes[i];
    rc = qt_ctl(cd.store, NULL, &err, w[0], w[1], w[2], w[3], w[4], w[5], NULL);
    CHECK(rc == 1, "%s on a read-only store: exit %d, expected 1: %s", w[0], rc, err);
    CHECK(err && strstr(err, cd.store) && strstr(err, "read-only filesystem"),
          "%s: the error names the store and the read-only filesystem: %s", w[0], err);
    free(err);
  }
  char *after = snapshot(cd.store);
  CHECK(!strcmp(before, after), "listing changed:\nbefore %s\nafter  %s", before, after);
  char *out = NULL;
  rc = qt_ctl(cd.store, &out, &err, "--json", "verify", NULL);
  CHECK(rc == 0 && strstr(out, "\"ok\":true"), "verify on the read-only store: %s %s", out, err);
  free(out);
  free(err);
  v1 = served(&n1);
  CHECK(n1 == n0 && !memcmp(v0, v1, n0), "a/w0 changed after the refused writes");
  free(v1);
  free(v0);
  free(before);
  free(after);
  st = ts_daemon_stop(&cd);
  cd.pid = 0;
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "qinsd exit status 0x%x", st);
  umount2(mnt, MNT_DETACH);
  _exit(0);
}

TestSuite(store_ro_mount, .init = setup, .fini = teardown, .timeout = 120);

Test(store_ro_mount, served_with_a_warning_and_writes_refused) {
  char a_src[128];
  snprintf(a_src, sizeof a_src, "%s/a.safetensors", dir);
  write_model(a_src, 2, 256, 512, 7);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) ro_child(a_src);
  child_verdict(pid, "a read-only store mount");
}
