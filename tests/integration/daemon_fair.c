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
