/* SPDX-License-Identifier: MIT */
/*
 * daemon_arena.c — the decoded-weights arena in process (daemon/arena.h): extent alignment and
 * coalescing, LRU eviction order, leases pinning entries under pressure, the per-connection lease
 * limit, model generations, one decode shared by concurrent identical requests (threads), failed
 * decodes, async waiters, the seals (each way a client could write or resize the file refused),
 * and the accounting (resident pages created lazily, used/leased/hits/misses/evictions).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arena.h"
#include "qins.h"

TestSuite(daemon_arena, .timeout = 60);

static uint64_t page(void) { return (uint64_t)sysconf(_SC_PAGESIZE); }

/* A key for tensor `name` of model `model` at store id `id` (whole tensor, f32). */
static qd_arena_key key(const char *model, uint64_t id, const char *name) {
  qs_tensor t;
  memset(&t, 0, sizeof t);
  snprintf(t.model, sizeof t.model, "%s", model);
  snprintf(t.name, sizeof t.name, "%s", name);
  t.model_id = id;
  t.ndim = 2;
  t.shape[0] = 64, t.shape[1] = 64;
  qd_arena_key k;
  qd_arena_key_make(&k, &t, NULL, 0);
  return k;
}

static char msg[512];

/* Acquires (model m, id 1, name) of len bytes for conn; expects outcome `want`. */
static qd_arena_grant get(qd_arena *a, const char *name, uint64_t len, uint64_t conn, int want) {
  qd_arena_key k = key("m", 1, name);
  qd_arena_meta meta = {.ndim = 1, .shape = {len / 4}, .dtype = "f32"};
  qd_arena_grant g;
  msg[0] = 0;
  int rc = qd_arena_acquire(a, &k, &meta, len, conn, &g, msg, sizeof msg);
  cr_assert_eq(rc, want, "acquire %s: %d, wanted %d (%s)", name, rc, want, msg);
  return g;
}

/* Decodes: fills the entry with a byte derived from seed and marks it ready. */
static void decode(qd_arena *a, const qd_arena_grant *g, uint8_t seed) {
  memset(qd_arena_ptr(a, g->off), seed, g->len);
  qd_arena_decoded(a, g->entry, 0);
}

static void check_bytes(qd_arena *a, uint64_t off, uint64_t len, uint8_t seed) {
  const uint8_t *p = qd_arena_ptr(a, off);
  for (uint64_t i = 0; i < len; i++)
    cr_assert_eq(p[i], seed, "byte %llu at offset %llu is %u, wanted %u", (unsigned long long)i,
                 (unsigned long long)off, p[i], seed);
}

static void rel(qd_arena *a, uint64_t conn, uint64_t lease) {
  cr_assert_eq(qd_arena_release(a, conn, lease, msg, sizeof msg), 0, "%s", msg);
}

static qd_arena_stats stats(qd_arena *a) {
  qd_arena_stats s;
  qd_arena_stats_get(a, &s);
  return s;
}

