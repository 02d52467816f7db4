/* SPDX-License-Identifier: MIT */
/*
 * daemon_arena.c — the decoded-weights arena served by a real qinsd (docs/PROTOCOL.md §4.10-4.13;
 * issue 14's acceptance): mapped tensors, row ranges and hyperslabs in f32/f16/bf16 equal `get`
 * byte for byte; two processes mapping one tensor get one offset and one decode; the fd a client
 * receives cannot write or resize the arena in any way; a killed client's leases are released;
 * a leased entry survives eviction pressure and a replace of its model unchanged, while new maps
 * see the new version; an arena full of leases answers ARENA_FULL and `get` still works; the
 * daemon SIGKILLed leaves mapped bytes readable and correct, and its successor serves attaches.
 * Waits on the daemon's state poll stats (no fixed sleeps, no timed assertions).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon_fixture.h"
#include "qins.h"

TestSuite(daemon_arena, .init = setup, .fini = teardown, .timeout = 120);

static qins_client *cl(void) {
  qins_client *c = NULL;
  int rc = qins_connect(&c, D.sock, 10000);
  cr_assert_eq(rc, 0, "connect: %s", qins_strerror(rc));
  return c;
}

static qins_client *attached(void) {
  qins_client *c = cl();
  cr_assert_eq(qins_attach(c, NULL), 0, "attach: %s", qins_client_error(c));
  return c;
}

/* A stats counter (arena_* etc.) read through a fresh connection. */
static uint64_t stat_u64(const char *key) {
  qins_client *c = cl();
  char *json = NULL;
  cr_assert_eq(qins_stats(c, &json), 0);
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\":", key);
  const char *p = strstr(json, pat);
  cr_assert(p, "stats has no %s", key);
  uint64_t v = strtoull(p + strlen(pat), NULL, 10);
  free(json);
  qins_close(c);
  return v;
}

/* Polls stat key until it equals want (10 s at most; returns the last value). */
static uint64_t stat_wait(const char *key, uint64_t want) {
  uint64_t v = 0;
  for (int i = 0; i < 1000 && (v = stat_u64(key)) != want; i++) {
    struct timespec ts = {0, 10000000};
    nanosleep(&ts, NULL);
  }
  return v;
}

/* map == get for model/name[slice] as dt: bytes, shape, dtype. */
static void same_as_get(qins_client *c, const char *name, const qins_range *sl, int ns,
                        qins_dtype dt) {
  qins_mapped m;
  int rc = qins_map(c, "m", name, sl, ns, dt, &m);
  cr_assert_eq(rc, 0, "map %s: %s", name, qins_client_error(c));
  void *buf = NULL;
  size_t n = 0;
  uint64_t shape[QINS_MAX_NDIM];
  int nd = 0;
  rc = qins_get(c, "m", name, sl, ns, dt, &buf, &n, shape, &nd);
  cr_assert_eq(rc, 0, "get %s: %s", name, qins_client_error(c));
  cr_assert_eq(m.bytes, n, "%s (%d ranges, dtype %d): map %zu bytes, get %zu", name, ns, dt,
               m.bytes, n);
  cr_assert_eq(memcmp(m.data, buf, n), 0, "%s (%d ranges, dtype %d): bytes differ", name, ns, dt);
  cr_assert_eq(m.ndim, nd);
  cr_assert_eq(memcmp(m.shape, shape, (size_t)nd * sizeof shape[0]), 0);
  cr_assert_eq((uintptr_t)m.data % 64, 0);
  qins_free(buf);
  cr_assert_eq(qins_release(c, &m.lease, 1), 0, "%s", qins_client_error(c));
}

/* PROTOCOL.md §4.11 */
Test(daemon_arena, map_equals_get_byte_for_byte) {
  qins_client *c = attached();
  const qins_dtype dts[] = {QINS_F32, QINS_F16, QINS_BF16};
  const qins_range rows[] = {{2, 5}};
  const qins_range slab2[] = {{1, 4}, {3, 9}};
  const qins_range slab3[] = {{1, 3}, {2, 5}, {4, 11}};
  const qins_range empty[] = {{3, 3}};
  for (int d = 0; d < 3; d++) {
    for (size_t i = 0; i < N_STD; i++)
      if (std_tensors[i].codec != QS_RAW) same_as_get(c, std_tensors[i].name, NULL, 0, dts[d]);
    same_as_get(c, "a.w", rows, 1, dts[d]);
    same_as_get(c, "q8", rows, 1, dts[d]);
    same_as_get(c, "big", rows, 1, dts[d]);
    same_as_get(c, "a.w", slab2, 2, dts[d]);
    same_as_get(c, "q8", slab2, 2, dts[d]);
    same_as_get(c, "c3", slab3, 3, dts[d]);
    same_as_get(c, "a.w", empty, 1, dts[d]);
  }
  qins_close(c);
}

