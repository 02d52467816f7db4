/* SPDX-License-Identifier: MIT */
/*
 * qfile.c — the portable model file (.qins, docs/FORMAT.md §3): a model written out as stored
 * (metadata, codec parameter blobs, tensor descriptors, chunk records with their CRC-32C) and read
 * back into another store without re-encoding.
 *
 * Layout: a 96-byte header, an index (the body's SHA-256 and one SHA-256 per fixed-size piece of
 * the body), then the body. The header pins the index with its SHA-256, so a reader that fetched
 * the header and index can verify every piece as it arrives, in any order (qinsctl pull).
 *
 * Export walks the model twice under one read transaction: once to size the body (from the
 * records), once to write it at its final offset while hashing pieces; the header and index go in
 * last, then the file is renamed into place. Import reads the file sequentially one piece at a time
 * (bounded memory: one piece and one chunk; the caller's own already-verified file, pull's staging
 * file, is mapped and read in place instead), verifies each piece and every record's checksum and
 * stages the chunk records as they are (qs_import_tensor_chunk); the model is published by
 * qs_import_commit only after the last byte verified, so a bad file leaves the store unchanged.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store_int.h"

#define QF_HDR QS_QFILE_HDR
#define QF_MODEL_HDR 48
#define QF_TENSOR_HDR 136
#define QF_END_HDR 16
#define QF_PIECE_MAX (64ull << 20)
#define QF_CHUNK_MAX (1ull << 31) /* a chunk record larger than this is refused (bounded memory) */

void qs_sha256(const void *p, size_t n, uint8_t out[32]) {
  unsigned len = 32;
  EVP_Digest(p, n, out, &len, EVP_sha256(), NULL);
}

void qs_hex(const uint8_t *b, size_t n, char *out) {
  static const char h[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = h[b[i] >> 4];
    out[2 * i + 1] = h[b[i] & 15];
  }
  out[2 * n] = 0;
}

int qs_qfile_parse_header(const char *what, const uint8_t *p, size_t n, qs_qfile_header *h) {
  if (n < QF_HDR || memcmp(p, QS_QFILE_MAGIC, 8))
    return qs__fail(QINS_ECORRUPT, "%s: not a qins model file (bad magic)", what);
  if (qs__get_u32(p + 8) != QS_QFILE_VERSION)
    return qs__fail(QINS_EVERSION, "%s: model file version %u (this qins reads %u)", what,
                    qs__get_u32(p + 8), QS_QFILE_VERSION);
  if (qs__crc32c(0, p, QF_HDR - 4) != qs__get_u32(p + QF_HDR - 4))
    return qs__fail(QINS_ECHECKSUM, "%s: header fails its checksum", what);
  memset(h, 0, sizeof *h);
  h->file_bytes = qs__get_u64(p + 16);
  h->piece_size = qs__get_u64(p + 24);
  h->n_pieces = qs__get_u64(p + 32);
  h->index_bytes = qs__get_u64(p + 40);
  h->data_off = QF_HDR + h->index_bytes;
  memcpy(h->index_sha, p + 48, 32);
  if (!h->piece_size || h->piece_size > QF_PIECE_MAX || h->n_pieces > (1ull << 40) ||
      h->index_bytes != 32 + 32 * h->n_pieces || h->file_bytes < h->data_off ||
      h->n_pieces != (h->file_bytes - h->data_off + h->piece_size - 1) / h->piece_size)
    return qs__fail(QINS_ECORRUPT, "%s: header is inconsistent (sizes, pieces)", what);
  return 0;
}

