/* SPDX-License-Identifier: MIT */
/*
 * daemon_live.c — qinsd as a process: models imported, replaced and removed by another process
 * while it serves (seen on the next request, never half), the socket file (mode, stale file
 * replaced, live daemon refused), and the documentation checks: every method of the table has its
 * section in docs/PROTOCOL.md, every option of the table is in docs/qinsd.conf.example, which
 * qinsd accepts, and `--help` shows each default.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "daemon_fixture.h"

TestSuite(daemon_live, .init = setup, .fini = teardown, .timeout = 90);

typedef struct fill_arg {
  const char *model;
  uint64_t seed;
  int remove;
} fill_arg;

static int fill_one(qs_store *s, void *ud) {
  fill_arg *a = ud;
  if (a->remove) return qs_model_remove(s, a->model);
  return fill_model(s, a->model, a->seed);
}

static int call_models(ts_rx *rx, char names[][32], int max) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 3, "models", -1);
  const msgpack_object *r = ts_call(rx, &sb, 3);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r && ts_resp_code(r) == 0);
  const msgpack_object *a = ts_resp_result(r);
  int n = (int)a->via.array.size;
  for (int i = 0; i < n && i < max; i++)
    qp_obj_cstr(qp_map_get(&a->via.array.ptr[i], "name"), names[i], 32);
  return n;
}

/* Whole-tensor check: 1 if a.w of `model` holds seed's values, 0 if another seed's; asserts. */
static int aw_matches(const got *g, uint64_t seed) {
  uint64_t n = 37 * 129;
  if (g->bytes != n * 4) return 0;
  for (uint64_t i = 0; i < n; i++)
    if (elem_f32("f32", g->data, i) != ts_value(seed, i)) return 0;
  return 1;
}

typedef struct reader_arg {
  atomic_int stop;      /* set by the main thread */
  int torn;             /* responses matching neither version */
  int ok_old, ok_new;   /* responses matching each version */
} reader_arg;

static void *reader(void *p) {
  reader_arg *a = p;
  int fd = ts_connect(D.sock);
  if (fd < 0) {
    a->torn++;
    return NULL;
  }
  ts_rx rx;
  ts_rx_init(&rx, fd);
  while (!atomic_load(&a->stop)) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    ts_req_begin(&sb, &pk, 5, "get", 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m2");
    qp_pack_cstr(&pk, "name");
    qp_pack_cstr(&pk, "a.w");
    const msgpack_object *r = ts_call(&rx, &sb, 5);
    msgpack_sbuffer_destroy(&sb);
    if (!r || ts_resp_code(r)) {
      a->torn++;
      break;
    }
    const msgpack_object *d = qp_map_get(ts_resp_result(r), "data");
    got g = {.bytes = d->via.bin.size, .data = (uint8_t *)d->via.bin.ptr};
    /* seed of a.w is its index 0 plus the model's base: 100 (old) or 200 (new) */
    if (aw_matches(&g, 100)) a->ok_old++;
    else if (aw_matches(&g, 200)) a->ok_new++;
    else a->torn++;
  }
  ts_rx_destroy(&rx);
  return NULL;
}