/* Raw tensors map as stored; errors as get. */
Test(daemon_arena, raw_tensors_and_errors_as_get) {
  ts_rx rx;
  open_rx(&rx);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 1, "map", 2);
  qp_pack_cstr(&pk, "model"), qp_pack_cstr(&pk, "m");
  qp_pack_cstr(&pk, "name"), qp_pack_cstr(&pk, "ints");
  const msgpack_object *r = ts_call(&rx, &sb, 1);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r && ts_resp_code(r) == 0, "map ints: %s", r ? ts_resp_msg(r) : "no answer");
  const msgpack_object *dt = qp_map_get(ts_resp_result(r), "dtype");
  cr_assert(dt && qp_obj_str_eq(dt, "i32"));
  ts_rx_destroy(&rx);
  qins_client *c = attached();
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "ints", NULL, 0, QINS_F16, &m), QINS_EDTYPE);
  cr_assert_eq(qins_map(c, "m", "nope", NULL, 0, QINS_F32, &m), QINS_ENO_TENSOR);
  cr_assert_eq(qins_map(c, "nomodel", "a.w", NULL, 0, QINS_F32, &m), QINS_ENO_MODEL);
  const qins_range bad[] = {{5, 40}};
  cr_assert_eq(qins_map(c, "m", "a.w", bad, 1, QINS_F32, &m), QINS_EBAD_SLICE);
  cr_assert(strstr(qins_client_error(c), "out of range"), "%s", qins_client_error(c));
  uint64_t nolease = 12345;
  cr_assert_eq(qins_release(c, &nolease, 1), QINS_EBAD_PARAMS);
  cr_assert(strstr(qins_client_error(c), "12345"), "%s", qins_client_error(c));
  cr_assert_eq(qins_ping(c), 0);
  qins_close(c);
}

Test(daemon_arena, map_many_in_order_all_or_nothing) {
  qins_client *c = attached();
  const char *names[] = {"l.1.x", "a.b", "l.0.x", "a.b"};
  qins_mapped ms[4];
  cr_assert_eq(qins_map_many(c, "m", names, 4, QINS_F32, ms), 0, "%s", qins_client_error(c));
  for (int i = 0; i < 4; i++) {
    void *buf;
    size_t n;
    cr_assert_eq(qins_get(c, "m", names[i], NULL, 0, QINS_F32, &buf, &n, NULL, NULL), 0);
    cr_assert_eq(ms[i].bytes, n);
    cr_assert_eq(memcmp(ms[i].data, buf, n), 0, "%s", names[i]);
    qins_free(buf);
  }
  cr_assert_eq(ms[1].offset, ms[3].offset, "the same tensor twice: one entry");
  cr_assert_eq(stat_u64("arena_leases"), 4);
  const char *bad[] = {"a.w", "nope"};
  cr_assert_eq(qins_map_many(c, "m", bad, 2, QINS_F32, ms), QINS_ENO_TENSOR);
  cr_assert_eq(stat_u64("arena_leases"), 4, "a failed map_many holds no lease");
  qins_close(c);
  cr_assert_eq(stat_wait("arena_leases", 0), 0, "closing the connection released its leases");
}

/* Two processes mapping the same tensor: the same offset, one decode. */
Test(daemon_arena, two_processes_one_decode) {
  int pfd[2];
  cr_assert_eq(pipe(pfd), 0);
  pid_t pid = fork();
  if (pid == 0) {
    qins_client *c = NULL;
    qins_mapped m;
    if (qins_connect(&c, D.sock, 10000) || qins_attach(c, NULL) ||
        qins_map(c, "m", "big", NULL, 0, QINS_F32, &m))
      _exit(1);
    uint64_t off = m.offset;
    if (write(pfd[1], &off, sizeof off) != sizeof off) _exit(2);
    pause(); /* holds its lease until the parent kills it */
    _exit(0);
  }
  uint64_t child_off = 0;
  cr_assert_eq(read(pfd[0], &child_off, sizeof child_off), (ssize_t)sizeof child_off);
  qins_client *c = attached();
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &m), 0, "%s", qins_client_error(c));
  cr_assert_eq(m.offset, child_off);
  cr_assert_eq(stat_u64("arena_misses"), 1);
  cr_assert_eq(stat_u64("arena_hits"), 1);
  cr_assert_eq(stat_u64("arena_decode_bytes"), 1024 * 600 * 4);
  kill(pid, SIGKILL);
  int st;
  waitpid(pid, &st, 0);
  close(pfd[0]);
  close(pfd[1]);
  qins_close(c);
}

