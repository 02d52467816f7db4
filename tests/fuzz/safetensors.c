/* SPDX-License-Identifier: MIT */
/*
 * safetensors.c — fuzz target: the validating safetensors reader (store/safetensors.h) on an
 * arbitrary file, then the header writer on what it accepted.
 *
 * Oracles, for a file qs_st_open accepts (each a promise of safetensors.h):
 *  - tensors in offset order tile the data buffer exactly: the first starts at 8 + N, each starts
 *    where the previous ended, the last ends at the end of the file; count * bits == 8 * nbytes;
 *  - names have their stated length and qs_st_find finds each; metadata pairs are all readable;
 *  - qs_st_read_rows of every whole-byte tensor returns the file's own bytes, and qs_st_read of a
 *    range inside it too; conversion of float rows to f32 runs;
 *  - a header rebuilt with qs_st_header_build from the tensors and metadata, followed by the same
 *    data, is accepted again and reads back the same tensors and metadata.
 * A refused file must leave *out NULL and an error message naming the file.
 */
#include "fuzz.h"
#include "safetensors.h"
#include "codec.h"
#include "qins.h"

#define MAX_READ (1u << 20) /* inputs are small; bounds a buffer anyway */

static qs_st_file *open_bytes(const uint8_t *data, size_t size, int must_open) {
  char path[64], err[512];
  int fd = fz_memfile(data, size, path, sizeof path);
  fz_check(fd >= 0, "memfd");
  qs_st_file *f = (qs_st_file *)1;
  int rc = qs_st_open(path, &f, err, sizeof err);
  close(fd);
  if (rc) {
    fz_check(f == NULL, "a refused file left *out set");
    fz_check(strncmp(err, path, strlen(path)) == 0, "the error does not name the file: %s", err);
    fz_check(!must_open, "a rebuilt file was refused: %s", err);
    return NULL;
  }
  fz_check(f != NULL, "accepted without a file");
  return f;
}

static void check_tensors(const qs_st_file *f, const uint8_t *data, size_t size) {
  fz_check(qs_st_file_size(f) == size, "file size");
  uint64_t pos = 8 + qs_st_header_len(f);
  for (size_t i = 0; i < qs_st_count(f); i++) {
    const qs_st_tensor *t = qs_st_tensor_at(f, i);
    fz_check(t && t->offset == pos, "tensor %zu does not start where the previous ended", i);
    fz_check(t->nbytes <= size - t->offset, "tensor %zu runs past the end of the file", i);
    fz_check(strlen(t->name) == t->name_len, "tensor %zu: name length", i);
    fz_check(qs_st_find(f, t->name) == t, "qs_st_find(%s)", t->name);
    fz_check(t->ndim >= 0 && t->ndim <= QS_ST_MAX_NDIM && t->dtype < QS_ST_DTYPE_COUNT, "ndim/dtype");
    uint64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    fz_check(n == t->n_elem, "n_elem");
    unsigned bits = qs_st_dtype_bits(t->dtype);
    fz_check((unsigned __int128)n * bits == (unsigned __int128)t->nbytes * 8, "size of %s", t->name);
    pos = t->offset + t->nbytes;
    if (t->nbytes > MAX_READ) continue;
    uint8_t *buf = malloc(t->nbytes ? t->nbytes : 1);
    fz_check(buf, "out of memory");
    char err[512];
    int rc = qs_st_read_rows(f, t, 0, qs_st_n_rows(t), buf, err, sizeof err);
    if (bits % 8 == 0 || (qs_st_row_len(t) * bits) % 8 == 0) {
      fz_check(rc == 0, "reading %s: %s", t->name, err);
      fz_check(memcmp(buf, data + t->offset, t->nbytes) == 0, "%s: read bytes differ", t->name);
      if (t->dtype == QS_ST_F32 || t->dtype == QS_ST_F16 || t->dtype == QS_ST_BF16) {
        float *fl = malloc((t->n_elem ? t->n_elem : 1) * sizeof *fl);
        fz_check(fl, "out of memory");
        qc_to_f32(t->dtype == QS_ST_F32 ? QC_DT_F32 : t->dtype == QS_ST_F16 ? QC_DT_F16 : QC_DT_BF16,
                  buf, t->n_elem, fl);
        free(fl);
      }
    }
    if (t->nbytes >= 2) {
      rc = qs_st_read(f, t, 1, t->nbytes - 1, buf, err, sizeof err);
      fz_check(rc == 0 && memcmp(buf, data + t->offset + 1, t->nbytes - 1) == 0, "qs_st_read");
    }
    fz_check(qs_st_read(f, t, t->nbytes, 1, buf, err, sizeof err) == QINS_EINVALID,
             "a read past the tensor was not refused");
    free(buf);
  }
  fz_check(pos == size, "data does not end at the end of the file");
  for (size_t i = 0; i < qs_st_metadata_count(f); i++) {
    const char *k, *v;
    fz_check(qs_st_metadata_at(f, i, &k, &v) == 0 && k && v, "metadata %zu", i);
  }
  fz_check(qs_st_metadata_json(f) != NULL, "metadata json");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  qs_st_file *f = open_bytes(data, size, 0);
  if (!f) return 0;
  check_tensors(f, data, size);
  /* Rebuild the header from what was read; the same data must be accepted again. */
  size_t n = qs_st_count(f);
  qs_st_entry *e = calloc(n ? n : 1, sizeof *e);
  fz_check(e, "out of memory");
  for (size_t i = 0; i < n; i++) {
    const qs_st_tensor *t = qs_st_tensor_at(f, i);
    e[i] = (qs_st_entry){t->name, t->dtype, t->ndim, t->shape, t->nbytes};
  }
  uint8_t *hdr;
  size_t hl;
  const char *meta = qs_st_metadata_json(f);
  int rc = qs_st_header_build(e, n, meta, &hdr, &hl);
  fz_check(rc == 0, "qs_st_header_build: %s", qins_err_name(rc));
  size_t body = size - 8 - (size_t)qs_st_header_len(f);
  uint8_t *copy = malloc(hl + body + 1);
  fz_check(copy, "out of memory");
  memcpy(copy, hdr, hl);
  memcpy(copy + hl, data + 8 + qs_st_header_len(f), body);
  qs_st_file *g = open_bytes(copy, hl + body, 1);
  check_tensors(g, copy, hl + body);
  fz_check(qs_st_count(g) == n, "tensor count changed");
  for (size_t i = 0; i < n; i++) {
    const qs_st_tensor *a = qs_st_tensor_at(f, i), *b = qs_st_tensor_at(g, i);
    fz_check(a->name_len == b->name_len && !memcmp(a->name, b->name, a->name_len) &&
                 a->dtype == b->dtype && a->ndim == b->ndim && a->nbytes == b->nbytes &&
                 !memcmp(a->shape, b->shape, sizeof a->shape),
             "tensor %zu changed", i);
  }
  fz_check(strcmp(qs_st_metadata_json(f), qs_st_metadata_json(g)) == 0, "metadata changed: %s / %s",
           qs_st_metadata_json(f), qs_st_metadata_json(g));
  qs_st_close(g);
  free(copy);
  free(hdr);
  free(e);
  qs_st_close(f);
  return 0;
}
