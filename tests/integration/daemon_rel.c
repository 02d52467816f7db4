/* SPDX-License-Identifier: MIT */
/*
 * daemon_rel.c — qinsd under abuse and operations (issue 13, daemon side; docs/qinsd.md
 * "Signals", "Limits", docs/OPERATIONS.md): an empty allow list is a configuration error;
 * signals during a graceful shutdown (SIGHUP reopens the log and cuts nothing, a second SIGTERM
 * cuts what is in flight and exits 0, never death by signal); a half-sent request does not hold a
 * shutdown; client-chosen names are escaped in log lines and validated in requests; the store's
 * lock file replaced while serving is detected; connection limits and idle timeouts.
 * Model "m": the standard tensors plus, in model "h", "big64" [4096, 4096] f32 (64 MiB, streamed).
 */
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "daemon_fixture.h"

TestSuite(daemon_rel, .fini = teardown, .timeout = 120);

/* ---- helpers --------------------------------------------------------------------------------- */
/* 1 once the daemon's log holds needle (polled every 10 ms, up to 10 s), else 0. */
static int log_wait(const char *needle) {
  for (int i = 0; i < 1000; i++) {
    size_t n = 0;
    char *s = qt_read(D.log, &n);
    int hit = s && strstr(s, needle);
    free(s);
    if (hit) return 1;
    usleep(10000);
  }
  return 0;
}

__attribute__((unused)) static size_t log_size(void) {
  struct stat st;
  return stat(D.log, &st) == 0 ? (size_t)st.st_size : 0;
}

static char *log_text(void) {
  size_t n = 0;
  char *s = qt_read(D.log, &n);
  return s ? s : strdup("");
}

/* qinsd --check with args (NULL-terminated): the status; its stderr into *err (malloc'd). */
static int qinsd_check(const char *const *args, char **err) {
  char bin[512];
  char *argv[16] = {(char *)ts_build_path("qinsd", bin, sizeof bin), "--check"};
  int n = 2;
  for (int i = 0; args[i] && n < 15; i++) argv[n++] = (char *)args[i];
  argv[n] = NULL;
  *err = NULL;
  return qt_run(argv, NULL, NULL, err);
}

/* A get request of model/name with dtype (NULL: none), packed into sb (ts_req_begin's). */
static void pack_get_req(msgpack_sbuffer *sb, msgpack_packer *pk, uint32_t id, const char *model,
                         const char *name, const char *dtype) {
  ts_req_begin(sb, pk, id, "get", dtype ? 3 : 2);
  qp_pack_cstr(pk, "model");
  qp_pack_cstr(pk, model);
  qp_pack_cstr(pk, "name");
  qp_pack_cstr(pk, name);
  if (dtype) {
    qp_pack_cstr(pk, "dtype");
    qp_pack_cstr(pk, dtype);
  }
}

/* ---- 12: an empty allow list is a configuration error ----------------------------------------- */
Test(daemon_rel, empty_allow_list_is_an_error) {
  const char *const flag_uid[] = {"--allow-uid=", NULL};
  const char *const flag_gid[] = {"--allow-gid", "", NULL};
  const char *const flag_commas[] = {"--allow-uid", " , ", NULL};
  const char *const *cases[] = {flag_uid, flag_gid, flag_commas};
  const char *keys[] = {"allow-uid", "allow-gid", "allow-uid"};
  for (int i = 0; i < 3; i++) {
    char *err;
    int st = qinsd_check(cases[i], &err);
    cr_expect_eq(st, 2, "case %d: exit %d, want 2 (stderr: %s)", i, st, err ? err : "");
    cr_expect(err && strstr(err, keys[i]) && strstr(err, "empty"), "case %d names the key: %s", i,
              err ? err : "");
    free(err);
  }
  /* The same in a config file. */
  char dir[] = "/tmp/qins-XXXXXX";
  cr_assert(mkdtemp(dir));
  char conf[64];
  snprintf(conf, sizeof conf, "%s/c", dir);
  FILE *f = fopen(conf, "w");
  cr_assert(f);
  fprintf(f, "allow-gid \"\"\n");
  fclose(f);
  const char *const file_args[] = {"--config", conf, NULL};
  char *err;
  int st = qinsd_check(file_args, &err);
  cr_expect_eq(st, 2, "config file: exit %d, want 2 (stderr: %s)", st, err ? err : "");
  cr_expect(err && strstr(err, "allow-gid") && strstr(err, "line 1"), "names key and line: %s",
            err ? err : "");
  free(err);
  unlink(conf);
  rmdir(dir);
  /* A real list still passes. */
  const char *const ok[] = {"--allow-uid", "0,1", NULL};
  st = qinsd_check(ok, &err);
  cr_expect_eq(st, 0, "a real list: exit %d (stderr: %s)", st, err ? err : "");
  free(err);
}