/* The fd attach passes, received here by hand (recvmsg), cannot write or resize the arena. */
Test(daemon_arena, client_cannot_write_the_arena) {
  int s = ts_connect(D.sock);
  cr_assert_geq(s, 0);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 1, "attach", -1);
  cr_assert_eq(ts_send(s, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  char buf[512];
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(sizeof(int))];
  } ctl;
  struct iovec iov = {buf, sizeof buf};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                     .msg_controllen = sizeof ctl.b};
  ssize_t n = recvmsg(s, &m, 0);
  cr_assert_gt(n, 0);
  struct cmsghdr *h = CMSG_FIRSTHDR(&m);
  cr_assert(h && h->cmsg_type == SCM_RIGHTS, "attach's answer carries an fd");
  int fd;
  memcpy(&fd, CMSG_DATA(h), sizeof fd);
  struct stat st;
  cr_assert_eq(fstat(fd, &st), 0);
  size_t sz = (size_t)st.st_size;
  cr_assert_gt(sz, 0);
  cr_assert_eq(mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  cr_assert_eq(pwrite(fd, "x", 1, 0), -1);
  cr_assert_eq(ftruncate(fd, 0), -1);
  cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1);
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int rw = open(path, O_RDWR);
  if (rw >= 0) { /* the re-open succeeds; each write through it is refused by the seals */
    cr_assert_eq(mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, rw, 0), MAP_FAILED);
    cr_assert_eq(pwrite(rw, "x", 1, 0), -1);
    cr_assert_eq(errno, EPERM);
    cr_assert_eq(ftruncate(rw, (off_t)(2 * sz)), -1);
    cr_assert_eq(fallocate(rw, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), -1);
    close(rw);
  }
  cr_assert_eq(fstat(fd, &st), 0);
  cr_assert_eq((size_t)st.st_size, sz);
  close(fd);
  close(s);
  /* libqins's own mapping is read-only: a write through it faults. */
  qins_client *c = attached();
  qins_mapped mp;
  cr_assert_eq(qins_map(c, "m", "a.w", NULL, 0, QINS_F32, &mp), 0);
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGSEGV, SIG_DFL); /* not ASan's handler: die of it */
    ((volatile uint8_t *)mp.data)[0] ^= 1;
    _exit(0);
  }
  int ws;
  waitpid(pid, &ws, 0);
  /* SIGSEGV; under ASan (which may keep its own handler) an error exit: never the _exit(0). */
  cr_assert(!(WIFEXITED(ws) && WEXITSTATUS(ws) == 0), "the write went through (status %#x)", ws);
  same_as_get(c, "a.w", NULL, 0, QINS_F32);
  qins_close(c);
}

Test(daemon_arena, killed_client_leases_are_released) {
  int pfd[2];
  cr_assert_eq(pipe(pfd), 0);
  pid_t pid = fork();
  if (pid == 0) {
    qins_client *c = NULL;
    const char *names[] = {"a.w", "big", "c3"};
    qins_mapped ms[3];
    if (qins_connect(&c, D.sock, 10000) || qins_attach(c, NULL) ||
        qins_map_many(c, "m", names, 3, QINS_F32, ms))
      _exit(1);
    char b = 1;
    if (write(pfd[1], &b, 1) != 1) _exit(2);
    pause();
    _exit(0);
  }
  char b;
  cr_assert_eq(read(pfd[0], &b, 1), 1);
  cr_assert_eq(stat_u64("arena_leases"), 3);
  cr_assert_neq(stat_u64("arena_leased"), 0);
  kill(pid, SIGKILL);
  int st;
  waitpid(pid, &st, 0);
  cr_assert_eq(stat_wait("arena_leases", 0), 0);
  cr_assert_eq(stat_u64("arena_leased"), 0);
  cr_assert_eq(stat_u64("arena_entries"), 3, "the entries stay cached");
  close(pfd[0]);
  close(pfd[1]);
}

