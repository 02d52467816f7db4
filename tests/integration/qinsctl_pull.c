/* SPDX-License-Identifier: MIT */
/*
 * qinsctl_pull.c — portable model files and `qinsctl pull` (docs/qinsctl.md "export --format
 * qins", "pull"; docs/FORMAT.md §3) against a real HTTP server: Debian's nginx-light, started on
 * 127.0.0.1 on a free port from its own config, pid file and logs in the test's temp dir, and
 * always stopped in .fini. A second nginx server block acts as a forward proxy.
 *
 * Checked: three stores pull one model concurrently and each re-export equals the source file byte
 * for byte; a pull cut mid-way (qinsctl SIGKILLed, or the server stopped) resumes without fetching
 * a verified piece again (nginx's access log and the --json figures); a flipped byte names its
 * piece and publishes nothing; a truncated file, a 404, a server that never answers, a wrong
 * --sha256 each fail clearly with the store's models unchanged; a failed pull into a store that did
 * not exist leaves no directory (nor an LMDB environment) behind; HTTP_PROXY routes the pull through
 * the proxy and NO_PROXY bypasses it; https:// from a third nginx server block with a self-signed
 * certificate made at test time (openssl CLI) works once the certificate is trusted (--cacert,
 * CURL_CA_BUNDLE, SSL_CERT_FILE) and is refused, naming the URL and the TLS failure, when not.
 *
 * The source model mixes qins8 (one of them empty), qins16, seed-log, f32 (1-D and a scalar) and
 * raw i32 tensors.
 * The test process never opens an LMDB env (qinsctl runs as a child; PITFALLS.md).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qt.h"

#define PIECE "4096"

static char tmp[64];         /* the test's temp dir */
static char qfile[256];      /* the source model file, exported */
static pid_t ngx_pid = -1;
static int port, pport;      /* nginx's server and proxy ports */
static int tport;            /* nginx's TLS server port (tls set) */
static int rate_limited;     /* next nginx start: limit_rate on the server */
static int tls;              /* next nginx start: a TLS server too, with ngx/cert.pem */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t l = sizeof a;
  cr_assert(fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof a) &&
            !getsockname(fd, (struct sockaddr *)&a, &l));
  close(fd);
  return ntohs(a.sin_port);
}

static int can_connect(int p) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int ok = fd >= 0 && !connect(fd, (struct sockaddr *)&a, sizeof a);
  if (fd >= 0) close(fd);
  return ok;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static void path(char *buf, size_t cap, const char *rel) { snprintf(buf, cap, "%s/%s", tmp, rel); }

/* nginx in tmp/ngx: www/ is the document root, access.log the server's log ($body_bytes_sent per
 * range), proxy.log the forward proxy's. Keeps the same ports across restarts. */
static void ngx_start(void) {
  char conf[300], dir[200], f[8192];
  path(dir, sizeof dir, "ngx");
  snprintf(conf, sizeof conf, "%s/nginx.conf", dir);
  snprintf(f, sizeof f,
           "%s"
           "worker_processes 1;\npid %s/nginx.pid;\nerror_log %s/error.log;\n"
           "events { worker_connections 64; }\n"
           "http {\n"
           "  log_format q '$request_method $uri $http_range $status $body_bytes_sent';\n"
           "  client_body_temp_path %s/t; proxy_temp_path %s/t; fastcgi_temp_path %s/t;\n"
           "  uwsgi_temp_path %s/t; scgi_temp_path %s/t;\n"
           "  server { listen 127.0.0.1:%d; root %s/www; access_log %s/access.log q; %s\n"
           "    location = /busy.qins { return 503; } }\n"
           "  server { listen 127.0.0.1:%d; access_log %s/proxy.log q;\n"
           "    location / { proxy_pass http://$http_host$request_uri; } }\n",
           geteuid() == 0 ? "user root;\n" : "", dir, dir, dir, dir, dir, dir, dir, port, dir, dir,
           rate_limited ? "limit_rate 40k;" : "", pport, dir);
  if (tls)
    snprintf(f + strlen(f), sizeof f - strlen(f),
             "  server { listen 127.0.0.1:%d ssl; root %s/www; access_log %s/tls.log q;\n"
             "    ssl_certificate %s/cert.pem; ssl_certificate_key %s/key.pem; }\n",
             tport, dir, dir, dir, dir);
  snprintf(f + strlen(f), sizeof f - strlen(f), "}\n");
  cr_assert_eq(qt_write(conf, f, strlen(f)), 0);
  ngx_pid = fork();
  cr_assert(ngx_pid >= 0);
  if (ngx_pid == 0) {
    int nul = open("/dev/null", O_WRONLY);
    dup2(nul, 1);
    dup2(nul, 2);
    execlp("nginx", "nginx", "-p", dir, "-c", conf, "-g", "daemon off;", (char *)NULL);
    _exit(127);
  }
  for (int i = 0; i < 500 && !(can_connect(port) && can_connect(pport) &&
                                (!tls || can_connect(tport))); i++) {
    int st;
    cr_assert_eq(waitpid(ngx_pid, &st, WNOHANG), 0, "nginx exited (see %s/error.log)", dir);
    sleep_ms(20);
  }
  cr_assert(can_connect(port) && can_connect(pport) && (!tls || can_connect(tport)),
            "nginx did not listen on %d/%d/%d", port, pport, tport);
}

