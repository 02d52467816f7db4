/* SPDX-License-Identifier: MIT */
/*
 * stage.c — writes: the staged import of one model (qs_import_begin ... qs_import_commit or
 * qs_import_abort) and model removal (qs_model_remove).
 *
 * Invariants.
 *  - An import registers its fresh id in "staging" (state IMPORTING) in its first transaction and
 *    removes it in the same transaction that points the name at the id; a removal or a replace
 *    moves the old id to "staging" (state GARBAGE) in that same transaction. Readers see the
 *    whole model or none of it; a killed import leaves only staged ids for gc.c.
 *  - Model ids are never reused (meta.next_model_id).
 *  - Each staging write transaction holds at most about QS_TXN_BYTES of new data.
 *  - Codec parameter blobs are shared: keyed by a content hash, refcounted by tensor records; a
 *    tensor record and its reference are written in the same transaction.
 *  - Lossy chunks are encoded by worker threads but put into LMDB in chunk order, by the
 *    importing thread only: checksums, figures and the first error are as a sequential encode.
 */
#include <errno.h>
#include <lmdb.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qins_text.h"
#include "store_int.h"

/* ---------------------------------------------------------------------------------------------
 * Import */
struct qs_import {
  qs_store *s;            /* store */
  MDB_txn *txn;           /* open staging write txn, or NULL */
  uint64_t txn_bytes;     /* data put in txn so far */
  uint64_t id;            /* fresh model id */
  char name[QS_MAX_NAME + 1]; /* model name */
  char *metadata;         /* JSON object text */
  uint64_t n_tensors, src_bytes, stored_bytes, n_elem; /* model totals */
  uint64_t *pids;         /* params ids already paid for in this model */
  size_t n_pids, cap_pids;
  /* current tensor */
  int in_tensor;          /* between tensor_begin and tensor_end */
  qs_tensor cur;          /* its description (codec, shape, params, ...) */
  uint64_t rows_done;     /* rows encoded so far */
  uint64_t chunk_idx;     /* next chunk index */
  uint64_t data_bytes;    /* chunk payload bytes so far */
  uint32_t tcrc;          /* running crc over chunk crcs */
  qc_stats stats;         /* encode error figures */
  qc_stats src_stats;     /* the caller's figures against the source (has_src_stats) */
  int has_src_stats;
  size_t row_bytes;       /* input bytes per row (f32 or raw) */
  uint8_t *pend;          /* buffered rows (fewer than a chunk) */
  uint64_t pend_rows;     /* rows in pend */
  uint8_t *blob;          /* serialized params */
  size_t blob_len;
  /* Parallel encoding (lossy codecs): chunks are copied into jobs that worker threads encode;
   * the importing thread puts finished jobs into LMDB in chunk order (so checksums, figures and
   * the first error are as a sequential encode would give). At most QS_JOBS_MAX jobs in flight:
   * memory stays bounded. tensor_end drains the jobs before writing the tensor's record. */
  int nw;                 /* worker threads, 0 = encode inline */
  pthread_t *workers;
  pthread_mutex_t jmu;    /* guards the job ring and job states */
  pthread_cond_t jwork;   /* a job was queued, or stop */
  pthread_cond_t jdone;   /* a job finished */
  struct qs__job *jobs;   /* ring of nw + 1 jobs */
  size_t njobs;
  uint64_t jhead, jnext, jtail; /* oldest unharvested, next for a worker, next free */
  int jstop;              /* workers exit */
  int jfailed;            /* a harvested job failed: later results are dropped */
  int figs_set;           /* qs_import_tensor_figures gave the tensor's figures */
  double figs_snr, figs_max;
};

typedef struct qs__job {
  qs_import *im;          /* owner */
  uint8_t *in;            /* rows (f32), copied from the caller */
  size_t in_cap;
  uint8_t *out;           /* encoded payload */
  size_t out_cap;
  uint64_t nr, row0;      /* rows, first row within the tensor */
  uint64_t pay;           /* payload bytes */
  uint32_t crc;           /* CRC-32C of the payload */
  qc_stats st;            /* this chunk's error figures */
  uint64_t bad;           /* element within the chunk when rc is ENONFINITE/EUNSUPPORTED */
  int rc;                 /* qc_encode's result */
  int state;              /* 0 free, 1 queued, 2 running, 3 done */
} qs__job;

#define QS_JOBS_MAX 9 /* in-flight chunk jobs at most (workers + 1, workers <= 8) */

