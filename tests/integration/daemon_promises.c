/* SPDX-License-Identifier: MIT */
/*
 * daemon_promises.c — qinsd's promises about limits, backpressure, shutdown and its socket path,
 * each checked so that it fails when the promise breaks (issue 17; tests/mutate/mutants.txt names
 * the mutant each one kills):
 *   - `max-ranges` bounds a slice: one range over the option is BAD_SLICE naming both counts, and a
 *     get with 5,000 ranges is a clean BAD_SLICE on a connection that keeps working (PROTOCOL.md §2);
 *   - `max-pending`: with it at 1, a pipelined batch of pool decodes pauses the client's reads
 *     (stats paused_reads) even when the write queue has room, and every answer still arrives;
 *   - requests buffered but not started when SIGTERM comes are answered SHUTDOWN, the one in
 *     flight finishes with its data (PROTOCOL.md §1.1, §4.9; docs/qinsd.md Lifecycle);
 *   - `shutdown-timeout-ms`: a client that never reads does not hold SIGTERM past it;
 *   - a path at --socket that is not a socket is never removed: qinsd exits 1 and the file stays
 *     (PROTOCOL.md §5).
 * No timed assertions: waits are bounded only so that a broken daemon fails instead of hanging.
 */
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "daemon_fixture.h"

TestSuite(daemon_promises, .init = setup, .fini = teardown, .timeout = 120);

/* A get of m/name with nr ranges [0, 1) each, on rx; returns the response. */
static const msgpack_object *get_ranges(ts_rx *rx, uint32_t id, const char *name, int nr) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "get", 3);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "m");
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, name);
  qp_pack_cstr(&pk, "slice");
  msgpack_pack_array(&pk, (size_t)nr);
  for (int i = 0; i < nr; i++) {
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, 0);
    msgpack_pack_uint64(&pk, 1);
  }
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r, "no answer to a get with %d ranges", nr);
  return r;
}

/* ---- max-ranges ------------------------------------------------------------------------------ */
static const char *const two_ranges_args[] = {"--max-ranges", "2", NULL};
static void setup_two_ranges(void) {
  fixture_args = two_ranges_args;
  setup();
}

/* PROTOCOL.md §2: more ranges than max_ranges is BAD_SLICE, even when the tensor has the dims. */
Test(daemon_promises, max_ranges_option_bounds_a_slice, .init = setup_two_ranges) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = get_ranges(&rx, 1, "c3", 2); /* c3 is [5, 7, 11] */
  cr_assert_eq(ts_resp_code(r), 0, "2 ranges at max-ranges 2: %s", ts_resp_msg(r));
  r = get_ranges(&rx, 2, "c3", 3);
  cr_assert_eq(ts_resp_code(r), QINS_EBAD_SLICE, "3 ranges at max-ranges 2: code %d",
               ts_resp_code(r));
  cr_assert(strstr(ts_resp_msg(r), "3 ranges") && strstr(ts_resp_msg(r), "at most 2"), "%s",
            ts_resp_msg(r));
  cr_assert(ping_on(&rx, 3), "the connection stays open");
  ts_rx_destroy(&rx);
}

