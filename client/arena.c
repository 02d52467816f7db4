/* SPDX-License-Identifier: MIT */
/*
 * arena.c — libqins's side of the decoded-weights arena (client/qins.h "The arena"; wire contract
 * docs/PROTOCOL.md §4.10-4.13; overview docs/client.md "The arena").
 *
 * Design. qins_attach sends `attach`; the daemon passes its arena fd (SCM_RIGHTS) with the bytes
 * of the answer. Every receive of the connection goes through qcl__recv (recvmsg with room for
 * one control message), so the fd is taken whichever read brings those bytes, and never dropped
 * by a plain recv. MSG_CTRUNC (the fd did not fit: RLIMIT_NOFILE) fails the attach with a message
 * saying so. The fd is mapped PROT_READ, MAP_SHARED once and closed: the mapping keeps the file.
 * qins_map / qins_map_many then turn {lease, offset, length} answers into pointers, each checked
 * to lie inside the mapping.
 *
 * Lease handles. The lease a caller gets (qins_mapped.lease) is the library's handle, not the
 * daemon's id: handles count up from 1 in the process (one counter for every client) and are never
 * reused, so a handle from an earlier daemon, or from another client, cannot name a lease of this
 * one (a restarted daemon numbers its leases from 1 again). A table (open addressing on the
 * handle) maps each held handle to the daemon's lease and to the mapping it points into. Invariant: a mapping's `held` is the number of table entries on
 * it; a mapping other than the current one is unmapped when its `held` reaches 0.
 *
 * Reconnection (docs/client.md §1.1). Leases belong to one connection: when it is lost, the daemon
 * (or its successor) holds none of them. Each mapping remembers the connection generation it was
 * attached on (qcl__stats()->generation). After a reconnect, the next qins_map / qins_map_many
 * re-attaches (lazily: a client that only calls get after a restart never maps the new arena, and
 * a re-attach failing, e.g. a successor without an arena, fails a map, never a get or the
 * reconnect), and map calls run under qcl__retrying like get: a connection lost under the attach or
 * the map is repaired and the call sent again whole, re-attaching first. The earlier mapping stays
 * mapped while any of its leases are held, so pointers into it stay readable: a dead daemon's file
 * is never written again. qins_release of a lease from an earlier connection is local (it only
 * drops the table entry; the lease ended with its connection) and never reaches the daemon, where
 * its id could name someone else's lease; leases of the live connection are sent in one round
 * trip, and a connection lost under that release ends them all the same.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qins_int.h"

#define QCL_RELEASE_CHUNK 4096 /* leases per release request: far below the daemon's 65536 */

/* One read-only mapping of an arena, made by one attach. */
typedef struct qcl_map {
  const uint8_t *base;  /* the PROT_READ, MAP_SHARED mapping */
  uint64_t size;        /* its length */
  uint64_t gen;         /* the connection generation it was attached on */
  uint64_t held;        /* leases on it in the table */
  struct qcl_map *next; /* in the list of earlier mappings */
} qcl_map;

/* A held lease: the caller's handle, the daemon's id and the mapping its bytes are in. */
typedef struct qcl_lease {
  uint64_t handle; /* 0: a free slot */
  uint64_t srv;
  qcl_map *m;
  int queued; /* in the release being sent (a handle listed twice is caught) */
} qcl_lease;

struct qcl_arena {
  int passed_fd;       /* fd received and not yet claimed, or -1 */
  int ctrunc;          /* a control message was cut (an fd was dropped) */
  qcl_map *cur;        /* the latest attach's mapping, or NULL before the first */
  qcl_map *old;        /* earlier mappings with leases still held */
  qcl_lease *tab;      /* held leases by handle; cap slots, a power of two, at most half used */
  size_t cap, n;
};

static qcl_arena *arena_state(qins_client *c) {
  qcl_arena **pa = qcl__arena(c);
  if (!*pa && (*pa = calloc(1, sizeof **pa))) (*pa)->passed_fd = -1;
  return *pa;
}

