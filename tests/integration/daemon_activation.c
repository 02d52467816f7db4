/* SPDX-License-Identifier: MIT */
/*
 * daemon_activation.c — qinsd under socket activation (docs/OPERATIONS.md): the test plays the
 * supervisor (systemd): it creates and holds the listening socket, and starts qinsd with the
 * socket as fd 3, LISTEN_FDS=1 and LISTEN_PID set to qinsd's own pid (set in the forked child
 * before exec, as systemd does). Checked: qinsd serves on the passed socket, does not remove the
 * socket file when it stops, a client that connects while no qinsd runs waits in the backlog and
 * is answered by the next qinsd; and a passed fd that is not a listening socket, or more than
 * one, makes qinsd exit 1 with a log line naming what is wrong.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon.h"

/* The supervisor's listening socket at path: fd, or -1. */
static int make_listener(const char *path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 16) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Starts qinsd on d's paths with `fd` passed as fd 3 and LISTEN_FDS=nfds, LISTEN_PID=its pid;
 * sets d->pid. Returns the pid, or -1. */
static pid_t start_activated(ts_daemon *d, int fd, const char *nfds) {
  char bin[512];
  ts_build_path("qinsd", bin, sizeof bin);
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    if (fd != 3 && dup2(fd, 3) != 3) _exit(127); /* dup2 clears FD_CLOEXEC on fd 3 */
    if (fd == 3) fcntl(3, F_SETFD, 0);
    char pid_s[32];
    snprintf(pid_s, sizeof pid_s, "%d", (int)getpid());
    setenv("LISTEN_PID", pid_s, 1);
    setenv("LISTEN_FDS", nfds, 1);
    int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (nul >= 0) {
      dup2(nul, 0);
      dup2(nul, 1);
    }
    execl(bin, bin, "--socket", d->sock, "--store", d->store, "--log", d->log, "--log-level",
          "verbose", (char *)NULL);
    _exit(127);
  }
  d->pid = pid;
  return pid;
}

/* Waits (10 s at most) until qinsd answers ping on d's socket. */
static int wait_ready(ts_daemon *d) {
  for (int i = 0; i < 1000; i++) {
    int st;
    if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
      d->pid = 0;
      return -1;
    }
    if (ts_ping(d->sock) == 0) return 0;
    usleep(10000);
  }
  return -1;
}

static int log_has(const ts_daemon *d, const char *needle) {
  FILE *f = fopen(d->log, "r");
  if (!f) return 0;
  char line[1024];
  int found = 0;
  while (!found && fgets(line, sizeof line, f)) found = strstr(line, needle) != NULL;
  fclose(f);
  return found;
}

Test(daemon_activation, connects_wait_in_the_backlog_across_a_restart) {
  ts_daemon d;
  cr_assert_eq(ts_dir_make(&d), 0);
  int lfd = make_listener(d.sock);
  cr_assert_geq(lfd, 0, "listening socket: %s", strerror(errno));

  cr_assert_gt(start_activated(&d, lfd, "1"), 0);
  if (wait_ready(&d) != 0) ts_log_dump(&d);
  cr_assert_neq(d.pid, 0, "qinsd exited at start under socket activation");
  cr_assert(log_has(&d, "socket activation"), "the log names socket activation");
  int st = ts_daemon_stop(&d);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "clean exit, status 0x%x", st);
  struct stat sst;
  cr_assert_eq(stat(d.sock, &sst), 0, "the supervisor's socket file stays after qinsd stops");

  /* No qinsd runs: the connect lands in the supervisor's backlog, and the request waits. */
  int c = ts_connect(d.sock);
  cr_assert_geq(c, 0, "connect while qinsd is down: %s", strerror(-c));
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 7, "ping", -1);
  cr_assert_eq(ts_send(c, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);

  cr_assert_gt(start_activated(&d, lfd, "1"), 0);
  ts_rx rx;
  ts_rx_init(&rx, c);
  const msgpack_object *resp = NULL;
  int got = ts_rx_next(&rx, 10000, &resp);
  if (got != 1) ts_log_dump(&d);
  cr_assert_eq(got, 1, "the request made while qinsd was down is answered by the next one");
  cr_assert_eq(ts_resp_code(resp), 0);
  const msgpack_object *res = ts_resp_result(resp);
  cr_assert(res && res->type == MSGPACK_OBJECT_STR && res->via.str.size == 4 &&
            memcmp(res->via.str.ptr, "pong", 4) == 0);
  ts_rx_destroy(&rx);
  close(c);
  st = ts_daemon_stop(&d);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "clean exit, status 0x%x", st);
  close(lfd);
  ts_dir_remove(&d, 0);
}

/* qinsd exits 1 within 10 s; its log holds `needle`. */
static void expect_refused(ts_daemon *d, const char *needle) {
  int st = ts_daemon_wait(d, 10000);
  if (!(WIFEXITED(st) && WEXITSTATUS(st) == 1) || !log_has(d, needle)) ts_log_dump(d);
  cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 1, "exit status 1, got 0x%x", st);
  cr_assert(log_has(d, needle), "the log says \"%s\"", needle);
}

Test(daemon_activation, a_passed_fd_that_is_not_a_listening_socket_is_refused) {
  ts_daemon d;
  cr_assert_eq(ts_dir_make(&d), 0);
  int p[2];
  cr_assert_eq(pipe(p), 0);
  cr_assert_gt(start_activated(&d, p[0], "1"), 0);
  expect_refused(&d, "fd 3 is not a socket");
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); /* a socket that does not listen */
  cr_assert_geq(s, 0);
  cr_assert_gt(start_activated(&d, s, "1"), 0);
  expect_refused(&d, "fd 3 is not listening");
  close(s);
  close(p[0]);
  close(p[1]);
  ts_dir_remove(&d, 0);
}

Test(daemon_activation, more_than_one_passed_socket_is_refused) {
  ts_daemon d;
  cr_assert_eq(ts_dir_make(&d), 0);
  int lfd = make_listener(d.sock);
  cr_assert_geq(lfd, 0);
  cr_assert_gt(start_activated(&d, lfd, "2"), 0);
  expect_refused(&d, "LISTEN_FDS=2: qinsd takes exactly one listening socket");
  close(lfd);
  ts_dir_remove(&d, 0);
}
