/* SPDX-License-Identifier: MIT */
/*
 * backup.c — qs_backup: a consistent, compacted copy of the store (store.h describes what the
 * copy holds and promises).
 *
 * Invariants.
 *  - The copy is one read snapshot (mdb_env_copy2 under a pinned read txn); backup never takes
 *    the writer lock of the source.
 *  - On failure nothing is left in the destination (and a directory it created is removed).
 */
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store_int.h"

/* ---------------------------------------------------------------------------------------------
 * Backup (store.h: qs_backup) */

/* mdb_env_copy2(MDB_CP_COMPACT) of s into dir. A read txn is held meanwhile: it counts as active,
 * so this process never resizes the map under the copy, and its begin adopts a map another
 * process grew (MDB_MAP_RESIZED; the copy's own txn would fail with it: then retry). */
static int qs__env_copy(qs_store *s, const char *dir) {
  for (int tries = 0;; tries++) {
    MDB_txn *pin;
    int rc = qs__begin(s, MDB_RDONLY, &pin);
    if (rc) return rc;
    rc = mdb_env_copy2(s->env, dir, MDB_CP_COMPACT);
    qs__abort(s, pin);
    if (rc != MDB_MAP_RESIZED || tries >= 16) return rc;
  }
}

static int qs__backup_fail(const char *dir, int rc, const char *what) {
  if (rc == ENOSPC || rc == EDQUOT || rc == EFBIG)
    return qs__fail(QINS_ESTORE_FULL, "backup %s: %s: %s", dir, what,
                    rc == EFBIG ? "file size limit reached" : "no space left on device");
  if (rc == EACCES || rc == EPERM || rc == EROFS || rc == ENOENT)
    return qs__fail(-rc, "backup %s: %s: %s", dir, what, strerror(rc));
  return qs__fail(QINS_EIO, "backup %s: %s: %s", dir, what, mdb_strerror(rc));
}

static void qs__fsync_path(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
}

int qs_backup(qs_store *s, const char *dir, qs_backup_info *out) {
  qs_backup_info bi;
  memset(&bi, 0, sizeof bi);
  if (out) *out = bi;
  char path[4096], tmp[4096], f[4200];
  struct stat st;
  int made = 0;
  if (strlen(dir) > sizeof path - 64) return qs__fail(QINS_ENAME, "backup %.80s...: path too long", dir);
  if (mkdir(dir, 0775) == 0) made = 1;
  else if (errno != EEXIST) return qs__backup_fail(dir, errno, "creating the directory");
  else if (stat(dir, &st) || !S_ISDIR(st.st_mode))
    return qs__fail(-ENOTDIR, "backup %s: exists and is not a directory", dir);
  snprintf(path, sizeof path, "%s/data.mdb", dir);
  snprintf(tmp, sizeof tmp, "%s/.compact", dir);
  if (lstat(path, &st) == 0)
    return qs__fail(-EEXIST, "backup %s: already holds a store (data.mdb): give a new or empty "
                             "directory", dir);
  snprintf(f, sizeof f, "%s/data.mdb", s->dir);
  if (stat(f, &st) == 0) bi.source_file_bytes = (uint64_t)st.st_size;
  int rc = qs__env_copy(s, dir);
  if (rc) {
    rc = qs__backup_fail(dir, rc, "copying the store");
    goto fail;
  }
  /* Reclaim what the snapshot had staged, then compact again (the reclaim leaves free pages). */
  qs_store *b;
  if ((rc = qs_open(&b, dir, QS_OPEN_RDONLY))) goto fail;
  qs_store_info info;
  rc = qs_store_info_get(b, &info);
  qs_close(b);
  if (rc) goto fail;
  bi.staging_dropped = info.n_staging;
  bi.n_models = info.n_models;
  if (info.n_staging) {
    if ((rc = qs_open(&b, dir, 0))) goto fail; /* the writer's open reclaims staged ids */
    rc = qs_store_info_get(b, &info);
    if (rc == 0 && info.n_staging)
      rc = qs__fail(QINS_EINTERNAL, "backup %s: staged ids were not reclaimed", dir);
    if (rc == 0 && mkdir(tmp, 0700) != 0) rc = qs__backup_fail(dir, errno, "creating .compact");
    if (rc == 0 && (rc = qs__env_copy(b, tmp)) != 0)
      rc = qs__backup_fail(dir, rc, "compacting the copy");
    qs_close(b);
    if (rc) goto fail;
    snprintf(f, sizeof f, "%s/data.mdb", tmp);
    if (rename(f, path) != 0) {
      rc = qs__backup_fail(dir, errno, "replacing data.mdb with its compacted copy");
      goto fail;
    }
    rmdir(tmp);
  }
  snprintf(f, sizeof f, "%s/lock.mdb", dir);
  unlink(f);
  snprintf(f, sizeof f, "%s/writer.lock", dir);
  unlink(f);
  qs__fsync_path(path);
  qs__fsync_path(dir);
  if (stat(path, &st) == 0) bi.file_bytes = (uint64_t)st.st_size;
  if (out) *out = bi;
  return 0;
fail: {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", qs__errbuf);
  const char *leftovers[] = {"data.mdb", "lock.mdb", "writer.lock", ".compact/data.mdb",
                             ".compact/lock.mdb"};
  for (size_t i = 0; i < sizeof leftovers / sizeof leftovers[0]; i++) {
    snprintf(f, sizeof f, "%s/%s", dir, leftovers[i]);
    unlink(f);
  }
  rmdir(tmp);
  if (made) rmdir(dir);
  qs__fail(rc, "%s", msg);
  return rc;
}
}