/* ---- 6, 14: signals during shutdown, half-sent requests --------------------------------------- */
#define BIG_R 4096
#define BIG_C 4096
static int fill_big64(qs_store *s, void *ud) {
  (void)ud;
  int rc = fill_model(s, "m", 0);
  if (rc) return rc;
  qs_import *im;
  if ((rc = qs_import_begin(s, "h", NULL, &im))) return rc;
  float *v = malloc((size_t)BIG_R * BIG_C * sizeof *v);
  if (!v) return -1;
  for (uint64_t i = 0; i < (uint64_t)BIG_R * BIG_C; i++) v[i] = ts_value(77, i);
  uint64_t shape[2] = {BIG_R, BIG_C};
  rc = ts_import_f32(im, "big64", 2, shape, QC_F32, v);
  free(v);
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static void start_big(const char *const *args) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_big64, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, args), 0, "starting qinsd");
}

/* Sends a get of all of h/big64 on a new connection and waits until its first bytes are
 * readable (the stream is in flight, the client not reading). */
static void big_get_in_flight(ts_rx *rx) {
  open_rx(rx);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  pack_get_req(&sb, &pk, 7, "h", "big64", NULL);
  cr_assert_eq(ts_send(rx->fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  struct pollfd p = {.fd = rx->fd, .events = POLLIN};
  cr_assert_eq(poll(&p, 1, 10000), 1, "the answer started");
}

static const char *const slow_stop[] = {"--shutdown-timeout-ms", "3600000", NULL};

Test(daemon_rel, sighup_during_shutdown_cuts_no_stream) {
  start_big(slow_stop);
  ts_rx rx;
  big_get_in_flight(&rx);
  cr_assert_eq(kill(D.pid, SIGTERM), 0);
  cr_assert(log_wait("shutting down (SIGTERM)"), "shutdown began");
  unlink(D.log); /* rotated away: SIGHUP creates it anew */
  cr_assert_eq(kill(D.pid, SIGHUP), 0);
  cr_assert(log_wait("log reopened (SIGHUP)"), "the log was reopened during shutdown");
  const msgpack_object *r = NULL;
  cr_assert_eq(ts_rx_next(&rx, 60000, &r), 1, "the whole 64 MiB answer came");
  cr_assert_eq(ts_resp_code(r), 0);
  const msgpack_object *data = qp_map_get(ts_resp_result(r), "data");
  cr_assert(data && data->type == MSGPACK_OBJECT_BIN);
  cr_assert_eq(data->via.bin.size, (size_t)BIG_R * BIG_C * 4);
  const char *b = data->via.bin.ptr;
  for (uint64_t i = 0; i < (uint64_t)BIG_R * BIG_C; i += 4093) {
    float f;
    memcpy(&f, b + 4 * i, 4);
    cr_assert_eq(f, ts_value(77, i), "element %llu", (unsigned long long)i);
  }
  ts_rx_destroy(&rx);
  int st = ts_daemon_wait(&D, 20000);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit 0 after the stream (0x%x)", st);
  D.pid = 0;
}

Test(daemon_rel, second_sigterm_cuts_and_exits_0) {
  start_big(slow_stop);
  ts_rx rx;
  big_get_in_flight(&rx);
  cr_assert_eq(kill(D.pid, SIGTERM), 0);
  cr_assert(log_wait("shutting down (SIGTERM)"), "shutdown began");
  cr_assert_eq(kill(D.pid, SIGINT), 0);
  int st = ts_daemon_wait(&D, 20000);
  cr_assert(st >= 0, "qinsd exited on the second signal");
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status 0, not death by signal (0x%x)", st);
  D.pid = 0;
  char *s = log_text();
  cr_expect(strstr(s, "SIGINT during shutdown: closing 1 connection(s) now"), "logged: %s", s);
  free(s);
  ts_rx_destroy(&rx);
}

Test(daemon_rel, half_sent_request_does_not_hold_shutdown) {
  fixture_args = slow_stop;
  setup();
  fixture_args = NULL;
  int fd = ts_connect(D.sock);
  cr_assert_geq(fd, 0);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 1, "ping", -1);
  cr_assert_eq(ts_send(fd, sb.data, sb.size - 2), 0); /* all but the end */
  msgpack_sbuffer_destroy(&sb);
  cr_assert_eq(ts_ping(D.sock), 0); /* a round trip: the half request was read meanwhile */
  cr_assert_eq(kill(D.pid, SIGTERM), 0);
  int st = ts_daemon_wait(&D, 20000);
  cr_assert(st >= 0, "shutdown did not wait for the half-sent request");
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit 0 (0x%x)", st);
  D.pid = 0;
  close(fd);
}

/* ---- 9, 14: names validated in requests; echoes escaped in messages and log lines ------------ */
/* A get of model/name with dtype (NULL: none) over rx: the response (valid until rx's next call). */
static const msgpack_object *raw_get(ts_rx *rx, uint32_t id, const char *model, const char *name,
                                     const char *dtype) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  pack_get_req(&sb, &pk, id, model, name, dtype);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r, "no response to get");
  return r;
}

