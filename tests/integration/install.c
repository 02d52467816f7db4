/* SPDX-License-Identifier: MIT */
/*
 * install.c — `make install` / `make uninstall` (issue 15) through tests/install/install_check.sh:
 * a temporary PREFIX gets the programs, qins.h, libqins.so.MAJOR.MINOR (SONAME libqins.so.MAJOR,
 * symlinks, only qins_* exported) and libqins.a, qins.pc, the man pages, the systemd units, the
 * example config, bash completion and the Python module; a separate program built with
 * `pkg-config --cflags --libs qins` alone talks to the installed qinsd; uninstall leaves nothing.
 * The script names each failed check; this test runs it and shows its output on failure. It runs
 * `make install` from the working directory (make test runs at the repository root).
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qt.h"

#define SCRIPT "tests/install/install_check.sh"

Test(install, prefix_install_pkg_config_program_and_uninstall, .timeout = 600) {
  cr_assert_eq(access(SCRIPT, R_OK), 0, "%s not found: run from the repository root", SCRIPT);
  char build[4096];
  const char *b = getenv("QINS_BUILD");
  cr_assert(realpath(b && *b ? b : "build", build), "QINS_BUILD: no such directory");
  char *argv[] = {"/bin/sh", SCRIPT, build, NULL}, *out, *err;
  int rc = qt_run(argv, NULL, &out, &err);
  cr_assert_eq(rc, 0, "%s exited %d\n%s%s", SCRIPT, rc, out, err);
  cr_assert(strstr(out, "install_check: all passed\n"), "%s%s", out, err);
  free(out);
  free(err);
}