int qs_qfile_check_index(const char *what, const qs_qfile_header *h, const uint8_t *index) {
  uint8_t d[32];
  qs_sha256(index, h->index_bytes, d);
  if (memcmp(d, h->index_sha, 32))
    return qs__fail(QINS_ECHECKSUM, "%s: index fails its SHA-256", what);
  return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Export */
typedef struct qf_w {
  int fd;
  const char *path;
  uint8_t *buf;          /* one piece */
  uint64_t piece_size, in_piece, piece_idx, off;
  uint8_t *index;        /* 32 + 32 * n_pieces */
  EVP_MD_CTX *body;
  int err;
} qf_w;

static int qf_flush_piece(qf_w *w) {
  if (!w->in_piece) return 0;
  qs_sha256(w->buf, w->in_piece, w->index + 32 + 32 * w->piece_idx);
  EVP_DigestUpdate(w->body, w->buf, w->in_piece);
  for (uint64_t done = 0; done < w->in_piece;) {
    ssize_t k = pwrite(w->fd, w->buf + done, w->in_piece - done, (off_t)(w->off + done));
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0)
      return qs__fail(errno == ENOSPC ? QINS_ESTORE_FULL : QINS_EIO, "%s: write: %s", w->path,
                      strerror(k < 0 ? errno : EIO));
    done += (uint64_t)k;
  }
  w->off += w->in_piece;
  w->in_piece = 0;
  w->piece_idx++;
  return 0;
}

static int qf_put(qf_w *w, const void *p, size_t n) {
  const uint8_t *s = p;
  while (n) {
    size_t take = (size_t)(w->piece_size - w->in_piece);
    if (take > n) take = n;
    memcpy(w->buf + w->in_piece, s, take);
    w->in_piece += take;
    s += take;
    n -= take;
    if (w->in_piece == w->piece_size) {
      int rc = qf_flush_piece(w);
      if (rc) return rc;
    }
  }
  return 0;
}

/* A descriptor record and its trailing CRC-32C. */
static int qf_put_rec(qf_w *w, const uint8_t *hdr, size_t hn, const void *a, size_t an,
                      const void *b, size_t bn) {
  uint32_t crc = qs__crc32c(qs__crc32c(qs__crc32c(0, hdr, hn), a, an), b, bn);
  uint8_t cb[4];
  qs__put_u32(cb, crc);
  int rc;
  if ((rc = qf_put(w, hdr, hn)) || (rc = qf_put(w, a, an)) || (rc = qf_put(w, b, bn)) ||
      (rc = qf_put(w, cb, 4)))
    return rc;
  return 0;
}

/* The model's tensors placed by tensor index (the order the importing store must give them). */
typedef struct qf_list {
  qs_tensor *t;
  uint64_t n;
  int bad; /* an index out of range or twice */
} qf_list;

static int qf_place_cb(void *ud, const qs_tensor *t) {
  qf_list *l = ud;
  if (t->index >= l->n || l->t[t->index].name[0]) {
    l->bad = 1;
    return 1;
  }
  l->t[t->index] = *t;
  return 0;
}

static size_t qf_params_len(const qs_tensor *t) {
  /* An empty tensor stores no parameters (stage.c): it carries none either. */
  return t->codec == QS_RAW || !t->n_elem ? 0 : qc_params_size((qc_codec)t->params.codec);
}