Test(daemon_arena, aligns_and_coalesces_extents) {
  qd_arena *a;
  uint64_t pg = page();
  cr_assert_eq(qd_arena_open(&a, 64 * pg, 0), 0);
  cr_assert_eq(qd_arena_size(a), 64 * pg);
  /* Small entries: 64-byte aligned, rounded to 64; large: page aligned. Interleave them. */
  qd_arena_grant s1 = get(a, "s1", 100, 1, QD_ARENA_DECODE);
  qd_arena_grant l1 = get(a, "l1", 5 * pg + 7, 1, QD_ARENA_DECODE);
  qd_arena_grant s2 = get(a, "s2", 1, 1, QD_ARENA_DECODE);
  qd_arena_grant l2 = get(a, "l2", QD_ARENA_PAGE_ALIGN, 1, QD_ARENA_DECODE);
  qd_arena_grant *all[] = {&s1, &l1, &s2, &l2};
  for (int i = 0; i < 4; i++) {
    cr_assert_eq(all[i]->off % QD_ARENA_ALIGN, 0);
    cr_assert_leq(all[i]->off + all[i]->len, qd_arena_size(a));
    for (int j = 0; j < i; j++) /* no overlap */
      cr_assert(all[i]->off + all[i]->len <= all[j]->off ||
                all[j]->off + all[j]->len <= all[i]->off, "entries %d and %d overlap", i, j);
  }
  cr_assert_eq(l1.off % pg, 0);
  cr_assert_eq(l2.off % pg, 0);
  qd_arena_stats s = stats(a);
  cr_assert_eq(s.used, 128 + 6 * pg + 64 + (QD_ARENA_PAGE_ALIGN + pg - 1) / pg * pg);
  cr_assert_eq(s.entries, 4);
  for (int i = 0; i < 4; i++) decode(a, all[i], (uint8_t)(i + 1));
  for (int i = 0; i < 4; i++) check_bytes(a, all[i]->off, all[i]->len, (uint8_t)(i + 1));
  /* Release all and evict them by asking for the whole arena: the space is one extent again. */
  cr_assert_eq(qd_arena_release_conn(a, 1), 4);
  qd_arena_grant big = get(a, "big", 64 * pg, 2, QD_ARENA_DECODE);
  cr_assert_eq(big.off, 0);
  s = stats(a);
  cr_assert_eq(s.evictions, 4);
  cr_assert_eq(s.entries, 1);
  cr_assert_eq(s.free_extents, 0);
  qd_arena_decoded(a, big.entry, 0);
  rel(a, 2, big.lease);
  qd_arena_close(a);
}

Test(daemon_arena, evicts_least_recently_used_first) {
  qd_arena *a;
  uint64_t pg = page(), q = 16 * pg;
  cr_assert_eq(qd_arena_open(&a, 4 * q, 0), 0);
  qd_arena_grant g[4];
  const char *names[] = {"A", "B", "C", "D"};
  for (int i = 0; i < 4; i++) {
    g[i] = get(a, names[i], q, 1, QD_ARENA_DECODE);
    decode(a, &g[i], (uint8_t)(10 + i));
  }
  for (int i = 0; i < 4; i++) rel(a, 1, g[i].lease); /* released in order A B C D */
  /* Use A again: now B is the least recently used. */
  qd_arena_grant a2 = get(a, "A", q, 1, QD_ARENA_HIT);
  cr_assert_eq(a2.off, g[0].off);
  check_bytes(a, a2.off, q, 10);
  rel(a, 1, a2.lease);
  qd_arena_grant e = get(a, "E", q, 1, QD_ARENA_DECODE);
  cr_assert_eq(e.off, g[1].off, "E should take B's place");
  decode(a, &e, 20);
  rel(a, 1, e.lease);
  /* B is gone (a miss), A, C, D, E are cached (hits). Asking for B evicts C, now the LRU. */
  qd_arena_grant b2 = get(a, "B", q, 1, QD_ARENA_DECODE);
  cr_assert_eq(b2.off, g[2].off);
  decode(a, &b2, 30);
  rel(a, 1, b2.lease);
  rel(a, 1, get(a, "A", q, 1, QD_ARENA_HIT).lease);
  rel(a, 1, get(a, "D", q, 1, QD_ARENA_HIT).lease);
  rel(a, 1, get(a, "E", q, 1, QD_ARENA_HIT).lease);
  qd_arena_stats s = stats(a);
  cr_assert_eq(s.evictions, 2);
  cr_assert_eq(s.misses, 6);
  cr_assert_eq(s.hits, 4);
  cr_assert_eq(s.leased, 0);
  cr_assert_eq(s.used, 4 * q);
  qd_arena_close(a);
}