ssize_t qcl__recv(qins_client *c, int fd, void *buf, size_t len) {
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(4 * sizeof(int))];
  } ctl;
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                     .msg_controllen = sizeof ctl.b};
  ssize_t n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
  if (n < 0) return n;
  int got = -1;
  for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
    if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int f;
      memcpy(&f, CMSG_DATA(h) + i * sizeof(int), sizeof f);
      if (got < 0) got = f;
      else close(f); /* the protocol passes one fd at a time */
    }
  }
  if (got >= 0 || (m.msg_flags & MSG_CTRUNC)) {
    qcl_arena *a = arena_state(c);
    if (!a) {
      if (got >= 0) close(got);
    } else {
      if (got >= 0) {
        if (a->passed_fd >= 0) close(a->passed_fd);
        a->passed_fd = got;
      }
      if (m.msg_flags & MSG_CTRUNC) a->ctrunc = 1;
    }
  }
  return n;
}

/* --- the lease table ------------------------------------------------------------------------ */

static size_t lt_slot(const qcl_arena *a, uint64_t handle) {
  return (size_t)((handle * 0x9E3779B97F4A7C15ull) >> 17) & (a->cap - 1);
}

/* The slot holding handle, or -1. */
static ptrdiff_t lt_find(const qcl_arena *a, uint64_t handle) {
  if (!a->cap || !handle) return -1;
  for (size_t i = lt_slot(a, handle);; i = (i + 1) & (a->cap - 1)) {
    if (a->tab[i].handle == handle) return (ptrdiff_t)i;
    if (!a->tab[i].handle) return -1;
  }
}

static void lt_put(qcl_arena *a, qcl_lease e) {
  size_t i = lt_slot(a, e.handle);
  while (a->tab[i].handle) i = (i + 1) & (a->cap - 1);
  a->tab[i] = e;
  a->n++;
}

/* Makes room for k more entries (so that adding them after a call cannot fail). */
static int lt_reserve(qcl_arena *a, size_t k) {
  if ((a->n + k) * 2 <= a->cap) return 0;
  size_t cap = a->cap ? a->cap : 64;
  while ((a->n + k) * 2 > cap) cap *= 2;
  qcl_lease *old = a->tab;
  size_t ocap = a->cap;
  if (!(a->tab = calloc(cap, sizeof *a->tab))) {
    a->tab = old;
    return QINS_ENOMEM;
  }
  a->cap = cap;
  a->n = 0;
  for (size_t i = 0; i < ocap; i++)
    if (old[i].handle) lt_put(a, old[i]);
  free(old);
  return 0;
}

/* Empties slot i, shifting back the entries of its probe run (no tombstones). */
static void lt_del(qcl_arena *a, size_t i) {
  size_t j = i;
  a->tab[i].handle = 0;
  a->n--;
  for (;;) {
    j = (j + 1) & (a->cap - 1);
    if (!a->tab[j].handle) return;
    size_t home = lt_slot(a, a->tab[j].handle);
    /* Move j into the hole when its home is not cyclically within (i, j]. */
    if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
      a->tab[i] = a->tab[j];
      a->tab[j].handle = 0;
      i = j;
    }
  }
}

/* Lease handles of the process: one counter for every client, so that a handle given to the wrong
 * client never names one of its leases. */
static _Atomic uint64_t qcl_handles;

/* A new handle for daemon lease srv in mapping m (room reserved by lt_reserve). */
static uint64_t lease_add(qcl_arena *a, uint64_t srv, qcl_map *m) {
  qcl_lease e = {atomic_fetch_add(&qcl_handles, 1) + 1, srv, m, 0};
  lt_put(a, e);
  m->held++;
  return e.handle;
}

/* --- mappings ------------------------------------------------------------------------------- */

static void map_free(qins_client *c, qcl_arena *a, qcl_map *m) {
  for (qcl_map **pp = &a->old; *pp; pp = &(*pp)->next)
    if (*pp == m) {
      *pp = m->next;
      qcl__stats(c)->old_mappings--;
      break;
    }
  munmap((void *)m->base, m->size);
  free(m);
}

