/* SPDX-License-Identifier: MIT */
/*
 * bench_serve.c — qinsd serving figures, each next to a same-run reference (the machine is shared
 * and noisy: only the ratios mean much):
 *   1. a 64 MiB FP32 `get` through qinsd vs the same bytes through a bare Unix socket (a forked
 *      writer sending from a warm buffer): throughput and ratio (target >= 0.8); and the same get
 *      from a daemon run with QINS_VERIFY=risk-wrong-numbers: the cost of checking every read;
 *   2. 4 KiB-slice `get` latency p50/p99 with 1 and 16 concurrent clients, next to Redis GET of a
 *      4 KiB value (Debian's redis-server on a temporary Unix socket, stopped after; skipped with
 *      a note when absent). Target: no worse than Redis.
 * Bounded time: fixed request counts (scaled by $BENCH_SCALE, default 1), a few seconds in all.
 * $BENCH_QINSD_ARGS adds qinsd flags (tuning experiments); $BENCH_SKIP_VERIFY leaves out the
 * verify-cost daemon (tests/bench/bench_core_compare.sh, which compares two qinsd builds).
 * The bench never opens the store itself (it forks the filler and execs qinsd; LMDB rule).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "proto.h"

#define BIG_ROWS 4096
#define BIG_COLS 4096 /* 4096 x 4096 f32 = 64 MiB */
#define BIG_BYTES ((size_t)BIG_ROWS * BIG_COLS * 4)
#define SLICE_COLS 1024 /* one row, 1024 columns: 4 KiB */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int scale(void) {
  const char *s = getenv("BENCH_SCALE");
  int v = s ? atoi(s) : 1;
  return v < 1 ? 1 : v;
}

static int fill(qs_store *s, void *ud) {
  (void)ud;
  qs_import *im;
  int rc = qs_import_begin(s, "bench", NULL, &im);
  if (rc) return rc;
  float *v = malloc(BIG_BYTES);
  if (!v) return QINS_ENOMEM;
  for (size_t i = 0; i < (size_t)BIG_ROWS * BIG_COLS; i++) v[i] = (float)(i % 1000) * 0.001f;
  uint64_t shape[2] = {BIG_ROWS, BIG_COLS};
  rc = ts_import_f32(im, "w", 2, shape, QC_F32, v);
  if (!rc) rc = ts_import_f32(im, "q", 2, shape, QC_QINS8, v);
  free(v);
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static int read_full(int fd, void *buf, size_t n) {
  char *p = buf;
  while (n) {
    ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* One get on fd; the payload is read straight into out (cap bytes). Returns payload bytes or -1. */
/* Packs a get request into sb (initialised here). */
static void pack_get_req(msgpack_sbuffer *sb, uint32_t id, const char *name, int sliced,
                         uint64_t row) {
  msgpack_packer pk;
  ts_req_begin(sb, &pk, id, "get", sliced ? 3 : 2);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "bench");
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, name);
  if (sliced) {
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, row);
    msgpack_pack_uint64(&pk, row + 1);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, 0);
    msgpack_pack_uint64(&pk, SLICE_COLS);
  }
}

/* Reads one get response from fd, the payload straight into out (cap bytes). Returns payload
 * bytes or -1. */
static long read_get_response(int fd, void *out, size_t cap) {
  /* Read the head; bytes read past the data bin header are the payload's start. One request is
   * in flight per connection, so nothing past this response can arrive. */
  char head[8192]; /* small responses arrive whole in one recv, as Redis's do below */
  size_t hl = 0, n = 0;
  qp_scan sc;
  qp_scan_init(&sc, (uint64_t)cap + sizeof head, QP_MAX_DEPTH);
  sc.bin_stop = 1;
  for (;;) {
    int r = qp_scan_next(&sc, head, hl, &n);
    if (r == QP_BIN) break;
    if (r != QP_MORE || hl == sizeof head) return -1; /* error responses do not happen here */
    ssize_t k = recv(fd, head + hl, sizeof head - hl, 0);
    if (k <= 0) return -1;
    hl += (size_t)k;
  }
  size_t over = hl - n;
  if (sc.bin_len > cap || over > sc.bin_len) return -1;
  memcpy(out, head + n, over);
  if (read_full(fd, (char *)out + over, sc.bin_len - over)) return -1;
  return (long)sc.bin_len;
}