Test(daemon_arena, leased_entries_survive_pressure) {
  qd_arena *a;
  uint64_t pg = page(), q = 16 * pg;
  cr_assert_eq(qd_arena_open(&a, 4 * q, 0), 0);
  qd_arena_grant keep = get(a, "keep", q, 1, QD_ARENA_DECODE);
  decode(a, &keep, 0x5a);
  /* Churn: many other entries through the rest of the arena, each released at once. */
  for (int i = 0; i < 50; i++) {
    char n[16];
    snprintf(n, sizeof n, "t%d", i);
    qd_arena_grant t = get(a, n, q + (uint64_t)i * 64, 2, QD_ARENA_DECODE);
    cr_assert(t.off + t.len <= keep.off || keep.off + keep.len <= t.off);
    decode(a, &t, (uint8_t)i);
    rel(a, 2, t.lease);
  }
  check_bytes(a, keep.off, q, 0x5a);
  /* Lease everything else: then nothing fits and the refusal says why. */
  qd_arena_grant h[3];
  for (int i = 0; i < 3; i++) {
    char n[16];
    snprintf(n, sizeof n, "h%d", i);
    h[i] = get(a, n, q, 3, QD_ARENA_DECODE);
    decode(a, &h[i], 1);
  }
  uint64_t ev = stats(a).evictions;
  get(a, "more", 64, 4, QINS_EARENA_FULL);
  cr_assert(strstr(msg, "leased"), "%s", msg);
  cr_assert_eq(stats(a).evictions, ev, "a refused acquire must not evict");
  cr_assert_eq(stats(a).refusals, 1);
  get(a, "huge", 5 * q, 4, QINS_EARENA_FULL);
  cr_assert(strstr(msg, "whole arena"), "%s", msg);
  check_bytes(a, keep.off, q, 0x5a);
  cr_assert_eq(stats(a).leased, 4 * q);
  rel(a, 3, h[0].lease);
  get(a, "more", 64, 4, QD_ARENA_DECODE); /* now evicts h0 */
  check_bytes(a, keep.off, q, 0x5a);
  qd_arena_close(a);
}

Test(daemon_arena, limits_leases_per_connection) {
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 1 << 20, 2), 0);
  qd_arena_grant x = get(a, "x", 64, 7, QD_ARENA_DECODE);
  decode(a, &x, 1);
  qd_arena_grant x2 = get(a, "x", 64, 7, QD_ARENA_HIT); /* a second lease on the same entry */
  cr_assert_neq(x.lease, x2.lease);
  get(a, "y", 64, 7, QINS_EARENA_FULL);
  cr_assert(strstr(msg, "arena-max-leases"), "%s", msg);
  get(a, "y", 64, 8, QD_ARENA_DECODE); /* another connection is not limited by conn 7 */
  rel(a, 7, x.lease);
  get(a, "z", 64, 7, QD_ARENA_DECODE);
  qd_arena_close(a);
}

Test(daemon_arena, releases_only_own_leases) {
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 1 << 20, 0), 0);
  qd_arena_grant x = get(a, "x", 64, 1, QD_ARENA_DECODE);
  decode(a, &x, 1);
  qd_arena_grant y = get(a, "x", 64, 2, QD_ARENA_HIT);
  cr_assert(qd_arena_holds(a, 1, x.lease));
  cr_assert_not(qd_arena_holds(a, 2, x.lease));
  cr_assert_eq(qd_arena_release(a, 2, x.lease, msg, sizeof msg), QINS_EBAD_PARAMS);
  cr_assert(strstr(msg, "not held by this connection"), "%s", msg);
  cr_assert_eq(qd_arena_release(a, 1, 999, msg, sizeof msg), QINS_EBAD_PARAMS);
  rel(a, 1, x.lease);
  cr_assert_eq(qd_arena_release(a, 1, x.lease, msg, sizeof msg), QINS_EBAD_PARAMS, "twice");
  for (int i = 0; i < 20; i++) {
    char n[16];
    snprintf(n, sizeof n, "t%d", i);
    qd_arena_grant t = get(a, n, 100, 3, QD_ARENA_DECODE);
    decode(a, &t, 2);
  }
  cr_assert_eq(stats(a).leases, 21);
  cr_assert_eq(qd_arena_release_conn(a, 3), 20);
  cr_assert_eq(qd_arena_release_conn(a, 3), 0);
  cr_assert_eq(stats(a).leases, 1);
  cr_assert(qd_arena_holds(a, 2, y.lease));
  cr_assert_eq(stats(a).leased, 64);
  qd_arena_close(a);
}

