/* SPDX-License-Identifier: MIT */
/*
 * report_hooks.c — Criterion report hooks of the integration binary: failures recorded in .fini
 * (fini_check.h) become failed tests. Before the tests, a temporary file is named in
 * $QINS_FINI_FAILURES (the test processes inherit it); after them, each of its lines is printed and
 * counted as a failure (a test that passed its body but whose .fini failed).
 */
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static char fini_path[64];

ReportHook(PRE_ALL)(struct criterion_test_set *set) {
  (void)set;
  snprintf(fini_path, sizeof fini_path, "/tmp/qins-fini-%d", (int)getpid());
  unlink(fini_path);
  setenv("QINS_FINI_FAILURES", fini_path, 1);
}

ReportHook(POST_ALL)(struct criterion_global_stats *stats) {
  FILE *f = fini_path[0] ? fopen(fini_path, "r") : NULL;
  if (!f) return;
  char line[640];
  while (fgets(line, sizeof line, f)) {
    fprintf(stderr, "[FAIL] in .fini: %s", line);
    stats->tests_failed++;
    if (stats->tests_passed) stats->tests_passed--;
  }
  fclose(f);
  unlink(fini_path);
}
