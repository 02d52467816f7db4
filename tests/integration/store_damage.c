/* SPDX-License-Identifier: MIT */
/*
 * store_damage.c — a damaged store through the programs (issue 13, store side; the store API
 * side is tests/unit/store_guard.c):
 *  - bits flipped in data.mdb while qinsd serves, after every tensor was served once: each get
 *    answers the same bytes as before or CHECKSUM/CORRUPT, never other bytes;
 *  - a truncated data.mdb: qinsd refuses to start and exits 1 naming the file, `qinsctl verify`
 *    and `qinsctl backup` fail naming it (no signal), and backup leaves nothing behind;
 *  - a backup killed in the middle of its copy leaves no data.mdb in its directory, and the
 *    next backup into it succeeds.
 * docs/OPERATIONS.md §7.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "daemon_fixture.h"
#include "qt.h"

static void setup_filled(void) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_std, NULL), 0, "filling the store");
}

static void teardown_quiet(void) { ts_dir_remove(&D, 0); }

TestSuite(store_damage, .timeout = 120);

static void data_path(char *p, size_t cap) { snprintf(p, cap, "%s/data.mdb", D.store); }

Test(store_damage, flipped_bits_while_serving_give_errors_never_other_numbers, .init = setup,
     .fini = teardown) {
  ts_rx rx;
  open_rx(&rx);
  got want[N_STD];
  for (size_t i = 0; i < N_STD; i++) {
    want[i] = do_get(&rx, "m", std_tensors[i].name, -1, NULL, NULL);
    cr_assert_eq(want[i].code, 0, "get %s", std_tensors[i].name);
  }
  char p[160];
  data_path(p, sizeof p);
  size_t len;
  uint8_t *all = (uint8_t *)qt_read(p, &len);
  cr_assert(all);
  size_t at[64], size[64], nc = 0;
  for (const uint8_t *q = all; nc < 64 && (q = memmem(q, len - (size_t)(q - all), "QSCK", 4)); q++) {
    size_t off = (size_t)(q - all);
    uint64_t sz = 0;
    for (int i = 7; i >= 0 && off + 16 <= len; i--) sz = (sz << 8) | q[8 + i];
    if (off + 16 > len || !sz || off + 16 + sz > len) continue;
    at[nc] = off;
    size[nc++] = 16 + (size_t)sz;
  }
  free(all);
  cr_assert_geq(nc, N_STD - 1, "found %zu chunk records", nc);
  int fd = open(p, O_RDWR);
  cr_assert_geq(fd, 0);
  uint64_t x = 12345;
  int errors = 0;
  for (int k = 0; k < 60; k++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    size_t c = (size_t)(x >> 33) % nc, off = at[c] + (size_t)((x >> 7) % size[c]);
    uint8_t b, mask = (uint8_t)(1u << ((x >> 3) & 7));
    cr_assert_eq(pread(fd, &b, 1, (off_t)off), 1);
    b ^= mask;
    cr_assert_eq(pwrite(fd, &b, 1, (off_t)off), 1);
    for (size_t i = 0; i < N_STD; i++) {
      got g = do_get(&rx, "m", std_tensors[i].name, -1, NULL, NULL);
      if (g.code) {
        cr_assert(g.code == QINS_ECHECKSUM || g.code == QINS_ECORRUPT,
                  "flip %d at %zu: get %s answered %d, only CHECKSUM or CORRUPT expected", k, off,
                  std_tensors[i].name, g.code);
        errors++;
      } else {
        cr_assert(g.bytes == want[i].bytes && !memcmp(g.data, want[i].data, g.bytes),
                  "flip %d at %zu: get %s answered other numbers without an error", k, off,
                  std_tensors[i].name);
      }
      free(g.data);
    }
    b ^= mask;
    cr_assert_eq(pwrite(fd, &b, 1, (off_t)off), 1);
  }
  close(fd);
  cr_assert_geq(errors, 50, "%d gets failed for 60 flips", errors);
  for (size_t i = 0; i < N_STD; i++) { /* whole again: served as before */
    got g = do_get(&rx, "m", std_tensors[i].name, -1, NULL, NULL);
    cr_assert(g.code == 0 && g.bytes == want[i].bytes && !memcmp(g.data, want[i].data, g.bytes));
    free(g.data);
    free(want[i].data);
  }
  ts_rx_destroy(&rx);
}