Test(daemon_arena, new_model_version_gets_new_entries) {
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 1 << 20, 0), 0);
  qd_arena_key k1 = key("m", 5, "w"), k1b = key("m", 5, "v"), k2 = key("m", 9, "w");
  qd_arena_key other = key("n", 3, "w");
  qd_arena_meta meta = {.ndim = 1, .shape = {256}, .dtype = "f32"};
  qd_arena_grant g1, g1b, g2, go;
  cr_assert_eq(qd_arena_acquire(a, &k1, &meta, 1024, 1, &g1, msg, sizeof msg), QD_ARENA_DECODE);
  decode(a, &g1, 0x11);
  cr_assert_eq(qd_arena_acquire(a, &k1b, &meta, 1024, 1, &g1b, msg, sizeof msg), QD_ARENA_DECODE);
  decode(a, &g1b, 0x12);
  rel(a, 1, g1b.lease); /* unleased: freed when the new version arrives */
  cr_assert_eq(qd_arena_acquire(a, &other, &meta, 1024, 1, &go, msg, sizeof msg), QD_ARENA_DECODE);
  decode(a, &go, 0x13);
  rel(a, 1, go.lease); /* another model: untouched */
  cr_assert_eq(stats(a).entries, 3);
  /* The model is replaced (store id 9): the same name maps to a new entry, the old stays. */
  cr_assert_eq(qd_arena_acquire(a, &k2, &meta, 1024, 2, &g2, msg, sizeof msg), QD_ARENA_DECODE);
  cr_assert_neq(g2.off, g1.off);
  decode(a, &g2, 0x22);
  check_bytes(a, g1.off, 1024, 0x11);
  cr_assert_eq(stats(a).entries, 3, "the old unleased entry is freed, the leased one kept");
  /* The old version is no longer found, even by a request still naming it. */
  qd_arena_grant g3;
  cr_assert_eq(qd_arena_acquire(a, &k1b, &meta, 1024, 3, &g3, msg, sizeof msg), QD_ARENA_DECODE);
  qd_arena_decoded(a, g3.entry, 0);
  rel(a, 3, g3.lease);
  rel(a, 1, g1.lease); /* its last lease: the superseded entry goes */
  qd_arena_stats s = stats(a);
  cr_assert_eq(s.entries, 3); /* k2, other, and k1b created again */
  cr_assert_eq(qd_arena_acquire(a, &other, &meta, 1024, 1, &go, msg, sizeof msg), QD_ARENA_HIT);
  check_bytes(a, go.off, 1024, 0x13);
  qd_arena_close(a);
}