/* ---- small arenas ------------------------------------------------------------------------------ */
/* A test's own .init: the fixture's daemon started with extra flags `args`. */
#define SETUP_WITH(fn, args) \
  static void fn(void) {     \
    fixture_args = args;     \
    setup();                 \
    fixture_args = NULL;     \
  }

static const char *const small_args[] = {"--arena-bytes", "3M", NULL};
SETUP_WITH(setup_small, small_args)

static const char *const mid_args[] = {"--arena-bytes", "4M", NULL};
SETUP_WITH(setup_mid, mid_args)

static int fill_replaced(qs_store *s, void *ud) {
  (void)ud;
  return fill_model(s, "m", 100); /* the same tensors, other values */
}

Test(daemon_arena, lease_survives_pressure_and_replace, .init = setup_mid) {
  qins_client *c = attached();
  qins_mapped big;
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &big), 0, "%s", qins_client_error(c));
  uint8_t *copy = malloc(big.bytes);
  memcpy(copy, big.data, big.bytes);
  /* Churn through the rest of the arena (1.7 MB beside big's 2.4): big as f16 and as bf16 (1.2 MB
   * each) evict each other and everything else, over and over. */
  const qins_dtype dts[] = {QINS_F32, QINS_F16, QINS_BF16};
  for (int round = 0; round < 4; round++)
    for (size_t i = 0; i < N_STD; i++) {
      if (std_tensors[i].codec == QS_RAW) continue;
      for (int d = 0; d < 3; d++) {
        if (!strcmp(std_tensors[i].name, "big") && dts[d] == QINS_F32) continue; /* leased */
        qins_mapped m;
        cr_assert_eq(qins_map(c, "m", std_tensors[i].name, NULL, 0, dts[d], &m), 0, "%s",
                     qins_client_error(c));
        cr_assert(m.offset + m.bytes <= big.offset || big.offset + big.bytes <= m.offset);
        cr_assert_eq(qins_release(c, &m.lease, 1), 0);
      }
    }
  cr_assert_gt(stat_u64("arena_evictions"), 0);
  cr_assert_eq(memcmp(big.data, copy, big.bytes), 0, "a leased entry never changes");
  /* The model is replaced (qinsctl import would do the same): new maps see the new version. */
  cr_assert_eq(ts_store_fill(D.store, fill_replaced, NULL), 0);
  qins_mapped nb;
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &nb), QINS_EARENA_FULL,
               "the old version still holds its space");
  void *buf;
  size_t n;
  cr_assert_eq(qins_get(c, "m", "big", NULL, 0, QINS_F32, &buf, &n, NULL, NULL), 0);
  cr_assert_neq(memcmp(buf, copy, n), 0, "the replace changed the values");
  cr_assert_eq(memcmp(big.data, copy, big.bytes), 0, "the leased old version is unchanged");
  cr_assert_eq(qins_release(c, &big.lease, 1), 0);
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &nb), 0, "%s", qins_client_error(c));
  cr_assert_eq(memcmp(nb.data, buf, n), 0, "new maps see the new version");
  qins_free(buf);
  free(copy);
  qins_close(c);
}

Test(daemon_arena, full_arena_says_so_and_get_still_works, .init = setup_small) {
  qins_client *c = attached();
  qins_mapped big, m;
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &big), 0, "%s", qins_client_error(c));
  /* 2.4 MB leased of 3 MB: the f16 copy (1.2 MB) cannot fit. */
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F16, &m), QINS_EARENA_FULL);
  cr_assert(strstr(qins_client_error(c), "leased"), "%s", qins_client_error(c));
  cr_assert(strstr(qins_client_error(c), "use get"), "%s", qins_client_error(c));
  same_as_get(c, "a.w", NULL, 0, QINS_F32); /* small ones still fit */
  void *buf;
  size_t n;
  cr_assert_eq(qins_get(c, "m", "big", NULL, 0, QINS_F16, &buf, &n, NULL, NULL), 0);
  qins_free(buf);
  cr_assert_gt(stat_u64("arena_refusals"), 0);
  qins_close(c);
}

/* idle-timeout-ms never closes a connection holding leases (its worker reads them in place and
 * may send nothing for hours); once they are released, the timeout applies again. */
static const char *const idle_args[] = {"--idle-timeout-ms", "100", NULL};
SETUP_WITH(setup_idle, idle_args)