static void ngx_stop(void) {
  if (ngx_pid <= 0) return;
  kill(ngx_pid, SIGTERM);
  int st;
  for (int i = 0; i < 250 && waitpid(ngx_pid, &st, WNOHANG) == 0; i++) sleep_ms(20);
  if (waitpid(ngx_pid, &st, WNOHANG) == 0) {
    kill(ngx_pid, SIGKILL);
    waitpid(ngx_pid, &st, 0);
  }
  ngx_pid = -1;
}

/* Runs qinsctl --store STORE ARGS... with extra environment (proxies cleared unless env sets
 * them). */
static int ctl_env(const char *const *env, const char *store, char **out, char **err, ...) {
  char bin[512];
  char *argv[32] = {(char *)qt_bin("qinsctl", bin, sizeof bin), "--store", (char *)store};
  int n = 3;
  va_list ap;
  va_start(ap, err);
  const char *a;
  while ((a = va_arg(ap, const char *)) && n < 30) argv[n++] = (char *)a;
  va_end(ap);
  argv[n] = NULL;
  char *e[20] = {"http_proxy=", "HTTP_PROXY=", "https_proxy=", "HTTPS_PROXY=", "all_proxy=",
                 "ALL_PROXY=", "no_proxy=", "NO_PROXY=", "CURL_CA_BUNDLE=", "SSL_CERT_FILE="};
  int k = 10;
  for (int i = 0; env && env[i] && k < 19; i++) e[k++] = (char *)env[i];
  e[k] = NULL;
  return qt_run(argv, e, out, err);
}
#define ctl(store, out, err, ...) ctl_env(NULL, store, out, err, __VA_ARGS__)

static void url(char *buf, size_t cap, const char *file) {
  snprintf(buf, cap, "http://127.0.0.1:%d/%s", port, file);
}

/* The source: a model mixing codecs (qins8, qins16, seed-log, f32, raw i32) in store "src",
 * exported as tmp/src.qins with 4 KiB pieces and served as www/m.qins. */
