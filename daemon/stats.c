/* SPDX-License-Identifier: MIT */
/*
 * stats.c — the daemon's counters (qd_srv.st, reported by the `stats` method), its latency ring,
 * and the payload buffer cache: decoded answers of 256 KiB and more reuse a few large buffers, so
 * a 64 MiB get does not page-fault a fresh mapping each time.
 */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conn.h"
#include "methods.h"
#include "qinsd.h"

__attribute__((hot))
uint64_t qd_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int qd_stats_init(void) {
  qd_srv.st.start_ns = qd_now_ns();
  qd_srv.st.per_method = calloc((size_t)qd_n_methods, sizeof(uint64_t));
  if (!qd_srv.st.per_method) return QINS_ENOMEM;
  uv_mutex_init(&qd_srv.bufs.mu);
  return 0;
}

void qd_stats_fini(void) {
  for (int i = 0; i < QD_BUF_SLOTS; i++) {
    free(qd_srv.bufs.slot[i].p);
    qd_srv.bufs.slot[i].p = NULL;
  }
  qd_srv.bufs.cached = 0;
  uv_mutex_destroy(&qd_srv.bufs.mu);
  free(qd_srv.st.per_method);
  qd_srv.st.per_method = NULL;
}

__attribute__((hot))
void qd_latency_record(uint64_t t0) {
  qd_srv.st.lat_ns[qd_srv.st.lat_n % QD_LAT_SAMPLES] = qd_now_ns() - t0;
  qd_srv.st.lat_n++;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

void qd_latency_quantiles(double *p50_us, double *p99_us) {
  size_t n = qd_srv.st.lat_n < QD_LAT_SAMPLES ? qd_srv.st.lat_n : QD_LAT_SAMPLES;
  *p50_us = *p99_us = 0;
  if (!n) return;
  uint64_t *v = malloc(n * sizeof *v);
  if (!v) return;
  memcpy(v, qd_srv.st.lat_ns, n * sizeof *v);
  qsort(v, n, sizeof *v, cmp_u64);
  *p50_us = (double)v[(n - 1) / 2] / 1000.0;
  *p99_us = (double)v[(size_t)((double)(n - 1) * 0.99)] / 1000.0;
  free(v);
}

void qd_count_error(int code) {
  if (code <= -1000 && code > -1000 - QD_ERR_SLOTS) qd_srv.st.errors[-1000 - code]++;
}

/* ---- the global response memory bound (max-response-memory) ---------------------------------
 * queued_bytes counts, for all clients, the memory their queued responses hold (out.c's wreq
 * cost) and the planned bytes of their pending decodes. At or above max-response-memory a
 * client that holds some of it is not read (conn.c, qd_conn_can_dispatch) and a decode for the
 * pool (a large get or get_many) is answered BUSY (job.c), while a client holding nothing still
 * gets its small answers (ping, stats, inline gets): so what is held stays below the bound plus
 * the last large answer admitted (at most max-response-bytes) plus, per client, one small answer
 * the socket did not take. When it falls below again, qd_mem_wake (run by the loop before it
 * waits) resumes the paused connections.
 * Once nothing is held and no client is connected, the payload buffer cache is emptied and the
 * freed heap given back (malloc_trim), so RSS returns near its start after a burst. */
#define TRIM_AFTER (16u << 20) /* a peak since the last trim worth giving back */

void qd_queued_add(uint64_t n) {
  qd_srv.st.queued_bytes += n;
  if (qd_srv.st.queued_bytes > qd_srv.st.queued_peak) qd_srv.st.queued_peak = qd_srv.st.queued_bytes;
  if (qd_srv.st.queued_bytes > qd_srv.mem.high) qd_srv.mem.high = qd_srv.st.queued_bytes;
}

enum { WAKE_RESUME = 1, WAKE_TRIM = 2 }; /* qd_srv.mem.wake bits */

void qd_queued_sub(uint64_t n) {
  const uint64_t before = qd_srv.st.queued_bytes, lim = qd_srv.cfg.max_response_memory;
  qd_srv.st.queued_bytes -= n;
  if (before >= lim && qd_srv.st.queued_bytes < lim) qd_srv.mem.wake |= WAKE_RESUME;
  if (qd_srv.st.queued_bytes == 0 && qd_srv.mem.high >= TRIM_AFTER) qd_srv.mem.wake |= WAKE_TRIM;
}

__attribute__((hot))
int qd_mem_over(void) { return qd_srv.st.queued_bytes >= qd_srv.cfg.max_response_memory; }

void qd_mem_wake(void) {
  /* Every open connection gets its chance, each checking the bound again as it dispatches. */
  if ((qd_srv.mem.wake & WAKE_RESUME) && !qd_mem_over()) {
    qd_srv.mem.wake &= ~WAKE_RESUME;
    for (qd_conn *c = qd_srv.cn.all, *next; c && !qd_mem_over(); c = next) {
      next = c->next; /* resuming never frees c (frees run in libuv callbacks) */
      if (c->state == CONN_PAUSED || c->state == CONN_READING) qd_conn_resume(c);
    }
  }
  /* The trim waits (checked once a round) until the last client has left. */
  if (!(qd_srv.mem.wake & WAKE_TRIM) || qd_srv.st.connections > 0) return;
  qd_srv.mem.wake &= ~WAKE_TRIM;
  if (qd_srv.st.queued_bytes) return; /* something came back meanwhile: trimmed next time */
  uv_mutex_lock(&qd_srv.bufs.mu);
  for (int i = 0; i < QD_BUF_SLOTS; i++) {
    free(qd_srv.bufs.slot[i].p);
    qd_srv.bufs.slot[i].p = NULL;
  }
  qd_srv.bufs.cached = 0;
  uv_mutex_unlock(&qd_srv.bufs.mu);
  malloc_trim(0);
  qd_srv.mem.high = 0;
  qd_srv.st.memory_trims++;
}

/* ---- payload buffer cache ------------------------------------------------------------------- */
#define BUF_MIN (256 * 1024) /* smaller ones are plain malloc: no page-fault cost worth saving */

void *qd_buf_get(size_t n, size_t *cap) {
  if (n >= BUF_MIN) {
    uv_mutex_lock(&qd_srv.bufs.mu);
    int best = -1;
    for (int i = 0; i < QD_BUF_SLOTS; i++) {
      size_t c = qd_srv.bufs.slot[i].cap;
      if (qd_srv.bufs.slot[i].p && c >= n && c / 2 <= n &&
          (best < 0 || c < qd_srv.bufs.slot[best].cap))
        best = i;
    }
    if (best >= 0) {
      void *p = qd_srv.bufs.slot[best].p;
      *cap = qd_srv.bufs.slot[best].cap;
      qd_srv.bufs.slot[best].p = NULL;
      qd_srv.bufs.cached -= *cap;
      uv_mutex_unlock(&qd_srv.bufs.mu);
      return p;
    }
    uv_mutex_unlock(&qd_srv.bufs.mu);
  }
  *cap = n ? n : 1;
  return malloc(*cap);
}

void qd_buf_release(void *p, size_t cap) {
  if (!p) return;
  const size_t budget = qd_srv.cfg.buffer_cache_bytes;
  if (cap >= BUF_MIN && cap <= budget) {
    uv_mutex_lock(&qd_srv.bufs.mu);
    int slot = -1;
    for (int i = 0; i < QD_BUF_SLOTS && slot < 0; i++)
      if (!qd_srv.bufs.slot[i].p) slot = i;
    /* Evict smaller buffers until this one fits the budget. */
    while (slot >= 0 && qd_srv.bufs.cached + cap > budget) {
      int victim = -1;
      for (int i = 0; i < QD_BUF_SLOTS; i++)
        if (qd_srv.bufs.slot[i].p &&
            (victim < 0 || qd_srv.bufs.slot[i].cap < qd_srv.bufs.slot[victim].cap))
          victim = i;
      if (victim < 0) break;
      free(qd_srv.bufs.slot[victim].p);
      qd_srv.bufs.cached -= qd_srv.bufs.slot[victim].cap;
      qd_srv.bufs.slot[victim].p = NULL;
    }
    if (slot >= 0 && qd_srv.bufs.cached + cap <= budget) {
      qd_srv.bufs.slot[slot].p = p;
      qd_srv.bufs.slot[slot].cap = cap;
      qd_srv.bufs.cached += cap;
      uv_mutex_unlock(&qd_srv.bufs.mu);
      return;
    }
    uv_mutex_unlock(&qd_srv.bufs.mu);
  }
  free(p);
}
