/* SPDX-License-Identifier: MIT */
/*
 * store.c — the LMDB tensor store: environment, read transactions, the read API, the staged
 * import, removal, garbage collection of staged leftovers, verify and environment figures.
 * Layout: docs/FORMAT.md §2 (and store_int.h). Rules: store.h, ../shared/docs/PITFALLS.md §LMDB.
 *
 * Design.
 *  - Named DBs meta, models, tensors, chunks, params, staging. A model's tensors and chunks are
 *    keyed by its numeric id (u64 BE), never by its name: the name -> id mapping in "models" is
 *    the only thing a reader consults first, so flipping it in one transaction makes a whole new
 *    model visible (or invisible) at once. Ids are never reused (meta.next_model_id).
 *  - An import registers its fresh id in "staging" (state IMPORTING) in its first transaction and
 *    removes it in the same transaction that flips the name; a removal or a replace moves the old
 *    id to "staging" (state GARBAGE) in that same transaction. Whatever "staging" holds when a
 *    writer starts (it holds the flock, so no other import runs) is a leftover: its chunks, tensor
 *    records and params references are deleted in bounded transactions (qs__gc_id).
 *  - Codec parameter blobs are shared: keyed by a content hash, refcounted by tensor records;
 *    a tensor record and its reference are written (and deleted) in the same transaction.
 *  - Active transactions are counted so the map can be resized (ours: growth before a write txn;
 *    theirs: MDB_MAP_RESIZED) only when none is open in this process, as LMDB requires.
 *  - One ended read txn per store is kept reset (mdb_txn_reset: no snapshot, no page pinned, its
 *    reader slot kept) and renewed by the next qs_txn_begin, on whichever thread (MDB_NOTLS):
 *    each qs_txn_begin is still a fresh snapshot, at a fraction of mdb_txn_begin's cost. That txn
 *    also remembers its recent tensor and chunk lookups while renewals find the same snapshot
 *    in the same mapping (qs__tcache): a daemon's small gets then skip the B-tree walks.
 */
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "store_int.h"

#define QS_MAP_INITIAL (1ull << 30)   /* first map size: virtual space only, the file grows by use */
#define QS_MAP_SLACK (32ull << 20)    /* headroom kept beyond a write txn's estimate */
#define QS_GC_BATCH 1024              /* entries deleted per cleanup txn: bounded dirty pages */
#define QS_MAX_READERS 510            /* reader slots: qinsd threads x requests, well above 126 */

struct qs_store {
  MDB_env *env;           /* the one environment of this process */
  MDB_dbi db_meta, db_models, db_tensors, db_chunks, db_params, db_staging;
  char *dir;              /* store directory */
  int rdonly;             /* opened QS_OPEN_RDONLY */
  int lock_fd;            /* DIR/writer.lock, -1 until first write */
  int locked;             /* we hold the writer flock */
  uint64_t max_map;       /* growth cap ($QINS_STORE_MAX_MAP), 0 = none */
  pthread_mutex_t mu;     /* guards active/resizing */
  pthread_cond_t cv;      /* signalled when active drops to 0 or resizing ends */
  int active;             /* open transactions of this process */
  struct qs_txn *spare;   /* one ended read txn kept reset for reuse (qs_txn_end), or NULL */
  int resizing;           /* a map resize waits for active == 0 */
  /* Chunks already checked (CRC + codec validation) by this process. Chunks are immutable once
   * committed and model ids are never reused, so a verified chunk key stays verified; a slice of a
   * few KiB then does not re-checksum its whole multi-MiB chunk on every request. Direct-mapped by
   * key hash; a lost slot only means checking again. */
  pthread_mutex_t vmu;
  uint8_t (*vkeys)[16];   /* QS_VCACHE slots of chunk keys (all-zero = empty: id 0 never exists) */
  int verify_always;      /* $QINS_VERIFY=always: no cache */
  uint64_t map_adopted;   /* times MDB_MAP_RESIZED made us adopt another process's map size */
  uint64_t map_gen;       /* bumped (under mu) whenever the map may have moved: set_mapsize */
};
#define QS_VCACHE 8192 /* slots: 128 KiB of keys, enough for 32 GiB of 4 MiB chunks */

/* Lookups a qs_txn remembers across its renewals (qs_txn_end keeps it reset as the spare): the
 * decoded record of recently read tensors and the map address of recently read chunks. They are
 * valid for as long as each renewal finds the same snapshot (mdb_txn_id unchanged: no commit
 * since, so every page reachable from it is as it was, LMDB never writing a live page in place)
 * in the same mapping (map_gen unchanged: a resize may move the map). Anything else empties them.
 * So a small get of a tensor just read costs no B-tree walk, params checksum or chunk lookup. */
#define QS_TCACHE 32 /* tensors remembered: a layer's worth */
#define QS_CCACHE 64 /* chunks remembered */
typedef struct qs__tcache {
  uint64_t txnid, map_gen;        /* the snapshot and mapping the entries belong to */
  struct {
    uint64_t hash;                /* of model and name; 0: empty */
    qs_tensor t;
  } ten[QS_TCACHE];
  struct {
    uint8_t key[16];              /* chunk key; all zero: empty (model id 0 never exists) */
    const uint8_t *data;          /* payload, in the map */
    uint64_t n_rows;
  } chunk[QS_CCACHE];
} qs__tcache;

struct qs_txn {
  qs_store *s;     /* owner */
  MDB_txn *txn;    /* read-only txn */
  qs__tcache *tc;  /* lookups of this snapshot (allocated at the first lookup), or NULL */
};

/* ---------------------------------------------------------------------------------------------
 * Errors */
static _Thread_local char qs__errbuf[1024];

const char *qs_error(void) { return qs__errbuf; }

int qs__fail(int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(qs__errbuf, sizeof qs__errbuf, fmt, ap);
  va_end(ap);
  return rc;
}

