/* SPDX-License-Identifier: MIT */
/*
 * backup.c — qs_backup: a consistent, compacted copy of the store (store.h describes what the
 * copy holds and promises).
 *
 * Invariants.
 *  - The copy is one read snapshot (mdb_env_copy2 under a pinned read txn); backup never takes
 *    the writer lock of the source.
 *  - The copy is built in DIR/.partial; DIR/data.mdb appears by one rename, complete and synced.
 *    On failure nothing is left in the destination (a directory it created is removed); a
 *    killed backup leaves at most DIR/.partial, which the next backup into DIR clears.
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

/* Removes the work directory dir/.partial and what it may hold (also a killed backup's). */
static void qs__backup_clean(const char *part) {
  static const char *const files[] = {"data.mdb", "lock.mdb", "writer.lock", ".compact/data.mdb",
                                      ".compact/lock.mdb", ".compact/writer.lock"};
  char f[4200];
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(f, sizeof f, "%s/%s", part, files[i]);
    unlink(f);
  }
  snprintf(f, sizeof f, "%s/.compact", part);
  rmdir(f);
  rmdir(part);
}

int qs_backup(qs_store *s, const char *dir, qs_backup_info *out) {
  qs_backup_info bi;
  memset(&bi, 0, sizeof bi);
  if (out) *out = bi;
  char path[4096], part[4096], tmp[4200], f[4300];
  struct stat st;
  int made = 0;
  if (strlen(dir) > sizeof path - 64) return qs__fail(QINS_ENAME, "backup %.80s...: path too long", dir);
  int rc = qs_store_check(s); /* the source is whole (not truncated) and its lock table in use */
  if (rc) return rc;
  if (mkdir(dir, 0700) == 0) made = 1;
  else if (errno != EEXIST) return qs__backup_fail(dir, errno, "creating the directory");
  else if (stat(dir, &st) || !S_ISDIR(st.st_mode))
    return qs__fail(-ENOTDIR, "backup %s: exists and is not a directory", dir);
  snprintf(path, sizeof path, "%s/data.mdb", dir);
  if (lstat(path, &st) == 0)
    return qs__fail(-EEXIST, "backup %s: already holds a store (data.mdb): give a new or empty "
                             "directory", dir);
  /* Everything is built in dir/.partial and data.mdb appears by one rename once complete and
   * synced: a backup that fails or is killed never leaves a data.mdb behind. */
  snprintf(part, sizeof part, "%s/.partial", dir);
  snprintf(tmp, sizeof tmp, "%s/.compact", part);
  qs__backup_clean(part);
  if (mkdir(part, 0700) != 0) {
    rc = qs__backup_fail(dir, errno, "creating .partial");
    goto fail;
  }
  snprintf(f, sizeof f, "%s/data.mdb", s->dir);
  if (stat(f, &st) == 0) bi.source_file_bytes = (uint64_t)st.st_size;
  rc = qs__env_copy(s, part);
  if (rc) {
    rc = qs__backup_fail(dir, rc, "copying the store");
    goto fail;
  }
  /* Reclaim what the snapshot had staged, then compact again (the reclaim leaves free pages). */
  qs_store *b;
  if ((rc = qs_open(&b, part, QS_OPEN_RDONLY))) goto fail;
  qs_store_info info;
  rc = qs_store_info_get(b, &info);
  qs_close(b);
  if (rc) goto fail;
  bi.staging_dropped = info.n_staging;
  bi.n_models = info.n_models;
  char pdata[4200];
  snprintf(pdata, sizeof pdata, "%s/data.mdb", part);
  if (info.n_staging) {
    if ((rc = qs_open(&b, part, 0))) goto fail; /* the writer's open reclaims staged ids */
    rc = qs_store_info_get(b, &info);
    if (rc == 0 && info.n_staging)
      rc = qs__fail(QINS_EINTERNAL, "backup %s: staged ids were not reclaimed", dir);
    if (rc == 0 && mkdir(tmp, 0700) != 0) rc = qs__backup_fail(dir, errno, "creating .compact");
    if (rc == 0 && (rc = qs__env_copy(b, tmp)) != 0)
      rc = qs__backup_fail(dir, rc, "compacting the copy");
    qs_close(b);
    if (rc) goto fail;
    snprintf(f, sizeof f, "%s/data.mdb", tmp);
    if (rename(f, pdata) != 0) {
      rc = qs__backup_fail(dir, errno, "replacing data.mdb with its compacted copy");
      goto fail;
    }
  }
  if (chmod(pdata, s->fmode) != 0) { /* LMDB creates the copy 0666 less the umask */
    rc = qs__backup_fail(dir, errno, "setting data.mdb's mode");
    goto fail;
  }
  qs__fsync_path(pdata);
  if (rename(pdata, path) != 0) {
    rc = qs__backup_fail(dir, errno, "moving the finished copy into place");
    goto fail;
  }
  qs__backup_clean(part);
  qs__fsync_path(dir);
  if (stat(path, &st) == 0) bi.file_bytes = (uint64_t)st.st_size;
  if (out) *out = bi;
  return 0;
fail: {
  char msg[QS__ERRBUF];
  snprintf(msg, sizeof msg, "%s", qs__errbuf);
  qs__backup_clean(part);
  if (made) rmdir(dir);
  qs__fail(rc, "%s", msg);
  return rc;
}
}