/* Drops table slot i: its lease is over. An earlier mapping goes with its last lease. */
static void lease_drop(qins_client *c, qcl_arena *a, size_t i) {
  qcl_map *m = a->tab[i].m;
  lt_del(a, i);
  if (--m->held == 0 && m != a->cur) map_free(c, a, m);
}

/* Makes m the current mapping; the one it replaces is kept while leased. */
static void map_install(qins_client *c, qcl_arena *a, qcl_map *m) {
  qcl_map *prev = a->cur;
  a->cur = m;
  if (!prev) return;
  if (!prev->held) {
    map_free(c, a, prev);
    return;
  }
  prev->next = a->old;
  a->old = prev;
  qcl__stats(c)->old_mappings++;
}

void qcl__arena_free(qins_client *c) {
  qcl_arena **pa = qcl__arena(c), *a = *pa;
  if (!a) return;
  if (a->passed_fd >= 0) close(a->passed_fd);
  while (a->old) map_free(c, a, a->old);
  if (a->cur) {
    munmap((void *)a->cur->base, a->cur->size);
    free(a->cur);
  }
  free(a->tab);
  free(a);
  *pa = NULL;
}

/* Reads a map answer {lease, shape, dtype, offset, length} (name, if present, into name). */
static int parse_mapped(qins_client *c, qins_mapped *o, char *name, size_t name_cap) {
  qp_rd *rd = qcl__rd(c);
  uint32_t n;
  unsigned seen = 0;
  memset(o, 0, sizeof *o);
  if (name_cap) name[0] = 0;
  if (qp_rd_map(rd, &n)) return QINS_EPROTO;
  for (uint32_t i = 0; i < n; i++) {
    const char *k, *s;
    uint32_t kl, sl;
    if (qp_rd_str(rd, &k, &kl)) return QINS_EPROTO;
#define KEY(lit) (kl == sizeof(lit) - 1 && !memcmp(k, lit, kl))
    if (KEY("lease")) {
      if (qp_rd_uint(rd, &o->lease)) return QINS_EPROTO;
      seen |= 1;
    } else if (KEY("offset")) {
      if (qp_rd_uint(rd, &o->offset)) return QINS_EPROTO;
      seen |= 2;
    } else if (KEY("length")) {
      uint64_t v;
      if (qp_rd_uint(rd, &v) || v > SIZE_MAX) return QINS_EPROTO;
      o->bytes = (size_t)v;
      seen |= 4;
    } else if (KEY("dtype")) {
      if (qp_rd_str(rd, &s, &sl) || sl >= sizeof o->dtype) return QINS_EPROTO;
      memcpy(o->dtype, s, sl);
      seen |= 8;
    } else if (KEY("shape")) {
      uint32_t nd;
      if (qp_rd_array(rd, &nd) || nd > QINS_MAX_NDIM) return QINS_EPROTO;
      o->ndim = (int)nd;
      for (uint32_t d = 0; d < nd; d++)
        if (qp_rd_uint(rd, &o->shape[d])) return QINS_EPROTO;
      seen |= 16;
    } else if (KEY("name") && name_cap) {
      if (qp_rd_str(rd, &s, &sl) || sl >= name_cap) return QINS_EPROTO;
      memcpy(name, s, sl);
      name[sl] = 0;
    } else if (qcl__skip(c)) {
      return QINS_EPROTO;
    }
#undef KEY
  }
  return seen == 31 ? 0 : QINS_EPROTO;
}

/* One attach on the current connection: receives the fd, maps it and makes that the current
 * mapping. A lost connection is returned as such (qcl__retrying reconnects). */