/* Maps an LMDB/errno failure of `what` to a project code with a message. */
static int qs__mdb_fail(qs_store *s, int rc, const char *what) {
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

int qs__name_check(const char *what, const char *name, int is_model) {
  size_t n = name ? strlen(name) : 0;
  if (n == 0) return qs__fail(QINS_ENAME, "%s name is empty", what);
  if (n > QS_MAX_NAME)
    return qs__fail(QINS_ENAME, "%s name \"%.40s...\" is %zu bytes; at most %d allowed (LMDB keys "
                                "are limited to 511 bytes)",
                    what, name, n, QS_MAX_NAME);
  if (is_model && strchr(name, '/'))
    return qs__fail(QINS_ENAME, "%s name \"%s\" contains '/' (reserved for MODEL/TENSOR)", what,
                    name);
  return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Names */
static const char *const qs__dt_names[QS_DT_COUNT] = {"f32", "f16", "bf16", "f64", "i8",
                                                      "u8",  "i16", "u16",  "i32", "u32",
                                                      "i64", "u64", "bool"};
static const unsigned char qs__dt_sizes[QS_DT_COUNT] = {4, 2, 2, 8, 1, 1, 2, 2, 4, 4, 8, 8, 1};

const char *qs_dtype_name(qs_dtype d) { return (unsigned)d < QS_DT_COUNT ? qs__dt_names[d] : "?"; }
int qs_dtype_from_name(const char *name) {
  for (int i = 0; i < QS_DT_COUNT; i++)
    if (!strcmp(name, qs__dt_names[i])) return i;
  return -1;
}
size_t qs_dtype_size(qs_dtype d) { return (unsigned)d < QS_DT_COUNT ? qs__dt_sizes[d] : 0; }
const char *qs_codec_name(int codec) {
  if (codec == QS_RAW) return "raw";
  if (codec < 0 || codec >= QC_CODEC_COUNT) return "?";
  return qc_codec_name((qc_codec)codec);
}

/* ---------------------------------------------------------------------------------------------
 * Transactions and the map */
static void qs__leave(qs_store *s) {
  pthread_mutex_lock(&s->mu);
  if (--s->active == 0) pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

/* Begins an LMDB txn, handling MDB_MAP_RESIZED (another process grew the map). */
static int qs__begin(qs_store *s, unsigned flags, MDB_txn **out) {
  for (int tries = 0;; tries++) {
    pthread_mutex_lock(&s->mu);
    while (s->resizing) pthread_cond_wait(&s->cv, &s->mu);
    s->active++;
    pthread_mutex_unlock(&s->mu);
    int rc = mdb_txn_begin(s->env, NULL, flags, out);
    if (rc == 0) return 0;
    qs__leave(s);
    if (rc != MDB_MAP_RESIZED || tries >= 16) return rc;
    pthread_mutex_lock(&s->mu);
    if (!s->resizing) {
      s->resizing = 1;
      while (s->active > 0) pthread_cond_wait(&s->cv, &s->mu);
      mdb_env_set_mapsize(s->env, 0); /* adopt the size another process set */
      s->map_adopted++;
      s->map_gen++;
      s->resizing = 0;
      pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
  }
}

static void qs__abort(qs_store *s, MDB_txn *txn) {
  if (!txn) return;
  mdb_txn_abort(txn);
  qs__leave(s);
}

static int qs__commit(qs_store *s, MDB_txn *txn) {
  int rc = mdb_txn_commit(txn);
  qs__leave(s);
  return rc;
}

/* Grows the map so that `extra` more bytes of data fit with headroom. No txn may be open. */
static int qs__ensure_map(qs_store *s, uint64_t extra) {
  MDB_envinfo ei;
  MDB_stat st;
  if (mdb_env_info(s->env, &ei) || mdb_env_stat(s->env, &st)) return 0;
  uint64_t used = ((uint64_t)ei.me_last_pgno + 1) * st.ms_psize;
  uint64_t need = used + 2 * extra + QS_MAP_SLACK;
  if (need <= ei.me_mapsize) return 0;
  uint64_t nsz = ei.me_mapsize * 2 > need ? ei.me_mapsize * 2 : need;
  nsz = (nsz + (64ull << 20) - 1) & ~((64ull << 20) - 1);
  if (s->max_map && nsz > s->max_map) nsz = s->max_map;
  if (nsz <= ei.me_mapsize) return 0; /* at the cap: MDB_MAP_FULL will tell */
  pthread_mutex_lock(&s->mu);
  while (s->resizing) pthread_cond_wait(&s->cv, &s->mu);
  s->resizing = 1;
  while (s->active > 0) pthread_cond_wait(&s->cv, &s->mu);
  int rc = mdb_env_set_mapsize(s->env, nsz);
  s->map_gen++;
  s->resizing = 0;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  return rc ? qs__mdb_fail(s, rc, "growing the map") : 0;
}

int qs_txn_begin(qs_store *s, qs_txn **out) {
  *out = NULL;
  /* The spare (a reset read txn, see qs_txn_end) is renewed: cheaper than begin (no allocation,
   * the reader slot is kept). Counted active like any txn, so a map resize still waits for it. */
  pthread_mutex_lock(&s->mu);
  qs_txn *t = s->spare;
  if (t) {
    s->spare = NULL;
    while (s->resizing) pthread_cond_wait(&s->cv, &s->mu);
    s->active++;
  }
  pthread_mutex_unlock(&s->mu);
  if (t) {
    if (mdb_txn_renew(t->txn) == 0) {
      *out = t;
      return 0;
    }
    mdb_txn_abort(t->txn); /* e.g. MDB_MAP_RESIZED: the path below adopts the new size */
    qs__leave(s);
    free(t->tc);
    free(t);
  }
  t = calloc(1, sizeof *t);
  if (!t) return qs__fail(QINS_ENOMEM, "out of memory");
  int rc = qs__begin(s, MDB_RDONLY, &t->txn);
  if (rc) {
    free(t);
    return qs__mdb_fail(s, rc, "beginning a read transaction");
  }
  t->s = s;
  *out = t;
  return 0;
}

void qs_txn_end(qs_txn *t) {
  if (!t) return;
  qs_store *s = t->s;
  /* Reset (the snapshot is released now, like an abort) and kept as the spare if there is none;
   * a reset txn holds no page of the map, so a resize may happen while it waits. */
  mdb_txn_reset(t->txn);
  pthread_mutex_lock(&s->mu);
  if (--s->active == 0) pthread_cond_broadcast(&s->cv);
  int keep = !s->spare;
  if (!keep && t->tc && !s->spare->tc) { /* keep the one that remembers lookups */
    qs_txn *o = s->spare;
    s->spare = t;
    t = o;
  } else if (keep) {
    s->spare = t;
  }
  pthread_mutex_unlock(&s->mu);
  if (!keep) {
    mdb_txn_abort(t->txn);
    free(t->tc);
    free(t);
  }
}

/* ---------------------------------------------------------------------------------------------
 * Writer lock */
static int qs__lock(qs_store *s) {
  if (s->rdonly) return qs__fail(QINS_EINVALID, "store %s is open read-only", s->dir);
  if (s->locked) return 0;
  if (s->lock_fd < 0) {
    char path[4096];
    snprintf(path, sizeof path, "%s/writer.lock", s->dir);
    s->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0664);
    if (s->lock_fd < 0)
      return qs__fail(-errno, "store %s: cannot open writer.lock: %s", s->dir, strerror(errno));
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
  return 0;
}

static void qs__unlock(qs_store *s) {
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

static int qs__gc_all(qs_store *s);

int qs_open(qs_store **out, const char *dir, unsigned flags) {
  *out = NULL;
  qs__errbuf[0] = 0;
  struct stat st;
  if (flags & QS_OPEN_CREATE) {
    if (mkdir(dir, 0775) && errno != EEXIST)
      return qs__fail(-errno, "store %s: cannot create: %s", dir, strerror(errno));
  }
  if (stat(dir, &st) || !S_ISDIR(st.st_mode))
    return qs__fail(-ENOENT, "store %s: no such directory", dir);
  char path[4096];
  snprintf(path, sizeof path, "%s/data.mdb", dir);
  int exists = stat(path, &st) == 0;
  if (!exists && !(flags & QS_OPEN_CREATE))
    return qs__fail(-ENOENT, "store %s: no store here (no data.mdb; import creates one)", dir);
  qs_store *s = calloc(1, sizeof *s);
  if (!s) return qs__fail(QINS_ENOMEM, "out of memory");
  s->lock_fd = -1;
  s->rdonly = !!(flags & QS_OPEN_RDONLY);
  s->dir = strdup(dir);
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  pthread_mutex_init(&s->vmu, NULL);
  s->vkeys = calloc(QS_VCACHE, sizeof *s->vkeys);
  const char *va = getenv("QINS_VERIFY");
  s->verify_always = va && !strcmp(va, "always");
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
  rc = mdb_env_open(s->env, dir, MDB_NOTLS | (s->rdonly ? MDB_RDONLY : 0), 0664);
  if (rc) {
    int e = rc == EACCES || rc == ENOENT ? -rc : 0;
    qs__mdb_fail(s, rc, "mdb_env_open");
    qs_close(s);
    return e ? e : (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH ? QINS_EVERSION : QINS_EIO);
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
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  pthread_mutex_destroy(&s->vmu);
  free(s->vkeys);
  free(s->dir);
  free(s);
}

/* ---------------------------------------------------------------------------------------------
 * Record decoding */
static int qs__model_decode(qs_store *s, const MDB_val *k, const MDB_val *v, qs_model *m) {
  const uint8_t *p = v->mv_data;
  if (v->mv_size < QS_MODEL_HDR + 2 || memcmp(p, QS_MAGIC_MODEL, 4))
    return qs__fail(QINS_ECORRUPT, "store %s: model record \"%.*s\" is malformed", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data);
  if (qs__get_u16(p + 4) != QS_FORMAT_VERSION)
    return qs__fail(QINS_EVERSION, "store %s: model record \"%.*s\" has version %u", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data, qs__get_u16(p + 4));
  uint16_t nl = qs__get_u16(p + 6);
  uint32_t ml = qs__get_u32(p + 56);
  if ((uint64_t)QS_MODEL_HDR + nl + 1 + ml + 1 != v->mv_size || p[QS_MODEL_HDR + nl] ||
      p[QS_MODEL_HDR + nl + 1 + ml] || nl != k->mv_size)
    return qs__fail(QINS_ECORRUPT, "store %s: model record \"%.*s\" has bad lengths", s->dir,
                    (int)k->mv_size, (const char *)k->mv_data);
  m->name = (const char *)p + QS_MODEL_HDR;
  m->id = qs__get_u64(p + 8);
  m->n_tensors = qs__get_u64(p + 16);
  m->src_bytes = qs__get_u64(p + 24);
  m->stored_bytes = qs__get_u64(p + 32);
  m->n_elem = qs__get_u64(p + 40);
  m->created = (int64_t)qs__get_u64(p + 48);
  m->metadata = (const char *)p + QS_MODEL_HDR + nl + 1;
  return 0;
}

int qs__tensor_rec_decode(const char *dir, const char *model, const uint8_t *p, size_t size,
                          qs_tensor *t, qs__trec *r) {
  memset(t, 0, sizeof *t);
  if (size < QS_TENSOR_HDR + 2 || memcmp(p, QS_MAGIC_TENSOR, 4))
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor record is malformed", dir, model);
  if (qs__get_u16(p + 4) != QS_FORMAT_VERSION)
    return qs__fail(QINS_EVERSION, "store %s: model %s: tensor record has version %u", dir,
                    model, qs__get_u16(p + 4));
  uint16_t nl = qs__get_u16(p + 10);
  if ((uint64_t)QS_TENSOR_HDR + nl + 1 != size || nl > QS_MAX_NAME || p[QS_TENSOR_HDR + nl])
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor record has bad lengths", dir,
                    model);
  size_t ml = strnlen(model, sizeof t->model - 1); /* as snprintf "%s" would, without its cost */
  memcpy(t->model, model, ml);
  t->model[ml] = 0;
  memcpy(t->name, p + QS_TENSOR_HDR, nl);
  t->name[nl] = 0;
  t->codec = p[6];
  t->src_dtype = (qs_dtype)p[7];
  t->ndim = p[8];
  r->flags = p[9];
  t->index = qs__get_u32(p + 12);
  for (int i = 0; i < QS_MAX_NDIM; i++) t->shape[i] = qs__get_u64(p + 16 + 8 * i);
  t->n_elem = qs__get_u64(p + 80);
  t->row_len = qs__get_u64(p + 88);
  t->n_rows = qs__get_u64(p + 96);
  t->rows_per_chunk = qs__get_u64(p + 104);
  t->n_chunks = qs__get_u64(p + 112);
  t->src_bytes = qs__get_u64(p + 120);
  r->data_bytes = qs__get_u64(p + 128);
  r->params_id = qs__get_u64(p + 136);
  r->params_bytes = qs__get_u32(p + 144);
  r->tensor_crc = qs__get_u32(p + 148);
  t->snr_db = qs__get_f64(p + 152);
  t->max_err = qs__get_f64(p + 160);
  t->stored_bytes = r->data_bytes + ((r->flags & QS_TF_PARAMS_FIRST) ? r->params_bytes : 0);
  /* Validate what readers rely on. */
  int bad = t->ndim > QS_MAX_NDIM || (t->codec != QS_RAW && t->codec >= QC_CODEC_COUNT) ||
            (unsigned)t->src_dtype >= QS_DT_COUNT;
  uint64_t n = 1;
  for (int i = 0; !bad && i < t->ndim; i++)
    if (__builtin_mul_overflow(n, t->shape[i], &n)) bad = 1;
  uint64_t rl = !bad && t->ndim ? t->shape[t->ndim - 1] : 1; /* ndim is checked first */
  if (!bad && (n != t->n_elem || rl != t->row_len || (rl ? n / rl : 0) != t->n_rows)) bad = 1;
  if (!bad && t->n_rows && (!t->rows_per_chunk ||
                            t->n_chunks != (t->n_rows + t->rows_per_chunk - 1) / t->rows_per_chunk))
    bad = 1;
  if (!bad && !t->n_rows && t->n_chunks) bad = 1;
  /* The largest chunk's payload must have a 64-bit size: else its expected size wraps and a
   * short chunk record would pass the size check (then validation reads past it). */
  if (!bad && t->n_rows) {
    uint64_t rows = t->rows_per_chunk < t->n_rows ? t->rows_per_chunk : t->n_rows, e;
    int ovf = 0;
    if (t->codec == QS_RAW)
      ovf = __builtin_mul_overflow(rows, t->row_len, &e) ||
            __builtin_mul_overflow(e, (uint64_t)qs_dtype_size(t->src_dtype), &e);
    else
      qc_chunk_bytes((qc_codec)t->codec, t->row_len, rows, &ovf);
    if (ovf) bad = 1;
  }
  if (bad)
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: record fields are inconsistent",
                    dir, model, t->name);
  t->params.codec = t->codec == QS_RAW ? QC_F32 : (qc_codec)t->codec;
  if (!r->params_id && t->codec != QS_RAW && qc_params_size((qc_codec)t->codec) != 0)
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: codec parameters missing",
                    dir, model, t->name);
  return 0;
}

int qs__params_rec_decode(const char *dir, const qs__trec *r, const uint8_t *pp, size_t size,
                          qs_tensor *t) {
  if (size < QS_PARAMS_HDR || memcmp(pp, QS_MAGIC_PARAMS, 4) || pp[4] != t->codec ||
      qs__get_u32(pp + 16) != size - QS_PARAMS_HDR || size - QS_PARAMS_HDR != r->params_bytes ||
      qs__crc32c(0, pp + QS_PARAMS_HDR, size - QS_PARAMS_HDR) != qs__get_u32(pp + 20))
    return qs__fail(QINS_ECORRUPT,
                    "store %s: model %s: tensor %s: codec parameter record %016llx is malformed "
                    "or fails its checksum",
                    dir, t->model, t->name, (unsigned long long)r->params_id);
  if (qc_params_read((qc_codec)t->codec, pp + QS_PARAMS_HDR, size - QS_PARAMS_HDR, &t->params))
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: codec parameters are invalid",
                    dir, t->model, t->name);
  return 0;
}

static int qs__tensor_decode(qs_store *s, MDB_txn *txn, const char *model, const MDB_val *v,
                             qs_tensor *t, qs__trec *r) {
  int rc = qs__tensor_rec_decode(s->dir, model, v->mv_data, v->mv_size, t, r);
  if (rc || !r->params_id) return rc;
  uint8_t key[8];
  qs__put_be64(key, r->params_id);
  MDB_val k = {8, key}, pv;
  rc = mdb_get(txn, s->db_params, &k, &pv);
  if (rc)
    return qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor %s: codec parameters %016llx %s",
                    s->dir, model, t->name, (unsigned long long)r->params_id,
                    rc == MDB_NOTFOUND ? "missing" : mdb_strerror(rc));
  return qs__params_rec_decode(s->dir, r, pv.mv_data, pv.mv_size, t);
}

/* ---------------------------------------------------------------------------------------------
 * Read API */
static int qs__model_lookup(qs_txn *t, const char *model, qs_model *m) {
  size_t nl = strlen(model);
  if (nl == 0 || nl > QS_MAX_NAME) return qs__fail(QINS_ENO_MODEL, "no model \"%.300s\"", model);
  MDB_val k = {nl, (void *)model}, v;
  int rc = mdb_get(t->txn, t->s->db_models, &k, &v);
  if (rc == MDB_NOTFOUND) return qs__fail(QINS_ENO_MODEL, "no model \"%s\"", model);
  if (rc) return qs__mdb_fail(t->s, rc, "reading models");
  return qs__model_decode(t->s, &k, &v, m);
}

int qs_model_get(qs_txn *t, const char *model, qs_model *out) {
  return qs__model_lookup(t, model, out);
}

int qs_models_each(qs_txn *t, qs_model_cb cb, void *ud) {
  MDB_cursor *c;
  int rc = mdb_cursor_open(t->txn, t->s->db_models, &c);
  if (rc) return qs__mdb_fail(t->s, rc, "listing models");
  MDB_val k, v;
  int r = 0;
  for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    qs_model m;
    if ((r = qs__model_decode(t->s, &k, &v, &m))) break;
    if (cb(ud, &m)) break;
  }
  mdb_cursor_close(c);
  if (r) return r;
  if (rc && rc != MDB_NOTFOUND) return qs__mdb_fail(t->s, rc, "listing models");
  return 0;
}

