/* SPDX-License-Identifier: MIT */
/*
 * env.c — the store's environment: opening and closing the one LMDB env of a process (qs_open,
 * qs_close), its named databases and meta record, the writer lock (DIR/writer.lock), the error
 * message seam (qs_error, qs__fail, qs__mdb_fail) and environment figures (qs_store_info_get).
 *
 * Invariants.
 *  - One qs_store (one MDB_env) per process, opened MDB_NOTLS; never fork() after qs_open.
 *  - A store opened without QS_OPEN_RDONLY creates its databases if missing and, holding the
 *    writer flock for the moment, reclaims whatever a killed writer left staged (gc.c).
 *  - The writer lock is an flock: it dies with its process, so a killed writer never blocks the
 *    next one; the pid written into the file is for messages only.
 *  - qs_error() is per thread: each failing call sets it before returning the negative code.
 */
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "store_int.h"

#define QS_MAX_READERS 510 /* reader slots: qinsd threads x requests, well above 126 */

/* ---------------------------------------------------------------------------------------------
 * Errors */
_Thread_local char qs__errbuf[QS__ERRBUF];

const char *qs_error(void) { return qs__errbuf; }

int qs__fail(int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(qs__errbuf, sizeof qs__errbuf, fmt, ap);
  va_end(ap);
  return rc;
}

/* Maps an LMDB/errno failure of `what` to a project code with a message. */
int qs__mdb_fail(qs_store *s, int rc, const char *what) {
  if (rc == MDB_MAP_FULL)
    return qs__fail(QINS_ESTORE_FULL, "store %s: %s: the map is full (set QINS_STORE_MAX_MAP "
                                      "higher or free space); nothing was changed",
                    s->dir, what);
  if (rc == ENOSPC || rc == EDQUOT || rc == EFBIG)
    return qs__fail(QINS_ESTORE_FULL, "store %s: %s: %s; nothing was changed", s->dir, what,
                    rc == EFBIG ? "file size limit reached" : "no space left on device");
  if (rc == EIO)
    return qs__fail(QINS_EIO, "store %s: %s: I/O error (LMDB reports a write cut short by a full "
                              "disk this way)",
                    s->dir, what);
  if (rc == MDB_TXN_FULL)
    return qs__fail(QINS_ESTORE_FULL, "store %s: %s: transaction too large", s->dir, what);
  if (rc == ENOMEM) return qs__fail(QINS_ENOMEM, "store %s: %s: out of memory", s->dir, what);
  if (rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND || rc == MDB_INVALID)
    return qs__fail(QINS_ECORRUPT, "store %s: %s: %s", s->dir, what, mdb_strerror(rc));
  if (rc == MDB_VERSION_MISMATCH)
    return qs__fail(QINS_EVERSION, "store %s: %s: %s", s->dir, what, mdb_strerror(rc));
  return qs__fail(QINS_EIO, "store %s: %s: %s", s->dir, what, mdb_strerror(rc));
}

/* ---------------------------------------------------------------------------------------------
 * Writer lock */
/* Gives a file of the store the group asked for at open (if it is ours and has another). */
static void qs__own(qs_store *s, int fd) {
  struct stat st;
  if (s->gid >= 0 && fstat(fd, &st) == 0 && st.st_uid == geteuid() && st.st_gid != (gid_t)s->gid &&
      fchown(fd, (uid_t)-1, (gid_t)s->gid) != 0) {
    /* the group is a convenience: the file stays private to its owner */
  }
}

int qs__lock(qs_store *s) {
  if (s->rdonly) return qs__fail(QINS_EINVALID, "store %s is open read-only", s->dir);
  if (s->locked) return qs__write_check(s);
  if (s->lock_fd < 0) {
    char path[4096];
    snprintf(path, sizeof path, "%s/writer.lock", s->dir);
    s->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, s->fmode);
    if (s->lock_fd < 0)
      return qs__fail(-errno, "store %s: cannot open writer.lock: %s", s->dir, strerror(errno));
    qs__own(s, s->lock_fd);
  }
  if (flock(s->lock_fd, LOCK_EX | LOCK_NB)) {
    if (errno != EWOULDBLOCK)
      return qs__fail(-errno, "store %s: flock writer.lock: %s", s->dir, strerror(errno));
    char pid[32] = "";
    ssize_t n = pread(s->lock_fd, pid, sizeof pid - 1, 0);
    pid[n > 0 ? n : 0] = 0;
    pid[strcspn(pid, "\n")] = 0;
    return qs__fail(QINS_ELOCKED, "store %s is locked by another writer (pid %s)", s->dir,
                    pid[0] ? pid : "?");
  }
  char pid[32];
  int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
  if (ftruncate(s->lock_fd, 0) == 0 && pwrite(s->lock_fd, pid, (size_t)n, 0) < 0) {
    /* the pid is only informative */
  }
  s->locked = 1;
  /* Checked holding the flock: one process probes the shared flocks at a time. */
  int rc = qs__write_check(s);
  if (rc) qs__unlock(s);
  return rc;
}

