/* SPDX-License-Identifier: MIT */
/*
 * daemon.c — test support for starting qinsd and speaking raw msgpack-RPC to it (daemon.h).
 * STYLE.md 21: mkdtemp under /tmp, fork+exec, poll connect+ping every 10 ms up to 10 s, SIGTERM then
 * a timed wait then SIGKILL, remove the dir, dump the log on failure. The daemon child gets
 * PR_SET_PDEATHSIG(SIGKILL) so no test, however it dies, leaves a qinsd running.
 */
#include "daemon.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

const char *ts_build_path(const char *name, char *buf, size_t cap) {
  const char *b = getenv("QINS_BUILD");
  snprintf(buf, cap, "%s/%s", b && *b ? b : "build", name);
  return buf;
}

int ts_dir_make(ts_daemon *d) {
  memset(d, 0, sizeof *d);
  snprintf(d->dir, sizeof d->dir, "/tmp/qins-XXXXXX");
  if (!mkdtemp(d->dir)) return -errno;
  snprintf(d->sock, sizeof d->sock, "%s/s", d->dir);
  snprintf(d->store, sizeof d->store, "%s/store", d->dir);
  snprintf(d->log, sizeof d->log, "%s/log", d->dir);
  if (mkdir(d->store, 0700) != 0) return -errno;
  return 0;
}

void ts_log_dump(const ts_daemon *d) {
  FILE *f = fopen(d->log, "r");
  if (!f) return;
  fprintf(stderr, "---- qinsd log %s ----\n", d->log);
  char line[1024];
  while (fgets(line, sizeof line, f)) fputs(line, stderr);
  fprintf(stderr, "---- end of log ----\n");
  fclose(f);
}

int ts_connect(const char *path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  return fd;
}

int ts_send(int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

void ts_rx_init(ts_rx *rx, int fd) {
  rx->fd = fd;
  msgpack_unpacker_init(&rx->up, 1 << 16);
  msgpack_unpacked_init(&rx->res);
}

void ts_rx_destroy(ts_rx *rx) {
  msgpack_unpacked_destroy(&rx->res);
  msgpack_unpacker_destroy(&rx->up);
  if (rx->fd >= 0) close(rx->fd);
  rx->fd = -1;
}

int ts_rx_next(ts_rx *rx, int timeout_ms, const msgpack_object **out) {
  uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
  for (;;) {
    msgpack_unpack_return r = msgpack_unpacker_next(&rx->up, &rx->res);
    if (r == MSGPACK_UNPACK_SUCCESS) {
      *out = &rx->res.data;
      return 1;
    }
    if (r < 0) return -1;
    uint64_t now = now_ms();
    if (now >= deadline) return -1;
    struct pollfd pf = {rx->fd, POLLIN, 0};
    int pr = poll(&pf, 1, (int)(deadline - now));
    if (pr < 0 && errno == EINTR) continue;
    if (pr <= 0) return -1;
    if (!msgpack_unpacker_reserve_buffer(&rx->up, 1 << 16)) return -1;
    ssize_t n = recv(rx->fd, msgpack_unpacker_buffer(&rx->up), msgpack_unpacker_buffer_capacity(&rx->up), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) return 0;
    msgpack_unpacker_buffer_consumed(&rx->up, (size_t)n);
  }
}

void ts_req_begin(msgpack_sbuffer *sb, msgpack_packer *pk, uint32_t msgid, const char *method,
                  int nkeys) {
  msgpack_sbuffer_init(sb);
  msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
  qp_pack_request(pk, msgid, method);
  if (nkeys < 0) {
    msgpack_pack_array(pk, 0);
  } else {
    msgpack_pack_array(pk, 1);
    msgpack_pack_map(pk, (size_t)nkeys);
  }
}

const msgpack_object *ts_call(ts_rx *rx, const msgpack_sbuffer *sb, uint32_t msgid) {
  if (ts_send(rx->fd, sb->data, sb->size)) return NULL;
  const msgpack_object *o;
  for (;;) {
    if (ts_rx_next(rx, 30000, &o) != 1) return NULL;
    if (o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size == 4 &&
        o->via.array.ptr[1].type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
        o->via.array.ptr[1].via.u64 == msgid)
      return o;
  }
}

int ts_resp_code(const msgpack_object *resp) {
  const msgpack_object *e = &resp->via.array.ptr[2];
  if (e->type == MSGPACK_OBJECT_NIL) return 0;
  if (e->type != MSGPACK_OBJECT_ARRAY || e->via.array.size != 2) return 1; /* malformed */
  const msgpack_object *c = &e->via.array.ptr[0];
  if (c->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) return (int)c->via.i64;
  return 1;
}

const char *ts_resp_msg(const msgpack_object *resp) {
  static char buf[600];
  buf[0] = '\0';
  const msgpack_object *e = &resp->via.array.ptr[2];
  if (e->type == MSGPACK_OBJECT_ARRAY && e->via.array.size == 2 &&
      e->via.array.ptr[1].type == MSGPACK_OBJECT_STR) {
    size_t n = e->via.array.ptr[1].via.str.size;
    if (n >= sizeof buf) n = sizeof buf - 1;
    memcpy(buf, e->via.array.ptr[1].via.str.ptr, n);
    buf[n] = '\0';
  }
  return buf;
}

const msgpack_object *ts_resp_result(const msgpack_object *resp) { return &resp->via.array.ptr[3]; }

int ts_ping(const char *sock) {
  int fd = ts_connect(sock);
  if (fd < 0) return fd;
  ts_rx rx;
  ts_rx_init(&rx, fd);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, 1, "ping", -1);
  const msgpack_object *r = ts_call(&rx, &sb, 1);
  int ok = r && ts_resp_code(r) == 0 && qp_obj_str_eq(ts_resp_result(r), "pong");
  msgpack_sbuffer_destroy(&sb);
  ts_rx_destroy(&rx);
  return ok ? 0 : -1;
}

