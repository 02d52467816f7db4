/* SPDX-License-Identifier: MIT */
/*
 * daemon_access.c — access control of qinsd (docs/PROTOCOL.md §5, docs/qinsd.md "Access"):
 * socket-mode and socket-group applied to the socket file before it listens; allow-uid and
 * allow-gid (names or ids, comma lists, repeatable, config lines and flags adding up) for read
 * methods; admin methods for the daemon's uid and root only; a refused peer gets DENIED naming its
 * uid, then a close, and the refusal is logged with its pid, uid and gid.
 *
 * Second uids: the tests run as root (CI does), so each client is a forked child that drops to
 * another uid/gid (setgroups, setgid, setuid) before connecting; the temp dir is made traversable
 * (0711) so that uid can reach the socket. Without root the tests skip, saying so. The children
 * report through their exit status (no Criterion asserts outside the test process); the ids used
 * (4000-4243, 65533, 65534) need no passwd entries: the kernel checks numbers only.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <sys/stat.h>

#include "daemon_fixture.h"
#include "qins.h"

TestSuite(daemon_access, .fini = teardown, .timeout = 60);

#define NOBODY 65534   /* uid and gid of nobody/nogroup on Debian */
#define GID_A 4242     /* an otherwise unused gid: allowed through allow-gid */
#define GID_B 4243     /* another, allowed as a primary gid */

static void start_with(const char *const *args) {
  if (geteuid() != 0) cr_skip_test("needs root to connect as other uids (CI runs as root)");
  fixture_args = args;
  setup();
  fixture_args = NULL;
  cr_assert_eq(chmod(D.dir, 0711), 0); /* other uids may traverse to the socket */
}

/* A child with credentials uid/gid (+ supplementary groups) runs fn and exits with its result. */
typedef int (*as_fn)(void);
static int run_as(uid_t uid, gid_t gid, const gid_t *groups, size_t ng, as_fn fn) {
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    if (setgroups(ng, groups) || setgid(gid) || setuid(uid)) _exit(90);
    if (getuid() != uid || geteuid() != uid) _exit(91);
    _exit(fn());
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st), "child died (status 0x%x)", st);
  return WEXITSTATUS(st);
}

/* One call with no params over rx: the error code (0 on success), or 99 without a response. */
static int call0(ts_rx *rx, uint32_t id, const char *method) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, method, -1);
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  return r ? (ts_resp_code(r) ? 10 + (-ts_resp_code(r) - 1000) : 0) : 99;
}

/* Reads everything: ping, a whole tensor equal to its source, and the admin method refused
 * while the connection stays usable. Exit codes name the step that failed. */
static int reader_fn(void) {
  int fd = ts_connect(D.sock);
  if (fd < 0) return 1;
  ts_rx rx;
  ts_rx_init(&rx, fd);
  if (call0(&rx, 1, "ping")) return 2;
  qins_client *c;
  if (qins_connect(&c, D.sock, 5000)) return 3;
  float v[37 * 129];
  uint64_t shape[8];
  int nd = 0;
  if (qins_get_into(c, "m", "a.w", NULL, 0, QINS_F32, v, sizeof v, NULL, shape, &nd)) return 4;
  for (uint64_t i = 0; i < 37 * 129; i++)
    if (v[i] != ts_value(0, i)) return 5; /* a.w is std tensor 0 */
  qins_close(c);
  /* An allowed reader is not an admin: DENIED for shutdown, and the connection stays open. */
  if (call0(&rx, 2, "shutdown") != 10 + 8) return 6;
  if (call0(&rx, 3, "stats")) return 7;
  ts_rx_destroy(&rx);
  return 0;
}

/* A refused peer: DENIED (msgid 0) naming its uid, then the connection closes; libqins reports
 * QINS_EDENIED from qins_connect with the server's message. */
static int refused_fn(void) {
  int fd = ts_connect(D.sock);
  if (fd < 0) return 1;
  ts_rx rx;
  ts_rx_init(&rx, fd);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 5, "ping", -1);
  (void)ts_send(fd, sb.data, sb.size); /* may fail with EPIPE: the refusal can come first */
  msgpack_sbuffer_destroy(&sb);
  const msgpack_object *o;
  if (ts_rx_next(&rx, 10000, &o) != 1) return 2;
  if (o->via.array.ptr[1].via.u64 != 0) return 3;  /* before any request: msgid 0 */
  if (ts_resp_code(o) != QINS_EDENIED) return 4;
  char want[32];
  snprintf(want, sizeof want, "uid %u", (unsigned)getuid());
  if (!strstr(ts_resp_msg(o), want)) return 5;
  if (ts_rx_next(&rx, 10000, &o) == 1) return 6;   /* nothing else: the ping is not answered */
  ts_rx_destroy(&rx);
  qins_client *c = NULL;
  int rc = qins_connect(&c, D.sock, 5000);
  if (rc != QINS_EDENIED) return 7;
  qins_close(c);
  return 0;
}