void qs__unlock(qs_store *s) {
  if (!s->locked) return;
  flock(s->lock_fd, LOCK_UN);
  s->locked = 0;
}

/* ---------------------------------------------------------------------------------------------
 * Open / close */
static int qs__open_dbis(qs_store *s, int create) {
  MDB_txn *txn;
  int rc = qs__begin(s, s->rdonly ? MDB_RDONLY : 0, &txn);
  if (rc) return qs__mdb_fail(s, rc, "opening databases");
  unsigned fl = create ? MDB_CREATE : 0;
  struct { const char *name; MDB_dbi *dbi; } dbs[] = {
      {QS_DB_META, &s->db_meta},       {QS_DB_MODELS, &s->db_models},
      {QS_DB_TENSORS, &s->db_tensors}, {QS_DB_CHUNKS, &s->db_chunks},
      {QS_DB_PARAMS, &s->db_params},   {QS_DB_STAGING, &s->db_staging}};
  for (size_t i = 0; i < sizeof dbs / sizeof dbs[0]; i++) {
    rc = mdb_dbi_open(txn, dbs[i].name, fl, dbs[i].dbi);
    if (rc == MDB_NOTFOUND) {
      qs__abort(s, txn);
      return qs__fail(QINS_EVERSION, "store %s: not a qins store (no \"%s\" database)", s->dir,
                      dbs[i].name);
    }
    if (rc) {
      qs__abort(s, txn);
      return qs__mdb_fail(s, rc, "opening databases");
    }
  }
  MDB_val k = {4, "qins"}, v;
  rc = mdb_get(txn, s->db_meta, &k, &v);
  if (rc == MDB_NOTFOUND && create) {
    uint8_t m[QS_META_SIZE] = {0};
    memcpy(m, QS_MAGIC_META, 8);
    qs__put_u32(m + 8, QS_FORMAT_VERSION);
    qs__put_u64(m + 16, 1); /* next model id */
    qs__put_u64(m + 24, (uint64_t)time(NULL));
    v.mv_size = sizeof m;
    v.mv_data = m;
    rc = mdb_put(txn, s->db_meta, &k, &v, 0);
  } else if (rc == 0) {
    if (v.mv_size < QS_META_SIZE || memcmp(v.mv_data, QS_MAGIC_META, 8)) {
      qs__abort(s, txn);
      return qs__fail(QINS_ECORRUPT, "store %s: meta record is malformed", s->dir);
    }
    uint32_t ver = qs__get_u32((const uint8_t *)v.mv_data + 8);
    if (ver != QS_FORMAT_VERSION) {
      qs__abort(s, txn);
      return qs__fail(QINS_EVERSION, "store %s: format version %u, this build reads %u", s->dir,
                      ver, QS_FORMAT_VERSION);
    }
  } else if (rc == MDB_NOTFOUND) {
    qs__abort(s, txn);
    return qs__fail(QINS_EVERSION, "store %s: not a qins store (no meta record)", s->dir);
  }
  if (rc) {
    qs__abort(s, txn);
    return qs__mdb_fail(s, rc, "initializing");
  }
  rc = qs__commit(s, txn);
  return rc ? qs__mdb_fail(s, rc, "opening databases") : 0;
}

/* data.mdb against LMDB's meta: every committed page lies within the file. */
static int qs__size_check(qs_store *s) {
  MDB_envinfo ei;
  MDB_stat st;
  mdb_filehandle_t fd;
  struct stat fst;
  if (mdb_env_info(s->env, &ei) || mdb_env_stat(s->env, &st) || mdb_env_get_fd(s->env, &fd) ||
      fstat(fd, &fst))
    return 0; /* nothing to compare with */
  uint64_t need = ((uint64_t)ei.me_last_pgno + 1) * st.ms_psize;
  if ((uint64_t)fst.st_size < need)
    return qs__fail(QINS_ECORRUPT, "store %s: data.mdb is %llu bytes but its last committed page "
                                   "ends at byte %llu: the file is truncated (a copy cut short?); "
                                   "restore it from a backup",
                    s->dir, (unsigned long long)fst.st_size, (unsigned long long)need);
  return 0;
}