static int attach_once(qins_client *c, uint64_t *arena_bytes) {
  qcl_arena *a = arena_state(c);
  if (!a) return qcl__fail(c, QINS_ENOMEM, "attach: out of memory");
  if (a->passed_fd >= 0) close(a->passed_fd);
  a->passed_fd = -1;
  a->ctrunc = 0;
  msgpack_packer *pk = qcl__begin(c, "attach");
  msgpack_pack_array(pk, 0);
  int rc = qcl__call(c, "attach");
  if (rc) return rc;
  uint64_t size = 0;
  qp_rd *rd = qcl__rd(c);
  uint32_t n;
  if (qp_rd_map(rd, &n)) rc = QINS_EPROTO;
  for (uint32_t i = 0; i < n && !rc; i++) {
    const char *k;
    uint32_t kl;
    if (qp_rd_str(rd, &k, &kl)) rc = QINS_EPROTO;
    else if (kl == 11 && !memcmp(k, "arena_bytes", 11)) rc = qp_rd_uint(rd, &size) ? QINS_EPROTO : 0;
    else rc = qcl__skip(c);
  }
  rc = qcl__finish(c, "attach", rc);
  if (rc) return rc;
  int fd = a->passed_fd;
  a->passed_fd = -1;
  if (fd < 0)
    return qcl__fail(c, QINS_EPROTO, a->ctrunc ? "attach: the arena fd was dropped on receipt "
                     "(MSG_CTRUNC: this process is at its RLIMIT_NOFILE)"
                     : "attach: the answer carried no file descriptor");
  struct stat st;
  if (fstat(fd, &st) != 0 || size == 0 || (uint64_t)st.st_size < size || size > SIZE_MAX) {
    close(fd);
    return qcl__fail(c, QINS_EPROTO, "attach: the passed fd does not hold the announced %llu "
                     "bytes", (unsigned long long)size);
  }
  qcl_map *m = calloc(1, sizeof *m);
  void *p = m ? mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
  int e = m ? errno : ENOMEM;
  close(fd); /* the mapping keeps the file */
  if (p == MAP_FAILED) {
    free(m);
    return qcl__fail(c, -e, "attach: mmap of the %llu-byte arena: %s", (unsigned long long)size,
                     strerror(e));
  }
  m->base = p;
  m->size = size;
  m->gen = qcl__stats(c)->generation;
  map_install(c, a, m);
  if (arena_bytes) *arena_bytes = size;
  return 0;
}

static int attach_attempt(qins_client *c, void *ud) { return attach_once(c, ud); }

int qins_attach(qins_client *c, uint64_t *arena_bytes) {
  return qcl__retrying(c, "attach", attach_attempt, arena_bytes);
}

/* The current mapping, re-attached first when the connection it was attached on was replaced
 * (a reconnect): its leases ended there, and offsets of a restarted daemon's answers are in the
 * new daemon's arena. */
static int arena_ready(qins_client *c, const char *what, qcl_arena **out) {
  qcl_arena *a = *qcl__arena(c);
  if (!a || !a->cur)
    return qcl__fail(c, QINS_EINVALID, "%s: not attached: call qins_attach first", what);
  if (a->cur->gen != qcl__stats(c)->generation) {
    int rc = attach_once(c, NULL);
    if (rc) return rc;
    qcl__stats(c)->reattaches++;
  }
  *out = a;
  return 0;
}

/* Points o->data into mapping m after checking the extent. */
static int place(qins_client *c, const qcl_map *m, qins_mapped *o, const char *what) {
  if (o->offset > m->size || o->bytes > m->size - o->offset)
    return qcl__fail(c, QINS_EPROTO, "%s: extent [%llu, +%zu) outside the %llu-byte arena", what,
                     (unsigned long long)o->offset, o->bytes, (unsigned long long)m->size);
  o->data = m->base + o->offset;
  return 0;
}

static void pack_str(msgpack_packer *pk, const char *k, const char *v) {
  qp_pack_cstr(pk, k);
  qp_pack_cstr(pk, v);
}

static const char *dtype_name(qins_dtype dt) {
  return dt == QINS_F32 ? "f32" : dt == QINS_F16 ? "f16" : dt == QINS_BF16 ? "bf16" : NULL;
}

typedef struct map_call {
  const char *model, *name;
  const char *const *names; /* map_many */
  const qins_range *slice;
  int nslice, n;
  qins_dtype dt;
  qins_mapped *out;
} map_call;

