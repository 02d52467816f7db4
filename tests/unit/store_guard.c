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
#include <sys/wait.h>
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

/* Cuts data.mdb to len bytes. */
static void cut_to(off_t len) { cr_assert_eq(truncate(path, len), 0); }

Test(store_guard, a_truncated_data_mdb_is_refused_at_open_naming_it) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  fill(s);
  qs_close(s);
  struct stat st;
  cr_assert_eq(stat(path, &st), 0);
  /* Short of its last pages: before, a read of them died of SIGBUS. */
  cut_to(st.st_size / 2);
  int rc = qs_open(&s, sdir, QS_OPEN_RDONLY);
  cr_assert_eq(rc, QINS_ECORRUPT, "open of a truncated store gave %d (%s)", rc, qs_error());
  cr_assert(strstr(qs_error(), "data.mdb") && strstr(qs_error(), "truncated"), "%s", qs_error());
  cr_assert_eq(qs_open(&s, sdir, 0), QINS_ECORRUPT, "%s", qs_error()); /* a writer too */
  /* Shorter than LMDB's meta pages, and empty. */
  cut_to(100);
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), QINS_ECORRUPT, "%s", qs_error());
  cr_assert(strstr(qs_error(), "data.mdb is 100 bytes"), "%s", qs_error());
  cut_to(0);
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), QINS_ECORRUPT, "%s", qs_error());
  cr_assert(strstr(qs_error(), "data.mdb is 0 bytes"), "%s", qs_error());
}

Test(store_guard, a_data_mdb_truncated_while_open_fails_the_check) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  fill(s);
  cr_assert_eq(qs_store_check(s), 0, "%s", qs_error());
  struct stat st;
  cr_assert_eq(stat(path, &st), 0);
  cut_to(st.st_size / 2);
  cr_assert_eq(qs_store_check(s), QINS_ECORRUPT, "%s", qs_error());
  cr_assert(strstr(qs_error(), "data.mdb"), "%s", qs_error());
  /* backup refuses it before reading a page (a read past the end would be SIGBUS). */
  char bdir[160];
  snprintf(bdir, sizeof bdir, "%s/bk", dir);
  cr_assert_eq(qs_backup(s, bdir, NULL), QINS_ECORRUPT, "%s", qs_error());
  cr_assert_neq(access(bdir, F_OK), 0, "backup left %s behind", bdir);
  cr_assert_eq(truncate(path, st.st_size), 0); /* LMDB must not see its own pages missing */
  qs_close(s);
}

/* Removing lock.mdb (or replacing it) under an open store: qs_store_check fails, writes are
 * refused naming it, and reads still work. */
static void lock_case(int replace) {
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  fill(s);
  char lp[200];
  snprintf(lp, sizeof lp, "%s/lock.mdb", sdir);
  cr_assert_eq(qs_store_check(s), 0, "%s", qs_error());
  cr_assert_eq(unlink(lp), 0);
  if (replace) cr_assert_eq(qt_write(lp, "x", 1), 0);
  int rc = qs_store_check(s);
  cr_assert_eq(rc, QINS_EIO, "check after %s lock.mdb: %d", replace ? "replacing" : "removing", rc);
  cr_assert(strstr(qs_error(), "lock.mdb was removed or replaced"), "%s", qs_error());
  qs_import *im;
  rc = qs_import_begin(s, "n", NULL, &im);
  cr_assert_eq(rc, QINS_EIO, "an import began without a lock table: %d", rc);
  cr_assert(strstr(qs_error(), "lock.mdb"), "%s", qs_error());
  cr_assert_eq(qs_model_remove(s, "m"), QINS_EIO, "a removal ran without a lock table");
  if (replace) cr_assert_eq(unlink(lp), 0);
  if (!replace) cr_assert_eq(qt_write(lp, "", 0), 0); /* even a new file at that name */
  cr_assert_eq(qs_store_check(s), QINS_EIO, "the loss is sticky until reopened");
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0, "%s", qs_error());
  cr_assert_eq(qs_tensor_get(t, "m", "w32", &ten), 0, "%s", qs_error());
  qs_txn_end(t);
  qs_close(s);
}

Test(store_guard, a_removed_lock_file_is_detected_and_writes_refused) { lock_case(0); }
Test(store_guard, a_replaced_lock_file_is_detected_and_writes_refused) { lock_case(1); }

static mode_t mode_of(const char *p) {
  struct stat st;
  cr_assert_eq(stat(p, &st), 0, "stat %s", p);
  return st.st_mode & 07777;
}

