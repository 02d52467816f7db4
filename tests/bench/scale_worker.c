/* SPDX-License-Identifier: MIT */
/*
 * scale_worker.c — the load half of `make bench-scale` (tests/bench/bench_scale.sh, issue 6). It is
 * a helper, not a benchmark of its own: tests/bench/run.sh skips it (run without arguments it
 * prints its usage and exits 2).
 *
 *   scale_worker serve SOCK MODEL N DAEMON_PID [SLICE_MIB]
 *     1. Reference, same run: N process pairs over bare Unix socketpairs, each receiver asking
 *        with one byte and getting SLICE_MIB from the sender's warm buffer, 2 GiB per pair: the
 *        aggregate GB/s of the kernel's socket copies alone on this machine, now.
 *     2. N worker processes, each with its own libqins connection, stream every tensor of MODEL
 *        once, concurrently, as FP32 through qinsd: qins_get_into into one reused buffer, large
 *        tensors in row slices of at most SLICE_MIB (and below the server's max_response_bytes).
 *        While they run, /proc/PID/smaps_rollup of the daemon and every worker is sampled every
 *        250 ms; the peak of the summed PSS is kept with its parts (the daemon's file-backed PSS
 *        is the LMDB pages it has touched). Prints the aggregate GB/s and its ratio to the
 *        reference, each worker's bytes, errors and peak RSS (wait4), the daemon's RSS and peak
 *        RSS (VmHWM), and the peak PSS next to N private FP32 copies.
 *     Exit 0 when every worker fetched every byte without an error, 1 otherwise.
 *
 *   scale_worker exec CMD ARGS...
 *     Runs CMD (fork + exec), passes its stdout through, and prints "peak_rss_kb N" and
 *     "cpu_s S" on stderr (wait4's ru_maxrss, ru_utime + ru_stime): the importer's memory and CPU
 *     time (on a shared machine, wall time alone mixes in other processes' use of the cores).
 *
 * Units: GB and MB are decimal (1e9, 1e6 bytes) everywhere; /proc's kB are KiB.
 *
 * Invariants: no LMDB env is ever opened here (the daemon and qinsctl own the store); every child
 * is waited for; workers start together (they block on a pipe the parent closes).
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qins.h"

#define REF_PAIR_BYTES (2ull << 30) /* bytes per reference pair: a few seconds on 2 cores */
#define SAMPLE_MS 250               /* PSS sampling period (smaps_rollup walks the page tables) */
#define MAX_WORKERS 64

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int usage(void) {
  fprintf(stderr, "usage: scale_worker serve SOCK MODEL N DAEMON_PID [SLICE_MIB]\n"
                  "       scale_worker exec CMD [ARGS...]\n"
                  "(a helper of tests/bench/bench_scale.sh: make bench-scale)\n");
  return 2;
}

/* ---- /proc ----------------------------------------------------------------------------------- */
typedef struct pss {
  uint64_t pss, anon, file; /* kB */
} pss;

static int read_pss(pid_t pid, pss *out) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
  FILE *f = fopen(path, "r");
  memset(out, 0, sizeof *out);
  if (!f) return -1;
  while (fgets(line, sizeof line, f)) {
    unsigned long long v;
    if (sscanf(line, "Pss: %llu", &v) == 1) out->pss = v;
    else if (sscanf(line, "Pss_Anon: %llu", &v) == 1) out->anon = v;
    else if (sscanf(line, "Pss_File: %llu", &v) == 1) out->file = v;
  }
  fclose(f);
  return 0;
}

static uint64_t status_kb(pid_t pid, const char *key) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  uint64_t v = 0;
  size_t kl = strlen(key);
  if (!f) return 0;
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, key, kl) && line[kl] == ':') v = strtoull(line + kl + 1, NULL, 10);
  fclose(f);
  return v;
}

/* ---- the model's tensors --------------------------------------------------------------------- */
typedef struct tlist {
  qins_tensor_info *v;
  size_t n;
  uint64_t f32_bytes; /* sum of n_elem * 4 */
} tlist;