static int qs__tensor_each_id(qs_store *s, MDB_txn *txn, uint64_t id, const char *model,
                              const char *prefix, qs_tensor_cb cb, void *ud) {
  size_t pl = prefix ? strlen(prefix) : 0;
  if (pl > QS_MAX_NAME) return 0;
  uint8_t key[8 + QS_MAX_NAME];
  qs__put_be64(key, id);
  if (pl) memcpy(key + 8, prefix, pl);
  MDB_cursor *c;
  int rc = mdb_cursor_open(txn, s->db_tensors, &c);
  if (rc) return qs__mdb_fail(s, rc, "listing tensors");
  MDB_val k = {8 + pl, key}, v;
  int r = 0;
  for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
       rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
    if (k.mv_size < 8 + pl || memcmp(k.mv_data, key, 8 + pl)) break;
    qs_tensor t;
    qs__trec tr;
    if ((r = qs__tensor_decode(s, txn, model, &v, &t, &tr))) break;
    if (k.mv_size - 8 != strlen(t.name) || memcmp((const char *)k.mv_data + 8, t.name, k.mv_size - 8)) {
      r = qs__fail(QINS_ECORRUPT, "store %s: model %s: tensor key and record name differ", s->dir,
                   model);
      break;
    }
    t.model_id = id;
    if (cb(ud, &t)) break;
  }
  mdb_cursor_close(c);
  if (r) return r;
  if (rc && rc != MDB_NOTFOUND) return qs__mdb_fail(s, rc, "listing tensors");
  return 0;
}

int qs_tensors_each(qs_txn *t, const char *model, const char *prefix, qs_tensor_cb cb, void *ud) {
  qs_model m;
  int rc = qs__model_lookup(t, model, &m);
  if (rc) return rc;
  return qs__tensor_each_id(t->s, t->txn, m.id, m.name, prefix, cb, ud);
}

static int qs__tensor_get_id(qs_store *s, MDB_txn *txn, uint64_t id, const char *model,
                             const char *name, qs_tensor *out, qs__trec *tr) {
  size_t nl = strlen(name);
  if (nl == 0 || nl > QS_MAX_NAME)
    return qs__fail(QINS_ENO_TENSOR, "model %s has no tensor \"%.300s\"", model, name);
  uint8_t key[8 + QS_MAX_NAME];
  qs__put_be64(key, id);
  memcpy(key + 8, name, nl);
  MDB_val k = {8 + nl, key}, v;
  int rc = mdb_get(txn, s->db_tensors, &k, &v);
  if (rc == MDB_NOTFOUND)
    return qs__fail(QINS_ENO_TENSOR, "model %s has no tensor \"%s\"", model, name);
  if (rc) return qs__mdb_fail(s, rc, "reading a tensor");
  rc = qs__tensor_decode(s, txn, model, &v, out, tr);
  if (rc) return rc;
  out->model_id = id;
  return 0;
}

/* t's lookup cache for its current snapshot and mapping (emptied if either changed), or NULL
 * (no memory, or $QINS_VERIFY=always: every read then checks its chunks again). Holding t, no
 * resize can run (it waits for active == 0), so map_gen is stable here. */
static qs__tcache *qs__tc(qs_txn *t) {
  if (t->s->verify_always) return NULL;
  uint64_t id = mdb_txn_id(t->txn), gen = t->s->map_gen;
  qs__tcache *tc = t->tc;
  if (!tc) {
    if (!(tc = t->tc = calloc(1, sizeof *tc))) return NULL;
  } else if (tc->txnid == id && tc->map_gen == gen) {
    return tc;
  } else {
    for (int i = 0; i < QS_TCACHE; i++) tc->ten[i].hash = 0;
    memset(tc->chunk, 0, sizeof tc->chunk);
  }
  tc->txnid = id;
  tc->map_gen = gen;
  return tc;
}

int qs_tensor_get(qs_txn *t, const char *model, const char *name, qs_tensor *out) {
  qs__tcache *tc = qs__tc(t);
  uint64_t h = 0;
  size_t slot = 0;
  if (tc) {
    h = qs__hash64(name, strlen(name), qs__hash64(model, strlen(model), 0)) | 1;
    slot = (size_t)(h % QS_TCACHE);
    if (tc->ten[slot].hash == h && !strcmp(tc->ten[slot].t.name, name) &&
        !strcmp(tc->ten[slot].t.model, model)) {
      *out = tc->ten[slot].t;
      return 0;
    }
  }
  qs_model m;
  int rc = qs__model_lookup(t, model, &m);
  if (rc) return rc;
  qs__trec tr;
  rc = qs__tensor_get_id(t->s, t->txn, m.id, m.name, name, out, &tr);
  if (rc == 0 && tc) {
    tc->ten[slot].hash = h;
    tc->ten[slot].t = *out;
  }
  return rc;
}

int qs_tensor_cost_get(qs_txn *t, const qs_tensor *ten, qs_tensor_cost *out) {
  qs__trec tr;
  qs_tensor tmp;
  int rc = qs__tensor_get_id(t->s, t->txn, ten->model_id, ten->model, ten->name, &tmp, &tr);
  if (rc) return rc;
  out->data_bytes = tr.data_bytes;
  out->params_bytes = tr.params_bytes;
  out->params_id = tr.params_id;
  out->params_first = !!(tr.flags & QS_TF_PARAMS_FIRST);
  out->checksum = tr.tensor_crc;
  return 0;
}

int qs_slice_shape(const qs_tensor *t, const qs_slice *sl, uint64_t shape[QS_MAX_NDIM],
                   uint64_t *n_elem) {
  int sd = sl ? sl->ndim : 0;
  if (sd < 0 || sd > t->ndim)
    return qs__fail(QINS_EBAD_SLICE, "tensor %s/%s: %d slice ranges for %d dimensions", t->model,
                    t->name, sd, t->ndim);
  uint64_t n = 1;
  for (int i = 0; i < t->ndim; i++) {
    uint64_t a = 0, b = t->shape[i];
    if (i < sd) {
      a = sl->start[i];
      b = sl->stop[i];
      if (a > b || b > t->shape[i])
        return qs__fail(QINS_EBAD_SLICE,
                        "tensor %s/%s: range [%llu, %llu) on dimension %d of size %llu is %s",
                        t->model, t->name, (unsigned long long)a, (unsigned long long)b, i,
                        (unsigned long long)t->shape[i], a > b ? "reversed" : "out of range");
    }
    shape[i] = b - a;
    n *= b - a; /* bounded by n_elem */
  }
  for (int i = t->ndim; i < QS_MAX_NDIM; i++) shape[i] = 0;
  *n_elem = n;
  return 0;
}

/* A validated chunk within one read call. */
typedef struct qs__chunk_ref {
  uint64_t idx;          /* chunk index, UINT64_MAX = none */
  const uint8_t *data;   /* payload, in the map */
  uint64_t n_rows;       /* rows in this chunk */
} qs__chunk_ref;

static uint64_t qs__chunk_payload(const qs_tensor *t, uint64_t rows) {
  if (t->codec == QS_RAW) return rows * t->row_len * qs_dtype_size(t->src_dtype);
  return qc_chunk_bytes((qc_codec)t->codec, t->row_len, rows, NULL);
}

int qs__chunk_rec_check(const qs_tensor *t, uint64_t ci, const uint8_t *p, size_t size, int verify,
                        uint64_t *rows_out) {
  uint64_t rows = t->rows_per_chunk;
  if (ci >= t->n_chunks)
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu of %llu", t->model, t->name,
                    (unsigned long long)ci, (unsigned long long)t->n_chunks);
  if (ci == t->n_chunks - 1) rows = t->n_rows - ci * t->rows_per_chunk;
  uint64_t want = qs__chunk_payload(t, rows);
  if (size < QS_CHUNK_HDR || size - QS_CHUNK_HDR != want || memcmp(p, QS_MAGIC_CHUNK, 4) ||
      qs__get_u64(p + 8) != want)
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu is malformed (%zu bytes, %llu expected)",
                    t->model, t->name, (unsigned long long)ci,
                    size < QS_CHUNK_HDR ? (size_t)0 : size - QS_CHUNK_HDR, (unsigned long long)want);
  *rows_out = rows;
  if (!verify) return 0;
  if (qs__crc32c(0, p + QS_CHUNK_HDR, want) != qs__get_u32(p + 4))
    return qs__fail(QINS_ECHECKSUM, "tensor %s/%s: chunk %llu fails its checksum", t->model,
                    t->name, (unsigned long long)ci);
  if (t->codec != QS_RAW && qc_chunk_validate(&t->params, t->row_len, rows, p + QS_CHUNK_HDR))
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu holds invalid codec data", t->model,
                    t->name, (unsigned long long)ci);
  return 0;
}

/* Finds chunk ci of t, checked (and, the first time this process reads it or with full_check,
 * verified: CRC and codec data); tc (may be NULL) remembers it for later reads in this snapshot. */