Test(store_guard, store_files_are_private_and_readable_stores_are_flagged) {
  qs_store *s;
  umask(0);
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  fill(s);
  char p[200];
  cr_assert_eq(mode_of(sdir), 0700);
  cr_assert_eq(mode_of(path), 0600);
  snprintf(p, sizeof p, "%s/lock.mdb", sdir);
  cr_assert_eq(mode_of(p), 0600);
  snprintf(p, sizeof p, "%s/writer.lock", sdir);
  cr_assert_eq(mode_of(p), 0600);
  char msg[1024];
  cr_assert_eq(qs_store_warnings(s, msg, sizeof msg), 0, "%s", msg);
  char bdir[160];
  snprintf(bdir, sizeof bdir, "%s/bk", dir);
  cr_assert_eq(qs_backup(s, bdir, NULL), 0, "%s", qs_error());
  snprintf(p, sizeof p, "%s/data.mdb", bdir);
  cr_assert_eq(mode_of(p), 0600, "backup's data.mdb is %o", mode_of(p));
  cr_assert_eq(mode_of(bdir), 0700);
  snprintf(p, sizeof p, "%s/.partial", bdir);
  cr_assert_neq(access(p, F_OK), 0, "backup left .partial");
  qs_close(s);
  /* A store others can read (the directory traversable, the file readable) is flagged. */
  cr_assert_eq(chmod(sdir, 0755), 0);
  cr_assert_eq(chmod(path, 0644), 0);
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_RDONLY), 0, "%s", qs_error());
  unsigned w = qs_store_warnings(s, msg, sizeof msg);
  cr_assert_eq(w, QS_WARN_OTHERS_READ, "warnings %u: %s", w, msg);
  cr_assert(strstr(msg, "other") && strstr(msg, sdir), "%s", msg);
  qs_close(s);
}

Test(store_guard, group_read_stores_get_0640_and_the_group) {
  qs_store *s;
  umask(0);
  qs_open_opts o = {.group_read = 1, .gid = (long)getgid() + 1};
  cr_assert_eq(qs_open_ex(&s, sdir, QS_OPEN_CREATE, &o), 0, "%s", qs_error());
  fill(s);
  cr_assert_eq(mode_of(sdir), 0750);
  cr_assert_eq(mode_of(path), 0640);
  struct stat st;
  cr_assert_eq(stat(path, &st), 0);
  /* As root (or a member of that group) the group is set; otherwise it may stay ours. */
  if (geteuid() == 0) cr_assert_eq(st.st_gid, (gid_t)o.gid);
  char msg[256];
  cr_assert_eq(qs_store_warnings(s, msg, sizeof msg), 0, "%s", msg);
  qs_close(s);
}

/* The store holds no model `name` (a refused import left nothing). */
static void assert_no_model(qs_store *s, const char *name) {
  qs_txn *t;
  qs_model m;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_model_get(t, name, &m), QINS_ENO_MODEL, "model %s exists", name);
  qs_txn_end(t);
}

Test(store_guard, names_are_utf8_without_controls) {
  static const char *const good[] = {"m", "layers.0.attn", "modèle-ü", "权重", "emoji-\xf0\x9f\x98\x80",
                                     "a b"};
  static const struct {
    const char *name, *why;
  } bad[] = {
      {"bad\xff", "not valid UTF-8 (byte 3: 0xff)"},
      {"\xc0\xaf", "not valid UTF-8 (byte 0"},        /* overlong '/' */
      {"\xed\xa0\x80x", "not valid UTF-8 (byte 0"},   /* a surrogate */
      {"cut\xe6\x9d", "not valid UTF-8 (byte 3"},     /* truncated sequence */
      {"\xf4\x90\x80\x80", "not valid UTF-8 (byte 0"}, /* above U+10FFFF */
      {"new\nline", "control character U+000A at byte 3"},
      {"tab\t", "control character U+0009"},
      {"del\x7f", "control character U+007F"},
      {"c1\xc2\x85", "control character U+0085"},
  };
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
    cr_assert_eq(qs_name_check("tensor", good[i], 0), 0, "%s: %s", good[i], qs_error());
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    cr_assert_eq(qs_name_check("tensor", bad[i].name, 0), QINS_ENAME, "case %zu accepted", i);
    cr_assert(strstr(qs_error(), bad[i].why), "case %zu: %s", i, qs_error());
    for (const char *c = qs_error(); *c; c++) /* the message echoes it escaped */
      cr_assert((unsigned char)*c >= 0x20 && (unsigned char)*c < 0x7F, "case %zu: raw byte in %s", i,
                qs_error());
  }
  cr_assert_eq(qs_name_check("model", "a/b", 1), QINS_ENAME);
  cr_assert_eq(qs_name_check("tensor", "a/b", 0), 0);
  /* Where names enter: a model and a tensor name at import, the store unchanged. */
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "bad\xff", NULL, &im), QINS_ENAME);
  cr_assert(strstr(qs_error(), "model name \"bad\\xff\" is not valid UTF-8"), "%s", qs_error());
  cr_assert_eq(qs_import_begin(s, "ok", NULL, &im), 0, "%s", qs_error());
  qs_tensor_desc d = {.name = "x\x01y", .src_dtype = QS_DT_I32, .ndim = 1, .shape = {2}, .codec = QS_RAW};
  cr_assert_eq(qs_import_tensor_begin(im, &d), QINS_ENAME);
  cr_assert(strstr(qs_error(), "tensor name \"x\\x01y\" contains control character U+0001"), "%s",
            qs_error());
  qs_import_abort(im);
  assert_no_model(s, "ok");
  /* Lookups echo what they were asked for escaped (a client's bytes never reach a message raw). */
  qs_txn *t;
  qs_tensor ten;
  cr_assert_eq(qs_txn_begin(s, &t), 0);
  cr_assert_eq(qs_tensor_get(t, "no\xff\n", "x", &ten), QINS_ENO_MODEL);
  cr_assert(strstr(qs_error(), "no model \"no\\xff\\x0a\""), "%s", qs_error());
  qs_txn_end(t);
  qs_close(s);
}

