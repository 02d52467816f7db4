/* SPDX-License-Identifier: MIT */
/*
 * client_reconnect.c — libqins rides through daemon restarts (issue 18; docs/client.md §1.1,
 * client/qins.h "Reconnecting"):
 *   - a worker thread keeps calling get (whole tensors into its buffer, allocated gets, row
 *     slices, get_many) while qinsd is restarted 5 times on the same store and socket (SIGTERM +
 *     start four times, SIGKILL + start once): no call fails, every answer is byte-identical to
 *     the tensor's source (f32 tensors) or to what the first daemon served (qins8), and the client
 *     counts one reconnect per restart;
 *   - a daemon that stays down: the call fails with QINS_ECLOSED naming the socket and the budget,
 *     after the budget and within it + 10% (a functional bound of the retry loop); the same client
 *     recovers on its next call once the daemon is back;
 *   - hello is redone: the new daemon's limits are what qins_server shows and what judges calls;
 *   - the reconnect callback runs once per reconnect, may call the daemon, and its failure fails
 *     the interrupted call; with reconnecting off a restart is reported at once (the old
 *     behaviour, which is what the first test would see without reconnects).
 * Progress is polled, never timed.
 */
#include <errno.h>

#include "client_restart.h"

TestSuite(client_reconnect, .init = setup, .fini = teardown, .timeout = 120);

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static qins_client *conn(void) {
  qins_client *c = NULL;
  int rc = qins_connect(&c, D.sock, 10000);
  cr_assert_eq(rc, 0, "qins_connect %s: %s", D.sock, qins_strerror(rc));
  return c;
}

/* The tensors the worker fetches: their expected bytes, taken before any restart. */
#define N_WANT 5
static const char *const want_names[N_WANT] = {"a.w", "big", "c3", "q8", "l.0.y"};

typedef struct expect {
  uint8_t *data[N_WANT];
  size_t bytes[N_WANT];
} expect;

/* Through raw msgpack-RPC (no libqins), and checked against the source for the f32 tensors. */
static void expect_load(expect *e) {
  ts_rx rx;
  open_rx(&rx);
  for (int k = 0; k < N_WANT; k++) {
    got g = do_get(&rx, "m", want_names[k], -1, NULL, NULL);
    cr_assert_eq(g.code, 0, "get %s", want_names[k]);
    const std_tensor *t = std_find(want_names[k]);
    cr_assert_eq(g.bytes, std_n(t) * 4);
    e->data[k] = g.data;
    e->bytes[k] = g.bytes;
    if (t->codec != QC_F32) continue; /* qins8: the first daemon's answer is the reference */
    for (uint64_t i = 0; i < std_n(t); i++) {
      float x = ts_value((uint64_t)(t - std_tensors), i);
      cr_assert_eq(memcmp(g.data + 4 * i, &x, 4), 0, "%s[%llu] differs from the source", t->name,
                   (unsigned long long)i);
    }
  }
  ts_rx_destroy(&rx);
}

static void expect_free(expect *e) {
  for (int k = 0; k < N_WANT; k++) free(e->data[k]);
}

typedef struct worker {
  restart_worker base; /* first: the driver's view */
  const expect *e;
} worker;