Test(daemon_arena, idle_timeout_spares_a_connection_holding_leases, .init = setup_idle) {
  qins_client *c = attached();
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "a.w", NULL, 0, QINS_F32, &m), 0, "%s", qins_client_error(c));
  usleep(2500 * 1000); /* past the timeout and two of its once-a-second checks */
  cr_assert_eq(stat_u64("connections_idle_closed"), 0, "the leased connection was closed as idle");
  cr_assert_eq(stat_u64("arena_leases"), 1, "the lease ended while its worker was silent");
  cr_assert_eq(qins_release(c, &m.lease, 1), 0, "%s", qins_client_error(c));
  cr_assert_eq(stat_wait("connections_idle_closed", 1), 1, "without leases it is idle again");
  qins_close(c);
}

static const char *const tiny_args[] = {"--arena-bytes", "1M", "--arena-max-leases", "2", NULL};
SETUP_WITH(setup_tiny, tiny_args)

Test(daemon_arena, larger_than_arena_and_lease_limit, .init = setup_tiny) {
  qins_client *c = attached();
  qins_mapped m[3];
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &m[0]), QINS_EARENA_FULL);
  cr_assert(strstr(qins_client_error(c), "whole arena"), "%s", qins_client_error(c));
  cr_assert_eq(qins_map(c, "m", "a.w", NULL, 0, QINS_F32, &m[0]), 0);
  cr_assert_eq(qins_map(c, "m", "a.b", NULL, 0, QINS_F32, &m[1]), 0);
  cr_assert_eq(qins_map(c, "m", "c3", NULL, 0, QINS_F32, &m[2]), QINS_EARENA_FULL);
  cr_assert(strstr(qins_client_error(c), "arena-max-leases"), "%s", qins_client_error(c));
  qins_client *d = attached(); /* the limit is per connection */
  cr_assert_eq(qins_map(d, "m", "c3", NULL, 0, QINS_F32, &m[2]), 0);
  cr_assert_eq(qins_release(c, &m[0].lease, 1), 0);
  cr_assert_eq(qins_release(d, &m[1].lease, 1), QINS_EBAD_PARAMS, "another connection's lease");
  cr_assert_eq(qins_map(c, "m", "c3", NULL, 0, QINS_F32, &m[2]), 0);
  qins_close(d);
  qins_close(c);
}

static const char *const off_args[] = {"--arena-bytes", "0", NULL};
SETUP_WITH(setup_off, off_args)

Test(daemon_arena, no_arena_is_unsupported, .init = setup_off) {
  qins_client *c = cl();
  cr_assert_eq(qins_attach(c, NULL), QINS_EUNSUPPORTED);
  cr_assert(strstr(qins_client_error(c), "use get"), "%s", qins_client_error(c));
  cr_assert_eq(qins_ping(c), 0);
  cr_assert_eq(stat_u64("arena_bytes"), 0);
  qins_close(c);
}

/* The daemon dies: mapped bytes stay readable and correct; the next daemon serves attaches. */
Test(daemon_arena, mappings_outlive_a_killed_daemon) {
  qins_client *c = attached();
  qins_mapped m;
  cr_assert_eq(qins_map(c, "m", "big", NULL, 0, QINS_F32, &m), 0, "%s", qins_client_error(c));
  void *want;
  size_t n;
  cr_assert_eq(qins_get(c, "m", "big", NULL, 0, QINS_F32, &want, &n, NULL, NULL), 0);
  kill(D.pid, SIGKILL);
  int st;
  waitpid(D.pid, &st, 0);
  D.pid = 0;
  cr_assert_eq(memcmp(m.data, want, n), 0, "mapped bytes after the daemon died");
  cr_assert_neq(qins_ping(c), 0);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "restart");
  cr_assert_eq(memcmp(m.data, want, n), 0);
  qins_client *c2 = attached();
  same_as_get(c2, "big", NULL, 0, QINS_F32);
  qins_mapped m2;
  cr_assert_eq(qins_map(c2, "m", "big", NULL, 0, QINS_F32, &m2), 0);
  cr_assert_eq(memcmp(m2.data, want, n), 0);
  qins_free(want);
  qins_close(c2);
  qins_close(c);
}

/* The fd rides on the first byte of attach's answer even when that answer has to wait: here it is
 * pipelined behind large answers the client does not read yet (libuv's queue is full), so it is
 * parked, and sent by sendmsg once they are out; the ping after it waits behind it. */