/* 1 if s is valid UTF-8 without control characters. */
static int clean_text(const char *s) {
  const unsigned char *p = (const unsigned char *)s;
  while (*p) {
    if (*p < 0x20 || *p == 0x7f) return 0;
    int n = *p < 0x80 ? 1 : (*p & 0xE0) == 0xC0 ? 2 : (*p & 0xF0) == 0xE0 ? 3 : (*p & 0xF8) == 0xF0 ? 4 : 0;
    if (!n) return 0;
    for (int i = 1; i < n; i++)
      if ((p[i] & 0xC0) != 0x80) return 0;
    p += n;
  }
  return 1;
}

static const char *const verbose_args[] = {"--log-level", "verbose", NULL};

Test(daemon_rel, request_names_are_validated_and_echoes_escaped) {
  fixture_args = verbose_args;
  setup();
  fixture_args = NULL;
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = raw_get(&rx, 1, "bad\xff", "a.w", NULL);
  cr_expect_eq(ts_resp_code(r), QINS_ENAME);
  const char *m = ts_resp_msg(r);
  cr_expect(strstr(m, "parameter \"model\"") && strstr(m, "UTF-8") && clean_text(m), "msg: %s", m);
  r = raw_get(&rx, 2, "m", "a.w\nwarning forged", NULL);
  cr_expect_eq(ts_resp_code(r), QINS_ENAME);
  m = ts_resp_msg(r);
  cr_expect(strstr(m, "parameter \"name\"") && strstr(m, "control character") && clean_text(m),
            "msg: %s", m);
  /* Not a name, echoed in the message: escaped on the wire and in the log. */
  r = raw_get(&rx, 3, "m", "a.w", "\xfe\n77 FORGED");
  cr_expect_eq(ts_resp_code(r), QINS_EDTYPE);
  m = ts_resp_msg(r);
  cr_expect(clean_text(m) && strstr(m, "\\x0a77 FORGED"), "msg escaped: %s", m);
  cr_assert(ping_on(&rx, 4), "still serving");
  ts_rx_destroy(&rx);
  cr_assert(log_wait("EDTYPE") || log_wait("DTYPE"), "the dtype error was logged");
  char *s = log_text();
  cr_expect(!strstr(s, "\n77 FORGED") && !strstr(s, "\nwarning forged"), "no forged line: %s", s);
  cr_expect(strstr(s, "\\x0a77 FORGED"), "the newline is logged escaped: %s", s);
  free(s);
}

/* ---- 7, 13: the store checked at start and while serving; store-group ------------------------ */
Test(daemon_rel, store_readable_by_others_is_warned_at_start) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_std, NULL), 0);
  char p[160];
  snprintf(p, sizeof p, "%s/data.mdb", D.store);
  cr_assert_eq(chmod(D.store, 0755), 0);
  cr_assert_eq(chmod(p, 0644), 0);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0);
  char *s = log_text();
  cr_expect(strstr(s, "warning store") && strstr(s, "can read data.mdb") && strstr(s, "chmod o-rwx"),
            "a warning naming the fix: %s", s);
  free(s);
}