static int qs__chunk_fetch(qs_store *s, MDB_txn *txn, qs__tcache *tc, const qs_tensor *t,
                           uint64_t ci, qs__chunk_ref *ref, int full_check) {
  if (ref->idx == ci) return 0;
  uint8_t key[16];
  qs__put_be64(key, t->model_id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)ci);
  uint64_t h = qs__hash64(key, 16, 0);
  size_t cslot = (size_t)(h % QS_CCACHE);
  if (tc && !full_check && !memcmp(tc->chunk[cslot].key, key, 16)) {
    ref->idx = ci;
    ref->data = tc->chunk[cslot].data;
    ref->n_rows = tc->chunk[cslot].n_rows;
    return 0;
  }
  MDB_val k = {16, key}, v;
  int rc = mdb_get(txn, s->db_chunks, &k, &v);
  if (rc == MDB_NOTFOUND)
    return qs__fail(QINS_ECORRUPT, "tensor %s/%s: chunk %llu is missing", t->model, t->name,
                    (unsigned long long)ci);
  if (rc) return qs__mdb_fail(s, rc, "reading a chunk");
  uint64_t rows;
  const uint8_t *p = v.mv_data;
  if ((rc = qs__chunk_rec_check(t, ci, p, v.mv_size, 0, &rows))) return rc;
  size_t slot = (size_t)(h % QS_VCACHE);
  int known = 0;
  if (!full_check && !s->verify_always && s->vkeys) {
    pthread_mutex_lock(&s->vmu);
    known = !memcmp(s->vkeys[slot], key, 16);
    pthread_mutex_unlock(&s->vmu);
  }
  if (!known) {
    if ((rc = qs__chunk_rec_check(t, ci, p, v.mv_size, 1, &rows))) return rc;
    if (s->vkeys) {
      pthread_mutex_lock(&s->vmu);
      memcpy(s->vkeys[slot], key, 16);
      pthread_mutex_unlock(&s->vmu);
    }
  }
  ref->idx = ci;
  ref->data = p + QS_CHUNK_HDR;
  ref->n_rows = rows;
  if (tc) {
    memcpy(tc->chunk[cslot].key, key, 16);
    tc->chunk[cslot].data = ref->data;
    tc->chunk[cslot].n_rows = rows;
  }
  return 0;
}

/* Decodes source elements [a, b) of t (linear, row-major) into out. */
static int qs__read_linear(qs_store *s, MDB_txn *txn, qs__tcache *tc, const qs_tensor *t,
                           qc_dtype dt, uint64_t a, uint64_t b, uint8_t *out, qs__chunk_ref *ref,
                           size_t esz) {
  uint64_t per_chunk = t->rows_per_chunk * t->row_len;
  while (a < b) {
    uint64_t ci = a / per_chunk, c0 = ci * per_chunk;
    int rc = qs__chunk_fetch(s, txn, tc, t, ci, ref, 0);
    if (rc) return rc;
    uint64_t cend = c0 + ref->n_rows * t->row_len;
    uint64_t e = b < cend ? b : cend;
    if (t->codec == QS_RAW) {
      memcpy(out, ref->data + (a - c0) * esz, (e - a) * esz);
    } else {
      rc = qc_decode(&t->params, t->row_len, ref->n_rows, ref->data, a - c0, e - c0, dt, out);
      if (rc)
        return qs__fail(rc, "tensor %s/%s: chunk %llu: decode failed", t->model, t->name,
                        (unsigned long long)ci);
    }
    out += (e - a) * esz;
    a = e;
  }
  return 0;
}

/* The output shape of t[sl] into shp, checking that output elements [a, b) lie within it. */
static int qs__out_range(const qs_tensor *t, const qs_slice *sl, uint64_t a, uint64_t b,
                         uint64_t shp[QS_MAX_NDIM]) {
  uint64_t n;
  int rc = qs_slice_shape(t, sl, shp, &n);
  if (rc) return rc;
  if (a > b || b > n)
    return qs__fail(QINS_EBAD_SLICE, "tensor %s/%s: output range [%llu, %llu) outside %llu elements",
                    t->model, t->name, (unsigned long long)a, (unsigned long long)b,
                    (unsigned long long)n);
  return 0;
}

int qs_tensor_read(qs_txn *tx, const qs_tensor *t, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, void *out) {
  uint64_t shp[QS_MAX_NDIM];
  int rc = qs__out_range(t, sl, out_begin, out_end, shp);
  if (rc) return rc;
  if (t->codec != QS_RAW && (unsigned)dt >= QC_DT_COUNT)
    return qs__fail(QINS_EDTYPE, "tensor %s/%s: bad output dtype %d", t->model, t->name, (int)dt);
  size_t esz = t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(dt);
  qs__chunk_ref ref = {UINT64_MAX, NULL, 0};
  qs__tcache *tc = qs__tc(tx);
  uint8_t *o = out;
  int sd = sl ? sl->ndim : 0;
  if (out_begin == out_end) return 0;
  if (sd == 0 || t->ndim == 0)
    return qs__read_linear(tx->s, tx->txn, tc, t, dt, out_begin, out_end, o, &ref, esz);
  /* Runs: the last sliced dim k gives contiguous runs of len (stop_k-start_k)*inner elements. */
  int k = sd - 1;
  uint64_t inner = 1;
  for (int i = k + 1; i < t->ndim; i++) inner *= t->shape[i];
  uint64_t run = shp[k] * inner;
  uint64_t stride[QS_MAX_NDIM];
  stride[t->ndim - 1] = 1;
  for (int i = t->ndim - 2; i >= 0; i--) stride[i] = stride[i + 1] * t->shape[i + 1];
  uint64_t pos = out_begin;
  while (pos < out_end) {
    uint64_t r = pos / run, off = pos % run;
    /* Decompose run index r over dims 0..k-1 of the slice shape. */
    uint64_t src = sl->start[k] * stride[k], rr = r;
    for (int i = k - 1; i >= 0; i--) {
      uint64_t idx = rr % shp[i];
      rr /= shp[i];
      src += (sl->start[i] + idx) * stride[i];
    }
    uint64_t take = run - off;
    if (take > out_end - pos) take = out_end - pos;
    rc = qs__read_linear(tx->s, tx->txn, tc, t, dt, src + off, src + off + take, o, &ref, esz);
    if (rc) return rc;
    o += take * esz;
    pos += take;
  }
  return 0;
}

int qs_tensor_span(qs_txn *tx, const qs_tensor *t, const qs_slice *sl, qc_dtype dt,
                   uint64_t out_begin, uint64_t out_end, const void **p, uint64_t *n) {
  int sd = sl ? sl->ndim : 0;
  size_t esz;
  if (t->codec == QS_RAW) esz = qs_dtype_size(t->src_dtype);
  else if (t->codec <= QC_BF16 && t->codec == (int)dt) esz = qc_dtype_size(dt); /* same values */
  else return 0;
  if (sd > 1 || out_begin >= out_end) return 0;
  uint64_t shp[QS_MAX_NDIM];
  int rc = qs__out_range(t, sl, out_begin, out_end, shp);
  if (rc) return rc;
  uint64_t inner = t->ndim && t->shape[0] ? t->n_elem / t->shape[0] : 1;
  uint64_t src = (sd == 1 ? sl->start[0] * inner : 0) + out_begin;
  uint64_t per_chunk = t->rows_per_chunk * t->row_len, ci = src / per_chunk, c0 = ci * per_chunk;
  qs__chunk_ref ref = {UINT64_MAX, NULL, 0};
  if ((rc = qs__chunk_fetch(tx->s, tx->txn, qs__tc(tx), t, ci, &ref, 0))) return rc;
  uint64_t cend = c0 + ref.n_rows * t->row_len, e = src + (out_end - out_begin);
  if (e > cend) e = cend;
  *p = ref.data + (src - c0) * esz;
  *n = e - src;
  return 1;
}

/* ---------------------------------------------------------------------------------------------
 * Cleanup of staged ids (leftover imports, removed or replaced models) */
static int qs__stage_put(qs_store *s, MDB_txn *txn, uint64_t id, int state, const char *name) {
  size_t nl = strlen(name);
  uint8_t key[8], val[QS_STAGING_HDR + QS_MAX_NAME + 1] = {0};
  qs__put_be64(key, id);
  memcpy(val, QS_MAGIC_STAGING, 4);
  val[4] = (uint8_t)state;
  qs__put_u32(val + 8, (uint32_t)getpid());
  qs__put_u16(val + 12, (uint16_t)nl);
  memcpy(val + QS_STAGING_HDR, name, nl);
  MDB_val k = {8, key}, v = {QS_STAGING_HDR + nl + 1, val};
  return mdb_put(txn, s->db_staging, &k, &v, 0);
}

/* Drops one reference to params blob id (deleting the blob at zero). */
static int qs__params_unref(qs_store *s, MDB_txn *txn, uint64_t pid) {
  uint8_t key[8];
  qs__put_be64(key, pid);
  MDB_val k = {8, key}, v;
  int rc = mdb_get(txn, s->db_params, &k, &v);
  if (rc == MDB_NOTFOUND) return 0; /* verify reports it; cleanup must go on */
  if (rc) return rc;
  if (v.mv_size < QS_PARAMS_HDR) return mdb_del(txn, s->db_params, &k, NULL);
  uint64_t refs = qs__get_u64((const uint8_t *)v.mv_data + 8);
  if (refs <= 1) return mdb_del(txn, s->db_params, &k, NULL);
  uint8_t *copy = malloc(v.mv_size);
  if (!copy) return ENOMEM;
  memcpy(copy, v.mv_data, v.mv_size);
  qs__put_u64(copy + 8, refs - 1);
  MDB_val nv = {v.mv_size, copy};
  rc = mdb_put(txn, s->db_params, &k, &nv, 0);
  free(copy);
  return rc;
}

/* Deletes everything under model id `id` in bounded txns, then its staging entry. */
static int qs__gc_id(qs_store *s, uint64_t id) {
  uint8_t pre[8];
  qs__put_be64(pre, id);
  for (int phase = 0; phase < 2; phase++) {
    MDB_dbi dbi = phase == 0 ? s->db_chunks : s->db_tensors;
    for (;;) {
      MDB_txn *txn;
      int rc = qs__ensure_map(s, 1 << 20); /* deletions copy branch pages too */
      if (rc) return rc;
      rc = qs__begin(s, 0, &txn);
      if (rc) return qs__mdb_fail(s, rc, "cleaning up");
      MDB_cursor *c;
      if ((rc = mdb_cursor_open(txn, dbi, &c))) {
        qs__abort(s, txn);
        return qs__mdb_fail(s, rc, "cleaning up");
      }
      int n = 0;
      for (; n < QS_GC_BATCH; n++) {
        MDB_val k = {8, pre}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc || k.mv_size < 8 || memcmp(k.mv_data, pre, 8)) {
          rc = rc == MDB_NOTFOUND ? 0 : rc;
          break;
        }
        if (phase == 1 && v.mv_size >= QS_TENSOR_HDR && !memcmp(v.mv_data, QS_MAGIC_TENSOR, 4)) {
          uint64_t pid = qs__get_u64((const uint8_t *)v.mv_data + 136);
          if (pid && (rc = qs__params_unref(s, txn, pid))) break;
        }
        if ((rc = mdb_cursor_del(c, 0))) break;
      }
      mdb_cursor_close(c);
      if (rc) {
        qs__abort(s, txn);
        return qs__mdb_fail(s, rc, "cleaning up");
      }
      if ((rc = qs__commit(s, txn))) return qs__mdb_fail(s, rc, "cleaning up");
      if (n < QS_GC_BATCH) break;
    }
  }
  MDB_txn *txn;
  int rc = qs__begin(s, 0, &txn);
  if (rc) return qs__mdb_fail(s, rc, "cleaning up");
  MDB_val k = {8, pre};
  rc = mdb_del(txn, s->db_staging, &k, NULL);
  if (rc && rc != MDB_NOTFOUND) {
    qs__abort(s, txn);
    return qs__mdb_fail(s, rc, "cleaning up");
  }
  rc = qs__commit(s, txn);
  return rc ? qs__mdb_fail(s, rc, "cleaning up") : 0;
}

