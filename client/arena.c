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
 * Reconnection: leases belong to one connection. The arena state remembers the socket's inode at
 * attach; a map on a different socket (the client reconnected) fails with QINS_ECLOSED until the
 * next qins_attach. An older mapping is kept (readable, never written by anyone once its daemon is
 * gone) until qins_close, since the caller may still hold pointers into it.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qins_int.h"

#define QCL_MAX_OLD_MAPS 8 /* mappings of earlier connections kept until close */

struct qcl_arena {
  int passed_fd;           /* fd received and not yet claimed, or -1 */
  int ctrunc;              /* a control message was cut (an fd was dropped) */
  const uint8_t *base;     /* the read-only mapping, or NULL */
  uint64_t size;           /* its length */
  dev_t sock_dev;          /* the socket it was attached on (fstat of the socket) */
  ino_t sock_ino;
  struct {
    const uint8_t *p;
    uint64_t n;
  } old[QCL_MAX_OLD_MAPS]; /* mappings of earlier connections */
  int n_old;
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

void qcl__arena_free(qins_client *c) {
  qcl_arena **pa = qcl__arena(c), *a = *pa;
  if (!a) return;
  if (a->passed_fd >= 0) close(a->passed_fd);
  if (a->base) munmap((void *)a->base, a->size);
  for (int i = 0; i < a->n_old; i++) munmap((void *)a->old[i].p, a->old[i].n);
  free(a);
  *pa = NULL;
}

static int sock_id(qins_client *c, dev_t *dev, ino_t *ino) {
  struct stat st;
  int s = qcl__sock(c);
  if (s < 0 || fstat(s, &st) != 0) return -1;
  *dev = st.st_dev;
  *ino = st.st_ino;
  return 0;
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

int qins_attach(qins_client *c, uint64_t *arena_bytes) {
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
  void *p = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd); /* the mapping keeps the file */
  if (p == MAP_FAILED)
    return qcl__fail(c, -e, "attach: mmap of the %llu-byte arena: %s", (unsigned long long)size,
                     strerror(e));
  if (a->base) { /* an earlier attach: keep its mapping until close (pointers may remain) */
    if (a->n_old < QCL_MAX_OLD_MAPS) {
      a->old[a->n_old].p = a->base;
      a->old[a->n_old++].n = a->size;
    } else {
      munmap((void *)a->base, a->size);
    }
  }
  a->base = p;
  a->size = size;
  if (sock_id(c, &a->sock_dev, &a->sock_ino) != 0) a->sock_ino = 0;
  if (arena_bytes) *arena_bytes = size;
  return 0;
}

/* A connection lost under an arena call is QINS_ECLOSED, whatever the socket said (reset, EPIPE,
 * EOF): the caller's remedy is the same, a new qins_attach (its leases ended with the connection). */
static int lost_closed(qins_client *c, const char *what, int rc) {
  if (rc && rc != QINS_ECLOSED && qcl__lost(rc))
    return qcl__fail(c, QINS_ECLOSED, "%s: the connection was lost (%s): call qins_attach again", what,
                     qins_strerror(rc));
  return rc;
}

/* The arena of this connection, or an error naming why there is none. */
static int arena_ready(qins_client *c, const char *what, qcl_arena **out) {
  qcl_arena *a = *qcl__arena(c);
  dev_t dev;
  ino_t ino;
  if (!a || !a->base)
    return qcl__fail(c, QINS_EINVALID, "%s: not attached: call qins_attach first", what);
  if (sock_id(c, &dev, &ino) != 0 || dev != a->sock_dev || ino != a->sock_ino)
    return qcl__fail(c, QINS_ECLOSED, "%s: the connection was lost or re-established since qins_attach "
                     "(its leases ended with it): call qins_attach again", what);
  *out = a;
  return 0;
}

/* Points o->data into the mapping after checking the extent. */
static int place(qins_client *c, const qcl_arena *a, qins_mapped *o, const char *what) {
  if (o->offset > a->size || o->bytes > a->size - o->offset)
    return qcl__fail(c, QINS_EPROTO, "%s: extent [%llu, +%zu) outside the %llu-byte arena", what,
                     (unsigned long long)o->offset, o->bytes, (unsigned long long)a->size);
  o->data = a->base + o->offset;
  return 0;
}

static void pack_str(msgpack_packer *pk, const char *k, const char *v) {
  qp_pack_cstr(pk, k);
  qp_pack_cstr(pk, v);
}

static const char *dtype_name(qins_dtype dt) {
  return dt == QINS_F32 ? "f32" : dt == QINS_F16 ? "f16" : dt == QINS_BF16 ? "bf16" : NULL;
}

int qins_map(qins_client *c, const char *model, const char *name, const qins_range *slice,
             int nslice, qins_dtype dt, qins_mapped *out) {
  memset(out, 0, sizeof *out);
  qcl_arena *a;
  int rc = arena_ready(c, "map", &a);
  if (rc) return rc;
  if (!model || !name || nslice < 0 || nslice > QINS_MAX_NDIM || (nslice && !slice))
    return qcl__fail(c, QINS_EINVALID, "map: bad arguments");
  if (!dtype_name(dt)) return qcl__fail(c, QINS_EDTYPE, "map: bad dtype %d", (int)dt);
  msgpack_packer *pk = qcl__begin(c, "map");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 3 + (nslice > 0));
  pack_str(pk, "model", model);
  pack_str(pk, "name", name);
  pack_str(pk, "dtype", dtype_name(dt));
  if (nslice > 0) {
    qp_pack_cstr(pk, "slice");
    msgpack_pack_array(pk, (size_t)nslice);
    for (int i = 0; i < nslice; i++) {
      msgpack_pack_array(pk, 2);
      msgpack_pack_uint64(pk, slice[i].start);
      msgpack_pack_uint64(pk, slice[i].stop);
    }
  }
  if ((rc = qcl__call(c, "map"))) return lost_closed(c, "map", rc);
  rc = parse_mapped(c, out, NULL, 0);
  if (!rc) rc = place(c, a, out, "map");
  return lost_closed(c, "map", qcl__finish(c, "map", rc));
}