Test(daemon_live, models_imported_replaced_and_removed_while_serving) {
  ts_rx rx;
  open_rx(&rx);
  char names[8][32];
  cr_assert_eq(call_models(&rx, names, 8), 1);
  /* Import m2 from another process: seen on the next request. */
  fill_arg a1 = {"m2", 100, 0};
  cr_assert_eq(ts_store_fill(D.store, fill_one, &a1), 0);
  cr_assert_eq(call_models(&rx, names, 8), 2);
  cr_assert_str_eq(names[0], "m");
  cr_assert_str_eq(names[1], "m2");
  got g = do_get(&rx, "m2", "a.w", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert(aw_matches(&g, 100));
  free(g.data);
  /* Replace m2 while a reader hammers it: every answer is wholly old or wholly new. */
  reader_arg ra = {0};
  pthread_t th;
  cr_assert_eq(pthread_create(&th, NULL, reader, &ra), 0);
  fill_arg a2 = {"m2", 200, 0};
  cr_assert_eq(ts_store_fill(D.store, fill_one, &a2), 0);
  g = do_get(&rx, "m2", "a.w", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert(aw_matches(&g, 200), "the replacement is seen on the next request");
  free(g.data);
  atomic_store(&ra.stop, 1);
  pthread_join(th, NULL);
  cr_assert_eq(ra.torn, 0, "%d torn or failed reads (%d old, %d new)", ra.torn, ra.ok_old, ra.ok_new);
  /* Remove m: gone on the next request, m2 still served. */
  fill_arg a3 = {"m", 0, 1};
  cr_assert_eq(ts_store_fill(D.store, fill_one, &a3), 0);
  g = do_get(&rx, "m", "a.w", -1, NULL, NULL);
  cr_assert_eq(g.code, QINS_ENO_MODEL);
  cr_assert_eq(call_models(&rx, names, 8), 1);
  cr_assert_str_eq(names[0], "m2");
  g = do_get(&rx, "m2", "big", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(elem_f32("f32", g.data, 5), ts_value(203, 5));
  free(g.data);
  ts_rx_destroy(&rx);
}

Test(daemon_live, socket_mode_defaults_to_0660) {
  struct stat st;
  cr_assert_eq(stat(D.sock, &st), 0);
  cr_assert(S_ISSOCK(st.st_mode));
  cr_assert_eq(st.st_mode & 07777, 0660, "mode %o", st.st_mode & 07777);
}

static const char *const mode_args[] = {"--socket-mode", "0600", NULL};
static void setup_mode(void) {
  fixture_args = mode_args;
  setup();
}
Test(daemon_live, socket_mode_configurable, .init = setup_mode) {
  struct stat st;
  cr_assert_eq(stat(D.sock, &st), 0);
  cr_assert_eq(st.st_mode & 07777, 0600, "mode %o", st.st_mode & 07777);
}

/* Runs qinsd to completion with args (no daemon fixture); returns its exit status. */
static int run_qinsd(const char *const *args, char *out, size_t cap) {
  char bin[512];
  ts_build_path("qinsd", bin, sizeof bin);
  int pfd[2];
  cr_assert_eq(pipe(pfd), 0);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(pfd[1], 1);
    dup2(pfd[1], 2);
    close(pfd[0]);
    const char *argv[32] = {bin};
    int n = 1;
    for (int i = 0; args[i] && n < 31; i++) argv[n++] = args[i];
    argv[n] = NULL;
    execv(bin, (char *const *)argv);
    _exit(127);
  }
  close(pfd[1]);
  size_t len = 0;
  ssize_t k;
  while ((k = read(pfd[0], out + len, cap - 1 - len)) > 0) len += (size_t)k;
  out[len] = '\0';
  close(pfd[0]);
  int st;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

Test(daemon_live, live_daemon_on_the_same_path_is_refused) {
  static char out[8192];
  char log2[128];
  snprintf(log2, sizeof log2, "%s/log2", D.dir);
  const char *args[] = {"--socket", D.sock, "--store", D.store, "--log", log2, NULL};
  int rc = run_qinsd(args, out, sizeof out);
  cr_assert_eq(rc, 1, "second daemon exit %d", rc);
  FILE *f = fopen(log2, "r");
  cr_assert(f);
  char line[512];
  int found = 0;
  while (fgets(line, sizeof line, f)) found |= strstr(line, "another daemon is listening") != NULL;
  fclose(f);
  cr_assert(found, "the refusal is logged");
  cr_assert_eq(ts_ping(D.sock), 0, "the first daemon still serves");
}

static void setup_stale(void) {
  if (D.dir[0]) ts_dir_remove(&D, 0); /* the suite's .init ran first */
  cr_assert_eq(ts_dir_make(&D), 0);
  cr_assert_eq(ts_store_fill(D.store, fill_std, NULL), 0);
  /* A stale socket file: bound, then its process gone (here: closed without unlink). */
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", D.sock);
  cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  close(fd);
  struct stat st;
  cr_assert_eq(stat(D.sock, &st), 0);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0);
}
Test(daemon_live, stale_socket_file_is_replaced, .init = setup_stale) {
  cr_assert_eq(ts_ping(D.sock), 0);
  FILE *f = fopen(D.log, "r");
  cr_assert(f);
  char line[512];
  int found = 0, peercred = 0;
  while (fgets(line, sizeof line, f)) {
    found |= strstr(line, "removed a stale socket file") != NULL;
    peercred |= strstr(line, "connected") && strstr(line, " uid ");
  }
  fclose(f);
  cr_assert(found, "the replacement is logged");
  cr_assert(peercred, "peer credentials are logged");
}

Test(daemon_live, log_lines_are_pid_time_level_msg) {
  cr_assert_eq(ts_ping(D.sock), 0);
  FILE *f = fopen(D.log, "r");
  cr_assert(f);
  char line[1024];
  int n = 0;
  while (fgets(line, sizeof line, f)) {
    int pid;
    char ts[40], level[16];
    cr_assert_eq(sscanf(line, "%d %39s %15s", &pid, ts, level), 3, "line: %s", line);
    cr_assert_eq(pid, (int)D.pid);
    cr_assert_eq(strlen(ts), 24, "ISO time: %s", ts);
    cr_assert(!strcmp(level, "debug") || !strcmp(level, "verbose") || !strcmp(level, "notice") ||
              !strcmp(level, "warning"), "level %s", level);
    n++;
  }
  fclose(f);
  cr_assert_gt(n, 1);
}

/* ---- documentation and option table (no daemon) -------------------------------------------- */
TestSuite(daemon_docs, .timeout = 30);

static char *slurp(const char *rel) {
  char path[512];
  const char *b = getenv("QINS_BUILD");
  FILE *f = fopen(rel, "r"); /* make runs tests from the repository root */
  if (!f && b) {
    snprintf(path, sizeof path, "%s/../%s", b, rel);
    f = fopen(path, "r");
  }
  cr_assert(f, "cannot open %s", rel);
  static char buf[1 << 17];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  return strdup(buf);
}

/* STYLE.md 9: each method of the table has its section in docs/PROTOCOL.md. */
Test(daemon_docs, every_method_is_in_protocol_md) {
  static char out[8192];
  const char *args[] = {"--methods", NULL};
  cr_assert_eq(run_qinsd(args, out, sizeof out), 0);
  char *doc = slurp("docs/PROTOCOL.md");
  int n = 0;
  for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
    char name[64];
    cr_assert_eq(sscanf(line, "%63s", name), 1);
    char heading[128];
    int found = 0;
    for (int sec = 1; sec < 40 && !found; sec++) {
      snprintf(heading, sizeof heading, "### 4.%d %s\n", sec, name);
      found = strstr(doc, heading) != NULL;
      snprintf(heading, sizeof heading, "### 4.%d %s (", sec, name);
      found |= strstr(doc, heading) != NULL;
    }
    cr_assert(found, "method %s has no \"### 4.N %s\" section in docs/PROTOCOL.md", name, name);
    n++;
  }
  cr_assert_geq(n, 9);
  free(doc);
}

/* STYLE.md 18: docs/qinsd.conf.example lists every option; qinsd accepts it; --help shows
 * defaults. */
Test(daemon_docs, conf_example_matches_the_option_table) {
  static char help[16384];
  const char *hargs[] = {"--help", NULL};
  cr_assert_eq(run_qinsd(hargs, help, sizeof help), 0);
  char *ex = slurp("docs/qinsd.conf.example");
  int n = 0;
  for (char *p = strstr(help, "  --"); p; p = strstr(p + 1, "\n  --")) {
    char name[64];
    if (sscanf(p + (p[0] == '\n' ? 5 : 4), "%63[a-z-]", name) != 1) continue;
    if (!strcmp(name, "check") || !strcmp(name, "methods") || !strcmp(name, "help") || !strcmp(name, "version"))
      continue;
    char *eol = strchr(p + 1, '\n');
    char *d = strstr(p + 1, "(default: ");
    cr_assert(d && (!eol || d < eol), "--%s shows its default", name);
    char key[80];
    snprintf(key, sizeof key, "\n%s ", name);
    char key2[80];
    snprintf(key2, sizeof key2, "\n# %s ", name);
    cr_assert(strstr(ex, key) || strstr(ex, key2), "option %s missing from docs/qinsd.conf.example",
              name);
    n++;
  }
  cr_assert_geq(n, 12);
  char exp[512];
  const char *b = getenv("QINS_BUILD");
  snprintf(exp, sizeof exp, "docs/qinsd.conf.example");
  if (access(exp, R_OK) != 0 && b) snprintf(exp, sizeof exp, "%s/../docs/qinsd.conf.example", b);
  static char out[4096];
  const char *cargs[] = {"--config", exp, "--check", NULL};
  cr_assert_eq(run_qinsd(cargs, out, sizeof out), 0, "qinsd --check rejects the example: %s", out);
  free(ex);
}

Test(daemon_docs, bad_option_values_exit_2_naming_the_option) {
  static char out[4096];
  const char *a1[] = {"--store", "/tmp", "--socket", "/tmp/x", "--max-connections", "0", NULL};
  cr_assert_eq(run_qinsd(a1, out, sizeof out), 2);
  cr_assert(strstr(out, "max-connections"), "%s", out);
  const char *a2[] = {"--store", "/tmp", "--socket", "/tmp/x", "--socket-mode", "999", NULL};
  cr_assert_eq(run_qinsd(a2, out, sizeof out), 2);
  cr_assert(strstr(out, "socket-mode"), "%s", out);
  const char *a3[] = {"--store", "/tmp", "--socket", "/tmp/x", "--no-such-option", "1", NULL};
  cr_assert_eq(run_qinsd(a3, out, sizeof out), 2);
  cr_assert(strstr(out, "no-such-option"), "%s", out);
  const char *a4[] = {"--socket", "/tmp/x", NULL};
  cr_assert_eq(run_qinsd(a4, out, sizeof out), 2);
  cr_assert(strstr(out, "--store"), "%s", out);
  const char *a5[] = {"--store", "/tmp", "--socket", "/tmp/x", "--max-request-bytes", "2G", NULL};
  cr_assert_eq(run_qinsd(a5, out, sizeof out), 2);
  cr_assert(strstr(out, "max-request-bytes"), "%s", out);
}

/* Admin methods: only the daemon's own uid and root (SO_PEERCRED). Run as root, the test
 * connects from a child that became uid 65534 (nobody). */
static const char *const open_args[] = {"--socket-mode", "0666", NULL};
static void setup_open(void) {
  fixture_args = open_args;
  setup();
  chmod(D.dir, 0711); /* let the other uid reach the socket */
}

static int child_call(ts_rx *rx, uint32_t id, const char *method) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, method, -1);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  return r ? ts_resp_code(r) : 1;
}

