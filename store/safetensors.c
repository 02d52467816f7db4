/* SPDX-License-Identifier: MIT */
/*
 * safetensors.c — validating safetensors reader and header writer (see safetensors.h for the
 * rules; FORMATS-AND-PEERS.md §1.1 for their source).
 *
 * Design: the header is read with pread into one buffer of exactly N bytes (N already checked
 * against QS_ST_MAX_HEADER and the file size), parsed with the strict JSON parser, and turned into
 * a flat tensor array sorted by data offset. All offset arithmetic is checked uint64_t and compared
 * against the file size before anything is read.
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json.h"
#include "qins_base.h"
#include "qins_text.h"

struct qs_st_file {
  char *path;            /* as given to open */
  int fd;                /* open read-only */
  uint64_t size;         /* file size at open */
  uint64_t hlen;         /* N */
  size_t n;              /* tensors */
  qs_st_tensor *t;       /* sorted by offset */
  size_t *by_name;       /* indexes of t sorted by name */
  char *names;           /* all names, NUL-separated */
  char *meta_json;       /* compact __metadata__ text */
  size_t n_meta;         /* metadata pairs */
  char **meta;           /* 2*n_meta pointers: key, value (into meta_store) */
  char *meta_store;      /* NUL-separated keys and values */
};

static const char *const qs__st_names[QS_ST_DTYPE_COUNT] = {
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"};
static const unsigned char qs__st_bits[QS_ST_DTYPE_COUNT] = {8, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8,
                                                            16, 16, 16, 16, 32, 32, 32, 64, 64,
                                                            64, 64};

const char *qs_st_dtype_name(qs_st_dtype d) {
  return (unsigned)d < QS_ST_DTYPE_COUNT ? qs__st_names[d] : "?";
}
int qs_st_dtype_from_name(const char *name) {
  for (int i = 0; i < QS_ST_DTYPE_COUNT; i++)
    if (!strcmp(name, qs__st_names[i])) return i;
  return -1;
}
unsigned qs_st_dtype_bits(qs_st_dtype d) {
  return (unsigned)d < QS_ST_DTYPE_COUNT ? qs__st_bits[d] : 0;
}

__attribute__((format(printf, 4, 5))) static int qs__st_err(int rc, char *err, size_t errlen,
                                                           const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

int qs__pread_full(int fd, void *buf, uint64_t n, uint64_t off) {
  unsigned char *p = buf;
  while (n) {
    size_t want = n > (1u << 30) ? (1u << 30) : (size_t)n;
    ssize_t r = pread(fd, p, want, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) {
      errno = 0;
      return -1;
    }
    p += r;
    n -= (uint64_t)r;
    off += (uint64_t)r;
  }
  return 0;
}

void qs_st_close(qs_st_file *f) {
  if (!f) return;
  if (f->fd >= 0) close(f->fd);
  free(f->path);
  free(f->t);
  free(f->by_name);
  free(f->names);
  free(f->meta_json);
  free(f->meta);
  free(f->meta_store);
  free(f);
}

static int qs__off_cmp(const void *a, const void *b) {
  const qs_st_tensor *x = a, *y = b;
  if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
  if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
  return strcmp(x->name, y->name);
}
static int qs__name_cmp(const void *a, const void *b, void *base) {
  const qs_st_tensor *t = base;
  return strcmp(t[*(const size_t *)a].name, t[*(const size_t *)b].name);
}

static int qs__st_metadata(qs_st_file *f, const qs_json *m, char *err, size_t errlen) {
  if (m->type != QS_JSON_OBJECT)
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: __metadata__ is a JSON %s, not an object",
                      f->path, qs_json_type_name(m->type));
  size_t store = 0;
  for (size_t i = 0; i < m->len; i++) {
    const qs_json *v = &m->items[i];
    if (v->type != QS_JSON_STRING)
      return qs__st_err(QINS_EFORMAT, err, errlen,
                        "%s: __metadata__ value of \"%.64s\" is a JSON %s, not a string", f->path,
                        v->key, qs_json_type_name(v->type));
    store += v->key_len + v->len + 2;
  }
  f->n_meta = m->len;
  f->meta = calloc(2 * m->len + 1, sizeof *f->meta);
  f->meta_store = malloc(store + 1);
  if (!f->meta || !f->meta_store)
    return qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory", f->path);
  size_t o = 0;
  qp_buf js = {0};
  qp_put(&js, "{", 1);
  for (size_t i = 0; i < m->len; i++) {
    const qs_json *v = &m->items[i];
    f->meta[2 * i] = f->meta_store + o;
    memcpy(f->meta_store + o, v->key, v->key_len + 1);
    o += v->key_len + 1;
    f->meta[2 * i + 1] = f->meta_store + o;
    memcpy(f->meta_store + o, v->str, v->len + 1);
    o += v->len + 1;
    if (i) qp_put(&js, ",", 1);
    qp_json_str(&js, v->key, v->key_len, QP_JSON_SHORT);
    qp_put(&js, ":", 1);
    qp_json_str(&js, v->str, v->len, QP_JSON_SHORT);
  }
  qp_put(&js, "}", 1);
  f->meta_json = js.p;
  if (js.oom) return qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory", f->path);
  return 0;
}

static int qs__st_entry(qs_st_file *f, const qs_json *e, qs_st_tensor *t, uint64_t data_len,
                        char *err, size_t errlen) {
  const char *nm = e->key;
  if (memchr(e->key, 0, e->key_len))
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor name at header byte %zu holds a NUL",
                      f->path, e->offset);
  if (e->type != QS_JSON_OBJECT)
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor \"%.200s\": entry is a JSON %s, not an object",
                      f->path, nm, qs_json_type_name(e->type));
  for (size_t i = 0; i < e->len; i++) {
    const char *k = e->items[i].key;
    if (strcmp(k, "dtype") && strcmp(k, "shape") && strcmp(k, "data_offsets"))
      return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor \"%.200s\": unknown field \"%.64s\"",
                        f->path, nm, k);
  }
  const qs_json *dt = qs_json_get(e, "dtype"), *sh = qs_json_get(e, "shape"),
                *of = qs_json_get(e, "data_offsets");
  if (!dt || !sh || !of)
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor \"%.200s\": missing field \"%s\"", f->path,
                      nm, !dt ? "dtype" : !sh ? "shape" : "data_offsets");
  if (dt->type != QS_JSON_STRING)
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor \"%.200s\": dtype is not a string", f->path,
                      nm);
  int d = qs_st_dtype_from_name(dt->str);
  if (d < 0)
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor \"%.200s\": unknown dtype \"%.32s\"",
                      f->path, nm, dt->str);
  t->dtype = (qs_st_dtype)d;
  if (sh->type != QS_JSON_ARRAY)
    return qs__st_err(QINS_EFORMAT, err, errlen, "%s: tensor \"%.200s\": shape is not an array", f->path,
                      nm);
  if (sh->len > QS_ST_MAX_NDIM)
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": %zu dimensions (at most %d supported)", f->path, nm,
                      sh->len, QS_ST_MAX_NDIM);
  t->ndim = (int)sh->len;
  uint64_t n = 1;
  int ovf = 0;
  for (size_t i = 0; i < sh->len; i++) {
    const qs_json *x = &sh->items[i];
    if (x->type != QS_JSON_NUMBER || !(x->num_flags & QS_JSON_IS_U64))
      return qs__st_err(QINS_EFORMAT, err, errlen,
                        "%s: tensor \"%.200s\": shape[%zu] is not a non-negative 64-bit integer",
                        f->path, nm, i);
    t->shape[i] = x->u64;
    if (__builtin_mul_overflow(n, x->u64, &n)) ovf = 1;
  }
  /* A zero dimension makes the product 0 whatever overflowed before it. */
  for (size_t i = 0; i < sh->len; i++)
    if (t->shape[i] == 0) { ovf = 0; n = 0; }
  uint64_t bits;
  if (ovf || __builtin_mul_overflow(n, (uint64_t)qs__st_bits[d], &bits))
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": element count of the shape overflows 64 bits", f->path,
                      nm);
  if (bits % 8)
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": %llu elements of %s are not a whole number of bytes",
                      f->path, nm, (unsigned long long)n, qs__st_names[d]);
  t->n_elem = n;
  if (of->type != QS_JSON_ARRAY || of->len != 2 ||
      of->items[0].type != QS_JSON_NUMBER || !(of->items[0].num_flags & QS_JSON_IS_U64) ||
      of->items[1].type != QS_JSON_NUMBER || !(of->items[1].num_flags & QS_JSON_IS_U64))
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": data_offsets is not [BEGIN, END] of 64-bit integers",
                      f->path, nm);
  uint64_t b = of->items[0].u64, en = of->items[1].u64;
  if (en < b)
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": data_offsets END %llu < BEGIN %llu", f->path, nm,
                      (unsigned long long)en, (unsigned long long)b);
  if (en > data_len)
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": data_offsets END %llu is past the data buffer "
                      "(%llu bytes)",
                      f->path, nm, (unsigned long long)en, (unsigned long long)data_len);
  if (en - b != bits / 8)
    return qs__st_err(QINS_EFORMAT, err, errlen,
                      "%s: tensor \"%.200s\": shape and dtype %s need %llu bytes but data_offsets "
                      "span %llu",
                      f->path, nm, qs__st_names[d], (unsigned long long)(bits / 8),
                      (unsigned long long)(en - b));
  t->offset = 8 + f->hlen + b;
  t->nbytes = en - b;
  return 0;
}