int qins_map_many(qins_client *c, const char *model, const char *const *names, int n,
                  qins_dtype dt, qins_mapped *out) {
  qcl_arena *a;
  int rc = arena_ready(c, "map_many", &a);
  if (rc) return rc;
  if (!model || !names || n <= 0) return qcl__fail(c, QINS_EINVALID, "map_many: bad arguments");
  if (!dtype_name(dt)) return qcl__fail(c, QINS_EDTYPE, "map_many: bad dtype %d", (int)dt);
  memset(out, 0, (size_t)n * sizeof *out);
  msgpack_packer *pk = qcl__begin(c, "map_many");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 3);
  pack_str(pk, "model", model);
  pack_str(pk, "dtype", dtype_name(dt));
  qp_pack_cstr(pk, "names");
  msgpack_pack_array(pk, (size_t)n);
  for (int i = 0; i < n; i++) {
    if (!names[i]) return qcl__fail(c, QINS_EINVALID, "map_many: NULL name");
    qp_pack_cstr(pk, names[i]);
  }
  if ((rc = qcl__call(c, "map_many"))) return lost_closed(c, "map_many", rc);
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
        if (!rc && nm[0] && strcmp(nm, names[j]))
          rc = qcl__fail(c, QINS_EPROTO, "map_many: answer %u is %s, asked %s", j, nm, names[j]);
        if (!rc) rc = place(c, a, &out[j], "map_many");
      }
    } else {
      rc = qcl__skip(c);
    }
  }
  if (!rc && !found) rc = QINS_EPROTO;
  rc = lost_closed(c, "map_many", qcl__finish(c, "map_many", rc));
  if (rc) memset(out, 0, (size_t)n * sizeof *out);
  return rc;
}

int qins_release(qins_client *c, const uint64_t *leases, int n) {
  if (n <= 0 || !leases) return qcl__fail(c, QINS_EINVALID, "release: no leases");
  msgpack_packer *pk = qcl__begin(c, "release");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 1);
  qp_pack_cstr(pk, "leases");
  msgpack_pack_array(pk, (size_t)n);
  for (int i = 0; i < n; i++) msgpack_pack_uint64(pk, leases[i]);
  int rc = qcl__call(c, "release");
  if (rc) return rc;
  return qcl__finish(c, "release", qcl__skip(c));
}