/* Connecting needs write permission on the socket: 0 connected, 1 refused with EACCES. */
static int connect_fn(void) {
  int fd = ts_connect(D.sock);
  if (fd >= 0) {
    close(fd);
    return 0;
  }
  return fd == -EACCES ? 1 : 2;
}

static int log_has(const char *a, const char *b, const char *c, const char *d) {
  FILE *f = fopen(D.log, "r");
  char line[1024];
  int found = 0;
  while (f && fgets(line, sizeof line, f))
    found |= strstr(line, a) && strstr(line, b) && (!c || strstr(line, c)) && (!d || strstr(line, d));
  if (f) fclose(f);
  return found;
}

static uint64_t stat_u64(const char *key, const char *sub) {
  ts_rx rx;
  open_rx(&rx);
  const msgpack_object *v = qp_map_get(stats_on(&rx), key);
  if (v && sub) v = qp_map_get(v, sub);
  uint64_t n = v ? v->via.u64 : 0;
  ts_rx_destroy(&rx);
  return n;
}

/* Waits (up to 20 s) until `stats` connections, asked over one connection (counted itself),
 * shows exactly `want`; returns the last count. Clients' closes (the startup ping's, the earlier
 * stats calls') are seen by the daemon asynchronously, so a count taken right after them may
 * still include them; a connection counted for good never lets the count settle. */
static uint64_t await_open_connections(uint64_t want) {
  ts_rx rx;
  open_rx(&rx);
  uint64_t n = UINT64_MAX;
  for (uint32_t i = 0; i < 2000; i++) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    ts_req_begin(&sb, &pk, 100 + i, "stats", -1);
    const msgpack_object *r = ts_call(&rx, &sb, 100 + i);
    msgpack_sbuffer_destroy(&sb);
    cr_assert(r && ts_resp_code(r) == 0);
    const msgpack_object *v = qp_map_get(ts_resp_result(r), "connections");
    cr_assert(v, "stats has connections");
    n = v->via.u64;
    if (n == want) break;
    usleep(10000);
  }
  ts_rx_destroy(&rx);
  return n;
}

/* The config file's allow-uid and the flag's add up; the listed uid reads, root reads. */
static char conf_path[128];
static const char *const uid_args[] = {"--socket-mode", "0666", "--config", conf_path,
                                       "--allow-uid", "65534", NULL};
Test(daemon_access, allowed_uid_reads_but_is_not_an_admin) {
  if (geteuid() != 0) cr_skip_test("needs root to connect as other uids (CI runs as root)");
  char dir[] = "/tmp/qins-cfXXXXXX";
  cr_assert(mkdtemp(dir));
  snprintf(conf_path, sizeof conf_path, "%s/qinsd.conf", dir);
  FILE *f = fopen(conf_path, "w");
  cr_assert(f);
  fprintf(f, "allow-uid 4000,4001\n");
  fclose(f);
  start_with(uid_args);
  unlink(conf_path);
  rmdir(dir);
  cr_assert_eq(run_as(NOBODY, NOBODY, NULL, 0, reader_fn), 0, "reader as uid 65534");
  cr_assert_eq(run_as(4001, 4001, NULL, 0, reader_fn), 0, "reader as uid 4001 (config file)");
  int rc = run_as(4002, NOBODY, NULL, 0, refused_fn);
  cr_assert_eq(rc, 0, "uid 4002 is not listed: step %d", rc);
  cr_assert_eq(ts_ping(D.sock), 0, "root may always read; the denied shutdowns did nothing");
  cr_assert(log_has("DENIED", "shutdown", "uid 65534", NULL), "the admin refusal is logged");
}

/* allow-gid: a supplementary group or the primary gid; repeatable. */
static const char *const gid_args[] = {"--socket-mode", "0666", "--allow-gid", "4242",
                                       "--allow-gid", "4243", NULL};
