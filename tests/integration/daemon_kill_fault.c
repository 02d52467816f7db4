/* SPDX-License-Identifier: MIT */
/*
 * daemon_kill_fault.c — fault: qinsd killed with SIGKILL while several clients fetch (issue 7).
 * The socket file stays behind (nobody listens on it); a new qinsd on the same store and socket
 * path replaces it, the clients reconnect and every fetch is correct again, every tensor serves
 * the same bytes as before the kill, and `qinsctl verify` passes (a reader killed mid-transaction
 * leaves nothing to repair: LMDB's reader slots of the dead process are cleared at the next open,
 * mdb_reader_check). docs/qinsd.md "Lifecycle", docs/OPERATIONS.md "Errors".
 *
 * The clients are libqins threads of the test process (it never opens the LMDB env); each counts
 * fetches equal to the source and calls that failed (a call in flight at the kill, connects while
 * the daemon is down); a tensor returned must never hold wrong numbers. Progress is polled, never
 * timed.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>

#include "daemon_fixture.h"
#include "qins.h"
#include "qt.h"

TestSuite(daemon_kill_fault, .init = setup, .fini = teardown, .timeout = 120);

#define N_CLIENTS 6
#define BIG_N (1024 * 600) /* elements of std tensor "big" (index 3) */

typedef struct client {
  pthread_t thr;
  atomic_int *stop;      /* set by the test to end the loop */
  atomic_ullong ok;      /* fetches equal to the source */
  atomic_ullong failed;  /* calls that failed (connection lost, refused, ...) */
  atomic_ullong wrong;   /* data returned that differs from the source: must stay 0 */
} client;

static void *client_run(void *arg) {
  client *cl = arg;
  float *v = malloc(BIG_N * sizeof *v);
  qins_client *c = NULL;
  unsigned k = 0;
  while (!atomic_load(cl->stop)) {
    if (!c && qins_connect(&c, D.sock, 5000)) {
      c = NULL;
      atomic_fetch_add(&cl->failed, 1);
      sched_yield();
      continue;
    }
    qins_set_retry(c, 0); /* the kill's failures are counted here; riding through them is
                             client_reconnect.c's subject */
    int rc;
    int good = 1;
    if (k++ % 2 == 0) { /* the whole 2.4 MB tensor (pool decode) */
      rc = qins_get_into(c, "m", "big", NULL, 0, QINS_F32, v, BIG_N * 4, NULL, NULL, NULL);
      for (uint64_t i = 0; rc == 0 && i < BIG_N; i += 61) good &= v[i] == ts_value(3, i);
    } else { /* a row slice */
      qins_range r = {100, 110};
      rc = qins_get_into(c, "m", "big", &r, 1, QINS_F32, v, 10 * 600 * 4, NULL, NULL, NULL);
      for (uint64_t i = 0; rc == 0 && i < 10 * 600; i++) good &= v[i] == ts_value(3, 100 * 600 + i);
    }
    if (rc == 0 && good) {
      atomic_fetch_add(&cl->ok, 1);
    } else if (rc == 0) {
      atomic_fetch_add(&cl->wrong, 1);
    } else {
      atomic_fetch_add(&cl->failed, 1);
      qins_close(c);
      c = NULL;
    }
  }
  qins_close(c);
  free(v);
  return NULL;
}

/* Waits until every client has at least `want` good fetches (bounded by the suite's timeout). */
static void wait_progress(client *cl, unsigned long long want) {
  for (;;) {
    int all = 1;
    for (int i = 0; i < N_CLIENTS; i++) all &= atomic_load(&cl[i].ok) >= want;
    if (all) return;
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
  }
}

Test(daemon_kill_fault, sigkill_under_load_then_restart_serves_and_verifies) {
  got before[N_STD];
  ts_rx rx;
  open_rx(&rx);
  for (size_t k = 0; k < N_STD; k++) {
    before[k] = do_get(&rx, "m", std_tensors[k].name, -1, NULL, NULL);
    cr_assert_eq(before[k].code, 0);
  }
  ts_rx_destroy(&rx);

  atomic_int stop = 0;
  client cl[N_CLIENTS];
  memset(cl, 0, sizeof cl);
  for (int i = 0; i < N_CLIENTS; i++) {
    cl[i].stop = &stop;
    cr_assert_eq(pthread_create(&cl[i].thr, NULL, client_run, &cl[i]), 0);
  }
  wait_progress(cl, 5);

  /* SIGKILL mid-load: no handler runs, the socket file stays, nobody listens on it. */
  cr_assert_eq(kill(D.pid, SIGKILL), 0);
  int st;
  cr_assert_eq(waitpid(D.pid, &st, 0), D.pid);
  cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
  D.pid = 0;
  struct stat sst;
  cr_assert_eq(lstat(D.sock, &sst), 0, "the killed daemon's socket file is left behind");
  cr_assert(S_ISSOCK(sst.st_mode));
  int fd = ts_connect(D.sock);
  cr_assert_eq(fd, -ECONNREFUSED, "nobody listens on the stale socket (got %d)", fd);
  unsigned long long ok_at_kill[N_CLIENTS];
  for (int i = 0; i < N_CLIENTS; i++) ok_at_kill[i] = atomic_load(&cl[i].ok);

  /* Restart on the same store and socket path: the stale socket is replaced. */
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "qinsd restarts on the same store and socket");
  for (int i = 0; i < N_CLIENTS; i++) {
    unsigned long long want = ok_at_kill[i] + 5;
    while (atomic_load(&cl[i].ok) < want) {
      struct timespec ts = {0, 2000000};
      nanosleep(&ts, NULL);
    }
  }
  atomic_store(&stop, 1);
  unsigned long long failed = 0;
  for (int i = 0; i < N_CLIENTS; i++) {
    pthread_join(cl[i].thr, NULL);
    cr_assert_eq(atomic_load(&cl[i].wrong), 0, "client %d got wrong numbers", i);
    failed += atomic_load(&cl[i].failed);
  }
  cr_assert_gt(failed, 0, "the clients did see the daemon go away");
  FILE *f = fopen(D.log, "r");
  char line[1024];
  int replaced = 0;
  while (f && fgets(line, sizeof line, f)) replaced |= strstr(line, "removed a stale socket file") != NULL;
  if (f) fclose(f);
  cr_assert(replaced, "the new daemon logged replacing the stale socket");

  /* Everything serves the same bytes as before, and the store verifies. */
  open_rx(&rx);
  for (size_t k = 0; k < N_STD; k++) {
    got g = do_get(&rx, "m", std_tensors[k].name, -1, NULL, NULL);
    cr_assert_eq(g.code, 0, "%s", std_tensors[k].name);
    cr_assert_eq(g.bytes, before[k].bytes);
    cr_assert_eq(memcmp(g.data, before[k].data, g.bytes), 0, "%s", std_tensors[k].name);
    free(g.data);
    free(before[k].data);
  }
  ts_rx_destroy(&rx);
  char bin[512];
  qt_bin("qinsctl", bin, sizeof bin);
  char *argv[] = {bin, "--store", D.store, "--json", "verify", NULL};
  char *out = NULL, *err = NULL;
  int rc = qt_run(argv, NULL, &out, &err);
  cr_assert_eq(rc, 0, "verify after the kill: %s %s", out, err);
  cr_assert(strstr(out, "\"ok\":true"), "%s", out);
  free(out);
  free(err);
}
