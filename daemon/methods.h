/* SPDX-License-Identifier: MIT */
/*
 * methods.h — the method table (methods.c): dispatch (conn.c) finds a method by name and calls
 * its handler with the request; `qinsd --methods` (config.c) and `stats` list the table. A test
 * checks each name has its section in docs/PROTOCOL.md §4.
 */
#ifndef QINS_METHODS_H
#define QINS_METHODS_H

#include <stddef.h>

#include "reply.h"

enum { QD_READONLY = 1, QD_ADMIN = 2 };
/* Runs on the loop thread: answers through reply.h (or hands the request to a job) and returns 0,
 * or returns an error code with r->msg set (dispatch then replies with it). */
typedef int (*qd_handler)(qd_req *r);
typedef struct qd_method {
  const char *name;     /* wire name */
  unsigned flags;       /* QD_READONLY, QD_ADMIN */
  qd_handler handler;
  const char *params;   /* named arguments, for --methods and docs */
  const char *summary;  /* one line */
} qd_method;
extern const qd_method qd_methods[];
extern const int qd_n_methods;
int qd_method_find(const char *name, size_t len); /* index or -1 */

#endif /* QINS_METHODS_H */
