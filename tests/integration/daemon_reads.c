/* SPDX-License-Identifier: MIT */
/*
 * daemon_reads.c — qinsd's read set (daemon/loop.c, "Reading"; daemon/conn.c): client sockets
 * are read from an edge-triggered epoll set, so every edge must be acted on or made up for. Each
 * case freezes the daemon (SIGSTOP) to line up what it will find at once when it wakes (SIGCONT):
 *   - a request and the client's hang-up in one edge: answered, then the connection closes;
 *   - more ready clients than one epoll_wait returns (64): every one is answered;
 *   - a client paused by backpressure whose remaining requests and hang-up arrived while it was
 *     paused (their edges were seen and dropped): it gets every answer, then the close;
 *   - a client sending without pause is read in turns of 256 KiB, waiting on the again list between
 *     them (all 4 MB are already waiting, so no new edge comes to wake it), and is answered.
 * Connections are accepted and answered once before the daemon is frozen, so what it finds on
 * waking comes through the read set's events, not through the first read at accept.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include "daemon_fixture.h"

TestSuite(daemon_reads, .init = setup, .fini = teardown, .timeout = 90);

/* Stops qinsd and waits until it is stopped (state T in /proc/PID/stat): kill() only queues the
 * signal, and bytes sent before the daemon has stopped could be read before the hang-up arrives. */
static void freeze(void) {
  cr_assert_eq(kill(D.pid, SIGSTOP), 0);
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)D.pid);
  for (int t = 0; t < 5000; t++) {
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = '\0';
    const char *e = strrchr(buf, ')');
    if (e && e[1] == ' ' && e[2] == 'T') return;
    usleep(1000);
  }
  kill(D.pid, SIGCONT);
  cr_assert_fail("qinsd did not stop within 5 s");
}

static void pack_get(msgpack_packer *pk, uint32_t id, const char *name) {
  qp_pack_request(pk, id, "get");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, 2);
  qp_pack_cstr(pk, "model");
  qp_pack_cstr(pk, "m");
  qp_pack_cstr(pk, "name");
  qp_pack_cstr(pk, name);
}

/* Reads responses until the daemon closes: how many, each successful and answering a different
 * one of msgids first..first+63 (or -1 on an error response, a stray or repeated msgid, or no
 * close within the timeout). Answers may come in any order (PROTOCOL.md §1). */
static int answers_then_close(ts_rx *rx, uint32_t first) {
  int n = 0;
  uint64_t seen = 0;
  const msgpack_object *o;
  int r;
  while ((r = ts_rx_next(rx, 30000, &o)) == 1) {
    uint64_t id = o->via.array.ptr[1].via.u64 - first;
    if (ts_resp_code(o) != 0 || id >= 64 || (seen >> id & 1)) return -1;
    seen |= 1ull << id;
    n++;
  }
  return r == 0 ? n : -1;
}

/* One ping round trip on rx: the daemon has accepted it and watches it. */
static void ping_once(ts_rx *rx, uint32_t id) {
  cr_assert(ping_on(rx, id), "ping %u answered", id);
}

Test(daemon_reads, request_and_hangup_in_one_edge) {
  ts_rx rx, w;
  open_rx(&rx);
  open_rx(&w);
  ping_once(&rx, 1);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < 3; i++) pack_get(&pk, 10 + i, "a.b");
  freeze();
  int sent = ts_send(rx.fd, sb.data, sb.size);
  int shut = shutdown(rx.fd, SHUT_WR);
  kill(D.pid, SIGCONT);
  msgpack_sbuffer_destroy(&sb);
  cr_assert_eq(sent, 0);
  cr_assert_eq(shut, 0);
  cr_assert_eq(answers_then_close(&rx, 10), 3, "three answers, then the close");
  got g = do_get(&w, "m", "a.b", -1, NULL, NULL); /* and the daemon serves on */
  cr_assert_eq(g.code, 0);
  free(g.data);
  ts_rx_destroy(&rx);
  ts_rx_destroy(&w);
}

Test(daemon_reads, more_ready_clients_than_one_wait_returns) {
  enum { N = 100 }; /* > 64 events a wait; < listen backlog 128 and max-connections 256 */
  static ts_rx rx[N];
  for (int i = 0; i < N; i++) {
    open_rx(&rx[i]);
    ping_once(&rx[i], 1);
  }
  freeze();
  int fails = 0;
  for (int i = 0; i < N; i++) { /* N edges wait in the set while qinsd is stopped */
    int fd = rx[i].fd;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_get(&pk, (uint32_t)(1000 + i), i % 2 ? "a.w" : "c3");
    if (ts_send(fd, sb.data, sb.size)) fails++;
    msgpack_sbuffer_destroy(&sb);
  }
  kill(D.pid, SIGCONT);
  cr_assert_eq(fails, 0, "%d connections or sends failed", fails);
  for (int i = 0; i < N; i++) {
    const msgpack_object *o;
    cr_assert_eq(ts_rx_next(&rx[i], 30000, &o), 1, "client %d answered", i);
    cr_assert_eq(ts_resp_code(o), 0, "client %d: %s", i, ts_resp_msg(o));
    cr_assert_eq(o->via.array.ptr[1].via.u64, 1000u + (unsigned)i);
  }
  for (int i = 0; i < N; i++) ts_rx_destroy(&rx[i]);
}