static void *qs__worker(void *arg) {
  qs_import *im = arg;
  pthread_mutex_lock(&im->jmu);
  for (;;) {
    while (!im->jstop && im->jnext == im->jtail) pthread_cond_wait(&im->jwork, &im->jmu);
    if (im->jstop) break;
    qs__job *j = &im->jobs[im->jnext++ % im->njobs];
    j->state = 2;
    pthread_mutex_unlock(&im->jmu);
    const qs_tensor *t = &im->cur; /* constant while the tensor's jobs run */
    memset(&j->st, 0, sizeof j->st);
    j->bad = 0;
    j->rc = qc_encode(&t->params, t->row_len, j->nr, (const float *)j->in, j->out, &j->st, &j->bad);
    if (!j->rc && qc_codec_varsize((qc_codec)t->codec)) /* qinsx: the size its data needed */
      j->rc = qc_chunk_size(&t->params, t->row_len, j->nr, j->out, j->pay, &j->pay);
    if (!j->rc) j->crc = qs__crc32c(0, j->out, j->pay);
    pthread_mutex_lock(&im->jmu);
    j->state = 3;
    pthread_cond_broadcast(&im->jdone);
  }
  pthread_mutex_unlock(&im->jmu);
  return NULL;
}

static int qs__im_txn(qs_import *im, uint64_t extra) {
  if (im->txn) return 0;
  int rc = qs__write_check(im->s);
  if (rc) return rc;
  rc = qs__ensure_map(im->s, extra > QS_TXN_BYTES ? extra : QS_TXN_BYTES);
  if (rc) return rc;
  rc = qs__begin(im->s, 0, &im->txn);
  if (rc) return qs__mdb_fail(im->s, rc, "beginning a write transaction");
  im->txn_bytes = 0;
  return 0;
}

static int qs__im_flush(qs_import *im) {
  if (!im->txn) return 0;
  int rc = qs__commit(im->s, im->txn);
  im->txn = NULL;
  return rc ? qs__mdb_fail(im->s, rc, "committing staged data") : 0;
}

int qs_import_begin(qs_store *s, const char *model, const char *metadata_json, qs_import **out) {
  *out = NULL;
  int rc = qs__name_check("model", model, 1);
  if (rc) return rc;
  if ((rc = qs__lock(s))) return rc;
  if ((rc = qs__gc_all(s))) {
    qs__unlock(s);
    return rc;
  }
  qs_import *im = calloc(1, sizeof *im);
  if (!im || !(im->metadata = strdup(metadata_json && *metadata_json ? metadata_json : "{}"))) {
    if (im) free(im);
    qs__unlock(s);
    return qs__fail(QINS_ENOMEM, "out of memory");
  }
  im->s = s;
  snprintf(im->name, sizeof im->name, "%s", model);
  if ((rc = qs__im_txn(im, 1 << 20))) goto fail;
  MDB_val k = {4, "qins"}, v;
  if ((rc = mdb_get(im->txn, s->db_meta, &k, &v)) || v.mv_size < QS_META_SIZE) {
    rc = rc ? qs__mdb_fail(s, rc, "reading meta") : qs__fail(QINS_ECORRUPT, "store %s: bad meta", s->dir);
    goto fail;
  }
  uint8_t meta[QS_META_SIZE];
  memcpy(meta, v.mv_data, QS_META_SIZE);
  im->id = qs__get_u64(meta + 16);
  qs__put_u64(meta + 16, im->id + 1);
  v.mv_data = meta;
  if ((rc = mdb_put(im->txn, s->db_meta, &k, &v, 0)) ||
      (rc = qs__stage_put(s, im->txn, im->id, QS_STAGE_IMPORTING, model))) {
    rc = qs__mdb_fail(s, rc, "starting an import");
    goto fail;
  }
  if ((rc = qs__im_flush(im))) goto fail;
  /* Encoding threads: $QINS_IMPORT_THREADS, else one per online CPU (at most 8); 1 = inline. */
  long nw = sysconf(_SC_NPROCESSORS_ONLN);
  const char *ev = getenv("QINS_IMPORT_THREADS");
  if (ev && *ev) nw = strtol(ev, NULL, 10);
  if (nw > QS_JOBS_MAX - 1) nw = QS_JOBS_MAX - 1;
  if (nw > 1) {
    im->njobs = (size_t)nw + 1;
    im->jobs = calloc(im->njobs, sizeof *im->jobs);
    im->workers = calloc((size_t)nw, sizeof *im->workers);
    if (im->jobs && im->workers) {
      pthread_mutex_init(&im->jmu, NULL);
      pthread_cond_init(&im->jwork, NULL);
      pthread_cond_init(&im->jdone, NULL);
      for (long i = 0; i < nw; i++) {
        if (pthread_create(&im->workers[i], NULL, qs__worker, im)) break;
        im->nw++;
      }
      if (!im->nw) {
        pthread_mutex_destroy(&im->jmu);
        pthread_cond_destroy(&im->jwork);
        pthread_cond_destroy(&im->jdone);
      }
    }
  }
  *out = im;
  return 0;
fail:
  qs__abort(s, im->txn);
  free(im->metadata);
  free(im);
  qs__unlock(s);
  return rc;
}

uint64_t qs_import_chunk_rows(const qs_import *im) { return im->in_tensor ? im->cur.rows_per_chunk : 0; }

