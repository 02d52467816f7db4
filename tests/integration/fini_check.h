/* SPDX-License-Identifier: MIT */
/*
 * fini_check.h — failures found in a test's .fini (a daemon that did not exit 0 when stopped: a
 * crash at exit, e.g. glibc aborting on a corrupted heap). Criterion 2.4 records an assertion
 * failed in .fini (even an abort there) but still reports the test as passed, so .fini code calls
 * fini_failed instead: it appends "suite/test: message" to the file named by $QINS_FINI_FAILURES,
 * which report_hooks.c sets before the tests start and reads after they all ran, counting each line
 * as a failed test (the exit status and the Synthesis line say so).
 */
#ifndef QINS_FINI_CHECK_H
#define QINS_FINI_CHECK_H

#include <criterion/criterion.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((format(printf, 1, 2), unused)) static void fini_failed(const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  const char *suite = criterion_current_suite ? criterion_current_suite->name : "?";
  const char *test = criterion_current_test ? criterion_current_test->name : "?";
  fprintf(stderr, "[FAIL] %s::%s (in .fini): %s\n", suite, test, msg);
  const char *path = getenv("QINS_FINI_FAILURES");
  FILE *f = path && *path ? fopen(path, "a") : NULL;
  if (f) {
    fprintf(f, "%s/%s: %s\n", suite, test, msg);
    fclose(f);
  }
}

#endif /* QINS_FINI_CHECK_H */
