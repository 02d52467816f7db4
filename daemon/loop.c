/* SPDX-License-Identifier: MIT */
/*
 * loop.c — the daemon's life and its one readiness loop: the store opened read-only, the listening
 * socket, signals, shutdown, and serve_loop, which owns both the client read set and libuv.
 *
 * Reading. Client sockets are not read through libuv's streams but from a read set: an epoll
 * instance of our own in which they are edge-triggered, so each is reported once per arrival and
 * requests are taken in the order they arrived. libuv's level-triggered epoll re-reports the
 * sockets of the last batch first: a client answered early sent its next request early and kept
 * its place at the head of every batch, while the others waited a batch more (docs/qinsd.md,
 * Serving order). The set also holds libuv's own epoll fd, and serve_loop waits on it, running
 * libuv (UV_RUN_NOWAIT) for writes that wait for the socket, timers, signals and the pool: a small
 * get costs one epoll_wait, one read and one write. A client that keeps its socket full is read
 * its budget a turn (conn.c), then waits on the again list behind the others.
 *
 * Shutdown (SIGTERM/SIGINT/`shutdown`): close the listener, stop reading, answer requests already
 * buffered with SHUTDOWN, let in-flight ones finish and flush, then close; after
 * shutdown-timeout-ms whatever remains is closed. The loop then has no handles and returns.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conn.h"
#include "methods.h"

qd_server qd_srv = {.lp = {.rset_fd = -1, .dirty = 1}};

/* Called after anything that may give libuv a new fd watcher (uv_write) or work (uv_close): libuv
 * registers watchers only inside uv_run, and uv_backend_timeout does not count them. */
void qd_loop_touch(void) { qd_srv.lp.dirty = 1; }

/* ---- the read set --------------------------------------------------------------------------- */
static void again_remove(qd_conn *c) {
  if (!c->again) return;
  if (c->again_prev) c->again_prev->again_next = c->again_next;
  else qd_srv.lp.again_head = c->again_next;
  if (c->again_next) c->again_next->again_prev = c->again_prev;
  else qd_srv.lp.again_tail = c->again_prev;
  c->again = 0;
  c->again_prev = c->again_next = NULL;
  qd_srv.lp.again_n--;
}

void qd_loop_again(qd_conn *c, int all) {
  c->again_all |= all;
  if (c->again) return;
  c->again = 1;
  c->again_prev = qd_srv.lp.again_tail;
  c->again_next = NULL;
  if (qd_srv.lp.again_tail) qd_srv.lp.again_tail->again_next = c;
  else qd_srv.lp.again_head = c;
  qd_srv.lp.again_tail = c;
  qd_srv.lp.again_n++;
}

/* A turn for each of the first AGAIN_TURNS connections on the again list (those whose budget
 * runs out again go to the back, for a later round): like epoll's 64 events, a round is bounded. */
#define AGAIN_TURNS 64
static void again_run(void) {
  for (size_t k = qd_srv.lp.again_n < AGAIN_TURNS ? qd_srv.lp.again_n : AGAIN_TURNS;
       k > 0 && qd_srv.lp.again_head; k--) {
    qd_conn *c = qd_srv.lp.again_head;
    int all = c->again_all;
    again_remove(c);
    c->again_all = 0;
    qd_conn_read(c, all);
  }
}

int qd_loop_watch(qd_conn *c) {
  if (c->fd >= 0) return 0; /* joins once; a paused connection stays in the set */
  uv_os_fd_t fd;
  struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = c};
  if (qd_srv.lp.rset_fd < 0 || uv_fileno((uv_handle_t *)&c->pipe, &fd) != 0 ||
      epoll_ctl(qd_srv.lp.rset_fd, EPOLL_CTL_ADD, fd, &e) != 0) {
    qd_log(QD_LOG_WARNING, "%s: cannot watch the socket (%s): refused with BUSY", c->desc,
           qd_srv.lp.rset_fd < 0 ? "no read set" : strerror(errno)); /* e.g. max_user_watches */
    return -1;
  }
  c->fd = fd;
  return 0;
}

void qd_loop_unwatch(qd_conn *c) {
  if (c->fd >= 0 && qd_srv.lp.rset_fd >= 0) epoll_ctl(qd_srv.lp.rset_fd, EPOLL_CTL_DEL, c->fd, NULL);
  c->fd = -1;
  again_remove(c); /* closing: the list must not outlive the connection */
}