static long get_into(int fd, uint32_t id, const char *name, int sliced, uint64_t row, void *out,
                     size_t cap) {
  msgpack_sbuffer sb;
  pack_get_req(&sb, id, name, sliced, row);
  int rc = ts_send(fd, sb.data, sb.size);
  msgpack_sbuffer_destroy(&sb);
  if (rc) return -1;
  return read_get_response(fd, out, cap);
}

/* CPU time (ns) the process's main thread has run: /proc/PID/schedstat's first field. For qinsd
 * and Redis the main thread is the one answering small requests. 0 when unreadable. */
static uint64_t proc_cpu_ns(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/schedstat", (int)pid);
  FILE *f = fopen(path, "r");
  unsigned long long v = 0;
  if (!f) return 0;
  if (fscanf(f, "%llu", &v) != 1) v = 0;
  fclose(f);
  return v;
}

/* Voluntary context switches of the process's main thread (times it slept), or 0. */
static uint64_t proc_sleeps(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  unsigned long long v = 0;
  if (!f) return 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "voluntary_ctxt_switches: %llu", &v) == 1) break;
  fclose(f);
  return v;
}

/* CPU time of this process, all threads (ns). */
static uint64_t self_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* ---- 1. throughput ------------------------------------------------------------------------- */
/* Both transfers are timed alternately, rep by rep, so that they see the same machine load; the
 * best rep of each is kept. The bare reference: a forked writer sends 64 MiB from a warm buffer
 * for each 1-byte request. */
typedef struct bare_ref {
  int fd;    /* our end of the socketpair */
  pid_t pid; /* the writer */
} bare_ref;

/* The writer sends BIG_BYTES per request from a warm buffer of bufsz bytes (BIG_BYTES: the
 * answer in memory, as a server holding it would; 256 KiB: a buffer that stays in the writer's
 * cache, the socket's ceiling on this machine). */
static int bare_start(bare_ref *b, size_t bufsz) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    close(sv[0]);
    char *buf = malloc(bufsz);
    memset(buf, 1, bufsz); /* warm */
    char c;
    while (read(sv[1], &c, 1) == 1) { /* a 1-byte request; EOF ends */
      size_t off = 0;
      while (off < BIG_BYTES) {
        size_t at = off % bufsz, len = BIG_BYTES - off < bufsz - at ? BIG_BYTES - off : bufsz - at;
        ssize_t k = write(sv[1], buf + at, len);
        if (k <= 0) _exit(1);
        off += (size_t)k;
      }
    }
    _exit(0);
  }
  close(sv[1]);
  b->fd = sv[0];
  b->pid = pid;
  return 0;
}

static void bare_stop(bare_ref *b) {
  close(b->fd);
  waitpid(b->pid, NULL, 0);
}

/* A number from qinsd's stats (0 on failure). */
static double stats_num(const char *sock, const char *key) {
  int fd = ts_connect(sock);
  if (fd < 0) return 0;
  ts_rx rx;
  ts_rx_init(&rx, fd);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 1, "stats", -1);
  const msgpack_object *r = ts_call(&rx, &sb, 1);
  msgpack_sbuffer_destroy(&sb);
  double v = 0;
  const msgpack_object *d = r && ts_resp_code(r) == 0 ? qp_map_get(ts_resp_result(r), key) : NULL;
  if (d && d->type == MSGPACK_OBJECT_POSITIVE_INTEGER) v = (double)d->via.u64;
  if (d && d->type == MSGPACK_OBJECT_FLOAT64) v = d->via.f64;
  ts_rx_destroy(&rx);
  return v;
}