static void *worker_main(void *arg) {
  worker *ww = arg;
  restart_worker *w = &ww->base;
  qins_client *c = worker_connect(w);
  if (!c) return NULL;
  size_t cap = 1024 * 600 * 4;
  uint8_t *buf = malloc(cap);
  for (unsigned long k = 0; !atomic_load(&w->stop); k++) {
    int i = (int)(k % N_WANT), rc = 0, good = 0;
    const uint8_t *want = ww->e->data[i];
    size_t n = 0;
    switch (k % 4) {
    case 0: /* whole, into the caller's buffer */
      rc = qins_get_into(c, "m", want_names[i], NULL, 0, QINS_F32, buf, cap, &n, NULL, NULL);
      good = !rc && n == ww->e->bytes[i] && !memcmp(buf, want, n);
      break;
    case 1: { /* whole, allocated by the library */
      void *p = NULL;
      rc = qins_get(c, "m", want_names[i], NULL, 0, QINS_F32, &p, &n, NULL, NULL);
      good = !rc && n == ww->e->bytes[i] && !memcmp(p, want, n);
      qins_free(p);
      break;
    }
    case 2: { /* the first row */
      const std_tensor *t = std_find(want_names[i]);
      size_t row = t->ndim >= 2 ? ww->e->bytes[i] / t->shape[0] : ww->e->bytes[i];
      qins_range r = {0, t->ndim >= 1 ? (t->ndim >= 2 ? 1 : t->shape[0]) : 0};
      rc = qins_get_into(c, "m", want_names[i], &r, t->ndim >= 1, QINS_F32, buf, cap, &n, NULL,
                         NULL);
      good = !rc && n == row && !memcmp(buf, want, n);
      break;
    }
    default: { /* two tensors in one round trip */
      qins_get_req rq[2] = {{.name = "a.w", .buf = buf, .buf_bytes = cap / 2},
                            {.name = "q8", .buf = buf + cap / 2, .buf_bytes = cap / 2}};
      rc = qins_get_many_into(c, "m", rq, 2, QINS_F32);
      good = !rc && rq[0].out_bytes == ww->e->bytes[0] && rq[1].out_bytes == ww->e->bytes[3] &&
             !memcmp(buf, ww->e->data[0], rq[0].out_bytes) &&
             !memcmp(buf + cap / 2, ww->e->data[3], rq[1].out_bytes);
    }
    }
    if (rc) note_failure(w, c, "get");
    else if (good) atomic_fetch_add(&w->ok, 1);
    else atomic_fetch_add(&w->wrong, 1);
  }
  qins_client_stats(c, &w->stats);
  qins_close(c);
  free(buf);
  return NULL;
}

/* Issue 18's acceptance: 5 restarts, one of them a SIGKILL, under a worker's gets. */
Test(client_reconnect, gets_ride_through_five_restarts) {
  expect e;
  expect_load(&e);
  worker w;
  memset(&w, 0, sizeof w);
  w.e = &e;
  ride_five_restarts(&w.base, worker_main, 5);
  cr_log_info("client_reconnect: %llu good answers, %llu reconnects, %llu calls sent again",
              (unsigned long long)atomic_load(&w.base.ok),
              (unsigned long long)w.base.stats.reconnects,
              (unsigned long long)w.base.stats.retried_calls);
  expect_free(&e);
}

/* The budget is spent: QINS_ECLOSED naming the socket, after the budget and within it + 10%. */
Test(client_reconnect, a_daemon_that_stays_down_spends_the_budget) {
  qins_client *c = conn();
  qins_set_retry(c, 1500);
  cr_assert_eq(ts_daemon_stop(&D) >= 0, 1);
  float row[129];
  qins_range r = {0, 1};
  int64_t t0 = now_ms();
  int rc = qins_get_into(c, "m", "a.w", &r, 1, QINS_F32, row, sizeof row, NULL, NULL, NULL);
  int64_t took = now_ms() - t0;
  const char *msg = qins_client_error(c);
  cr_expect_eq(rc, QINS_ECLOSED, "%s: %s", qins_err_name(rc), msg);
  cr_expect(strstr(msg, D.sock) && strstr(msg, "1500 ms"), "the message names socket and budget: %s",
            msg);
  cr_expect_geq(took, 1500, "gave up after %lld ms, before the budget", (long long)took);
  cr_expect_leq(took, 1650, "gave up after %lld ms, past the budget + 10%%", (long long)took);
  qins_conn_stats st;
  qins_client_stats(c, &st);
  cr_expect_eq(st.budgets_spent, 1);
  cr_expect_eq(st.reconnects, 0);
  /* Back up: the same client serves its next call. */
  cr_assert_eq(ts_daemon_start(&D, NULL), 0);
  rc = qins_get_into(c, "m", "a.w", &r, 1, QINS_F32, row, sizeof row, NULL, NULL, NULL);
  cr_expect_eq(rc, 0, "%s", qins_client_error(c));
  float x = ts_value(0, 0);
  cr_expect_eq(memcmp(&row[0], &x, 4), 0);
  qins_client_stats(c, &st);
  cr_expect_eq(st.reconnects, 1);
  cr_expect_eq(st.generation, 2);
  qins_close(c);
}