/* A .npy directory whose file name is not UTF-8: the import fails naming it, nothing stored. */
Test(store_guard, npy_file_names_that_are_not_utf8_are_refused) {
  char npy[200], d[160];
  snprintf(d, sizeof d, "%s/npys", dir);
  cr_assert_eq(mkdir(d, 0700), 0);
  /* A valid .npy: magic, version 1.0, header, 2 f32 values. */
  static const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  uint8_t buf[256];
  size_t hl = sizeof hdr - 1, pad = 64 - ((10 + hl + 1) % 64);
  if (pad == 64) pad = 0;
  memcpy(buf, "\x93NUMPY\x01\x00", 8);
  buf[8] = (uint8_t)(hl + pad + 1);
  buf[9] = 0;
  memcpy(buf + 10, hdr, hl);
  memset(buf + 10 + hl, ' ', pad);
  buf[10 + hl + pad] = '\n';
  float v[2] = {1.5f, -2.0f};
  memcpy(buf + 11 + hl + pad, v, 8);
  size_t total = 11 + hl + pad + 8;
  snprintf(npy, sizeof npy, "%s/good.npy", d);
  cr_assert_eq(qt_write(npy, buf, total), 0);
  snprintf(npy, sizeof npy, "%s/bad\xfe.npy", d);
  cr_assert_eq(qt_write(npy, buf, total), 0);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  qs_import_opts o;
  qs_import_opts_init(&o);
  o.model = "n";
  int rc = qs_import_path(s, d, &o, NULL);
  cr_assert_eq(rc, QINS_ENAME, "import of a directory with a non-UTF-8 name: %d (%s)", rc, qs_error());
  cr_assert(strstr(qs_error(), "bad\\xfe"), "%s", qs_error());
  assert_no_model(s, "n");
  qs_close(s);
}

/* qinsd's case: a reader process keeps the store open, lock.mdb is removed, and a writer then
 * opens the store (LMDB creates a new lock.mdb it alone uses): the writer refuses to write while
 * that reader runs, and writes once it is gone. The reader is forked before this process opens
 * anything (no fork with an env open). */
Test(store_guard, a_writer_refuses_while_readers_use_a_removed_lock_file) {
  int go[2], done[2];
  cr_assert_eq(pipe(go), 0);
  cr_assert_eq(pipe(done), 0);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  fill(s);
  qs_close(s);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    close(go[0]);
    close(done[1]);
    qs_store *r;
    qs_txn *t;
    qs_tensor ten;
    int ok = qs_open(&r, sdir, QS_OPEN_RDONLY) == 0 && qs_txn_begin(r, &t) == 0 &&
             qs_tensor_get(t, "m", "w32", &ten) == 0;
    if (ok) qs_txn_end(t);
    char c = ok ? 'y' : 'n';
    if (write(go[1], &c, 1) != 1) _exit(2);
    if (read(done[0], &c, 1) < 0) _exit(2); /* until the parent closes its end */
    qs_close(r);
    _exit(0);
  }
  close(go[1]);
  close(done[0]);
  char c = 0;
  cr_assert_eq(read(go[0], &c, 1), 1);
  cr_assert_eq(c, 'y', "the reader could not open the store");
  char lp[200];
  snprintf(lp, sizeof lp, "%s/lock.mdb", sdir);
  cr_assert_eq(unlink(lp), 0);
  cr_assert_eq(qs_open(&s, sdir, 0), 0, "%s", qs_error());
  qs_import *im;
  int rc = qs_import_begin(s, "n", NULL, &im);
  cr_assert_eq(rc, QINS_EIO, "a writer began beside a reader of a removed lock.mdb: %d", rc);
  cr_assert(strstr(qs_error(), "lock.mdb that was removed or replaced"), "%s", qs_error());
  cr_assert_eq(qs_model_remove(s, "m"), QINS_EIO);
  close(done[1]); /* the reader closes and exits */
  int ws;
  cr_assert_eq(waitpid(pid, &ws, 0), pid);
  cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  cr_assert_eq(qs_model_remove(s, "m"), 0, "with the reader gone: %s", qs_error());
  qs_close(s);
}

