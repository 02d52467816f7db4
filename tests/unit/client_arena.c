/* SPDX-License-Identifier: MIT */
/*
 * client_arena.c — libqins's arena calls (qins_attach, qins_map, qins_map_many, qins_release;
 * docs/PROTOCOL.md §4.10-4.13) against a small in-process msgpack-RPC server that follows the
 * protocol text over a real Unix socket and serves from a real qd_arena (daemon/arena.h): the fd
 * passed with attach's answer, pointers landing on the decoded bytes, the same offset and one
 * decode for two clients, a read-only mapping, errors carried with their message, an fd dropped
 * at RLIMIT_NOFILE reported as such, no fd left open, and the mapping outliving the server.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <msgpack.h>

#include "arena.h"
#include "proto.h"
#include "qins.h"
#include "qt.h"

/* ---- the fake server --------------------------------------------------------------------------- */
static qd_arena *arena;
static char dir[64], sock_path[96];
static int lfd = -1;
static pthread_t srv;

/* A tensor's decoded byte i: depends on name and i, so a wrong offset shows. */
static uint8_t byte_of(const char *name, uint64_t i) { return (uint8_t)(name[0] * 31 + i * 7); }
static uint64_t len_of(const char *name) { return 4096 * (uint64_t)(strlen(name) + 1); }

static const msgpack_object *param(const msgpack_object *params, const char *k) {
  if (params->type != MSGPACK_OBJECT_ARRAY || params->via.array.size != 1) return NULL;
  const msgpack_object *m = &params->via.array.ptr[0];
  if (m->type != MSGPACK_OBJECT_MAP) return NULL;
  for (uint32_t i = 0; i < m->via.map.size; i++) {
    const msgpack_object *key = &m->via.map.ptr[i].key;
    if (key->type == MSGPACK_OBJECT_STR && key->via.str.size == strlen(k) &&
        !memcmp(key->via.str.ptr, k, key->via.str.size))
      return &m->via.map.ptr[i].val;
  }
  return NULL;
}

static void str_of(const msgpack_object *o, char *dst, size_t cap) {
  snprintf(dst, cap, "%.*s", o ? (int)o->via.str.size : 0, o ? o->via.str.ptr : "");
}

/* Maps one tensor for conn and packs {lease, shape, dtype, offset, length} (plus name); returns
 * 0 or the error with msg. */
static int do_map(msgpack_packer *pk, uint64_t conn, const char *name, int with_name, char *msg,
                  size_t cap) {
  qs_tensor t;
  memset(&t, 0, sizeof t);
  snprintf(t.model, sizeof t.model, "m");
  snprintf(t.name, sizeof t.name, "%s", name);
  t.model_id = 1;
  qd_arena_key k;
  qd_arena_key_make(&k, &t, NULL, 0);
  uint64_t len = len_of(name);
  qd_arena_meta meta = {.ndim = 2, .shape = {len / 16, 4}, .dtype = "f32"};
  qd_arena_grant g;
  int rc = qd_arena_acquire(arena, &k, &meta, len, conn, &g, msg, cap);
  if (rc < 0) return rc;
  if (rc == QD_ARENA_DECODE) {
    uint8_t *p = qd_arena_ptr(arena, g.off);
    for (uint64_t i = 0; i < len; i++) p[i] = byte_of(name, i);
    qd_arena_decoded(arena, g.entry, 0);
  }
  msgpack_pack_map(pk, 5 + with_name);
  if (with_name) {
    qp_pack_cstr(pk, "name");
    qp_pack_cstr(pk, name);
  }
  qp_pack_cstr(pk, "lease");
  msgpack_pack_uint64(pk, g.lease);
  qp_pack_cstr(pk, "shape");
  msgpack_pack_array(pk, 2);
  msgpack_pack_uint64(pk, meta.shape[0]);
  msgpack_pack_uint64(pk, meta.shape[1]);
  qp_pack_cstr(pk, "dtype");
  qp_pack_cstr(pk, "f32");
  qp_pack_cstr(pk, "offset");
  msgpack_pack_uint64(pk, g.off);
  qp_pack_cstr(pk, "length");
  msgpack_pack_uint64(pk, g.len);
  return 0;
}

