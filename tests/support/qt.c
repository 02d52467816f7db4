/* SPDX-License-Identifier: MIT */
/*
 * qt.c — test support for store/importer tests: see qt.h.
 */
#include "qt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lmdb.h>

extern char **environ;

static void qt_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n) {
  if (*len + n + 1 > *cap) {
    size_t nc = *cap ? *cap * 2 : 4096;
    while (nc < *len + n + 1) nc *= 2;
    *buf = realloc(*buf, nc);
    *cap = nc;
  }
  memcpy(*buf + *len, p, n);
  *len += n;
  (*buf)[*len] = 0;
}

int qt_run(char *const argv[], char *const env_extra[], char **out, char **err) {
  int po[2], pe[2];
  if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC)) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    dup2(po[1], 1);
    dup2(pe[1], 2);
    for (size_t i = 0; env_extra && env_extra[i]; i++) putenv(env_extra[i]);
    execv(argv[0], argv);
    fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  close(po[1]);
  close(pe[1]);
  char *ob = NULL, *eb = NULL;
  size_t ol = 0, oc = 0, el = 0, ec = 0;
  qt_append(&ob, &ol, &oc, "", 0);
  qt_append(&eb, &el, &ec, "", 0);
  struct pollfd fds[2] = {{po[0], POLLIN, 0}, {pe[0], POLLIN, 0}};
  int open_n = 2;
  while (open_n) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; i++) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char b[65536];
      ssize_t r = read(fds[i].fd, b, sizeof b);
      if (r <= 0) {
        close(fds[i].fd);
        fds[i].fd = -1;
        open_n--;
        continue;
      }
      if (i == 0) qt_append(&ob, &ol, &oc, b, (size_t)r);
      else qt_append(&eb, &el, &ec, b, (size_t)r);
    }
  }
  int st;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
  if (out) *out = ob; else free(ob);
  if (err) *err = eb; else free(eb);
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return -1;
}

int qt_vctl(const char *store, char **out, char **err, va_list ap) {
  char bin[4096];
  qt_bin("qinsctl", bin, sizeof bin);
  char *argv[24] = {bin, "--store", (char *)store};
  int n = 3;
  for (const char *a; n < 23 && (a = va_arg(ap, const char *));) argv[n++] = (char *)a;
  argv[n] = NULL;
  return qt_run(argv, NULL, out, err);
}

int qt_ctl(const char *store, char **out, char **err, ...) {
  va_list ap;
  va_start(ap, err);
  int rc = qt_vctl(store, out, err, ap);
  va_end(ap);
  return rc;
}

const char *qt_bin(const char *name, char *buf, size_t cap) {
  const char *b = getenv("QINS_BUILD");
  snprintf(buf, cap, "%s/%s", b && *b ? b : "build", name);
  return buf;
}

const char *qt_shared(const char *rel, char *buf, size_t cap) {
  const char *s = getenv("QINS_SHARED");
  snprintf(buf, cap, "%s/%s", s && *s ? s : QINS_SHARED_DIR, rel);
  return buf;
}

int qt_tmpdir(char *buf) {
  strcpy(buf, "/tmp/qins-XXXXXX");
  return mkdtemp(buf) ? 0 : -1;
}

void qt_rmrf(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) {
    unlink(dir);
    return;
  }
  struct dirent *e;
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    struct stat st;
    if (!lstat(p, &st) && S_ISDIR(st.st_mode)) qt_rmrf(p);
    else unlink(p);
  }
  closedir(d);
  rmdir(dir);
}

int qt_write(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  size_t w = len ? fwrite(data, 1, len, f) : 0;
  return fclose(f) || w != len ? -1 : 0;
}

char *qt_cat(char *a, char *b) {
  size_t la = strlen(a), lb = strlen(b);
  char *s = malloc(la + lb + 1);
  if (s) {
    memcpy(s, a, la);
    memcpy(s + la, b, lb + 1);
  }
  free(a);
  free(b);
  return s;
}

char *qt_read(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
    free(b);
    b = NULL;
  }
  fclose(f);
  if (b) b[n] = 0;
  if (b && len) *len = (size_t)n;
  return b;
}