int qs_qfile_export(qs_store *s, const char *model, const char *path, uint64_t piece_size,
                    qs_progress_cb progress, void *progress_ud, qs_qfile_info *out) {
  if (!piece_size) piece_size = QS_QFILE_PIECE;
  if (piece_size < 4096 || piece_size > QF_PIECE_MAX)
    return qs__fail(QINS_EINVALID, "piece size %llu: must be 4 KiB .. 64 MiB",
                    (unsigned long long)piece_size);
  qs_txn *tx;
  int rc = qs_txn_begin(s, &tx);
  if (rc) return rc;
  qs_model m;
  qf_list L = {0, 0, 0};
  qf_w w = {.fd = -1, .path = path, .piece_size = piece_size};
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  uint8_t *hdr = NULL;
  if ((rc = qs_model_get(tx, model, &m))) goto out;
  L.n = m.n_tensors;
  if (!(L.t = calloc(L.n ? L.n : 1, sizeof *L.t))) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = qs_tensors_each(tx, model, NULL, qf_place_cb, &L))) goto out;
  for (uint64_t i = 0; !L.bad && i < L.n; i++) L.bad = !L.t[i].name[0];
  if (L.bad) {
    rc = qs__fail(QINS_ECORRUPT, "model %s: tensor indices are not 0..%llu", model,
                  (unsigned long long)L.n - 1);
    goto out;
  }
  /* Size the body from the records. */
  size_t nl = strlen(m.name), ml = strlen(m.metadata);
  uint64_t body = QF_MODEL_HDR + nl + ml + 4 + QF_END_HDR + 4, total = 0;
  for (uint64_t i = 0; i < L.n; i++) {
    qs_tensor_cost c;
    if ((rc = qs_tensor_cost_get(tx, &L.t[i], &c))) goto out;
    body += QF_TENSOR_HDR + strlen(L.t[i].name) + qf_params_len(&L.t[i]) + 4 +
            L.t[i].n_chunks * QS_CHUNK_HDR + c.data_bytes;
    total += c.data_bytes;
  }
  uint64_t n_pieces = (body + piece_size - 1) / piece_size;
  uint64_t index_bytes = 32 + 32 * n_pieces, data_off = QF_HDR + index_bytes;
  w.buf = malloc(piece_size);
  w.index = calloc(1, index_bytes);
  hdr = calloc(1, QF_HDR);
  w.body = EVP_MD_CTX_new();
  if (!w.buf || !w.index || !hdr || !w.body || !EVP_DigestInit_ex(w.body, EVP_sha256(), NULL)) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  w.fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (w.fd < 0) {
    rc = qs__fail(QINS_EIO, "%s: %s", tmp, strerror(errno));
    goto out;
  }
  w.off = data_off;
  /* Model record. */
  uint8_t mh[QF_MODEL_HDR] = {0};
  memcpy(mh, QS_QFILE_MAGIC_MODEL, 4);
  qs__put_u16(mh + 4, (uint16_t)nl);
  qs__put_u32(mh + 8, (uint32_t)ml);
  qs__put_u64(mh + 16, m.n_tensors);
  qs__put_u64(mh + 24, m.src_bytes);
  qs__put_u64(mh + 32, m.stored_bytes);
  qs__put_u64(mh + 40, m.n_elem);
  if ((rc = qf_put_rec(&w, mh, sizeof mh, m.name, nl, m.metadata, ml))) goto out;
  uint64_t done = 0;
  for (uint64_t i = 0; i < L.n; i++) {
    const qs_tensor *t = &L.t[i];
    qs_tensor_cost c;
    if ((rc = qs_tensor_cost_get(tx, t, &c))) goto out;
    uint8_t th[QF_TENSOR_HDR] = {0}, pb[QC_PARAMS_MAX];
    size_t tl = strlen(t->name), pl = qf_params_len(t);
    memcpy(th, QS_QFILE_MAGIC_TENSOR, 4);
    th[4] = (uint8_t)t->codec;
    th[5] = (uint8_t)t->src_dtype;
    th[6] = (uint8_t)t->ndim;
    qs__put_u16(th + 8, (uint16_t)tl);
    qs__put_u32(th + 12, (uint32_t)pl);
    for (int d = 0; d < QS_MAX_NDIM; d++) qs__put_u64(th + 16 + 8 * d, t->shape[d]);
    qs__put_u64(th + 80, t->src_bytes);
    qs__put_u64(th + 88, t->rows_per_chunk);
    qs__put_u64(th + 96, t->n_chunks);
    qs__put_u64(th + 104, c.data_bytes);
    qs__put_f64(th + 112, t->snr_db);
    qs__put_f64(th + 120, t->max_err);
    qs__put_u32(th + 128, c.checksum);
    if (pl) qc_params_write(&t->params, pb);
    if ((rc = qf_put_rec(&w, th, sizeof th, t->name, tl, pb, pl))) goto out;
    for (uint64_t ci = 0; ci < t->n_chunks; ci++) {
      const void *rec;
      size_t rs;
      if ((rc = qs_tensor_chunk_record(tx, t, ci, &rec, &rs)) || (rc = qf_put(&w, rec, rs))) goto out;
      done += rs - QS_CHUNK_HDR;
      if (progress) progress(progress_ud, done, total, t->name);
    }
  }
  uint8_t eh[QF_END_HDR] = {0};
  memcpy(eh, QS_QFILE_MAGIC_END, 4);
  qs__put_u64(eh + 8, L.n);
  if ((rc = qf_put_rec(&w, eh, sizeof eh, "", 0, "", 0)) || (rc = qf_flush_piece(&w))) goto out;
  if (w.off != data_off + body || w.piece_idx != n_pieces) {
    rc = qs__fail(QINS_EINTERNAL, "%s: model %s changed size while exported", path, model);
    goto out;
  }
  unsigned hl = 32;
  EVP_DigestFinal_ex(w.body, w.index, &hl);
  uint8_t ish[32];
  qs_sha256(w.index, index_bytes, ish);
  memcpy(hdr, QS_QFILE_MAGIC, 8);
  qs__put_u32(hdr + 8, QS_QFILE_VERSION);
  qs__put_u64(hdr + 16, data_off + body);
  qs__put_u64(hdr + 24, piece_size);
  qs__put_u64(hdr + 32, n_pieces);
  qs__put_u64(hdr + 40, index_bytes);
  memcpy(hdr + 48, ish, 32);
  qs__put_u32(hdr + QF_HDR - 4, qs__crc32c(0, hdr, QF_HDR - 4));
  if (pwrite(w.fd, hdr, QF_HDR, 0) != QF_HDR ||
      pwrite(w.fd, w.index, index_bytes, QF_HDR) != (ssize_t)index_bytes || fsync(w.fd)) {
    rc = qs__fail(errno == ENOSPC ? QINS_ESTORE_FULL : QINS_EIO, "%s: write: %s", tmp, strerror(errno));
    goto out;
  }
  if (out) {
    memset(out, 0, sizeof *out);
    out->file_bytes = data_off + body;
    out->n_pieces = n_pieces;
    out->piece_size = piece_size;
    out->n_tensors = L.n;
    out->stored_bytes = m.stored_bytes;
    out->n_elem = m.n_elem;
    /* The whole file's SHA-256 (what sha256sum prints; `pull --sha256` checks it). */
    EVP_MD_CTX *whole = EVP_MD_CTX_new();
    if (!whole || !EVP_DigestInit_ex(whole, EVP_sha256(), NULL)) {
      EVP_MD_CTX_free(whole);
      rc = qs__fail(QINS_ENOMEM, "out of memory");
      goto out;
    }
    for (uint64_t off = 0; off < out->file_bytes;) {
      ssize_t k = pread(w.fd, w.buf, (size_t)piece_size, (off_t)off);
      if (k <= 0) {
        EVP_MD_CTX_free(whole);
        rc = qs__fail(QINS_EIO, "%s: read back: %s", tmp, k < 0 ? strerror(errno) : "short");
        goto out;
      }
      EVP_DigestUpdate(whole, w.buf, (size_t)k);
      off += (uint64_t)k;
    }
    EVP_DigestFinal_ex(whole, out->sha256, &hl);
    EVP_MD_CTX_free(whole);
  }
  close(w.fd);
  w.fd = -1;
  if (rename(tmp, path)) rc = qs__fail(QINS_EIO, "%s: rename: %s", path, strerror(errno));