Test(daemon_rel, replaced_lock_file_stops_store_methods) {
  setup();
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *r = raw_get(&rx, 1, "m", "a.w", NULL);
  cr_assert_eq(ts_resp_code(r), 0);
  char p[160];
  snprintf(p, sizeof p, "%s/lock.mdb", D.store);
  cr_assert_eq(unlink(p), 0);
  int fd = open(p, O_CREAT | O_WRONLY, 0600); /* another lock table in its place */
  cr_assert_geq(fd, 0);
  close(fd);
  int code = 0;
  for (uint32_t i = 0; i < 500 && code == 0; i++) { /* the check runs every second */
    code = ts_resp_code(raw_get(&rx, 10 + i, "m", "a.w", NULL));
    if (!code) usleep(20000);
  }
  cr_assert_eq(code, QINS_EIO, "get answered IO once lock.mdb was replaced (got %d)", code);
  r = raw_get(&rx, 9999, "m", "a.w", NULL);
  cr_expect_eq(ts_resp_code(r), QINS_EIO, "and stays so");
  cr_expect(strstr(ts_resp_msg(r), "lock.mdb"), "names the lock file: %s", ts_resp_msg(r));
  cr_assert(ping_on(&rx, 5), "ping still answers");
  ts_rx_destroy(&rx);
  cr_assert(log_wait("store check failed: IO"), "logged");
}

static const char *const store_group_args[] = {"--store-group", "4242", NULL};

Test(daemon_rel, store_group_applies_to_files_qinsd_creates) {
  if (geteuid() != 0) cr_skip_test("needs root to give files another group (CI runs as root)");
  fixture_no_fill = 1;
  fixture_args = store_group_args;
  setup();
  fixture_args = NULL;
  fixture_no_fill = 0;
  const char *files[] = {"data.mdb", "lock.mdb"};
  for (int i = 0; i < 2; i++) {
    char p[160];
    snprintf(p, sizeof p, "%s/%s", D.store, files[i]);
    struct stat st;
    cr_assert_eq(stat(p, &st), 0, "%s exists", files[i]);
    cr_expect_eq(st.st_mode & 0777, 0640, "%s mode %o", files[i], st.st_mode & 0777);
    cr_expect_eq(st.st_gid, 4242, "%s gid %u", files[i], (unsigned)st.st_gid);
  }
}

/* ---- 10: idle timeout, per-uid connection limit ---------------------------------------------- */
static const char *const idle_args[] = {"--idle-timeout-ms", "100", NULL};

Test(daemon_rel, idle_connection_is_closed) {
  fixture_args = idle_args;
  setup();
  fixture_args = NULL;
  ts_rx rx;
  open_rx(&rx);
  cr_assert(ping_on(&rx, 1));
  const msgpack_object *r;
  cr_assert_eq(ts_rx_next(&rx, 10000, &r), 0, "the idle connection was closed (clean EOF)");
  ts_rx_destroy(&rx);
  open_rx(&rx);
  const msgpack_object *st = stats_on(&rx);
  const msgpack_object *n = qp_map_get(st, "connections_idle_closed");
  cr_assert(n && n->via.u64 >= 1, "counted");
  ts_rx_destroy(&rx);
}

static const char *const per_uid_args[] = {"--max-connections-per-uid", "2", NULL};

/* As uid 4000: two connections answer ping, the third gets BUSY naming the option. */
static int per_uid_fn(void) {
  ts_rx rx[3];
  for (int i = 0; i < 3; i++) {
    int fd = ts_connect(D.sock);
    if (fd < 0) return 1;
    ts_rx_init(&rx[i], fd);
  }
  if (!ping_on(&rx[0], 1) || !ping_on(&rx[1], 2)) return 2;
  const msgpack_object *r;
  if (ts_rx_next(&rx[2], 10000, &r) != 1) return 3;
  if (ts_resp_code(r) != QINS_EBUSY || !strstr(ts_resp_msg(r), "max-connections-per-uid")) return 4;
  return 0;
}

