/* SPDX-License-Identifier: MIT */
/*
 * cmd_pull.c — portable model files in qinsctl (docs/qinsctl.md "export --format qins", "import
 * FILE.qins", "pull"): writing and reading .qins files (store.h qs_qfile_*), and `pull URL`, which
 * fetches one over HTTP(S) or file:// with libcurl and imports it.
 *
 * pull: the header and index come first (one range request each); the file's identity is its
 * index's SHA-256, so STORE/pull/<id>.part (the file being assembled, sparse) and <id>.map (one byte
 * per piece: 1 = verified and written) resume any later pull of the same file, from any URL. They are
 * created only once the header and index are known good, and removed again by a pull that fails
 * having verified nothing (with STORE itself if the pull made it): a failed pull leaves no trace
 * but the verified pieces it keeps for the next one.
 *
 * The missing pieces are cut into spans fetched by up to --connections parallel range requests, one
 * thread and one libcurl easy handle each, so the per-byte work (SHA-256, the write into the .part
 * file) runs on every core: each thread hashes the bytes straight from libcurl's buffer as they
 * arrive, checks the piece's SHA-256 as its last byte arrives, then writes the piece in place in the
 * .part file (one call) and marks it in the map.
 * A transfer cut anywhere (server gone, qinsctl SIGKILLed) loses at most the pieces in flight.
 * With --sha256 the whole file's SHA-256 is computed meanwhile by one more thread, in file order,
 * from the .part file mapped read-only as the pieces verify, and checked before the store is opened.
 * Memory: one piece buffer per connection plus the index and map, whatever the model's size.
 * Dropped connections, timeouts and 5xx answers are retried with exponential backoff (--retries);
 * 4xx answers, TLS failures and checksum failures are not. When every piece is in, the .part file is
 * imported (qs_qfile_import: records checked; the pieces are not hashed again) and the model
 * published in one commit; until then the store's models are untouched. The staging files are
 * removed after a successful import.
 */
#include <curl/curl.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "qins.h"
#include "qinsctl.h"
#include "store.h"

/* ---------------------------------------------------------------------------------------------
 * export --format qins, import FILE.qins */
typedef struct qctl_bar {
  int tty;
  double t0, last;
  const char *verb;
} qctl_bar;

static void qctl_bar_cb(void *ud, uint64_t done, uint64_t total, const char *what) {
  (void)what;
  qctl_bar *b = ud;
  if (!b->tty) return;
  double now = qctl_now();
  if (now - b->last < 0.2 && done != total) return;
  b->last = now;
  char x[32], y[32];
  double rate = now > b->t0 ? (double)done / (now - b->t0) / 1e6 : 0;
  fprintf(stderr, "\r%s %5.1f%%  %s / %s  %.1f MB/s   ", b->verb,
          total ? 100.0 * (double)done / (double)total : 100.0, qctl_human(done, x, sizeof x),
          qctl_human(total, y, sizeof y), rate);
}

static void qctl_bar_end(const qctl_bar *b) {
  if (b->tty) fprintf(stderr, "\r%90s\r", "");
}

int qctl_export_qins(qctl_ctx *c, const char *model, const char *path, uint64_t piece_size) {
  qs_store *s;
  int rc = qctl_open(c, &s, QS_OPEN_RDONLY);
  if (rc) return rc;
  qctl_bar b = {isatty(2), qctl_now(), 0, "export"};
  qs_qfile_info info;
  int e = qs_qfile_export(s, model, path, piece_size, qctl_bar_cb, &b, &info);
  qctl_bar_end(&b);
  if (e) {
    rc = qctl_fail(c, "%s", qs_error());
    qs_close(s);
    return rc;
  }
  char hex[65];
  qs_hex(info.sha256, 32, hex);
  if (c->json) {
    printf("{\"model\":");
    qctl_jstr(stdout, model);
    printf(",\"path\":");
    qctl_jstr(stdout, path);
    printf(",\"format\":\"qins\",\"file_bytes\":%llu,\"pieces\":%llu,\"piece_size\":%llu,"
           "\"sha256\":\"%s\"}\n",
           (unsigned long long)info.file_bytes, (unsigned long long)info.n_pieces,
           (unsigned long long)info.piece_size, hex);
  } else {
    char h[32];
    printf("exported %s to %s (qins, %s, %llu pieces)\nsha256 %s\n", model, path,
           qctl_human(info.file_bytes, h, sizeof h), (unsigned long long)info.n_pieces, hex);
  }
  qs_close(s);
  return QCTL_OK;
}

static void qctl_print_qimport(const qctl_ctx *c, const qs_import_result *res, double dt,
                               const char *extra_json) {
  if (c->json) {
    printf("{\"model\":");
    qctl_jstr(stdout, res->model);
    printf(",\"n_tensors\":%llu,\"elements\":%llu,\"source_bytes\":%llu,\"stored_bytes\":%llu,"
           "\"seconds\":",
           (unsigned long long)res->n_tensors, (unsigned long long)res->n_elem,
           (unsigned long long)res->src_bytes, (unsigned long long)res->stored_bytes);
    qctl_jnum(stdout, dt);
    printf("%s}\n", extra_json ? extra_json : "");
  } else {
    char a[32];
    printf("imported %s: %llu tensors, %s stored, as encoded (no re-encoding), %.2f s\n", res->model,
           (unsigned long long)res->n_tensors, qctl_human(res->stored_bytes, a, sizeof a), dt);
  }
}