static int qs__lock_check(qs_store *s) {
  char path[4096];
  struct stat st;
  if (!s->lock_ok) return 0;
  snprintf(path, sizeof path, "%s/lock.mdb", s->dir);
  if (!s->lock_lost && (stat(path, &st) || st.st_dev != s->lock_dev || st.st_ino != s->lock_ino))
    s->lock_lost = 1;
  if (s->lock_lost)
    return qs__fail(QINS_EIO, "store %s: lock.mdb was removed or replaced after this process "
                              "opened the store: readers and writers no longer share LMDB's "
                              "reader table, so a write could overwrite pages being read; "
                              "restart every process using the store (qinsd, imports)",
                    s->dir);
  return 0;
}

int qs_store_check(qs_store *s) {
  int rc = qs__lock_check(s);
  return rc ? rc : qs__size_check(s);
}

/* Whether another open file description holds a flock on fd's file (ours is a shared one, kept). */
static int qs__others_hold(int fd) {
  if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
    flock(fd, LOCK_SH);
    return 0;
  }
  int busy = errno == EWOULDBLOCK;
  flock(fd, LOCK_SH); /* a failed conversion may have dropped ours */
  return busy;
}

int qs__write_check(qs_store *s) {
  if (!s->lock_ok)
    return qs__fail(QINS_EIO, "store %s: no lock.mdb (read-only mount?): refusing to write "
                              "without LMDB's reader table",
                    s->dir);
  int rc = qs__lock_check(s);
  if (rc) return rc;
  /* Every process with the store open holds shared flocks on data.mdb and on the lock.mdb it
   * uses. Others on data.mdb but none on our lock.mdb: they use a lock.mdb removed or replaced
   * since, so LMDB cannot show us their readers and a write could reuse pages they read. */
  if (s->share_data >= 0 && s->share_lock >= 0 && qs__others_hold(s->share_data) &&
      !qs__others_hold(s->share_lock))
    return qs__fail(QINS_EIO, "store %s: other processes (qinsd?) have data.mdb open with a "
                              "lock.mdb that was removed or replaced: they would not see this "
                              "write's page reuse; refusing to write until they restart",
                    s->dir);
  return 0;
}

unsigned qs_store_warnings(qs_store *s, char *msg, size_t cap) {
  if (msg && cap) {
    int n = 0;
    msg[0] = 0;
    if (s->warnings & QS_WARN_OTHERS_READ)
      n = snprintf(msg, cap, "store %s: users other than its owner and group can read data.mdb "
                             "(the directory is traversable and the file readable by others): "
                             "they can copy every model; chmod o-rwx the directory or the file. ",
                   s->dir);
    if ((s->warnings & QS_WARN_NO_LOCK) && n >= 0 && (size_t)n < cap)
      snprintf(msg + n, cap - (size_t)n, "store %s: no lock table (lock.mdb cannot be written: "
                                         "read-only mount?): LMDB runs without a reader table, "
                                         "so a writer elsewhere cannot see this process's reads; "
                                         "write the store only where nothing reads it. ",
               s->dir);
  }
  return s->warnings;
}

/* Conditions that weaken the store's protection (qs_store_warnings), and lock.mdb's identity. */
static void qs__open_survey(qs_store *s) {
  char path[4096];
  struct stat st, dst;
  struct statvfs vfs;
  snprintf(path, sizeof path, "%s/lock.mdb", s->dir);
  s->lock_ok = stat(path, &st) == 0;
  if (s->lock_ok) {
    s->lock_dev = st.st_dev;
    s->lock_ino = st.st_ino;
  }
  if (!s->lock_ok || (statvfs(s->dir, &vfs) == 0 && (vfs.f_flag & ST_RDONLY)))
    s->warnings |= QS_WARN_NO_LOCK;
  snprintf(path, sizeof path, "%s/data.mdb", s->dir);
  if (stat(s->dir, &dst) == 0 && (dst.st_mode & S_IXOTH) && stat(path, &st) == 0 &&
      (st.st_mode & S_IROTH))
    s->warnings |= QS_WARN_OTHERS_READ;
}