static void setup(void) {
  cr_assert_eq(qt_tmpdir(tmp), 0);
  chmod(tmp, 0755);
  char d[256], st[256], store[256];
  const char *sub[] = {"ngx", "ngx/t", "ngx/www"};
  for (int i = 0; i < 3; i++) {
    path(d, sizeof d, sub[i]);
    cr_assert_eq(mkdir(d, 0755), 0);
  }
  static float a[300 * 256], b[128 * 200], c[64 * 64], v[256], one = 1.5f;
  static int32_t ids[50];
  qt_fill_gauss(a, 300 * 256, 1, 0.05f);
  qt_fill_gauss(b, 128 * 200, 2, 0.02f);
  qt_fill_gauss(c, 64 * 64, 3, 0.1f);
  qt_fill_gauss(v, 256, 4, 1.0f);
  for (int i = 0; i < 50; i++) ids[i] = i * 7919 - 100;
  qt_tensor t[] = {{"emb", QS_ST_F32, 2, {300, 256}, a, sizeof a},
                   {"w2", QS_ST_F32, 2, {128, 200}, b, sizeof b},
                   {"slog", QS_ST_F32, 2, {64, 64}, c, sizeof c},
                   {"norm", QS_ST_F32, 1, {256}, v, sizeof v},
                   {"ids", QS_ST_I32, 1, {50}, ids, sizeof ids},
                   {"scalar", QS_ST_F32, 0, {0}, &one, sizeof one},
                   {"empty", QS_ST_F32, 2, {0, 8}, &one, 0}};
  path(st, sizeof st, "src.safetensors");
  cr_assert_eq(qt_st_write(st, t, 7, "{\"arch\":\"test\"}"), 0);
  path(store, sizeof store, "src");
  char *err = NULL;
  cr_assert_eq(ctl(store, NULL, &err, "import", st, "--model", "m", "--codec-for", "w2=qins16",
                   "--codec-for", "slog=seed-log", NULL), 0, "%s", err);
  free(err);
  path(qfile, sizeof qfile, "src.qins");
  cr_assert_eq(ctl(store, NULL, &err, "export", "m", qfile, "--format", "qins", "--piece-size",
                   PIECE, NULL), 0, "%s", err);
  free(err);
  path(d, sizeof d, "ngx/www/m.qins");
  size_t len;
  char *bytes = qt_read(qfile, &len);
  cr_assert(bytes);
  cr_assert_eq(qt_write(d, bytes, len), 0);
  chmod(d, 0644);
  free(bytes);
  port = free_port();
  do pport = free_port(); while (pport == port);
  do tport = free_port(); while (tport == port || tport == pport);
  rate_limited = 0;
  tls = 0;
}

static void teardown(void) {
  ngx_stop();
  qt_rmrf(tmp);
}

TestSuite(qinsctl_pull, .init = setup, .fini = teardown, .timeout = 120);

/* `export --format qins` of model m in store, compared with the source file. */
static void assert_same_export(const char *store, const char *name) {
  char out[300];
  snprintf(out, sizeof out, "%s.re.qins", store);
  char *err = NULL;
  cr_assert_eq(ctl(store, NULL, &err, "export", name, out, "--format", "qins", "--piece-size",
                   PIECE, NULL), 0, "%s", err);
  free(err);
  size_t la, lb;
  char *a = qt_read(qfile, &la), *b = qt_read(out, &lb);
  cr_assert(a && b);
  cr_assert(la == lb && !memcmp(a, b, la), "%s: re-export differs from the source file", store);
  free(a);
  free(b);
}

/* `ls --json` of a store (its models, ids, sizes), or "" when it has no store yet. */
static char *models(const char *store) {
  char *out = NULL;
  if (ctl(store, &out, NULL, "--json", "ls", NULL)) {
    free(out);
    return strdup("");
  }
  return out;
}

static uint64_t json_u64(const char *doc, const char *key) {
  char k[64];
  snprintf(k, sizeof k, "\"%s\":", key);
  const char *p = strstr(doc, k);
  return p ? strtoull(p + strlen(k), NULL, 10) : UINT64_MAX;
}

/* Sum of $body_bytes_sent over the log lines from line `from` on; *lines gets the line count. */
static uint64_t log_bytes(const char *rel, size_t from, size_t *lines) {
  char p[256];
  path(p, sizeof p, rel);
  char *s = qt_read(p, NULL);
  uint64_t sum = 0;
  size_t n = 0;
  for (char *l = s; l && *l; n++) {
    char *nl = strchr(l, '\n');
    if (nl) *nl = 0;
    char *sp = strrchr(l, ' ');
    if (n >= from && sp) sum += strtoull(sp + 1, NULL, 10);
    if (!nl) break;
    l = nl + 1;
  }
  if (lines) *lines = n;
  free(s);
  return sum;
}

/* Requests for uri in the server's access log. */
static int log_count(const char *uri) {
  char p[256], needle[128];
  path(p, sizeof p, "ngx/access.log");
  snprintf(needle, sizeof needle, "GET %s ", uri);
  char *s = qt_read(p, NULL);
  int n = 0;
  for (char *q = s; q && (q = strstr(q, needle)); q++) n++;
  free(s);
  return n;
}

/* ---- the happy path ------------------------------------------------------------------------ */
typedef struct puller {
  pthread_t thr;
  char store[256];
  int rc;
  char *err;
} puller;