Test(daemon_arena, fd_rides_on_attach_answer_behind_queued_writes) {
  int s = ts_connect(D.sock);
  cr_assert_geq(s, 0);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  enum { N_BIG = 6 };
  for (uint32_t id = 1; id <= N_BIG + 2; id++) {
    if (id <= N_BIG / 2 || (id > N_BIG / 2 + 1 && id <= N_BIG + 1)) { /* 240 KB gets */
      qp_pack_request(&pk, id, "get");
      msgpack_pack_array(&pk, 1);
      msgpack_pack_map(&pk, 3);
      qp_pack_cstr(&pk, "model"), qp_pack_cstr(&pk, "m");
      qp_pack_cstr(&pk, "name"), qp_pack_cstr(&pk, "big");
      qp_pack_cstr(&pk, "slice");
      msgpack_pack_array(&pk, 1);
      msgpack_pack_array(&pk, 2);
      msgpack_pack_uint32(&pk, 0), msgpack_pack_uint32(&pk, 100); /* 240 KB: on the loop */
    } else if (id == N_BIG / 2 + 1) {
      qp_pack_request(&pk, id, "attach");
      msgpack_pack_array(&pk, 0);
    } else {
      qp_pack_request(&pk, id, "ping");
      msgpack_pack_array(&pk, 0);
    }
  }
  cr_assert_eq(ts_send(s, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  /* Let the answers pile up unread (the socket fills, the rest queues), then read them all,
   * noting the stream range of the recvmsg that brought the fd. */
  struct timespec ts = {0, 200000000};
  nanosleep(&ts, NULL); /* not an assertion: only makes the queued path likely */
  size_t cap = 4u << 20, len = 0, fd_at = 0, fd_end = 0;
  char *buf = malloc(cap);
  int fd = -1, answers = 0;
  size_t ends[N_BIG + 2];
  qp_scan sc; /* message boundaries */
  qp_scan_init(&sc, cap, QP_MAX_DEPTH);
  size_t off = 0;
  while (answers < N_BIG + 2) {
    union {
      struct cmsghdr h;
      char b[CMSG_SPACE(sizeof(int))];
    } ctl;
    struct iovec iov = {buf + len, cap - len};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                       .msg_controllen = sizeof ctl.b};
    ssize_t n = recvmsg(s, &m, 0);
    cr_assert_gt(n, 0, "the daemon closed after %d answers", answers);
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    if (h && h->cmsg_type == SCM_RIGHTS) {
      cr_assert_eq(fd, -1, "one fd");
      memcpy(&fd, CMSG_DATA(h), sizeof fd);
      fd_at = len;
      fd_end = len + (size_t)n;
    }
    len += (size_t)n;
    size_t msz;
    while (answers < N_BIG + 2 && qp_scan_next(&sc, buf + off, len - off, &msz) == QP_COMPLETE) {
      msgpack_unpacked res;
      msgpack_unpacked_init(&res);
      cr_assert_eq(msgpack_unpack_next(&res, buf + off, msz, NULL), MSGPACK_UNPACK_SUCCESS);
      const msgpack_object *o = &res.data;
      cr_assert(o->via.array.ptr[2].type == MSGPACK_OBJECT_NIL, "answer %d is an error", answers);
      cr_assert_eq(o->via.array.ptr[1].via.u64, (uint64_t)answers + 1, "answers in order");
      msgpack_unpacked_destroy(&res);
      off += msz;
      ends[answers++] = off;
      qp_scan_reset(&sc);
    }
  }
  /* The kernel returns the fd with the read that takes the first byte of the write carrying it,
   * and ends that read with that write: so the fd rode on attach's answer exactly when that read
   * holds the answer's first byte and ends within it. */
  size_t a0 = ends[N_BIG / 2 - 1], a1 = ends[N_BIG / 2];
  cr_assert_geq(fd, 0, "attach's answer carried an fd");
  cr_assert(fd_at <= a0 && a0 < fd_end && fd_end <= a1,
            "the fd came with bytes [%zu, %zu); attach's answer is [%zu, %zu)", fd_at, fd_end, a0, a1);
  close(fd);
  free(buf);
  close(s);
}

/* A --map worker streaming unit by unit (a budget below the model) rides out a SIGKILLed daemon:
 * it reconnects, attaches the new arena and generates exactly the tokens of an uninterrupted run. */
static pid_t spawn_worker(const char *tokens, const char *out) {
  char bin[512];
  ts_build_path("qins-llama2", bin, sizeof bin);
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    dup2(fd, 1);
    execl(bin, bin, "--socket", D.sock, "--model", "s", "--n-heads", "8", "--map", "--budget",
          "300K", "--steps", "400", "--tokens-out", tokens, "-q", (char *)NULL);
    _exit(127);
  }
  return pid;
}