/* Cleans every staging entry. Caller holds the writer lock. */
static int qs__gc_all(qs_store *s) {
  for (;;) {
    MDB_txn *txn;
    int rc = qs__begin(s, MDB_RDONLY, &txn);
    if (rc) return qs__mdb_fail(s, rc, "reading staging");
    MDB_cursor *c;
    MDB_val k, v;
    uint64_t id = 0;
    if (!(rc = mdb_cursor_open(txn, s->db_staging, &c))) {
      rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
      if (!rc && k.mv_size == 8) id = qs__get_be64(k.mv_data);
      mdb_cursor_close(c);
    }
    qs__abort(s, txn);
    if (rc == MDB_NOTFOUND) return 0;
    if (rc) return qs__mdb_fail(s, rc, "reading staging");
    if (!id) return qs__fail(QINS_ECORRUPT, "store %s: bad staging key", s->dir);
    if ((rc = qs__gc_id(s, id))) return rc;
  }
}

/* ---------------------------------------------------------------------------------------------
 * Import */
struct qs_import {
  qs_store *s;            /* store */
  MDB_txn *txn;           /* open staging write txn, or NULL */
  uint64_t txn_bytes;     /* data put in txn so far */
  uint64_t id;            /* fresh model id */
  char name[QS_MAX_NAME + 1]; /* model name */
  char *metadata;         /* JSON object text */
  uint64_t n_tensors, src_bytes, stored_bytes, n_elem; /* model totals */
  uint64_t *pids;         /* params ids already paid for in this model */
  size_t n_pids, cap_pids;
  /* current tensor */
  int in_tensor;          /* between tensor_begin and tensor_end */
  qs_tensor cur;          /* its description (codec, shape, params, ...) */
  uint64_t rows_done;     /* rows encoded so far */
  uint64_t chunk_idx;     /* next chunk index */
  uint64_t data_bytes;    /* chunk payload bytes so far */
  uint32_t tcrc;          /* running crc over chunk crcs */
  qc_stats stats;         /* encode error figures */
  size_t row_bytes;       /* input bytes per row (f32 or raw) */
  uint8_t *pend;          /* buffered rows (fewer than a chunk) */
  uint64_t pend_rows;     /* rows in pend */
  uint8_t *blob;          /* serialized params */
  size_t blob_len;
  /* Parallel encoding (lossy codecs): chunks are copied into jobs that worker threads encode;
   * the importing thread puts finished jobs into LMDB in chunk order (so checksums, figures and
   * the first error are as a sequential encode would give). At most QS_JOBS_MAX jobs in flight:
   * memory stays bounded. tensor_end drains the jobs before writing the tensor's record. */
  int nw;                 /* worker threads, 0 = encode inline */
  pthread_t *workers;
  pthread_mutex_t jmu;    /* guards the job ring and job states */
  pthread_cond_t jwork;   /* a job was queued, or stop */
  pthread_cond_t jdone;   /* a job finished */
  struct qs__job *jobs;   /* ring of nw + 1 jobs */
  size_t njobs;
  uint64_t jhead, jnext, jtail; /* oldest unharvested, next for a worker, next free */
  int jstop;              /* workers exit */
  int jfailed;            /* a harvested job failed: later results are dropped */
};

typedef struct qs__job {
  qs_import *im;          /* owner */
  uint8_t *in;            /* rows (f32), copied from the caller */
  size_t in_cap;
  uint8_t *out;           /* encoded payload */
  size_t out_cap;
  uint64_t nr, row0;      /* rows, first row within the tensor */
  uint64_t pay;           /* payload bytes */
  uint32_t crc;           /* CRC-32C of the payload */
  qc_stats st;            /* this chunk's error figures */
  uint64_t bad;           /* element within the chunk when rc is ENONFINITE/EUNSUPPORTED */
  int rc;                 /* qc_encode's result */
  int state;              /* 0 free, 1 queued, 2 running, 3 done */
} qs__job;

#define QS_JOBS_MAX 9 /* in-flight chunk jobs at most (workers + 1, workers <= 8) */

static void *qs__worker(void *arg) {
  qs_import *im = arg;
  pthread_mutex_lock(&im->jmu);
  for (;;) {
    while (!im->jstop && im->jnext == im->jtail) pthread_cond_wait(&im->jwork, &im->jmu);
    if (im->jstop) break;
    qs__job *j = &im->jobs[im->jnext++ % im->njobs];
    j->state = 2;
    pthread_mutex_unlock(&im->jmu);
    const qs_tensor *t = &im->cur; /* constant while the tensor's jobs run */
    memset(&j->st, 0, sizeof j->st);
    j->bad = 0;
    j->rc = qc_encode(&t->params, t->row_len, j->nr, (const float *)j->in, j->out, &j->st, &j->bad);
    if (!j->rc) j->crc = qs__crc32c(0, j->out, j->pay);
    pthread_mutex_lock(&im->jmu);
    j->state = 3;
    pthread_cond_broadcast(&im->jdone);
  }
  pthread_mutex_unlock(&im->jmu);
  return NULL;
}

static int qs__im_txn(qs_import *im, uint64_t extra) {
  if (im->txn) return 0;
  int rc = qs__ensure_map(im->s, extra > QS_TXN_BYTES ? extra : QS_TXN_BYTES);
  if (rc) return rc;
  rc = qs__begin(im->s, 0, &im->txn);
  if (rc) return qs__mdb_fail(im->s, rc, "beginning a write transaction");
  im->txn_bytes = 0;
  return 0;
}

static int qs__im_flush(qs_import *im) {
  if (!im->txn) return 0;
  int rc = qs__commit(im->s, im->txn);
  im->txn = NULL;
  return rc ? qs__mdb_fail(im->s, rc, "committing staged data") : 0;
}

int qs_import_begin(qs_store *s, const char *model, const char *metadata_json, qs_import **out) {
  *out = NULL;
  int rc = qs__name_check("model", model, 1);
  if (rc) return rc;
  if ((rc = qs__lock(s))) return rc;
  if ((rc = qs__gc_all(s))) {
    qs__unlock(s);
    return rc;
  }
  qs_import *im = calloc(1, sizeof *im);
  if (!im || !(im->metadata = strdup(metadata_json && *metadata_json ? metadata_json : "{}"))) {
    if (im) free(im);
    qs__unlock(s);
    return qs__fail(QINS_ENOMEM, "out of memory");
  }
  im->s = s;
  snprintf(im->name, sizeof im->name, "%s", model);
  if ((rc = qs__im_txn(im, 1 << 20))) goto fail;
  MDB_val k = {4, "qins"}, v;
  if ((rc = mdb_get(im->txn, s->db_meta, &k, &v)) || v.mv_size < QS_META_SIZE) {
    rc = rc ? qs__mdb_fail(s, rc, "reading meta") : qs__fail(QINS_ECORRUPT, "store %s: bad meta", s->dir);
    goto fail;
  }
  uint8_t meta[QS_META_SIZE];
  memcpy(meta, v.mv_data, QS_META_SIZE);
  im->id = qs__get_u64(meta + 16);
  qs__put_u64(meta + 16, im->id + 1);
  v.mv_data = meta;
  if ((rc = mdb_put(im->txn, s->db_meta, &k, &v, 0)) ||
      (rc = qs__stage_put(s, im->txn, im->id, QS_STAGE_IMPORTING, model))) {
    rc = qs__mdb_fail(s, rc, "starting an import");
    goto fail;
  }
  if ((rc = qs__im_flush(im))) goto fail;
  /* Encoding threads: $QINS_IMPORT_THREADS, else one per online CPU (at most 8); 1 = inline. */
  long nw = sysconf(_SC_NPROCESSORS_ONLN);
  const char *ev = getenv("QINS_IMPORT_THREADS");
  if (ev && *ev) nw = strtol(ev, NULL, 10);
  if (nw > QS_JOBS_MAX - 1) nw = QS_JOBS_MAX - 1;
  if (nw > 1) {
    im->njobs = (size_t)nw + 1;
    im->jobs = calloc(im->njobs, sizeof *im->jobs);
    im->workers = calloc((size_t)nw, sizeof *im->workers);
    if (im->jobs && im->workers) {
      pthread_mutex_init(&im->jmu, NULL);
      pthread_cond_init(&im->jwork, NULL);
      pthread_cond_init(&im->jdone, NULL);
      for (long i = 0; i < nw; i++) {
        if (pthread_create(&im->workers[i], NULL, qs__worker, im)) break;
        im->nw++;
      }
      if (!im->nw) {
        pthread_mutex_destroy(&im->jmu);
        pthread_cond_destroy(&im->jwork);
        pthread_cond_destroy(&im->jdone);
      }
    }
  }
  *out = im;
  return 0;
fail:
  qs__abort(s, im->txn);
  free(im->metadata);
  free(im);
  qs__unlock(s);
  return rc;
}

uint64_t qs_import_chunk_rows(const qs_import *im) { return im->in_tensor ? im->cur.rows_per_chunk : 0; }

int qs_import_tensor_begin(qs_import *im, const qs_tensor_desc *d) {
  if (im->in_tensor) return qs__fail(QINS_EINVALID, "tensor_begin inside a tensor");
  int rc = qs__name_check("tensor", d->name, 0);
  if (rc) return rc;
  if (d->ndim < 0 || d->ndim > QS_MAX_NDIM)
    return qs__fail(QINS_EUNSUPPORTED, "tensor %s: %d dimensions (at most %d)", d->name, d->ndim,
                    QS_MAX_NDIM);
  if ((unsigned)d->src_dtype >= QS_DT_COUNT)
    return qs__fail(QINS_EDTYPE, "tensor %s: bad source dtype", d->name);
  if (d->codec != QS_RAW && (d->codec < 0 || d->codec >= QC_CODEC_COUNT || !d->params ||
                             (int)d->params->codec != d->codec))
    return qs__fail(QINS_EINVALID, "tensor %s: bad codec or parameters", d->name);
  qs_tensor *t = &im->cur;
  memset(t, 0, sizeof *t);
  snprintf(t->model, sizeof t->model, "%s", im->name);
  snprintf(t->name, sizeof t->name, "%s", d->name);
  t->model_id = im->id;
  t->index = (uint32_t)im->n_tensors;
  t->ndim = d->ndim;
  uint64_t n = 1;
  for (int i = 0; i < d->ndim; i++) {
    t->shape[i] = d->shape[i];
    if (__builtin_mul_overflow(n, d->shape[i], &n))
      return qs__fail(QINS_EINVALID, "tensor %s: element count overflows", d->name);
  }
  t->n_elem = n;
  t->row_len = d->ndim ? d->shape[d->ndim - 1] : 1;
  t->n_rows = t->row_len ? n / t->row_len : 0;
  t->codec = d->codec;
  t->src_dtype = d->src_dtype;
  if (__builtin_mul_overflow(n, (uint64_t)qs_dtype_size(d->src_dtype), &t->src_bytes))
    return qs__fail(QINS_EINVALID, "tensor %s: size overflows", d->name);
  if (d->src_bytes) t->src_bytes = d->src_bytes;
  uint64_t row_stored;
  int ovf = 0;
  if (d->codec == QS_RAW) {
    row_stored = t->row_len * qs_dtype_size(d->src_dtype);
    im->row_bytes = (size_t)row_stored;
  } else {
    t->params = *d->params;
    row_stored = qc_chunk_bytes((qc_codec)d->codec, t->row_len, 1, &ovf);
    im->row_bytes = (size_t)(t->row_len * sizeof(float));
  }
  if (ovf || (t->row_len && !row_stored && t->row_len))
    return qs__fail(QINS_EUNSUPPORTED, "tensor %s: rows too large", d->name);
  t->rows_per_chunk = row_stored ? QS_CHUNK_TARGET / row_stored : 1;
  if (t->rows_per_chunk == 0) t->rows_per_chunk = 1;
  if (t->rows_per_chunk > t->n_rows && t->n_rows) t->rows_per_chunk = t->n_rows;
  if (!t->n_rows) t->rows_per_chunk = 1;
  t->n_chunks = t->n_rows ? (t->n_rows + t->rows_per_chunk - 1) / t->rows_per_chunk : 0;
  if (t->n_chunks > UINT32_MAX)
    return qs__fail(QINS_EUNSUPPORTED, "tensor %s: too many chunks", d->name);
  /* Duplicate name within the model? */
  if ((rc = qs__im_txn(im, QS_CHUNK_TARGET))) return rc;
  uint8_t key[8 + QS_MAX_NAME];
  size_t nl = strlen(d->name);
  qs__put_be64(key, im->id);
  memcpy(key + 8, d->name, nl);
  MDB_val k = {8 + nl, key}, v;
  rc = mdb_get(im->txn, im->s->db_tensors, &k, &v);
  if (rc == 0) return qs__fail(QINS_EINVALID, "tensor \"%s\" appears twice in the model", d->name);
  if (rc != MDB_NOTFOUND) return qs__mdb_fail(im->s, rc, "checking a tensor name");
  free(im->pend); /* allocated on first need: callers feeding whole chunks never need it */
  im->pend = NULL;
  im->pend_rows = 0;
  im->rows_done = 0;
  im->chunk_idx = 0;
  im->data_bytes = 0;
  im->tcrc = 0;
  memset(&im->stats, 0, sizeof im->stats);
  free(im->blob);
  im->blob = NULL;
  im->blob_len = 0;
  if (d->codec != QS_RAW && (im->blob_len = qc_params_size((qc_codec)d->codec))) {
    im->blob = malloc(im->blob_len);
    if (!im->blob) return qs__fail(QINS_ENOMEM, "out of memory");
    qc_params_write(d->params, im->blob);
  }
  im->in_tensor = 1;
  return 0;
}

