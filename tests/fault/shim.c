/* SPDX-License-Identifier: MIT */
/*
 * shim.c — an LD_PRELOAD fault injector and observer for LMDB commits ($QINS_BUILD/tests/fault.so),
 * for tests that run qinsctl or qinsd as child processes (tests/integration/store_commit_fault.c).
 *
 * It interposes liblmdb's mdb_dbi_open, mdb_put and mdb_txn_commit, and libc's fsync, fdatasync,
 * msync, write, pwrite and writev (LMDB's only write and sync calls), and learns which named DB
 * each handle is, so a commit can be told apart by what its transaction wrote: a "publish" commit
 * put into "models", a staged-data commit into "chunks". Driven by the environment:
 *   QINS_FAULT_LOG=path        one line per commit: `commit puts=MCS syncs=N flags=0xF rc=R`
 *                              (puts: M models, C chunks, S staging, T tensors; syncs: fsync and
 *                              fdatasync calls during the commit; flags: mdb_env_get_flags)
 *   QINS_FAULT_PUBLISH=ENOSPC  while a transaction that put into "models" commits, every write
 *                              fails with ENOSPC (the disk fills exactly at the publish commit)
 *   QINS_FAULT_KILL_AFTER=chunks  SIGKILL the process right after the first successful commit
 *                              of a transaction that put into "chunks" (an import killed with
 *                              its first staged data durable)
 *   QINS_FAULT_POPULATE_AFTER=N   madvise(MADV_POPULATE_WRITE) fails with ENOMEM once the calls
 *                              that succeeded asked for N bytes in all (the host out of memory
 *                              while qinsd creates arena pages; tests/integration/daemon_arena.c)
 * One LMDB write transaction exists at a time per environment (lmdb.h), so the puts are tracked
 * for the one transaction being written, by pointer. Built without sanitizers (make asan sets
 * ASAN_OPTIONS=verify_asan_link_order=0 for the children that preload it).
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define NDBI 64 /* dbi handles tracked (qins opens 6 named DBs) */

static char dbi_tag[NDBI];        /* per dbi handle: 'M' models, 'C' chunks, 'S' staging, 'T' tensors */
static MDB_txn *cur_txn;          /* the write transaction whose puts are tracked */
static char cur_puts[8];          /* tags put into by cur_txn */
static int in_commit;             /* a tracked commit is running */
static int fail_writes;           /* the running commit's writes fail with ENOSPC */
static int syncs;                 /* fsync/fdatasync calls during the running commit */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

#define REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi) {
  int rc = REAL(mdb_dbi_open)(txn, name, flags, dbi);
  if (rc == 0 && name && *dbi < NDBI) {
    char tag = !strcmp(name, "models")    ? 'M'
               : !strcmp(name, "chunks")  ? 'C'
               : !strcmp(name, "staging") ? 'S'
               : !strcmp(name, "tensors") ? 'T'
                                          : 0;
    dbi_tag[*dbi] = tag;
  }
  return rc;
}

int mdb_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags) {
  pthread_mutex_lock(&mu);
  if (txn != cur_txn) {
    cur_txn = txn;
    cur_puts[0] = 0;
  }
  char tag = dbi < NDBI ? dbi_tag[dbi] : 0;
  if (tag && !strchr(cur_puts, tag) && strlen(cur_puts) < sizeof cur_puts - 1) {
    size_t n = strlen(cur_puts);
    cur_puts[n] = tag;
    cur_puts[n + 1] = 0;
  }
  pthread_mutex_unlock(&mu);
  return REAL(mdb_put)(txn, dbi, key, data, flags);
}

int mdb_txn_commit(MDB_txn *txn) {
  char puts[8] = "";
  pthread_mutex_lock(&mu);
  if (txn == cur_txn) {
    memcpy(puts, cur_puts, sizeof puts);
    cur_txn = NULL;
    cur_puts[0] = 0;
  }
  const char *pub = getenv("QINS_FAULT_PUBLISH");
  unsigned flags = 0;
  mdb_env_get_flags(mdb_txn_env(txn), &flags);
  in_commit = 1;
  syncs = 0;
  fail_writes = strchr(puts, 'M') && pub && !strcmp(pub, "ENOSPC");
  int rc = REAL(mdb_txn_commit)(txn);
  int n_sync = syncs;
  in_commit = fail_writes = 0;
  pthread_mutex_unlock(&mu);
  const char *log = getenv("QINS_FAULT_LOG");
  if (log && *log) {
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
      char line[128];
      int n = snprintf(line, sizeof line, "commit puts=%s syncs=%d flags=0x%x rc=%d\n",
                       puts[0] ? puts : "-", n_sync, flags, rc);
      if (REAL(write)(fd, line, (size_t)n) < 0) {}
      close(fd);
    }
  }
  const char *kill_after = getenv("QINS_FAULT_KILL_AFTER");
  if (rc == 0 && kill_after && !strcmp(kill_after, "chunks") && strchr(puts, 'C'))
    raise(SIGKILL);
  return rc;
}

/* Called with mu held by the committing thread (in_commit); other threads see in_commit 0 or
 * race harmlessly on a counter only the log reads. */
int fsync(int fd) {
  if (in_commit) syncs++;
  return REAL(fsync)(fd);
}

int fdatasync(int fd) {
  if (in_commit) syncs++;
  return REAL(fdatasync)(fd);
}

int msync(void *addr, size_t len, int flags) {
  if (in_commit) syncs++;
  return REAL(msync)(addr, len, flags);
}

ssize_t write(int fd, const void *buf, size_t n) {
  if (fail_writes) {
    errno = ENOSPC;
    return -1;
  }
  return REAL(write)(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
  if (fail_writes) {
    errno = ENOSPC;
    return -1;
  }
  return REAL(pwrite)(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
  if (fail_writes) {
    errno = ENOSPC;
    return -1;
  }
  return REAL(writev)(fd, iov, cnt);
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* linux/mman.h, Linux 5.14 */
#endif
int madvise(void *addr, size_t len, int advice) {
  static size_t populated; /* bytes of the calls that succeeded */
  const char *after = getenv("QINS_FAULT_POPULATE_AFTER");
  if (advice == MADV_POPULATE_WRITE && after) {
    pthread_mutex_lock(&mu);
    int fail = populated + len > (size_t)strtoull(after, NULL, 10);
    if (!fail) populated += len;
    pthread_mutex_unlock(&mu);
    if (fail) {
      errno = ENOMEM;
      return -1;
    }
  }
  return REAL(madvise)(addr, len, advice);
}