out:
  if (w.fd >= 0) close(w.fd);
  if (rc) unlink(tmp);
  qs_txn_end(tx);
  EVP_MD_CTX_free(w.body);
  free(w.buf);
  free(w.index);
  free(hdr);
  free(L.t);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Import */
typedef struct qf_r {
  int fd;
  const char *what;
  qs_qfile_header h;
  const uint8_t *index;     /* 32 + 32 * n_pieces */
  int pieces_verified;      /* skip the per-piece SHA-256 (the caller checked them) */
  const uint8_t *map;       /* the whole file mapped (pieces_verified: the caller's own file) */
  uint8_t *buf;             /* current piece, read (no map) */
  const uint8_t *cur;       /* current piece: buf or in map */
  uint64_t piece, len, pos; /* its index, bytes, read position */
  EVP_MD_CTX *body, *whole;
  qs_progress_cb progress;
  void *progress_ud;
} qf_r;

static int qf_next_piece(qf_r *r) {
  uint64_t i = r->piece == UINT64_MAX ? 0 : r->piece + 1;
  if (i >= r->h.n_pieces) return qs__fail(QINS_ECORRUPT, "%s: body ends inside a record", r->what);
  uint64_t off = r->h.data_off + i * r->h.piece_size, n = r->h.file_bytes - off;
  if (n > r->h.piece_size) n = r->h.piece_size;
  r->cur = r->map ? r->map + off : r->buf;
  for (uint64_t got = 0; !r->map && got < n;) {
    ssize_t k = pread(r->fd, r->buf + got, (size_t)(n - got), (off_t)(off + got));
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0)
      return qs__fail(k ? QINS_EIO : QINS_ECORRUPT, "%s: piece %llu: %s", r->what,
                      (unsigned long long)i, k ? strerror(errno) : "file is truncated");
    got += (uint64_t)k;
  }
  if (!r->pieces_verified) {
    uint8_t d[32];
    qs_sha256(r->cur, n, d);
    if (memcmp(d, r->index + 32 + 32 * i, 32))
      return qs__fail(QINS_ECHECKSUM, "%s: piece %llu (bytes %llu..%llu) fails its SHA-256", r->what,
                      (unsigned long long)i, (unsigned long long)off, (unsigned long long)(off + n));
  }
  if (!r->pieces_verified) EVP_DigestUpdate(r->body, r->cur, n);
  if (r->whole) EVP_DigestUpdate(r->whole, r->cur, n);
  r->piece = i;
  r->len = n;
  r->pos = 0;
  if (r->progress) r->progress(r->progress_ud, off + n, r->h.file_bytes, "");
  return 0;
}