static uint64_t stats_decode_ns(const char *sock) { return (uint64_t)stats_num(sock, "decode_ns"); }

/* qinsd's decode time per 64 MiB get (mean): stats' decode_ns, the time its threads spent in the
 * store's reads (decode, checks) summed over the threads, so not a share of the get's wall time:
 * it can exceed it when several threads read at once. */
static double per_get_decode_ms;

/* Alternates bare (from a 64 MiB and from a 256 KiB buffer) and qinsd transfers of tensor
 * `name`; *bare_gbps, *hot_gbps and *q_gbps get the best of reps each. */
static void throughput(const char *sock, const char *name, int reps, double *bare_gbps,
                       double *hot_gbps, double *q_gbps) {
  bare_ref b, h;
  int fd = ts_connect(sock);
  char *dst = malloc(BIG_BYTES);
  *bare_gbps = *hot_gbps = *q_gbps = 0;
  if (fd < 0 || !dst || bare_start(&b, BIG_BYTES) || bare_start(&h, 256 * 1024)) {
    fprintf(stderr, "bench: throughput setup failed\n");
    if (fd >= 0) close(fd);
    free(dst);
    return;
  }
  memset(dst, 0, BIG_BYTES);
  /* Warm-up: the daemon's buffer cache and the store's chunk verification. */
  if (get_into(fd, 0, name, 0, 0, dst, BIG_BYTES) != (long)BIG_BYTES) fprintf(stderr, "bench: get failed\n");
  uint64_t d0 = stats_decode_ns(sock);
  double best_b = 1e9, best_h = 1e9, best_q = 1e9;
  for (int r = 0; r < reps; r++) {
    double th = now_s();
    if (write(h.fd, "g", 1) != 1 || read_full(h.fd, dst, BIG_BYTES)) break;
    double t0 = now_s();
    if (t0 - th < best_h) best_h = t0 - th;
    if (write(b.fd, "g", 1) != 1 || read_full(b.fd, dst, BIG_BYTES)) break;
    double t1 = now_s();
    long n = get_into(fd, (uint32_t)(r + 1), name, 0, 0, dst, BIG_BYTES);
    double t2 = now_s();
    if (n != (long)BIG_BYTES) {
      fprintf(stderr, "bench: 64 MiB get failed\n");
      break;
    }
    if (t1 - t0 < best_b) best_b = t1 - t0;
    if (t2 - t1 < best_q) best_q = t2 - t1;
  }
  per_get_decode_ms = (double)(stats_decode_ns(sock) - d0) / 1e6 / reps;
  float f;
  memcpy(&f, dst + 4 * 12345, 4);
  if (fabsf(f - (float)(12345 % 1000) * 0.001f) > (name[0] == 'w' ? 0.0f : 0.01f))
    fprintf(stderr, "bench: wrong data\n");
  bare_stop(&h); /* first: its writer holds a copy of b.fd (forked after b started) */
  bare_stop(&b);
  close(fd);
  free(dst);
  *bare_gbps = (double)BIG_BYTES / best_b / 1e9;
  *hot_gbps = (double)BIG_BYTES / best_h / 1e9;
  *q_gbps = (double)BIG_BYTES / best_q / 1e9;
}

/* ---- 2. latency ---------------------------------------------------------------------------- */
/* One side of the comparison: where to connect, which protocol, the server's pid (its main
 * thread's CPU time is summed over the timed phases), and the results. */
typedef struct lat_side {
  const char *sock;
  int redis;       /* 1: Redis GET, 0: qinsd get slice */
  pid_t pid;
  double *lat;     /* all latencies (s): rounds x clients x n */
  uint64_t cpu_ns; /* server main-thread CPU over the timed phases */
  uint64_t client_ns; /* this process's CPU (the client threads) over the timed phases */
  uint64_t sleeps;    /* the server main thread's voluntary context switches, same phases */
  int fail;
  double p50, p99; /* microseconds */
} lat_side;