int qctl_import_qins(qctl_ctx *c, const char *path, const char *model) {
  qs_store *s;
  int rc = qctl_open(c, &s, QS_OPEN_CREATE);
  if (rc) return rc;
  qctl_bar b = {isatty(2), qctl_now(), 0, "import"};
  qs_qfile_import_opts o;
  qs_qfile_import_opts_init(&o);
  o.model = model;
  o.progress = qctl_bar_cb;
  o.progress_ud = &b;
  qs_import_result res;
  double t0 = qctl_now();
  int e = qs_qfile_import(s, path, &o, &res);
  qctl_bar_end(&b);
  if (e) rc = qctl_fail(c, "%s", qs_error());
  else qctl_print_qimport(c, &res, qctl_now() - t0, NULL);
  qs_close(s);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * pull */
#define QP_SPAN_PIECES 16 /* pieces per range request at most (fewer when connections are idle) */

typedef struct qp_opts {
  const char *url, *model, *cacert;
  uint8_t sha[32];
  int have_sha, conns, retries;
  long connect_timeout, low_speed_time;
} qp_opts;

typedef struct qp_span {
  uint64_t first, end; /* pieces [first, end) */
  int attempt;
  double not_before;   /* monotonic seconds: retry backoff */
} qp_span;

/* The pull's shared state. The fields below mu are guarded by it; the connection threads and the
 * whole-file hasher wait on cv for a span to be queued, a request to end or a piece to verify. */
typedef struct qp {
  const qp_opts *o;
  qctl_ctx *c;
  qs_qfile_header h;
  uint8_t *index;
  int part_fd, map_fd;
  const uint8_t *part;     /* the .part file mapped read-only (resume check, whole-file SHA-256) */
  EVP_MD_CTX *whole;       /* the whole file's SHA-256 in file order (--sha256), or NULL */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint8_t *map;            /* n_pieces bytes: 1 = verified and written */
  qp_span *queue;          /* spans waiting */
  size_t nq, capq;
  int active;              /* requests running */
  int done;                /* the connection threads have ended */
  uint64_t have, have_bytes, fetched_pieces, reused_pieces, fetched_bytes, retries;
  int failed;              /* fatal: stop everything (read without mu by the write callbacks) */
  char err[512];
  qctl_bar bar;
} qp;

/* One connection: a thread with its own easy handle, taking spans from the queue. The body bytes
 * are hashed straight from libcurl's buffer as they arrive and gathered in buf (libcurl hands them
 * over 16 KiB at a time), which is written to the .part file in one call once its SHA-256 matched,
 * then marked in the map: the .part file never holds an unverified byte where the map says 1. */
typedef struct qp_xfer {
  qp *p;
  pthread_t thr;
  CURL *e;
  EVP_MD_CTX *md;          /* SHA-256 of the piece being filled */
  uint8_t *buf;            /* the piece being filled (piece_size bytes) */
  qp_span sp;
  uint64_t piece;          /* piece being filled */
  uint64_t fill;           /* its bytes so far */
  uint64_t got;            /* bytes received in this request */
  long http;               /* status */
  int bad;                 /* this request broke a rule (oversize, checksum): fatal set in p */
  char errbuf[CURL_ERROR_SIZE];
} qp_xfer;

static void qp_fatal(qp *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void qp_fatal(qp *p, const char *fmt, ...) {
  pthread_mutex_lock(&p->mu);
  if (!p->failed) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof p->err, fmt, ap);
    va_end(ap);
    __atomic_store_n(&p->failed, 1, __ATOMIC_RELEASE);
  }
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
}

static int qp_failed(qp *p) { return __atomic_load_n(&p->failed, __ATOMIC_ACQUIRE); }

static uint64_t qp_piece_off(const qp *p, uint64_t i) { return p->h.data_off + i * p->h.piece_size; }
static uint64_t qp_piece_len(const qp *p, uint64_t i) {
  uint64_t off = qp_piece_off(p, i), n = p->h.file_bytes - off;
  return n < p->h.piece_size ? n : p->h.piece_size;
}

static int qp_pwrite(int fd, const void *b, uint64_t n, uint64_t off) {
  const uint8_t *s = b;
  while (n) {
    ssize_t k = pwrite(fd, s, (size_t)n, (off_t)off);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    s += k;
    n -= (uint64_t)k;
    off += (uint64_t)k;
  }
  return 0;
}

/* Common options of every request: URL, timeouts, proxies, CA certificates, no signals. */
static void qp_setup(CURL *e, const qp_opts *o, char *errbuf) {
  curl_easy_setopt(e, CURLOPT_URL, o->url);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, o->connect_timeout);
  curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, o->low_speed_time);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 512L * 1024); /* fewer, larger write callbacks */
  curl_easy_setopt(e, CURLOPT_USERAGENT, "qinsctl-pull/" QINS_VERSION_STRING);
  if (o->cacert) curl_easy_setopt(e, CURLOPT_CAINFO, o->cacert);
  /* libcurl reads only the lower-case http_proxy (httpoxy); fleets set HTTP_PROXY too. */
  const char *hp = getenv("http_proxy");
  if ((!hp || !*hp) && !strncmp(o->url, "http://", 7) && (hp = getenv("HTTP_PROXY")) && *hp) {
    curl_easy_setopt(e, CURLOPT_PROXY, hp);
    const char *np = getenv("no_proxy");
    if (!np || !*np) np = getenv("NO_PROXY");
    if (np && *np) curl_easy_setopt(e, CURLOPT_NOPROXY, np);
  }
}

