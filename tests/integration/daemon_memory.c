/* SPDX-License-Identifier: MIT */
/*
 * daemon_memory.c — the global bound on memory held for responses (max-response-memory,
 * docs/qinsd.md "Memory"): clients that ask for large answers and never read, or pipeline pings
 * and never read, hold at most the bound plus one large answer plus a small answer per client,
 * however many they are; a client holding nothing is still answered; after they leave, the daemon
 * gives the memory back. Measured on qinsd's own /proc status (VmHWM, VmRSS).
 */
#include <errno.h>
#include <stdio.h>
#include <sys/socket.h>

#include "daemon_fixture.h"

TestSuite(daemon_memory, .init = setup, .fini = teardown, .timeout = 120);

#define BOUND_MIB 16
static const char *const bound_args[] = {"--max-response-memory", "16M", "--write-queue-bytes",
                                         "64M", NULL};
static void setup_bound(void) {
  fixture_args = bound_args;
  setup();
}

#if defined(__SANITIZE_ADDRESS__) /* make asan: its quarantine keeps up to 256 MiB of freed memory */
#define SLACK_KIB (320 * 1024L)
#else
#define SLACK_KIB (24 * 1024L)
#endif

/* Sends all of sb on a non-blocking socket until the daemon stops taking bytes for 300 ms. */
static void send_until_refused(int fd, const msgpack_sbuffer *sb, int repeat) {
  size_t off = 0;
  int idle_ms = 0, rounds = 0;
  while (idle_ms < 300 && rounds < repeat) {
    ssize_t n = send(fd, sb->data + off, sb->size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      off += (size_t)n;
      if (off == sb->size) {
        off = 0;
        rounds++;
      }
      idle_ms = 0;
    } else {
      cr_assert(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "send: %s", strerror(errno));
      usleep(10000);
      idle_ms += 10;
    }
  }
}

/* Waits until the daemon is idle: the requests it took (but stats), the memory it holds and its
 * pool decodes stay the same over 5 polls 50 ms apart (its decodes have finished and its sockets are full).
 * Returns the last stats map (valid until w's next call). */
static const msgpack_object *settle(ts_rx *w) {
  uint64_t last[3] = {0}, same = 0;
  const msgpack_object *st = NULL;
  for (int i = 0; i < 400 && same < 5; i++) {
    usleep(50000);
    st = stats_on(w);
    uint64_t now[3] = {0, qp_map_get(st, "queued_bytes")->via.u64,
                       qp_map_get(st, "pool_decodes")->via.u64};
    const msgpack_object *rq = qp_map_get(st, "requests");
    for (uint32_t k = 0; k < rq->via.map.size; k++) /* but the stats calls made here */
      if (!qp_obj_str_eq(&rq->via.map.ptr[k].key, "stats")) now[0] += rq->via.map.ptr[k].val.via.u64;
    same = memcmp(now, last, sizeof now) == 0 ? same + 1 : 0;
    memcpy(last, now, sizeof now);
  }
  return st;
}

#define N_BIG 5
#define NAMES 8 /* "big" 8 times: an answer of about 19.7 MB */
/* Clients asking for ~20 MB get_many answers, never reading: with a 64 MiB queue each, five of them
 * held ~400 MB before the global bound; now the daemon holds at most the bound plus one answer,
 * answers the others BUSY or leaves them unread, and still serves a client that holds nothing. */
