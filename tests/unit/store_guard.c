/* SPDX-License-Identifier: MIT */
/*
 * store_guard.c — what the store promises under damage and misuse (issue 13, store side):
 *  - bytes flipped in data.mdb after a process has read everything once give CHECKSUM or
 *    CORRUPT or the right numbers, never other numbers (qs_tensor_read and qs_tensor_span);
 *  - a truncated data.mdb is refused at qs_open naming the file, never a SIGBUS;
 *  - lock.mdb removed or replaced under an open store is detected (qs_store_check), and writes
 *    are refused;
 *  - names entering the store are UTF-8 without NUL or control characters (qs_name_valid);
 *  - store files are created 0600/0640 and a store directory others can read is flagged.
 * Each Criterion test runs in its own process and opens the env at most once.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qins.h"
#include "qt.h"
#include "store.h"

static char dir[64], sdir[128], path[192];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(sdir, sizeof sdir, "%s/store", dir);
  snprintf(path, sizeof path, "%s/data.mdb", sdir);
}
static void teardown(void) { qt_rmrf(dir); }
TestSuite(store_guard, .init = setup, .fini = teardown, .timeout = 120);

/* Imports a model "m" holding f32 (zero-copy), f16, qins8 and raw i32 tensors, each of a few
 * chunks or one; returns the f32 values each was given (raw: the i32 values as floats). */
typedef struct gtensor {
  const char *name;
  int codec;
  uint64_t shape[2];
} gtensor;
static const gtensor G[] = {
    {"w32", QC_F32, {1500, 1024}}, /* two chunks */
    {"w16", QC_F16, {64, 300}},
    {"q8", QC_QINS8, {700, 2048}},
    {"small", QC_QINS8, {4, 64}},
    {"ints", QS_RAW, {50, 40}},
};
#define NG (sizeof G / sizeof G[0])

static void fill(qs_store *s) {
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0, "%s", qs_error());
  for (size_t i = 0; i < NG; i++) {
    uint64_t rl = G[i].shape[1], nr = G[i].shape[0], n = rl * nr;
    qs_tensor_desc d = {0};
    d.name = G[i].name;
    d.ndim = 2;
    d.shape[0] = nr;
    d.shape[1] = rl;
    d.codec = G[i].codec;
    qc_params p;
    memset(&p, 0, sizeof p);
    void *data;
    if (G[i].codec == QS_RAW) {
      int32_t *v = malloc(n * 4);
      for (uint64_t k = 0; k < n; k++) v[k] = (int32_t)(k * 2654435761u);
      d.src_dtype = QS_DT_I32;
      data = v;
    } else {
      float *x = malloc(n * sizeof *x + 4);
      qt_fill_gauss(x, n, 100 + i, 0.2f);
      p.codec = (qc_codec)G[i].codec;
      cr_assert_eq(qc_fit_tensor((qc_codec)G[i].codec, rl, nr, x, NULL, &p, NULL), 0);
      d.src_dtype = QS_DT_F32;
      d.params = &p;
      data = x;
    }
    cr_assert_eq(qs_import_tensor_begin(im, &d), 0, "%s", qs_error());
    cr_assert_eq(qs_import_tensor_rows(im, data, nr, NULL), 0, "%s", qs_error());
    cr_assert_eq(qs_import_tensor_end(im, NULL), 0, "%s", qs_error());
    free(data);
  }
  cr_assert_eq(qs_import_commit(im), 0, "%s", qs_error());
}

/* Output of every tensor: f32 for codecs (f16 read as f16 too, zero-copy), raw bytes for ints. */
typedef struct outs {
  uint8_t *b[NG + 1];
  size_t n[NG + 1];
} outs;

/* Reads everything in one fresh txn into o (allocated on first use); returns the first error or
 * 0. Each read goes through qs_tensor_span where it applies, else qs_tensor_read; f16 is read
 * both ways (slot NG holds its f16 span). */