int ts_daemon_start(ts_daemon *d, const char *const *extra) {
  char bin[512];
  ts_build_path("qinsd", bin, sizeof bin);
  const char *argv[64];
  int n = 0;
  argv[n++] = bin;
  argv[n++] = "--socket";
  argv[n++] = d->sock;
  argv[n++] = "--store";
  argv[n++] = d->store;
  argv[n++] = "--log";
  argv[n++] = d->log;
  argv[n++] = "--log-level";
  argv[n++] = "verbose";
  for (int i = 0; extra && extra[i] && n < 62; i++) argv[n++] = extra[i];
  argv[n] = NULL;
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    int nul = open("/dev/null", O_RDWR);
    if (nul >= 0) {
      dup2(nul, 0);
      dup2(nul, 1);
    }
    execv(bin, (char *const *)argv);
    fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
    _exit(127);
  }
  d->pid = pid;
  uint64_t deadline = now_ms() + 10000;
  while (now_ms() < deadline) {
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      d->pid = 0;
      fprintf(stderr, "qinsd exited during startup (status 0x%x)\n", st);
      ts_log_dump(d);
      return -1;
    }
    if (ts_ping(d->sock) == 0) return 0;
    sleep_ms(10);
  }
  fprintf(stderr, "qinsd did not answer ping within 10 s\n");
  ts_log_dump(d);
  ts_daemon_stop(d);
  return -1;
}

int ts_daemon_wait(ts_daemon *d, int timeout_ms) {
  if (d->pid <= 0) return -1;
  uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
  for (;;) {
    int st;
    pid_t r = waitpid(d->pid, &st, WNOHANG);
    if (r == d->pid) {
      d->pid = 0;
      return st;
    }
    if (r < 0) {
      d->pid = 0;
      return -1;
    }
    if (now_ms() >= deadline) return -1;
    sleep_ms(10);
  }
}

int ts_daemon_stop(ts_daemon *d) {
  if (d->pid <= 0) return -1;
  kill(d->pid, SIGTERM);
  /* qinsd cuts connections still busy after its shutdown-timeout-ms (10 s by default). */
  int st = ts_daemon_wait(d, 15000);
  if (d->pid > 0) {
    fprintf(stderr, "qinsd %d ignored SIGTERM for 15 s: SIGKILL\n", (int)d->pid);
    kill(d->pid, SIGKILL);
    waitpid(d->pid, &st, 0);
    d->pid = 0;
    return -1;
  }
  return st;
}

static void rm_tree(const char *path) {
  DIR *dir = opendir(path);
  if (!dir) {
    unlink(path);
    return;
  }
  struct dirent *e;
  while ((e = readdir(dir))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    char p[512];
    snprintf(p, sizeof p, "%s/%s", path, e->d_name);
    struct stat st;
    if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) rm_tree(p);
    else unlink(p);
  }
  closedir(dir);
  rmdir(path);
}