static int map_once(qins_client *c, void *ud) {
  map_call *x = ud;
  qins_mapped *out = x->out;
  memset(out, 0, sizeof *out);
  qcl_arena *a;
  int rc = arena_ready(c, "map", &a);
  if (rc) return rc;
  if (lt_reserve(a, 1)) return qcl__fail(c, QINS_ENOMEM, "map: out of memory");
  msgpack_packer *pk = qcl__begin(c, "map");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 3 + (x->nslice > 0));
  pack_str(pk, "model", x->model);
  pack_str(pk, "name", x->name);
  pack_str(pk, "dtype", dtype_name(x->dt));
  if (x->nslice > 0) {
    qp_pack_cstr(pk, "slice");
    msgpack_pack_array(pk, (size_t)x->nslice);
    for (int i = 0; i < x->nslice; i++) {
      msgpack_pack_array(pk, 2);
      msgpack_pack_uint64(pk, x->slice[i].start);
      msgpack_pack_uint64(pk, x->slice[i].stop);
    }
  }
  if ((rc = qcl__call(c, "map"))) return rc;
  rc = parse_mapped(c, out, NULL, 0);
  if (!rc) rc = place(c, a->cur, out, "map");
  if ((rc = qcl__finish(c, "map", rc))) {
    memset(out, 0, sizeof *out);
    return rc;
  }
  out->lease = lease_add(a, out->lease, a->cur);
  return 0;
}

int qins_map(qins_client *c, const char *model, const char *name, const qins_range *slice,
             int nslice, qins_dtype dt, qins_mapped *out) {
  memset(out, 0, sizeof *out);
  if (!model || !name || nslice < 0 || nslice > QINS_MAX_NDIM || (nslice && !slice))
    return qcl__fail(c, QINS_EINVALID, "map: bad arguments");
  if (!dtype_name(dt)) return qcl__fail(c, QINS_EDTYPE, "map: bad dtype %d", (int)dt);
  map_call x = {.model = model, .name = name, .slice = slice, .nslice = nslice, .dt = dt,
                .out = out};
  return qcl__retrying(c, "map", map_once, &x);
}

static int map_many_once(qins_client *c, void *ud) {
  map_call *x = ud;
  int n = x->n;
  qins_mapped *out = x->out;
  memset(out, 0, (size_t)n * sizeof *out);
  qcl_arena *a;
  int rc = arena_ready(c, "map_many", &a);
  if (rc) return rc;
  if (lt_reserve(a, (size_t)n)) return qcl__fail(c, QINS_ENOMEM, "map_many: out of memory");
  msgpack_packer *pk = qcl__begin(c, "map_many");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 3);
  pack_str(pk, "model", x->model);
  pack_str(pk, "dtype", dtype_name(x->dt));
  qp_pack_cstr(pk, "names");
  msgpack_pack_array(pk, (size_t)n);
  for (int i = 0; i < n; i++) qp_pack_cstr(pk, x->names[i]);
  if ((rc = qcl__call(c, "map_many"))) return rc;
  qp_rd *rd = qcl__rd(c);
  uint32_t m, count = 0;
  int found = 0;
  char nm[QINS_MAX_NAME + 1];
  if (qp_rd_map(rd, &m)) rc = QINS_EPROTO;
  for (uint32_t i = 0; i < m && !rc; i++) {
    const char *k;
    uint32_t kl;
    if (qp_rd_str(rd, &k, &kl)) {
      rc = QINS_EPROTO;
    } else if (kl == 4 && !memcmp(k, "maps", 4) && !found) {
      found = 1;
      if (qp_rd_array(rd, &count) || count != (uint32_t)n) {
        rc = qcl__fail(c, QINS_EPROTO, "map_many: %u maps in the answer, %d asked", count, n);
        break;
      }
      for (uint32_t j = 0; j < count && !rc; j++) {
        rc = parse_mapped(c, &out[j], nm, sizeof nm);
        if (!rc && nm[0] && strcmp(nm, x->names[j]))
          rc = qcl__fail(c, QINS_EPROTO, "map_many: answer %u is %s, asked %s", j, nm, x->names[j]);
        if (!rc) rc = place(c, a->cur, &out[j], "map_many");
      }
    } else {
      rc = qcl__skip(c);
    }
  }
  if (!rc && !found) rc = QINS_EPROTO;
  if ((rc = qcl__finish(c, "map_many", rc))) {
    memset(out, 0, (size_t)n * sizeof *out);
    return rc;
  }
  for (int i = 0; i < n; i++) out[i].lease = lease_add(a, out[i].lease, a->cur);
  return 0;
}