static void *pull_run(void *arg) {
  puller *p = arg;
  char u[128];
  url(u, sizeof u, "m.qins");
  p->rc = ctl(p->store, NULL, &p->err, "pull", u, "--connections", "3", NULL);
  return NULL;
}

Test(qinsctl_pull, three_stores_pull_concurrently_and_reexport_identically) {
  ngx_start();
  puller p[3];
  for (int i = 0; i < 3; i++) {
    char r[16];
    snprintf(r, sizeof r, "dst%d", i);
    path(p[i].store, sizeof p[i].store, r);
    p[i].err = NULL;
    cr_assert_eq(pthread_create(&p[i].thr, NULL, pull_run, &p[i]), 0);
  }
  for (int i = 0; i < 3; i++) pthread_join(p[i].thr, NULL);
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(p[i].rc, 0, "pull into %s: %s", p[i].store, p[i].err);
    free(p[i].err);
    assert_same_export(p[i].store, "m");
    char *out = NULL;
    cr_assert_eq(ctl(p[i].store, &out, NULL, "--json", "verify", NULL), 0);
    cr_assert(strstr(out, "\"ok\":true"), "%s", out);
    free(out);
    char pd[300];
    snprintf(pd, sizeof pd, "%s/pull/*", p[i].store);
    glob_t g;
    cr_assert_eq(glob(pd, 0, NULL, &g), GLOB_NOMATCH, "staging files left after a pull");
  }
}

