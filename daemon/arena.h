/* SPDX-License-Identifier: MIT */
/*
 * arena.h — the decoded-weights arena (qd_arena_): one sealed memfd the daemon decodes tensors
 * into and every attached client maps read-only, so N workers on a host hold one decoded copy.
 * Protocol: docs/PROTOCOL.md §4.10-4.13 (attach, map, map_many, release); sizing: docs/qinsd.md
 * "The arena"; host needs: docs/OPERATIONS.md.
 *
 * Design.
 *  - The file: memfd_create(MFD_ALLOW_SEALING | MFD_CLOEXEC) of a fixed size, mapped MAP_SHARED
 *    read-write by the daemon, then sealed F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE |
 *    F_SEAL_SEAL: nobody (the daemon included) can change its size, write() it or map it writable
 *    again through any fd, while the daemon's existing mapping stays writable. Clients get a
 *    separate O_RDONLY open of it (qd_arena_fd), so even mmap(PROT_WRITE) fails before the seals
 *    are consulted. Pages are created on first write (lazily: an arena nobody maps into costs no
 *    memory) and never given back (FUTURE_WRITE forbids hole punching): resident bytes grow to a
 *    high-water mark bounded by the size. qd_arena_prefault creates them (and records which
 *    exist, a bit per page); qd_arena_warm_next says which to create ahead of use so that a warm
 *    reserve of created pages no entry holds stays ready for the next entries (map.c runs it).
 *  - Entries: a decoded tensor or hyperslab in one output dtype, keyed by qd_arena_key (the model's
 *    store id, which changes on every import, so a replaced model's entries never answer for the
 *    new version), at an extent aligned to 64 bytes, or to a page when QD_ARENA_PAGE_ALIGN bytes
 *    or larger. An entry is DECODING (its bytes being written by whoever got QD_ARENA_DECODE) and
 *    then READY; identical requests meanwhile get QD_ARENA_WAIT and wait on that one decode.
 *  - Leases: a lease (id never reused) pins one entry for one connection; a pinned entry never
 *    moves, changes or is evicted. Unpinned READY entries sit on an LRU list and are evicted,
 *    least recently used first, when an allocation does not fit. A miss for a newer id of a model
 *    drops that model's older unpinned entries and hides its pinned ones from lookups (they are
 *    freed when their last lease goes).
 *  - Space: a free list of extents sorted by offset (best fit, coalesced on free); page-aligned
 *    entries are cut from the start of a free extent and small ones from its end, so small
 *    entries do not break up page-aligned space.
 *
 * Threads: every function may be called from any thread (one mutex). The bytes of an entry are
 * written without the lock by the one decoder holding QD_ARENA_DECODE (the entry is pinned while
 * DECODING) and read by clients only after qd_arena_decoded(0).
 */
#ifndef QINS_ARENA_H
#define QINS_ARENA_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

#define QD_ARENA_ALIGN 64u            /* every entry starts on a cache line */
#define QD_ARENA_PAGE_ALIGN (16u << 10) /* entries this large start on a page, so a client's
                                         reads of one never share a page with another entry */

typedef struct qd_arena qd_arena;
typedef struct qd_arena_entry qd_arena_entry;

/* What an entry holds. Built with qd_arena_key_make so that equal requests give equal keys. */
typedef struct qd_arena_key {
  uint64_t model_id;             /* qs_tensor.model_id: the model's version in the store */
  int dtype;                     /* qc_dtype of the output, or -1 for a raw tensor as stored */
  int ndim;                      /* slice ranges after normalisation (0: the whole tensor) */
  uint64_t start[QS_MAX_NDIM];   /* [start, stop) per leading dimension */
  uint64_t stop[QS_MAX_NDIM];
  char model[QS_MAX_NAME + 1];   /* model name (for staleness and logs) */
  char name[QS_MAX_NAME + 1];    /* tensor name */
} qd_arena_key;

/* Fills k for tensor t sliced by sl (NULL: whole) in output dtype dt (-1: raw as stored). The
 * slice is normalised: trailing ranges covering their whole dimension are dropped, so "0:n" and no
 * slice give the same key. sl must already be checked against t (qs_slice_shape). */
void qd_arena_key_make(qd_arena_key *k /* out */, const qs_tensor *t, const qs_slice *sl, int dt);

/* What a map answer says besides the extent; kept with the entry. */
typedef struct qd_arena_meta {
  int ndim;                      /* the output's dimensions */
  uint64_t shape[QS_MAX_NDIM];   /* the output's shape */
  char dtype[8];                 /* wire dtype name ("f32", "i32", ...) */
} qd_arena_meta;

/* Creates an arena of `bytes` (rounded up to a page; > 0) allowing each connection at most
 * max_leases leases (0: no limit). -errno from memfd_create/ftruncate/mmap/fcntl, QINS_ENOMEM.
 * *out is freed with qd_arena_close. */
int qd_arena_open(qd_arena **out /* out */, uint64_t bytes, uint32_t max_leases);
/* Frees the daemon's side (mapping, fds, tables). Clients' mappings stay valid: the pages live
 * as long as anyone maps them. NULL is fine. */
void qd_arena_close(qd_arena *a);
/* The read-only fd to pass to clients (owned by the arena; send a copy, e.g. with SCM_RIGHTS). */
int qd_arena_fd(const qd_arena *a);
uint64_t qd_arena_size(const qd_arena *a);
/* The daemon's writable mapping of byte off (valid while a lives). */
void *qd_arena_ptr(qd_arena *a, uint64_t off);
/* Creates the pages of [off, off + len) now (MADV_POPULATE_WRITE) so a later decode into them
 * runs at decode speed instead of page-creation speed. 0 or -errno (-EINVAL on kernels without
 * MADV_POPULATE_WRITE: nothing is done, pages are then created by the decode itself). Safe on
 * pages in use: contents are not changed. Records the pages as created; returns at once when all
 * of them are already recorded (pages once created stay). */