static int list_all(qins_client *c, const char *model, tlist *L) {
  memset(L, 0, sizeof *L);
  uint64_t total = 0;
  do {
    qins_tensor_info *part;
    size_t n;
    int rc = qins_list(c, model, NULL, L->n, 0, &part, &n, &total);
    if (rc) return rc;
    qins_tensor_info *nv = realloc(L->v, (L->n + n + 1) * sizeof *nv);
    if (!nv) {
      qins_free(part);
      return QINS_ENOMEM;
    }
    L->v = nv;
    memcpy(L->v + L->n, part, n * sizeof *part);
    L->n += n;
    qins_free(part);
    if (!n) break;
  } while (L->n < total);
  for (size_t i = 0; i < L->n; i++) L->f32_bytes += L->v[i].n_elem * 4;
  return 0;
}

/* ---- reference: bare Unix sockets -------------------------------------------------------------- */
static int read_full(int fd, void *buf, size_t n) {
  char *p = buf;
  while (n) {
    ssize_t k = read(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
  const char *p = buf;
  while (n) {
    ssize_t k = write(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* One reference pair: this process receives, a forked child sends. Exit status 0 on success. */
static void ref_pair(int go, size_t msg) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) _exit(1);
  pid_t pid = fork();
  if (pid < 0) _exit(1);
  if (pid == 0) {
    close(sv[0]);
    char *buf = malloc(msg);
    if (!buf) _exit(1);
    memset(buf, 1, msg); /* warm */
    char c;
    for (;;) {
      ssize_t k = read(sv[1], &c, 1);
      if (k != 1) _exit(k == 0 ? 0 : 1);
      if (write_full(sv[1], buf, msg)) _exit(1);
    }
  }
  close(sv[1]);
  char *dst = malloc(msg);
  if (!dst) _exit(1);
  memset(dst, 0, msg);
  char c;
  if (read(go, &c, 1) < 0) _exit(1); /* blocks until the parent closes the pipe */
  for (uint64_t got = 0; got < REF_PAIR_BYTES; got += msg)
    if (write(sv[0], "g", 1) != 1 || read_full(sv[0], dst, msg)) _exit(1);
  close(sv[0]);
  int st;
  waitpid(pid, &st, 0);
  _exit(WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1);
}

static double ref_gbps(int n, size_t msg) {
  int go[2];
  if (pipe(go)) return 0;
  pid_t pids[MAX_WORKERS];
  for (int i = 0; i < n; i++) {
    if ((pids[i] = fork()) == 0) {
      close(go[1]);
      ref_pair(go[0], msg);
    }
  }
  close(go[0]);
  double t0 = now_s();
  close(go[1]);
  int ok = 1;
  for (int i = 0; i < n; i++) {
    int st;
    if (pids[i] < 0 || waitpid(pids[i], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) ok = 0;
  }
  double dt = now_s() - t0;
  return ok ? (double)n * (double)((REF_PAIR_BYTES + msg - 1) / msg * msg) / dt / 1e9 : 0;
}

/* ---- the workers --------------------------------------------------------------------------- */
typedef struct wres {
  uint64_t bytes;    /* FP32 payload bytes received */
  uint64_t tensors;  /* tensors completed */
  uint64_t requests; /* gets sent */
  uint64_t errors;   /* failed gets or wrong sizes */
  double seconds;    /* first connect to last byte */
  char first_error[512];
} wres;

static void worker(int go, int out, const char *sock, const char *model, const tlist *L,
                   size_t slice_bytes) {
  wres r;
  memset(&r, 0, sizeof r);
  char c;
  if (read(go, &c, 1) < 0) _exit(1);
  double t0 = now_s();
  qins_client *cl;
  int rc = qins_connect(&cl, sock, 60000);
  if (rc) {
    r.errors++;
    snprintf(r.first_error, sizeof r.first_error, "connect: %s", qins_strerror(rc));
  } else {
    uint64_t maxr = qins_server(cl)->max_response_bytes;
    if (slice_bytes > maxr) slice_bytes = (size_t)maxr;
    float *buf = malloc(slice_bytes);
    if (!buf) _exit(1);
    for (size_t i = 0; i < L->n; i++) {
      const qins_tensor_info *t = &L->v[i];
      uint64_t row_len = t->ndim ? t->shape[t->ndim - 1] : 1;
      uint64_t rows = t->ndim >= 2 ? t->n_elem / (row_len ? row_len : 1) : 1;
      uint64_t row_bytes = t->ndim >= 2 ? row_len * 4 : t->n_elem * 4;
      uint64_t per = row_bytes ? slice_bytes / row_bytes : rows;
      if (per == 0) per = 1; /* a row larger than the buffer cannot be fetched: counted below */
      int bad = 0;
      for (uint64_t r0 = 0; r0 < rows && !bad; r0 += per) {
        uint64_t nr = rows - r0 < per ? rows - r0 : per;
        qins_range rg = {r0, r0 + nr};
        uint64_t want = nr * row_bytes, shape[QINS_MAX_NDIM];
        size_t got = 0;
        int nd = 0;
        r.requests++;
        rc = qins_get_into(cl, model, t->name, t->ndim >= 2 ? &rg : NULL, t->ndim >= 2 ? 1 : 0,
                           QINS_F32, buf, slice_bytes, &got, shape, &nd);
        if (rc || got != want || !isfinite(buf[0]) || !isfinite(buf[got / 4 - 1])) {
          if (!r.errors)
            snprintf(r.first_error, sizeof r.first_error, "%s rows %" PRIu64 "..%" PRIu64 ": %s",
                     t->name, r0, r0 + nr, rc ? qins_client_error(cl) : "wrong size or value");
          r.errors++;
          bad = 1;
          break;
        }
        r.bytes += got;
      }
      if (!bad) r.tensors++;
    }
    free(buf);
    qins_close(cl);
  }
  r.seconds = now_s() - t0;
  if (write_full(out, &r, sizeof r)) _exit(1);
  _exit(0);
}

static int serve(int argc, char **argv) {
  if (argc < 6 || argc > 7) return usage();
  const char *sock = argv[2], *model = argv[3];
  int n = atoi(argv[4]);
  pid_t daemon = (pid_t)atoi(argv[5]);
  size_t slice_bytes = (size_t)(argc == 7 ? atoi(argv[6]) : 32) << 20;
  if (n < 1 || n > MAX_WORKERS || daemon <= 0 || slice_bytes == 0) return usage();

  qins_client *c;
  int rc = qins_connect(&c, sock, 10000);
  if (rc) {
    fprintf(stderr, "scale_worker: connect %s: %s\n", sock, qins_strerror(rc));
    return 1;
  }
  tlist L;
  if ((rc = list_all(c, model, &L))) {
    fprintf(stderr, "scale_worker: list %s: %s\n", model, qins_client_error(c));
    qins_close(c);
    return 1;
  }
  uint64_t maxr = qins_server(c)->max_response_bytes;
  qins_close(c);
  if (slice_bytes > maxr) slice_bytes = (size_t)maxr;
  double gb = (double)L.f32_bytes / 1e9;

  double ref = ref_gbps(n, slice_bytes);
  printf("reference: bare unix socket, %d process pairs, %zu MiB messages from a warm buffer, "
         "%.1f GiB in all: %.2f GB/s aggregate\n",
         n, slice_bytes >> 20, (double)n * (double)REF_PAIR_BYTES / (1u << 30), ref);
  fflush(stdout);

  int go[2], res[2];
  if (pipe(go) || pipe(res)) return 1;
  pid_t pids[MAX_WORKERS];
  for (int i = 0; i < n; i++) {
    if ((pids[i] = fork()) == 0) {
      close(go[1]);
      close(res[0]);
      worker(go[0], res[1], sock, model, &L, slice_bytes);
    }
    if (pids[i] < 0) {
      perror("fork");
      return 1;
    }
  }
  close(go[0]);
  close(res[1]);
  uint64_t d_rss0 = status_kb(daemon, "VmRSS");
  double t0 = now_s();
  close(go[1]); /* go */

  pss peak_d = {0}, peak_w[MAX_WORKERS];
  memset(peak_w, 0, sizeof peak_w);
  uint64_t peak_total = 0;
  struct rusage ru[MAX_WORKERS];
  int done[MAX_WORKERS] = {0}, left = n, failed = 0, samples = 0;
  double t_end = t0;
  while (left) {
    /* Sample every live process; keep the sample with the largest sum. */
    pss d, w[MAX_WORKERS];
    memset(w, 0, sizeof w);
    read_pss(daemon, &d);
    uint64_t tot = d.pss;
    for (int i = 0; i < n; i++)
      if (!done[i] && !read_pss(pids[i], &w[i])) tot += w[i].pss;
    samples++;
    if (tot > peak_total) {
      peak_total = tot;
      peak_d = d;
      memcpy(peak_w, w, sizeof w);
    }
    double until = now_s() + SAMPLE_MS / 1e3;
    while (left && now_s() < until) {
      for (int i = 0; i < n; i++) {
        if (done[i]) continue;
        int st;
        pid_t p = wait4(pids[i], &st, WNOHANG, &ru[i]);
        if (p == pids[i]) {
          done[i] = 1, left--;
          t_end = now_s();
          if (!WIFEXITED(st) || WEXITSTATUS(st)) failed++;
        }
      }
      if (left) usleep(5000);
    }
  }
  double wall = t_end - t0;
  uint64_t d_rss = status_kb(daemon, "VmRSS"), d_hwm = status_kb(daemon, "VmHWM");

  wres r[MAX_WORKERS];
  memset(r, 0, sizeof r);
  uint64_t bytes = 0, errors = 0;
  for (int i = 0; i < n; i++) {
    if (read_full(res[0], &r[i], sizeof r[i])) failed++;
  }
  close(res[0]);
  for (int i = 0; i < n; i++) {
    bytes += r[i].bytes;
    errors += r[i].errors;
  }
  double agg = (double)bytes / wall / 1e9;
  printf("serve: %d workers x %zu tensors (%.2f GB FP32 each, %.2f GB in all) through qinsd in "
         "%.1f s: %.2f GB/s aggregate FP32 = %.2fx the bare socket; %" PRIu64 " errors\n",
         n, L.n, gb, gb * n, wall, agg, ref > 0 ? agg / ref : 0, errors + (uint64_t)failed);
  for (int i = 0; i < n; i++) {
    printf("worker %d: %" PRIu64 "/%zu tensors, %.2f GB in %.1f s (%.2f GB/s), %" PRIu64
           " requests, %" PRIu64 " errors, peak RSS %.1f MB%s%s\n",
           i, r[i].tensors, L.n, (double)r[i].bytes / 1e9, r[i].seconds,
           r[i].seconds > 0 ? (double)r[i].bytes / r[i].seconds / 1e9 : 0, r[i].requests,
           r[i].errors, (double)ru[i].ru_maxrss * 1024 / 1e6, r[i].errors ? ": " : "", r[i].first_error);
  }
  printf("daemon: RSS %.2f GB before, %.2f GB after, peak %.2f GB (VmHWM)\n", (double)d_rss0 * 1024 / 1e9,
         (double)d_rss * 1024 / 1e9, (double)d_hwm * 1024 / 1e9);
  uint64_t wsum = 0;
  for (int i = 0; i < n; i++) wsum += peak_w[i].pss;
  double priv = (double)L.f32_bytes * n / 1e9;
  printf("PSS at peak (%d samples, %d ms apart): %.2f GB = daemon %.2f GB (file %.2f GB: the LMDB "
         "pages it has touched; anon %.2f GB) + %d workers %.2f GB; %d private FP32 copies: %.2f GB "
         "(%.1fx)\n",
         samples, SAMPLE_MS, (double)peak_total * 1024 / 1e9, (double)peak_d.pss * 1024 / 1e9,
         (double)peak_d.file * 1024 / 1e9, (double)peak_d.anon * 1024 / 1e9, n,
         (double)wsum * 1024 / 1e9, n, priv, peak_total ? priv / ((double)peak_total * 1024 / 1e9) : 0);
  printf("peak_pss_bytes %" PRIu64 "\n", peak_total * 1024);
  int ok = !failed && !errors && bytes == L.f32_bytes * (uint64_t)n;
  for (int i = 0; i < n && ok; i++) ok = r[i].tensors == L.n;
  uint64_t err_total = errors + (uint64_t)failed;
  if (!ok && !err_total) err_total = 1; /* bytes missing without a reported error */
  printf("errors_total %" PRIu64 "\n", err_total);
  free(L.v);
  return ok ? 0 : 1;
}

static int run_exec(int argc, char **argv) {
  if (argc < 3) return usage();
  pid_t pid = fork();
  if (pid < 0) return 1;
  if (pid == 0) {
    execvp(argv[2], argv + 2);
    fprintf(stderr, "scale_worker: exec %s: %s\n", argv[2], strerror(errno));
    _exit(127);
  }
  int st;
  struct rusage ru;
  if (wait4(pid, &st, 0, &ru) != pid) return 1;
  fprintf(stderr, "peak_rss_kb %ld\ncpu_s %.2f\n", ru.ru_maxrss,
          (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
              ru.ru_stime.tv_usec / 1e6);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc >= 2 && !strcmp(argv[1], "serve")) return serve(argc, argv);
  if (argc >= 2 && !strcmp(argv[1], "exec")) return run_exec(argc, argv);
  return usage();
}
