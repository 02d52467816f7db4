/* SPDX-License-Identifier: MIT */
/*
 * bench_arena.c — zero-copy delivery from qinsd's decoded-weights arena (issue 14; protocol
 * docs/PROTOCOL.md §4.10-4.13), each figure next to its same-run reference, `get` over the socket:
 *   1. first delivery of a 64 MiB and a 256 MiB (decoded f32) qins8 tensor: `map` (request +
 *      decode into the arena + the client reading one byte of every page) vs `get` of the same
 *      tensor into a fresh buffer (target >= 2.5x), on three kinds of arena pages: pages the warm
 *      reserve created after attach (a fresh daemon with the default arena-warm-bytes, its
 *      reserve waited for untimed: what a worker meets), pages that do not exist yet
 *      (arena-warm-bytes 0: the `_new_pages` lines, page creation included), and pages an evicted
 *      entry left (arena-warm-bytes 0, a 288 MiB arena that mapped and released another 256 MiB
 *      tensor first: the `_evicted_pages` lines);
 *   2. a repeat `map` of the cached entry (+ touching every page) vs a repeat `get` (target
 *      >= 50x);
 *   3. summed PSS of the daemon and 4 worker processes each mapping the same 1 GiB of decoded
 *      weights (and reading every page) vs 4 workers holding `get` copies; target: mapped <= 1.1x
 *      one decoded copy plus the store pages touched. A fresh daemon without a warm reserve
 *      (arena-warm-bytes 0; what the reserve adds to qinsd's PSS is printed with part 1), the
 *      mapped case first (so neither earlier arena entries nor get's buffer cache count in it).
 * When the daemon does not serve `attach` (UNKNOWN_METHOD) or has no arena, it says so and exits
 * 0 before building the large store. The bench never opens the store itself (it forks the filler
 * and execs qinsd; LMDB rule). Memory: about 4 x 1 GiB for the copied workers in part 3.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "qins.h"

#define COLS 4096
#define MiB (1024.0 * 1024.0)

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Tensors: q64 (64 MiB decoded), q256, g1, g2, g3 (256 MiB each): q256 + g1..g3 = 1 GiB. */
static const struct {
  const char *name;
  uint64_t rows;
} tensors[] = {{"q64", 4096}, {"q256", 16384}, {"g1", 16384}, {"g2", 16384}, {"g3", 16384}};
enum { N_TENSORS = 5 };
static const char *const gib_set[4] = {"q256", "g1", "g2", "g3"};