Test(daemon_arena, normalises_whole_trailing_ranges) {
  qs_tensor t;
  memset(&t, 0, sizeof t);
  snprintf(t.model, sizeof t.model, "m");
  snprintf(t.name, sizeof t.name, "w");
  t.model_id = 1;
  t.ndim = 2;
  t.shape[0] = 10, t.shape[1] = 20;
  qs_slice whole = {.ndim = 2, .start = {0, 0}, .stop = {10, 20}};
  qs_slice rows = {.ndim = 2, .start = {2, 0}, .stop = {5, 20}};
  qs_slice rows1 = {.ndim = 1, .start = {2}, .stop = {5}};
  qs_slice cols = {.ndim = 2, .start = {0, 1}, .stop = {10, 20}};
  qd_arena_key k0, kw, kr, kr1, kc, kh;
  qd_arena_key_make(&k0, &t, NULL, 0);
  qd_arena_key_make(&kw, &t, &whole, 0);
  qd_arena_key_make(&kr, &t, &rows, 0);
  qd_arena_key_make(&kr1, &t, &rows1, 0);
  qd_arena_key_make(&kc, &t, &cols, 0);
  qd_arena_key_make(&kh, &t, NULL, 1);
  cr_assert_eq(memcmp(&k0, &kw, sizeof k0), 0);
  cr_assert_eq(memcmp(&kr, &kr1, sizeof kr), 0);
  cr_assert_eq(kc.ndim, 2);
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 1 << 20, 0), 0);
  qd_arena_key *ks[] = {&k0, &kw, &kr, &kr1, &kc, &kh};
  int want[] = {QD_ARENA_DECODE, QD_ARENA_WAIT, QD_ARENA_DECODE, QD_ARENA_WAIT, QD_ARENA_DECODE,
                QD_ARENA_DECODE};
  for (int i = 0; i < 6; i++) {
    qd_arena_grant g;
    cr_assert_eq(qd_arena_acquire(a, ks[i], NULL, 800, 1, &g, msg, sizeof msg), want[i], "key %d", i);
  }
  qd_arena_close(a);
}

/* Concurrent identical requests: one decodes, the others wait for it. */
typedef struct racer {
  qd_arena *a;
  pthread_barrier_t *bar;
  int outcome;
  int ok;
  uint64_t conn;
} racer;

static void *race(void *ud) {
  racer *r = ud;
  qd_arena_key k = key("m", 1, "shared");
  qd_arena_meta meta = {.ndim = 1, .shape = {1 << 18}, .dtype = "f32"};
  qd_arena_grant g;
  char m[256];
  pthread_barrier_wait(r->bar);
  r->outcome = qd_arena_acquire(r->a, &k, &meta, 1 << 20, r->conn, &g, m, sizeof m);
  if (r->outcome == QD_ARENA_DECODE) {
    usleep(20000); /* let the others find it DECODING (the assertions hold either way) */
    uint8_t *p = qd_arena_ptr(r->a, g.off);
    for (uint64_t i = 0; i < g.len; i++) p[i] = (uint8_t)(i * 7);
    qd_arena_decoded(r->a, g.entry, 0);
  } else if (r->outcome == QD_ARENA_WAIT) {
    if (qd_arena_wait(r->a, &g) != 0) return NULL;
  }
  const uint8_t *p = qd_arena_ptr(r->a, g.off);
  r->ok = 1;
  for (uint64_t i = 0; i < g.len; i++)
    if (p[i] != (uint8_t)(i * 7)) r->ok = 0;
  return NULL;
}

Test(daemon_arena, concurrent_requests_share_one_decode) {
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 4 << 20, 0), 0);
  enum { N = 4 };
  pthread_t th[N];
  racer r[N];
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, N);
  for (int i = 0; i < N; i++) {
    r[i] = (racer){.a = a, .bar = &bar, .conn = (uint64_t)i + 1};
    pthread_create(&th[i], NULL, race, &r[i]);
  }
  int decoders = 0;
  for (int i = 0; i < N; i++) {
    pthread_join(th[i], NULL);
    cr_assert(r[i].ok, "thread %d read wrong bytes (outcome %d)", i, r[i].outcome);
    decoders += r[i].outcome == QD_ARENA_DECODE;
  }
  cr_assert_eq(decoders, 1);
  qd_arena_stats s = stats(a);
  cr_assert_eq(s.misses, 1);
  cr_assert_eq(s.hits, N - 1);
  cr_assert_eq(s.decode_bytes, 1 << 20);
  cr_assert_eq(s.leases, N);
  pthread_barrier_destroy(&bar);
  qd_arena_close(a);
}

