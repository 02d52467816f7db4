/* SPDX-License-Identifier: MIT */
/*
 * import_test.h — the fixture the importer unit tests share (tests/unit/import_formats.c,
 * import_ecosystem.c): a temporary directory holding a fresh store, an import call with the
 * options the tests vary, and a whole-tensor read back as f32. Header-only (static functions):
 * each test file has its own copy of the fixture state.
 */
#ifndef QINS_IMPORT_TEST_H
#define QINS_IMPORT_TEST_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

#include "qins.h"
#include "qt.h"
#include "store.h"

static char dir[64], sdir[128]; /* the temp dir, and the store in it */
static qs_store *st;

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(sdir, sizeof sdir, "%s/store", dir);
  cr_assert_eq(qs_open(&st, sdir, QS_OPEN_CREATE), 0);
}
static void teardown(void) {
  qs_close(st);
  qt_rmrf(dir);
}

/* Imports path as model (NULL: the default name) with codec (-1: the policy) and requant. */
static int import(const char *path, const char *model, int codec, int requant) {
  qs_import_opts o;
  qs_import_opts_init(&o);
  o.model = model;
  o.codec = codec;
  o.allow_requant = requant;
  return qs_import_path(st, path, &o, NULL);
}

/* model/name's record into *out and its values as f32 (malloc'd). */
static float *read_tensor(const char *model, const char *name, qs_tensor *out) {
  qs_txn *t;
  cr_assert_eq(qs_txn_begin(st, &t), 0);
  cr_assert_eq(qs_tensor_get(t, model, name, out), 0, "%s", qs_error());
  float *x = malloc(out->n_elem * 4 + 4);
  cr_assert_eq(qs_tensor_read(t, out, NULL, QC_DT_F32, 0, out->n_elem, x), 0, "%s", qs_error());
  qs_txn_end(t);
  return x;
}

#endif /* QINS_IMPORT_TEST_H */