Test(qinsctl_pull, file_url_and_local_import_keep_the_records) {
  char u[300], d1[256], d2[256];
  snprintf(u, sizeof u, "file://%s", qfile);
  path(d1, sizeof d1, "viafile");
  path(d2, sizeof d2, "viaimport");
  char *err = NULL;
  cr_assert_eq(ctl(d1, NULL, &err, "pull", u, "--model", "m", NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ctl(d2, NULL, &err, "import", qfile, NULL), 0, "%s", err);
  free(err);
  assert_same_export(d1, "m");
  assert_same_export(d2, "m");
  /* The tensor records as listed (codecs, shapes, checksums, SNR) are the source store's. */
  char src[256];
  path(src, sizeof src, "src");
  char *a = NULL, *b = NULL;
  cr_assert_eq(ctl(src, &a, NULL, "--json", "ls", "m", NULL), 0);
  cr_assert_eq(ctl(d2, &b, NULL, "--json", "ls", "m", NULL), 0);
  cr_assert_str_eq(a, b);
  free(a);
  free(b);
}

/* ---- cut mid-way, resumed -------------------------------------------------------------------- */
static int map_count(const char *store, uint64_t *n_pieces) {
  char pat[300];
  snprintf(pat, sizeof pat, "%s/pull/*.map", store);
  glob_t g;
  if (glob(pat, 0, NULL, &g)) return 0;
  size_t len = 0;
  char *m = qt_read(g.gl_pathv[0], &len);
  globfree(&g);
  int n = 0;
  for (size_t i = 0; m && i < len; i++) n += m[i] == 1;
  free(m);
  if (n_pieces) *n_pieces = len;
  return n;
}

static pid_t spawn_pull(const char *store, const char *u) {
  char bin[512];
  qt_bin("qinsctl", bin, sizeof bin);
  pid_t pid = fork();
  cr_assert(pid >= 0);
  if (pid == 0) {
    int nul = open("/dev/null", O_WRONLY);
    dup2(nul, 1);
    dup2(nul, 2);
    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    execl(bin, bin, "--store", store, "pull", u, "--connections", "1", "--retries", "0",
          (char *)NULL);
    _exit(127);
  }
  return pid;
}

/* Waits until the staging map holds at least `want` verified pieces; returns the count. */
static int wait_pieces(const char *store, int want) {
  int n = 0;
  for (int i = 0; i < 1500 && (n = map_count(store, NULL)) < want; i++) sleep_ms(10);
  return n;
}

static void resume_check(const char *store, size_t log_from) {
  uint64_t total_pieces = 0;
  int kept = map_count(store, &total_pieces);
  cr_assert_gt(kept, 0, "no verified piece was kept");
  cr_assert_lt((uint64_t)kept, total_pieces, "the cut came after the last piece");
  char *before = models(store);
  cr_assert(!strstr(before, "\"m\""), "a model was published by a cut pull: %s", before);
  free(before);
  char u[128], *out = NULL, *err = NULL;
  url(u, sizeof u, "m.qins");
  cr_assert_eq(ctl(store, &out, &err, "--json", "pull", u, NULL), 0, "%s", err);
  cr_assert_eq(json_u64(out, "pieces_reused"), (uint64_t)kept, "%s", out);
  cr_assert_eq(json_u64(out, "pieces_fetched"), total_pieces - (uint64_t)kept, "%s", out);
  /* nginx sent the resumed pull no more than the pieces it lacked plus the header and index. */
  uint64_t file = json_u64(out, "file_bytes"), sent = log_bytes("ngx/access.log", log_from, NULL);
  uint64_t lacked = json_u64(out, "fetched_bytes");
  cr_assert_leq(sent, lacked + 96 + 32 + 32 * total_pieces, "sent %llu, lacked %llu",
                (unsigned long long)sent, (unsigned long long)lacked);
  cr_assert_leq(lacked, file - (uint64_t)kept * 4096 + 4096, "refetched verified pieces");
  free(out);
  free(err);
  assert_same_export(store, "m");
}

/* Starts a pull (one connection, no retries) from a rate-limited nginx into tmp/cut and waits
 * until it has verified a few pieces. */
static pid_t start_cut_pull(char *store, size_t cap) {
  rate_limited = 1;
  ngx_start();
  char u[128];
  path(store, cap, "cut");
  url(u, sizeof u, "m.qins");
  pid_t pid = spawn_pull(store, u);
  wait_pieces(store, 4);
  return pid;
}

/* The cut pull's log lines are counted once nginx has stopped (it logs a request whose client
 * was killed when it notices, which can be after the kill returns), then nginx serves at full
 * speed for the resumed pull. */
static void restart_and_resume(const char *store) {
  size_t lines;
  ngx_stop();
  log_bytes("ngx/access.log", 0, &lines);
  rate_limited = 0;
  ngx_start();
  resume_check(store, lines);
}

Test(qinsctl_pull, sigkill_mid_transfer_resumes_without_refetching) {
  char store[256];
  pid_t pid = start_cut_pull(store, sizeof store);
  kill(pid, SIGKILL);
  int st;
  waitpid(pid, &st, 0);
  cr_assert(WIFSIGNALED(st), "the pull ended before the kill");
  restart_and_resume(store);
}

Test(qinsctl_pull, server_stopped_mid_transfer_resumes_without_refetching) {
  char store[256];
  pid_t pid = start_cut_pull(store, sizeof store);
  ngx_stop();
  int st;
  waitpid(pid, &st, 0);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1, "the pull did not fail when the server went");
  restart_and_resume(store);
}

/* ---- failures leave the store as it was ---------------------------------------------------- */
/* A store holding model "keep" (the same file imported under another name). */
static void keep_store(char *store, size_t cap, const char *name) {
  path(store, cap, name);
  char *err = NULL;
  cr_assert_eq(ctl(store, NULL, &err, "import", qfile, "--model", "keep", NULL), 0, "%s", err);
  free(err);
}

static void serve_variant(const char *file, size_t cut, long flip) {
  size_t len;
  char *b = qt_read(qfile, &len);
  cr_assert(b);
  if (flip >= 0) b[flip] ^= 0x10;
  char p[256], rel[64];
  snprintf(rel, sizeof rel, "ngx/www/%s", file);
  path(p, sizeof p, rel);
  cr_assert_eq(qt_write(p, b, cut ? cut : len), 0);
  chmod(p, 0644);
  free(b);
}

/* The source file's whole SHA-256 in hex, as export --json prints it (export again: same bytes). */
static void source_sha256(char hex[65]) {
  char *out = NULL, src[256];
  path(src, sizeof src, "src");
  cr_assert_eq(ctl(src, &out, NULL, "--json", "export", "m", qfile, "--format", "qins",
                   "--piece-size", PIECE, NULL), 0);
  char *sha = strstr(out, "\"sha256\":\"");
  cr_assert(sha && strlen(sha) >= 10 + 64, "%s", out);
  snprintf(hex, 65, "%.64s", sha + 10);
  free(out);
}