static void on_ready(void *ud, int rc) { *(int *)ud = rc == 0 ? 1 : rc; }

Test(daemon_arena, failed_decode_reaches_waiters_and_frees_entry) {
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 1 << 20, 0), 0);
  qd_arena_grant d = get(a, "x", 4096, 1, QD_ARENA_DECODE);
  qd_arena_grant w1 = get(a, "x", 4096, 2, QD_ARENA_WAIT);
  qd_arena_grant w2 = get(a, "x", 4096, 3, QD_ARENA_WAIT);
  int got1 = 0, got2 = 0, rc = 0;
  qd_arena_waiter a1 = {.cb = on_ready, .ud = &got1}, a2 = {.cb = on_ready, .ud = &got2};
  cr_assert_eq(qd_arena_wait_async(a, &w1, &a1, &rc), 0);
  cr_assert_eq(qd_arena_wait_async(a, &w2, &a2, &rc), 0);
  cr_assert_eq(qd_arena_wait_cancel(a, &a2), 1); /* its connection went away */
  cr_assert_eq(qd_arena_wait_cancel(a, &a2), 0);
  qd_arena_decoded(a, d.entry, QINS_ECHECKSUM);
  cr_assert_eq(got1, QINS_ECHECKSUM);
  cr_assert_eq(got2, 0, "a cancelled waiter is not called");
  cr_assert_eq(qd_arena_wait(a, &w2), QINS_ECHECKSUM);
  cr_assert_eq(qd_arena_wait_async(a, &w2, &a2, &rc), 1);
  cr_assert_eq(rc, QINS_ECHECKSUM);
  /* The failed entry is never found again; it goes with its last lease. */
  qd_arena_grant d2 = get(a, "x", 4096, 4, QD_ARENA_DECODE);
  cr_assert_neq(d2.off, d.off);
  rel(a, 1, d.lease);
  rel(a, 2, w1.lease);
  cr_assert_eq(stats(a).entries, 2);
  rel(a, 3, w2.lease);
  cr_assert_eq(stats(a).entries, 1);
  /* A successful decode runs the async waiters with 0. */
  qd_arena_grant w3 = get(a, "x", 4096, 5, QD_ARENA_WAIT);
  int got3 = 0;
  qd_arena_waiter a3 = {.cb = on_ready, .ud = &got3};
  cr_assert_eq(qd_arena_wait_async(a, &w3, &a3, &rc), 0);
  qd_arena_decoded(a, d2.entry, 0);
  cr_assert_eq(got3, 1);
  cr_assert_eq(qd_arena_wait(a, &w3), 0);
  qd_arena_close(a);
}

Test(daemon_arena, a_connection_closing_mid_decode_leaves_the_entry_cached) {
  qd_arena *a;
  cr_assert_eq(qd_arena_open(&a, 1 << 20, 0), 0);
  qd_arena_grant d = get(a, "x", 4096, 1, QD_ARENA_DECODE);
  cr_assert_eq(qd_arena_release_conn(a, 1), 1);
  cr_assert_eq(stats(a).leased, 4096, "still pinned by its decode");
  memset(qd_arena_ptr(a, d.off), 9, 4096);
  qd_arena_decoded(a, d.entry, 0);
  cr_assert_eq(stats(a).leased, 0);
  qd_arena_grant h = get(a, "x", 4096, 2, QD_ARENA_HIT);
  check_bytes(a, h.off, 4096, 9);
  qd_arena_close(a);
}

/* Every way a client could write or resize the arena through the fd it gets, or through a
 * writable re-open of it, is refused; the daemon's own mapping stays writable and a client's
 * read-only mapping sees its writes. */