int qs_import_tensor_begin(qs_import *im, const qs_tensor_desc *d) {
  if (im->in_tensor) return qs__fail(QINS_EINVALID, "tensor_begin inside a tensor");
  int rc = qs__name_check("tensor", d->name, 0);
  if (rc) return rc;
  if (d->ndim < 0 || d->ndim > QS_MAX_NDIM)
    return qs__fail(QINS_EUNSUPPORTED, "tensor %s: %d dimensions (at most %d)", d->name, d->ndim,
                    QS_MAX_NDIM);
  if ((unsigned)d->src_dtype >= QS_DT_COUNT ||
      (d->codec == QS_RAW && !qs_dtype_size(d->src_dtype)))
    return qs__fail(QINS_EDTYPE, "tensor %s: bad source dtype", d->name);
  if (d->codec != QS_RAW && (d->codec < 0 || d->codec >= QC_CODEC_COUNT || !d->params ||
                             (int)d->params->codec != d->codec))
    return qs__fail(QINS_EINVALID, "tensor %s: bad codec or parameters", d->name);
  qs_tensor *t = &im->cur;
  memset(t, 0, sizeof *t);
  snprintf(t->model, sizeof t->model, "%s", im->name);
  snprintf(t->name, sizeof t->name, "%s", d->name);
  t->model_id = im->id;
  t->index = (uint32_t)im->n_tensors;
  t->ndim = d->ndim;
  uint64_t n = 1;
  for (int i = 0; i < d->ndim; i++) {
    t->shape[i] = d->shape[i];
    if (__builtin_mul_overflow(n, d->shape[i], &n))
      return qs__fail(QINS_EINVALID, "tensor %s: element count overflows", d->name);
  }
  t->n_elem = n;
  t->row_len = d->ndim ? d->shape[d->ndim - 1] : 1;
  t->n_rows = t->row_len ? n / t->row_len : 0;
  t->codec = d->codec;
  t->src_dtype = d->src_dtype;
  im->has_src_stats = d->src_stats && d->codec != QS_RAW;
  if (im->has_src_stats) im->src_stats = *d->src_stats;
  if (__builtin_mul_overflow(n, (uint64_t)qs_dtype_size(d->src_dtype), &t->src_bytes))
    return qs__fail(QINS_EINVALID, "tensor %s: size overflows", d->name);
  if (d->src_bytes) t->src_bytes = d->src_bytes;
  uint64_t row_stored;
  int ovf = 0;
  if (d->codec == QS_RAW) {
    row_stored = t->row_len * qs_dtype_size(d->src_dtype);
    im->row_bytes = (size_t)row_stored;
  } else {
    t->params = *d->params;
    row_stored = qc_chunk_bytes((qc_codec)d->codec, t->row_len, 1, &ovf);
    im->row_bytes = (size_t)(t->row_len * sizeof(float));
  }
  if (ovf || (t->row_len && !row_stored && t->row_len))
    return qs__fail(QINS_EUNSUPPORTED, "tensor %s: rows too large", d->name);
  t->rows_per_chunk = row_stored ? QS_CHUNK_TARGET / row_stored : 1;
  if (t->rows_per_chunk == 0) t->rows_per_chunk = 1;
  if (t->rows_per_chunk > t->n_rows && t->n_rows) t->rows_per_chunk = t->n_rows;
  if (!t->n_rows) t->rows_per_chunk = 1;
  t->n_chunks = t->n_rows ? (t->n_rows + t->rows_per_chunk - 1) / t->rows_per_chunk : 0;
  if (t->n_chunks > UINT32_MAX)
    return qs__fail(QINS_EUNSUPPORTED, "tensor %s: too many chunks", d->name);
  /* Duplicate name within the model? */
  if ((rc = qs__im_txn(im, QS_CHUNK_TARGET))) return rc;
  uint8_t key[8 + QS_MAX_NAME];
  size_t nl = strlen(d->name);
  qs__put_be64(key, im->id);
  memcpy(key + 8, d->name, nl);
  MDB_val k = {8 + nl, key}, v;
  rc = mdb_get(im->txn, im->s->db_tensors, &k, &v);
  if (rc == 0) return qs__fail(QINS_EINVALID, "tensor \"%s\" appears twice in the model", d->name);
  if (rc != MDB_NOTFOUND) return qs__mdb_fail(im->s, rc, "checking a tensor name");
  free(im->pend); /* allocated on first need: callers feeding whole chunks never need it */
  im->pend = NULL;
  im->pend_rows = 0;
  im->rows_done = 0;
  im->chunk_idx = 0;
  im->data_bytes = 0;
  im->tcrc = 0;
  memset(&im->stats, 0, sizeof im->stats);
  im->figs_set = 0;
  free(im->blob);
  im->blob = NULL;
  im->blob_len = 0;
  /* An empty tensor has no chunks to decode and nothing to fit: it stores no parameters. */
  if (d->codec != QS_RAW && t->n_elem && (im->blob_len = qc_params_size((qc_codec)d->codec))) {
    im->blob = malloc(im->blob_len);
    if (!im->blob) return qs__fail(QINS_ENOMEM, "out of memory");
    qc_params_write(d->params, im->blob);
  }
  im->in_tensor = 1;
  return 0;
}