/* Encodes nr rows at src as chunk im->chunk_idx. */
static int qs__im_chunk_sync(qs_import *im, const uint8_t *src, uint64_t nr, uint64_t *bad_index) {
  qs_tensor *t = &im->cur;
  uint64_t pay = qs__chunk_payload(t, nr);
  int rc = qs__im_txn(im, pay + QS_CHUNK_HDR);
  if (rc) return rc;
  uint8_t key[16];
  qs__put_be64(key, im->id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)im->chunk_idx);
  MDB_val k = {16, key}, v = {QS_CHUNK_HDR + pay, NULL};
  rc = mdb_put(im->txn, im->s->db_chunks, &k, &v, MDB_RESERVE);
  if (rc) return qs__mdb_fail(im->s, rc, "writing a chunk");
  uint8_t *dst = v.mv_data;
  if (t->codec == QS_RAW) {
    memcpy(dst + QS_CHUNK_HDR, src, pay);
  } else {
    uint64_t bad = 0;
    qc_stats cs; /* per chunk, merged as the threaded path merges: same figures either way */
    memset(&cs, 0, sizeof cs);
    rc = qc_encode(&t->params, t->row_len, nr, (const float *)src, dst + QS_CHUNK_HDR, &cs, &bad);
    im->stats.sum_sq += cs.sum_sq;
    im->stats.err_sq += cs.err_sq;
    if (cs.max_err > im->stats.max_err) im->stats.max_err = cs.max_err;
    im->stats.n += cs.n;
    if (rc == QINS_ENONFINITE || rc == QINS_EUNSUPPORTED) {
      uint64_t at = im->rows_done * t->row_len + bad;
      if (bad_index) *bad_index = at;
      return qs__fail(rc, "tensor %s: element %llu %s; codec %s refuses it", t->name,
                      (unsigned long long)at,
                      rc == QINS_ENONFINITE ? "is NaN or infinite" : "is out of range",
                      qc_codec_name((qc_codec)t->codec));
    }
    if (rc) return qs__fail(rc, "tensor %s: encode failed (%s)", t->name, qins_strerror(rc));
  }
  memcpy(dst, QS_MAGIC_CHUNK, 4);
  uint32_t crc = qs__crc32c(0, dst + QS_CHUNK_HDR, pay);
  qs__put_u32(dst + 4, crc);
  qs__put_u64(dst + 8, pay);
  uint8_t cb[4];
  qs__put_u32(cb, crc);
  im->tcrc = qs__crc32c(im->tcrc, cb, 4);
  im->chunk_idx++;
  im->rows_done += nr;
  im->data_bytes += pay;
  im->txn_bytes += pay + QS_CHUNK_HDR;
  if (im->txn_bytes >= QS_TXN_BYTES) return qs__im_flush(im);
  return 0;
}

/* Puts the oldest job (waiting for it) into LMDB. */
static int qs__im_harvest(qs_import *im, uint64_t *bad_index) {
  qs__job *j = &im->jobs[im->jhead % im->njobs];
  pthread_mutex_lock(&im->jmu);
  while (j->state != 3) pthread_cond_wait(&im->jdone, &im->jmu);
  j->state = 0;
  im->jhead++;
  pthread_mutex_unlock(&im->jmu);
  if (im->jfailed) return QINS_EINTERNAL; /* already reported */
  qs_tensor *t = &im->cur;
  int rc = j->rc;
  if (rc) {
    im->jfailed = 1;
    uint64_t at = j->row0 * t->row_len + j->bad;
    if (bad_index) *bad_index = at;
    if (rc == QINS_ENONFINITE || rc == QINS_EUNSUPPORTED)
      return qs__fail(rc, "tensor %s: element %llu %s; codec %s refuses it", t->name,
                      (unsigned long long)at,
                      rc == QINS_ENONFINITE ? "is NaN or infinite" : "is out of range",
                      qc_codec_name((qc_codec)t->codec));
    return qs__fail(rc, "tensor %s: encode failed (%s)", t->name, qins_strerror(rc));
  }
  if ((rc = qs__im_txn(im, j->pay + QS_CHUNK_HDR))) goto fail;
  uint8_t key[16];
  qs__put_be64(key, im->id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)im->chunk_idx);
  MDB_val k = {16, key}, v = {QS_CHUNK_HDR + j->pay, NULL};
  if ((rc = mdb_put(im->txn, im->s->db_chunks, &k, &v, MDB_RESERVE))) {
    rc = qs__mdb_fail(im->s, rc, "writing a chunk");
    goto fail;
  }
  uint8_t *dst = v.mv_data;
  memcpy(dst, QS_MAGIC_CHUNK, 4);
  qs__put_u32(dst + 4, j->crc);
  qs__put_u64(dst + 8, j->pay);
  memcpy(dst + QS_CHUNK_HDR, j->out, j->pay);
  uint8_t cb[4];
  qs__put_u32(cb, j->crc);
  im->tcrc = qs__crc32c(im->tcrc, cb, 4);
  im->stats.sum_sq += j->st.sum_sq;
  im->stats.err_sq += j->st.err_sq;
  if (j->st.max_err > im->stats.max_err) im->stats.max_err = j->st.max_err;
  im->stats.n += j->st.n;
  im->chunk_idx++;
  im->data_bytes += j->pay;
  im->txn_bytes += j->pay + QS_CHUNK_HDR;
  if (im->txn_bytes >= QS_TXN_BYTES && (rc = qs__im_flush(im))) goto fail;
  return 0;
fail:
  im->jfailed = 1;
  return rc;
}

/* Waits for every job and puts them; the first error wins. */
static int qs__im_drain(qs_import *im, uint64_t *bad_index) {
  int first = 0;
  while (im->jhead != im->jtail) {
    int rc = qs__im_harvest(im, bad_index);
    if (rc && !first) first = rc;
  }
  return first;
}

/* Encodes nr rows at src as the next chunk: queued for a worker (lossy codecs, workers present),
 * else inline. */
static int qs__im_chunk(qs_import *im, const uint8_t *src, uint64_t nr, uint64_t *bad_index) {
  qs_tensor *t = &im->cur;
  if (!im->nw || t->codec == QS_RAW || !qc_codec_is_lossy((qc_codec)t->codec))
    return qs__im_chunk_sync(im, src, nr, bad_index);
  if (im->jfailed) return QINS_EINTERNAL;
  int rc;
  while (im->jtail - im->jhead >= im->njobs)
    if ((rc = qs__im_harvest(im, bad_index))) return rc;
  qs__job *j = &im->jobs[im->jtail % im->njobs];
  size_t in = (size_t)nr * im->row_bytes;
  uint64_t pay = qs__chunk_payload(t, nr);
  if (j->in_cap < in) {
    free(j->in);
    j->in_cap = 0;
    if (!(j->in = malloc(in))) return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    j->in_cap = in;
  }
  if (j->out_cap < pay) {
    free(j->out);
    j->out_cap = 0;
    if (!(j->out = malloc(pay ? pay : 1))) return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    j->out_cap = pay;
  }
  memcpy(j->in, src, in);
  j->nr = nr;
  j->row0 = im->rows_done;
  j->pay = pay;
  im->rows_done += nr;
  pthread_mutex_lock(&im->jmu);
  j->state = 1;
  im->jtail++;
  pthread_cond_signal(&im->jwork);
  pthread_mutex_unlock(&im->jmu);
  /* Put whatever is already finished, without waiting. */
  for (;;) {
    qs__job *h = &im->jobs[im->jhead % im->njobs];
    pthread_mutex_lock(&im->jmu);
    int ready = im->jhead != im->jtail && h->state == 3;
    pthread_mutex_unlock(&im->jmu);
    if (!ready) break;
    if ((rc = qs__im_harvest(im, bad_index))) return rc;
  }
  return 0;
}

int qs_import_tensor_rows(qs_import *im, const void *rows, uint64_t n_rows, uint64_t *bad_index) {
  if (!im->in_tensor) return qs__fail(QINS_EINVALID, "rows outside a tensor");
  qs_tensor *t = &im->cur;
  if (n_rows > t->n_rows - im->rows_done - im->pend_rows)
    return qs__fail(QINS_EINVALID, "tensor %s: more rows than its shape holds", t->name);
  const uint8_t *src = rows;
  uint64_t rpc = t->rows_per_chunk;
  int rc;
  while (n_rows) {
    if (im->pend_rows == 0 && (n_rows >= rpc || im->rows_done + n_rows == t->n_rows)) {
      uint64_t nr = n_rows < rpc ? n_rows : rpc;
      if ((rc = qs__im_chunk(im, src, nr, bad_index))) return rc;
      src += nr * im->row_bytes;
      n_rows -= nr;
      continue;
    }
    uint64_t take = rpc - im->pend_rows;
    if (take > n_rows) take = n_rows;
    if (!im->pend && !(im->pend = malloc((size_t)rpc * im->row_bytes)))
      return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    memcpy(im->pend + im->pend_rows * im->row_bytes, src, take * im->row_bytes);
    im->pend_rows += take;
    src += take * im->row_bytes;
    n_rows -= take;
    if (im->pend_rows == rpc || im->rows_done + im->pend_rows == t->n_rows) {
      uint64_t nr = im->pend_rows;
      im->pend_rows = 0;
      if ((rc = qs__im_chunk(im, im->pend, nr, bad_index))) return rc;
    }
  }
  return 0;
}