/* A transient failure: worth retrying. */
static int qp_transient(CURLcode cc, long http) {
  if (cc == CURLE_OK) return http >= 500 || http == 0;
  switch (cc) {
  case CURLE_COULDNT_CONNECT: case CURLE_OPERATION_TIMEDOUT: case CURLE_RECV_ERROR:
  case CURLE_SEND_ERROR: case CURLE_PARTIAL_FILE: case CURLE_GOT_NOTHING:
  case CURLE_COULDNT_RESOLVE_HOST: case CURLE_COULDNT_RESOLVE_PROXY: case CURLE_SSL_CONNECT_ERROR:
  case CURLE_HTTP2: case CURLE_HTTP2_STREAM:
    return 1;
  default: return 0;
  }
}

/* What a failed request says: libcurl's message, tagged when it is a timeout or a TLS failure
 * (then with how to trust a private CA). */
static void qp_curl_msg(CURLcode cc, const char *errbuf, char *out, size_t cap) {
  const char *m = errbuf[0] ? errbuf : curl_easy_strerror(cc);
  switch (cc) {
  case CURLE_OPERATION_TIMEDOUT: snprintf(out, cap, "timed out: %s", m); break;
  case CURLE_PEER_FAILED_VERIFICATION: case CURLE_SSL_CACERT_BADFILE: case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH: case CURLE_SSL_INVALIDCERTSTATUS:
    snprintf(out, cap, "TLS: the server's certificate is not trusted: %s (--cacert FILE, "
                       "CURL_CA_BUNDLE or SSL_CERT_FILE name a CA bundle to trust)", m);
    break;
  case CURLE_SSL_CONNECT_ERROR: snprintf(out, cap, "TLS: %s", m); break;
  default: snprintf(out, cap, "%s", m);
  }
}

static double qp_backoff(int attempt) {
  double d = 0.25;
  for (int i = 0; i < attempt && d < 8; i++) d *= 2;
  return d;
}

/* ---- small blocking fetch (header, index) ---- */
typedef struct qp_mem {
  CURL *e;
  int is_http;
  uint8_t *dst;
  uint64_t want, got;
  uint64_t total;          /* from Content-Range, 0 if none */
} qp_mem;

static size_t qp_mem_write(char *d, size_t sz, size_t n, void *ud) {
  qp_mem *m = ud;
  size_t k = sz * n;
  long http = 0;
  if (m->is_http && (curl_easy_getinfo(m->e, CURLINFO_RESPONSE_CODE, &http), http != 206))
    return http == 200 ? 0 : k; /* 200: the range was ignored (stop); else an error page (drop) */
  if (m->got + k > m->want) return 0; /* more than asked: the server ignored the range */
  memcpy(m->dst + m->got, d, k);
  m->got += k;
  return k;
}

static size_t qp_mem_header(char *d, size_t sz, size_t n, void *ud) {
  qp_mem *m = ud;
  size_t k = sz * n;
  if (k > 14 && !strncasecmp(d, "content-range:", 14)) {
    const char *sl = memchr(d, '/', k);
    if (sl) m->total = strtoull(sl + 1, NULL, 10);
  }
  return k;
}

static int qp_fetch(qp *p, uint64_t off, uint64_t len, uint8_t *dst, uint64_t *total) {
  const qp_opts *o = p->o;
  for (int attempt = 0;; attempt++) {
    CURL *e = curl_easy_init();
    if (!e) return qctl_fail(p->c, "out of memory");
    char errbuf[CURL_ERROR_SIZE] = "", range[64];
    int is_http = !strncmp(o->url, "http", 4);
    qp_mem m = {e, is_http, dst, len, 0, 0};
    qp_setup(e, o, errbuf);
    snprintf(range, sizeof range, "%llu-%llu", (unsigned long long)off,
             (unsigned long long)(off + len - 1));
    curl_easy_setopt(e, CURLOPT_RANGE, range);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, qp_mem_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &m);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, qp_mem_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &m);
    CURLcode cc = curl_easy_perform(e);
    long http = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &http);
    if (cc == CURLE_OK && !strncmp(o->url, "file:", 5) && total) {
      curl_off_t cl = -1;
      curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
      curl_easy_setopt(e, CURLOPT_RANGE, NULL);
      if (curl_easy_perform(e) == CURLE_OK &&
          curl_easy_getinfo(e, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl) == CURLE_OK && cl >= 0)
        m.total = (uint64_t)cl;
    }
    curl_easy_cleanup(e);
    if (cc == CURLE_OK && (!is_http || http == 206) && m.got == len) {
      if (total) *total = m.total;
      return 0;
    }
    if (is_http && http >= 400 && http < 500)
      return qctl_fail(p->c, "%s: HTTP %ld%s", o->url, http,
                       http == 416 ? " (the file is shorter than a qins header: truncated?)" : "");
    if (cc == CURLE_WRITE_ERROR || (cc == CURLE_OK && is_http && http == 200))
      return qctl_fail(p->c, "%s: the server does not answer range requests (HTTP %ld)", o->url, http);
    if (cc == CURLE_OK && http < 400 && m.got < len)
      return qctl_fail(p->c, "%s: %llu bytes at offset %llu, %llu expected (truncated?)", o->url,
                       (unsigned long long)m.got, (unsigned long long)off, (unsigned long long)len);
    if (!qp_transient(cc, http) || attempt >= o->retries) {
      char msg[CURL_ERROR_SIZE + 160];
      qp_curl_msg(cc, errbuf, msg, sizeof msg);
      if (cc != CURLE_OK) return qctl_fail(p->c, "%s: %s", o->url, msg);
      return qctl_fail(p->c, "%s: HTTP %ld", o->url, http);
    }
    p->retries++;
    double d = qp_backoff(attempt);
    struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
    nanosleep(&ts, NULL);
  }
}