Test(daemon_rel, per_uid_connection_limit) {
  if (geteuid() != 0) cr_skip_test("needs root to connect as another uid (CI runs as root)");
  fixture_args = per_uid_args;
  setup();
  fixture_args = NULL;
  cr_assert_eq(chmod(D.dir, 0711), 0);
  cr_assert_eq(chmod(D.sock, 0666), 0);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    if (setgroups(0, NULL) || setgid(4000) || setuid(4000)) _exit(90);
    _exit(per_uid_fn());
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "uid 4000's third connection got BUSY (step %d)",
            WIFEXITED(st) ? WEXITSTATUS(st) : -1);
  /* Root is not limited. */
  ts_rx rx[3];
  for (int i = 0; i < 3; i++) open_rx(&rx[i]);
  for (int i = 0; i < 3; i++) cr_expect(ping_on(&rx[i], 10 + (uint32_t)i), "root connection %d", i);
  for (int i = 0; i < 3; i++) ts_rx_destroy(&rx[i]);
}

/* ---- 11: an fd limit below max-connections ----------------------------------------------------- */
#define FD_CLIENTS 100
Test(daemon_rel, fd_limit_below_max_connections_gets_busy_not_silence) {
  /* qinsd alone runs with 64 fds (soft and hard): started here, not by ts_daemon_start. */
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_std, NULL), 0);
  char bin[512];
  ts_build_path("qinsd", bin, sizeof bin);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    struct rlimit low = {64, 64};
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (setrlimit(RLIMIT_NOFILE, &low)) _exit(90);
    execl(bin, bin, "--socket", D.sock, "--store", D.store, "--log", D.log, (char *)NULL);
    _exit(91);
  }
  D.pid = pid;
  int up = 0;
  for (int i = 0; i < 1000 && !up; i++) {
    up = ts_ping(D.sock) == 0;
    if (!up) usleep(10000);
  }
  cr_assert(up, "qinsd answers");
  cr_expect(log_wait("RLIMIT_NOFILE 64 (hard 64) is below max-connections 256"), "warned at start");
  static ts_rx rx[FD_CLIENTS];
  for (uint32_t i = 0; i < FD_CLIENTS; i++) {
    open_rx(&rx[i]);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    ts_req_begin(&sb, &pk, i + 1, "ping", -1);
    ts_send(rx[i].fd, sb.data, sb.size); /* EPIPE once BUSY came and the daemon closed: read below */
    msgpack_sbuffer_destroy(&sb);
  }
  int pong = 0, busy = 0;
  for (uint32_t i = 0; i < FD_CLIENTS; i++) {
    const msgpack_object *r;
    int ok = ts_rx_next(&rx[i], 10000, &r);
    cr_assert_eq(ok, 1, "client %u got an answer, not a silent close", i);
    if (ts_resp_code(r) == 0) pong++;
    else if (ts_resp_code(r) == QINS_EBUSY) busy++;
    else cr_assert_fail("client %u: code %d", i, ts_resp_code(r));
  }
  cr_expect(pong >= 1 && busy >= 1, "%d pong, %d BUSY", pong, busy);
  for (uint32_t i = 0; i < FD_CLIENTS; i++) ts_rx_destroy(&rx[i]);
  /* The daemon sees the closes asynchronously: until it has, a new client may still get BUSY. */
  int served = 0;
  for (int i = 0; i < 200 && !served; i++) {
    ts_rx s;
    open_rx(&s);
    served = ping_on(&s, 1);
    ts_rx_destroy(&s);
    if (!served) usleep(25000);
  }
  cr_expect(served, "serves once they left (within 5 s)");
}

/* ---- 3: repeated warnings are rate-limited; CHECKSUM lines always appear ---------------------- */
/* Flips a bit of element elem of std tensor "big" (seed 3) in the store file. */
static void corrupt_big(uint64_t elem) {
  char path[160];
  snprintf(path, sizeof path, "%s/data.mdb", D.store);
  int fd = open(path, O_RDWR);
  cr_assert_geq(fd, 0);
  struct stat st;
  fstat(fd, &st);
  uint8_t *all = malloc((size_t)st.st_size);
  cr_assert_eq(pread(fd, all, (size_t)st.st_size, 0), st.st_size);
  float pat[8];
  for (int i = 0; i < 8; i++) pat[i] = ts_value(3, elem + (uint64_t)i);
  uint8_t *hit = memmem(all, (size_t)st.st_size, pat, sizeof pat);
  cr_assert(hit, "element not found in the store file");
  uint8_t b = hit[1] ^ 0x10;
  cr_assert_eq(pwrite(fd, &b, 1, hit + 1 - all), 1);
  free(all);
  close(fd);
}