int qins_map_many(qins_client *c, const char *model, const char *const *names, int n,
                  qins_dtype dt, qins_mapped *out) {
  if (!model || !names || n <= 0) return qcl__fail(c, QINS_EINVALID, "map_many: bad arguments");
  if (!dtype_name(dt)) return qcl__fail(c, QINS_EDTYPE, "map_many: bad dtype %d", (int)dt);
  for (int i = 0; i < n; i++)
    if (!names[i]) return qcl__fail(c, QINS_EINVALID, "map_many: NULL name");
  map_call x = {.model = model, .names = names, .n = n, .dt = dt, .out = out};
  return qcl__retrying(c, "map_many", map_many_once, &x);
}

/* Sends one release of the daemon leases behind handles h[0..k) (all of the live connection).
 * Returns 0 when they are over (released, or their connection is gone: its leases ended with it),
 * QINS_EBAD_PARAMS when the daemon named one it does not hold (the others are released), else the
 * error with all of them still held. */
static int release_send(qins_client *c, qcl_arena *a, const uint64_t *h, size_t k) {
  msgpack_packer *pk = qcl__begin(c, "release");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 1);
  qp_pack_cstr(pk, "leases");
  msgpack_pack_array(pk, k);
  for (size_t i = 0; i < k; i++) msgpack_pack_uint64(pk, a->tab[lt_find(a, h[i])].srv);
  int rc = qcl__call(c, "release");
  if (!rc) rc = qcl__finish(c, "release", qcl__skip(c));
  if (rc && rc != QINS_EBAD_PARAMS && !qcl__lost(rc) && qcl__sock(c) >= 0) return rc;
  for (size_t i = 0; i < k; i++) lease_drop(c, a, (size_t)lt_find(a, h[i]));
  return rc == QINS_EBAD_PARAMS ? rc : 0;
}

int qins_release(qins_client *c, const uint64_t *leases, int n) {
  if (n <= 0 || !leases) return qcl__fail(c, QINS_EINVALID, "release: no leases");
  qcl_arena *a = *qcl__arena(c);
  uint64_t gen = qcl__stats(c)->generation, *live = malloc((size_t)n * sizeof *live);
  if (!live) return qcl__fail(c, QINS_ENOMEM, "release: out of memory");
  size_t k = 0, at = 0;
  int rc = 0, bad = -1;
  for (int i = 0; i < n; i++) {
    ptrdiff_t s = a ? lt_find(a, leases[i]) : -1;
    if (s < 0 || a->tab[s].queued) {
      if (bad < 0) bad = i;
    } else if (a->tab[s].m->gen == gen && qcl__sock(c) >= 0) {
      a->tab[s].queued = 1; /* the daemon holds it on this connection */
      live[k++] = leases[i];
    } else {
      lease_drop(c, a, (size_t)s); /* it ended with its connection: nothing to send */
    }
  }
  while (at < k) {
    size_t m = k - at < QCL_RELEASE_CHUNK ? k - at : QCL_RELEASE_CHUNK;
    int r = release_send(c, a, live + at, m);
    if (r && r != QINS_EBAD_PARAMS) {
      rc = r;
      break;
    }
    if (r) rc = r;
    at += m;
  }
  for (; at < k; at++) a->tab[lt_find(a, live[at])].queued = 0; /* still held */
  free(live);
  if (bad >= 0 && (rc == 0 || rc == QINS_EBAD_PARAMS)) /* the others are released anyway */
    rc = qcl__fail(c, QINS_EBAD_PARAMS, "release: lease %llu is not held by this client (unknown "
                   "or already released)", (unsigned long long)leases[bad]);
  return rc;
}