static int fill(qs_store *s, void *ud) {
  (void)ud;
  qs_import *im;
  int rc = qs_import_begin(s, "arena", NULL, &im);
  if (rc) return rc;
  size_t n = (size_t)16384 * COLS;
  float *v = malloc(n * sizeof *v);
  if (!v) return QINS_ENOMEM;
  for (int t = 0; t < N_TENSORS && !rc; t++) {
    for (size_t i = 0; i < (size_t)tensors[t].rows * COLS; i++)
      v[i] = (float)((int)((i * 2654435761u + (size_t)t * 977) % 2001) - 1000) * 1e-3f;
    uint64_t shape[2] = {tensors[t].rows, COLS};
    rc = ts_import_f32(im, tensors[t].name, 2, shape, QC_QINS8, v);
  }
  free(v);
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

/* Reads one byte of every page (what a worker pays to fault its view in). */
static uint64_t touch(const void *p, size_t n) {
  const volatile uint8_t *b = p;
  uint64_t s = 0;
  for (size_t i = 0; i < n; i += 4096) s += b[i];
  return s;
}

static volatile uint64_t sink;

static qins_client *conn(const char *sock) {
  qins_client *c = NULL;
  int rc = qins_connect(&c, sock, 30000);
  if (rc) {
    fprintf(stderr, "bench_arena: connect: %s\n", qins_strerror(rc));
    exit(1);
  }
  qins_set_timeout(c, 120000);
  return c;
}

/* Seconds for one get of `name` into a fresh buffer, the buffer's pages included. */
static double time_get(qins_client *c, const char *name) {
  double t0 = now_s();
  void *buf = NULL;
  size_t n = 0;
  if (qins_get(c, "arena", name, NULL, 0, QINS_F32, &buf, &n, NULL, NULL)) {
    fprintf(stderr, "bench_arena: get %s: %s\n", name, qins_client_error(c));
    exit(1);
  }
  sink += touch(buf, n);
  double t = now_s() - t0;
  qins_free(buf);
  return t;
}

/* Seconds for one map of `name` plus touching every page; the lease is released after timing. */
static double time_map(qins_client *c, const char *name) {
  qins_mapped m;
  double t0 = now_s();
  if (qins_map(c, "arena", name, NULL, 0, QINS_F32, &m)) {
    fprintf(stderr, "bench_arena: map %s: %s\n", name, qins_client_error(c));
    exit(1);
  }
  sink += touch(m.data, m.bytes);
  double t = now_s() - t0;
  qins_release(c, &m.lease, 1);
  return t;
}

/* A stats counter, or exits. */
static uint64_t stat_u64(qins_client *c, const char *key) {
  char *json = NULL, pat[64];
  if (qins_stats(c, &json)) {
    fprintf(stderr, "bench_arena: stats: %s\n", qins_client_error(c));
    exit(1);
  }
  snprintf(pat, sizeof pat, "\"%s\":", key);
  const char *p = strstr(json, pat);
  if (!p) {
    fprintf(stderr, "bench_arena: stats has no %s\n", key);
    exit(1);
  }
  uint64_t v = strtoull(p + strlen(pat), NULL, 10);
  free(json);
  return v;
}

/* Waits (untimed, 60 s at most) until the daemon's warm reserve is made up; returns seconds. */
static double warm_wait(qins_client *c) {
  double t0 = now_s();
  while (stat_u64(c, "arena_warm_pending") && now_s() - t0 < 60) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
  }
  return now_s() - t0;
}

/* Starts qinsd with args, or removes its dir and exits. */
static void start_or_exit(ts_daemon *d, const char *const *args) {
  if (ts_daemon_start(d, args)) {
    ts_dir_remove(d, 1);
    exit(1);
  }
}

/* A new connection to sock, attached, or exits. */
static qins_client *attached(const char *sock) {
  qins_client *c = conn(sock);
  if (qins_attach(c, NULL)) {
    fprintf(stderr, "bench_arena: attach: %s\n", qins_client_error(c));
    exit(1);
  }
  return c;
}

/* Prints one first-delivery line: get of `name` (after an untimed get that warms the store's
 * pages) next to the first map of it; `warm`: the daemon's reserve is made up (untimed) first. */
static void first_delivery(qins_client *c, const char *name, double mb, const char *suffix,
                           const char *note, int warm) {
  time_get(c, name);
  double g1 = time_get(c, name);
  if (warm) warm_wait(c);
  double m1 = time_map(c, name);
  printf("arena_first_delivery_%.0fMiB_qins8%s: map %.1f ms (%.2f GB/s) | get %.1f ms (%.2f GB/s) "
         "| ratio %.2f (%s, and the client reading every page)\n", mb, suffix, m1 * 1e3,
         mb * MiB / m1 / 1e9, g1 * 1e3, mb * MiB / g1 / 1e9, g1 / m1, note);
}

static uint64_t pss_kib(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
  FILE *f = fopen(path, "r");
  uint64_t v = 0;
  while (f && fgets(line, sizeof line, f))
    if (sscanf(line, "Pss: %lu kB", &v) == 1) break;
  if (f) fclose(f);
  return v;
}

/* One worker of pss_run: maps (or gets, holding the copies) the 1 GiB set and reads every page.
 * A get answered BUSY (4 workers at once exceed max-response-memory) is asked again, as a worker
 * would. 0, or a message on stderr and 1. */