Test(daemon_arena, map_worker_rides_out_a_daemon_restart) {
  char model_path[512], t1[128], t2[128], o2[128];
  const char *sh = getenv("QINS_SHARED");
  snprintf(model_path, sizeof model_path, "%s/models/stories260K.safetensors", sh && *sh ? sh : "../shared");
  struct stat st;
  if (stat(model_path, &st)) cr_skip_test("no %s (set QINS_SHARED)", model_path);
  const char *imp[] = {"import", "--store", D.store, model_path, "--model", "s", NULL};
  cr_assert_eq(run_built("qinsctl", imp), 0);
  snprintf(t1, sizeof t1, "%s/t1", D.dir);
  snprintf(t2, sizeof t2, "%s/t2", D.dir);
  snprintf(o2, sizeof o2, "%s/o2", D.dir);
  int ws;
  pid_t w = spawn_worker(t1, "/dev/null"); /* uninterrupted */
  cr_assert_eq(waitpid(w, &ws, 0), w);
  cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "worker status %#x", ws);
  w = spawn_worker(t2, o2);
  uint64_t held = 0; /* until the worker holds leases (10 s at most) */
  for (int i = 0; i < 1000 && (held = stat_u64("arena_leases")) == 0; i++) {
    struct timespec ts = {0, 10000000};
    nanosleep(&ts, NULL);
  }
  cr_assert_neq(held, 0, "the worker started mapping");
  kill(D.pid, SIGKILL);
  waitpid(D.pid, &ws, 0);
  D.pid = 0;
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "restart");
  cr_assert_eq(waitpid(w, &ws, 0), w);
  cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "worker status %#x", ws);
  char *a = qt_read(t1, NULL), *b = qt_read(t2, NULL);
  cr_assert(a && b);
  cr_assert_str_eq(a, b, "the restarted run's tokens differ");
  char *o = qt_read(o2, NULL);
  cr_assert(o && strstr(o, "reconnects: 1"), "the worker did not reconnect once:\n%s", o ? o : "");
  free(o);
  cr_assert_neq(stat_u64("arena_misses"), 0, "the new daemon served maps");
  free(a);
  free(b);
}

/* ---- the warm reserve (arena-warm-bytes; docs/qinsd.md "The arena") ----------------------------- */
#define WARM (16u << 20)
#define WARM_CHUNK_SLACK (8u << 20) /* map.c creates at most one chunk past the reserve */
static const char *const warm_args[] = {"--arena-bytes", "64M", "--arena-warm-bytes", "16M", NULL};
SETUP_WITH(setup_warm, warm_args)

/* Nothing before the first attach; the reserve after it; made up after maps take it, with
 * resident bytes bounded by what entries use plus the reserve (and one chunk). */
Test(daemon_arena, warm_reserve_follows_attach_and_maps, .init = setup_warm) {
  cr_assert_eq(stat_u64("arena_warm_bytes"), WARM);
  cr_assert_eq(stat_u64("arena_warm_pending"), 0, "nothing is due before an attach");
  cr_assert_eq(stat_u64("arena_resident"), 0, "an arena nobody attached to has no pages");
  qins_client *c = attached();
  cr_assert_eq(stat_wait("arena_warm_pending", 0), 0, "the reserve is created after attach");
  uint64_t res = stat_u64("arena_resident");
  cr_assert_geq(stat_u64("arena_warm"), WARM);
  cr_assert_geq(res, WARM);
  cr_assert_leq(res, WARM + WARM_CHUNK_SLACK, "resident %llu", (unsigned long long)res);
  cr_assert_geq(stat_u64("arena_warm_created"), WARM);
  /* Maps take pages from the reserve (kept leased), which is then made up. */
  const qins_dtype dts[] = {QINS_F32, QINS_F16, QINS_BF16};
  qins_mapped m[3];
  for (int d = 0; d < 3; d++) {
    cr_assert_eq(qins_map(c, "m", "big", NULL, 0, dts[d], &m[d]), 0, "%s", qins_client_error(c));
    same_as_get(c, "q8", NULL, 0, dts[d]); /* small, released: stays cached */
  }
  uint64_t used = stat_u64("arena_used");
  cr_assert_geq(used, 1024 * 600 * (4 + 2 + 2));
  cr_assert_eq(stat_wait("arena_warm_pending", 0), 0, "the reserve is made up");
  uint64_t warm = stat_u64("arena_warm");
  res = stat_u64("arena_resident");
  cr_assert_geq(warm, WARM, "warm %llu after maps", (unsigned long long)warm);
  cr_assert_geq(res, used + WARM - 64 * 1024, "resident %llu, used %llu", (unsigned long long)res,
                (unsigned long long)used);
  cr_assert_leq(res, used + WARM + WARM_CHUNK_SLACK + 16 * 4096, "resident %llu, used %llu",
                (unsigned long long)res, (unsigned long long)used);
  cr_assert_leq(res, 64u << 20);
  for (int d = 0; d < 3; d++) cr_assert_eq(qins_release(c, &m[d].lease, 1), 0);
  qins_close(c);
}