int qs_open(qs_store **out, const char *dir, unsigned flags) {
  return qs_open_ex(out, dir, flags, NULL);
}

int qs_open_ex(qs_store **out, const char *dir, unsigned flags, const qs_open_opts *o) {
  *out = NULL;
  qs__errbuf[0] = 0;
  struct stat st;
  int group = o && o->group_read;
  long gid = o ? o->gid : -1;
  if (flags & QS_OPEN_CREATE) {
    if (mkdir(dir, group ? 0750 : 0700) == 0) {
      if (gid >= 0 && chown(dir, (uid_t)-1, (gid_t)gid) != 0) {
        /* the group is a convenience: the directory stays private to its owner */
      }
    } else if (errno != EEXIST) {
      return qs__fail(-errno, "store %s: cannot create: %s", dir, strerror(errno));
    }
  }
  if (stat(dir, &st) || !S_ISDIR(st.st_mode))
    return qs__fail(-ENOENT, "store %s: no such directory", dir);
  char path[4096];
  snprintf(path, sizeof path, "%s/data.mdb", dir);
  int exists = stat(path, &st) == 0;
  if (!exists && !(flags & QS_OPEN_CREATE))
    return qs__fail(-ENOENT, "store %s: no store here (no data.mdb; import creates one)", dir);
  /* LMDB would take an empty file for a new environment, and cannot read a shorter one's meta. */
  long pg = sysconf(_SC_PAGESIZE);
  if (exists && ((st.st_size == 0 && !(flags & QS_OPEN_CREATE)) ||
                 (st.st_size > 0 && st.st_size < 2 * (pg > 0 ? pg : 4096))))
    return qs__fail(QINS_ECORRUPT, "store %s: data.mdb is %lld bytes, shorter than LMDB's two "
                                   "meta pages: the file is truncated (a copy cut short?)",
                    dir, (long long)st.st_size);
  qs_store *s = calloc(1, sizeof *s);
  if (!s) return qs__fail(QINS_ENOMEM, "out of memory");
  s->lock_fd = s->share_data = s->share_lock = -1;
  s->rdonly = !!(flags & QS_OPEN_RDONLY);
  s->dir = strdup(dir);
  s->fmode = group ? 0640 : 0600;
  s->gid = gid;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  pthread_mutex_init(&s->vmu, NULL);
  s->sums = calloc(QS_SUMS, sizeof *s->sums);
  const char *va = getenv("QINS_VERIFY");
  s->verify = !va ? QS_VERIFY_READ
              : !strcmp(va, "always") ? QS_VERIFY_ALWAYS
              : !strcmp(va, "risk-wrong-numbers") ? QS_VERIFY_RISKY : QS_VERIFY_READ;
  const char *mm = getenv("QINS_STORE_MAX_MAP");
  if (mm && *mm) s->max_map = strtoull(mm, NULL, 10);
  int rc = mdb_env_create(&s->env);
  if (rc) {
    qs_close(s);
    return qs__fail(QINS_ENOMEM, "store %s: mdb_env_create: %s", dir, mdb_strerror(rc));
  }
  uint64_t map = QS_MAP_INITIAL;
  if (exists && (uint64_t)st.st_size + QS_MAP_SLACK > map) map = (uint64_t)st.st_size + QS_MAP_SLACK;
  const char *mi = getenv("QINS_STORE_MAP_INITIAL"); /* testing knob: start small, grow often */
  if (mi && *mi) map = strtoull(mi, NULL, 10);
  if (s->max_map && map > s->max_map) map = s->max_map;
  mdb_env_set_mapsize(s->env, map);
  mdb_env_set_maxdbs(s->env, 8);
  mdb_env_set_maxreaders(s->env, QS_MAX_READERS);
  rc = mdb_env_open(s->env, dir, MDB_NOTLS | (s->rdonly ? MDB_RDONLY : 0), s->fmode);
  if (rc) {
    int e = rc == EACCES || rc == ENOENT || rc == EROFS ? -rc : 0;
    if (rc == EROFS) /* a writer on a read-only mount (readers open without a lock table) */
      qs__fail(-EROFS, "store %s is on a read-only filesystem: it can be read and served, not "
                       "written (import, rm, gc and pull need a writable mount)", dir);
    else
      qs__mdb_fail(s, rc, "mdb_env_open");
    qs_close(s);
    return e ? e : (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH ? QINS_EVERSION : QINS_EIO);
  }
  if ((rc = qs__size_check(s))) {
    char msg[QS__ERRBUF];
    snprintf(msg, sizeof msg, "%s", qs__errbuf);
    qs_close(s);
    return qs__fail(rc, "%s", msg);
  }
  qs__open_survey(s);
  const char *shared[] = {"data.mdb", s->lock_ok ? "lock.mdb" : NULL};
  int *sfd[] = {&s->share_data, &s->share_lock};
  for (size_t i = 0; i < 2 && shared[i]; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, shared[i]);
    if ((*sfd[i] = open(path, O_RDONLY | O_CLOEXEC)) >= 0) flock(*sfd[i], LOCK_SH);
  }
  if (gid >= 0) {
    const char *files[] = {"data.mdb", "lock.mdb"};
    for (size_t i = 0; i < 2; i++) {
      snprintf(path, sizeof path, "%s/%s", dir, files[i]);
      int fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd >= 0) {
        qs__own(s, fd);
        close(fd);
      }
    }
  }
  int dead = 0;
  mdb_reader_check(s->env, &dead);
  rc = qs__open_dbis(s, !s->rdonly);
  if (rc) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", qs__errbuf);
    qs_close(s);
    qs__fail(rc, "%s", msg);
    return rc;
  }
  if (!s->rdonly && qs__lock(s) == 0) {
    rc = qs__gc_all(s); /* leftovers of a killed import or removal */
    qs__unlock(s);
    if (rc) {
      qs_close(s);
      return rc;
    }
  }
  qs__errbuf[0] = 0;
  *out = s;
  return 0;
}

