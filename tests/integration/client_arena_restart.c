/* SPDX-License-Identifier: MIT */
/*
 * client_arena_restart.c — libqins's arena calls ride through daemon restarts (issue 18; client/
 * qins.h "The arena", docs/client.md §1.1):
 *   - a worker thread maps tensors (qins_map whole and row ranges, qins_map_many), checks every
 *     mapped byte against `get` of the same request, keeps a few mappings held across iterations
 *     (released several at once, old and new leases mixed) and keeps its first mappings held for
 *     the whole run, re-reading them each iteration, while qinsd is restarted 5 times (SIGTERM +
 *     start, once SIGKILL + start): no call fails, no byte differs, one reconnect and one
 *     re-attach per restart; once the old leases are released their mappings are gone from
 *     /proc/self/maps;
 *   - after a restart (SIGTERM, and SIGKILL), releasing the old daemon's leases is local: a new
 *     lease of the same client that the new daemon numbered like an old one, and another client's
 *     leases, stay held (the daemon's arena_leases), the old pointers read their bytes until
 *     released, and the old mapping is unmapped with its last lease (/proc/self/maps, and the
 *     old_mappings counter).
 * Without re-attaching, the first map after a restart fails (QINS_ECLOSED), and a release sent to
 * the new daemon would end the same client's new lease or be refused. Progress is polled, never
 * timed.
 */
#include "client_restart.h"

TestSuite(client_arena_restart, .init = setup, .fini = teardown, .timeout = 180);

/* 1 when address p lies in a mapping of this process (/proc/self/maps). */
static int is_mapped(const void *p) {
  FILE *f = fopen("/proc/self/maps", "r");
  char line[512];
  int hit = 0;
  while (f && !hit && fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    if (sscanf(line, "%lx-%lx", &lo, &hi) == 2) hit = (uintptr_t)p >= lo && (uintptr_t)p < hi;
  }
  if (f) fclose(f);
  return hit;
}

/* The daemon's arena_leases (every connection's), through a raw connection of its own. */
static uint64_t daemon_leases(void) {
  ts_rx rx;
  open_rx(&rx);
  uint64_t v = map_u64(stats_on(&rx), "arena_leases");
  ts_rx_destroy(&rx);
  return v;
}

static qins_client *attached(void) {
  qins_client *c = NULL;
  cr_assert_eq(qins_connect(&c, D.sock, 10000), 0);
  qins_set_retry(c, 60000); /* restarts on a loaded machine: no error may reach this caller */
  cr_assert_eq(qins_attach(c, NULL), 0, "attach: %s", qins_client_error(c));
  return c;
}

#define N_WANT 5
static const char *const want_names[N_WANT] = {"a.w", "big", "c3", "q8", "l.0.y"};
#define RING 3 /* mappings the worker keeps held across iterations */

typedef struct worker {
  restart_worker base;     /* first: the driver's view */
  int old_release_rc;      /* releasing the first mappings (old leases) at the end */
  uint64_t old_after;      /* old_mappings after that */
  int first_still_mapped;  /* the first mappings' address is mapped after that */
} worker;

/* m (one mapped request) equals a get of the same request on c; -1 if the get failed. */
static int equals_get(qins_client *c, const qins_mapped *m, const char *name, const qins_range *r,
                      int nr, uint8_t *buf, size_t cap) {
  size_t n = 0;
  if (qins_get_into(c, "m", name, r, nr, QINS_F32, buf, cap, &n, NULL, NULL)) return -1;
  return n == m->bytes && !memcmp(m->data, buf, n);
}