/* ---- the piece transfers ---- */
static int qp_md_init(EVP_MD_CTX *md) { return EVP_DigestInit_ex(md, EVP_sha256(), NULL) ? 0 : -1; }

/* The last byte of x->piece arrived: its SHA-256 against the index, then marked in the map. */
static void qp_piece_done(qp_xfer *x) {
  qp *p = x->p;
  uint64_t i = x->piece, n = qp_piece_len(p, i);
  uint8_t d[32];
  unsigned dl = 32;
  EVP_DigestFinal_ex(x->md, d, &dl);
  if (memcmp(d, p->index + 32 + 32 * i, 32)) {
    qp_fatal(p, "%s: piece %llu (bytes %llu..%llu) fails its SHA-256: the served file is corrupt; "
                "nothing was imported",
             p->o->url, (unsigned long long)i, (unsigned long long)qp_piece_off(p, i),
             (unsigned long long)(qp_piece_off(p, i) + n));
    x->bad = 1;
    return;
  }
  uint8_t one = 1;
  if (qp_pwrite(p->part_fd, x->buf, n, qp_piece_off(p, i)) || qp_pwrite(p->map_fd, &one, 1, i) ||
      qp_md_init(x->md)) {
    qp_fatal(p, "writing the staging files: %s", strerror(errno));
    x->bad = 1;
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->map[i] = 1;
  p->have++;
  p->have_bytes += n;
  p->fetched_pieces++;
  p->fetched_bytes += n;
  qctl_bar_cb(&p->bar, p->have_bytes, p->h.file_bytes - p->h.data_off, "");
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  x->piece++;
  x->fill = 0;
}

static size_t qp_write(char *d, size_t sz, size_t n, void *ud) {
  qp_xfer *x = ud;
  qp *p = x->p;
  size_t k = sz * n, used = 0;
  if (qp_failed(p)) return 0;
  if (x->http == 0) curl_easy_getinfo(x->e, CURLINFO_RESPONSE_CODE, &x->http);
  if (!strncmp(p->o->url, "http", 4) && x->http != 206) return 0; /* an error page, not data */
  while (used < k) {
    if (x->piece >= x->sp.end) {
      x->bad = 1;
      qp_fatal(p, "%s: the server sent more bytes than the range asked", p->o->url);
      return 0;
    }
    uint64_t len = qp_piece_len(p, x->piece), take = len - x->fill;
    if (take > k - used) take = k - used;
    if (!EVP_DigestUpdate(x->md, d + used, take)) {
      x->bad = 1;
      qp_fatal(p, "SHA-256 failed (libcrypto)");
      return 0;
    }
    memcpy(x->buf + x->fill, d + used, take);
    x->fill += take;
    used += take;
    x->got += take;
    if (x->fill == len) {
      qp_piece_done(x);
      if (x->bad) return 0;
    }
  }
  return k;
}

/* Called with p->mu held. */
static void qp_push_locked(qp *p, qp_span sp) {
  if (p->nq == p->capq) {
    size_t nc = p->capq ? 2 * p->capq : 64;
    qp_span *q = realloc(p->queue, nc * sizeof *q);
    if (!q) {
      snprintf(p->err, sizeof p->err, "out of memory");
      __atomic_store_n(&p->failed, 1, __ATOMIC_RELEASE);
      return;
    }
    p->queue = q;
    p->capq = nc;
  }
  p->queue[p->nq++] = sp;
}

/* One range request for x->sp, run to its end on this thread. */
static CURLcode qp_perform(qp *p, qp_xfer *x) {
  x->piece = x->sp.first;
  x->fill = x->got = 0;
  x->http = 0;
  x->bad = 0;
  x->errbuf[0] = 0;
  if (qp_md_init(x->md)) return CURLE_OUT_OF_MEMORY;
  curl_easy_reset(x->e);
  qp_setup(x->e, p->o, x->errbuf);
  char range[64];
  uint64_t a = qp_piece_off(p, x->sp.first),
           b = qp_piece_off(p, x->sp.end - 1) + qp_piece_len(p, x->sp.end - 1) - 1;
  snprintf(range, sizeof range, "%llu-%llu", (unsigned long long)a, (unsigned long long)b);
  curl_easy_setopt(x->e, CURLOPT_RANGE, range);
  curl_easy_setopt(x->e, CURLOPT_WRITEFUNCTION, qp_write);
  curl_easy_setopt(x->e, CURLOPT_WRITEDATA, x);
  return curl_easy_perform(x->e);
}

/* A request ended: requeue what is left of its span (retry) or fail. Called without p->mu. */
static void qp_finish(qp *p, qp_xfer *x, CURLcode cc) {
  long http = 0;
  curl_easy_getinfo(x->e, CURLINFO_RESPONSE_CODE, &http);
  if (qp_failed(p)) return;
  if (cc == CURLE_OK && x->piece == x->sp.end) return; /* all of it */
  int is_http = !strncmp(p->o->url, "http", 4);
  char msg[CURL_ERROR_SIZE + 160];
  qp_curl_msg(cc, x->errbuf, msg, sizeof msg);
  if (is_http && http >= 400 && http < 500) {
    qp_fatal(p, "%s: HTTP %ld for bytes of piece %llu%s", p->o->url, http,
             (unsigned long long)x->sp.first,
             http == 416 ? " (the served file is shorter than its header says: truncated?)" : "");
    return;
  }
  if (is_http && http && http != 206 && http < 400) {
    qp_fatal(p, "%s: HTTP %ld to a range request (ranges not supported?)", p->o->url, http);
    return;
  }
  if (cc == CURLE_OK && x->got == 0 && http == 206) {
    qp_fatal(p, "%s: an empty answer for piece %llu (the served file is truncated?)", p->o->url,
             (unsigned long long)x->piece);
    return;
  }
  if (cc == CURLE_OK && !is_http) { /* file:// ended short */
    qp_fatal(p, "%s: the file ends inside piece %llu (truncated)", p->o->url,
             (unsigned long long)x->piece);
    return;
  }
  if (cc != CURLE_OK && cc != CURLE_WRITE_ERROR && !qp_transient(cc, http)) {
    qp_fatal(p, "%s: %s (piece %llu)", p->o->url, msg, (unsigned long long)x->piece);
    return;
  }
  /* Short, dropped, timed out or 5xx: the verified pieces stay; retry the rest. */
  qp_span rest = x->sp;
  rest.first = x->piece;
  if (x->sp.attempt >= p->o->retries) {
    if (cc != CURLE_OK)
      qp_fatal(p, "%s: %s (piece %llu, after %d attempts)", p->o->url, msg,
               (unsigned long long)x->piece, x->sp.attempt + 1);
    else
      qp_fatal(p, "%s: HTTP %ld, piece %llu incomplete after %d attempts", p->o->url, http,
               (unsigned long long)x->piece, x->sp.attempt + 1);
    return;
  }
  /* A request that made progress starts its attempts over. */
  rest.attempt = x->got ? 0 : x->sp.attempt + 1;
  rest.not_before = qctl_now() + qp_backoff(x->sp.attempt);
  pthread_mutex_lock(&p->mu);
  p->retries++;
  qp_push_locked(p, rest);
  pthread_mutex_unlock(&p->mu);
}

static void qp_deadline(struct timespec *ts, double secs) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += (time_t)secs;
  ts->tv_nsec += (long)((secs - (double)(time_t)secs) * 1e9);
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

/* A connection thread: takes the first span due, runs it, until the queue is empty and no request
 * runs (one that fails may requeue its rest) or the pull failed. */
static void *qp_conn_main(void *ud) {
  qp_xfer *x = ud;
  qp *p = x->p;
  pthread_mutex_lock(&p->mu);
  while (!p->failed) {
    double now = qctl_now(), due = 0;
    size_t i = 0;
    for (; i < p->nq && p->queue[i].not_before > now; i++)
      if (!due || p->queue[i].not_before < due) due = p->queue[i].not_before;
    if (i < p->nq) {
      x->sp = p->queue[i];
      memmove(p->queue + i, p->queue + i + 1, (p->nq - i - 1) * sizeof *p->queue);
      p->nq--;
      p->active++;
      pthread_mutex_unlock(&p->mu);
      CURLcode cc = qp_perform(p, x);
      qp_finish(p, x, cc);
      pthread_mutex_lock(&p->mu);
      p->active--;
      pthread_cond_broadcast(&p->cv);
      continue;
    }
    if (!p->nq && !p->active) break;
    if (p->nq) {
      struct timespec ts;
      qp_deadline(&ts, due - now);
      pthread_cond_timedwait(&p->cv, &p->mu, &ts);
    } else {
      pthread_cond_wait(&p->cv, &p->mu);
    }
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* The whole file's SHA-256 (--sha256), in file order while the pieces arrive: the header and index,
 * then each piece once it is verified, read from the mapped .part file (page cache, no copy). */
static void *qp_whole_main(void *ud) {
  qp *p = ud;
  EVP_DigestUpdate(p->whole, p->part, p->h.data_off);
  for (uint64_t i = 0; i < p->h.n_pieces; i++) {
    pthread_mutex_lock(&p->mu);
    while (!p->map[i] && !p->failed && !p->done) pthread_cond_wait(&p->cv, &p->mu);
    int ok = p->map[i];
    pthread_mutex_unlock(&p->mu);
    if (!ok) break;
    EVP_DigestUpdate(p->whole, p->part + qp_piece_off(p, i), qp_piece_len(p, i));
  }
  return NULL;
}

static int qp_run(qp *p) {
  const qp_opts *o = p->o;
  /* Spans of missing pieces: at most QP_SPAN_PIECES, and cut so every connection gets work. */
  uint64_t missing = p->h.n_pieces - p->have;
  uint64_t span = missing / (uint64_t)o->conns + 1;
  if (span > QP_SPAN_PIECES) span = QP_SPAN_PIECES;
  for (uint64_t i = 0; i < p->h.n_pieces && !p->failed;) {
    if (p->map[i]) {
      i++;
      continue;
    }
    uint64_t j = i;
    while (j < p->h.n_pieces && !p->map[j] && j - i < span) j++;
    qp_push_locked(p, (qp_span){i, j, 0, 0});
    i = j;
  }
  qp_xfer *xs = calloc((size_t)o->conns, sizeof *xs);
  int started = 0, hashing = 0;
  pthread_t wt;
  if (!xs) qp_fatal(p, "out of memory");
  for (int i = 0; xs && i < o->conns && !p->failed; i++) {
    xs[i].p = p;
    if (!(xs[i].e = curl_easy_init()) || !(xs[i].md = EVP_MD_CTX_new()) ||
        !(xs[i].buf = malloc(p->h.piece_size)))
      qp_fatal(p, "out of memory");
  }
  if (p->whole && !p->failed) hashing = !pthread_create(&wt, NULL, qp_whole_main, p);
  if (p->whole && !hashing) qp_fatal(p, "cannot start a thread: %s", strerror(errno));
  for (; xs && started < o->conns && !p->failed; started++)
    if (pthread_create(&xs[started].thr, NULL, qp_conn_main, &xs[started])) {
      qp_fatal(p, "cannot start a thread: %s", strerror(errno));
      break;
    }
  for (int i = 0; i < started; i++) pthread_join(xs[i].thr, NULL);
  pthread_mutex_lock(&p->mu);
  p->done = 1;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  if (hashing) pthread_join(wt, NULL);
  for (int i = 0; xs && i < o->conns; i++) {
    if (xs[i].e) curl_easy_cleanup(xs[i].e);
    EVP_MD_CTX_free(xs[i].md);
    free(xs[i].buf);
  }
  free(xs);
  return p->failed ? -1 : 0;
}

static int qp_hex_arg(const char *s, uint8_t out[32]) {
  if (strlen(s) != 64) return -1;
  for (int i = 0; i < 32; i++) {
    unsigned v;
    char b[3] = {s[2 * i], s[2 * i + 1], 0};
    if (!strchr("0123456789abcdefABCDEF", b[0]) || !strchr("0123456789abcdefABCDEF", b[1]) ||
        sscanf(b, "%x", &v) != 1)
      return -1;
    out[i] = (uint8_t)v;
  }
  return 0;
}

/* --NAME N within [lo, hi]: 0, or QCTL_USAGE after saying what is allowed. */
static int qp_num_arg(const char *name, const char *arg, long lo, long hi, long *out) {
  char *end = NULL;
  long v = strtol(arg, &end, 10);
  *out = v;
  if (*arg && end && !*end && v >= lo && v <= hi) return 0;
  fprintf(stderr, "qinsctl pull: --%s is %ld..%ld, got \"%s\"\n", name, lo, hi, arg);
  return QCTL_USAGE;
}

/* Staging paths and what this pull created, undone when it fails having kept nothing. */
typedef struct qp_stage {
  char dir[4096], part[4200], mapf[4200];
  int made_store, made_dir, made_files;
} qp_stage;

/* STORE/pull/<id>.part and .map, created (with STORE and STORE/pull if absent) only now that the
 * header and index are known good: a pull that fails before leaves no trace. */
static int qp_stage_open(qp *p, qp_stage *st) {
  qctl_ctx *c = p->c;
  char id[65];
  qs_hex(p->h.index_sha, 16, id);
  snprintf(st->dir, sizeof st->dir, "%s/pull", c->store);
  snprintf(st->part, sizeof st->part, "%s/%s.part", st->dir, id);
  snprintf(st->mapf, sizeof st->mapf, "%s/%s.map", st->dir, id);
  if (!mkdir(c->store, 0700)) st->made_store = 1;
  else if (errno != EEXIST) return qctl_fail(c, "store %s: cannot create: %s", c->store, strerror(errno));
  if (!mkdir(st->dir, 0700)) st->made_dir = 1;
  else if (errno != EEXIST) return qctl_fail(c, "%s: %s", st->dir, strerror(errno));
  struct stat sb;
  st->made_files = stat(st->part, &sb) != 0;
  p->map_fd = open(st->mapf, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  p->part_fd = open(st->part, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (p->map_fd < 0 || p->part_fd < 0) return qctl_fail(c, "%s: %s", st->dir, strerror(errno));
  if (flock(p->map_fd, LOCK_EX | LOCK_NB)) {
    st->made_files = 0; /* the other pull's */
    return qctl_fail(c, "another pull of this file into %s is running", c->store);
  }
  /* The space is allocated up front (a full disk fails now, and the writes then skip the
   * filesystem's delayed allocation); a filesystem without fallocate gets a sparse file. */
  if (fstat(p->part_fd, &sb) ||
      ((uint64_t)sb.st_size != p->h.file_bytes &&
       fallocate(p->part_fd, 0, 0, (off_t)p->h.file_bytes) &&
       (errno != EOPNOTSUPP || ftruncate(p->part_fd, (off_t)p->h.file_bytes))))
    return qctl_fail(c, "%s: %s", st->part, strerror(errno));
  void *m = mmap(NULL, p->h.file_bytes, PROT_READ, MAP_SHARED, p->part_fd, 0);
  if (m == MAP_FAILED) return qctl_fail(c, "%s: mmap: %s", st->part, strerror(errno));
  p->part = m;
  return 0;
}

/* A failed pull that verified nothing removes what it created; verified pieces are kept. */
static void qp_stage_undo(const qp *p, const qp_stage *st) {
  if (p->have || !st->made_files) return;
  unlink(st->part);
  unlink(st->mapf);
  if (st->made_dir) rmdir(st->dir);
  if (st->made_store) rmdir(p->c->store);
}

int qctl_cmd_pull(qctl_ctx *c, int argc, char **argv) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"sha256", required_argument, 0, 's'},
                                       {"connections", required_argument, 0, 'n'},
                                       {"retries", required_argument, 0, 'r'},
                                       {"connect-timeout", required_argument, 0, 'c'},
                                       {"low-speed-time", required_argument, 0, 'l'},
                                       {"cacert", required_argument, 0, 'C'},
                                       {0, 0, 0, 0}};
  qp_opts o = {.conns = 4, .retries = 5, .connect_timeout = 15, .low_speed_time = 30};
  int ch, rc = QCTL_OK;
  qctl_getopt_reset();
  long v;
  while ((ch = getopt_long(argc, argv, "m:s:n:r:c:l:C:", opts, NULL)) != -1) {
    switch (ch) {
    case 'm': o.model = optarg; break;
    case 's':
      if (qp_hex_arg(optarg, o.sha)) {
        fprintf(stderr, "qinsctl pull: --sha256 takes 64 hex digits, got \"%s\"\n", optarg);
        rc = QCTL_USAGE;
      }
      o.have_sha = 1;
      break;
    case 'n': rc |= qp_num_arg("connections", optarg, 1, 64, &v), o.conns = (int)v; break;
    case 'r': rc |= qp_num_arg("retries", optarg, 0, 100, &v), o.retries = (int)v; break;
    case 'c': rc |= qp_num_arg("connect-timeout", optarg, 1, 3600, &o.connect_timeout); break;
    case 'l': rc |= qp_num_arg("low-speed-time", optarg, 1, 3600, &o.low_speed_time); break;
    case 'C': o.cacert = optarg; break;
    default: rc = QCTL_USAGE;
    }
  }
  if (rc == QCTL_OK && optind != argc - 1) rc = QCTL_USAGE;
  if (rc != QCTL_OK) return qctl_usage(c, rc);
  o.url = argv[optind];
  if (strncmp(o.url, "http://", 7) && strncmp(o.url, "https://", 8) && strncmp(o.url, "file://", 7)) {
    fprintf(stderr, "qinsctl pull: URL must be http://, https:// or file://, got \"%s\"\n", o.url);
    return qctl_usage(c, QCTL_USAGE);
  }
  /* The CA bundle: --cacert, else the environment the curl and OpenSSL tools read (libcurl itself
   * reads neither), else libcurl's built-in bundle. */
  if (!o.cacert && (o.cacert = getenv("CURL_CA_BUNDLE")) && !*o.cacert) o.cacert = NULL;
  if (!o.cacert && (o.cacert = getenv("SSL_CERT_FILE")) && !*o.cacert) o.cacert = NULL;
  if (o.cacert && access(o.cacert, R_OK)) {
    fprintf(stderr, "qinsctl pull: CA bundle %s: %s\n", o.cacert, strerror(errno));
    return qctl_usage(c, QCTL_USAGE);
  }
  if ((rc = qctl_need_store(c))) return rc;
  if (curl_global_init(CURL_GLOBAL_DEFAULT)) return qctl_fail(c, "libcurl failed to initialize");
  qp p = {.o = &o, .c = c, .part_fd = -1, .map_fd = -1};
  pthread_mutex_init(&p.mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&p.cv, &ca);
  pthread_condattr_destroy(&ca);
  p.bar = (qctl_bar){isatty(2), qctl_now(), 0, "pull"};
  double t0 = qctl_now();
  uint8_t hb[QS_QFILE_HDR];
  uint64_t total = 0;
  qp_stage st = {0};
  qs_store *s = NULL;
  rc = QCTL_FAIL;
  if (qp_fetch(&p, 0, QS_QFILE_HDR, hb, &total)) goto out;
  if (qs_qfile_parse_header(o.url, hb, sizeof hb, &p.h)) {
    qctl_fail(c, "%s", qs_error());
    goto out;
  }
  if (total && total != p.h.file_bytes) {
    qctl_fail(c, "%s: the server's file is %llu bytes, its header says %llu (%s)", o.url,
              (unsigned long long)total, (unsigned long long)p.h.file_bytes,
              total < p.h.file_bytes ? "truncated" : "trailing bytes");
    goto out;
  }
  if (!(p.index = malloc(p.h.index_bytes)) || !(p.map = calloc(1, p.h.n_pieces + 1))) {
    qctl_fail(c, "out of memory");
    goto out;
  }
  if (qp_fetch(&p, QS_QFILE_HDR, p.h.index_bytes, p.index, NULL)) goto out;
  if (qs_qfile_check_index(o.url, &p.h, p.index)) {
    qctl_fail(c, "%s", qs_error());
    goto out;
  }
  if (qp_stage_open(&p, &st)) goto out;
  if (qp_pwrite(p.part_fd, hb, sizeof hb, 0) || qp_pwrite(p.part_fd, p.index, p.h.index_bytes, QS_QFILE_HDR)) {
    qctl_fail(c, "%s: %s", st.part, strerror(errno));
    goto out;
  }
  /* Pieces a previous pull verified: checked again in place (local, from the page cache after a
   * kill, from disk after a reboot), never refetched. */
  ssize_t mk = pread(p.map_fd, p.map, p.h.n_pieces, 0);
  if (mk < 0) mk = 0;
  if ((uint64_t)mk < p.h.n_pieces) memset(p.map + mk, 0, p.h.n_pieces - (uint64_t)mk);
  for (uint64_t i = 0; i < p.h.n_pieces; i++) {
    uint8_t d[32];
    if (p.map[i] != 1 ||
        (qs_sha256(p.part + qp_piece_off(&p, i), qp_piece_len(&p, i), d),
         memcmp(d, p.index + 32 + 32 * i, 32))) {
      p.map[i] = 0;
      continue;
    }
    p.have++;
    p.have_bytes += qp_piece_len(&p, i);
    p.reused_pieces++;
  }
  if (qp_pwrite(p.map_fd, p.map, p.h.n_pieces, 0)) {
    qctl_fail(c, "%s: %s", st.mapf, strerror(errno));
    goto out;
  }
  if (o.have_sha && (!(p.whole = EVP_MD_CTX_new()) || qp_md_init(p.whole))) {
    qctl_fail(c, "out of memory");
    goto out;
  }
  if (qp_run(&p)) {
    qctl_bar_end(&p.bar);
    if (p.have)
      qctl_fail(c, "%s (%llu verified pieces are kept in %s for the next pull)", p.err,
                (unsigned long long)p.have, st.dir);
    else
      qctl_fail(c, "%s", p.err);
    goto out;
  }
  qctl_bar_end(&p.bar);
  if (p.whole) {
    uint8_t d[32];
    unsigned dl = 32;
    EVP_DigestFinal_ex(p.whole, d, &dl);
    if (memcmp(d, o.sha, 32)) {
      char got[65];
      qs_hex(d, 32, got);
      qctl_fail(c, "%s: SHA-256 is %s, not the one expected (--sha256); nothing was imported",
                o.url, got);
      goto out;
    }
  }
  /* No fsync of the staging file: the import reads it back through the page cache and the store's
   * own commits make the model durable; after a crash, resume re-checks every marked piece. */
  double t_fetch = qctl_now() - t0;
  /* Every piece verified (and the whole file, with --sha256): import and publish. */
  if (qctl_open(c, &s, QS_OPEN_CREATE)) goto out;
  qs_qfile_import_opts io;
  qs_qfile_import_opts_init(&io);
  io.model = o.model;
  io.pieces_verified = 1;
  qs_import_result res;
  if (qs_qfile_import(s, st.part, &io, &res)) {
    qctl_fail(c, "%s: %s", o.url, qs_error());
    goto out;
  }
  unlink(st.part);
  unlink(st.mapf);
  double dt = qctl_now() - t0;
  char extra[1024], hex[65];
  qs_hex(p.h.index_sha, 32, hex);
  snprintf(extra, sizeof extra,
           ",\"file_bytes\":%llu,\"pieces\":%llu,\"pieces_fetched\":%llu,\"pieces_reused\":%llu,"
           "\"fetched_bytes\":%llu,\"retries\":%llu,\"fetch_seconds\":%.3f,\"fetch_mb_per_s\":%.1f,"
           "\"index_sha256\":\"%s\"",
           (unsigned long long)p.h.file_bytes, (unsigned long long)p.h.n_pieces,
           (unsigned long long)p.fetched_pieces, (unsigned long long)p.reused_pieces,
           (unsigned long long)p.fetched_bytes, (unsigned long long)p.retries, t_fetch,
           t_fetch > 0 ? (double)p.fetched_bytes / 1e6 / t_fetch : 0.0, hex);
  if (c->json) {
    qctl_print_qimport(c, &res, dt, extra);
  } else {
    char a[32], b[32];
    printf("pulled %s from %s: %s, %llu of %llu pieces fetched (%s), %llu reused, %llu retries, "
           "%.2f s\n",
           res.model, o.url, qctl_human(p.h.file_bytes, a, sizeof a),
           (unsigned long long)p.fetched_pieces, (unsigned long long)p.h.n_pieces,
           qctl_human(p.fetched_bytes, b, sizeof b), (unsigned long long)p.reused_pieces,
           (unsigned long long)p.retries, dt);
  }
  rc = QCTL_OK;
out:
  if (rc != QCTL_OK) qp_stage_undo(&p, &st);
  if (s) qs_close(s);
  if (p.part) munmap((void *)p.part, p.h.file_bytes);
  if (p.part_fd >= 0) close(p.part_fd);
  if (p.map_fd >= 0) close(p.map_fd);
  EVP_MD_CTX_free(p.whole);
  free(p.index);
  free(p.map);
  free(p.queue);
  pthread_cond_destroy(&p.cv);
  pthread_mutex_destroy(&p.mu);
  curl_global_cleanup();
  return rc;
}