Test(store_damage, a_truncated_store_is_refused_by_qinsd_verify_and_backup, .init = setup_filled,
     .fini = teardown_quiet) {
  char p[200], bk[160];
  data_path(p, sizeof p);
  struct stat st;
  cr_assert_eq(stat(p, &st), 0);
  cr_assert_eq(truncate(p, st.st_size / 2), 0);
  char *out, *err;
  int rc = qt_ctl(D.store, &out, &err, "verify", NULL);
  cr_assert_eq(rc, 1, "verify of a truncated store: status %d, stderr %s", rc, err);
  cr_assert(strstr(err, "data.mdb") && strstr(err, "truncated"), "%s", err);
  free(out);
  free(err);
  snprintf(bk, sizeof bk, "%s/bk", D.dir);
  rc = qt_ctl(D.store, &out, &err, "backup", bk, NULL);
  cr_assert_eq(rc, 1, "backup of a truncated store: status %d, stderr %s", rc, err);
  cr_assert(strstr(err, "data.mdb") && strstr(err, "truncated"), "%s", err);
  free(out);
  free(err);
  snprintf(p, sizeof p, "%s/data.mdb", bk);
  cr_assert_neq(access(p, F_OK), 0, "backup left %s", p);
  /* qinsd does not start on it (it exits during startup, the reason in its log) rather than
   * starting and dying of SIGBUS at the first request. */
  cr_assert_neq(ts_daemon_start(&D, NULL), 0, "qinsd started on a truncated store");
  snprintf(p, sizeof p, "%s", D.log);
  char *log = qt_read(p, &(size_t){0});
  cr_assert(log && strstr(log, "data.mdb") && strstr(log, "truncated"), "qinsd log: %s", log);
  free(log);
}

Test(store_damage, a_killed_backup_leaves_no_data_mdb, .init = setup_filled,
     .fini = teardown_quiet) {
  char bk[160], p[200], bin[512];
  snprintf(bk, sizeof bk, "%s/bk", D.dir);
  qt_bin("qinsctl", bin, sizeof bin);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    /* The copy dies of SIGXFSZ when it passes 256 KiB (the store holds 2.4 MB). */
    struct rlimit rl = {256 << 10, 256 << 10};
    setrlimit(RLIMIT_FSIZE, &rl);
    signal(SIGXFSZ, SIG_DFL);
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    execl(bin, bin, "--store", D.store, "backup", bk, (char *)NULL);
    _exit(127);
  }
  int ws;
  cr_assert_eq(waitpid(pid, &ws, 0), pid);
  cr_assert(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGXFSZ, "backup was not killed mid-copy (0x%x)", ws);
  snprintf(p, sizeof p, "%s/data.mdb", bk);
  cr_assert_neq(access(p, F_OK), 0, "a killed backup left %s", p);
  char *out, *err;
  int rc = qt_ctl(D.store, &out, &err, "backup", bk, NULL);
  cr_assert_eq(rc, 0, "backup after a killed one: %s", err);
  free(out);
  free(err);
  cr_assert_eq(access(p, F_OK), 0);
  snprintf(p, sizeof p, "%s/.partial", bk);
  cr_assert_neq(access(p, F_OK), 0, "the next backup left .partial");
  rc = qt_ctl(bk, &out, &err, "verify", NULL);
  cr_assert_eq(rc, 0, "verify of the backup: %s", err);
  free(out);
  free(err);
}
