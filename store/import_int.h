/* SPDX-License-Identifier: MIT */
/*
 * import_int.h — the importers' common currency: a validated list of source tensors, each a
 * run of little-endian row-major bytes at an offset of an open file (import.c drives it; gguf.c
 * and npy.c, and the safetensors reader, fill it). Internal to store/.
 */
#ifndef QINS_STORE_IMPORT_INT_H
#define QINS_STORE_IMPORT_INT_H

#include <stddef.h>
#include <stdint.h>

#include "qins_text.h"
#include "store.h"

/* How a source tensor's bytes become elements. */
enum {
  QS__K_PLAIN = 0, /* elements of `dtype` */
  QS__K_BLOCKS,    /* GGUF blocks of `dtype` (QS_DT_Q4_0 ... QS_DT_Q8_K) along rows */
  QS__K_REFUSED    /* cannot be imported: `why` says why (reported only if it is reached) */
};

typedef struct qs__src {
  char *name;                   /* tensor name (owned) */
  const char *path;             /* file it lives in (owned by the list's file table) */
  int fd;                       /* that file, open (owned by the list) */
  uint64_t offset;              /* absolute offset of the first byte */
  uint64_t nbytes;              /* bytes of data */
  int ndim;                     /* row-major */
  uint64_t shape[QS_MAX_NDIM];
  uint64_t n_elem;
  int kind;                     /* QS__K_* */
  qs_dtype dtype;               /* element dtype, or the block type (QS__K_BLOCKS) */
  char why[160];                /* QS__K_REFUSED: the reason */
} qs__src;

typedef struct qs__srclist {
  qs__src *v;                   /* tensors */
  size_t n, cap;
  char **paths;                 /* files (owned) */
  int *fds;                     /* their descriptors */
  size_t n_files;
} qs__srclist;

/* Adds a file to the list (takes ownership of fd); returns its index or a negative code. */
int qs__srclist_file(qs__srclist *L, const char *path, int fd);
/* Appends a tensor (name copied); returns a pointer to fill, or NULL on ENOMEM. */
qs__src *qs__srclist_add(qs__srclist *L, const char *name, size_t name_len, int file);
void qs__srclist_free(qs__srclist *L);

/* Parsers: validate the whole file and append its tensors. On failure qs_error() names the file
 * and the problem. *meta_json (malloc'd, may stay NULL) gets the metadata to keep. */
int qs__gguf_sources(const char *path, qs__srclist *L, char **meta_json);

/* GGUF block types (gguf_quant.c). qs__gguf_block gives the weights and bytes per block of dt and
 * returns 1 for a block type (else 1 weight of qs_dtype_size bytes, and 0). qs__gguf_dequant
 * expands n_blocks blocks of dt at src (any alignment) into n_blocks * weights floats, exactly as
 * ggml's reference dequantizer does. */
int qs__gguf_block(qs_dtype dt, unsigned *weights /* out */, unsigned *bytes /* out */);
void qs__gguf_dequant(qs_dtype dt, const uint8_t *src, uint64_t n_blocks, float *dst);
int qs__npy_sources(const char *path, const char *tensor_name, qs__srclist *L);

/* Bound on the structured parts of a model's metadata: the GGUF typed KV list (an array that
 * would take it past this is kept as its type and count only: [key, "[type]", null, count]) and
 * each Hugging Face JSON file kept from a directory (a larger one is left out, named in
 * "hf_omitted"). 32 MiB holds the tokenizers of today's large vocabularies (150k tokens and their
 * merges take a few MiB). */
#define QS_META_MAX (32u << 20)
/* QS_META_MAX, or $QINS_IMPORT_META_MAX bytes when set (a smaller bound for hosts that want
 * small model records, and for tests). */
uint64_t qs__meta_max(void);

struct stat;
/* Opens path read-only (O_CLOEXEC) and fstat()s it into *st: the fd, or a negative errno with
 * qs_error() "PATH: cannot open: REASON". */
int qs__open_read(const char *path, struct stat *st);


#endif /* QINS_STORE_IMPORT_INT_H */