/* The check runs before anything is stored per range: 5,000 ranges cannot write past the slice. */
Test(daemon_promises, get_with_5000_ranges_is_refused_and_the_daemon_serves_on) {
  ts_rx w, rx;
  open_rx(&w);
  open_rx(&rx);
  const msgpack_object *r = get_ranges(&rx, 1, "c3", 5000);
  cr_assert_eq(ts_resp_code(r), QINS_EBAD_SLICE, "code %d: %s", ts_resp_code(r), ts_resp_msg(r));
  cr_assert(strstr(ts_resp_msg(r), "5000 ranges") && strstr(ts_resp_msg(r), "at most 8"), "%s",
            ts_resp_msg(r));
  cr_assert(ping_on(&rx, 2), "the connection stays open");
  cr_assert(ping_on(&w, 3), "others are served");
  got g = do_get(&rx, "m", "c3", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(g.bytes, 5 * 7 * 11 * 4);
  free(g.data);
  ts_rx_destroy(&rx);
  ts_rx_destroy(&w);
  cr_assert_eq(kill(D.pid, 0), 0, "qinsd is alive");
}

/* ---- max-pending ----------------------------------------------------------------------------- */
static const char *const one_pending_args[] = {"--max-pending", "1", "--write-queue-bytes", "1G",
                                               NULL};
static void setup_one_pending(void) {
  fixture_args = one_pending_args;
  setup();
}

/* Sends n gets of m/big (2.4 MB: decoded on the pool) in one write, msgids base, base + 1, ... */
static void send_big_gets(ts_rx *rx, uint32_t base, int n) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (int i = 0; i < n; i++) {
    qp_pack_request(&pk, base + (uint32_t)i, "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, "big");
  }
  cr_assert_eq(ts_send(rx->fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
}

/* docs/qinsd.md Resource bounds: reading stops while max-pending requests are being decoded, here
 * with a write queue (1 GiB) that would never stop it. */
Test(daemon_promises, max_pending_pauses_reading_while_the_queue_has_room,
     .init = setup_one_pending) {
  ts_rx rx, w;
  open_rx(&rx);
  send_big_gets(&rx, 10, 3);
  const uint64_t big_bytes = 1024 * 600 * 4;
  for (int i = 0; i < 3; i++) {
    const msgpack_object *o;
    cr_assert_eq(ts_rx_next(&rx, 30000, &o), 1, "answer %d", i);
    cr_assert_eq(ts_resp_code(o), 0, "answer %d: %s", i, ts_resp_msg(o));
    cr_assert_eq(o->via.array.ptr[1].via.u64, 10u + (unsigned)i);
    const msgpack_object *data = qp_map_get(ts_resp_result(o), "data");
    cr_assert(data && data->via.bin.size == big_bytes);
  }
  ts_rx_destroy(&rx);
  open_rx(&w);
  const msgpack_object *st = stats_on(&w);
  cr_assert_geq(map_u64(st, "pool_decodes"), 3);
  cr_assert_geq(map_u64(st, "paused_reads"), 1,
                "3 pipelined pool decodes at max-pending 1 never paused the client's reads");
  ts_rx_destroy(&w);
}

/* ---- shutdown ---------------------------------------------------------------------------------- */
static const char *const small_queue_args[] = {"--write-queue-bytes", "64K", NULL};
static void setup_small_queue(void) {
  fixture_args = small_queue_args;
  setup();
}

/* Polls stats (on fresh connections) until `get` has been dispatched `n` times. */
static void await_gets(uint64_t n) {
  for (int tries = 0; tries < 2000; tries++) {
    ts_rx w;
    open_rx(&w);
    const msgpack_object *st = stats_on(&w);
    uint64_t gets = map_u64(qp_map_get(st, "requests"), "get");
    ts_rx_destroy(&w);
    if (gets >= n) {
      cr_assert_eq(gets, n, "more gets dispatched than expected");
      return;
    }
    usleep(10000);
  }
  cr_assert_fail("the daemon never dispatched %llu get(s)", (unsigned long long)n);
}

/* PROTOCOL.md §1.1 and §4.9: the request in flight finishes with its data; requests the daemon
 * had buffered but not started are answered SHUTDOWN, in order; then the connection closes and
 * qinsd exits 0. The write queue (64 KiB) lets exactly one 2.4 MB get start while the client has
 * not read: the other three are buffered, unstarted, when SIGTERM comes. */
Test(daemon_promises, sigterm_answers_buffered_requests_shutdown, .init = setup_small_queue) {
  ts_rx rx;
  open_rx(&rx);
  send_big_gets(&rx, 70, 4);
  await_gets(1);
  kill(D.pid, SIGTERM);
  const msgpack_object *o;
  cr_assert_eq(ts_rx_next(&rx, 30000, &o), 1);
  cr_assert_eq(o->via.array.ptr[1].via.u64, 70);
  cr_assert_eq(ts_resp_code(o), 0, "the get in flight finishes: %s", ts_resp_msg(o));
  const msgpack_object *data = qp_map_get(ts_resp_result(o), "data");
  cr_assert(data && data->via.bin.size == 1024 * 600 * 4);
  for (uint32_t id = 71; id <= 73; id++) {
    cr_assert_eq(ts_rx_next(&rx, 30000, &o), 1, "answer to %u", id);
    cr_assert_eq(o->via.array.ptr[1].via.u64, id);
    cr_assert_eq(ts_resp_code(o), QINS_ESHUTDOWN, "buffered request %u: code %d (%s)", id,
                 ts_resp_code(o), ts_resp_msg(o));
  }
  cr_assert_eq(ts_rx_next(&rx, 30000, &o), 0, "closed after the answers");
  int st = ts_daemon_wait(&D, 30000);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status 0x%x", st);
  struct stat sst;
  cr_assert_neq(stat(D.sock, &sst), 0, "the socket file is removed");
  ts_rx_destroy(&rx);
}

static const char *const short_shutdown_args[] = {"--write-queue-bytes", "64K",
                                                  "--shutdown-timeout-ms", "300", NULL};
static void setup_short_shutdown(void) {
  fixture_args = short_shutdown_args;
  setup();
}

/* docs/qinsd.md Lifecycle: connections still busy after shutdown-timeout-ms are cut. The client
 * never reads its 2.4 MB answer (its receive buffer is small), so only the timeout ends it. */
Test(daemon_promises, a_client_that_never_reads_does_not_hold_sigterm,
     .init = setup_short_shutdown) {
  ts_rx rx;
  open_rx(&rx);
  int small = 4096;
  setsockopt(rx.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  send_big_gets(&rx, 90, 2);
  await_gets(1);
  kill(D.pid, SIGTERM);
  /* 30 s is 100 times the timeout: only a daemon that never cuts the client gets there. */
  int st = ts_daemon_wait(&D, 30000);
  cr_assert(st >= 0, "qinsd still running 30 s after SIGTERM with shutdown-timeout-ms 300");
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status 0x%x", st);
  char *log = qt_read(D.log, NULL);
  cr_assert(log && strstr(log, "shutdown timeout: closing 1 connection"), "log: %s", log);
  free(log);
  ts_rx_destroy(&rx);
}

/* ---- the socket path -------------------------------------------------------------------------- */
static void setup_no_daemon(void) {
  if (D.dir[0]) ts_dir_remove(&D, 0);
  cr_assert_eq(ts_dir_make(&D), 0);
}

/* PROTOCOL.md §5: a path that is not a socket is never removed. */
Test(daemon_promises, a_file_at_the_socket_path_is_never_removed, .init = setup_no_daemon) {
  static const char keep[] = "not a socket: must survive\n";
  cr_assert_eq(qt_write(D.sock, keep, sizeof keep - 1), 0);
  cr_assert_neq(ts_daemon_start(&D, NULL), 0, "qinsd started on a path holding a regular file");
  int st = D.pid > 0 ? ts_daemon_wait(&D, 10000) : -1;
  cr_assert(st < 0 || (WIFEXITED(st) && WEXITSTATUS(st) == 1), "exit status 0x%x", st);
  size_t n = 0;
  char *now = qt_read(D.sock, &n);
  cr_assert(now && n == sizeof keep - 1 && !memcmp(now, keep, n), "the file was replaced");
  free(now);
  char *log = qt_read(D.log, NULL);
  cr_assert(log && strstr(log, "is not a socket"), "log: %s", log);
  free(log);
}