/* Answers one request on fd (conn id conn). */
static void answer(int fd, uint64_t conn, const msgpack_object *req) {
  uint32_t msgid = (uint32_t)req->via.array.ptr[1].via.u64;
  const msgpack_object *meth = &req->via.array.ptr[2], *params = &req->via.array.ptr[3];
  char method[32], msg[512] = "";
  str_of(meth, method, sizeof method);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  int rc = 0, pass_fd = 0;
  msgpack_sbuffer body;
  msgpack_sbuffer_init(&body);
  msgpack_packer bp;
  msgpack_packer_init(&bp, &body, msgpack_sbuffer_write);
  if (!strcmp(method, "hello")) {
    msgpack_pack_map(&bp, 6);
    qp_pack_cstr(&bp, "protocol"), msgpack_pack_uint32(&bp, QP_PROTOCOL_VERSION);
    qp_pack_cstr(&bp, "server"), qp_pack_cstr(&bp, "fake");
    qp_pack_cstr(&bp, "max_request_bytes"), msgpack_pack_uint32(&bp, 1 << 20);
    qp_pack_cstr(&bp, "max_response_bytes"), msgpack_pack_uint32(&bp, 1 << 30);
    qp_pack_cstr(&bp, "max_connections"), msgpack_pack_uint32(&bp, 8);
    qp_pack_cstr(&bp, "max_ranges"), msgpack_pack_uint32(&bp, 8);
  } else if (!strcmp(method, "ping")) {
    qp_pack_cstr(&bp, "pong");
  } else if (!strcmp(method, "attach")) {
    msgpack_pack_map(&bp, 2);
    qp_pack_cstr(&bp, "arena_bytes"), msgpack_pack_uint64(&bp, qd_arena_size(arena));
    qp_pack_cstr(&bp, "max_leases"), msgpack_pack_uint64(&bp, 0);
    pass_fd = 1;
  } else if (!strcmp(method, "map")) {
    char name[QS_MAX_NAME + 1];
    str_of(param(params, "name"), name, sizeof name);
    rc = do_map(&bp, conn, name, 0, msg, sizeof msg);
  } else if (!strcmp(method, "map_many")) {
    const msgpack_object *names = param(params, "names");
    msgpack_pack_map(&bp, 1);
    qp_pack_cstr(&bp, "maps");
    msgpack_pack_array(&bp, names->via.array.size);
    for (uint32_t i = 0; i < names->via.array.size && !rc; i++) {
      char name[QS_MAX_NAME + 1];
      str_of(&names->via.array.ptr[i], name, sizeof name);
      rc = do_map(&bp, conn, name, 1, msg, sizeof msg);
    }
  } else if (!strcmp(method, "release")) {
    const msgpack_object *ls = param(params, "leases");
    uint64_t n = 0;
    for (uint32_t i = 0; ls && i < ls->via.array.size; i++) {
      int r = qd_arena_release(arena, conn, ls->via.array.ptr[i].via.u64, msg, sizeof msg);
      if (r) rc = r;
      else n++;
    }
    msgpack_pack_map(&bp, 1);
    qp_pack_cstr(&bp, "released"), msgpack_pack_uint64(&bp, n);
  } else {
    rc = QINS_EUNKNOWN_METHOD;
    snprintf(msg, sizeof msg, "no method %s", method);
  }
  if (rc) {
    qp_pack_response_err(&pk, msgid, rc, "%s", msg);
    pass_fd = 0;
  } else {
    qp_pack_response_ok(&pk, msgid);
    msgpack_sbuffer_write(&sb, body.data, body.size);
  }
  struct iovec iov = {.iov_base = sb.data, .iov_len = sb.size};
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(sizeof(int))];
  } ctl;
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
  if (pass_fd) {
    int afd = qd_arena_fd(arena);
    m.msg_control = ctl.b;
    m.msg_controllen = sizeof ctl.b;
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &afd, sizeof afd);
  }
  cr_assert_eq(sendmsg(fd, &m, MSG_NOSIGNAL), (ssize_t)sb.size);
  msgpack_sbuffer_destroy(&sb);
  msgpack_sbuffer_destroy(&body);
}

/* Serves one connection (its id is its index + 1) until the peer or stop_server ends it. */
enum { MAX_CONNS = 8 };
static int conn_fd[MAX_CONNS];
static pthread_t conn_th[MAX_CONNS];
static int n_conns;

