/* SPDX-License-Identifier: MIT */
/*
 * export.c — qs_export_safetensors: write a stored model back out as a safetensors file.
 *
 * Deterministic by construction: tensors in name order (the tensors DB's key order), a header
 * built by qs_st_header_build from the records alone, the model's string metadata, and data
 * decoded by the bit-exact codecs; so two exports of one model are byte-identical. The file is
 * written to OUT.tmp and renamed into place (a reader never sees half a file; a source being
 * mmapped elsewhere is never truncated under it). One read transaction covers the export, so a
 * concurrent re-import cannot mix two versions into one file. Memory: one decode buffer.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "import_int.h"
#include "json.h"
#include "safetensors.h"
#include "store_int.h"

#define QS__EXPORT_BUF (1u << 22) /* bytes decoded per write */

typedef struct qs__elist {
  qs_tensor *t;
  size_t n, cap;
  int oom;
} qs__elist;

static int qs__elist_cb(void *ud, const qs_tensor *t) {
  qs__elist *l = ud;
  if (l->n == l->cap) {
    size_t nc = l->cap ? 2 * l->cap : 64;
    qs_tensor *nt = realloc(l->t, nc * sizeof *nt);
    if (!nt) {
      l->oom = 1;
      return 1;
    }
    l->t = nt;
    l->cap = nc;
  }
  l->t[l->n++] = *t;
  return 0;
}

static qs_st_dtype qs__st_of(const qs_tensor *t, qc_dtype dt) {
  if (t->codec != QS_RAW) return dt == QC_DT_F16 ? QS_ST_F16 : dt == QC_DT_BF16 ? QS_ST_BF16 : QS_ST_F32;
  switch (t->src_dtype) {
  case QS_DT_I8: return QS_ST_I8;
  case QS_DT_U8: return QS_ST_U8;
  case QS_DT_I16: return QS_ST_I16;
  case QS_DT_U16: return QS_ST_U16;
  case QS_DT_I32: return QS_ST_I32;
  case QS_DT_U32: return QS_ST_U32;
  case QS_DT_I64: return QS_ST_I64;
  case QS_DT_U64: return QS_ST_U64;
  case QS_DT_BOOL: return QS_ST_BOOL;
  default: return QS_ST_F32;
  }
}

/* The string members of the metadata object text m, as a compact JSON object: safetensors'
 * __metadata__ maps strings to strings, so the structured members (the GGUF KV list, the HF JSON
 * files) stay out of it. *out is malloc'd. */
static int qs__st_metadata_of(const char *m, char **out) {
  qs_json *root = NULL;
  qs__sbuf b = {0};
  qs__sbuf_puts(&b, "{");
  if (qs_json_parse(m, strlen(m), &root, NULL, 0) == 0 && root->type == QS_JSON_OBJECT) {
    int n = 0;
    for (size_t i = 0; i < root->len; i++) {
      const qs_json *v = &root->items[i];
      if (v->type != QS_JSON_STRING) continue;
      if (n++) qs__sbuf_puts(&b, ",");
      qs__sbuf_json_str(&b, v->key, v->key_len);
      qs__sbuf_puts(&b, ":");
      qs__sbuf_json_str(&b, v->str, v->len);
    }
  }
  qs_json_free(root);
  qs__sbuf_puts(&b, "}");
  if (b.oom) {
    free(b.p);
    return qs__fail(QINS_ENOMEM, "out of memory");
  }
  *out = b.p;
  return 0;
}

int qs_export_safetensors(qs_store *s, const char *model, const char *out_path, qc_dtype dt,
                          qs_progress_cb progress, void *progress_ud) {
  if ((unsigned)dt >= QC_DT_COUNT) return qs__fail(QINS_EDTYPE, "bad export dtype");
  qs_txn *tx;
  int rc = qs_txn_begin(s, &tx);
  if (rc) return rc;
  qs_model m;
  qs__elist l = {0};
  qs_st_entry *e = NULL;
  uint8_t *hdr = NULL, *buf = NULL;
  FILE *f = NULL;
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", out_path);
  if ((rc = qs_model_get(tx, model, &m))) goto out;
  if ((rc = qs_tensors_each(tx, model, NULL, qs__elist_cb, &l))) goto out;
  if (l.oom) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  e = calloc(l.n + 1, sizeof *e);
  buf = malloc(QS__EXPORT_BUF);
  if (!e || !buf) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  uint64_t total = 0;
  for (size_t i = 0; i < l.n; i++) {
    const qs_tensor *t = &l.t[i];
    e[i].name = t->name;
    e[i].dtype = qs__st_of(t, dt);
    e[i].ndim = t->ndim;
    e[i].shape = t->shape;
    size_t esz = t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(dt);
    e[i].nbytes = t->n_elem * esz;
    total += e[i].nbytes;
  }
  size_t hl;
  char *smeta = NULL;
  if ((rc = qs__st_metadata_of(m.metadata, &smeta))) goto out;
  rc = qs_st_header_build(e, l.n, smeta, &hdr, &hl);
  free(smeta);
  if (rc) {
    rc = qs__fail(rc, "%s: cannot build the header", out_path);
    goto out;
  }
  f = fopen(tmp, "wb");
  if (!f) {
    rc = qs__fail(-errno, "%s: cannot create: %s", tmp, strerror(errno));
    goto out;
  }
  if (fwrite(hdr, 1, hl, f) != hl) goto werr;
  uint64_t done = 0;
  for (size_t i = 0; i < l.n; i++) {
    const qs_tensor *t = &l.t[i];
    size_t esz = t->codec == QS_RAW ? qs_dtype_size(t->src_dtype) : qc_dtype_size(dt);
    uint64_t step = QS__EXPORT_BUF / esz;
    for (uint64_t a = 0; a < t->n_elem; a += step) {
      uint64_t b = t->n_elem - a < step ? t->n_elem : a + step;
      if ((rc = qs_tensor_read(tx, t, NULL, dt, a, b, buf))) goto out;
      if (fwrite(buf, esz, b - a, f) != b - a) goto werr;
      done += (b - a) * esz;
      if (progress) progress(progress_ud, done, total, t->name);
    }
  }
  if (fflush(f) || fsync(fileno(f))) goto werr;
  if (fclose(f)) {
    f = NULL;
    goto werr;
  }
  f = NULL;
  if (rename(tmp, out_path)) {
    rc = qs__fail(-errno, "%s: cannot rename into place: %s", out_path, strerror(errno));
    goto out;
  }
  rc = 0;
  goto out;
werr:
  rc = qs__fail(QINS_EIO, "%s: write error: %s", tmp, strerror(errno));
out:
  if (f) fclose(f);
  if (rc) unlink(tmp);
  qs_txn_end(tx);
  free(l.t);
  free(e);
  free(hdr);
  free(buf);
  return rc;
}