Test(daemon_memory, large_answers_never_read_are_bounded_globally, .init = setup_bound) {
  ts_rx w, b[N_BIG];
  open_rx(&w);
  cr_assert(ping_on(&w, 1));
  long hwm0 = daemon_kib("VmHWM"), rss0 = daemon_kib("VmRSS");
  cr_assert_gt(hwm0, 0, "qinsd's VmHWM");
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < 8; i++) {
    qp_pack_request(&pk, 100 + i, "get_many");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "names");
    msgpack_pack_array(&pk, NAMES);
    for (int k = 0; k < NAMES; k++) qp_pack_cstr(&pk, "big");
  }
  for (int i = 0; i < N_BIG; i++) {
    open_rx(&b[i]);
    int fl = 1 << 16;
    setsockopt(b[i].fd, SOL_SOCKET, SO_RCVBUF, &fl, sizeof fl);
    send_until_refused(b[i].fd, &sb, 1);
  }
  msgpack_sbuffer_destroy(&sb);
  for (int i = 0; i < 5; i++) cr_assert(ping_on(&w, 10 + (uint32_t)i), "a client holding nothing is served");
  const msgpack_object *st = settle(&w);
  const uint64_t answer = NAMES * (1024 * 600 * 4 + 600);
  uint64_t peak = qp_map_get(st, "queued_peak")->via.u64;
  uint64_t waits = qp_map_get(st, "memory_waits")->via.u64;
  uint64_t refused = qp_map_get(st, "memory_refused")->via.u64;
  long hwm1 = daemon_kib("VmHWM");
  cr_log_info("large answers: queued peak %llu, %llu waits, %llu BUSY, VmHWM %ld -> %ld KiB",
              (unsigned long long)peak, (unsigned long long)waits, (unsigned long long)refused,
              hwm0, hwm1);
  cr_assert_eq(qp_map_get(st, "max_response_memory")->via.u64, BOUND_MIB << 20);
  cr_assert_geq(waits + refused, 1, "the bound was reached");
  cr_assert_leq(peak, (BOUND_MIB << 20) + answer + N_BIG * 4096, "queued peak %llu",
                (unsigned long long)peak);
  cr_assert_leq(hwm1 - hwm0, (long)(((BOUND_MIB << 20) + 2 * answer) >> 10) + SLACK_KIB,
                "qinsd's peak RSS grew from %ld to %ld KiB", hwm0, hwm1);
  /* They leave: the memory goes back (buffer cache emptied, heap trimmed). */
  for (int i = 0; i < N_BIG; i++) ts_rx_destroy(&b[i]);
  ts_rx_destroy(&w);
  long rss1 = -1;
  for (int i = 0; i < 500; i++) { /* wait for the closes to be seen (not a timed assertion) */
    rss1 = daemon_kib("VmRSS");
    if (rss1 - rss0 <= SLACK_KIB / 2) break;
    usleep(10000);
  }
  cr_assert_leq(rss1 - rss0, SLACK_KIB / 2, "qinsd's RSS after the clients left: %ld KiB (%ld before)",
                rss1, rss0);
}

#define N_PING 200
/* 200 clients pipelining pings and never reading: each pong queued holds memory; with a 64 MiB
 * queue each they could hold 12.8 GB between them; the global bound stops them all at 16 MiB. */
Test(daemon_memory, many_ping_pipeliners_are_bounded_globally, .init = setup_bound) {
  static ts_rx b[N_PING];
  ts_rx w;
  open_rx(&w);
  cr_assert(ping_on(&w, 1));
  long hwm0 = daemon_kib("VmHWM");
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < 6000; i++) {
    qp_pack_request(&pk, 1000 + i, "ping");
    msgpack_pack_array(&pk, 0);
  }
  for (int i = 0; i < N_PING; i++) {
    open_rx(&b[i]);
    int fl = 1 << 16;
    setsockopt(b[i].fd, SOL_SOCKET, SO_RCVBUF, &fl, sizeof fl);
  }
  /* Round robin, a few buffers each, until the daemon takes no more from anyone. */
  for (int round = 0; round < 40; round++) {
    size_t took = 0;
    for (int i = 0; i < N_PING; i++) {
      ssize_t n = send(b[i].fd, sb.data, sb.size, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0) took += (size_t)n;
    }
    if (!took) break;
    usleep(20000);
  }
  msgpack_sbuffer_destroy(&sb);
  cr_assert(ping_on(&w, 7), "a client holding nothing is served");
  const msgpack_object *st = settle(&w);
  uint64_t peak = qp_map_get(st, "queued_peak")->via.u64;
  uint64_t pings = qp_map_get(qp_map_get(st, "requests"), "ping")->via.u64;
  long hwm1 = daemon_kib("VmHWM");
  cr_log_info("pipelined pings: %llu taken, queued peak %llu, VmHWM %ld -> %ld KiB",
              (unsigned long long)pings, (unsigned long long)peak, hwm0, hwm1);
  cr_assert_geq(qp_map_get(st, "memory_waits")->via.u64, 1, "the bound was reached");
  cr_assert_leq(peak, (BOUND_MIB << 20) + N_PING * 4096, "queued peak %llu",
                (unsigned long long)peak);
  /* Overhead besides the bound: 200 connections' read buffers (64 KiB each) and bookkeeping. */
  cr_assert_leq(hwm1 - hwm0, (long)((BOUND_MIB << 20) >> 10) + N_PING * 80 + SLACK_KIB,
                "qinsd's peak RSS grew from %ld to %ld KiB", hwm0, hwm1);
  for (int i = 0; i < N_PING; i++) ts_rx_destroy(&b[i]);
  ts_rx_destroy(&w);
}
