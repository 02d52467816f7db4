/* SPDX-License-Identifier: MIT */
/*
 * qt.h — test support for the store and importer tests (qt_): run a built binary (or qinsctl on a
 * store) and capture its output, temp dirs, and writers for synthetic safetensors / GGUF / .npy
 * inputs (a growable byte buffer for hand-built files).
 *
 * Invariant: qt_run forks; a process that has an LMDB env open must not call it (PITFALLS.md).
 * Tests that run qinsctl keep the env out of the test process (they read the store through
 * `qinsctl --json`), or fork their reader child before anything opens the env.
 */
#ifndef QINS_QT_H
#define QINS_QT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

/* Runs argv (argv[0] a path) with extra environment entries ("K=V", NULL-terminated, may be
 * NULL); *out / *err (may be NULL) get its stdout / stderr as malloc'd NUL-terminated strings.
 * Returns the exit status, 128 + signal if it died of one, or -1. */
int qt_run(char *const argv[], char *const env_extra[], char **out, char **err);
/* Runs `qinsctl --store STORE ARGS...` (qinsctl at qt_bin("qinsctl"); ARGS NULL-terminated, at
 * most 20 used); *out / *err (may be NULL) as qt_run. Returns qt_run's status. */
int qt_ctl(const char *store, char **out, char **err, ...);
int qt_vctl(const char *store, char **out, char **err, va_list ap);
/* $QINS_BUILD/name (QINS_BUILD defaults to "build"). */
const char *qt_bin(const char *name, char *buf, size_t cap);
/* $QINS_SHARED (default QINS_SHARED_DIR) / rel. */
const char *qt_shared(const char *rel, char *buf, size_t cap);
/* mkdtemp("/tmp/qins-XXXXXX") into buf (>= 32 bytes); 0 or -1. */
int qt_tmpdir(char *buf);
/* rm -rf dir (without a shell). */
void qt_rmrf(const char *dir);
int qt_write(const char *path, const void *data, size_t len);
/* Reads a whole file (malloc'd, NUL-terminated); *len may be NULL. NULL on failure. */
char *qt_read(const char *path, size_t *len);
/* a then b in a new malloc'd string; frees both (NULL if out of memory). */
char *qt_cat(char *a, char *b);

/* A growable byte buffer for hand-built inputs (start from {0}; p is malloc'd). Appends are
 * host-order (little-endian here); qt_put_gstr writes a GGUF string (u64 length, bytes). */
typedef struct qt_buf {
  uint8_t *p;
  size_t n, cap;
} qt_buf;
void qt_put(qt_buf *b, const void *d, size_t n);
void qt_put_u32(qt_buf *b, uint32_t v);
void qt_put_u64(qt_buf *b, uint64_t v);
void qt_put_gstr(qt_buf *b, const char *s);

/* One tensor for qt_st_write: name, dtype, shape and its bytes. */
typedef struct qt_tensor {
  const char *name;
  qs_st_dtype dtype;
  int ndim;
  uint64_t shape[8];
  const void *data;
  uint64_t nbytes;
} qt_tensor;
/* Writes a valid safetensors file (header by qs_st_header_build). 0 or -1. */
int qt_st_write(const char *path, const qt_tensor *t, size_t n, const char *metadata_json);

/* Entries in named DB db of the LMDB store at dir store, read in a forked child (the calling
 * process never opens the env); -1 when it cannot be read. */
long long qt_db_entries(const char *store, const char *db);
/* An environment (NULL-terminated, for qt_run's env_extra) that preloads the fault shim
 * $QINS_BUILD/tests/fault.so (tests/fault/shim.c) plus extra ("K=V" entries, NULL-terminated, may
 * be NULL). The array is malloc'd; its first two strings are static (one call at a time). */
char **qt_env_preload(const char *const *extra);

/* Writes a safetensors file of nt (1..16) f32 matrices "w0", "w1", ... of rows x cols, Gaussian
 * (scale 0.05) seeded seed + i. 0 or -1. */
int qt_st_write_gauss(const char *path, int nt, uint64_t rows, uint64_t cols, uint64_t seed);

/* Deterministic pseudo-Gaussian values (seeded). */
void qt_fill_gauss(float *x, uint64_t n, uint64_t seed, float scale);

#endif /* QINS_QT_H */