/* Model and tensor records carry checksums: every single-bit flip of the model record's header
 * and name, and of each record of three same-shape tensors (a flipped tensor index would point at
 * a twin's chunks, valid CRCs and all), reads as an error or as the right numbers. Lookups are not
 * cached ($QINS_VERIFY=always), so every read decodes the records from the map. */
Test(store_guard, flipped_record_bits_give_errors_never_a_twin_s_numbers) {
  setenv("QINS_VERIFY", "always", 1);
  qs_store *s;
  cr_assert_eq(qs_open(&s, sdir, QS_OPEN_CREATE), 0, "%s", qs_error());
  static const char *const twins[] = {"tw0", "tw1", "tw2", "tw3"};
  float v[4][8 * 16];
  qs_import *im;
  cr_assert_eq(qs_import_begin(s, "m", NULL, &im), 0, "%s", qs_error());
  for (int k = 0; k < 4; k++) {
    qt_fill_gauss(v[k], 8 * 16, 500 + (uint64_t)k, 1.0f);
    qs_tensor_desc d = {.name = twins[k], .src_dtype = QS_DT_F32, .ndim = 2, .shape = {8, 16},
                        .codec = QC_F32};
    qc_params p = {.codec = QC_F32};
    d.params = &p;
    cr_assert_eq(qs_import_tensor_begin(im, &d), 0, "%s", qs_error());
    cr_assert_eq(qs_import_tensor_rows(im, v[k], 8, NULL), 0, "%s", qs_error());
    cr_assert_eq(qs_import_tensor_end(im, NULL), 0, "%s", qs_error());
  }
  cr_assert_eq(qs_import_commit(im), 0, "%s", qs_error());
  size_t len;
  uint8_t *all = (uint8_t *)qt_read(path, &len);
  cr_assert(all);
  size_t at[32], size[32], nr = 0; /* live records, and stale copies in free pages */
  for (const uint8_t *q = all; nr < 31 && (q = memmem(q, len - (size_t)(q - all), "QSTN", 4)); q++) {
    size_t nl = (size_t)(q[10] | q[11] << 8);
    at[nr] = (size_t)(q - all);
    size[nr++] = 176 + nl + 1;
  }
  for (const uint8_t *q = all; nr < 32 && (q = memmem(q, len - (size_t)(q - all), "QSMD", 4)); q++) {
    at[nr] = (size_t)(q - all);
    size[nr++] = 64 + (size_t)(q[6] | q[7] << 8) + 1;
  }
  free(all);
  cr_assert_geq(nr, 5, "found %zu records", nr);
  int fd = open(path, O_RDWR);
  cr_assert_geq(fd, 0);
  int errors = 0;
  for (size_t r = 0; r < nr; r++)
    for (size_t off = at[r]; off < at[r] + size[r]; off++)
      for (int bit = 0; bit < 8; bit++) {
        flip(fd, off, (uint8_t)(1u << bit));
        qs_txn *t;
        cr_assert_eq(qs_txn_begin(s, &t), 0, "%s", qs_error());
        for (int k = 0; k < 4; k++) {
          qs_tensor ten;
          float out[8 * 16];
          int rc = qs_tensor_get(t, "m", twins[k], &ten);
          if (!rc) rc = qs_tensor_read(t, &ten, NULL, QC_DT_F32, 0, 8 * 16, out);
          if (rc) {
            cr_assert(rc == QINS_ECHECKSUM || rc == QINS_ECORRUPT,
                      "record at %zu, byte %zu bit %d: %s: error %d (%s)", at[r], off - at[r], bit,
                      twins[k], rc, qs_error());
            errors++;
          } else {
            cr_assert(ten.n_elem == 8 * 16 && !memcmp(out, v[k], sizeof out),
                      "record at %zu, byte %zu bit %d: %s read other numbers without an error",
                      at[r], off - at[r], bit, twins[k]);
          }
        }
        qs_txn_end(t);
        flip(fd, off, (uint8_t)(1u << bit));
      }
  close(fd);
  cr_assert_gt(errors, 1000, "%d errors", errors);
  qs_close(s);
}
