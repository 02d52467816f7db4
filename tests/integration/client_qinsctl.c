/* SPDX-License-Identifier: MIT */
/*
 * client_qinsctl.c — qinsctl's remote commands (daemon/qinsctl/cmd_remote.c, docs/client.md §4)
 * against a real qinsd: ping, stats, get with slices to stdout and to a .npy file, and their exit
 * statuses (0 ok, 1 failure with the server's message, 2 usage).
 *
 * The model "m": w [6, 10] f32, values ts_value(7, i).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "codec.h"
#include "daemon.h"
#include "fini_check.h"

static ts_daemon D;

static int fill(qs_store *s, void *ud) {
  (void)ud;
  qs_import *im;
  int rc = qs_import_begin(s, "m", NULL, &im);
  if (rc) return rc;
  float v[60];
  for (int i = 0; i < 60; i++) v[i] = ts_value(7, (uint64_t)i);
  uint64_t shape[2] = {6, 10};
  rc = ts_import_f32(im, "w", 2, shape, QC_F32, v);
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static void setup(void) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "starting qinsd");
}

static void teardown(void) {
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  int clean = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  ts_dir_remove(&D, !clean);
  if (!clean) fini_failed("qinsd did not exit 0 (status 0x%x)", st);
}

/* Runs `qinsctl ARGS` (stderr folded in); returns the exit status, *out the output (malloc'd). */
static int qinsctl(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int qinsctl(char **out, const char *fmt, ...) {
  char args[1024], b[256], cmd[1400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(args, sizeof args, fmt, ap);
  va_end(ap);
  snprintf(cmd, sizeof cmd, "%s %s 2>&1", ts_build_path("qinsctl", b, sizeof b), args);
  FILE *p = popen(cmd, "r");
  cr_assert(p);
  size_t cap = 1 << 16, len = 0, n;
  char *buf = malloc(cap);
  while ((n = fread(buf + len, 1, cap - 1 - len, p)) > 0) len += n;
  buf[len] = 0;
  int st = pclose(p);
  *out = buf;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

TestSuite(client_qinsctl, .init = setup, .fini = teardown, .timeout = 60);

Test(client_qinsctl, ping_and_stats) {
  char *out;
  cr_expect_eq(qinsctl(&out, "ping --socket %s", D.sock), 0, "%s", out);
  cr_expect(strstr(out, "pong from qinsd") != NULL, "%s", out);
  free(out);
  setenv("QINS_SOCKET", D.sock, 1); /* the environment works as well as --socket */
  cr_expect_eq(qinsctl(&out, "--json ping"), 0, "%s", out);
  cr_expect(strstr(out, "\"pong\": true") != NULL, "%s", out);
  free(out);
  unsetenv("QINS_SOCKET");
  cr_expect_eq(qinsctl(&out, "stats --socket %s", D.sock), 0, "%s", out);
  cr_expect(strstr(out, "requests.ping ") != NULL && strstr(out, "bytes_served ") != NULL, "%s",
            out);
  free(out);
  cr_expect_eq(qinsctl(&out, "--json stats --socket %s", D.sock), 0, "%s", out);
  cr_expect(out[0] == '{' && strstr(out, "\"requests\":{") != NULL, "%s", out);
  free(out);
}

Test(client_qinsctl, failures_and_usage) {
  char *out;
  cr_expect_eq(qinsctl(&out, "ping --socket %s/nothing", D.dir), 1, "%s", out);
  cr_expect(strstr(out, "cannot reach qinsd") != NULL, "%s", out);
  free(out);
  unsetenv("QINS_SOCKET");
  cr_expect_eq(qinsctl(&out, "ping"), 2, "no socket is a usage error: %s", out);
  free(out);
  cr_expect_eq(qinsctl(&out, "get m/nope --socket %s", D.sock), 1, "%s", out);
  cr_expect(strstr(out, "NO_TENSOR") != NULL, "the server's message: %s", out);
  free(out);
  cr_expect_eq(qinsctl(&out, "get m/w --slice 0:7 --socket %s", D.sock), 1, "%s", out);
  cr_expect(strstr(out, "BAD_SLICE") != NULL, "%s", out);
  free(out);
  cr_expect_eq(qinsctl(&out, "get m/w --slice 0:2:1 --socket %s", D.sock), 2, "%s", out);
  free(out);
  cr_expect_eq(qinsctl(&out, "get w --socket %s", D.sock), 2, "%s", out);
  free(out);
  cr_expect_eq(qinsctl(&out, "get m/w --dtype f64 --socket %s", D.sock), 2, "%s", out);
  free(out);
}

/* A slice printed: row 2, columns 7..9 (negative start). */
Test(client_qinsctl, get_prints_a_slice) {
  char *out;
  cr_assert_eq(qinsctl(&out, "get m/w --slice 2,-3: --socket %s", D.sock), 0, "%s", out);
  cr_expect(strstr(out, "m/w shape [1, 3] dtype f32, 3 values") != NULL, "%s", out);
  const char *p = strchr(out, '\n');
  cr_assert(p);
  for (int j = 0; j < 3; j++) {
    char *end;
    float v = strtof(p, &end);
    cr_assert_neq(end, p, "value %d in %s", j, out);
    cr_expect_eq(v, ts_value(7, 2 * 10 + 7 + (uint64_t)j), "value %d", j);
    p = end;
  }
  free(out);
}

/* The whole tensor to a .npy: header and exact values. */
Test(client_qinsctl, get_writes_npy) {
  char path[128], *out;
  snprintf(path, sizeof path, "%s/w.npy", D.dir);
  cr_assert_eq(qinsctl(&out, "get m/w -o %s --socket %s", path, D.sock), 0, "%s", out);
  free(out);
  FILE *f = fopen(path, "rb");
  cr_assert(f);
  unsigned char pre[10];
  cr_assert_eq(fread(pre, 1, 10, f), 10);
  cr_expect(memcmp(pre, "\x93NUMPY\x01\x00", 8) == 0);
  size_t hl = pre[8] | (size_t)pre[9] << 8;
  cr_expect_eq((10 + hl) % 64, 0, "header padded to 64");
  char hdr[512] = {0};
  cr_assert_lt(hl, sizeof hdr);
  cr_assert_eq(fread(hdr, 1, hl, f), hl);
  cr_expect(strstr(hdr, "'descr': '<f4'") && strstr(hdr, "'shape': (6, 10)") &&
                strstr(hdr, "'fortran_order': False"),
            "%s", hdr);
  float v[61];
  cr_assert_eq(fread(v, 4, 61, f), 60, "exactly 60 values");
  fclose(f);
  for (int i = 0; i < 60; i++) cr_expect_eq(v[i], ts_value(7, (uint64_t)i), "value %d", i);
}