void qs_close(qs_store *s) {
  if (!s) return;
  if (s->spare) {
    mdb_txn_abort(s->spare->txn);
    free(s->spare->tc);
    free(s->spare);
  }
  if (s->env) mdb_env_close(s->env);
  if (s->lock_fd >= 0) close(s->lock_fd);
  if (s->share_data >= 0) close(s->share_data);
  if (s->share_lock >= 0) close(s->share_lock);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  pthread_mutex_destroy(&s->vmu);
  for (size_t i = 0; s->sums && i < QS_SUMS; i++) free(s->sums[i]);
  free(s->sums);
  free(s->dir);
  free(s);
}

/* ---------------------------------------------------------------------------------------------
 * Maintenance */
int qs_store_info_get(qs_store *s, qs_store_info *out) {
  memset(out, 0, sizeof *out);
  MDB_envinfo ei;
  MDB_stat st;
  mdb_env_info(s->env, &ei);
  mdb_env_stat(s->env, &st);
  out->map_size = ei.me_mapsize;
  out->page_size = st.ms_psize;
  out->last_pgno = ei.me_last_pgno;
  out->max_readers = ei.me_maxreaders;
  out->n_readers = ei.me_numreaders;
  pthread_mutex_lock(&s->mu);
  out->map_adopted = s->map_adopted;
  pthread_mutex_unlock(&s->mu);
  char path[4096];
  struct stat fst;
  snprintf(path, sizeof path, "%s/data.mdb", s->dir);
  if (stat(path, &fst) == 0) out->file_size = (uint64_t)fst.st_size;
  MDB_txn *txn;
  int rc = qs__begin(s, MDB_RDONLY, &txn);
  if (rc) return qs__mdb_fail(s, rc, "reading figures");
  MDB_cursor *c;
  MDB_val k, v;
  /* The freelist: DBI 0 is LMDB's FREE_DBI; each value is an ID list whose first word counts. */
  if (!mdb_cursor_open(txn, 0, &c)) {
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT))
      if (v.mv_size >= sizeof(size_t)) {
        size_t cnt;
        memcpy(&cnt, v.mv_data, sizeof cnt);
        out->free_pages += cnt;
      }
    mdb_cursor_close(c);
  }
  MDB_stat ds;
  if (!mdb_stat(txn, s->db_models, &ds)) out->n_models = ds.ms_entries;
  if (!mdb_stat(txn, s->db_staging, &ds)) out->n_staging = ds.ms_entries;
  if (!mdb_cursor_open(txn, s->db_params, &c)) {
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
      out->n_params++;
      out->params_bytes += v.mv_size >= QS_PARAMS_HDR ? v.mv_size - QS_PARAMS_HDR : 0;
    }
    mdb_cursor_close(c);
  }
  qs__abort(s, txn);
  return 0;
}
