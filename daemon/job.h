/* SPDX-License-Identifier: MIT */
/*
 * job.h — decode jobs (job.c): a get or get_many, planned and decoded in one LMDB read txn. A
 * job whose output is at most inline-decode-bytes runs on the loop thread and answers at once;
 * a larger one runs on the libuv pool (the request is deferred); a large single get streams its
 * pieces (reply.h). Loop thread only.
 */
#ifndef QINS_JOB_H
#define QINS_JOB_H

#include <stddef.h>
#include <stdint.h>

#include "reply.h"
#include "store.h"

/* What was asked: filled by the handler (methods.c), read-only once the job starts. A new ask
 * has every field before `slice` zero and empty strings; the handler writes the rest. */
typedef struct qd_ask {
  int many;                      /* get_many */
  int by_prefix;
  char (*names)[QS_MAX_NAME + 1]; /* get_many by names (malloc'd; the job frees it) */
  uint32_t n_names;
  int has_slice;
  int dt, dt_given;              /* output dtype (qc_dtype) and whether it was asked */
  qs_slice slice;                /* get */
  char model[QS_MAX_NAME + 1];
  char name[QS_MAX_NAME + 1];    /* get */
  char prefix[QS_MAX_NAME + 1];  /* get_many by prefix */
} qd_ask;

/* A new job's ask, to fill (NULL when out of memory). Either qd_job_start or qd_job_discard it. */
qd_ask *qd_job_new(void);
void qd_job_discard(qd_ask *a);
/* Runs the job: answers r now (inline) or defers it to the pool. 0, or an error code with r->msg
 * set (the job is then freed). */
int qd_job_start(qd_req *r, qd_ask *a);

/* A store error as a wire code, with msg naming the object (errno values become INTERNAL). */
int qd_store_err(char *msg, size_t cap, int rc, const char *model, const char *name);

#endif /* QINS_JOB_H */