static int pss_worker(const char *sock, int mapped) {
  qins_client *c = conn(sock);
  if (mapped && qins_attach(c, NULL)) {
    fprintf(stderr, "bench_arena: worker attach: %s\n", qins_client_error(c));
    return 1;
  }
  for (int i = 0; i < 4; i++) {
    int rc;
    if (mapped) {
      qins_mapped m;
      if (!(rc = qins_map(c, "arena", gib_set[i], NULL, 0, QINS_F32, &m)))
        sink += touch(m.data, m.bytes);
    } else {
      void *buf;
      size_t n;
      for (int t = 0; (rc = qins_get(c, "arena", gib_set[i], NULL, 0, QINS_F32, &buf, &n, NULL,
                                      NULL)) == QINS_EBUSY && t < 3000; t++) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
      }
      if (!rc) sink += touch(buf, n); /* held until exit */
    }
    if (rc) {
      fprintf(stderr, "bench_arena: worker %s %s: %s\n", mapped ? "map" : "get", gib_set[i],
              qins_client_error(c));
      return 1;
    }
  }
  return 0;
}

/* Starts 4 workers that each map (or get) the 1 GiB set and read every page, then wait; returns
 * the summed PSS (KiB) of the daemon and the workers once all are ready (0 if one failed). */
static uint64_t pss_run(const char *sock, pid_t daemon, int mapped) {
  int ready[2], go[2];
  if (pipe(ready) || pipe(go)) exit(1);
  pid_t w[4];
  for (int k = 0; k < 4; k++) {
    if ((w[k] = fork()) == 0) {
      close(ready[0]);
      close(go[1]);
      char b = pss_worker(sock, mapped) == 0; /* a status byte either way: the parent counts 4 */
      if (write(ready[1], &b, 1) != 1) _exit(4);
      if (b && read(go[0], &b, 1) < 0) _exit(5); /* EOF when the parent is done measuring */
      _exit(b ? 0 : 3);
    }
  }
  close(ready[1]);
  close(go[0]);
  int ok = 0;
  char b;
  for (int k = 0; k < 4; k++) ok += read(ready[0], &b, 1) == 1 && b == 1;
  uint64_t sum = ok == 4 ? pss_kib(daemon) : 0;
  for (int k = 0; k < 4 && ok == 4; k++) sum += pss_kib(w[k]);
  close(go[1]);
  close(ready[0]);
  for (int k = 0; k < 4; k++) {
    int st;
    waitpid(w[k], &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st)) sum = 0;
  }
  return sum;
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  setvbuf(stdout, NULL, _IOLBF, 0); /* each line out as printed (and none duplicated by fork) */
  ts_daemon d;
  if (ts_dir_make(&d)) {
    perror("mkdtemp");
    return 1;
  }
  const char *args[] = {"--log-level", "notice", NULL};
  const char *warm_note = "target >= 2.5; map: decode into arena pages the warm reserve created "
                          "after attach";
  const char *evicted_note = "arena-warm-bytes 0; map: decode into arena pages an evicted entry "
                             "left";
  const char *cold[] = {"--log-level", "notice", "--arena-warm-bytes", "0", NULL};
  /* Does this qinsd serve the arena? Asked on the empty store, before the large one is built. */
  if (ts_daemon_start(&d, cold)) {
    ts_dir_remove(&d, 1);
    return 1;
  }
  qins_client *c = conn(d.sock);
  int rc = qins_attach(c, NULL);
  if (rc) {
    printf("arena: not served by this qinsd (%s): arena benchmarks skipped\n",
           qins_client_error(c));
    qins_close(c);
    ts_dir_remove(&d, 0);
    return 0;
  }
  qins_close(c);
  ts_daemon_stop(&d);
  double t0 = now_s();
  if (ts_store_fill(d.store, fill, NULL)) {
    fprintf(stderr, "bench_arena: filling the store failed\n");
    ts_dir_remove(&d, 0);
    return 1;
  }
  double fill_s = now_s() - t0;
  /* 1 on pages the warm reserve created: a fresh daemon (default arena-warm-bytes), the reserve
   * made up untimed after attach and again before each map. The store's pages are warmed by an
   * untimed get first, so both paths read the same cached compressed bytes. */
  start_or_exit(&d, args);
  uint64_t pss0 = pss_kib(d.pid);
  c = attached(d.sock);
  double warm_s = warm_wait(c);
  printf("arena_warm_reserve: %.0f MiB of arena pages created in the background %.2f s after "
         "attach (default arena-warm-bytes; polled, untimed for the figures below) | qinsd PSS "
         "%.0f MiB before attach, %.0f MiB with the reserve\n",
         (double)stat_u64(c, "arena_warm") / MiB, warm_s, pss0 / 1024.0, pss_kib(d.pid) / 1024.0);
  const char *first[2] = {"q64", "q256"};
  first_delivery(c, first[0], 64, "", warm_note, 1);
  first_delivery(c, first[1], 256, "", warm_note, 1);
  qins_close(c);
  ts_daemon_stop(&d);
  /* 1 and 2: first and repeat delivery on new arena pages (no reserve). */
  start_or_exit(&d, cold);
  c = attached(d.sock);
  for (int k = 0; k < 2; k++) {
    double mb = (k ? 256 : 64);
    first_delivery(c, first[k], mb, "_new_pages", "arena-warm-bytes 0; map: decode into arena "
                   "pages created now", 0);
    double g2 = 1e9, m2 = 1e9;
    for (int r = 0; r < 5; r++) {
      double g = time_get(c, first[k]), m = time_map(c, first[k]);
      if (g < g2) g2 = g;
      if (m < m2) m2 = m;
    }
    printf("arena_repeat_%.0fMiB_qins8: map %.3f ms | get %.1f ms | ratio %.1f (target >= 50; "
           "best of 5; both read every page)\n",
           mb, m2 * 1e3, g2 * 1e3, g2 / m2);
  }
  qins_close(c);
  ts_daemon_stop(&d);
  /* 1 again, on pages evicted entries left: a 288 MiB arena without a reserve, g1 mapped and
   * released first; q256 then evicts it and reuses its pages, and q64 evicts q256 and reuses the
   * start of them. */
  const char *small[] = {"--log-level", "notice", "--arena-bytes", "288M", "--arena-warm-bytes",
                         "0", NULL};
  start_or_exit(&d, small);
  c = attached(d.sock);
  time_map(c, "g1");
  first_delivery(c, "q256", 256, "_evicted_pages", evicted_note, 0);
  first_delivery(c, "q64", 64, "_evicted_pages", evicted_note, 0);
  qins_close(c);
  ts_daemon_stop(&d);
  /* 3: PSS of one decoded copy shared by 4 workers vs 4 copies, on a fresh daemon without a
   * reserve (which would add its arena-warm-bytes to the daemon's share: printed above). */
  start_or_exit(&d, cold);
  uint64_t shared = pss_run(d.sock, d.pid, 1);
  uint64_t copies = pss_run(d.sock, d.pid, 0);
  double one = 1024.0 * 1024.0; /* KiB in 1 GiB: one decoded copy */
  double store_kib = 1024.0 * 1024.0 * 1.0625 / 4.0; /* the 1 GiB set's qins8 pages */
  printf("arena_pss_4_workers_1GiB: mapped %.0f MiB | get copies %.0f MiB | ratio %.2f | mapped "
         "vs one decoded copy + store pages (%.0f MiB) %.2f (target <= 1.1; daemon + 4 workers, "
         "sum of PSS; arena-warm-bytes 0)\n",
         shared / 1024.0, copies / 1024.0, shared ? (double)copies / shared : 0,
         (one + store_kib) / 1024.0, (double)shared / (one + store_kib));
  printf("arena_bench_store: %.1f s to import 1.25 GiB of f32 as qins8\n", fill_s);
  ts_dir_remove(&d, 0);
  return 0;
}
