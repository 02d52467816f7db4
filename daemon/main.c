/* SPDX-License-Identifier: MIT */
/*
 * main.c — qinsd's entry point: options (config.c), log, then the server (loop.c) until a
 * clean shutdown. Exit status: 0 clean shutdown, 1 runtime error (store, socket), 2 bad option.
 */
#include <stdio.h>
#include <string.h>

#include "qinsd.h"

int main(int argc, char **argv) {
  int check = qd_config_load(argc, argv);
  if (check) {
    printf("qinsd: configuration ok\n");
    return 0;
  }
  int rc = qd_log_open(qd_srv.cfg.log);
  if (rc) {
    fprintf(stderr, "qinsd: cannot open log %s: %s\n", qd_srv.cfg.log, strerror(-rc));
    return 1;
  }
  qd_log_level = qd_srv.cfg.log_level;
  return qd_server_run();
}