Test(daemon_arena, seals_refuse_writes_and_resizes) {
  qd_arena *a;
  uint64_t pg = page(), sz = 16 * pg;
  cr_assert_eq(qd_arena_open(&a, sz, 0), 0);
  int fd = qd_arena_fd(a);
  int seals = fcntl(fd, F_GET_SEALS);
  cr_assert_eq(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL),
               F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL, "seals %#x", seals);
  cr_assert_eq(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDONLY);
  /* The fd clients get. */
  cr_assert_eq(mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  cr_assert_eq(pwrite(fd, "x", 1, 0), -1);
  cr_assert_eq(ftruncate(fd, (off_t)(2 * sz)), -1);
  cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1);
  /* A writable re-open through /proc: the open succeeds (mode 0777), each write is refused by
   * the seals. */
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int rw = open(path, O_RDWR);
  if (rw >= 0) {
    errno = 0;
    cr_assert_eq(mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, rw, 0), MAP_FAILED);
    cr_assert_eq(errno, EPERM);
    errno = 0;
    cr_assert_eq(pwrite(rw, "x", 1, 0), -1);
    cr_assert_eq(errno, EPERM);
    errno = 0;
    cr_assert_eq(write(rw, "x", 1), -1);
    cr_assert_eq(errno, EPERM);
    errno = 0;
    cr_assert_eq(ftruncate(rw, (off_t)(2 * sz)), -1);
    cr_assert_eq(errno, EPERM);
    cr_assert_eq(ftruncate(rw, (off_t)(sz / 2)), -1);
    cr_assert_eq(fallocate(rw, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)pg), -1);
    cr_assert_eq(fcntl(rw, F_ADD_SEALS, F_SEAL_WRITE), -1);
    close(rw);
  }
  struct stat st;
  cr_assert_eq(fstat(fd, &st), 0);
  cr_assert_eq((uint64_t)st.st_size, sz);
  /* A read-only shared mapping (what libqins makes) sees the daemon's writes. */
  const uint8_t *ro = mmap(NULL, sz, PROT_READ, MAP_SHARED, fd, 0);
  cr_assert_neq(ro, MAP_FAILED);
  memset(qd_arena_ptr(a, pg), 0xab, 10);
  cr_assert_eq(ro[pg], 0xab);
  cr_assert_eq(ro[pg + 9], 0xab);
  /* A private writable mapping is allowed (copy on write) and cannot reach the shared bytes. */
  uint8_t *priv = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  cr_assert_neq(priv, MAP_FAILED);
  priv[pg] = 0x01;
  cr_assert_eq(ro[pg], 0xab);
  cr_assert_eq(*(uint8_t *)qd_arena_ptr(a, pg), 0xab);
  munmap(priv, sz);
  /* The client's mapping outlives the daemon's side. */
  qd_arena_close(a);
  cr_assert_eq(ro[pg + 5], 0xab);
  munmap((void *)ro, sz);
}

Test(daemon_arena, pages_are_created_on_first_use_and_counted) {
  qd_arena *a;
  uint64_t pg = page();
  cr_assert_eq(qd_arena_open(&a, 1024 * pg, 0), 0);
  cr_assert_eq(stats(a).resident, 0, "an unused arena holds no pages");
  qd_arena_grant g = get(a, "x", 3 * pg, 1, QD_ARENA_DECODE);
  cr_assert_eq(stats(a).resident, 0, "allocation alone creates no pages");
  decode(a, &g, 1);
  cr_assert_eq(stats(a).resident, 3 * pg);
  rel(a, 1, g.lease);
  /* Pages stay once created, whatever happens to the entry. */
  get(a, "y", 1024 * pg, 2, QD_ARENA_DECODE);
  qd_arena_stats s = stats(a);
  cr_assert_eq(s.evictions, 1);
  cr_assert_eq(s.resident, 3 * pg);
  cr_assert_eq(s.decode_bytes, 3 * pg);
  cr_assert_eq(s.used, 1024 * pg);
  cr_assert_eq(s.leased, 1024 * pg);
  int rc = qd_arena_prefault(a, 100 * pg, 10 * pg + 1);
  if (rc == -EINVAL) cr_skip_test("MADV_POPULATE_WRITE is not supported by this kernel");
  cr_assert_eq(rc, 0);
  cr_assert_eq(stats(a).resident, 3 * pg + 11 * pg);
  cr_assert_eq(qd_arena_prefault(a, 1023 * pg, 2 * pg), -EINVAL);
  qd_arena_close(a);
}