int qs_st_open(const char *path, qs_st_file **out, char *err, size_t errlen) {
  *out = NULL;
  qs_st_file *f = calloc(1, sizeof *f);
  if (!f) return qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory", path);
  f->fd = -1;
  f->path = strdup(path);
  if (!f->path) { qs_st_close(f); return qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory", path); }
  int rc = 0;
  char *hdr = NULL;
  qs_json *root = NULL;
  f->fd = open(path, O_RDONLY | O_CLOEXEC);
  struct stat stt;
  if (f->fd < 0 || fstat(f->fd, &stt)) {
    rc = qs__st_err(-errno, err, errlen, "%s: cannot open: %s", path, strerror(errno));
    goto fail;
  }
  if (!S_ISREG(stt.st_mode)) {
    rc = qs__st_err(QINS_EFORMAT, err, errlen, "%s: not a regular file", path);
    goto fail;
  }
  f->size = (uint64_t)stt.st_size;
  if (f->size < 8) {
    rc = qs__st_err(QINS_EFORMAT, err, errlen,
                    "%s: file is %llu bytes, too small for the 8-byte header length", path,
                    (unsigned long long)f->size);
    goto fail;
  }
  unsigned char lb[8];
  if (qs__pread_full(f->fd, lb, 8, 0)) {
    rc = qs__st_err(QINS_EIO, err, errlen, "%s: read error: %s", path,
                    errno ? strerror(errno) : "unexpected end of file");
    goto fail;
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | lb[i];
  f->hlen = n;
  if (n > QS_ST_MAX_HEADER) {
    rc = qs__st_err(QINS_EFORMAT, err, errlen,
                    "%s: header length %llu exceeds the limit of 100000000 bytes", path,
                    (unsigned long long)n);
    goto fail;
  }
  if (n > f->size - 8) {
    rc = qs__st_err(QINS_EFORMAT, err, errlen,
                    "%s: header length %llu runs past the end of the file (%llu bytes)", path,
                    (unsigned long long)n, (unsigned long long)f->size);
    goto fail;
  }
  hdr = malloc(n ? n : 1);
  if (!hdr) { rc = qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory for the header", path); goto fail; }
  if (qs__pread_full(f->fd, hdr, n, 8)) {
    rc = qs__st_err(QINS_EIO, err, errlen, "%s: reading the header: %s", path,
                    errno ? strerror(errno) : "unexpected end of file");
    goto fail;
  }
  char jerr[200];
  rc = qs_json_parse(hdr, n, &root, jerr, sizeof jerr);
  if (rc) {
    rc = qs__st_err(rc, err, errlen, "%s: header is not valid JSON: %s", path, jerr);
    goto fail;
  }
  if (root->type != QS_JSON_OBJECT) {
    rc = qs__st_err(QINS_EFORMAT, err, errlen, "%s: header is a JSON %s, not an object", path,
                    qs_json_type_name(root->type));
    goto fail;
  }
  uint64_t data_len = f->size - 8 - n;
  size_t nt = root->len, names_len = 0;
  const qs_json *meta = qs_json_get(root, "__metadata__");
  if (meta) nt--;
  f->t = calloc(nt ? nt : 1, sizeof *f->t);
  f->by_name = calloc(nt ? nt : 1, sizeof *f->by_name);
  for (size_t i = 0; i < root->len; i++) names_len += root->items[i].key_len + 1;
  f->names = malloc(names_len + 1);
  if (!f->t || !f->by_name || !f->names) {
    rc = qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory", path);
    goto fail;
  }
  /* "__metadata__": null means no metadata, as the reference reader (serde Option) takes it:
   * mlx-lm writes adapters that way. */
  if (meta && meta->type != QS_JSON_NULL && (rc = qs__st_metadata(f, meta, err, errlen))) goto fail;
  if (!meta || meta->type == QS_JSON_NULL) {
    f->meta_json = strdup("{}");
    if (!f->meta_json) { rc = qs__st_err(QINS_ENOMEM, err, errlen, "%s: out of memory", path); goto fail; }
  }
  size_t k = 0, no = 0;
  for (size_t i = 0; i < root->len; i++) {
    const qs_json *e = &root->items[i];
    if (e == meta) continue;
    qs_st_tensor *t = &f->t[k];
    memcpy(f->names + no, e->key, e->key_len + 1);
    t->name = f->names + no;
    t->name_len = e->key_len;
    no += e->key_len + 1;
    if ((rc = qs__st_entry(f, e, t, data_len, err, errlen))) goto fail;
    k++;
  }
  f->n = k;
  qsort(f->t, f->n, sizeof *f->t, qs__off_cmp);
  uint64_t pos = 0;
  for (size_t i = 0; i < f->n; i++) {
    qs_st_tensor *t = &f->t[i];
    uint64_t b = t->offset - 8 - n;
    if (b != pos) {
      rc = qs__st_err(QINS_EFORMAT, err, errlen,
                      b > pos ? "%s: tensor \"%.200s\" begins at data byte %llu, leaving a gap after "
                                "byte %llu"
                              : "%s: tensor \"%.200s\" begins at data byte %llu, overlapping the "
                                "previous tensor (which ends at %llu)",
                      path, t->name, (unsigned long long)b, (unsigned long long)pos);
      goto fail;
    }
    pos = b + t->nbytes;
  }
  if (pos != data_len) {
    rc = qs__st_err(QINS_EFORMAT, err, errlen,
                    "%s: tensors cover %llu data bytes but the file holds %llu after the header "
                    "(%s)",
                    path, (unsigned long long)pos, (unsigned long long)data_len,
                    pos < data_len ? "trailing bytes" : "truncated");
    goto fail;
  }
  for (size_t i = 0; i < f->n; i++) f->by_name[i] = i;
  qsort_r(f->by_name, f->n, sizeof *f->by_name, qs__name_cmp, f->t);
  qs_json_free(root);
  free(hdr);
  *out = f;
  return 0;
fail:
  qs_json_free(root);
  free(hdr);
  qs_st_close(f);
  return rc ? rc : QINS_EINTERNAL;
}

const char *qs_st_path(const qs_st_file *f) { return f->path; }
uint64_t qs_st_file_size(const qs_st_file *f) { return f->size; }
uint64_t qs_st_header_len(const qs_st_file *f) { return f->hlen; }
size_t qs_st_count(const qs_st_file *f) { return f->n; }
const qs_st_tensor *qs_st_tensor_at(const qs_st_file *f, size_t i) {
  return i < f->n ? &f->t[i] : NULL;
}
const qs_st_tensor *qs_st_find(const qs_st_file *f, const char *name) {
  size_t lo = 0, hi = f->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(f->t[f->by_name[mid]].name, name);
    if (!c) return &f->t[f->by_name[mid]];
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  return NULL;
}
const char *qs_st_metadata_json(const qs_st_file *f) { return f->meta_json; }
size_t qs_st_metadata_count(const qs_st_file *f) { return f->n_meta; }
int qs_st_metadata_at(const qs_st_file *f, size_t i, const char **key, const char **value) {
  if (i >= f->n_meta) return QINS_EINVALID;
  *key = f->meta[2 * i];
  *value = f->meta[2 * i + 1];
  return 0;
}

int qs_st_read(const qs_st_file *f, const qs_st_tensor *t, uint64_t off, uint64_t nbytes, void *buf,
               char *err, size_t errlen) {
  if (off > t->nbytes || nbytes > t->nbytes - off)
    return qs__st_err(QINS_EINVALID, err, errlen, "%s: tensor \"%.200s\": byte range %llu+%llu outside its %llu bytes",
                      f->path, t->name, (unsigned long long)off, (unsigned long long)nbytes,
                      (unsigned long long)t->nbytes);
  if (qs__pread_full(f->fd, buf, nbytes, t->offset + off))
    return qs__st_err(QINS_EIO, err, errlen, "%s: tensor \"%.200s\": read error: %s", f->path,
                      t->name, errno ? strerror(errno) : "file truncated since it was opened");
  return 0;
}

uint64_t qs_st_row_len(const qs_st_tensor *t) { return t->ndim ? t->shape[t->ndim - 1] : 1; }
uint64_t qs_st_n_rows(const qs_st_tensor *t) {
  uint64_t rl = qs_st_row_len(t);
  return rl ? t->n_elem / rl : 0;
}

int qs_st_read_rows(const qs_st_file *f, const qs_st_tensor *t, uint64_t row_begin,
                    uint64_t row_end, void *buf, char *err, size_t errlen) {
  uint64_t rl = qs_st_row_len(t), nr = qs_st_n_rows(t);
  if (row_begin > row_end || row_end > nr)
    return qs__st_err(QINS_EINVALID, err, errlen, "%s: tensor \"%.200s\": rows [%llu, %llu) outside its %llu rows",
                      f->path, t->name, (unsigned long long)row_begin,
                      (unsigned long long)row_end, (unsigned long long)nr);
  unsigned bits = qs__st_bits[t->dtype];
  if ((rl * bits) % 8)
    return qs__st_err(QINS_EUNSUPPORTED, err, errlen,
                      "%s: tensor \"%.200s\": rows of %s are not whole bytes", f->path, t->name,
                      qs__st_names[t->dtype]);
  uint64_t rb = rl * bits / 8; /* cannot overflow: the whole tensor's bit count was checked */
  return qs_st_read(f, t, row_begin * rb, (row_end - row_begin) * rb, buf, err, errlen);
}

int qs_st_header_build(const qs_st_entry *entries, size_t n, const char *metadata_json,
                       uint8_t **out, size_t *out_len) {
  *out = NULL;
  *out_len = 0;
  int has_meta = metadata_json && strcmp(metadata_json, "{}") && metadata_json[0];
  qp_buf b = {0};
  char num[96];
  qp_put(&b, "\0\0\0\0\0\0\0\0{", 9); /* the length prefix, filled in below */
  if (has_meta) {
    qp_puts(&b, "\"__metadata__\":");
    qp_puts(&b, metadata_json);
  }
  uint64_t pos = 0;
  for (size_t i = 0; i < n; i++) {
    const qs_st_entry *e = &entries[i];
    if ((unsigned)e->dtype >= QS_ST_DTYPE_COUNT) {
      free(b.p);
      return QINS_EINVALID;
    }
    if (b.n > 9) qp_put(&b, ",", 1);
    qp_json_str(&b, e->name, strlen(e->name), QP_JSON_SHORT);
    qp_put(&b, num, (size_t)snprintf(num, sizeof num, ":{\"dtype\":\"%s\",\"shape\":[",
                                      qs__st_names[e->dtype]));
    for (int d = 0; d < e->ndim; d++)
      qp_put(&b, num, (size_t)snprintf(num, sizeof num, "%s%llu", d ? "," : "",
                                        (unsigned long long)e->shape[d]));
    qp_put(&b, num, (size_t)snprintf(num, sizeof num, "],\"data_offsets\":[%llu,%llu]}",
                                      (unsigned long long)pos,
                                      (unsigned long long)(pos + e->nbytes)));
    pos += e->nbytes;
  }
  qp_put(&b, "}", 1);
  while ((b.n - 8) % 8) qp_put(&b, " ", 1);
  if (b.oom) {
    free(b.p);
    return QINS_ENOMEM;
  }
  uint64_t hl = b.n - 8;
  for (int i = 0; i < 8; i++) b.p[i] = (char)(uint8_t)(hl >> (8 * i));
  *out = (uint8_t *)b.p;
  *out_len = b.n;
  return 0;
}
