/* SPDX-License-Identifier: MIT */
/*
 * client_restart.h — shared by the client_* tests that restart the fixture's qinsd under a worker
 * (client_reconnect.c, client_arena_restart.c): the restart itself (SIGTERM + start, or SIGKILL +
 * start, on the same store and socket), the worker thread's counters, and the driver that
 * restarts the daemon 5 times (the third a SIGKILL) while the worker runs, waiting after each
 * restart for the worker to make progress on the new daemon. Progress is polled, never timed.
 * Header-only (static), included after daemon_fixture.h.
 */
#ifndef QINS_CLIENT_RESTART_H
#define QINS_CLIENT_RESTART_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

#include "daemon_fixture.h"
#include "qins.h"

__attribute__((unused)) static void pause_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* SIGTERM (qinsd exits 0) or SIGKILL, then a new qinsd on the same store and socket. */
__attribute__((unused)) static void restart(int sigkill) {
  if (sigkill) {
    cr_assert_eq(kill(D.pid, SIGKILL), 0);
    int st;
    cr_assert_eq(waitpid(D.pid, &st, 0), D.pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    D.pid = 0;
  } else {
    int st = ts_daemon_stop(&D);
    cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "qinsd exit status 0x%x", st);
  }
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "qinsd restarts on the same store and socket");
}

/* A worker thread's outcome, shared with the test's thread. */
typedef struct restart_worker {
  pthread_t thr;
  atomic_int stop;       /* set by the test: finish */
  atomic_ullong ok;      /* steps whose every answer was right */
  atomic_ullong failed;  /* calls that returned an error: must stay 0 */
  atomic_ullong wrong;   /* steps with a wrong answer: must stay 0 */
  char first_error[512]; /* the first failure's message */
  qins_conn_stats stats; /* the client's counters at the end */
} restart_worker;

__attribute__((unused)) static void note_failure(restart_worker *w, qins_client *c, const char *what) {
  if (atomic_fetch_add(&w->failed, 1) == 0)
    snprintf(w->first_error, sizeof w->first_error, "%s: %s", what, qins_client_error(c));
}

/* The worker's client, with a budget no restart on a loaded machine spends (no error may reach
 * it), or NULL (counted as a failure). */
__attribute__((unused)) static qins_client *worker_connect(restart_worker *w) {
  qins_client *c = NULL;
  int rc = qins_connect(&c, D.sock, 10000);
  if (rc) {
    snprintf(w->first_error, sizeof w->first_error, "connect: %s", qins_strerror(rc));
    atomic_fetch_add(&w->failed, 1);
    return NULL;
  }
  qins_set_retry(c, 60000);
  return c;
}

/* Waits until the worker has made `more` steps past `from` (bounded by the suite's timeout). */
static void wait_steps(restart_worker *w, unsigned long long from, unsigned long long more) {
  while (atomic_load(&w->ok) + atomic_load(&w->wrong) < from + more && !atomic_load(&w->failed))
    pause_ms(2);
}

/* Runs main(w) on a thread (w starts with a restart_worker) through 5 restarts, the third a
 * SIGKILL; after each, waits for `per_restart` steps on the new daemon. Returns once it joined. */
__attribute__((unused)) static void ride_five_restarts(restart_worker *w, void *(*main)(void *),
                                                       unsigned long long per_restart) {
  cr_assert_eq(pthread_create(&w->thr, NULL, main, w), 0);
  wait_steps(w, 0, 5);
  for (int r = 0; r < 5; r++) {
    restart(r == 2);
    /* Steps counted from here ran on the new daemon: each needed a reconnect. */
    wait_steps(w, atomic_load(&w->ok) + atomic_load(&w->wrong), per_restart);
  }
  atomic_store(&w->stop, 1);
  pthread_join(w->thr, NULL);
  cr_expect_eq(atomic_load(&w->failed), 0, "an error reached the caller: %s", w->first_error);
  cr_expect_eq(atomic_load(&w->wrong), 0, "answers differing from the expected bytes");
  cr_expect_eq(w->stats.reconnects, 5, "one reconnect per restart");
  cr_expect_eq(w->stats.generation, 6);
  cr_expect_eq(w->stats.budgets_spent, 0);
}

#endif /* QINS_CLIENT_RESTART_H */
