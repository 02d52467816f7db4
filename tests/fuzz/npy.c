/* SPDX-License-Identifier: MIT */
/*
 * npy.c — fuzz target: the .npy reader the importer uses (store/npy.c, qs__npy_sources).
 *
 * Oracles, for a file it accepts: exactly one tensor, named as asked, of at most QS_MAX_NDIM
 * dimensions whose product is n_elem; plain elements of a known dtype filling the data exactly up
 * to the end of the file (n_elem * itemsize == nbytes, offset + nbytes == file size); the data
 * reads back with pread as the file's own bytes and float data converts to f32. A refused file
 * leaves the list empty and qs_error() naming the file.
 */
#include "fuzz.h"
#include "import_int.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fz_memfile(data, size, path, sizeof path);
  fz_check(fd >= 0, "memfd");
  qs__srclist L;
  memset(&L, 0, sizeof L);
  int rc = qs__npy_sources(path, "t", &L);
  close(fd);
  if (rc) {
    fz_check(L.n == 0, "a refused file added %zu tensors", L.n);
    fz_check(strstr(qs_error(), path) != NULL, "the error does not name the file: %s", qs_error());
    qs__srclist_free(&L);
    return 0;
  }
  fz_check(L.n == 1, "%zu tensors", L.n);
  const qs__src *s = &L.v[0];
  fz_check(strcmp(s->name, "t") == 0, "name %s", s->name);
  fz_check(s->kind == QS__K_PLAIN && (unsigned)s->dtype < QS_DT_COUNT, "kind/dtype");
  fz_check(s->ndim >= 0 && s->ndim <= QS_MAX_NDIM, "ndim %d", s->ndim);
  uint64_t n = 1;
  for (int d = 0; d < s->ndim; d++) n *= s->shape[d];
  fz_check(n == s->n_elem, "n_elem");
  fz_check(s->n_elem * qs_dtype_size(s->dtype) == s->nbytes, "nbytes");
  fz_check(s->offset <= size && s->nbytes == size - s->offset, "data does not fill the file");
  uint8_t *buf = malloc(s->nbytes ? s->nbytes : 1);
  fz_check(buf, "out of memory");
  fz_check(pread(s->fd, buf, s->nbytes, (off_t)s->offset) == (ssize_t)s->nbytes, "pread");
  fz_check(memcmp(buf, data + s->offset, s->nbytes) == 0, "data differs");
  if (s->dtype == QS_DT_F32 || s->dtype == QS_DT_F16) {
    float *f = malloc((s->n_elem ? s->n_elem : 1) * sizeof *f);
    fz_check(f, "out of memory");
    qc_to_f32(s->dtype == QS_DT_F32 ? QC_DT_F32 : QC_DT_F16, buf, s->n_elem, f);
    free(f);
  }
  free(buf);
  qs__srclist_free(&L);
  return 0;
}