Test(daemon_live, admin_methods_need_the_daemons_uid_or_root, .init = setup_open) {
  if (geteuid() != 0) cr_skip_test("needs root to connect as another uid");
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    if (setgid(65534) || setuid(65534)) _exit(10);
    int fd = ts_connect(D.sock);
    if (fd < 0) _exit(11);
    ts_rx rx;
    ts_rx_init(&rx, fd);
    if (child_call(&rx, 1, "shutdown") != QINS_EDENIED) _exit(12);
    if (child_call(&rx, 2, "stats") != 0) _exit(13);
    if (child_call(&rx, 3, "ping") != 0) _exit(14);
    _exit(0);
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", WEXITSTATUS(st));
  cr_assert_eq(ts_ping(D.sock), 0, "still serving after the denied shutdown");
  FILE *f = fopen(D.log, "r");
  char line[1024];
  int found = 0;
  while (f && fgets(line, sizeof line, f))
    found |= strstr(line, "uid 65534") && strstr(line, "DENIED");
  if (f) fclose(f);
  cr_assert(found, "the denial is logged naming the client's uid");
}

/* The config file configures the daemon; flags override it (STYLE.md 18). */
static char conf_args_path[128];
static const char *conf_args[] = {"--config", conf_args_path, "--max-connections", "7", NULL};
static void setup_conf(void) {
  if (D.dir[0]) ts_dir_remove(&D, 0); /* the suite's .init ran first */
  cr_assert_eq(ts_dir_make(&D), 0);
  snprintf(conf_args_path, sizeof conf_args_path, "%s/qinsd.conf", D.dir);
  FILE *f = fopen(conf_args_path, "w");
  cr_assert(f);
  fprintf(f, "# test config\nmax-response-bytes 64K\nmax-connections 3\nmax-ranges \"4\"\n");
  fclose(f);
  cr_assert_eq(ts_store_fill(D.store, fill_std, NULL), 0);
  cr_assert_eq(ts_daemon_start(&D, conf_args), 0);
}
Test(daemon_live, config_file_applies_and_flags_override_it, .init = setup_conf) {
  ts_rx rx;
  open_rx(&rx);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 1, "hello", -1);
  const msgpack_object *r = ts_call(&rx, &sb, 1);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r && ts_resp_code(r) == 0);
  const msgpack_object *m = ts_resp_result(r);
  cr_assert_eq(qp_map_get(m, "max_response_bytes")->via.u64, 65536);
  cr_assert_eq(qp_map_get(m, "max_ranges")->via.u64, 4);
  cr_assert_eq(qp_map_get(m, "max_connections")->via.u64, 7, "the flag wins over the file");
  got g = do_get(&rx, "m", "big", -1, NULL, NULL);
  cr_assert_eq(g.code, QINS_ERESPONSE_TOO_LARGE);
  ts_rx_destroy(&rx);
}