/* Encodes nr rows at src into out, adding the chunk's error figures to the tensor's. */
static int qs__im_encode(qs_import *im, const uint8_t *src, uint64_t nr, uint8_t *out,
                         uint64_t *bad_index) {
  qs_tensor *t = &im->cur;
  uint64_t bad = 0;
  qc_stats cs; /* per chunk, merged as the threaded path merges: same figures either way */
  memset(&cs, 0, sizeof cs);
  int rc = qc_encode(&t->params, t->row_len, nr, (const float *)src, out, &cs, &bad);
  im->stats.sum_sq += cs.sum_sq;
  im->stats.err_sq += cs.err_sq;
  if (cs.max_err > im->stats.max_err) im->stats.max_err = cs.max_err;
  im->stats.n += cs.n;
  if (rc == QINS_ENONFINITE || rc == QINS_EUNSUPPORTED) {
    uint64_t at = im->rows_done * t->row_len + bad;
    if (bad_index) *bad_index = at;
    return qs__fail(rc, "tensor %s: element %llu %s; codec %s refuses it", t->name,
                    (unsigned long long)at,
                    rc == QINS_ENONFINITE ? "is NaN or infinite" : "is out of range",
                    qc_codec_name((qc_codec)t->codec));
  }
  if (rc) return qs__fail(rc, "tensor %s: encode failed (%s)", t->name, qins_strerror(rc));
  return 0;
}

/* Encodes nr rows at src as chunk im->chunk_idx. */
static int qs__im_chunk_sync(qs_import *im, const uint8_t *src, uint64_t nr, uint64_t *bad_index) {
  qs_tensor *t = &im->cur;
  uint64_t pay = qs__chunk_payload(t, nr);
  uint8_t *vbuf = NULL; /* a chunk whose size depends on its data (qinsx): encoded here first */
  int rc;
  if (t->codec != QS_RAW && qc_codec_varsize((qc_codec)t->codec)) {
    if (!(vbuf = malloc(pay ? pay : 1))) return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    rc = qs__im_encode(im, src, nr, vbuf, bad_index);
    if (!rc && (rc = qc_chunk_size(&t->params, t->row_len, nr, vbuf, pay, &pay)))
      rc = qs__fail(rc, "tensor %s: encode failed (%s)", t->name, qins_strerror(rc));
    if (rc) return free(vbuf), rc;
  }
  if ((rc = qs__im_txn(im, pay + QS_CHUNK_HDR))) return free(vbuf), rc;
  uint8_t key[16];
  qs__put_be64(key, im->id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)im->chunk_idx);
  MDB_val k = {16, key}, v = {QS_CHUNK_HDR + pay, NULL};
  rc = mdb_put(im->txn, im->s->db_chunks, &k, &v, MDB_RESERVE);
  if (rc) return free(vbuf), qs__mdb_fail(im->s, rc, "writing a chunk");
  uint8_t *dst = v.mv_data;
  if (t->codec == QS_RAW || vbuf) {
    memcpy(dst + QS_CHUNK_HDR, vbuf ? vbuf : src, pay);
    free(vbuf);
  } else if ((rc = qs__im_encode(im, src, nr, dst + QS_CHUNK_HDR, bad_index))) {
    return rc;
  }
  memcpy(dst, QS_MAGIC_CHUNK, 4);
  uint32_t crc = qs__crc32c(0, dst + QS_CHUNK_HDR, pay);
  qs__put_u32(dst + 4, crc);
  qs__put_u64(dst + 8, pay);
  uint8_t cb[4];
  qs__put_u32(cb, crc);
  im->tcrc = qs__crc32c(im->tcrc, cb, 4);
  im->chunk_idx++;
  im->rows_done += nr;
  im->data_bytes += pay;
  im->txn_bytes += pay + QS_CHUNK_HDR;
  if (im->txn_bytes >= QS_TXN_BYTES) return qs__im_flush(im);
  return 0;
}