/* The next n bytes of the body into dst, or only stepped over when dst is NULL. */
static int qf_get(qf_r *r, void *dst, uint64_t n) {
  uint8_t *d = dst;
  while (n) {
    if (r->pos == r->len) {
      int rc = qf_next_piece(r);
      if (rc) return rc;
    }
    uint64_t take = r->len - r->pos;
    if (take > n) take = n;
    if (d) {
      memcpy(d, r->cur + r->pos, take);
      d += take;
    }
    r->pos += take;
    n -= take;
  }
  return 0;
}

/* The next chunk record (header, then its payload), contiguous in *rec: in place in the mapped
 * file (no copy), else read into *buf (grown to *cap as needed). */
static int qf_get_chunk(qf_r *r, const char *tn, uint64_t ci, uint8_t **buf, size_t *cap,
                        const uint8_t **rec, uint64_t *pay) {
  uint8_t ch[QS_CHUNK_HDR];
  const uint8_t *at = r->map ? r->map + (r->piece == UINT64_MAX ? r->h.data_off :
                                          r->h.data_off + r->piece * r->h.piece_size + r->pos) : NULL;
  int rc = qf_get(r, ch, sizeof ch);
  if (rc) return rc;
  *pay = qs__get_u64(ch + 8);
  if (*pay > QF_CHUNK_MAX || memcmp(ch, QS_MAGIC_CHUNK, 4))
    return qs__fail(QINS_ECORRUPT, "%s: tensor %s: chunk %llu is malformed", r->what, tn,
                    (unsigned long long)ci);
  if (at) {
    *rec = at;
    return qf_get(r, NULL, *pay);
  }
  if (*cap < QS_CHUNK_HDR + *pay) {
    free(*buf);
    *cap = QS_CHUNK_HDR + *pay;
    if (!(*buf = malloc(*cap))) {
      *cap = 0;
      return qs__fail(QINS_ENOMEM, "out of memory");
    }
  }
  memcpy(*buf, ch, sizeof ch);
  *rec = *buf;
  return qf_get(r, *buf + QS_CHUNK_HDR, *pay);
}