static void *serve_conn(void *ud) {
  uint64_t conn = (uint64_t)(uintptr_t)ud;
  int fd = conn_fd[conn - 1];
  msgpack_unpacker up;
  msgpack_unpacker_init(&up, 1 << 16);
  msgpack_unpacked res;
  msgpack_unpacked_init(&res);
  for (;;) {
    msgpack_unpacker_reserve_buffer(&up, 1 << 16);
    ssize_t n = recv(fd, msgpack_unpacker_buffer(&up), msgpack_unpacker_buffer_capacity(&up), 0);
    if (n <= 0) break;
    msgpack_unpacker_buffer_consumed(&up, (size_t)n);
    while (msgpack_unpacker_next(&up, &res) == MSGPACK_UNPACK_SUCCESS) answer(fd, conn, &res.data);
  }
  qd_arena_release_conn(arena, conn); /* what the daemon does when a connection closes */
  msgpack_unpacked_destroy(&res);
  msgpack_unpacker_destroy(&up);
  return NULL;
}

/* Accepts until the listener is shut down, a thread per connection. */
static void *serve(void *ud) {
  (void)ud;
  while (n_conns < MAX_CONNS) {
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0) break;
    conn_fd[n_conns] = fd;
    pthread_create(&conn_th[n_conns], NULL, serve_conn, (void *)(uintptr_t)(n_conns + 1));
    n_conns++;
  }
  return NULL;
}

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(sock_path, sizeof sock_path, "%s/s", dir);
  cr_assert_eq(qd_arena_open(&arena, 1 << 20, 0), 0);
  lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock_path);
  cr_assert_eq(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
  cr_assert_eq(listen(lfd, 8), 0);
  cr_assert_eq(pthread_create(&srv, NULL, serve, NULL), 0);
}

static void stop_server(void) {
  if (lfd < 0) return;
  shutdown(lfd, SHUT_RDWR);
  pthread_join(srv, NULL);
  for (int i = 0; i < n_conns; i++) {
    shutdown(conn_fd[i], SHUT_RDWR); /* ends the connection being served */
    pthread_join(conn_th[i], NULL);
    close(conn_fd[i]);
  }
  n_conns = 0;
  close(lfd);
  lfd = -1;
}

static void teardown(void) {
  stop_server();
  qd_arena_close(arena);
  qt_rmrf(dir);
}
TestSuite(client_arena, .init = setup, .fini = teardown, .timeout = 60);

static qins_client *conn(void) {
  qins_client *c;
  cr_assert_eq(qins_connect(&c, sock_path, 5000), 0);
  return c;
}

static int open_fds(void) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  for (struct dirent *e; (e = readdir(d));) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

static void check(const qins_mapped *m, const char *name) {
  cr_assert_eq(m->bytes, len_of(name));
  const uint8_t *p = m->data;
  for (uint64_t i = 0; i < m->bytes; i++)
    cr_assert_eq(p[i], byte_of(name, i), "%s byte %llu", name, (unsigned long long)i);
  cr_assert_str_eq(m->dtype, "f32");
  cr_assert_eq(m->ndim, 2);
  cr_assert_eq(m->shape[0] * m->shape[1] * 4, m->bytes);
  cr_assert_eq((uintptr_t)m->data % 64, 0);
}

Test(client_arena, maps_point_at_the_decoded_bytes) {
  qins_client *c = conn(), *d = conn();
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "w", NULL, 0, QINS_F32, &m), QINS_EINVALID, "before attach");
  cr_assert(strstr(qins_client_error(c), "qins_attach"), "%s", qins_client_error(c));
  int before = open_fds();
  uint64_t size = 0;
  cr_assert_eq(qins_attach(c, &size), 0, "%s", qins_client_error(c));
  cr_assert_eq(size, qd_arena_size(arena));
  cr_assert_eq(open_fds(), before, "the arena fd is closed once mapped");
  cr_assert_eq(qins_attach(d, NULL), 0, "%s", qins_client_error(d));
  cr_assert_eq(qins_map(c, "m", "wq", NULL, 0, QINS_F32, &m), 0, "%s", qins_client_error(c));
  check(&m, "wq");
  qins_mapped m2;
  cr_assert_eq(qins_map(d, "m", "wq", NULL, 0, QINS_F32, &m2), 0, "%s", qins_client_error(d));
  check(&m2, "wq");
  cr_assert_eq(m2.offset, m.offset);
  cr_assert_neq(m2.lease, m.lease);
  qd_arena_stats s;
  qd_arena_stats_get(arena, &s);
  cr_assert_eq(s.misses, 1);
  cr_assert_eq(s.decode_bytes, len_of("wq"));
  uint64_t ls[] = {m.lease};
  cr_assert_eq(qins_release(c, ls, 1), 0, "%s", qins_client_error(c));
  cr_assert_eq(qins_release(c, ls, 1), QINS_EBAD_PARAMS);
  cr_assert(strstr(qins_client_error(c), "not held"), "%s", qins_client_error(c));
  cr_assert_eq(qins_ping(c), 0, "the connection stays usable");
  qins_close(c);
  qins_close(d);
  cr_assert_eq(open_fds(), before - 2, "only the two sockets went (the server's ends stay)");
}