#define FLOOD_BATCH 500
#define FLOOD_BATCHES 40
/* As uid 4000 (not admin): 20000 pipelined `shutdown` calls, each answered DENIED. */
static int shutdown_flood_fn(void) {
  int fd = ts_connect(D.sock);
  if (fd < 0) return 1;
  ts_rx rx;
  ts_rx_init(&rx, fd);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (int i = 0; i < FLOOD_BATCH; i++) {
    qp_pack_request(&pk, (uint32_t)i + 1, "shutdown");
    msgpack_pack_array(&pk, 0);
  }
  for (int b = 0; b < FLOOD_BATCHES; b++) {
    if (ts_send(fd, sb.data, sb.size)) return 2;
    for (int i = 0; i < FLOOD_BATCH; i++) {
      const msgpack_object *r;
      if (ts_rx_next(&rx, 10000, &r) != 1 || ts_resp_code(r) != QINS_EDENIED) return 3;
    }
  }
  msgpack_sbuffer_destroy(&sb);
  ts_rx_destroy(&rx);
  return 0;
}

/* As uid 4000, not in allow-uid: 1000 connects, each refused with DENIED. */
static int denied_loop_fn(void) {
  for (int i = 0; i < 1000; i++) {
    int fd = ts_connect(D.sock);
    if (fd < 0) return 1;
    ts_rx rx;
    ts_rx_init(&rx, fd);
    const msgpack_object *r;
    if (ts_rx_next(&rx, 10000, &r) != 1 || ts_resp_code(r) != QINS_EDENIED) return 2;
    ts_rx_destroy(&rx);
  }
  return 0;
}

static int as_uid_4000(int (*fn)(void)) {
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    if (setgroups(0, NULL) || setgid(4000) || setuid(4000)) _exit(90);
    _exit(fn());
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 99;
}

#define LOG_BOUND (32 * 1024) /* the flood would write megabytes */

Test(daemon_rel, shutdown_flood_log_is_bounded_and_checksum_survives) {
  if (geteuid() != 0) cr_skip_test("needs root to connect as another uid (CI runs as root)");
  setup();
  cr_assert_eq(chmod(D.dir, 0711), 0);
  cr_assert_eq(chmod(D.sock, 0666), 0);
  corrupt_big(700 * 600 + 5);
  size_t before = log_size();
  cr_assert_eq(as_uid_4000(shutdown_flood_fn), 0, "every shutdown answered DENIED");
  size_t grown = log_size() - before;
  cr_expect_lt(grown, LOG_BOUND, "20000 denied calls wrote %zu log bytes", grown);
  ts_rx rx;
  open_rx(&rx);
  got g = do_get(&rx, "m", "big", -1, NULL, NULL);
  cr_assert_eq(g.code, QINS_ECHECKSUM);
  ts_rx_destroy(&rx);
  int st = ts_daemon_stop(&D);
  D.pid = 0;
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  char *s = log_text();
  cr_expect(strstr(s, "CHECKSUM"), "the CHECKSUM line is there");
  cr_expect(strstr(s, "more line(s) like \"DENIED\" for uid 4000 suppressed"), "suppressed counted");
  free(s);
}

static const char *const allow_other[] = {"--allow-uid", "4001", NULL};

Test(daemon_rel, denied_reconnect_loop_log_is_bounded) {
  if (geteuid() != 0) cr_skip_test("needs root to connect as another uid (CI runs as root)");
  fixture_args = allow_other;
  setup();
  fixture_args = NULL;
  cr_assert_eq(chmod(D.dir, 0711), 0);
  cr_assert_eq(chmod(D.sock, 0666), 0);
  size_t before = log_size();
  cr_assert_eq(as_uid_4000(denied_loop_fn), 0, "every connect refused with DENIED");
  size_t grown = log_size() - before;
  if (grown >= LOG_BOUND) ts_log_dump(&D);
  cr_expect_lt(grown, LOG_BOUND, "1000 refused connects wrote %zu log bytes", grown);
  int st = ts_daemon_stop(&D);
  D.pid = 0;
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  char *s = log_text();
  cr_expect(strstr(s, "suppressed"), "suppressed counted: %s", s);
  free(s);
}
