/* SPDX-License-Identifier: MIT */
/*
 * log.c — qinsd's log: one line per event, `pid time level msg`, e.g.
 *   4711 2026-11-26T07:19:11.123Z notice listening on /run/qinsd/s (mode 0660)
 * SIGHUP reopens the file (log rotation: rename it, then send SIGHUP).
 * Levels debug < verbose < notice < warning; the qd_log macro checks the level before evaluating
 * its arguments. Lines are written with one write(2) each so they never interleave. Nothing logs
 * from a signal handler (signals arrive through uv_signal_t on the loop).
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

void qd__log_write(int level, const char *fmt, ...) {
  char line[1024];
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof line, "%d %04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s ", (int)getpid(),
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   ts.tv_nsec / 1000000, qd_log_level_name(level));
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  va_end(ap);
  size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
  if (len > sizeof line - 2) len = sizeof line - 2;
  line[len++] = '\n';
  ssize_t w = write(log_fd, line, len);
  (void)w;
}