Test(daemon_access, allowed_gid_primary_or_supplementary) {
  start_with(gid_args);
  const gid_t supp[] = {GID_A};
  cr_assert_eq(run_as(NOBODY, NOBODY, supp, 1, reader_fn), 0, "supplementary gid 4242");
  cr_assert_eq(run_as(65533, GID_B, NULL, 0, reader_fn), 0, "primary gid 4243");
  int rc = run_as(NOBODY, NOBODY, NULL, 0, refused_fn);
  cr_assert_eq(rc, 0, "no allowed group: step %d", rc);
}

/* A refused uid: DENIED naming it, a close, a log line with pid/uid/gid, counted; others go on. */
static const char *const refuse_args[] = {"--socket-mode", "0666", "--allow-uid", "4000", NULL};
Test(daemon_access, refused_uid_gets_denied_a_close_and_a_log_line) {
  start_with(refuse_args);
  cr_assert_eq(run_as(NOBODY, NOBODY, NULL, 0, refused_fn), 0, "uid 65534 is refused");
  cr_assert(log_has("refused", "uid 65534 gid 65534", "pid ", "allow-uid"),
            "the refusal is logged with pid, uid and gid");
  cr_assert_eq(stat_u64("connections_denied", NULL), 2, "both connections were denied");
  cr_assert_eq(stat_u64("errors", "DENIED"), 2);
  cr_assert_eq(await_open_connections(1), 1, "the denied ones are not counted as open");
  cr_assert_eq(run_as(4000, NOBODY, NULL, 0, reader_fn), 0, "the listed uid still reads");
}

/* Without allow lists, anyone who can connect reads: the socket's mode and group are the gate. */
static const char *const gate_args[] = {"--socket-mode", "0660", "--socket-group", "4242", NULL};
Test(daemon_access, socket_mode_and_group_are_the_gate) {
  start_with(gate_args);
  struct stat st;
  cr_assert_eq(stat(D.sock, &st), 0);
  cr_assert(S_ISSOCK(st.st_mode));
  cr_assert_eq(st.st_mode & 07777, 0660, "mode %o", st.st_mode & 07777);
  cr_assert_eq(st.st_gid, GID_A, "socket gid %u", (unsigned)st.st_gid);
  const gid_t supp[] = {GID_A};
  cr_assert_eq(run_as(NOBODY, NOBODY, supp, 1, connect_fn), 0, "a group member connects");
  cr_assert_eq(run_as(NOBODY, NOBODY, supp, 1, reader_fn), 0, "and reads (no allow lists)");
  cr_assert_eq(run_as(NOBODY, NOBODY, NULL, 0, connect_fn), 1, "others get EACCES");
}

static const char *const gname_args[] = {"--socket-mode", "0640", "--socket-group", "nogroup",
                                         NULL};
Test(daemon_access, socket_group_by_name) {
  struct group *g = getgrnam("nogroup");
  if (!g) cr_skip_test("no group named nogroup on this system");
  gid_t want = g->gr_gid;
  start_with(gname_args);
  struct stat st;
  cr_assert_eq(stat(D.sock, &st), 0);
  cr_assert_eq(st.st_mode & 07777, 0640);
  cr_assert_eq(st.st_gid, want);
  /* 0640: the group may read the file but not write it, and connecting needs write. */
  cr_assert_eq(run_as(NOBODY, want, NULL, 0, connect_fn), 1, "read-only mode: EACCES");
}

/* Unknown names exit 2 naming the option (a typo must not refuse everyone silently). */
static int run_qinsd_status(const char *const *args) { return run_built("qinsd", args); }

TestSuite(daemon_access_opts, .timeout = 30);
Test(daemon_access_opts, unknown_users_and_groups_exit_2) {
  const char *a1[] = {"--check", "--allow-uid", "4000,no-such-user-qins", NULL};
  cr_assert_eq(run_qinsd_status(a1), 2);
  const char *a2[] = {"--check", "--allow-gid", "no-such-group-qins", NULL};
  cr_assert_eq(run_qinsd_status(a2), 2);
  const char *a3[] = {"--check", "--socket-group", "no-such-group-qins", NULL};
  cr_assert_eq(run_qinsd_status(a3), 2);
  const char *a4[] = {"--check", "--allow-uid", "root, 4000", "--allow-gid", "0", NULL};
  cr_assert_eq(run_qinsd_status(a4), 0);
}