static void *worker_main(void *arg) {
  worker *ww = arg;
  restart_worker *w = &ww->base;
  size_t cap = 1024 * 600 * 4; /* the largest tensor, "big" */
  uint8_t *want[N_WANT], *buf = malloc(cap);
  qins_client *c = worker_connect(w);
  if (!c) {
    free(buf);
    return NULL;
  }
  qins_mapped first[N_WANT], ring[RING];
  uint8_t *ring_want[RING] = {0}; /* what each ring entry read when mapped */
  int in_ring = 0;
  if (qins_attach(c, NULL) || qins_map_many(c, "m", want_names, N_WANT, QINS_F32, first)) {
    note_failure(w, c, "attach + map_many");
    goto out;
  }
  for (int i = 0; i < N_WANT; i++) { /* the first mappings' bytes, kept to re-read them later */
    want[i] = malloc(first[i].bytes);
    memcpy(want[i], first[i].data, first[i].bytes);
    if (equals_get(c, &first[i], want_names[i], NULL, 0, buf, cap) != 1)
      atomic_fetch_add(&w->wrong, 1);
  }
  for (unsigned long k = 0; !atomic_load(&w->stop); k++) {
    int i = (int)(k % N_WANT), good = 1, rc;
    qins_mapped m[2];
    qins_range r = {0, 1};
    int nr = (k / N_WANT) % 2 && std_find(want_names[i])->ndim >= 2; /* the first row, or whole */
    if (k % 3 == 2) {
      const char *two[2] = {want_names[i], "a.w"};
      rc = qins_map_many(c, "m", two, 2, QINS_F32, m);
      if (rc) {
        note_failure(w, c, "map_many");
        continue;
      }
      good = equals_get(c, &m[0], two[0], NULL, 0, buf, cap) == 1 &&
             equals_get(c, &m[1], two[1], NULL, 0, buf, cap) == 1;
      if (qins_release(c, &m[1].lease, 1)) note_failure(w, c, "release");
    } else {
      rc = qins_map(c, "m", want_names[i], &r, nr, QINS_F32, m);
      if (rc) {
        note_failure(w, c, "map");
        continue;
      }
      good = equals_get(c, m, want_names[i], &r, nr, buf, cap) == 1;
    }
    /* Hold m[0] for a few iterations (across restarts); when the ring is full, release all of
     * it in one call: leases of the old and the new daemon mixed. */
    if (in_ring == RING) {
      uint64_t l[RING];
      for (int j = 0; j < RING; j++) { /* unchanged while held, whichever daemon mapped them */
        good &= !memcmp(ring[j].data, ring_want[j], ring[j].bytes);
        l[j] = ring[j].lease;
      }
      if (qins_release(c, l, RING)) note_failure(w, c, "release of several");
      in_ring = 0;
    }
    ring_want[in_ring] = realloc(ring_want[in_ring], m[0].bytes);
    memcpy(ring_want[in_ring], m[0].data, m[0].bytes);
    ring[in_ring++] = m[0];
    for (int j = 0; j < N_WANT; j++) /* the first mappings still read their bytes */
      good &= !memcmp(first[j].data, want[j], first[j].bytes);
    if (good) atomic_fetch_add(&w->ok, 1);
    else atomic_fetch_add(&w->wrong, 1);
  }
  qins_client_stats(c, &w->stats);
  {
    uint64_t l[N_WANT];
    for (int i = 0; i < N_WANT; i++) l[i] = first[i].lease;
    ww->old_release_rc = qins_release(c, l, N_WANT);
    if (in_ring) {
      for (int j = 0; j < in_ring; j++) l[j] = ring[j].lease;
      if (qins_release(c, l, in_ring)) note_failure(w, c, "release of the ring");
    }
    qins_conn_stats st;
    qins_client_stats(c, &st);
    ww->old_after = st.old_mappings;
    ww->first_still_mapped = is_mapped(first[0].data);
  }
  for (int i = 0; i < N_WANT; i++) free(want[i]);
  for (int j = 0; j < RING; j++) free(ring_want[j]);
out:
  qins_close(c);
  free(buf);
  return NULL;
}

Test(client_arena_restart, maps_ride_through_five_restarts) {
  worker w;
  memset(&w, 0, sizeof w);
  ride_five_restarts(&w.base, worker_main, 2 * RING + 2);
  cr_log_info("client_arena_restart: %llu good iterations, %llu reconnects, %llu re-attaches",
              (unsigned long long)atomic_load(&w.base.ok),
              (unsigned long long)w.base.stats.reconnects,
              (unsigned long long)w.base.stats.reattaches);
  cr_expect_eq(w.base.stats.reattaches, 5, "one re-attach per restart");
  cr_expect_geq(w.base.stats.old_mappings, 1, "the first daemon's mapping is kept while leased");
  cr_expect_eq(w.old_release_rc, 0, "releasing the first daemon's leases");
  cr_expect_eq(w.old_after, 0, "every old mapping went with its last lease");
  cr_expect_not(w.first_still_mapped, "the first daemon's mapping is unmapped");
}