static const char *const small_queue_args[] = {"--write-queue-bytes", "4M", NULL};
static void setup_small_queue(void) {
  fixture_args = small_queue_args;
  setup();
}

static uint64_t stats_u64(ts_rx *w, const char *key) {
  return qp_map_get(stats_on(w), key)->via.u64;
}

Test(daemon_reads, paused_reader_gets_every_answer_and_its_hangup, .init = setup_small_queue) {
  enum { N = 40 }; /* 40 x 2.4 MB answers: reading pauses after about 2 (4 MB queue) */
  ts_rx rx, w;
  open_rx(&rx);
  open_rx(&w);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < 4; i++) pack_get(&pk, i, "big");
  cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
  msgpack_sbuffer_clear(&sb);
  /* Wait until qinsd has paused reading this client (it is not reading its answers yet). */
  uint64_t p = 0;
  for (int t = 0; t < 2000 && (p = stats_u64(&w, "paused_reads")) == 0; t++) usleep(5000);
  cr_assert_geq(p, 1, "reading was paused");
  /* The rest and the hang-up arrive while paused: their edges come and are dropped. */
  for (uint32_t i = 4; i < N; i++) pack_get(&pk, i, "big");
  cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  cr_assert_eq(shutdown(rx.fd, SHUT_WR), 0);
  usleep(50000);
  /* Reading the answers drains the queue; qinsd resumes, reads the rest and the end of stream. */
  cr_assert_eq(answers_then_close(&rx, 0), N, "every answer, then the close");
  cr_assert_geq(stats_u64(&w, "paused_reads"), 1);
  ts_rx_destroy(&rx);
  ts_rx_destroy(&w);
}

/* The writer side of a_client_sending_without_pause: all of buf, blocking. */
typedef struct flood {
  int fd;
  const char *buf;
  size_t len;
  int rc;
} flood;

static void *flood_send(void *p) {
  flood *f = p;
  f->rc = ts_send(f->fd, f->buf, f->len);
  return NULL;
}

Test(daemon_reads, a_client_sending_without_pause_is_read_in_turns) {
  /* Notifications (no answer, so no backpressure) then one ping: about 4 MB in one go. */
  enum { N = 500000 };
  ts_rx rx, w;
  open_rx(&rx);
  open_rx(&w);
  ping_once(&rx, 1);
  uint64_t y0 = stats_u64(&w, "reads_yielded");
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < N; i++) { /* [2, "ping", []] */
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint8(&pk, 2);
    qp_pack_cstr(&pk, "ping");
    msgpack_pack_array(&pk, 0);
  }
  qp_pack_request(&pk, 7, "ping");
  msgpack_pack_array(&pk, 0);
  /* Frozen, qinsd finds the socket full on waking: many turns' worth at once. */
  int big = 4 << 20;
  setsockopt(rx.fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  freeze();
  flood f = {rx.fd, sb.data, sb.size, -1};
  pthread_t th;
  int tc = pthread_create(&th, NULL, flood_send, &f);
  int queued = 0;
  for (int t = 0; t < 200 && queued < (200 << 10); t++) { /* until the socket holds 200 KB */
    usleep(5000);
    ioctl(rx.fd, SIOCOUTQ, &queued);
  }
  kill(D.pid, SIGCONT);
  cr_assert_eq(tc, 0);
  const msgpack_object *o;
  int answered = ts_rx_next(&rx, 30000, &o);
  pthread_join(th, NULL);
  msgpack_sbuffer_destroy(&sb);
  cr_assert_eq(f.rc, 0, "sent all");
  cr_assert_eq(answered, 1, "the ping after the notifications is answered");
  cr_assert_eq(ts_resp_code(o), 0);
  cr_assert_eq(o->via.array.ptr[1].via.u64, 7);
  uint64_t y1 = stats_u64(&w, "reads_yielded");
  cr_log_info("a client sending without pause: %d bytes waiting when qinsd woke, %llu read turns "
              "yielded", queued, (unsigned long long)(y1 - y0));
  cr_assert_geq(y1 - y0, 1, "its reads were cut into turns");
  ts_rx_destroy(&rx);
  ts_rx_destroy(&w);
}