Test(daemon_live, sigint_also_stops_cleanly) {
  cr_assert_eq(ts_ping(D.sock), 0);
  kill(D.pid, SIGINT);
  int st = ts_daemon_wait(&D, 10000);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status 0x%x", st);
  FILE *f = fopen(D.log, "r");
  char line[512];
  int found = 0;
  while (f && fgets(line, sizeof line, f)) found |= strstr(line, "shutting down (SIGINT)") != NULL;
  if (f) fclose(f);
  cr_assert(found);
}

/* The real admin path: `qinsctl import` of the shared tiny model and `qinsctl rm`, run while qinsd
 * serves, are seen on the next request. */
static int run_ctl(const char *const *args) { return run_built("qinsctl", args); }

Test(daemon_live, qinsctl_import_and_rm_seen_while_serving) {
  char bin[512], model[512];
  const char *shared = getenv("QINS_SHARED");
  snprintf(model, sizeof model, "%s/models/stories260K.safetensors",
           shared && *shared ? shared : QINS_SHARED_DIR);
  if (access(ts_build_path("qinsctl", bin, sizeof bin), X_OK) != 0)
    cr_skip_test("build/qinsctl is not built");
  if (access(model, R_OK) != 0) cr_skip_test("%s is absent", model);
  ts_rx rx;
  open_rx(&rx);
  const char *imp[] = {"--store", D.store, "import", model, "--model", "stories", "--codec", "f32", NULL};
  cr_assert_eq(run_ctl(imp), 0, "qinsctl import");
  char names[8][32];
  cr_assert_eq(call_models(&rx, names, 8), 2);
  cr_assert_str_eq(names[1], "stories");
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 4, "list", 2);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "stories");
  qp_pack_cstr(&pk, "limit");
  msgpack_pack_uint64(&pk, 1);
  const msgpack_object *r = ts_call(&rx, &sb, 4);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r && ts_resp_code(r) == 0, "%s", r ? ts_resp_msg(r) : "no response");
  const msgpack_object *t0 = &qp_map_get(ts_resp_result(r), "tensors")->via.array.ptr[0];
  char tname[300];
  cr_assert_eq(qp_obj_cstr(qp_map_get(t0, "name"), tname, sizeof tname), 0);
  uint64_t n_elem = qp_map_get(t0, "n_elem")->via.u64;
  got g = do_get(&rx, "stories", tname, -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(g.bytes, n_elem * 4);
  free(g.data);
  const char *rm[] = {"--store", D.store, "rm", "stories", NULL};
  cr_assert_eq(run_ctl(rm), 0, "qinsctl rm");
  g = do_get(&rx, "stories", tname, -1, NULL, NULL);
  cr_assert_eq(g.code, QINS_ENO_MODEL);
  ts_rx_destroy(&rx);
}

/* Log rotation: rename the log, SIGHUP, and new lines go to a new file at the configured path. */
Test(daemon_live, sighup_reopens_the_log) {
  char old[160];
  snprintf(old, sizeof old, "%s.1", D.log);
  cr_assert_eq(rename(D.log, old), 0);
  kill(D.pid, SIGHUP);
  int found = 0;
  for (int i = 0; i < 1000 && !found; i++) { /* polled: the signal is handled asynchronously */
    cr_assert_eq(ts_ping(D.sock), 0);
    FILE *f = fopen(D.log, "r");
    char line[512];
    while (f && fgets(line, sizeof line, f)) found |= strstr(line, "log reopened") != NULL;
    if (f) fclose(f);
  }
  cr_assert(found, "a new log file was opened");
}