/* Puts the oldest job (waiting for it) into LMDB. */
static int qs__im_harvest(qs_import *im, uint64_t *bad_index) {
  qs__job *j = &im->jobs[im->jhead % im->njobs];
  pthread_mutex_lock(&im->jmu);
  while (j->state != 3) pthread_cond_wait(&im->jdone, &im->jmu);
  j->state = 0;
  im->jhead++;
  pthread_mutex_unlock(&im->jmu);
  if (im->jfailed) return QINS_EINTERNAL; /* already reported */
  qs_tensor *t = &im->cur;
  int rc = j->rc;
  if (rc) {
    im->jfailed = 1;
    uint64_t at = j->row0 * t->row_len + j->bad;
    if (bad_index) *bad_index = at;
    if (rc == QINS_ENONFINITE || rc == QINS_EUNSUPPORTED)
      return qs__fail(rc, "tensor %s: element %llu %s; codec %s refuses it", t->name,
                      (unsigned long long)at,
                      rc == QINS_ENONFINITE ? "is NaN or infinite" : "is out of range",
                      qc_codec_name((qc_codec)t->codec));
    return qs__fail(rc, "tensor %s: encode failed (%s)", t->name, qins_strerror(rc));
  }
  if ((rc = qs__im_txn(im, j->pay + QS_CHUNK_HDR))) goto fail;
  uint8_t key[16];
  qs__put_be64(key, im->id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)im->chunk_idx);
  MDB_val k = {16, key}, v = {QS_CHUNK_HDR + j->pay, NULL};
  if ((rc = mdb_put(im->txn, im->s->db_chunks, &k, &v, MDB_RESERVE))) {
    rc = qs__mdb_fail(im->s, rc, "writing a chunk");
    goto fail;
  }
  uint8_t *dst = v.mv_data;
  memcpy(dst, QS_MAGIC_CHUNK, 4);
  qs__put_u32(dst + 4, j->crc);
  qs__put_u64(dst + 8, j->pay);
  memcpy(dst + QS_CHUNK_HDR, j->out, j->pay);
  uint8_t cb[4];
  qs__put_u32(cb, j->crc);
  im->tcrc = qs__crc32c(im->tcrc, cb, 4);
  im->stats.sum_sq += j->st.sum_sq;
  im->stats.err_sq += j->st.err_sq;
  if (j->st.max_err > im->stats.max_err) im->stats.max_err = j->st.max_err;
  im->stats.n += j->st.n;
  im->chunk_idx++;
  im->data_bytes += j->pay;
  im->txn_bytes += j->pay + QS_CHUNK_HDR;
  if (im->txn_bytes >= QS_TXN_BYTES && (rc = qs__im_flush(im))) goto fail;
  return 0;
fail:
  im->jfailed = 1;
  return rc;
}

/* Waits for every job and puts them; the first error wins. */
static int qs__im_drain(qs_import *im, uint64_t *bad_index) {
  int first = 0;
  while (im->jhead != im->jtail) {
    int rc = qs__im_harvest(im, bad_index);
    if (rc && !first) first = rc;
  }
  return first;
}

/* Encodes nr rows at src as the next chunk: queued for a worker (lossy codecs, workers present),
 * else inline. */
static int qs__im_chunk(qs_import *im, const uint8_t *src, uint64_t nr, uint64_t *bad_index) {
  qs_tensor *t = &im->cur;
  if (!im->nw || t->codec == QS_RAW ||
      (!qc_codec_is_lossy((qc_codec)t->codec) && !qc_codec_varsize((qc_codec)t->codec)))
    return qs__im_chunk_sync(im, src, nr, bad_index);
  if (im->jfailed) return QINS_EINTERNAL;
  int rc;
  while (im->jtail - im->jhead >= im->njobs)
    if ((rc = qs__im_harvest(im, bad_index))) return rc;
  qs__job *j = &im->jobs[im->jtail % im->njobs];
  size_t in = (size_t)nr * im->row_bytes;
  uint64_t pay = qs__chunk_payload(t, nr);
  if (j->in_cap < in) {
    free(j->in);
    j->in_cap = 0;
    if (!(j->in = malloc(in))) return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    j->in_cap = in;
  }
  if (j->out_cap < pay) {
    free(j->out);
    j->out_cap = 0;
    if (!(j->out = malloc(pay ? pay : 1))) return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    j->out_cap = pay;
  }
  memcpy(j->in, src, in);
  j->nr = nr;
  j->row0 = im->rows_done;
  j->pay = pay;
  im->rows_done += nr;
  pthread_mutex_lock(&im->jmu);
  j->state = 1;
  im->jtail++;
  pthread_cond_signal(&im->jwork);
  pthread_mutex_unlock(&im->jmu);
  /* Put whatever is already finished, without waiting. */
  for (;;) {
    qs__job *h = &im->jobs[im->jhead % im->njobs];
    pthread_mutex_lock(&im->jmu);
    int ready = im->jhead != im->jtail && h->state == 3;
    pthread_mutex_unlock(&im->jmu);
    if (!ready) break;
    if ((rc = qs__im_harvest(im, bad_index))) return rc;
  }
  return 0;
}

int qs_import_tensor_rows(qs_import *im, const void *rows, uint64_t n_rows, uint64_t *bad_index) {
  if (!im->in_tensor) return qs__fail(QINS_EINVALID, "rows outside a tensor");
  qs_tensor *t = &im->cur;
  if (n_rows > t->n_rows - im->rows_done - im->pend_rows)
    return qs__fail(QINS_EINVALID, "tensor %s: more rows than its shape holds", t->name);
  const uint8_t *src = rows;
  uint64_t rpc = t->rows_per_chunk;
  int rc;
  while (n_rows) {
    if (im->pend_rows == 0 && (n_rows >= rpc || im->rows_done + n_rows == t->n_rows)) {
      uint64_t nr = n_rows < rpc ? n_rows : rpc;
      if ((rc = qs__im_chunk(im, src, nr, bad_index))) return rc;
      src += nr * im->row_bytes;
      n_rows -= nr;
      continue;
    }
    uint64_t take = rpc - im->pend_rows;
    if (take > n_rows) take = n_rows;
    if (!im->pend && !(im->pend = malloc((size_t)rpc * im->row_bytes)))
      return qs__fail(QINS_ENOMEM, "tensor %s: out of memory", t->name);
    memcpy(im->pend + im->pend_rows * im->row_bytes, src, take * im->row_bytes);
    im->pend_rows += take;
    src += take * im->row_bytes;
    n_rows -= take;
    if (im->pend_rows == rpc || im->rows_done + im->pend_rows == t->n_rows) {
      uint64_t nr = im->pend_rows;
      im->pend_rows = 0;
      if ((rc = qs__im_chunk(im, im->pend, nr, bad_index))) return rc;
    }
  }
  return 0;
}