/* The clients of one comparison: each thread holds a connection to every side; phases (a side
 * for n requests a client) start and end on a barrier, so all clients talk to the same server at
 * once, and the sides take turns in many short rounds (qinsd, Redis, Redis, qinsd, ...: the
 * order flips every round): both see the same machine load. Round 0 is a warm-up, not recorded. */
typedef struct lat_run {
  lat_side *side;
  int nsides, clients, rounds, n;
  pthread_barrier_t bar;
} lat_run;

typedef struct lat_arg {
  lat_run *run;
  int id;
} lat_arg;

/* One Redis GET on fd, the value copied into out (cap bytes): like read_get_response, the reply
 * is read into a head buffer, its header parsed for the payload length ("$4096\r\n") and the
 * payload copied out, so both clients do the same work per request. Returns value bytes or -1. */
static long redis_get(int fd, char *out, size_t cap) {
  static const char cmd[] = "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
  if (ts_send(fd, cmd, sizeof cmd - 1)) return -1;
  char head[8192];
  size_t hl = 0, n = 0;
  unsigned long len = 0;
  for (;;) {
    char *crlf = hl ? memchr(head, '\n', hl) : NULL;
    if (crlf) {
      if (head[0] != '$' || crlf == head || crlf[-1] != '\r') return -1;
      char *e;
      len = strtoul(head + 1, &e, 10);
      if (e != crlf - 1) return -1;
      n = (size_t)(crlf + 1 - head);
      break;
    }
    if (hl == sizeof head) return -1;
    ssize_t k = recv(fd, head + hl, sizeof head - hl, 0);
    if (k <= 0) return -1;
    hl += (size_t)k;
  }
  size_t over = hl - n; /* payload and its trailing "\r\n" read so far */
  if (len > cap || over > len + 2) return -1;
  size_t in_out = over < len ? over : len;
  memcpy(out, head + n, in_out);
  if (read_full(fd, out + in_out, len - in_out)) return -1;
  char crlf2[2];
  size_t tail = 2 - (over - in_out); /* trailer bytes still to read */
  if (tail && read_full(fd, crlf2, tail)) return -1;
  return (long)len;
}

static void *lat_thread(void *p) {
  lat_arg *a = p;
  lat_run *R = a->run;
  int fd[2] = {-1, -1}, fail = 0;
  for (int k = 0; k < R->nsides; k++)
    if ((fd[k] = ts_connect(R->side[k].sock)) < 0) fail = 1;
  char buf[8192];
  /* Requests packed before timing, as Redis's command is a constant: both sides then time only
   * the round trip and the response parsing. */
  enum { NREQ = 64 };
  msgpack_sbuffer req[NREQ];
  for (int k = 0; k < NREQ; k++)
    pack_get_req(&req[k], (uint32_t)k, "w", 1, (uint64_t)(k * 61 + a->id * 7) % BIG_ROWS);
  size_t per = (size_t)R->clients * (size_t)R->n;
  for (int r = 0; r <= R->rounds; r++)
    for (int kk = 0; kk < R->nsides; kk++) {
      /* ABBA: the order of the sides flips every round, so neither always goes first. */
      int k = (r & 1) && R->nsides == 2 ? 1 - kk : kk;
      lat_side *S = &R->side[k];
      double *lat = r ? S->lat + per * (size_t)(r - 1) + (size_t)a->id * (size_t)R->n : NULL;
      uint64_t c0 = 0, u0 = 0, v0 = 0;
      pthread_barrier_wait(&R->bar);
      if (a->id == 0) {
        v0 = proc_sleeps(S->pid);
        c0 = proc_cpu_ns(S->pid);
        u0 = self_cpu_ns();
      }
      for (int i = 0; i < R->n && !fail; i++) {
        double t0 = now_s();
        int ok;
        if (S->redis) {
          ok = redis_get(fd[k], buf, sizeof buf) == 4096;
        } else {
          const msgpack_sbuffer *q = &req[i % NREQ];
          ok = ts_send(fd[k], q->data, q->size) == 0 && read_get_response(fd[k], buf, sizeof buf) == 4096;
        }
        if (lat) lat[i] = now_s() - t0;
        if (!ok) fail = 1;
      }
      pthread_barrier_wait(&R->bar);
      if (a->id == 0 && r) {
        S->cpu_ns += proc_cpu_ns(S->pid) - c0;
        S->client_ns += self_cpu_ns() - u0;
        S->sleeps += proc_sleeps(S->pid) - v0;
      }
      if (fail) S->fail = 1; /* benign race: any thread may set it */
    }
  for (int k = 0; k < R->nsides; k++)
    if (fd[k] >= 0) close(fd[k]);
  for (int k = 0; k < NREQ; k++) msgpack_sbuffer_destroy(&req[k]);
  return NULL;
}

