/* SPDX-License-Identifier: MIT */
/*
 * gguf.c — fuzz target: the GGUF v2/v3 reader the importer uses (store/gguf.c, qs__gguf_sources);
 * block-quantized tensors (Q4_0 ... Q8_K) are listed and dequantized too.
 *
 * Oracles, for a file it accepts: every tensor has 1..4 dimensions (GGUF's limit) whose product
 * is n_elem and lies inside the file; plain tensors hold n_elem * itemsize bytes, block-quantized
 * ones whole blocks (qs__gguf_block) per row; refused ones say why; tensor data reads back as
 * the file's own bytes; the metadata kept with the model is a JSON object (store/json.h parses
 * it). A refused file leaves qs_error() naming the file.
 */
#include "fuzz.h"
#include "import_int.h"
#include "json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fz_memfile(data, size, path, sizeof path);
  fz_check(fd >= 0, "memfd");
  qs__srclist L;
  memset(&L, 0, sizeof L);
  char *meta = NULL;
  int rc = qs__gguf_sources(path, &L, &meta);
  close(fd);
  if (rc) {
    fz_check(strstr(qs_error(), path) != NULL, "the error does not name the file: %s", qs_error());
    free(meta);
    qs__srclist_free(&L);
    return 0;
  }
  for (size_t i = 0; i < L.n; i++) {
    const qs__src *s = &L.v[i];
    fz_check(s->name && s->ndim >= 1 && s->ndim <= 4, "tensor %zu: ndim %d", i, s->ndim);
    uint64_t n = 1;
    for (int d = 0; d < s->ndim; d++) n *= s->shape[d];
    fz_check(n == s->n_elem, "%s: n_elem", s->name);
    fz_check(s->offset <= size && s->nbytes <= size - s->offset, "%s: data outside the file",
             s->name);
    uint64_t row = s->shape[s->ndim - 1], rows = row ? n / row : 0;
    if (s->kind == QS__K_PLAIN)
      fz_check(n * qs_dtype_size(s->dtype) == s->nbytes, "%s: nbytes", s->name);
    else if (s->kind == QS__K_BLOCKS) {
      unsigned bw = 0, bb = 0;
      fz_check(qs__gguf_block(s->dtype, &bw, &bb), "%s: not a block type", s->name);
      fz_check(row % bw == 0 && rows * (row / bw) * bb == s->nbytes, "%s: quantized nbytes",
               s->name);
    } else
      fz_check(s->kind == QS__K_REFUSED && s->why[0], "%s: refused without a reason", s->name);
    if (s->nbytes <= (1u << 20)) {
      uint8_t *buf = malloc(s->nbytes ? s->nbytes : 1);
      fz_check(buf, "out of memory");
      fz_check(pread(s->fd, buf, s->nbytes, (off_t)s->offset) == (ssize_t)s->nbytes, "pread");
      fz_check(memcmp(buf, data + s->offset, s->nbytes) == 0, "%s: data differs", s->name);
      unsigned bw, bb;
      if (s->kind == QS__K_BLOCKS && qs__gguf_block(s->dtype, &bw, &bb)) {
        float *f = malloc(s->nbytes / bb * bw * sizeof *f + sizeof *f);
        fz_check(f, "out of memory");
        qs__gguf_dequant(s->dtype, buf, s->nbytes / bb, f);
        free(f);
      }
      free(buf);
    }
  }
  if (meta) {
    qs_json *j;
    char err[256];
    rc = qs_json_parse(meta, strlen(meta), &j, err, sizeof err);
    fz_check(rc == 0 && j->type == QS_JSON_OBJECT, "metadata is not a JSON object: %s: %s", err,
             meta);
    qs_json_free(j);
  }
  free(meta);
  qs__srclist_free(&L);
  return 0;
}