/* A reserve larger than the arena creates the arena's pages and no more. */
static const char *const warm_big_args[] = {"--arena-bytes", "8M", "--arena-warm-bytes", "1G", NULL};
SETUP_WITH(setup_warm_big, warm_big_args)

Test(daemon_arena, warm_reserve_is_capped_at_the_arena, .init = setup_warm_big) {
  cr_assert_eq(stat_u64("arena_warm_bytes"), 8u << 20, "the reserve is capped at arena-bytes");
  qins_client *c = attached();
  cr_assert_eq(stat_wait("arena_warm_pending", 0), 0);
  cr_assert_eq(stat_u64("arena_resident"), 8u << 20);
  same_as_get(c, "big", NULL, 0, QINS_F32); /* decodes into pages the reserve created */
  cr_assert_eq(stat_wait("arena_warm_pending", 0), 0);
  cr_assert_eq(stat_u64("arena_resident"), 8u << 20);
  qins_close(c);
}

/* arena-warm-bytes 0: pages appear only as maps decode into them. */
static const char *const warm_off_args[] = {"--arena-warm-bytes", "0", NULL};
SETUP_WITH(setup_warm_off, warm_off_args)

Test(daemon_arena, no_warm_reserve_creates_nothing_before_a_map, .init = setup_warm_off) {
  qins_client *c = attached();
  cr_assert_eq(stat_wait("arena_warm_pending", 0), 0);
  cr_assert_eq(stat_u64("arena_resident"), 0, "attach created pages");
  same_as_get(c, "big", NULL, 0, QINS_F32);
  uint64_t res = stat_u64("arena_resident");
  cr_assert_geq(res, 1024 * 600 * 4);
  cr_assert_leq(res, 1024 * 600 * 4 + 4 * 4096, "resident %llu", (unsigned long long)res);
  cr_assert_eq(stat_u64("arena_warm_created"), 0);
  qins_close(c);
}

/* The host out of memory while the reserve is being created (the fault shim fails
 * MADV_POPULATE_WRITE past 12 MiB): creating stops after the first 8 MiB chunk, logged once; the
 * daemon keeps serving, and maps into the pages that exist work. */
static void setup_warm_oom(void) {
  static const char *const extra[] = {"QINS_FAULT_POPULATE_AFTER=12582912", NULL};
  char **env = qt_env_preload(extra); /* LD_PRELOAD, ASAN_OPTIONS, the fault */
  for (int i = 0; env[i]; i++) putenv(env[i]);
  fixture_args = warm_args; /* 64M arena, 16M reserve */
  setup();
  fixture_args = NULL;
  unsetenv("LD_PRELOAD");
  unsetenv("QINS_FAULT_POPULATE_AFTER");
  free(env);
}

/* Lines of the daemon's log containing s. */
static int log_count(const char *s) {
  char *log = qt_read(D.log, NULL);
  cr_assert(log, "reading %s", D.log);
  int n = 0;
  for (const char *p = log; (p = strstr(p, s)); p += strlen(s)) n++;
  free(log);
  return n;
}

Test(daemon_arena, warm_reserve_stops_when_out_of_memory, .init = setup_warm_oom) {
  qins_client *c = attached();
  cr_assert_eq(stat_wait("arena_warm_pending", 0), 0, "creating stopped");
  cr_assert_eq(stat_u64("arena_warm_created"), 8u << 20);
  cr_assert_eq(stat_u64("arena_resident"), 8u << 20);
  same_as_get(c, "big", NULL, 0, QINS_F32); /* into the 8 MiB that exist */
  qins_client *c2 = attached();             /* no new attempt */
  cr_assert_eq(qins_ping(c2), 0);
  cr_assert_eq(stat_u64("arena_warm_created"), 8u << 20);
  cr_assert_eq(log_count("stopped creating pages ahead of use"), 1);
  qins_close(c2);
  qins_close(c);
}