static void expect_fail(const char *store, const char *u, const char *needle, const char *extra1,
                        const char *extra2) {
  char *before = models(store), *err = NULL;
  int rc = ctl(store, NULL, &err, "pull", u, "--retries", "1", "--low-speed-time", "1",
               "--connect-timeout", "2", extra1, extra2, NULL);
  cr_assert_eq(rc, 1, "pull %s: rc %d (%s)", u, rc, err);
  cr_assert(strstr(err, needle), "pull %s: expected \"%s\" in: %s", u, needle, err);
  char *after = models(store);
  cr_assert_str_eq(before, after, "the store's models changed");
  free(before);
  free(after);
  free(err);
}

Test(qinsctl_pull, flipped_byte_names_its_piece_and_publishes_nothing) {
  size_t len;
  free(qt_read(qfile, &len));
  /* A byte in piece 5 of the body: the header (96 bytes) and index come first. */
  uint64_t n_pieces = 0;
  char *h = qt_read(qfile, NULL);
  memcpy(&n_pieces, h + 32, 8);
  free(h);
  long data_off = 96 + 32 + 32 * (long)n_pieces;
  serve_variant("flip.qins", 0, data_off + 5 * 4096 + 100);
  ngx_start();
  char store[256], u[128];
  keep_store(store, sizeof store, "flip");
  url(u, sizeof u, "flip.qins");
  expect_fail(store, u, "piece 5 ", NULL, NULL);
  expect_fail(store, u, "SHA-256", NULL, NULL);
}

Test(qinsctl_pull, truncated_404_stall_and_wrong_sha_fail_clearly) {
  size_t len;
  free(qt_read(qfile, &len));
  serve_variant("short.qins", len / 2, -1);
  ngx_start();
  char store[256], u[128];
  keep_store(store, sizeof store, "fails");
  url(u, sizeof u, "short.qins");
  expect_fail(store, u, "truncated", NULL, NULL);
  /* 4xx is not retried; 5xx is, --retries times. */
  url(u, sizeof u, "absent.qins");
  expect_fail(store, u, "HTTP 404", NULL, NULL);
  cr_assert_eq(log_count("/absent.qins"), 1);
  url(u, sizeof u, "busy.qins");
  expect_fail(store, u, "HTTP 503", NULL, NULL);
  cr_assert_eq(log_count("/busy.qins"), 2, "--retries 1: one try and one retry");
  url(u, sizeof u, "m.qins");
  expect_fail(store, u, "not the one expected", "--sha256",
              "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
  /* A server that accepts and never answers. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t l = sizeof a;
  cr_assert(fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof a) && !listen(fd, 8) &&
            !getsockname(fd, (struct sockaddr *)&a, &l));
  snprintf(u, sizeof u, "http://127.0.0.1:%d/m.qins", ntohs(a.sin_port));
  expect_fail(store, u, "timed out", NULL, NULL);
  close(fd);
  /* The right --sha256 (the whole file's) is accepted. */
  char hex[65], *err = NULL;
  source_sha256(hex);
  url(u, sizeof u, "m.qins");
  cr_assert_eq(ctl(store, NULL, &err, "pull", u, "--sha256", hex, NULL), 0, "%s", err);
  free(err);
}

/* ---- proxies ----------------------------------------------------------------------------------- */
Test(qinsctl_pull, http_proxy_is_used_and_no_proxy_bypasses_it) {
  ngx_start();
  char store[256], u[128], px[64];
  url(u, sizeof u, "m.qins");
  snprintf(px, sizeof px, "HTTP_PROXY=http://127.0.0.1:%d", pport);
  const char *via[] = {px, NULL};
  path(store, sizeof store, "proxied");
  char *err = NULL;
  cr_assert_eq(ctl_env(via, store, NULL, &err, "pull", u, NULL), 0, "%s", err);
  free(err);
  size_t lines;
  uint64_t sent = log_bytes("ngx/proxy.log", 0, &lines);
  size_t len;
  free(qt_read(qfile, &len));
  cr_assert_eq(sent, len, "the proxy relayed %llu of %zu bytes", (unsigned long long)sent, len);
  assert_same_export(store, "m");
  const char *bypass[] = {px, "NO_PROXY=127.0.0.1", NULL};
  path(store, sizeof store, "direct");
  cr_assert_eq(ctl_env(bypass, store, NULL, &err, "pull", u, NULL), 0, "%s", err);
  free(err);
  size_t lines2;
  log_bytes("ngx/proxy.log", 0, &lines2);
  cr_assert_eq(lines2, lines, "NO_PROXY did not bypass the proxy");
}

/* ---- import FILE.qins of a damaged file ---------------------------------------------------- */
Test(qinsctl_pull, local_import_of_a_damaged_file_names_what_is_wrong) {
  char store[256], bad[256];
  keep_store(store, sizeof store, "local");
  size_t len;
  char *b = qt_read(qfile, &len);
  cr_assert(b);
  uint64_t n_pieces;
  memcpy(&n_pieces, b + 32, 8);
  size_t data_off = 96 + 32 + 32 * (size_t)n_pieces;
  struct { size_t cut; long flip; const char *needle; } cases[] = {
      {0, (long)(data_off + 2 * 4096 + 7), "piece 2 "}, /* body byte */
      {0, 200, "index fails its SHA-256"},               /* index byte */
      {0, 20, "header fails its checksum"},              /* header byte */
      {len - 100, -1, "truncated"},
  };
  path(bad, sizeof bad, "bad.qins");
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    if (cases[i].flip >= 0) b[cases[i].flip] ^= 0x01;
    cr_assert_eq(qt_write(bad, b, cases[i].cut ? cases[i].cut : len), 0);
    if (cases[i].flip >= 0) b[cases[i].flip] ^= 0x01;
    char *before = models(store), *err = NULL;
    cr_assert_eq(ctl(store, NULL, &err, "import", bad, "--model", "other", NULL), 1);
    cr_assert(strstr(err, cases[i].needle), "expected \"%s\" in: %s", cases[i].needle, err);
    char *after = models(store);
    cr_assert_str_eq(before, after);
    free(before);
    free(after);
    free(err);
  }
  free(b);
}