/* After a restart, old leases are released locally: nothing of the new daemon's is touched. */
static void old_release_is_local(int sigkill) {
  qins_client *a = attached();
  qins_mapped old[N_WANT];
  cr_assert_eq(qins_map_many(a, "m", want_names, N_WANT, QINS_F32, old), 0, "%s",
               qins_client_error(a));
  cr_assert_eq(daemon_leases(), N_WANT);
  uint8_t *copy[N_WANT];
  for (int i = 0; i < N_WANT; i++) {
    copy[i] = malloc(old[i].bytes);
    memcpy(copy[i], old[i].data, old[i].bytes);
  }
  restart(sigkill);
  cr_assert_eq(daemon_leases(), 0, "a new daemon, no leases");
  /* a first on the new daemon: its lease there has the number its first old one had. */
  qins_mapped fresh[2];
  cr_assert_eq(qins_map(a, "m", "a.w", NULL, 0, QINS_F32, &fresh[0]), 0, "map after the restart: %s",
               qins_client_error(a));
  cr_assert_eq(qins_map(a, "m", "c3", NULL, 0, QINS_F32, &fresh[1]), 0, "%s", qins_client_error(a));
  qins_client *b = attached(); /* another client's leases on the new daemon */
  qins_mapped bm[2];
  const char *bn[2] = {"big", "q8"};
  cr_assert_eq(qins_map_many(b, "m", bn, 2, QINS_F32, bm), 0, "%s", qins_client_error(b));
  cr_assert_eq(daemon_leases(), 4);
  qins_conn_stats st;
  qins_client_stats(a, &st);
  cr_expect_eq(st.reconnects, 1);
  cr_expect_eq(st.reattaches, 1);
  cr_expect_eq(st.old_mappings, 1, "the old arena stays mapped while its leases are held");
  for (int i = 0; i < N_WANT; i++) {
    cr_expect_eq(memcmp(old[i].data, copy[i], old[i].bytes), 0, "%s: the old mapping's bytes "
                 "changed", want_names[i]);
    for (int j = 0; j < 2; j++)
      cr_expect_neq(old[i].lease, fresh[j].lease, "a new lease handle equals an old one");
  }
  cr_expect(old[0].data != fresh[0].data, "the new arena is a new mapping");
  /* One release of every old lease and one new one, mixed: only the new one reaches the daemon. */
  uint64_t mix[N_WANT + 1];
  for (int i = 0; i < N_WANT; i++) mix[i] = old[i].lease;
  mix[N_WANT] = fresh[1].lease;
  cr_expect_eq(qins_release(a, mix, N_WANT + 1), 0, "%s", qins_client_error(a));
  cr_expect_eq(daemon_leases(), 3, "a's other new lease and b's two are held");
  qins_client_stats(a, &st);
  cr_expect_eq(st.old_mappings, 0, "the old mapping went with its last lease");
  cr_expect_not(is_mapped(old[0].data), "the old arena is unmapped");
  cr_expect_eq(qins_release(a, &old[0].lease, 1), QINS_EBAD_PARAMS, "released twice");
  /* What is still held is intact and releases normally. */
  void *p = NULL;
  size_t n = 0;
  cr_assert_eq(qins_get(a, "m", "a.w", NULL, 0, QINS_F32, &p, &n, NULL, NULL), 0);
  cr_expect(n == fresh[0].bytes && !memcmp(fresh[0].data, p, n), "a's new mapping");
  qins_free(p);
  cr_assert_eq(qins_get(b, "m", "big", NULL, 0, QINS_F32, &p, &n, NULL, NULL), 0);
  cr_expect(n == bm[0].bytes && !memcmp(bm[0].data, p, n), "b's mapping");
  qins_free(p);
  uint64_t bl[2] = {bm[0].lease, bm[1].lease};
  cr_expect_eq(qins_release(b, bl, 2), 0, "b's leases were all still held: %s",
               qins_client_error(b));
  cr_expect_eq(qins_release(a, &fresh[0].lease, 1), 0, "%s", qins_client_error(a));
  cr_expect_eq(daemon_leases(), 0);
  for (int i = 0; i < N_WANT; i++) free(copy[i]);
  qins_close(b);
  qins_close(a);
}

Test(client_arena_restart, old_leases_are_released_locally_after_sigterm) {
  old_release_is_local(0);
}

Test(client_arena_restart, old_leases_are_released_locally_after_sigkill) {
  old_release_is_local(1);
}