/* The set holds the client sockets (edge-triggered, data.ptr = the connection) and libuv's own
 * epoll fd (level-triggered, data.ptr = NULL). 0, or a negative errno. */
static int rset_open(void) {
  int fd = epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return -errno;
  struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
  if (epoll_ctl(fd, EPOLL_CTL_ADD, uv_backend_fd(qd_srv.loop), &e) != 0) {
    int err = -errno;
    close(fd);
    return err;
  }
  qd_srv.lp.rset_fd = fd;
  return 0;
}

/* Runs the daemon until libuv has nothing left (after shutdown). One epoll_wait a round: client
 * requests are read and answered here, in arrival order, and libuv runs one round (UV_RUN_NOWAIT)
 * when its fd is ready, when its timers or queues are due (the wait's timeout comes from libuv),
 * or when a watcher was added (qd_loop_touch). Rounds alternate, so neither side starves the
 * other. A small get answered at once touches nothing of libuv's: one epoll_wait, read and write. */
__attribute__((hot))
static void serve_loop(void) {
  struct epoll_event ev[64];
  uv_loop_t *loop = qd_srv.loop;
  for (;;) {
    if (qd_srv.lp.dirty) {
      qd_srv.lp.dirty = 0;
      uv_run(loop, UV_RUN_NOWAIT);
    }
    if (!uv_loop_alive(loop)) break;
    if (qd_srv.mem.wake) qd_mem_wake(); /* connections the global memory bound paused */
    int n = epoll_wait(qd_srv.lp.rset_fd, ev, 64,
                       qd_srv.lp.dirty || qd_srv.lp.again_head ? 0 : uv_backend_timeout(loop));
    if (n < 0 && errno != EINTR) { /* cannot happen with a valid set: stop, and never spin */
      if (!qd_srv.lp.failed) {
        qd_log(QD_LOG_WARNING, "epoll_wait on the read set: %s; shutting down", strerror(errno));
        qd_srv.lp.failed = 1;
        qd_shutdown_begin("epoll_wait failed");
      }
      usleep(1000);
    }
    uv_update_time(loop); /* timers started while handling requests count from now */
    for (int i = 0; i < n; i++) {
      qd_conn *c = ev[i].data.ptr;
      if (!c) {
        qd_srv.lp.dirty = 1;
        continue;
      }
      /* A connection closed earlier in this batch is still allocated (it is freed by a close
       * callback, which runs inside uv_run); it just has nothing more to read. */
      int hup = (ev[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
      if (c->again) /* more bytes came while it waits its turn: it keeps its place in line */
        c->again_all |= hup;
      else
        qd_conn_read(c, hup);
    }
    again_run();
    /* Timers, closes or callbacks that came due while requests kept arriving; the next wait's
     * timeout counts from this time too (uv_run, if it runs, takes its own). */
    uv_update_time(loop);
    if (n <= 0 || uv_backend_timeout(loop) == 0) qd_srv.lp.dirty = 1;
  }
}

/* ---- shutdown ------------------------------------------------------------------------------- */
static void close_handle(uv_handle_t *h) {
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* The last connection is gone after shutdown began: the loop's own handles close, so it returns.
 * Signals stay handled until here: a SIGHUP (log rotation) or a second SIGTERM during the
 * graceful part must never kill the daemon by its default action. */
static void shutdown_finish(void) {
  uv_timer_stop(&qd_srv.lp.shutdown_timer);
  close_handle((uv_handle_t *)&qd_srv.lp.shutdown_timer);
  if (qd_srv.lp.signals) {
    qd_srv.lp.signals = 0;
    close_handle((uv_handle_t *)&qd_srv.lp.sig_term);
    close_handle((uv_handle_t *)&qd_srv.lp.sig_int);
    close_handle((uv_handle_t *)&qd_srv.lp.sig_hup);
  }
}

void qd_loop_conn_freed(void) {
  if (qd_srv.lp.accept_held && qd_srv.lp.listening && qd_srv.cn.n_open < qd_srv.lp.fd_conns) {
    qd_srv.lp.accept_held = 0; /* the connect waiting in libuv is taken now (and reading resumes) */
    qd_conn_accept((uv_stream_t *)&qd_srv.lp.listener);
    qd_loop_touch();
  }
  if (qd_srv.stopping && qd_srv.cn.n_open == 0) shutdown_finish();
}

static void on_shutdown_timeout(uv_timer_t *t) {
  (void)t;
  qd_log(QD_LOG_WARNING, "shutdown timeout: closing %llu connection(s) still busy",
         (unsigned long long)qd_srv.cn.n_open);
  for (qd_conn *c = qd_srv.cn.all; c; c = c->next) qd_conn_close(c);
}

static void remove_socket_file(void) {
  struct stat st;
  if (stat(qd_srv.cfg.socket, &st) == 0 && st.st_ino == qd_srv.lp.sock_st.st_ino &&
      st.st_dev == qd_srv.lp.sock_st.st_dev)
    unlink(qd_srv.cfg.socket);
}

static void on_shutdown_kick(uv_timer_t *t) {
  qd_conn *next;
  for (qd_conn *c = qd_srv.cn.all; c; c = next) {
    next = c->next;
    qd_conn_resume(c); /* answers buffered requests with SHUTDOWN, stops reading */
  }
  if (qd_srv.cn.n_open == 0) {
    shutdown_finish();
    return;
  }
  uv_timer_start(t, on_shutdown_timeout, qd_srv.cfg.shutdown_timeout_ms, 0);
}

void qd_shutdown_begin(const char *why) {
  if (qd_srv.stopping) return;
  qd_srv.stopping = 1;
  qd_log(QD_LOG_NOTICE, "shutting down (%s): %llu connection(s) to finish", why,
         (unsigned long long)qd_srv.cn.n_open);
  close_handle((uv_handle_t *)&qd_srv.lp.tick);
  if (qd_srv.lp.listening) {
    uv_close((uv_handle_t *)&qd_srv.lp.listener, NULL);
    qd_srv.lp.listening = 0;
    if (!qd_srv.lp.activated) remove_socket_file();
  }
  /* The per-connection work runs from the loop, not here: this may be called from inside a
   * handler (method `shutdown`) while its connection is mid-dispatch. */
  uv_timer_start(&qd_srv.lp.shutdown_timer, on_shutdown_kick, 0, 0);
  qd_loop_touch();
}

static void on_signal(uv_signal_t *h, int signum) {
  (void)h;
  if (signum == SIGHUP) { /* log rotation */
    int rc = qd_log_open(qd_srv.cfg.log);
    if (rc) qd_log(QD_LOG_WARNING, "log %s: cannot reopen: %s", qd_srv.cfg.log, strerror(-rc));
    else qd_log(QD_LOG_NOTICE, "log reopened (SIGHUP)");
    return;
  }
  const char *name = signum == SIGTERM ? "SIGTERM" : "SIGINT";
  if (!qd_srv.stopping) {
    qd_shutdown_begin(name);
    return;
  }
  /* A second SIGTERM/SIGINT: the operator wants it gone now. What is in flight is cut, as at
   * shutdown-timeout-ms, and the daemon exits 0 once the handles have closed (docs/qinsd.md). */
  if (qd_srv.cn.n_open == 0) return; /* already finishing */
  qd_log(QD_LOG_WARNING, "%s during shutdown: closing %llu connection(s) now", name,
         (unsigned long long)qd_srv.cn.n_open);
  uv_timer_stop(&qd_srv.lp.shutdown_timer);
  for (qd_conn *c = qd_srv.cn.all; c; c = c->next) qd_conn_close(c);
}

/* ---- listening socket ------------------------------------------------------------------------ */
/* A connect is taken only while the fd limit leaves room for it (connections answered BUSY
 * included); otherwise it waits in libuv (which stops watching the listener, so the next ones
 * wait in the backlog) until a connection is freed: every client gets an answer or BUSY, never a
 * silent close. An accept that fails anyway (ENFILE: the system's limit) is counted and logged;
 * libuv then closes the connects it cannot take. */
static void on_connection(uv_stream_t *srv, int status) {
  if (status < 0) {
    qd_srv.st.accept_failed++;
    qd_log_rl(QD_LOG_WARNING, "accept failed", 0, "accept failed: %s (%llu so far; stats accept_failed)", uv_strerror(status),
           (unsigned long long)qd_srv.st.accept_failed);
    return;
  }
  if (qd_srv.lp.fd_conns && qd_srv.cn.n_open >= qd_srv.lp.fd_conns) {
    qd_srv.lp.accept_held = 1;
    return;
  }
  qd_conn_accept(srv);
}

/* The fd limit: the soft RLIMIT_NOFILE is raised to the hard one, and when what remains after the
 * fds open now (store, log, loop) and a margin is below max-connections, a warning names both
 * figures and fd_conns caps the connections (BUSY past it, qd_conn_limit). */
#define FD_MARGIN 16
static void fd_budget(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur < rl.rlim_max) {
    struct rlimit up = {rl.rlim_max, rl.rlim_max};
    if (setrlimit(RLIMIT_NOFILE, &up) == 0) rl.rlim_cur = rl.rlim_max;
  }
  if (rl.rlim_cur == RLIM_INFINITY) return;
  uint64_t used = 0;
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    for (struct dirent *e; (e = readdir(d));) used += e->d_name[0] != '.';
    closedir(d);
  }
  uint64_t lim = (uint64_t)rl.rlim_cur, fixed = used + FD_MARGIN;
  qd_srv.lp.fd_conns = lim > fixed + 2 ? lim - fixed : 2;
  if (qd_conn_limit() < qd_srv.cfg.max_connections)
    qd_log(QD_LOG_WARNING, "RLIMIT_NOFILE %llu (hard %llu) is below max-connections %llu plus the "
           "%llu fds qinsd needs itself: at most %llu connections are served, more get BUSY "
           "(raise LimitNOFILE= or ulimit -n, or lower max-connections)",
           (unsigned long long)lim, (unsigned long long)rl.rlim_max,
           (unsigned long long)qd_srv.cfg.max_connections, (unsigned long long)fixed,
           (unsigned long long)qd_conn_limit());
}

/* 0 if path is free (absent, or a stale socket now removed); else an error was logged. */
static int claim_socket_path(const char *path) {
  struct stat st;
  if (lstat(path, &st) != 0) return 0;
  if (!S_ISSOCK(st.st_mode)) {
    qd_log(QD_LOG_WARNING, "socket %s: exists and is not a socket; refusing to replace it", path);
    return -1;
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  int err = errno;
  close(fd);
  if (rc == 0) {
    qd_log(QD_LOG_WARNING, "socket %s: another daemon is listening on it; refusing to start", path);
    return -1;
  }
  if (err != ECONNREFUSED) {
    qd_log(QD_LOG_WARNING, "socket %s: cannot probe it: %s", path, strerror(err));
    return -1;
  }
  if (unlink(path) != 0) {
    qd_log(QD_LOG_WARNING, "socket %s: stale, but cannot remove it: %s", path, strerror(errno));
    return -1;
  }
  qd_log(QD_LOG_NOTICE, "socket %s: removed a stale socket file", path);
  return 0;
}

/* Who may call read methods, for the "listening" log line. */
static const char *read_access(void) {
  return qd_srv.cfg.allow_uid.n || qd_srv.cfg.allow_gid.n ? "allow-uid/allow-gid, own uid and root"
                                                          : "anyone who can connect";
}

/* Socket activation, as sd_listen_fds(3) without libsystemd: a supervisor that holds the
 * listening socket passes it as fd 3 with LISTEN_FDS=1 and LISTEN_PID=<our pid>, so connects
 * made while qinsd restarts wait in its backlog. 1 with *fd set when a socket was passed, 0 when
 * none was (or the variables name another process), -1 when what was passed is unusable
 * (logged, naming what is wrong). The variables are unset so no child inherits them. */
#define LISTEN_FDS_START 3
static int activated_socket(int *fd) {
  const char *pid_s = getenv("LISTEN_PID"), *fds_s = getenv("LISTEN_FDS");
  if (!pid_s || !fds_s) return 0;
  char *end;
  errno = 0;
  unsigned long pid = strtoul(pid_s, &end, 10);
  if (errno || end == pid_s || *end || pid != (unsigned long)getpid()) return 0;
  unsigned long n = strtoul(fds_s, &end, 10);
  int bad = end == fds_s || *end;
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  if (bad || n != 1) {
    qd_log(QD_LOG_WARNING, "socket activation: LISTEN_FDS=%s: qinsd takes exactly one listening "
           "socket (one ListenStream= in the .socket unit)", fds_s);
    return -1;
  }
  int f = LISTEN_FDS_START, v = 0;
  socklen_t vl = sizeof v;
  struct sockaddr_un sa;
  socklen_t sl = sizeof sa;
  const char *why = NULL;
  if (getsockopt(f, SOL_SOCKET, SO_DOMAIN, &v, &vl) != 0)
    why = errno == ENOTSOCK ? "is not a socket" : "is not open";
  else if (v != AF_UNIX)
    why = "is not a Unix socket";
  else if (vl = sizeof v, getsockopt(f, SOL_SOCKET, SO_TYPE, &v, &vl) != 0 || v != SOCK_STREAM)
    why = "is not a stream socket";
  else if (vl = sizeof v, getsockopt(f, SOL_SOCKET, SO_ACCEPTCONN, &v, &vl) != 0 || !v)
    why = "is not listening";
  if (why) {
    qd_log(QD_LOG_WARNING, "socket activation: fd %d %s", f, why);
    return -1;
  }
  fcntl(f, F_SETFD, FD_CLOEXEC);
  if (getsockname(f, (struct sockaddr *)&sa, &sl) == 0 && sl > offsetof(struct sockaddr_un, sun_path) &&
      sa.sun_path[0] && strncmp(sa.sun_path, qd_srv.cfg.socket, sizeof sa.sun_path) != 0)
    qd_log(QD_LOG_NOTICE, "socket activation: the passed socket is %.*s, not %s (socket option)",
           (int)sizeof sa.sun_path, sa.sun_path, qd_srv.cfg.socket);
  *fd = f;
  return 1;
}

static int listen_socket(void) {
  const char *path = qd_srv.cfg.socket;
  uv_pipe_t *srv = &qd_srv.lp.listener;
  int afd = -1, act = activated_socket(&afd);
  if (act < 0) return -1;
  if (act) { /* the supervisor's socket: its unit sets mode and group; never unlinked here */
    uv_pipe_init(qd_srv.loop, srv, 0);
    int rc = uv_pipe_open(srv, afd);
    /* listen() again sets the backlog: as large as the kernel allows (net.core.somaxconn), so
     * the unit's Backlog= is what bounds the connects that wait during a restart. */
    if (rc == 0) rc = uv_listen((uv_stream_t *)srv, SOMAXCONN, on_connection);
    if (rc) {
      qd_log(QD_LOG_WARNING, "socket activation: fd %d: %s", afd, uv_strerror(rc));
      uv_close((uv_handle_t *)srv, NULL);
      return -1;
    }
    qd_srv.lp.listening = 1;
    qd_srv.lp.activated = 1;
    qd_log(QD_LOG_NOTICE, "listening on %s (socket activation: fd %d from the supervisor); read "
           "access: %s", path, afd, read_access());
    return 0;
  }
  if (claim_socket_path(path)) return -1;
  uv_pipe_init(qd_srv.loop, srv, 0);
  /* Created owner-only, then opened up to socket-mode before listen(): no window in which a
   * permissive umask lets others connect (FORMATS-AND-PEERS.md §6). */
  mode_t old = umask(077);
  int rc = uv_pipe_bind(srv, path);
  umask(old);
  if (rc == 0 && qd_srv.cfg.socket_group && *qd_srv.cfg.socket_group &&
      chown(path, (uid_t)-1, qd_srv.cfg.socket_gid) != 0) {
    rc = -errno;
    qd_log(QD_LOG_WARNING, "socket %s: cannot give it group %s (gid %u): %s", path,
           qd_srv.cfg.socket_group, (unsigned)qd_srv.cfg.socket_gid, strerror(errno));
  }
  if (rc == 0 && chmod(path, qd_srv.cfg.socket_mode) != 0) rc = -errno;
  if (rc == 0) rc = uv_listen((uv_stream_t *)srv, 128, on_connection);
  if (rc) {
    qd_log(QD_LOG_WARNING, "socket %s: %s", path, uv_strerror(rc));
    uv_close((uv_handle_t *)srv, NULL);
    return -1;
  }
  stat(path, &qd_srv.lp.sock_st);
  qd_srv.lp.listening = 1;
  qd_log(QD_LOG_NOTICE, "listening on %s (mode %04o, gid %u); read access: %s", path,
         qd_srv.cfg.socket_mode, (unsigned)qd_srv.lp.sock_st.st_gid, read_access());
  return 0;
}

/* ---- the daemon's life ------------------------------------------------------------------------ */
/* Opens the store read-only. The directory must exist (a typo must not serve an empty store); an
 * empty directory is initialised once (read-write, then closed) so qinsd can start before the
 * first import. 0, or -1 (logged). */
static int open_store(void) {
  const char *dir = qd_srv.cfg.store;
  struct stat sst;
  if (stat(dir, &sst) != 0 || !S_ISDIR(sst.st_mode)) {
    qd_log(QD_LOG_WARNING, "store %s: not a directory (%s); create it or import a model first", dir,
           strerror(errno ? errno : ENOTDIR));
    return -1;
  }
  char mdb[4200];
  snprintf(mdb, sizeof mdb, "%s/data.mdb", dir);
  int rc = 0;
  /* Files qinsd creates (an empty store; lock.mdb when missing): 0600, or 0640 in store-group. */
  qs_open_opts oo = {.group_read = 1, .gid = (long)qd_srv.cfg.store_gid};
  const qs_open_opts *o = qd_srv.cfg.store_group && *qd_srv.cfg.store_group ? &oo : NULL;
  if (access(mdb, F_OK) != 0) {
    qs_store *init;
    rc = qs_open_ex(&init, dir, QS_OPEN_CREATE, o);
    if (rc == 0) {
      qs_close(init);
      qd_log(QD_LOG_NOTICE, "store %s: initialised an empty store", dir);
    }
  }
  if (rc == 0) rc = qs_open_ex(&qd_srv.store, dir, QS_OPEN_RDONLY, o);
  if (rc) {
    qd_log(QD_LOG_WARNING, "store %s: cannot open: %s: %s", dir, qins_strerror(rc), qs_error());
    return -1;
  }
  char msg[1024];
  if (qs_store_warnings(qd_srv.store, msg, sizeof msg)) {
    size_t n = strlen(msg);
    while (n && msg[n - 1] == ' ') msg[--n] = '\0';
    qd_log(QD_LOG_WARNING, "%s", msg);
  }
  return 0;
}

/* Every second while serving: the store is still what was opened (qs_store_check: lock.mdb not
 * removed or replaced, data.mdb not cut short). On a failure store methods get its code and
 * message (conn.c) instead of reading through a broken reader table; a lost lock file stays lost
 * until qinsd restarts. Logged when it starts and when it ends. */
static void on_tick(uv_timer_t *t) {
  (void)t;
  int rc = qs_store_check(qd_srv.store);
  if (rc && !qd_srv.store_err) {
    snprintf(qd_srv.store_msg, sizeof qd_srv.store_msg, "%s", qs_error());
    qd_log(QD_LOG_WARNING, "store check failed: %s: %s; store methods get %s until this is "
           "fixed (restart qinsd)", qins_err_name(rc), qd_srv.store_msg, qins_err_name(rc));
  } else if (!rc && qd_srv.store_err) {
    qd_log(QD_LOG_NOTICE, "store check passes again: serving the store");
  }
  qd_srv.store_err = rc;
  qd_conn_sweep_idle(qd_now_ns());
  qd_log_flush(0);
}

int qd_server_run(void) {
  signal(SIGPIPE, SIG_IGN);
  char th[32];
  snprintf(th, sizeof th, "%llu", (unsigned long long)qd_srv.cfg.threads);
  setenv("UV_THREADPOOL_SIZE", th, 1); /* read once, at the first uv_queue_work */
  if (qd_stats_init()) return 1;
  qd_srv.loop = uv_default_loop();
  if (open_store()) {
    qd_stats_fini();
    return 1;
  }
  qd_log(QD_LOG_NOTICE, "%s: store %s open; pid %d uid %u", QD_SERVER_NAME, qd_srv.cfg.store,
         (int)getpid(), (unsigned)getuid());
  uv_loop_t *loop = qd_srv.loop;
  uv_timer_init(loop, &qd_srv.lp.shutdown_timer);
  uv_timer_init(loop, &qd_srv.lp.tick);
  uv_timer_start(&qd_srv.lp.tick, on_tick, 1000, 1000);
  uv_signal_init(loop, &qd_srv.lp.sig_term);
  uv_signal_init(loop, &qd_srv.lp.sig_int);
  uv_signal_init(loop, &qd_srv.lp.sig_hup);
  uv_signal_start(&qd_srv.lp.sig_term, on_signal, SIGTERM);
  uv_signal_start(&qd_srv.lp.sig_int, on_signal, SIGINT);
  uv_signal_start(&qd_srv.lp.sig_hup, on_signal, SIGHUP);
  qd_srv.lp.signals = 1;
  int rc = rset_open();
  if (rc) qd_log(QD_LOG_WARNING, "cannot create the read set (epoll): %s", strerror(-rc));
  if (rc || listen_socket()) {
    if (qd_srv.lp.rset_fd >= 0) close(qd_srv.lp.rset_fd);
    qd_srv.lp.rset_fd = -1;
    qd_srv.stopping = 1;
    close_handle((uv_handle_t *)&qd_srv.lp.tick);
    shutdown_finish();
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    qs_close(qd_srv.store);
    qd_stats_fini();
    return 1;
  }
  fd_budget();
  serve_loop();
  close(qd_srv.lp.rset_fd);
  qd_srv.lp.rset_fd = -1;
  int lc = uv_loop_close(loop);
  if (lc) qd_log(QD_LOG_WARNING, "loop closed with handles open: %s", uv_strerror(lc));
  qs_close(qd_srv.store);
  qd_log_flush(1);
  qd_log(QD_LOG_NOTICE, "exited %s: %llu requests, %llu bytes served",
         qd_srv.lp.failed ? "after a loop failure" : "cleanly",
         (unsigned long long)qd_srv.st.requests_total, (unsigned long long)qd_srv.st.bytes_served);
  qd_stats_fini();
  return qd_srv.lp.failed ? 1 : 0;
}

/* ---- embedding: one client's byte stream with no socket (fuzzing; qinsd.h) ------------------- */
int qd_embed_init(void) {
  if (qd_srv.loop) return 0;
  if (qd_stats_init()) return QINS_ENOMEM;
  qd_srv.loop = uv_default_loop();
  return 0;
}

void qd_embed_fini(void) {
  if (!qd_srv.loop) return;
  uv_run(qd_srv.loop, UV_RUN_DEFAULT);
  uv_loop_close(qd_srv.loop);
  qd_stats_fini();
  qd_srv.loop = NULL;
}

/* The connection numbered id, or NULL once it was freed (a loop run may free it). */
static qd_conn *conn_by_id(uint64_t id) {
  for (qd_conn *c = qd_srv.cn.all; c; c = c->next)
    if (c->id == id) return c;
  return NULL;
}

static int conn_open(const qd_conn *c) {
  return c->state == CONN_PAUSED || c->state == CONN_READING;
}

int qd_serve_bytes(const void *in, size_t len, size_t piece, qd_sink_fn sink, void *ud) {
  qd_conn *c = qd_conn_new();
  if (!c) return QINS_ENOMEM;
  uv_pipe_init(qd_srv.loop, &c->pipe, 0); /* never opened: reads and writes go through here */
  c->pipe.data = c;
  c->pid = getpid();
  c->uid = (uid_t)-1; /* no credentials: admin methods are refused */
  c->gid = (gid_t)-1;
  c->sink = sink;
  c->sink_ud = ud;
  snprintf(c->desc, sizeof c->desc, "client %llu (embedded)", (unsigned long long)c->id);
  qd_srv.st.connections++;
  qd_srv.st.connections_total++;
  const uint64_t id = c->id;
  const char *p = in;
  if (piece == 0) piece = len ? len : 1;
  /* Reads happen only while the connection wants them (backpressure), as with a socket. */
  while ((c = conn_by_id(id)) && conn_open(c)) {
    if (!qd_conn_can_dispatch(c)) {
      if (uv_run(qd_srv.loop, UV_RUN_ONCE) == 0 && (c = conn_by_id(id)) &&
          !qd_conn_can_dispatch(c) && conn_open(c))
        return QINS_EINTERNAL; /* paused with nothing left to resume it */
      continue;
    }
    if (len == 0) {
      qd_conn_on_bytes(c, UV_EOF);
      break;
    }
    uv_buf_t b;
    qd_conn_alloc(c, &b);
    size_t n = len < piece ? len : piece;
    if (n > b.len) n = b.len;
    if (n == 0) { /* libuv reports an empty buffer as UV_ENOBUFS */
      qd_conn_on_bytes(c, UV_ENOBUFS);
      break;
    }
    memcpy(b.base, p, n);
    p += n;
    len -= n;
    qd_conn_on_bytes(c, (ssize_t)n);
  }
  /* Every answer goes out, then the connection closes by itself. */
  while ((c = conn_by_id(id)))
    if (uv_run(qd_srv.loop, UV_RUN_ONCE) == 0 && (c = conn_by_id(id)) &&
        c->state != CONN_CLOSING && c->state != CONN_CLOSED)
      return QINS_EINTERNAL; /* would stay open forever after its client's end of stream */
  return 0;
}