/* The warm reserve's picks (qd_arena_warm_next): the lowest free pages not yet created, in runs of
 * at most `max`, until created pages wholly in free space reach the reserve; entries placed after
 * that land on created pages, and pages an evicted entry left count as warm. */
Test(daemon_arena, warm_next_picks_lowest_free_pages_up_to_the_reserve) {
  qd_arena *a;
  uint64_t pg = page(), off, len, pending;
  cr_assert_eq(qd_arena_open(&a, 64 * pg, 0), 0);
  cr_assert_eq(stats(a).resident, 0);
  /* Reserve 10 pages, 4 at a time: 0-4, 4-8, 8-10, then nothing. */
  const uint64_t want[][2] = {{0, 4}, {4, 4}, {8, 2}};
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(qd_arena_warm_next(a, 10 * pg, 4 * pg, &off, &len, &pending), 1);
    cr_assert_eq(pending, (10 - want[i][0]) * pg);
    cr_assert_eq(off, want[i][0] * pg, "pick %d at page %llu", i, (unsigned long long)(off / pg));
    cr_assert_eq(len, want[i][1] * pg);
    cr_assert_eq(qd_arena_prefault(a, off, len), 0);
  }
  cr_assert_eq(qd_arena_warm_next(a, 10 * pg, 4 * pg, &off, &len, &pending), 0);
  cr_assert_eq(pending, 0);
  qd_arena_stats s = stats(a);
  cr_assert_eq(s.warm, 10 * pg);
  cr_assert_eq(s.resident, 10 * pg);
  /* A 6-page entry takes the start of the reserve; the next pick follows the created pages. */
  qd_arena_grant e = get(a, "e", 6 * pg, 1, QD_ARENA_DECODE);
  cr_assert_eq(e.off, 0);
  cr_assert_eq(stats(a).warm, 4 * pg);
  cr_assert_eq(qd_arena_warm_next(a, 10 * pg, 64 * pg, &off, &len, &pending), 1);
  cr_assert_eq(off, 10 * pg);
  cr_assert_eq(len, 6 * pg);
  cr_assert_eq(qd_arena_prefault(a, off, len), 0);
  cr_assert_eq(stats(a).warm, 10 * pg);
  /* Released and evicted, its pages are warm again: nothing more is due. */
  decode(a, &e, 7);
  rel(a, 1, e.lease);
  qd_arena_grant all = get(a, "all", 64 * pg, 2, QD_ARENA_DECODE);
  cr_assert_eq(stats(a).warm, 0, "nothing is free");
  cr_assert_eq(qd_arena_warm_next(a, 10 * pg, 4 * pg, &off, &len, &pending), 0);
  qd_arena_decoded(a, all.entry, 0);
  rel(a, 2, all.lease);
  cr_assert_eq(stats(a).warm, 0, "all still cached");
  /* x (small: cut from the end) evicts "all". decode() writes without qd_arena_prefault, so the
   * pages known to exist are the 16 created above. */
  get(a, "x", pg, 3, QD_ARENA_DECODE);
  cr_assert_eq(stats(a).warm, 16 * pg);
  cr_assert_eq(qd_arena_warm_next(a, 10 * pg, 4 * pg, &off, &len, &pending), 0);
  /* A reserve beyond the free pages asks only for what free space holds: pages 16..62. */
  cr_assert_eq(qd_arena_warm_next(a, 1000 * pg, 64 * pg, &off, &len, &pending), 1);
  cr_assert_eq(pending, (63 - 16) * pg);
  cr_assert_eq(off, 16 * pg);
  qd_arena_close(a);
}