static void quantiles(double *v, size_t m, double *p50, double *p99) {
  qsort(v, m, sizeof *v, cmp_d);
  *p50 = v[(m - 1) / 2] * 1e6;
  *p99 = v[(size_t)((double)(m - 1) * 0.99)] * 1e6;
}

static void latency_pair(lat_side *s, int nsides, int clients, int rounds, int n) {
  lat_run R = {s, nsides, clients, rounds, n, {{0}}};
  size_t per = (size_t)clients * (size_t)n;
  pthread_barrier_init(&R.bar, NULL, (unsigned)clients);
  for (int k = 0; k < nsides; k++) {
    s[k].lat = calloc(per * (size_t)rounds, sizeof(double));
    s[k].cpu_ns = s[k].client_ns = s[k].sleeps = 0;
    s[k].fail = 0;
  }
  pthread_t th[16];
  lat_arg a[16];
  for (int c = 0; c < clients; c++) {
    a[c] = (lat_arg){&R, c};
    pthread_create(&th[c], NULL, lat_thread, &a[c]);
  }
  for (int c = 0; c < clients; c++) pthread_join(th[c], NULL);
  pthread_barrier_destroy(&R.bar);
  for (int k = 0; k < nsides; k++) {
    s[k].p50 = s[k].p99 = 0;
    if (!s[k].fail) quantiles(s[k].lat, per * (size_t)rounds, &s[k].p50, &s[k].p99);
    free(s[k].lat);
  }
}

/* ---- Redis ----------------------------------------------------------------------------------- */
static pid_t redis_start(const char *dir, char *sock, size_t cap) {
  const char *bin = "/usr/bin/redis-server";
  if (access(bin, X_OK) != 0) return 0;
  snprintf(sock, cap, "%s/redis.sock", dir);
  pid_t pid = fork();
  if (pid == 0) {
    int nul = open("/dev/null", O_RDWR);
    dup2(nul, 1);
    dup2(nul, 2);
    execl(bin, bin, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--save", "",
          "--appendonly", "no", "--dir", dir, (char *)NULL);
    _exit(127);
  }
  for (int i = 0; i < 1000; i++) { /* up to 10 s */
    int fd = ts_connect(sock);
    if (fd >= 0) {
      char val[4096];
      memset(val, 'x', sizeof val);
      char hdr[64];
      int hn = snprintf(hdr, sizeof hdr, "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4096\r\n");
      char ok[5];
      int good = ts_send(fd, hdr, (size_t)hn) == 0 && ts_send(fd, val, sizeof val) == 0 &&
                 ts_send(fd, "\r\n", 2) == 0 && read_full(fd, ok, 5) == 0 && !memcmp(ok, "+OK\r\n", 5);
      close(fd);
      if (good) return pid;
      break;
    }
    if (waitpid(pid, NULL, WNOHANG) == pid) return -1;
    struct timespec ts = {0, 10000000};
    nanosleep(&ts, NULL);
  }
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  return -1;
}

