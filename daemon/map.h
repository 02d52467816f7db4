/* SPDX-License-Identifier: MIT */
/*
 * map.h — the arena delivery path (map.c): the methods attach, map, map_many and release
 * (docs/PROTOCOL.md §4.10-4.13) over the decoded-weights arena (arena.h). methods.c parses the
 * params and calls in here; map.c answers through reply.h. Loop thread only.
 */
#ifndef QINS_MAP_H
#define QINS_MAP_H

#include <stdint.h>

#include <msgpack.h>

#include "job.h"
#include "reply.h"

/* attach: answers with the arena's fd (qd_reply_fd). 0, or an error code with r->msg set. */
int qd_map_attach(qd_req *r);
/* map (a->many == 0) or map_many: takes a over (discarded here). 0 (answered now or later), or an
 * error code with r->msg set. */
int qd_map_start(qd_req *r, qd_ask *a);
/* release of n leases held by r's connection. */
int qd_map_release(qd_req *r, const uint64_t *leases, uint32_t n);
/* The connection numbered conn was freed (conn.c, qd_conn_free: its socket is closed and no job
 * refers to it): its leases end. */
void qd_map_conn_freed(uint64_t conn);
/* 1 if the connection numbered conn holds arena leases (its worker reads their bytes in place, so
 * the idle timeout leaves it open). */
int qd_map_conn_leased(uint64_t conn);
/* The arena (NULL: none, or not opened yet). For tests and the fuzzer's oracles. */
struct qd_arena *qd_map_arena(void);
/* The arena's size for hello (0: none; opens the arena if it is not yet). */
uint64_t qd_map_arena_bytes(void);
/* Packs the stats keys arena_* (QD_MAP_STATS_KEYS pairs) into an open map. */
#define QD_MAP_STATS_KEYS 15
void qd_map_stats_pack(msgpack_packer *pk);

#endif /* QINS_MAP_H */