int qs_import_tensor_chunk(qs_import *im, const void *rec, size_t size) {
  if (!im->in_tensor || im->pend_rows || im->jhead != im->jtail)
    return qs__fail(QINS_EINVALID, "encoded chunk outside a tensor or after buffered rows");
  qs_tensor *t = &im->cur;
  uint64_t rows;
  int rc = qs__chunk_rec_check(t, im->chunk_idx, rec, size, 1, &rows);
  if (rc) return rc;
  if ((rc = qs__im_txn(im, size))) return rc;
  uint8_t key[16];
  qs__put_be64(key, im->id);
  qs__put_be32(key + 8, t->index);
  qs__put_be32(key + 12, (uint32_t)im->chunk_idx);
  MDB_val k = {16, key}, v = {size, (void *)rec};
  if ((rc = mdb_put(im->txn, im->s->db_chunks, &k, &v, 0))) return qs__mdb_fail(im->s, rc, "writing a chunk");
  im->tcrc = qs__crc32c(im->tcrc, (const uint8_t *)rec + 4, 4);
  im->chunk_idx++;
  im->rows_done += rows;
  im->data_bytes += size - QS_CHUNK_HDR;
  im->txn_bytes += size;
  return im->txn_bytes >= QS_TXN_BYTES ? qs__im_flush(im) : 0;
}

void qs_import_tensor_figures(qs_import *im, double snr_db, double max_err) {
  im->figs_set = 1;
  im->figs_snr = snr_db;
  im->figs_max = max_err;
}

static int qs__im_params_ref(qs_import *im, uint64_t *pid_out, int *first) {
  uint8_t seedb = (uint8_t)im->cur.codec;
  uint64_t id = qs__hash64(im->blob, im->blob_len, 0x51494e53u + seedb);
  for (int probe = 0; probe < 64; probe++, id++) {
    if (!id) id = 1;
    uint8_t key[8];
    qs__put_be64(key, id);
    MDB_val k = {8, key}, v;
    int rc = mdb_get(im->txn, im->s->db_params, &k, &v);
    if (rc == MDB_NOTFOUND) {
      MDB_val nv = {QS_PARAMS_HDR + im->blob_len, NULL};
      if ((rc = mdb_put(im->txn, im->s->db_params, &k, &nv, MDB_RESERVE))) return rc;
      uint8_t *p = nv.mv_data;
      memset(p, 0, QS_PARAMS_HDR);
      memcpy(p, QS_MAGIC_PARAMS, 4);
      p[4] = seedb;
      qs__put_u64(p + 8, 1);
      qs__put_u32(p + 16, (uint32_t)im->blob_len);
      qs__put_u32(p + 20, qs__crc32c(0, im->blob, im->blob_len));
      memcpy(p + QS_PARAMS_HDR, im->blob, im->blob_len);
      break;
    }
    if (rc) return rc;
    const uint8_t *p = v.mv_data;
    if (v.mv_size == QS_PARAMS_HDR + im->blob_len && p[4] == seedb &&
        !memcmp(p + QS_PARAMS_HDR, im->blob, im->blob_len)) {
      uint8_t *copy = malloc(v.mv_size);
      if (!copy) return ENOMEM;
      memcpy(copy, p, v.mv_size);
      qs__put_u64(copy + 8, qs__get_u64(p + 8) + 1);
      MDB_val nv = {v.mv_size, copy};
      rc = mdb_put(im->txn, im->s->db_params, &k, &nv, 0);
      free(copy);
      if (rc) return rc;
      break;
    }
  }
  *pid_out = id;
  *first = 1;
  for (size_t i = 0; i < im->n_pids; i++)
    if (im->pids[i] == id) *first = 0;
  if (*first) {
    uint64_t *np = qp_grow(im->pids, &im->cap_pids, im->n_pids, sizeof *np, 16);
    if (!np) return ENOMEM;
    im->pids = np;
    im->pids[im->n_pids++] = id;
  }
  return 0;
}