static void redis_stop(pid_t pid) {
  if (pid <= 0) return;
  kill(pid, SIGTERM);
  for (int i = 0; i < 500; i++) {
    if (waitpid(pid, NULL, WNOHANG) == pid) return;
    struct timespec ts = {0, 10000000};
    nanosleep(&ts, NULL);
  }
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  int sc = scale();
  ts_daemon d;
  if (ts_dir_make(&d)) {
    perror("mkdtemp");
    return 1;
  }
  if (ts_store_fill(d.store, fill, NULL)) {
    fprintf(stderr, "bench_serve: filling the store failed\n");
    ts_dir_remove(&d, 0);
    return 1;
  }
  /* Extra qinsd flags for experiments: BENCH_QINSD_ARGS="--stream-piece-bytes 1M". */
  const char *args[32] = {"--log-level", "notice"};
  int na = 2;
  char *extra = getenv("BENCH_QINSD_ARGS") ? strdup(getenv("BENCH_QINSD_ARGS")) : NULL;
  for (char *tok = extra ? strtok(extra, " ") : NULL; tok && na < 31; tok = strtok(NULL, " "))
    args[na++] = tok;
  args[na] = NULL;
  if (ts_daemon_start(&d, args)) {
    ts_dir_remove(&d, 1);
    return 1;
  }
  int reps = 8 * sc;
  /* The cost of checking every read: a second daemon on a copy of the store, started with
   * QINS_VERIFY=risk-wrong-numbers (each chunk checked once per process), serves the same gets
   * in the same run. */
  ts_daemon u;
  int have_u = !getenv("BENCH_SKIP_THROUGHPUT") && !getenv("BENCH_SKIP_VERIFY") &&
               ts_dir_make(&u) == 0;
  if (have_u && ts_store_fill(u.store, fill, NULL)) {
    ts_dir_remove(&u, 0);
    have_u = 0;
  }
  if (have_u) {
    setenv("QINS_VERIFY", "risk-wrong-numbers", 1);
    if (ts_daemon_start(&u, args)) {
      ts_dir_remove(&u, 1);
      have_u = 0;
    }
    unsetenv("QINS_VERIFY");
  }
  /* f32 stored, f32 asked: the stored bytes are the answer (sent from the map, no copy of ours);
   * qins8 stored (the store's default codec): decoded to f32 in cache-sized pieces. */
  const char *tnames[2] = {"w", "q"}, *labels[2] = {"f32", "qins8_as_f32"};
  for (int k = 0; k < 2; k++) {
    double bare = 0, hot = 0, q = 0;
    if (getenv("BENCH_SKIP_THROUGHPUT")) break;
    throughput(d.sock, tnames[k], reps, &bare, &hot, &q);
    printf("serve_get_64MiB_%s: qinsd %.2f GB/s | bare unix socket %.2f GB/s | ratio %.2f "
           "(target >= 0.8; best of %d, alternated; per get: qinsd's time in store reads %.1f ms "
           "summed over its threads (mean), the best get %.1f ms wall; "
           "bare socket from a cache-resident 256 KiB buffer %.2f GB/s, ratio to it %.2f)\n",
           labels[k], q, bare, bare > 0 ? q / bare : 0, reps, per_get_decode_ms,
           q > 0 ? (double)BIG_BYTES / q / 1e6 : 0, hot, hot > 0 ? q / hot : 0);
    if (!have_u) continue;
    double ubare = 0, uhot = 0, uq = 0, dec = per_get_decode_ms;
    throughput(u.sock, tnames[k], reps, &ubare, &uhot, &uq);
    printf("serve_get_64MiB_%s_verify_cost: every read checked (default) %.2f GB/s, ratio to "
           "bare %.2f | QINS_VERIFY=risk-wrong-numbers %.2f GB/s, ratio to bare %.2f | checked / "
           "unchecked %.2f (best of %d each, same run; store reads %.1f vs %.1f ms "
           "per get, summed over threads)\n",
           labels[k], q, bare > 0 ? q / bare : 0, uq, ubare > 0 ? uq / ubare : 0,
           uq > 0 ? q / uq : 0, reps, dec, per_get_decode_ms);
  }
  if (have_u) {
    int ust = ts_daemon_stop(&u);
    ts_dir_remove(&u, !(ust >= 0 && WIFEXITED(ust) && WEXITSTATUS(ust) == 0));
  }

  char rsock[128];
  pid_t rp = redis_start(d.dir, rsock, sizeof rsock);
  if (rp == 0) printf("redis: /usr/bin/redis-server not installed: Redis reference lines skipped\n");
  if (rp < 0) printf("redis: redis-server did not start: Redis reference lines skipped\n");
  const int clients[2] = {1, 16};
  for (int k = 0; k < 2; k++) {
    int c = clients[k];
    int rounds = 100, n = (c == 1 ? 400 : 160) * sc; /* 40,000 and 256,000 requests a server */
    lat_side sd[2] = {{d.sock, 0, d.pid, NULL, 0, 0, 0, 0, 0, 0}, {rsock, 1, rp, NULL, 0, 0, 0, 0, 0, 0}};
    latency_pair(sd, rp > 0 ? 2 : 1, c, rounds, n);
    /* In-daemon time (dispatch to reply queued), over its last 8192 requests. */
    double in50 = stats_num(d.sock, "latency_p50_us"), in99 = stats_num(d.sock, "latency_p99_us");
    double total = (double)rounds * n * c;
    double qcpu = (double)sd[0].cpu_ns / 1e3 / total, rcpu = (double)sd[1].cpu_ns / 1e3 / total;
    double qcl = (double)sd[0].client_ns / 1e3 / total, rcl = (double)sd[1].client_ns / 1e3 / total;
    double qsl = (double)sd[0].sleeps / total, rsl = (double)sd[1].sleeps / total;
    if (rp > 0) {
      printf("slice_4KiB_latency_%d_client%s: qinsd p50 %.1f us p99 %.1f us | redis GET 4KiB p50 %.1f "
             "us p99 %.1f us | ratio p50 %.2f p99 %.2f (qinsd/redis; target <= 1; %d rounds "
             "alternated; cpu per request: server qinsd %.2f us redis %.2f us, client qinsd "
             "%.2f us redis %.2f us; server sleeps per request qinsd %.2f redis %.2f; in-daemon p50 "
             "%.1f us p99 %.1f us)%s\n",
             c, c > 1 ? "s" : "", sd[0].p50, sd[0].p99, sd[1].p50, sd[1].p99,
             sd[1].p50 > 0 ? sd[0].p50 / sd[1].p50 : 0, sd[1].p99 > 0 ? sd[0].p99 / sd[1].p99 : 0,
             rounds, qcpu, rcpu, qcl, rcl, qsl, rsl, in50, in99, sd[0].fail || sd[1].fail ? " [errors]" : "");
    } else {
      printf("slice_4KiB_latency_%d_client%s: qinsd p50 %.1f us p99 %.1f us (server cpu per "
             "request %.2f us; in-daemon p50 %.1f us p99 %.1f us)%s\n",
             c, c > 1 ? "s" : "", sd[0].p50, sd[0].p99, qcpu, in50, in99,
             sd[0].fail ? " [errors]" : "");
    }
  }
  redis_stop(rp > 0 ? rp : 0);
  int st = ts_daemon_stop(&d);
  int clean = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  ts_dir_remove(&d, !clean);
  return clean ? 0 : 1;
}