static int read_all(qs_store *s, outs *o, int alloc) {
  qs_txn *t;
  int rc = qs_txn_begin(s, &t);
  if (rc) return rc;
  for (size_t i = 0; i <= NG && !rc; i++) {
    const gtensor *g = &G[i < NG ? i : 1];
    qs_tensor ten;
    if ((rc = qs_tensor_get(t, "m", g->name, &ten))) break;
    qc_dtype dt = i == NG ? QC_DT_F16 : QC_DT_F32;
    size_t esz = g->codec == QS_RAW ? 4 : i == NG ? 2 : 4;
    if (alloc) {
      o->n[i] = ten.n_elem * esz;
      o->b[i] = malloc(o->n[i]);
    }
    uint64_t pos = 0;
    while (pos < ten.n_elem) {
      const void *sp;
      uint64_t n;
      rc = qs_tensor_span(t, &ten, NULL, dt, pos, ten.n_elem, &sp, &n);
      if (rc < 0) break;
      if (rc == 1) {
        memcpy(o->b[i] + pos * esz, sp, n * esz);
        pos += n;
        rc = 0;
        continue;
      }
      /* Decoded: in pieces of 1000 elements (several reads per chunk, as a stream does). */
      n = ten.n_elem - pos < 1000 ? ten.n_elem - pos : 1000;
      if ((rc = qs_tensor_read(t, &ten, NULL, dt, pos, pos + n, o->b[i] + pos * esz))) break;
      pos += n;
    }
  }
  qs_txn_end(t);
  return rc;
}

/* Offsets of the chunk records in the file: "QSCK", CRC, u64 payload size, payload. */
static size_t find_chunks(const uint8_t *all, size_t len, size_t *at, size_t *size, size_t cap) {
  size_t n = 0;
  for (const uint8_t *p = all; n < cap && (p = memmem(p, len - (size_t)(p - all), "QSCK", 4)); p++) {
    size_t off = (size_t)(p - all);
    if (off + 16 > len) break;
    uint64_t sz = 0;
    for (int i = 7; i >= 0; i--) sz = (sz << 8) | p[8 + i];
    if (sz == 0 || off + 16 + sz > len) continue;
    at[n] = off;
    size[n++] = 16 + (size_t)sz;
  }
  return n;
}

static void flip(int fd, size_t off, uint8_t mask) {
  uint8_t b;
  cr_assert_eq(pread(fd, &b, 1, (off_t)off), 1);
  b ^= mask;
  cr_assert_eq(pwrite(fd, &b, 1, (off_t)off), 1);
}

Test(store_guard, bits_flipped_after_reading_give_errors_never_other_numbers) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  fill(s);
  outs want = {0}, got = {0};
  cr_assert_eq(read_all(s, &want, 1), 0, "%s", qs_error());
  cr_assert_eq(read_all(s, &got, 1), 0, "%s", qs_error()); /* every cache warm now */
  size_t len;
  uint8_t *all = (uint8_t *)qt_read(path, &len);
  cr_assert(all);
  size_t at[64], size[64];
  size_t nc = find_chunks(all, len, at, size, 64);
  free(all);
  cr_assert_geq(nc, 6, "found %zu chunk records", nc);
  int fd = open(path, O_RDWR);
  cr_assert_geq(fd, 0);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  int errors = 0, right = 0;
  for (int k = 0; k < 300; k++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    size_t c = (size_t)(x >> 33) % nc;
    size_t off = at[c] + (size_t)((x >> 7) % size[c]);
    uint8_t mask = (uint8_t)(1u << ((x >> 3) & 7));
    flip(fd, off, mask);
    int rc = read_all(s, &got, 0);
    flip(fd, off, mask);
    if (rc) {
      cr_assert(rc == QINS_ECHECKSUM || rc == QINS_ECORRUPT,
                "flip %d at %zu: error %d (%s), only CHECKSUM or CORRUPT expected", k, off, rc,
                qs_error());
      errors++;
      continue;
    }
    for (size_t i = 0; i <= NG; i++)
      cr_assert(!memcmp(got.b[i], want.b[i], want.n[i]),
                "flip %d at %zu (chunk record at %zu): tensor %s read other numbers without an "
                "error", k, off, at[c], G[i < NG ? i : 1].name);
    right++;
  }
  close(fd);
  cr_assert_gt(errors, 250, "%d of 300 flips were errors (%d read right)", errors, right);
  /* Unflipped again: everything reads as before. */
  cr_assert_eq(read_all(s, &got, 0), 0, "%s", qs_error());
  for (size_t i = 0; i <= NG; i++) cr_assert(!memcmp(got.b[i], want.b[i], want.n[i]));
  for (size_t i = 0; i <= NG; i++) {
    free(want.b[i]);
    free(got.b[i]);
  }
  qs_close(s);
}