static int qs__im_params_ref(qs_import *im, uint64_t *pid_out, int *first) {
  uint8_t seedb = (uint8_t)im->cur.codec;
  uint64_t id = qs__hash64(im->blob, im->blob_len, 0x51494e53u + seedb);
  for (int probe = 0; probe < 64; probe++, id++) {
    if (!id) id = 1;
    uint8_t key[8];
    qs__put_be64(key, id);
    MDB_val k = {8, key}, v;
    int rc = mdb_get(im->txn, im->s->db_params, &k, &v);
    if (rc == MDB_NOTFOUND) {
      MDB_val nv = {QS_PARAMS_HDR + im->blob_len, NULL};
      if ((rc = mdb_put(im->txn, im->s->db_params, &k, &nv, MDB_RESERVE))) return rc;
      uint8_t *p = nv.mv_data;
      memset(p, 0, QS_PARAMS_HDR);
      memcpy(p, QS_MAGIC_PARAMS, 4);
      p[4] = seedb;
      qs__put_u64(p + 8, 1);
      qs__put_u32(p + 16, (uint32_t)im->blob_len);
      qs__put_u32(p + 20, qs__crc32c(0, im->blob, im->blob_len));
      memcpy(p + QS_PARAMS_HDR, im->blob, im->blob_len);
      break;
    }
    if (rc) return rc;
    const uint8_t *p = v.mv_data;
    if (v.mv_size == QS_PARAMS_HDR + im->blob_len && p[4] == seedb &&
        !memcmp(p + QS_PARAMS_HDR, im->blob, im->blob_len)) {
      uint8_t *copy = malloc(v.mv_size);
      if (!copy) return ENOMEM;
      memcpy(copy, p, v.mv_size);
      qs__put_u64(copy + 8, qs__get_u64(p + 8) + 1);
      MDB_val nv = {v.mv_size, copy};
      rc = mdb_put(im->txn, im->s->db_params, &k, &nv, 0);
      free(copy);
      if (rc) return rc;
      break;
    }
  }
  *pid_out = id;
  *first = 1;
  for (size_t i = 0; i < im->n_pids; i++)
    if (im->pids[i] == id) *first = 0;
  if (*first) {
    if (im->n_pids == im->cap_pids) {
      size_t nc = im->cap_pids ? 2 * im->cap_pids : 16;
      uint64_t *np = realloc(im->pids, nc * sizeof *np);
      if (!np) return ENOMEM;
      im->pids = np;
      im->cap_pids = nc;
    }
    im->pids[im->n_pids++] = id;
  }
  return 0;
}

int qs_import_tensor_end(qs_import *im, qs_tensor *st) {
  if (!im->in_tensor) return qs__fail(QINS_EINVALID, "tensor_end outside a tensor");
  qs_tensor *t = &im->cur;
  int drc = qs__im_drain(im, NULL);
  if (drc) return drc;
  if (im->rows_done != t->n_rows)
    return qs__fail(QINS_EINVALID, "tensor %s: %llu of %llu rows were given", t->name,
                    (unsigned long long)(im->rows_done + im->pend_rows),
                    (unsigned long long)t->n_rows);
  int rc = qs__im_txn(im, 1 << 20);
  if (rc) return rc;
  uint64_t pid = 0;
  int first = 0;
  if (im->blob_len && (rc = qs__im_params_ref(im, &pid, &first)))
    return qs__mdb_fail(im->s, rc, "writing codec parameters");
  /* SNR and max error as measured by the encoder (+inf / 0 when nothing was lost). */
  t->snr_db = t->codec != QS_RAW && im->stats.n ? qc_stats_snr_db(&im->stats) : INFINITY;
  t->max_err = t->codec != QS_RAW ? im->stats.max_err : 0;
  size_t nl = strlen(t->name);
  uint8_t rec[QS_TENSOR_HDR + QS_MAX_NAME + 1] = {0};
  memcpy(rec, QS_MAGIC_TENSOR, 4);
  qs__put_u16(rec + 4, QS_FORMAT_VERSION);
  rec[6] = (uint8_t)t->codec;
  rec[7] = (uint8_t)t->src_dtype;
  rec[8] = (uint8_t)t->ndim;
  rec[9] = first ? QS_TF_PARAMS_FIRST : 0;
  qs__put_u16(rec + 10, (uint16_t)nl);
  qs__put_u32(rec + 12, t->index);
  for (int i = 0; i < QS_MAX_NDIM; i++) qs__put_u64(rec + 16 + 8 * i, t->shape[i]);
  qs__put_u64(rec + 80, t->n_elem);
  qs__put_u64(rec + 88, t->row_len);
  qs__put_u64(rec + 96, t->n_rows);
  qs__put_u64(rec + 104, t->rows_per_chunk);
  qs__put_u64(rec + 112, t->n_chunks);
  qs__put_u64(rec + 120, t->src_bytes);
  qs__put_u64(rec + 128, im->data_bytes);
  qs__put_u64(rec + 136, pid);
  qs__put_u32(rec + 144, (uint32_t)im->blob_len);
  qs__put_u32(rec + 148, im->tcrc);
  qs__put_f64(rec + 152, t->snr_db);
  qs__put_f64(rec + 160, t->max_err);
  memcpy(rec + QS_TENSOR_HDR, t->name, nl);
  uint8_t key[8 + QS_MAX_NAME];
  qs__put_be64(key, im->id);
  memcpy(key + 8, t->name, nl);
  MDB_val k = {8 + nl, key}, v = {QS_TENSOR_HDR + nl + 1, rec};
  rc = mdb_put(im->txn, im->s->db_tensors, &k, &v, MDB_NOOVERWRITE);
  if (rc == MDB_KEYEXIST)
    return qs__fail(QINS_EINVALID, "tensor \"%s\" appears twice in the model", t->name);
  if (rc) return qs__mdb_fail(im->s, rc, "writing a tensor record");
  t->stored_bytes = im->data_bytes + (first ? im->blob_len : 0);
  im->n_tensors++;
  im->src_bytes += t->src_bytes;
  im->stored_bytes += t->stored_bytes;
  im->n_elem += t->n_elem;
  im->in_tensor = 0;
  if (st) *st = *t;
  return 0;
}

static void qs__im_free(qs_import *im) {
  im->jfailed = 1; /* pending results are dropped, never put */
  if (im->nw) {
    qs__im_drain(im, NULL); /* results dropped: nothing may run while we free */
    pthread_mutex_lock(&im->jmu);
    im->jstop = 1;
    pthread_cond_broadcast(&im->jwork);
    pthread_mutex_unlock(&im->jmu);
    for (int i = 0; i < im->nw; i++) pthread_join(im->workers[i], NULL);
    pthread_mutex_destroy(&im->jmu);
    pthread_cond_destroy(&im->jwork);
    pthread_cond_destroy(&im->jdone);
  }
  for (size_t i = 0; im->jobs && i < im->njobs; i++) {
    free(im->jobs[i].in);
    free(im->jobs[i].out);
  }
  free(im->jobs);
  free(im->workers);
  free(im->metadata);
  free(im->pids);
  free(im->pend);
  free(im->blob);
  free(im);
}

void qs_import_abort(qs_import *im) {
  if (!im) return;
  qs_store *s = im->s;
  char msg[sizeof qs__errbuf];
  snprintf(msg, sizeof msg, "%s", qs__errbuf); /* keep the error that caused the abort */
  qs__abort(s, im->txn);
  im->txn = NULL;
  qs__gc_id(s, im->id);
  qs__im_free(im);
  qs__unlock(s);
  snprintf(qs__errbuf, sizeof qs__errbuf, "%s", msg);
}

int qs_import_commit(qs_import *im) {
  qs_store *s = im->s;
  int rc;
  if (im->in_tensor) {
    rc = qs__fail(QINS_EINVALID, "commit inside tensor %s", im->cur.name);
    qs_import_abort(im);
    return rc;
  }
  if ((rc = qs__im_flush(im))) {
    qs_import_abort(im);
    return rc;
  }
  size_t nl = strlen(im->name), ml = strlen(im->metadata);
  size_t rl = QS_MODEL_HDR + nl + 1 + ml + 1;
  uint8_t *rec = calloc(1, rl);
  if (!rec) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    qs_import_abort(im);
    return rc;
  }
  memcpy(rec, QS_MAGIC_MODEL, 4);
  qs__put_u16(rec + 4, QS_FORMAT_VERSION);
  qs__put_u16(rec + 6, (uint16_t)nl);
  qs__put_u64(rec + 8, im->id);
  qs__put_u64(rec + 16, im->n_tensors);
  qs__put_u64(rec + 24, im->src_bytes);
  qs__put_u64(rec + 32, im->stored_bytes);
  qs__put_u64(rec + 40, im->n_elem);
  qs__put_u64(rec + 48, (uint64_t)time(NULL));
  qs__put_u32(rec + 56, (uint32_t)ml);
  memcpy(rec + QS_MODEL_HDR, im->name, nl);
  memcpy(rec + QS_MODEL_HDR + nl + 1, im->metadata, ml);
  uint64_t old = 0;
  if ((rc = qs__im_txn(im, rl))) goto fail;
  MDB_val k = {nl, im->name}, v;
  rc = mdb_get(im->txn, s->db_models, &k, &v);
  if (rc == 0 && v.mv_size >= QS_MODEL_HDR) old = qs__get_u64((const uint8_t *)v.mv_data + 8);
  else if (rc && rc != MDB_NOTFOUND) goto mdbfail;
  if (old && (rc = qs__stage_put(s, im->txn, old, QS_STAGE_GARBAGE, im->name))) goto mdbfail;
  v.mv_size = rl;
  v.mv_data = rec;
  if ((rc = mdb_put(im->txn, s->db_models, &k, &v, 0))) goto mdbfail;
  uint8_t sk[8];
  qs__put_be64(sk, im->id);
  MDB_val skv = {8, sk};
  if ((rc = mdb_del(im->txn, s->db_staging, &skv, NULL))) goto mdbfail;
  rc = qs__commit(s, im->txn);
  im->txn = NULL;
  if (rc) goto mdbfail;
  free(rec);
  /* The model is visible. Reclaim the replaced one (a failure here leaves staging for later). */
  if (old) qs__gc_id(s, old);
  qs__errbuf[0] = 0;
  qs__im_free(im);
  qs__unlock(s);
  return 0;
mdbfail:
  rc = qs__mdb_fail(s, rc, "publishing the model");
fail:
  free(rec);
  qs_import_abort(im);
  return rc;
}

