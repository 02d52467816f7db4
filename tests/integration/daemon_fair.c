/* SPDX-License-Identifier: MIT */
/*
 * daemon_fair.c — fair turns counted in work (docs/qinsd.md, Serving order): a client's burst of
 * cheap-to-send, costly-to-answer requests (one-column slices: 40 bytes each, a cache line per
 * row to decode) does not run whole before another client's ping. Counted in order, not time:
 * the daemon is stopped (SIGSTOP) while both clients' requests arrive, then resumed; the second
 * client's stats, pipelined behind its ping, says how many of the first client's slices ran
 * before it.
 */
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>

#include "daemon_fixture.h"

TestSuite(daemon_fair, .init = setup, .fini = teardown, .timeout = 90);

#define N_SLICES 2000
Test(daemon_fair, a_burst_of_column_slices_does_not_run_before_another_clients_ping) {
  ts_rx a, b;
  open_rx(&a);
  open_rx(&b);
  int big = 4 << 20;
  setsockopt(a.fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  cr_assert(ping_on(&b, 1));
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (uint32_t i = 0; i < N_SLICES; i++) { /* big[:, k:k+1]: 1024 rows, one column */
    qp_pack_request(&pk, 100 + i, "get");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 3);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, "big");
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, 0);
    msgpack_pack_uint64(&pk, 1024);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, i % 600);
    msgpack_pack_uint64(&pk, i % 600 + 1);
  }
  cr_assert_eq(kill(D.pid, SIGSTOP), 0);
  int sa = ts_send(a.fd, sb.data, sb.size);
  msgpack_sbuffer_destroy(&sb);
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  qp_pack_request(&pk, 2, "ping");
  msgpack_pack_array(&pk, 0);
  qp_pack_request(&pk, 3, "stats");
  msgpack_pack_array(&pk, 0);
  int sbr = ts_send(b.fd, sb.data, sb.size);
  msgpack_sbuffer_destroy(&sb);
  cr_assert_eq(kill(D.pid, SIGCONT), 0);
  cr_assert_eq(sa, 0, "the burst was sent whole while the daemon was stopped");
  cr_assert_eq(sbr, 0);
  const msgpack_object *o;
  cr_assert_eq(ts_rx_next(&b, 30000, &o), 1);
  cr_assert_eq(o->via.array.ptr[1].via.u64, 2, "the pong first");
  cr_assert_eq(ts_rx_next(&b, 30000, &o), 1);
  cr_assert_eq(o->via.array.ptr[1].via.u64, 3);
  const msgpack_object *st = ts_resp_result(o);
  uint64_t gets = qp_map_get(qp_map_get(st, "requests"), "get")->via.u64;
  cr_log_info("fair turns: %llu of %d slices ran before the other client's ping and stats",
              (unsigned long long)gets, N_SLICES);
  cr_assert_lt(gets, 1000, "%llu slices of one client ran before another client's ping",
               (unsigned long long)gets);
  ts_rx_destroy(&a);
  ts_rx_destroy(&b);
}

/* A get_many of many names is planned on a pool thread (a record lookup a name), not on the loop
 * thread that answers everyone; its answer is the same as for a few names planned on the loop. */
#define N_NAMES 20000
Test(daemon_fair, a_get_many_of_many_names_is_planned_off_the_loop_and_answered_whole) {
  ts_rx a;
  open_rx(&a);
  uint64_t plans0 = qp_map_get(stats_on(&a), "pool_plans")->via.u64;
  got one = do_get(&a, "m", "a.b", -1, NULL, NULL);
  cr_assert_eq(one.code, 0);
  for (int k = 0; k < 2; k++) {
    uint32_t n = k == 0 ? 3 : N_NAMES;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    ts_req_begin(&sb, &pk, 50 + (uint32_t)k, "get_many", 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "names");
    msgpack_pack_array(&pk, n);
    for (uint32_t i = 0; i < n; i++) qp_pack_cstr(&pk, "a.b");
    const msgpack_object *r = ts_call(&a, &sb, 50 + (uint32_t)k);
    msgpack_sbuffer_destroy(&sb);
    cr_assert(r && ts_resp_code(r) == 0, "get_many of %u names: %s", n, r ? ts_resp_msg(r) : "no answer");
    const msgpack_object *ts = qp_map_get(ts_resp_result(r), "tensors");
    cr_assert(ts && ts->type == MSGPACK_OBJECT_ARRAY && ts->via.array.size == n);
    for (uint32_t i = 0; i < n; i += n / 3) {
      const msgpack_object *d = qp_map_get(&ts->via.array.ptr[i], "data");
      cr_assert(d && d->via.bin.size == one.bytes && !memcmp(d->via.bin.ptr, one.data, one.bytes),
                "tensor %u of %u is a.b's bytes", i, n);
    }
    uint64_t plans = qp_map_get(stats_on(&a), "pool_plans")->via.u64;
    cr_assert_eq(plans, plans0 + (uint64_t)k, "%u names: planned on the %s", n, k ? "pool" : "loop");
  }
  free(one.data);
  ts_rx_destroy(&a);
}