/* ---- a failed pull into a store that did not exist leaves nothing -------------------------- */
static int exists(const char *p) {
  struct stat st;
  return stat(p, &st) == 0;
}

Test(qinsctl_pull, failed_pull_into_a_new_store_leaves_no_directory) {
  size_t len;
  char *h = qt_read(qfile, &len);
  cr_assert(h);
  uint64_t n_pieces;
  memcpy(&n_pieces, h + 32, 8);
  free(h);
  /* A byte of piece 0, fetched first on one connection: the pull fails having verified nothing. */
  serve_variant("flip0.qins", 0, 96 + 32 + 32 * (long)n_pieces + 100);
  ngx_start();
  char store[256], u[128], mdb[300], *err = NULL;
  path(store, sizeof store, "newstore");
  const char *cases[][2] = {{"absent.qins", "HTTP 404"}, {"busy.qins", "HTTP 503"},
                            {"flip0.qins", "piece 0 "}};
  for (size_t i = 0; i < 3; i++) {
    url(u, sizeof u, cases[i][0]);
    cr_assert_eq(ctl(store, NULL, &err, "pull", u, "--connections", "1", "--retries", "0", NULL), 1);
    cr_assert(strstr(err, cases[i][1]), "expected \"%s\" in: %s", cases[i][1], err);
    free(err);
    cr_assert(!exists(store), "pull of %s left %s behind", cases[i][0], store);
  }
  /* Every piece verified, then a wrong --sha256: the verified file is kept for the next pull, but
   * no LMDB environment was made and no model published. */
  url(u, sizeof u, "m.qins");
  cr_assert_eq(ctl(store, NULL, &err, "pull", u, "--sha256",
                   "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", NULL), 1);
  cr_assert(strstr(err, "not the one expected"), "%s", err);
  free(err);
  snprintf(mdb, sizeof mdb, "%s/data.mdb", store);
  cr_assert(!exists(mdb), "a failed pull created an LMDB environment in %s", store);
  /* The next pull, with the right --sha256, hashes the kept pieces in place and fetches none. */
  char *out = NULL, hex[65];
  source_sha256(hex);
  cr_assert_eq(ctl(store, &out, &err, "--json", "pull", u, "--sha256", hex, NULL), 0, "%s", err);
  cr_assert_eq(json_u64(out, "pieces_fetched"), 0, "%s", out);
  cr_assert_eq(json_u64(out, "pieces_reused"), n_pieces, "%s", out);
  free(out);
  free(err);
  assert_same_export(store, "m");
}