int qs_model_remove(qs_store *s, const char *model) {
  int rc = qs__name_check("model", model, 1);
  if (rc) return rc;
  if ((rc = qs__lock(s))) return rc;
  if ((rc = qs__gc_all(s))) goto out;
  if ((rc = qs__ensure_map(s, 1 << 20))) goto out;
  MDB_txn *txn;
  if ((rc = qs__begin(s, 0, &txn))) {
    rc = qs__mdb_fail(s, rc, "removing a model");
    goto out;
  }
  MDB_val k = {strlen(model), (void *)model}, v;
  rc = mdb_get(txn, s->db_models, &k, &v);
  if (rc == MDB_NOTFOUND) {
    qs__abort(s, txn);
    rc = qs__fail(QINS_ENO_MODEL, "no model \"%s\" in store %s", model, s->dir);
    goto out;
  }
  uint64_t id = 0;
  if (!rc && v.mv_size >= QS_MODEL_HDR) id = qs__get_u64((const uint8_t *)v.mv_data + 8);
  if (rc || (rc = qs__stage_put(s, txn, id, QS_STAGE_GARBAGE, model)) ||
      (rc = mdb_del(txn, s->db_models, &k, NULL))) {
    qs__abort(s, txn);
    rc = qs__mdb_fail(s, rc, "removing a model");
    goto out;
  }
  if ((rc = qs__commit(s, txn))) {
    rc = qs__mdb_fail(s, rc, "removing a model");
    goto out;
  }
  rc = qs__gc_id(s, id);
out:
  qs__unlock(s);
  return rc;
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

typedef struct qs__vctx {
  qs_store *s;
  MDB_txn *txn;
  qs_problem_cb cb;
  void *ud;
  uint64_t problems, checked;
  float *buf;        /* decode scratch */
  uint64_t buf_elems;
  /* params refs counted by the walk (NULL model only) */
  uint64_t *pid, *pcount;
  size_t np, capp;
  /* per-model sums of the tensor records, compared with the model record */
  uint64_t m_tensors, m_elem, m_src, m_stored;
} qs__vctx;

__attribute__((format(printf, 2, 3))) static void qs__vprob(qs__vctx *v, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  v->problems++;
  if (v->cb) v->cb(v->ud, msg);
}

static int qs__verify_tensor(qs__vctx *vc, const qs_tensor *t) {
  vc->checked++;
  vc->m_tensors++;
  vc->m_elem += t->n_elem;
  vc->m_src += t->src_bytes;
  vc->m_stored += t->stored_bytes;
  qs__trec tr;
  qs_tensor tt;
  int rc = qs__tensor_get_id(vc->s, vc->txn, t->model_id, t->model, t->name, &tt, &tr);
  if (rc) {
    qs__vprob(vc, "%s", qs__errbuf);
    return 0;
  }
  if (tr.params_id && !vc->pid) { /* fine */ }
  if (tr.params_id && vc->pid) {
    size_t i;
    for (i = 0; i < vc->np; i++)
      if (vc->pid[i] == tr.params_id) break;
    if (i == vc->np) {
      if (vc->np == vc->capp) {
        size_t nc = vc->capp ? vc->capp * 2 : 64;
        uint64_t *a = realloc(vc->pid, nc * 8), *b = realloc(vc->pcount, nc * 8);
        if (a) vc->pid = a;
        if (b) vc->pcount = b;
        if (!a || !b) return qs__fail(QINS_ENOMEM, "out of memory");
        vc->capp = nc;
      }
      vc->pid[vc->np] = tr.params_id;
      vc->pcount[vc->np++] = 0;
    }
    vc->pcount[i]++;
  }
  uint32_t tcrc = 0;
  uint64_t data = 0;
  for (uint64_t ci = 0; ci < t->n_chunks; ci++) {
    qs__chunk_ref ref = {UINT64_MAX, NULL, 0};
    rc = qs__chunk_fetch(vc->s, vc->txn, NULL, t, ci, &ref, 1);
    if (rc) {
      qs__vprob(vc, "%s", qs__errbuf);
      return 0;
    }
    const uint8_t *hdr = ref.data - QS_CHUNK_HDR;
    tcrc = qs__crc32c(tcrc, hdr + 4, 4);
    uint64_t n = ref.n_rows * t->row_len;
    data += qs__get_u64(hdr + 8);
    if (t->codec == QS_RAW) continue;
    /* Decode in slices of at most buf_elems elements. */
    for (uint64_t a = 0; a < n; a += vc->buf_elems) {
      uint64_t b = a + vc->buf_elems < n ? a + vc->buf_elems : n;
      rc = qc_decode(&t->params, t->row_len, ref.n_rows, ref.data, a, b, QC_DT_F32, vc->buf);
      if (rc) {
        qs__vprob(vc, "tensor %s/%s: chunk %llu does not decode", t->model, t->name,
                  (unsigned long long)ci);
        return 0;
      }
    }
  }
  if (tcrc != tr.tensor_crc)
    qs__vprob(vc, "tensor %s/%s: tensor checksum mismatch (chunks swapped or replaced)", t->model,
              t->name);
  if (data != tr.data_bytes)
    qs__vprob(vc, "tensor %s/%s: chunk bytes %llu differ from the record's %llu", t->model,
              t->name, (unsigned long long)data, (unsigned long long)tr.data_bytes);
  return 0;
}

static int qs__verify_tensor_cb(void *ud, const qs_tensor *t) {
  return qs__verify_tensor(ud, t);
}

typedef struct qs__mlist {
  char (*names)[QS_MAX_NAME + 1];
  uint64_t *ids;
  size_t n, cap;
} qs__mlist;

static int qs__mlist_cb(void *ud, const qs_model *m) {
  qs__mlist *l = ud;
  if (l->n == l->cap) {
    size_t nc = l->cap ? l->cap * 2 : 16;
    void *a = realloc(l->names, nc * sizeof *l->names), *b = realloc(l->ids, nc * 8);
    if (a) l->names = a;
    if (b) l->ids = b;
    if (!a || !b) return 1;
    l->cap = nc;
  }
  snprintf(l->names[l->n], sizeof l->names[0], "%s", m->name);
  l->ids[l->n++] = m->id;
  return 0;
}

int qs_verify(qs_store *s, const char *model, qs_problem_cb cb, void *ud, uint64_t *n_problems,
              uint64_t *n_checked) {
  qs__vctx vc = {0};
  vc.s = s;
  vc.cb = cb;
  vc.ud = ud;
  vc.buf_elems = 1 << 18;
  vc.buf = malloc(vc.buf_elems * sizeof(float));
  if (!vc.buf) return qs__fail(QINS_ENOMEM, "out of memory");
  qs_txn *t;
  int rc = qs_txn_begin(s, &t);
  if (rc) {
    free(vc.buf);
    return rc;
  }
  vc.txn = t->txn;
  qs__mlist ml = {0};
  if (model) {
    qs_model m;
    if ((rc = qs__model_lookup(t, model, &m)) == 0) qs__mlist_cb(&ml, &m);
  } else {
    uint64_t dummy = 0;
    vc.pid = malloc(8);
    vc.pcount = malloc(8);
    vc.capp = 1;
    (void)dummy;
    rc = qs_models_each(t, qs__mlist_cb, &ml);
  }
  for (size_t i = 0; !rc && i < ml.n; i++) {
    vc.m_tensors = vc.m_elem = vc.m_src = vc.m_stored = 0;
    rc = qs__tensor_each_id(s, vc.txn, ml.ids[i], ml.names[i], NULL, qs__verify_tensor_cb, &vc);
    if (rc && rc != QINS_ENOMEM) {
      qs__vprob(&vc, "%s", qs__errbuf);
      rc = 0;
      continue;
    }
    /* The model record's totals must match its tensor records. */
    qs_model m;
    if (!rc && qs__model_lookup(t, ml.names[i], &m) == 0 &&
        (m.n_tensors != vc.m_tensors || m.n_elem != vc.m_elem || m.src_bytes != vc.m_src ||
         m.stored_bytes != vc.m_stored))
      qs__vprob(&vc, "model %s: record says %llu tensors / %llu elements / %llu source bytes / %llu "
                     "stored bytes, its tensors add up to %llu / %llu / %llu / %llu",
                ml.names[i], (unsigned long long)m.n_tensors, (unsigned long long)m.n_elem,
                (unsigned long long)m.src_bytes, (unsigned long long)m.stored_bytes,
                (unsigned long long)vc.m_tensors, (unsigned long long)vc.m_elem,
                (unsigned long long)vc.m_src, (unsigned long long)vc.m_stored);
  }
  if (!rc && !model) {
    /* Every params blob's refcount equals the references found (staging holds none after GC; if it
     * does, its references are counted too). */
    MDB_cursor *c;
    MDB_val k, v;
    /* Staged ids (an import in progress or killed, a removal not yet reclaimed) hold
     * references too: count their tensor records' params ids. */
    if (!mdb_cursor_open(vc.txn, s->db_staging, &c)) {
      int r2;
      for (r2 = mdb_cursor_get(c, &k, &v, MDB_FIRST); r2 == 0 && !rc;
           r2 = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 8) continue;
        uint8_t pre[8];
        memcpy(pre, k.mv_data, 8);
        MDB_cursor *tc;
        if (mdb_cursor_open(vc.txn, s->db_tensors, &tc)) continue;
        MDB_val tk = {8, pre}, tv;
        for (int r3 = mdb_cursor_get(tc, &tk, &tv, MDB_SET_RANGE); r3 == 0;
             r3 = mdb_cursor_get(tc, &tk, &tv, MDB_NEXT)) {
          if (tk.mv_size < 8 || memcmp(tk.mv_data, pre, 8)) break;
          if (tv.mv_size < QS_TENSOR_HDR) continue;
          uint64_t pid = qs__get_u64((const uint8_t *)tv.mv_data + 136);
          if (!pid) continue;
          size_t j;
          for (j = 0; j < vc.np; j++)
            if (vc.pid[j] == pid) break;
          if (j == vc.np) {
            if (vc.np == vc.capp) {
              size_t nc = vc.capp * 2;
              uint64_t *a = realloc(vc.pid, nc * 8), *b = realloc(vc.pcount, nc * 8);
              if (a) vc.pid = a;
              if (b) vc.pcount = b;
              if (!a || !b) { rc = qs__fail(QINS_ENOMEM, "out of memory"); break; }
              vc.capp = nc;
            }
            vc.pid[vc.np] = pid;
            vc.pcount[vc.np++] = 0;
          }
          vc.pcount[j]++;
        }
        mdb_cursor_close(tc);
      }
      mdb_cursor_close(c);
    }
    if (!rc && !mdb_cursor_open(vc.txn, s->db_params, &c)) {
      int r2;
      uint64_t seen = 0;
      for (r2 = mdb_cursor_get(c, &k, &v, MDB_FIRST); r2 == 0; r2 = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        uint64_t id = k.mv_size == 8 ? qs__get_be64(k.mv_data) : 0;
        uint64_t refs = v.mv_size >= QS_PARAMS_HDR ? qs__get_u64((const uint8_t *)v.mv_data + 8) : 0;
        uint64_t found = 0;
        for (size_t j = 0; j < vc.np; j++)
          if (vc.pid[j] == id) found = vc.pcount[j];
        if (found) seen++;
        if (found != refs)
          qs__vprob(&vc, "codec parameters %016llx: refcount %llu but %llu tensors use them",
                    (unsigned long long)id, (unsigned long long)refs, (unsigned long long)found);
      }
      mdb_cursor_close(c);
      if (seen != vc.np)
        qs__vprob(&vc, "%llu tensors' codec parameters are missing",
                  (unsigned long long)(vc.np - seen));
    }
  }
  qs_txn_end(t);
  free(ml.names);
  free(ml.ids);
  free(vc.buf);
  free(vc.pid);
  free(vc.pcount);
  if (n_problems) *n_problems = vc.problems;
  if (n_checked) *n_checked = vc.checked;
  return rc;
}