int qs_import_tensor_end(qs_import *im, qs_tensor *st) {
  if (!im->in_tensor) return qs__fail(QINS_EINVALID, "tensor_end outside a tensor");
  qs_tensor *t = &im->cur;
  int drc = qs__im_drain(im, NULL);
  if (drc) return drc;
  if (im->rows_done != t->n_rows)
    return qs__fail(QINS_EINVALID, "tensor %s: %llu of %llu rows were given", t->name,
                    (unsigned long long)(im->rows_done + im->pend_rows),
                    (unsigned long long)t->n_rows);
  int rc = qs__im_txn(im, 1 << 20);
  if (rc) return rc;
  uint64_t pid = 0;
  int first = 0;
  if (im->blob_len && (rc = qs__im_params_ref(im, &pid, &first)))
    return qs__mdb_fail(im->s, rc, "writing codec parameters");
  /* SNR and max error as measured by the encoder (+inf / 0 when nothing was lost). */
  t->snr_db = t->codec != QS_RAW && im->stats.n ? qc_stats_snr_db(&im->stats) : INFINITY;
  t->max_err = t->codec != QS_RAW ? im->stats.max_err : 0;
  if (im->has_src_stats) { /* measured by the importer against the source's own values */
    t->snr_db = im->src_stats.n ? qc_stats_snr_db(&im->src_stats) : INFINITY;
    t->max_err = im->src_stats.max_err;
  }
  if (im->figs_set) { /* carried over from another store (qs_import_tensor_figures) */
    t->snr_db = im->figs_snr;
    t->max_err = im->figs_max;
  }
  size_t nl = strlen(t->name);
  uint8_t rec[QS_TENSOR_HDR + QS_MAX_NAME + 1] = {0};
  memcpy(rec, QS_MAGIC_TENSOR, 4);
  qs__put_u16(rec + 4, QS_FORMAT_VERSION);
  rec[6] = (uint8_t)t->codec;
  rec[7] = (uint8_t)t->src_dtype;
  rec[8] = (uint8_t)t->ndim;
  rec[9] = first ? QS_TF_PARAMS_FIRST : 0;
  qs__put_u16(rec + 10, (uint16_t)nl);
  qs__put_u32(rec + 12, t->index);
  for (int i = 0; i < QS_MAX_NDIM; i++) qs__put_u64(rec + 16 + 8 * i, t->shape[i]);
  qs__put_u64(rec + 80, t->n_elem);
  qs__put_u64(rec + 88, t->row_len);
  qs__put_u64(rec + 96, t->n_rows);
  qs__put_u64(rec + 104, t->rows_per_chunk);
  qs__put_u64(rec + 112, t->n_chunks);
  qs__put_u64(rec + 120, t->src_bytes);
  qs__put_u64(rec + 128, im->data_bytes);
  qs__put_u64(rec + 136, pid);
  qs__put_u32(rec + 144, (uint32_t)im->blob_len);
  qs__put_u32(rec + 148, im->tcrc);
  qs__put_f64(rec + 152, t->snr_db);
  qs__put_f64(rec + 160, t->max_err);
  memcpy(rec + QS_TENSOR_HDR, t->name, nl);
  qs__put_u32(rec + QS_TENSOR_CRC, qs__rec_crc(rec, QS_TENSOR_HDR + nl + 1, QS_TENSOR_CRC));
  uint8_t key[8 + QS_MAX_NAME];
  qs__put_be64(key, im->id);
  memcpy(key + 8, t->name, nl);
  MDB_val k = {8 + nl, key}, v = {QS_TENSOR_HDR + nl + 1, rec};
  rc = mdb_put(im->txn, im->s->db_tensors, &k, &v, MDB_NOOVERWRITE);
  if (rc == MDB_KEYEXIST)
    return qs__fail(QINS_EINVALID, "tensor \"%s\" appears twice in the model", t->name);
  if (rc) return qs__mdb_fail(im->s, rc, "writing a tensor record");
  t->stored_bytes = im->data_bytes + (first ? im->blob_len : 0);
  im->n_tensors++;
  im->src_bytes += t->src_bytes;
  im->stored_bytes += t->stored_bytes;
  im->n_elem += t->n_elem;
  im->in_tensor = 0;
  if (st) *st = *t;
  return 0;
}

static void qs__im_free(qs_import *im) {
  im->jfailed = 1; /* pending results are dropped, never put */
  if (im->nw) {
    qs__im_drain(im, NULL); /* results dropped: nothing may run while we free */
    pthread_mutex_lock(&im->jmu);
    im->jstop = 1;
    pthread_cond_broadcast(&im->jwork);
    pthread_mutex_unlock(&im->jmu);
    for (int i = 0; i < im->nw; i++) pthread_join(im->workers[i], NULL);
    pthread_mutex_destroy(&im->jmu);
    pthread_cond_destroy(&im->jwork);
    pthread_cond_destroy(&im->jdone);
  }
  for (size_t i = 0; im->jobs && i < im->njobs; i++) {
    free(im->jobs[i].in);
    free(im->jobs[i].out);
  }
  free(im->jobs);
  free(im->workers);
  free(im->metadata);
  free(im->pids);
  free(im->pend);
  free(im->blob);
  free(im);
}