int qd_arena_prefault(qd_arena *a, uint64_t off, uint64_t len);

/* The warm reserve: the next pages to create so that created pages lying wholly in free space
 * reach `reserve` bytes. Picks the lowest free pages not yet created (where the allocator cuts
 * the next page-aligned entry: the start of the free space above the entries), at most `max`
 * bytes of them in one run. Returns 1 with [*off, *off + *len) to give qd_arena_prefault, or 0
 * when the reserve is met or free space has no page left to create. *pending (NULL: not wanted)
 * gets the bytes still to create to meet it, capped at what free space can hold. */
int qd_arena_warm_next(qd_arena *a, uint64_t reserve, uint64_t max, uint64_t *off /* out */,
                       uint64_t *len /* out */, uint64_t *pending /* out */);

/* The outcome of qd_arena_acquire, which always takes a lease when it succeeds. */
enum {
  QD_ARENA_HIT = 0,    /* READY: the bytes are at off */
  QD_ARENA_DECODE = 1, /* a new DECODING entry: the caller writes len bytes at qd_arena_ptr(off),
                          then calls qd_arena_decoded */
  QD_ARENA_WAIT = 2,   /* another caller is decoding it: qd_arena_wait or qd_arena_wait_async */
};
typedef struct qd_arena_grant {
  uint64_t lease;        /* the lease taken */
  uint64_t off, len;     /* the entry's bytes in the arena */
  qd_arena_meta meta;    /* as given by whoever created the entry */
  qd_arena_entry *entry; /* for qd_arena_decoded / waits; valid while the lease is held */
} qd_arena_grant;

/* Finds or creates the entry for k (len bytes, described by meta) and leases it to connection
 * conn. Returns QD_ARENA_HIT, _DECODE or _WAIT with *g filled; or QINS_EARENA_FULL with msg
 * saying why (larger than the arena, all space pinned by leases or decodes, or conn holds
 * max_leases already), or QINS_ENOMEM. Evicts unpinned entries, LRU first, only when they free
 * enough space. */
int qd_arena_acquire(qd_arena *a, const qd_arena_key *k, const qd_arena_meta *meta, uint64_t len,
                     uint64_t conn, qd_arena_grant *g /* out */, char *msg, size_t msg_cap);

/* The decode of e (from a QD_ARENA_DECODE grant) ended with rc: 0 makes it READY; an error frees
 * it and every lease on it (waiters get rc). Wakes blocking waiters and runs async waiters' cbs on
 * this thread, after the lock is dropped. Call exactly once per DECODE grant. */
void qd_arena_decoded(qd_arena *a, qd_arena_entry *e, int rc);

/* Blocks until g's entry is decoded; returns the decode's rc (on an error the lease is gone). */
int qd_arena_wait(qd_arena *a, const qd_arena_grant *g);
/* Asynchronous wait: storage owned by the caller, untouched by it until cb runs or cancel. */
typedef struct qd_arena_waiter {
  void (*cb)(void *ud, int rc);  /* the decode's rc; runs on the thread calling qd_arena_decoded */
  void *ud;
  struct qd_arena_waiter *next;  /* arena-internal */
  qd_arena_entry *entry;         /* arena-internal */
} qd_arena_waiter;
/* Registers w (cb, ud set by the caller) on g's entry. Returns 1 and registers nothing when the
 * entry is already decoded (the caller goes on at once, rc from *rc), else 0. */
int qd_arena_wait_async(qd_arena *a, const qd_arena_grant *g, qd_arena_waiter *w, int *rc /* out */);
/* Removes w if its cb has not run (e.g. the connection is gone); 1 if removed. */
int qd_arena_wait_cancel(qd_arena *a, qd_arena_waiter *w);

/* Drops lease `lease` held by conn: 0, or QINS_EBAD_PARAMS (msg names it) when conn holds no such
 * lease. The entry stays cached (LRU) unless its model was superseded. */
int qd_arena_release(qd_arena *a, uint64_t conn, uint64_t lease, char *msg, size_t msg_cap);
/* 1 if conn holds lease. */
int qd_arena_holds(qd_arena *a, uint64_t conn, uint64_t lease);
/* 1 if conn holds any lease. */
int qd_arena_conn_leased(qd_arena *a, uint64_t conn);
/* Drops every lease of conn (the connection closed); returns how many. */
uint64_t qd_arena_release_conn(qd_arena *a, uint64_t conn);

typedef struct qd_arena_stats {
  uint64_t bytes;        /* the arena's size */
  uint64_t used;         /* bytes held by entries (aligned extents) */
  uint64_t leased;       /* ... of them pinned by a lease or a decode */
  uint64_t resident;     /* pages the memfd holds (they stay once created) */
  uint64_t warm;         /* ... of them created by qd_arena_prefault and wholly in free space */
  uint64_t entries;      /* entries, stale ones included */
  uint64_t leases;       /* leases held, all connections */
  uint64_t hits;         /* acquires answered by a READY or DECODING entry */
  uint64_t misses;       /* acquires that created an entry */
  uint64_t evictions;    /* entries evicted to make space */
  uint64_t decode_bytes; /* bytes decoded into the arena */
  uint64_t refusals;     /* acquires refused with QINS_EARENA_FULL */
  uint64_t free_extents; /* pieces the free space is in */
} qd_arena_stats;
void qd_arena_stats_get(qd_arena *a, qd_arena_stats *out /* out */);

#endif /* QINS_ARENA_H */