void ts_dir_remove(ts_daemon *d, int dump_log) {
  if (d->pid > 0) ts_daemon_stop(d);
  if (dump_log) ts_log_dump(d);
  if (d->dir[0]) rm_tree(d->dir);
  d->dir[0] = '\0';
}

/* ---- store filling ---------------------------------------------------------------------------- */
int ts_store_fill(const char *store_dir, ts_fill_fn fn, void *ud) {
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    qs_store *s;
    int rc = qs_open(&s, store_dir, QS_OPEN_CREATE);
    if (rc) {
      fprintf(stderr, "ts_store_fill: qs_open %s: %s: %s\n", store_dir, qins_strerror(rc), qs_error());
      _exit(3);
    }
    rc = fn(s, ud);
    if (rc) fprintf(stderr, "ts_store_fill: %s: %s\n", qins_strerror(rc), qs_error());
    qs_close(s);
    _exit(rc ? 4 : 0);
  }
  int st;
  while (waitpid(pid, &st, 0) < 0)
    if (errno != EINTR) return -1;
  return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static int import_rows(qs_import *im, const qs_tensor_desc *desc, const void *data, size_t esize) {
  int rc = qs_import_tensor_begin(im, desc);
  if (rc) return rc;
  uint64_t row_len = desc->ndim ? desc->shape[desc->ndim - 1] : 1;
  uint64_t n_rows = 1;
  for (int i = 0; i + 1 < desc->ndim; i++) n_rows *= desc->shape[i];
  if (desc->ndim == 0) n_rows = 1;
  uint64_t per = qs_import_chunk_rows(im);
  if (per == 0) per = n_rows ? n_rows : 1;
  for (uint64_t r = 0; r < n_rows; r += per) {
    uint64_t k = n_rows - r < per ? n_rows - r : per;
    rc = qs_import_tensor_rows(im, (const char *)data + r * row_len * esize, k, NULL);
    if (rc) return rc;
  }
  return qs_import_tensor_end(im, NULL);
}

int ts_import_f32(qs_import *im, const char *name, int ndim, const uint64_t *shape, int codec,
                  const float *data) {
  qs_tensor_desc desc;
  memset(&desc, 0, sizeof desc);
  desc.name = name;
  desc.src_dtype = QS_DT_F32;
  desc.ndim = ndim;
  for (int i = 0; i < ndim; i++) desc.shape[i] = shape[i];
  desc.codec = codec;
  qc_params p;
  memset(&p, 0, sizeof p);
  p.codec = (qc_codec)codec;
  uint64_t row_len = ndim ? shape[ndim - 1] : 1, n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  if (codec != QC_F32 && codec != QC_F16 && codec != QC_BF16) {
    qc_fit *f;
    int rc = qc_fit_new((qc_codec)codec, row_len, NULL, &f);
    if (rc) return rc;
    rc = qc_fit_add(f, data, row_len ? n / row_len : 0, NULL);
    if (!rc) rc = qc_fit_finish(f, &p);
    qc_fit_free(f);
    if (rc) return rc;
  }
  desc.params = &p;
  return import_rows(im, &desc, data, sizeof(float));
}

int ts_import_i32(qs_import *im, const char *name, int ndim, const uint64_t *shape,
                  const int32_t *data) {
  qs_tensor_desc desc;
  memset(&desc, 0, sizeof desc);
  desc.name = name;
  desc.src_dtype = QS_DT_I32;
  desc.ndim = ndim;
  for (int i = 0; i < ndim; i++) desc.shape[i] = shape[i];
  desc.codec = QS_RAW;
  desc.params = NULL;
  return import_rows(im, &desc, data, sizeof(int32_t));
}

float ts_value(uint64_t seed, uint64_t i) {
  uint64_t x = (seed + 1) * 0x9E3779B97F4A7C15ull ^ (i * 0xBF58476D1CE4E5B9ull);
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  /* Values in about [-2, 2] with varied exponents, never NaN/Inf. */
  double u = (double)(x >> 11) / 9007199254740992.0;
  return (float)((u - 0.5) * 4.0 * ((x & 7) == 0 ? 0.001 : 1.0));
}