/* ---- https:// ------------------------------------------------------------------------------ */
/* A self-signed certificate for 127.0.0.1 (key in DIR/NAME.key, certificate in DIR/NAME.pem). */
static void make_cert(const char *dir, const char *name) {
  char key[300], crt[300];
  snprintf(key, sizeof key, "%s/%s.key", dir, name);
  snprintf(crt, sizeof crt, "%s/%s.pem", dir, name);
  char *argv[] = {"/usr/bin/openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                  "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", crt, NULL};
  char *err = NULL;
  cr_assert_eq(qt_run(argv, NULL, NULL, &err), 0, "openssl req: %s", err);
  free(err);
}

/* nginx with its TLS server on the certificate ngx/cert.pem (key ngx/key.pem). */
static void tls_start(void) {
  char d[256];
  path(d, sizeof d, "ngx");
  make_cert(d, "cert");
  char a[300], b[300];
  snprintf(a, sizeof a, "%s/cert.key", d);
  snprintf(b, sizeof b, "%s/key.pem", d);
  cr_assert_eq(rename(a, b), 0);
  tls = 1;
  ngx_start();
}

Test(qinsctl_pull, https_with_a_trusted_certificate) {
  tls_start();
  char u[128], ca[300], store[256], *err = NULL;
  snprintf(u, sizeof u, "https://127.0.0.1:%d/m.qins", tport);
  path(ca, sizeof ca, "ngx/cert.pem");
  size_t len, lines;
  free(qt_read(qfile, &len));
  /* --cacert, then each environment variable, each into a store of its own. */
  char e1[320], e2[320];
  snprintf(e1, sizeof e1, "CURL_CA_BUNDLE=%s", ca);
  snprintf(e2, sizeof e2, "SSL_CERT_FILE=%s", ca);
  const char *env1[] = {e1, NULL}, *env2[] = {e2, NULL};
  const char *const *envs[] = {NULL, env1, env2};
  for (int i = 0; i < 3; i++) {
    char r[16];
    snprintf(r, sizeof r, "tls%d", i);
    path(store, sizeof store, r);
    int rc = i ? ctl_env(envs[i], store, NULL, &err, "pull", u, NULL)
               : ctl(store, NULL, &err, "pull", u, "--cacert", ca, NULL);
    cr_assert_eq(rc, 0, "pull %s (%d): %s", u, i, err);
    free(err);
    assert_same_export(store, "m");
    /* The bytes came from the TLS server. */
    cr_assert_eq(log_bytes("ngx/tls.log", 0, &lines), (uint64_t)len * (uint64_t)(i + 1));
  }
}

Test(qinsctl_pull, https_with_an_untrusted_certificate_is_refused) {
  tls_start();
  char u[128], store[256], other[300], d[256];
  snprintf(u, sizeof u, "https://127.0.0.1:%d/m.qins", tport);
  /* A store holding a model, and a store path that does not exist yet: both as they were. */
  keep_store(store, sizeof store, "tlsbad");
  expect_fail(store, u, "TLS: the server's certificate is not trusted", NULL, NULL);
  expect_fail(store, u, u, NULL, NULL);
  /* Trusting another self-signed certificate does not trust this one. */
  path(d, sizeof d, "ngx");
  make_cert(d, "other");
  snprintf(other, sizeof other, "%s/other.pem", d);
  expect_fail(store, u, "certificate", "--cacert", other);
  char fresh[256], *err = NULL;
  path(fresh, sizeof fresh, "tlsnew");
  cr_assert_eq(ctl(fresh, NULL, &err, "pull", u, NULL), 1);
  cr_assert(strstr(err, u) && strstr(err, "certificate"), "%s", err);
  free(err);
  cr_assert(!exists(fresh), "a refused pull left %s behind", fresh);
  size_t lines;
  log_bytes("ngx/tls.log", 0, &lines);
  cr_assert_eq(lines, 0, "a request reached the server over an untrusted connection");
}
