/* SPDX-License-Identifier: MIT */
/*
 * log.c — qinsd's log: one line per event, `pid time level msg`, e.g.
 *   4711 2026-11-26T07:19:11.123Z notice listening on /run/qinsd/s (mode 0660)
 * SIGHUP reopens the file (log rotation: rename it, then send SIGHUP).
 * Levels debug < verbose < notice < warning; the qd_log macro checks the level before evaluating
 * its arguments. Lines are written with one write(2) each so they never interleave. Nothing logs
 * from a signal handler (signals arrive through uv_signal_t on the loop).
 * Messages carry client-chosen bytes (names, methods): qd_escape turns control characters,
 * and bytes that are not UTF-8 into \xNN, so a name can never forge a line.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qinsd.h"

int qd_log_level = QD_LOG_NOTICE;
static int log_fd = 2;

static const char *const level_names[] = {"debug", "verbose", "notice", "warning"};

const char *qd_log_level_name(int level) {
  return level >= 0 && level <= QD_LOG_WARNING ? level_names[level] : "?";
}

int qd_log_level_from_name(const char *s) {
  for (int i = 0; i <= QD_LOG_WARNING; i++)
    if (strcmp(s, level_names[i]) == 0) return i;
  return -1;
}

int qd_log_open(const char *path) {
  if (!path || !*path) {
    if (log_fd > 2) close(log_fd);
    log_fd = 2;
    return 0;
  }
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (fd < 0) return -errno;
  if (log_fd > 2) close(log_fd);
  log_fd = fd;
  return 0;
}

/* Length of the UTF-8 sequence at p (n bytes left), 0 if it is not one (overlong, surrogate,
 * above U+10FFFF, truncated). */
static size_t utf8_len(const unsigned char *p, size_t n) {
  unsigned c = p[0];
  size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  if (!len || len > n) return 0;
  uint32_t cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
  for (size_t i = 1; i < len; i++) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (p[i] & 0x3F);
  }
  static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < min[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

/* ---- rate limiting (qd_log_rl) ---------------------------------------------------------------- */
#define RL_SLOTS 64
static struct rl {
  const char *kind; /* NULL: free */
  uint32_t peer;
  int64_t start;    /* window start, monotonic seconds */
  uint64_t lines, suppressed;
} rl[RL_SLOTS];

static int64_t mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec;
}

static void rl_end(struct rl *r, int64_t now) {
  if (r->suppressed)
    qd__log_write(QD_LOG_WARNING, "%llu more line(s) like \"%s\" for uid %u suppressed in the "
                  "last %lld s", (unsigned long long)r->suppressed, r->kind, (unsigned)r->peer,
                  (long long)(now - r->start));
  r->kind = NULL;
}

int qd_log_admit(const char *kind, uint32_t peer) {
  int64_t now = mono_s();
  struct rl *r = NULL, *oldest = &rl[0];
  for (int i = 0; i < RL_SLOTS && !r; i++) {
    if (rl[i].kind && rl[i].peer == peer && strcmp(rl[i].kind, kind) == 0) r = &rl[i];
    else if (!rl[i].kind || (oldest->kind && rl[i].start < oldest->start)) oldest = &rl[i];
  }
  if (r && now - r->start >= QD_LOG_WINDOW_S) rl_end(r, now);
  if (!r || !r->kind) {
    if (!r) {
      r = oldest;
      if (r->kind) rl_end(r, now); /* the table is full: the oldest window ends early */
    }
    *r = (struct rl){.kind = kind, .peer = peer, .start = now};
  }
  if (r->lines < QD_LOG_BURST) {
    r->lines++;
    return 1;
  }
  r->suppressed++;
  return 0;
}

void qd_log_flush(int all) {
  int64_t now = mono_s();
  for (int i = 0; i < RL_SLOTS; i++)
    if (rl[i].kind && (all || now - rl[i].start >= QD_LOG_WINDOW_S)) rl_end(&rl[i], now);
}

size_t qd_escape(char *dst, size_t cap, const char *src, size_t n) {
  size_t o = 0;
  const unsigned char *p = (const unsigned char *)src;
  if (!cap) return 0;
  for (size_t i = 0; i < n;) {
    size_t l = utf8_len(p + i, n - i);
    int plain = l > 1 || (l == 1 && p[i] >= 0x20 && p[i] != 0x7F);
    if (!plain) l = 1;
    if (o + (plain ? l : 4) >= cap) break;
    if (plain) memcpy(dst + o, p + i, l), o += l;
    else o += (size_t)snprintf(dst + o, cap - o, "\\x%02x", p[i]);
    i += l;
  }
  dst[o] = '\0';
  return o;
}

void qd__log_write(int level, const char *fmt, ...) {
  char line[1024], msg[1024];
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof line, "%d %04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s ", (int)getpid(),
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   ts.tv_nsec / 1000000, qd_log_level_name(level));
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  size_t ml = m < 0 ? 0 : (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1;
  size_t len = (size_t)n + qd_escape(line + n, sizeof line - (size_t)n - 1, msg, ml);
  if (len > sizeof line - 2) len = sizeof line - 2;
  line[len++] = '\n';
  ssize_t w = write(log_fd, line, len);
  (void)w;
}