typedef struct cb_state {
  int calls;       /* times the callback ran */
  int ping_rc;     /* what its own call returned */
  uint64_t gen;    /* generation seen inside it */
  int fail_with;   /* nonzero: return this */
} cb_state;

static int on_reconnect(qins_client *c, void *ud) {
  cb_state *s = ud;
  s->calls++;
  s->ping_rc = qins_ping(c);
  qins_conn_stats st;
  qins_client_stats(c, &st);
  s->gen = st.generation;
  return s->fail_with;
}

/* The hook for per-connection state (an arena lease, issue 14): it runs on the new connection. */
Test(client_reconnect, the_callback_runs_once_per_reconnect) {
  qins_client *c = conn();
  cb_state s = {0};
  qins_set_reconnect_cb(c, on_reconnect, &s);
  qins_set_retry(c, 60000);
  cr_assert_eq(qins_ping(c), 0);
  cr_expect_eq(s.calls, 0, "no reconnect, no callback");
  restart(0);
  cr_expect_eq(qins_ping(c), 0, "%s", qins_client_error(c));
  cr_expect_eq(s.calls, 1);
  cr_expect_eq(s.ping_rc, 0, "a call inside the callback is served by the new daemon");
  cr_expect_eq(s.gen, 2);
  /* A failing callback fails the interrupted call with its code. */
  s.fail_with = QINS_EDENIED;
  restart(0);
  int rc = qins_ping(c);
  cr_expect_eq(rc, QINS_EDENIED, "%s", qins_err_name(rc));
  cr_expect(strstr(qins_client_error(c), "callback"), "%s", qins_client_error(c));
  cr_expect_eq(s.calls, 2);
  qins_close(c);
}

/* Reconnecting off: the restart is reported at once, as before reconnects existed. */
Test(client_reconnect, with_the_budget_zero_a_restart_is_an_error) {
  qins_client *c = conn();
  qins_set_retry(c, 0);
  cr_assert_eq(qins_ping(c), 0);
  restart(0);
  int rc = qins_ping(c);
  cr_expect(rc == QINS_ECLOSED || rc == -EPIPE || rc == -ECONNRESET || rc == QINS_ESHUTDOWN,
            "%s", qins_err_name(rc));
  cr_expect_eq(qins_ping(c), QINS_ECLOSED, "the dead connection is not reopened");
  qins_conn_stats st;
  qins_client_stats(c, &st);
  cr_expect_eq(st.reconnects, 0);
  qins_close(c);
}

/* hello is redone on the new daemon: qins_server shows its limits, and the call is judged by them
 * (PROTOCOL.md §2). */
Test(client_reconnect, hello_is_redone_and_its_limits_read_again) {
  qins_client *c = conn();
  qins_set_retry(c, 60000);
  cr_assert_eq(qins_server(c)->max_ranges, 8);
  cr_assert_eq(qins_server(c)->max_response_bytes, 1u << 30);
  int st = ts_daemon_stop(&D);
  cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
  static const char *const args[] = {"--max-ranges", "2", "--max-response-bytes", "64K", NULL};
  cr_assert_eq(ts_daemon_start(&D, args), 0);
  void *p = NULL;
  size_t n = 0;
  int rc = qins_get(c, "m", "big", NULL, 0, QINS_F32, &p, &n, NULL, NULL); /* 2.4 MB > 64 KiB */
  cr_expect_eq(rc, QINS_ERESPONSE_TOO_LARGE, "%s: %s", qins_err_name(rc), qins_client_error(c));
  cr_expect_null(p);
  cr_expect_eq(qins_server(c)->max_ranges, 2);
  cr_expect_eq(qins_server(c)->max_response_bytes, 64u << 10);
  qins_range r = {0, 1};
  rc = qins_get(c, "m", "big", &r, 1, QINS_F32, &p, &n, NULL, NULL);
  cr_expect_eq(rc, 0, "%s", qins_client_error(c));
  cr_expect_eq(n, 600 * 4);
  qins_free(p);
  qins_close(c);
}