/* Reads a record's variable parts and trailing CRC-32C, checked against hdr + parts. */
static int qf_get_rec(qf_r *r, const char *rec, const uint8_t *hdr, size_t hn, void *a, size_t an,
                      void *b, size_t bn) {
  uint8_t cb[4];
  int rc;
  if ((rc = qf_get(r, a, an)) || (rc = qf_get(r, b, bn)) || (rc = qf_get(r, cb, 4))) return rc;
  if (qs__crc32c(qs__crc32c(qs__crc32c(0, hdr, hn), a, an), b, bn) != qs__get_u32(cb))
    return qs__fail(QINS_ECHECKSUM, "%s: %s fails its checksum", r->what, rec);
  return 0;
}

void qs_qfile_import_opts_init(qs_qfile_import_opts *o) { memset(o, 0, sizeof *o); }

int qs_qfile_import(qs_store *s, const char *path, const qs_qfile_import_opts *o,
                    qs_import_result *res) {
  qs_qfile_import_opts od;
  if (!o) {
    qs_qfile_import_opts_init(&od);
    o = &od;
  }
  qf_r r = {.fd = -1, .what = path, .piece = UINT64_MAX, .progress = o->progress,
            .progress_ud = o->progress_ud, .pieces_verified = o->pieces_verified};
  uint8_t hb[QF_HDR];
  uint8_t *index = NULL, *chunk = NULL;
  char *name = NULL, *meta = NULL;
  qs_import *im = NULL;
  int rc = 0;
  r.fd = open(path, O_RDONLY | O_CLOEXEC);
  if (r.fd < 0) return qs__fail(errno == ENOENT ? -ENOENT : QINS_EIO, "%s: %s", path, strerror(errno));
  struct stat st;
  ssize_t k = pread(r.fd, hb, QF_HDR, 0);
  if (fstat(r.fd, &st) || k != QF_HDR) {
    rc = qs__fail(QINS_ECORRUPT, "%s: too short for a qins model file", path);
    goto out;
  }
  if ((rc = qs_qfile_parse_header(path, hb, QF_HDR, &r.h))) goto out;
  if ((uint64_t)st.st_size != r.h.file_bytes) {
    rc = qs__fail(QINS_ECORRUPT, "%s: %llu bytes, the header says %llu (%s)", path,
                  (unsigned long long)st.st_size, (unsigned long long)r.h.file_bytes,
                  (uint64_t)st.st_size < r.h.file_bytes ? "truncated" : "trailing bytes");
    goto out;
  }
  if (o->pieces_verified) {
    /* The caller's own file (pull's staging file, locked): read in place, no copy. */
    void *m = mmap(NULL, r.h.file_bytes, PROT_READ, MAP_SHARED, r.fd, 0);
    if (m == MAP_FAILED) {
      rc = qs__fail(QINS_EIO, "%s: mmap: %s", path, strerror(errno));
      goto out;
    }
    r.map = m;
    madvise(m, r.h.file_bytes, MADV_SEQUENTIAL);
  }
  if (!(index = malloc(r.h.index_bytes)) || (!r.map && !(r.buf = malloc(r.h.piece_size))) ||
      !(r.body = EVP_MD_CTX_new()) || !EVP_DigestInit_ex(r.body, EVP_sha256(), NULL)) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  if (pread(r.fd, index, r.h.index_bytes, QF_HDR) != (ssize_t)r.h.index_bytes) {
    rc = qs__fail(QINS_EIO, "%s: reading the index: %s", path, strerror(errno));
    goto out;
  }
  if ((rc = qs_qfile_check_index(path, &r.h, index))) goto out;
  r.index = index;
  if (o->sha256) {
    if (!(r.whole = EVP_MD_CTX_new()) || !EVP_DigestInit_ex(r.whole, EVP_sha256(), NULL)) {
      rc = qs__fail(QINS_ENOMEM, "out of memory");
      goto out;
    }
    EVP_DigestUpdate(r.whole, hb, QF_HDR);
    EVP_DigestUpdate(r.whole, index, r.h.index_bytes);
  }
  /* Model record. */
  uint8_t mh[QF_MODEL_HDR];
  if ((rc = qf_get(&r, mh, sizeof mh))) goto out;
  if (memcmp(mh, QS_QFILE_MAGIC_MODEL, 4)) {
    rc = qs__fail(QINS_ECORRUPT, "%s: model record: bad magic", path);
    goto out;
  }
  size_t nl = qs__get_u16(mh + 4), ml = qs__get_u32(mh + 8);
  uint64_t n_tensors = qs__get_u64(mh + 16);
  if (!nl || nl > QS_MAX_NAME || ml > r.h.file_bytes) {
    rc = qs__fail(QINS_ECORRUPT, "%s: model record: bad lengths", path);
    goto out;
  }
  if (!(name = calloc(1, nl + 1)) || !(meta = calloc(1, ml + 1))) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = qf_get_rec(&r, "model record", mh, sizeof mh, name, nl, meta, ml))) goto out;
  if (strlen(name) != nl || strlen(meta) != ml) {
    rc = qs__fail(QINS_ECORRUPT, "%s: model record: NUL inside the name or metadata", path);
    goto out;
  }
  const char *as = o->model ? o->model : name;
  if ((rc = qs_import_begin(s, as, meta, &im))) goto out;
  uint64_t src_bytes = 0, stored = 0, n_elem = 0;
  size_t chunk_cap = 0;
  for (uint64_t ti = 0; ti < n_tensors; ti++) {
    uint8_t th[QF_TENSOR_HDR], pb[QC_PARAMS_MAX];
    char tn[QS_MAX_NAME + 1] = {0};
    if ((rc = qf_get(&r, th, sizeof th))) goto out;
    size_t tl = qs__get_u16(th + 8), pl = qs__get_u32(th + 12);
    if (memcmp(th, QS_QFILE_MAGIC_TENSOR, 4) || !tl || tl > QS_MAX_NAME || pl > QC_PARAMS_MAX ||
        th[6] > QS_MAX_NDIM) {
      rc = qs__fail(QINS_ECORRUPT, "%s: tensor record %llu is malformed", path, (unsigned long long)ti);
      goto out;
    }
    char what[64];
    snprintf(what, sizeof what, "tensor record %llu", (unsigned long long)ti);
    if ((rc = qf_get_rec(&r, what, th, sizeof th, tn, tl, pb, pl))) goto out;
    qs_tensor_desc d = {.name = tn, .src_dtype = (qs_dtype)th[5], .ndim = th[6], .codec = th[4]};
    qc_params par;
    for (int i = 0; i < QS_MAX_NDIM; i++) d.shape[i] = qs__get_u64(th + 16 + 8 * i);
    d.src_bytes = qs__get_u64(th + 80);
    uint64_t ne = 1;
    for (int i = 0; i < d.ndim; i++) ne *= d.shape[i]; /* 0 or checked by tensor_begin */
    if (d.codec != QS_RAW && !pl && !ne && d.codec < QC_CODEC_COUNT) {
      memset(&par, 0, sizeof par); /* an empty tensor: no parameters */
      par.codec = (qc_codec)d.codec;
      d.params = &par;
    } else if (d.codec != QS_RAW) {
      if (d.codec >= QC_CODEC_COUNT || (rc = qc_params_read((qc_codec)d.codec, pb, pl, &par))) {
        rc = qs__fail(QINS_ECORRUPT, "%s: tensor %s: bad codec or parameters", path, tn);
        goto out;
      }
      d.params = &par;
    } else if (pl) {
      rc = qs__fail(QINS_ECORRUPT, "%s: tensor %s: raw tensor with parameters", path, tn);
      goto out;
    }
    if ((rc = qs_import_tensor_begin(im, &d))) goto out;
    uint64_t rpc = qs__get_u64(th + 88), nch = qs__get_u64(th + 96);
    if (qs_import_chunk_rows(im) != rpc) {
      rc = qs__fail(QINS_EUNSUPPORTED, "%s: tensor %s: %llu rows per chunk, this store makes %llu",
                    path, tn, (unsigned long long)rpc, (unsigned long long)qs_import_chunk_rows(im));
      goto out;
    }
    uint32_t tcrc = 0;
    for (uint64_t ci = 0; ci < nch; ci++) {
      const uint8_t *rec = NULL;
      uint64_t pay = 0;
      if ((rc = qf_get_chunk(&r, tn, ci, &chunk, &chunk_cap, &rec, &pay))) goto out;
      if ((rc = qs_import_tensor_chunk(im, rec, QS_CHUNK_HDR + pay))) {
        rc = qs__fail(rc, "%s: %s", path, qs_error());
        goto out;
      }
      tcrc = qs__crc32c(tcrc, rec + 4, 4);
    }
    if (tcrc != qs__get_u32(th + 128)) {
      rc = qs__fail(QINS_ECHECKSUM, "%s: tensor %s fails its checksum", path, tn);
      goto out;
    }
    qs_import_tensor_figures(im, qs__get_f64(th + 112), qs__get_f64(th + 120));
    qs_tensor stt;
    if ((rc = qs_import_tensor_end(im, &stt))) goto out;
    src_bytes += stt.src_bytes;
    stored += stt.stored_bytes;
    n_elem += stt.n_elem;
  }
  uint8_t eh[QF_END_HDR];
  if ((rc = qf_get(&r, eh, sizeof eh)) ||
      (rc = qf_get_rec(&r, "end record", eh, sizeof eh, NULL, 0, NULL, 0)))
    goto out;
  if (memcmp(eh, QS_QFILE_MAGIC_END, 4) || qs__get_u64(eh + 8) != n_tensors ||
      r.pos != r.len || r.piece + 1 != r.h.n_pieces) {
    rc = qs__fail(QINS_ECORRUPT, "%s: end record is malformed or bytes follow it", path);
    goto out;
  }
  uint8_t d[32];
  unsigned hl = 32;
  EVP_DigestFinal_ex(r.body, d, &hl);
  if (!r.pieces_verified && memcmp(d, index, 32)) { /* else the pieces' hashes covered it */
    rc = qs__fail(QINS_ECHECKSUM, "%s: the body fails its SHA-256", path);
    goto out;
  }
  if (r.whole) {
    EVP_DigestFinal_ex(r.whole, d, &hl);
    if (memcmp(d, o->sha256, 32)) {
      char got[65];
      qs_hex(d, 32, got);
      rc = qs__fail(QINS_ECHECKSUM, "%s: SHA-256 is %s, not the one expected", path, got);
      goto out;
    }
  }
  if (res) {
    memset(res, 0, sizeof *res);
    snprintf(res->model, sizeof res->model, "%s", as);
    res->n_tensors = n_tensors;
    res->n_elem = n_elem;
    res->src_bytes = src_bytes;
    res->stored_bytes = stored;
  }
  rc = qs_import_commit(im);
  im = NULL;
out:
  if (im) qs_import_abort(im);
  if (r.map) munmap((void *)r.map, r.h.file_bytes);
  if (r.fd >= 0) close(r.fd);
  EVP_MD_CTX_free(r.body);
  EVP_MD_CTX_free(r.whole);
  free(r.buf);
  free(index);
  free(chunk);
  free(name);
  free(meta);
  return rc;
}