void qt_put(qt_buf *b, const void *d, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 64;
    b->p = realloc(b->p, b->cap);
  }
  memcpy(b->p + b->n, d, n);
  b->n += n;
}
void qt_put_u32(qt_buf *b, uint32_t v) { qt_put(b, &v, 4); }
void qt_put_u64(qt_buf *b, uint64_t v) { qt_put(b, &v, 8); }
void qt_put_gstr(qt_buf *b, const char *s) {
  qt_put_u64(b, strlen(s));
  qt_put(b, s, strlen(s));
}

int qt_st_write(const char *path, const qt_tensor *t, size_t n, const char *metadata_json) {
  qs_st_entry *e = calloc(n + 1, sizeof *e);
  for (size_t i = 0; i < n; i++) {
    e[i].name = t[i].name;
    e[i].dtype = t[i].dtype;
    e[i].ndim = t[i].ndim;
    e[i].shape = t[i].shape;
    e[i].nbytes = t[i].nbytes;
  }
  uint8_t *h;
  size_t hl;
  int rc = qs_st_header_build(e, n, metadata_json, &h, &hl);
  free(e);
  if (rc) return -1;
  FILE *f = fopen(path, "wb");
  if (!f) {
    free(h);
    return -1;
  }
  int bad = fwrite(h, 1, hl, f) != hl;
  for (size_t i = 0; i < n; i++)
    if (t[i].nbytes && fwrite(t[i].data, 1, t[i].nbytes, f) != t[i].nbytes) bad = 1;
  free(h);
  return fclose(f) || bad ? -1 : 0;
}

void qt_fill_gauss(float *x, uint64_t n, uint64_t seed, float scale) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (uint64_t i = 0; i < n; i++) {
    /* Sum of 4 uniforms: close enough to Gaussian for codec inputs, and cheap. */
    float acc = 0;
    for (int k = 0; k < 4; k++) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      acc += (float)((s >> 11) * (1.0 / 9007199254740992.0)) - 0.5f;
    }
    x[i] = acc * scale * 1.7320508f;
  }
}

long long qt_db_entries(const char *store, const char *db) {
  int p[2];
  if (pipe2(p, O_CLOEXEC)) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) { /* the env is opened (read-only) in this child only, which then exits */
    long long n = -1;
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_stat st;
    if (!mdb_env_create(&env) && !mdb_env_set_maxdbs(env, 8) &&
        !mdb_env_open(env, store, MDB_RDONLY, 0) && !mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)) {
      if (!mdb_dbi_open(txn, db, 0, &dbi) && !mdb_stat(txn, dbi, &st)) n = (long long)st.ms_entries;
      mdb_txn_abort(txn);
    }
    if (write(p[1], &n, sizeof n) != sizeof n) _exit(1);
    _exit(0);
  }
  close(p[1]);
  long long n = -1;
  if (read(p[0], &n, sizeof n) != sizeof n) n = -1;
  close(p[0]);
  int st;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
  return n;
}

char **qt_env_preload(const char *const *extra) {
  static char pre[4200], asan[512];
  char so[4096];
  snprintf(pre, sizeof pre, "LD_PRELOAD=%s", qt_bin("tests/fault.so", so, sizeof so));
  /* An ASan build must accept a preloaded library that is not ASan's runtime. */
  const char *a = getenv("ASAN_OPTIONS");
  snprintf(asan, sizeof asan, "ASAN_OPTIONS=%s%sverify_asan_link_order=0", a ? a : "",
           a && *a ? ":" : "");
  size_t n = 0;
  while (extra && extra[n]) n++;
  char **env = calloc(n + 3, sizeof *env);
  env[0] = pre;
  env[1] = asan;
  for (size_t i = 0; i < n; i++) env[2 + i] = (char *)extra[i];
  return env;
}

int qt_st_write_gauss(const char *path, int nt, uint64_t rows, uint64_t cols, uint64_t seed) {
  qt_tensor t[16];
  char names[16][16];
  if (nt < 1 || nt > 16) return -1;
  for (int i = 0; i < nt; i++) {
    float *w = malloc(rows * cols * sizeof *w);
    qt_fill_gauss(w, rows * cols, seed + (uint64_t)i, 0.05f);
    snprintf(names[i], sizeof names[i], "w%d", i);
    t[i] = (qt_tensor){names[i], QS_ST_F32, 2, {rows, cols}, w, rows * cols * 4};
  }
  int rc = qt_st_write(path, t, (size_t)nt, NULL);
  for (int i = 0; i < nt; i++) free((void *)t[i].data);
  return rc;
}