Test(client_arena, map_many_in_order_and_all_or_nothing_errors) {
  qins_client *c = conn();
  cr_assert_eq(qins_attach(c, NULL), 0, "%s", qins_client_error(c));
  const char *names[] = {"a", "bb", "ccc"};
  qins_mapped ms[3];
  cr_assert_eq(qins_map_many(c, "m", names, 3, QINS_F32, ms), 0, "%s", qins_client_error(c));
  for (int i = 0; i < 3; i++) check(&ms[i], names[i]);
  /* A tensor larger than the arena: ARENA_FULL with the server's reason. */
  char big[400];
  memset(big, 'x', 299);
  big[299] = 0;
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", big, NULL, 0, QINS_F32, &m), QINS_EARENA_FULL);
  cr_assert(strstr(qins_client_error(c), "ARENA_FULL"), "%s", qins_client_error(c));
  cr_assert(strstr(qins_client_error(c), "whole arena"), "%s", qins_client_error(c));
  cr_assert_eq(m.data, NULL);
  qins_close(c);
}

/* Writing through a mapped pointer faults: the mapping is PROT_READ. */
Test(client_arena, mapping_is_read_only) {
  qins_client *c = conn();
  cr_assert_eq(qins_attach(c, NULL), 0, "%s", qins_client_error(c));
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "w", NULL, 0, QINS_F32, &m), 0, "%s", qins_client_error(c));
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGSEGV, SIG_DFL); /* not ASan's handler: die of it */
    ((volatile uint8_t *)m.data)[0] = 1;
    _exit(0);
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  /* SIGSEGV; under ASan (which may keep its own handler) an error exit: never the _exit(0). */
  cr_assert(!(WIFEXITED(st) && WEXITSTATUS(st) == 0), "the write went through (status %#x)", st);
  check(&m, "w");
  qins_close(c);
}

/* At its RLIMIT_NOFILE the kernel drops the passed fd and sets MSG_CTRUNC: attach says so. */
Test(client_arena, fd_dropped_at_the_fd_limit_is_reported) {
  qins_client *c = conn();
  int fds[80], n = 0;
  while (n < 80 && (fds[n] = dup(0)) >= 0 && fds[n] < 63) n++; /* fill every slot below 64 */
  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  struct rlimit low = {.rlim_cur = 64, .rlim_max = rl.rlim_max};
  cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
  int rc = qins_attach(c, NULL);
  setrlimit(RLIMIT_NOFILE, &rl);
  cr_assert_eq(rc, QINS_EPROTO, "%d %s", rc, qins_client_error(c));
  cr_assert(strstr(qins_client_error(c), "RLIMIT_NOFILE"), "%s", qins_client_error(c));
  for (int i = 0; i <= n && i < 80; i++)
    if (fds[i] >= 0) close(fds[i]);
  cr_assert_eq(qins_attach(c, NULL), 0, "%s", qins_client_error(c));
  qins_close(c);
}

/* The mapping outlives the server; leases end with the connection. */
Test(client_arena, mapping_outlives_the_server) {
  qins_client *c = conn();
  cr_assert_eq(qins_attach(c, NULL), 0, "%s", qins_client_error(c));
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "w", NULL, 0, QINS_F32, &m), 0, "%s", qins_client_error(c));
  qins_mapped m2;
  cr_assert_eq(qins_map(c, "m", "w2", NULL, 0, QINS_F32, &m2), 0, "%s", qins_client_error(c));
  qd_arena_stats s;
  qd_arena_stats_get(arena, &s);
  cr_assert_eq(s.leases, 2);
  stop_server();
  qd_arena_stats_get(arena, &s);
  cr_assert_eq(s.leases, 0, "the closed connection's leases are released");
  qd_arena_close(arena); /* the daemon's side is gone */
  arena = NULL;
  check(&m, "w");
  check(&m2, "w2");
  cr_assert_neq(qins_ping(c), 0);
  check(&m, "w");
  qins_close(c);
}