void qs_import_abort(qs_import *im) {
  if (!im) return;
  qs_store *s = im->s;
  char msg[sizeof qs__errbuf];
  snprintf(msg, sizeof msg, "%s", qs__errbuf); /* keep the error that caused the abort */
  qs__abort(s, im->txn);
  im->txn = NULL;
  qs__gc_id(s, im->id);
  qs__im_free(im);
  qs__unlock(s);
  snprintf(qs__errbuf, sizeof qs__errbuf, "%s", msg);
}

int qs_import_commit(qs_import *im) {
  qs_store *s = im->s;
  int rc;
  if (im->in_tensor) {
    rc = qs__fail(QINS_EINVALID, "commit inside tensor %s", im->cur.name);
    qs_import_abort(im);
    return rc;
  }
  if ((rc = qs__im_flush(im))) {
    qs_import_abort(im);
    return rc;
  }
  size_t nl = strlen(im->name), ml = strlen(im->metadata);
  size_t rl = QS_MODEL_HDR + nl + 1 + ml + 1;
  uint8_t *rec = calloc(1, rl);
  if (!rec) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    qs_import_abort(im);
    return rc;
  }
  memcpy(rec, QS_MAGIC_MODEL, 4);
  qs__put_u16(rec + 4, QS_FORMAT_VERSION);
  qs__put_u16(rec + 6, (uint16_t)nl);
  qs__put_u64(rec + 8, im->id);
  qs__put_u64(rec + 16, im->n_tensors);
  qs__put_u64(rec + 24, im->src_bytes);
  qs__put_u64(rec + 32, im->stored_bytes);
  qs__put_u64(rec + 40, im->n_elem);
  qs__put_u64(rec + 48, (uint64_t)time(NULL));
  qs__put_u32(rec + 56, (uint32_t)ml);
  memcpy(rec + QS_MODEL_HDR, im->name, nl);
  memcpy(rec + QS_MODEL_HDR + nl + 1, im->metadata, ml);
  qs__put_u32(rec + QS_MODEL_CRC, qs__rec_crc(rec, QS_MODEL_HDR + nl + 1, QS_MODEL_CRC));
  uint64_t old = 0;
  if ((rc = qs__im_txn(im, rl))) goto fail;
  MDB_val k = {nl, im->name}, v;
  rc = mdb_get(im->txn, s->db_models, &k, &v);
  if (rc == 0 && v.mv_size >= QS_MODEL_HDR) old = qs__get_u64((const uint8_t *)v.mv_data + 8);
  else if (rc && rc != MDB_NOTFOUND) goto mdbfail;
  if (old && (rc = qs__stage_put(s, im->txn, old, QS_STAGE_GARBAGE, im->name))) goto mdbfail;
  v.mv_size = rl;
  v.mv_data = rec;
  if ((rc = mdb_put(im->txn, s->db_models, &k, &v, 0))) goto mdbfail;
  uint8_t sk[8];
  qs__put_be64(sk, im->id);
  MDB_val skv = {8, sk};
  if ((rc = mdb_del(im->txn, s->db_staging, &skv, NULL))) goto mdbfail;
  rc = qs__commit(s, im->txn);
  im->txn = NULL;
  if (rc) goto mdbfail;
  free(rec);
  /* The model is visible. Reclaim the replaced one (a failure here leaves staging for later). */
  if (old) qs__gc_id(s, old);
  qs__errbuf[0] = 0;
  qs__im_free(im);
  qs__unlock(s);
  return 0;
mdbfail:
  rc = qs__mdb_fail(s, rc, "publishing the model");
fail:
  free(rec);
  qs_import_abort(im);
  return rc;
}

int qs_model_remove(qs_store *s, const char *model) {
  int rc = qs__name_check("model", model, 1);
  if (rc) return rc;
  if ((rc = qs__lock(s))) return rc;
  if ((rc = qs__gc_all(s))) goto out;
  if ((rc = qs__ensure_map(s, 1 << 20))) goto out;
  MDB_txn *txn;
  if ((rc = qs__begin(s, 0, &txn))) {
    rc = qs__mdb_fail(s, rc, "removing a model");
    goto out;
  }
  MDB_val k = {strlen(model), (void *)model}, v;
  rc = mdb_get(txn, s->db_models, &k, &v);
  if (rc == MDB_NOTFOUND) {
    qs__abort(s, txn);
    char esc[96];
    qs__escape(model, esc, sizeof esc);
    rc = qs__fail(QINS_ENO_MODEL, "no model \"%s\" in store %s", esc, s->dir);
    goto out;
  }
  uint64_t id = 0;
  if (!rc && v.mv_size >= QS_MODEL_HDR) id = qs__get_u64((const uint8_t *)v.mv_data + 8);
  if (rc || (rc = qs__stage_put(s, txn, id, QS_STAGE_GARBAGE, model)) ||
      (rc = mdb_del(txn, s->db_models, &k, NULL))) {
    qs__abort(s, txn);
    rc = qs__mdb_fail(s, rc, "removing a model");
    goto out;
  }
  if ((rc = qs__commit(s, txn))) {
    rc = qs__mdb_fail(s, rc, "removing a model");
    goto out;
  }
  rc = qs__gc_id(s, id);
out:
  qs__unlock(s);
  return rc;
}
