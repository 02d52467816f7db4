/* SPDX-License-Identifier: MIT */
/*
 * import.c — qs_import_path: find the source files (safetensors single or sharded, GGUF, .npy),
 * recognized by content (qs__sniff names LFS pointers, zips, pickles), validate all of them, pick
 * each tensor's codec, then stream every tensor into the store with bounded memory (store.h
 * §Importers). A directory's Hugging Face JSON files join the model's metadata (qs__hf_meta); an
 * HF cache snapshot is named after its repository.
 *
 * SNR: the store measures the codec against the f32 rows it is given; for sources wider than f32
 * (f64) those rows are already rounded, so the importer measures against the source's values
 * itself (qs__measure_wide) and hands the figures to the store.
 *
 * Memory: a tensor whose f32 form fits in QS__WHOLE_MAX is read once and fitted and encoded from
 * that buffer; a larger one is read twice in batches of rows (pass 1 fits the codec parameters,
 * pass 2 encodes chunk by chunk), so peak RSS is bounded by a few chunk-sized buffers whatever the
 * model size. Source bytes are read with pread into byte buffers and converted with qc_to_f32
 * (never cast to float *).
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "import_int.h"
#include "json.h"
#include "safetensors.h"
#include "store_int.h"

#define QS__WHOLE_MAX (32u << 20)  /* f32 bytes of a tensor read once and kept for both passes */
#define QS__BATCH_F32 (4u << 20)   /* f32 bytes per batch in the fit pass */
#define QS__INDEX_MAX (64u << 20)  /* model.safetensors.index.json larger than this is refused */

/* --------------------------------------------------------------------------------------------
 * Small helpers */
int qs__open_read(const char *path, struct stat *st) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || fstat(fd, st)) {
    int e = errno;
    if (fd >= 0) close(fd);
    return qs__fail(-e, "%s: cannot open: %s", path, strerror(e));
  }
  return fd;
}

uint64_t qs__meta_max(void) {
  const char *e = getenv("QINS_IMPORT_META_MAX");
  char *end;
  unsigned long long v = e && *e ? strtoull(e, &end, 10) : 0;
  return e && *e && !*end && v ? (uint64_t)v : QS_META_MAX;
}

int qs__srclist_file(qs__srclist *L, const char *path, int fd) {
  char **np = realloc(L->paths, (L->n_files + 1) * sizeof *np);
  if (np) L->paths = np;
  int *nf = realloc(L->fds, (L->n_files + 1) * sizeof *nf);
  if (nf) L->fds = nf;
  char *dup = strdup(path);
  if (!np || !nf || !dup) {
    free(dup);
    close(fd);
    return qs__fail(QINS_ENOMEM, "out of memory");
  }
  L->paths[L->n_files] = dup;
  L->fds[L->n_files] = fd;
  return (int)L->n_files++;
}

qs__src *qs__srclist_add(qs__srclist *L, const char *name, size_t name_len, int file) {
  qs__src *nv = qp_grow(L->v, &L->cap, L->n, sizeof *nv, 64);
  if (!nv) return NULL;
  L->v = nv;
  qs__src *s = &L->v[L->n];
  memset(s, 0, sizeof *s);
  s->name = malloc(name_len + 1);
  if (!s->name) return NULL;
  memcpy(s->name, name, name_len);
  s->name[name_len] = 0;
  s->path = L->paths[file];
  s->fd = L->fds[file];
  L->n++;
  return s;
}

void qs__srclist_free(qs__srclist *L) {
  for (size_t i = 0; i < L->n; i++) free(L->v[i].name);
  free(L->v);
  for (size_t i = 0; i < L->n_files; i++) {
    close(L->fds[i]);
    free(L->paths[i]);
  }
  free(L->paths);
  free(L->fds);
  memset(L, 0, sizeof *L);
}

static int qs__ends_with(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && !strcasecmp(s + a - b, suf);
}

/* The stem of a path: basename without its extension ("/a/b/model.safetensors" -> "model"). */
static void qs__stem(const char *path, char *out, size_t cap) {
  size_t n = strlen(path);
  while (n > 1 && path[n - 1] == '/') n--;
  size_t b = n;
  while (b > 0 && path[b - 1] != '/') b--;
  size_t e = n;
  for (size_t i = n; i > b; i--)
    if (path[i - 1] == '.') {
      e = i - 1;
      break;
    }
  if (e == b) e = n;
  snprintf(out, cap, "%.*s", (int)(e - b), path + b);
}

/* --------------------------------------------------------------------------------------------
 * safetensors sources */
static int qs__st_kind(qs_st_dtype d, qs__src *s) {
  switch (d) {
  case QS_ST_F32: s->dtype = QS_DT_F32; return 0;
  case QS_ST_F16: s->dtype = QS_DT_F16; return 0;
  case QS_ST_BF16: s->dtype = QS_DT_BF16; return 0;
  case QS_ST_F64: s->dtype = QS_DT_F64; return 0;
  case QS_ST_I8: s->dtype = QS_DT_I8; return 0;
  case QS_ST_U8: s->dtype = QS_DT_U8; return 0;
  case QS_ST_I16: s->dtype = QS_DT_I16; return 0;
  case QS_ST_U16: s->dtype = QS_DT_U16; return 0;
  case QS_ST_I32: s->dtype = QS_DT_I32; return 0;
  case QS_ST_U32: s->dtype = QS_DT_U32; return 0;
  case QS_ST_I64: s->dtype = QS_DT_I64; return 0;
  case QS_ST_U64: s->dtype = QS_DT_U64; return 0;
  case QS_ST_BOOL: s->dtype = QS_DT_BOOL; return 0;
  default:
    s->kind = QS__K_REFUSED;
    snprintf(s->why, sizeof s->why,
             "dtype %s is not supported (FP8/FP6/FP4 data needs its scale tensors; complex has no "
             "codec)",
             qs_st_dtype_name(d));
    return 0;
  }
}

/* --------------------------------------------------------------------------------------------
 * Sniffing: what a file is, from its first bytes, before any parser sees it. */
enum { QS__F_SAFETENSORS, QS__F_GGUF, QS__F_NPY, QS__F_UNKNOWN };

/* Whether the zip at fd is a NumPy .npz: its first member's name ends in ".npy" (local file
 * header: name length u16 at 26, name at 30). */
static int qs__zip_is_npz(int fd) {
  unsigned char h[30 + 256];
  ssize_t got = pread(fd, h, sizeof h, 0);
  if (got < 30) return 0;
  size_t nl = (size_t)(h[26] | (h[27] << 8));
  if (nl < 4 || 30 + nl > (size_t)got) return 0;
  return !memcmp(h + 30 + nl - 4, ".npy", 4);
}

/* Classifies path by content (the extension decides only when the content does not). Files
 * that are not model weights in a format qins reads, but are often mistaken for them, fail here
 * with a message naming what the file is and what to do:
 *   "version https://git-lfs..."  a Git LFS pointer: the real file was never fetched;
 *   PK\x03\x04                    a zip: NumPy .npz (members *.npy) or a PyTorch .bin/.pt;
 *   \x80 + protocol 2..5           a raw pickle (older PyTorch .bin). */
static int qs__sniff(const char *path, int *kind) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return qs__fail(-errno, "%s: cannot open: %s", path, strerror(errno));
  unsigned char m[64] = {0};
  ssize_t got = pread(fd, m, sizeof m, 0);
  struct stat st;
  int have_st = fstat(fd, &st) == 0;
  int npz = got >= 4 && !memcmp(m, "PK\x03\x04", 4) && qs__zip_is_npz(fd);
  close(fd);
  if (got < 0) return qs__fail(QINS_EIO, "%s: read error: %s", path, strerror(errno));
  *kind = QS__F_UNKNOWN;
  /* safetensors first: its u64 header length can begin like a pickle (0x80 0x02 is N = 640). */
  uint64_t hn = got >= 8 ? qs__get_u64(m) : 0;
  if (got >= 9 && m[8] == '{' && have_st && hn <= (uint64_t)st.st_size - 8)
    *kind = QS__F_SAFETENSORS;
  else if (got >= 4 && !memcmp(m, "GGUF", 4)) *kind = QS__F_GGUF;
  else if (got >= 6 && !memcmp(m, "\x93NUMPY", 6)) *kind = QS__F_NPY;
  else if (got >= 23 && !memcmp(m, "version https://git-lfs", 23))
    return qs__fail(QINS_EFORMAT,
                    "%s: this is a Git LFS pointer (%lld bytes), not the model file: fetch the "
                    "real file (git lfs pull, or huggingface-cli download) and import that",
                    path, have_st ? (long long)st.st_size : (long long)got);
  else if (npz || (got >= 4 && !memcmp(m, "PK\x03\x04", 4) && qs__ends_with(path, ".npz")))
    return qs__fail(QINS_EUNSUPPORTED,
                    "%s: this is a NumPy .npz archive (a zip of .npy files): unpack it "
                    "(unzip -d DIR FILE) and import the directory of .npy files",
                    path);
  else if (got >= 4 && !memcmp(m, "PK\x03\x04", 4))
    return qs__fail(QINS_EUNSUPPORTED,
                    "%s: this is a zip archive (a PyTorch .bin/.pt checkpoint): qins does not read "
                    "pickles; convert it to safetensors (e.g. safetensors.torch.save_file) and "
                    "import that",
                    path);
  else if (got >= 2 && m[0] == 0x80 && m[1] >= 2 && m[1] <= 5)
    return qs__fail(QINS_EUNSUPPORTED,
                    "%s: this is a Python pickle (protocol %u; an older PyTorch .bin): qins does "
                    "not read pickles; convert it to safetensors (e.g. safetensors.torch.save_file) "
                    "and import that",
                    path, m[1]);
  if (*kind == QS__F_UNKNOWN) {
    if (qs__ends_with(path, ".gguf")) *kind = QS__F_GGUF;
    else if (qs__ends_with(path, ".npy")) *kind = QS__F_NPY;
    else *kind = QS__F_SAFETENSORS; /* its parser names what is wrong */
  }
  return 0;
}

/* Adds the tensors of safetensors file `path`; the first file's metadata goes to *meta. */
static int qs__st_sources(const char *path, qs__srclist *L, char **meta) {
  char err[1024];
  qs_st_file *f;
  int kind, rc = qs__sniff(path, &kind);
  if (rc) return rc;
  if (kind != QS__F_SAFETENSORS)
    return qs__fail(QINS_EFORMAT, "%s: this is a %s file, not safetensors", path,
                    kind == QS__F_GGUF ? "GGUF" : ".npy");
  rc = qs_st_open(path, &f, err, sizeof err);
  if (rc) return qs__fail(rc, "%s", err);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) || (uint64_t)st.st_size != qs_st_file_size(f)) {
    if (fd >= 0) close(fd);
    qs_st_close(f);
    return qs__fail(QINS_EIO, "%s: changed while being opened", path);
  }
  int fi = qs__srclist_file(L, path, fd);
  if (fi < 0) {
    qs_st_close(f);
    return fi;
  }
  for (size_t i = 0; i < qs_st_count(f); i++) {
    const qs_st_tensor *t = qs_st_tensor_at(f, i);
    qs__src *s = qs__srclist_add(L, t->name, t->name_len, fi);
    if (!s) {
      qs_st_close(f);
      return qs__fail(QINS_ENOMEM, "out of memory");
    }
    s->offset = t->offset;
    s->nbytes = t->nbytes;
    s->ndim = t->ndim;
    memcpy(s->shape, t->shape, sizeof s->shape);
    s->n_elem = t->n_elem;
    qs__st_kind(t->dtype, s);
  }
  if (meta && !*meta) {
    *meta = strdup(qs_st_metadata_json(f));
    if (!*meta) {
      qs_st_close(f);
      return qs__fail(QINS_ENOMEM, "out of memory");
    }
  }
  qs_st_close(f);
  return 0;
}

/* Reads a whole small file (at most max bytes, else QINS_EFORMAT naming `what`) into a malloc'd
 * NUL-terminated buffer. */
static int qs__read_file(const char *path, uint64_t max, const char *what, char **out, size_t *len) {
  struct stat st;
  int fd = qs__open_read(path, &st);
  if (fd < 0) return fd;
  if ((uint64_t)st.st_size > max) {
    close(fd);
    return qs__fail(QINS_EFORMAT, "%s: %s is %lld bytes (limit %llu)", path, what,
                    (long long)st.st_size, (unsigned long long)max);
  }
  char *buf = malloc((size_t)st.st_size + 1);
  ssize_t got = buf ? pread(fd, buf, (size_t)st.st_size, 0) : -1;
  close(fd);
  if (got != st.st_size) {
    free(buf);
    return buf ? qs__fail(QINS_EIO, "%s: read error", path) : qs__fail(QINS_ENOMEM, "out of memory");
  }
  buf[got] = 0;
  *out = buf;
  *len = (size_t)got;
  return 0;
}

/* model.safetensors.index.json: {"metadata": {...}, "weight_map": {"tensor": "shard file"}}. */
static int qs__index_sources(const char *index_path, qs__srclist *L, char **meta) {
  char *buf;
  size_t len;
  int rc = qs__read_file(index_path, QS__INDEX_MAX, "index file", &buf, &len);
  if (rc) return rc;
  qs_json *root;
  char jerr[256];
  rc = qs_json_parse(buf, len, &root, jerr, sizeof jerr);
  free(buf);
  if (rc) return qs__fail(rc, "%s: not valid JSON: %s", index_path, jerr);
  const qs_json *wm = qs_json_get(root, "weight_map");
  if (root->type != QS_JSON_OBJECT || !wm || wm->type != QS_JSON_OBJECT) {
    qs_json_free(root);
    return qs__fail(QINS_EFORMAT, "%s: no \"weight_map\" object", index_path);
  }
  char dir[4096];
  snprintf(dir, sizeof dir, "%s", index_path);
  char *slash = strrchr(dir, '/');
  if (slash) slash[1] = 0;
  else strcpy(dir, "./");
  /* Distinct shard files in first-mention order. */
  const char **shards = calloc(wm->len + 1, sizeof *shards);
  size_t ns = 0;
  for (size_t i = 0; shards && i < wm->len; i++) {
    const qs_json *v = &wm->items[i];
    if (v->type != QS_JSON_STRING || !v->len || strstr(v->str, "..") || v->str[0] == '/' ||
        memchr(v->str, 0, v->len)) {
      rc = qs__fail(QINS_EFORMAT, "%s: weight_map entry \"%.200s\" is not a shard file name",
                    index_path, v->key);
      break;
    }
    size_t j;
    for (j = 0; j < ns; j++)
      if (!strcmp(shards[j], v->str)) break;
    if (j == ns) shards[ns++] = v->str;
  }
  if (!shards) rc = qs__fail(QINS_ENOMEM, "out of memory");
  size_t first = L->n;
  for (size_t j = 0; !rc && j < ns; j++) {
    char p[8192];
    snprintf(p, sizeof p, "%s%s", dir, shards[j]);
    rc = qs__st_sources(p, L, meta);
  }
  /* Cross-checks: every weight_map entry is in the shard it names; no tensor in two shards. */
  for (size_t i = 0; !rc && i < wm->len; i++) {
    const qs_json *v = &wm->items[i];
    size_t j;
    for (j = first; j < L->n; j++)
      if (!strcmp(L->v[j].name, v->key)) break;
    if (j == L->n) {
      rc = qs__fail(QINS_EFORMAT, "%s: tensor \"%.200s\" is mapped to %s but that shard lacks it",
                    index_path, v->key, v->str);
      break;
    }
    const char *base = strrchr(L->v[j].path, '/');
    base = base ? base + 1 : L->v[j].path;
    const char *want = strrchr(v->str, '/');
    want = want ? want + 1 : v->str;
    if (strcmp(base, want))
      rc = qs__fail(QINS_EFORMAT, "%s: tensor \"%.200s\" is mapped to %s but found in %s",
                    index_path, v->key, v->str, L->v[j].path);
  }
  free(shards);
  qs_json_free(root);
  return rc;
}

/* --------------------------------------------------------------------------------------------
 * Reading rows as f32 */
static uint64_t qs__src_row_len(const qs__src *s) { return s->ndim ? s->shape[s->ndim - 1] : 1; }
static uint64_t qs__src_row_bytes(const qs__src *s) {
  uint64_t rl = qs__src_row_len(s);
  unsigned bw, bb;
  if (s->kind == QS__K_BLOCKS && qs__gguf_block(s->dtype, &bw, &bb)) return rl / bw * bb;
  return rl * qs_dtype_size(s->dtype);
}

static void qs__to_f32(const qs__src *s, const uint8_t *src, uint64_t n_rows, float *dst) {
  uint64_t rl = qs__src_row_len(s), n = n_rows * rl;
  if (!n) return; /* an empty tensor has no buffers (NULL) to convert between */
  unsigned bw, bb;
  if (s->kind == QS__K_BLOCKS && qs__gguf_block(s->dtype, &bw, &bb)) {
    qs__gguf_dequant(s->dtype, src, n / bw, dst);
    return;
  }
  switch (s->dtype) {
  case QS_DT_F32: qc_to_f32(QC_DT_F32, src, n, dst); break;
  case QS_DT_F16: qc_to_f32(QC_DT_F16, src, n, dst); break;
  case QS_DT_BF16: qc_to_f32(QC_DT_BF16, src, n, dst); break;
  case QS_DT_F64:
    for (uint64_t i = 0; i < n; i++) {
      double d;
      memcpy(&d, src + 8 * i, 8);
      dst[i] = (float)d;
    }
    break;
  default: break;
  }
}

/* --------------------------------------------------------------------------------------------
 * The import driver */
void qs_import_opts_init(qs_import_opts *o) {
  memset(o, 0, sizeof *o);
  o->codec = -1;
  o->effort = QC_EFFORT_DEFAULT;
}

static int qs__is_float(const qs__src *s) {
  return s->kind == QS__K_BLOCKS ||
         (s->kind == QS__K_PLAIN && (s->dtype == QS_DT_F32 || s->dtype == QS_DT_F16 ||
                                     s->dtype == QS_DT_BF16 || s->dtype == QS_DT_F64));
}

/* The codec policy (store.h §Importers). Block-quantized GGUF sources are stored as their exact
 * dequantized f32 values unless allow_requant lets the rules re-encode them: their values are
 * d * q (- m) products that f16/bf16 generally cannot hold, and a lossy codec would stack a second
 * quantization error on the first. A 1-D f16/bf16 tensor keeps its own dtype (no widening). */
static int qs__codec_for(const qs__src *s, const qs_import_opts *o) {
  if (!qs__is_float(s)) return QS_RAW;
  if (s->kind == QS__K_BLOCKS && !o->allow_requant) return QC_F32;
  int c = s->ndim >= 2 ? QC_QINS8 : s->dtype == QS_DT_F16 ? QC_F16
                                  : s->dtype == QS_DT_BF16 ? QC_BF16 : QC_F32;
  if (o->codec >= 0) c = o->codec;
  for (size_t i = 0; i < o->n_rules; i++)
    if (fnmatch(o->rules[i].glob, s->name, 0) == 0) c = o->rules[i].codec;
  return c;
}

/* Message for a value a lossy codec refused. */
static int qs__refused_value(const qs__src *s, int rc, int codec, uint64_t at, float v) {
  if (rc == QINS_ENONFINITE)
    return qs__fail(rc,
                    "%s: tensor %s: element %llu is %s; lossy codec %s refuses non-finite values "
                    "(store it with --codec-for '%s=f32')",
                    s->path, s->name, (unsigned long long)at, isnan(v) ? "NaN" : "infinite",
                    qc_codec_name((qc_codec)codec), s->name);
  return qs__fail(rc, "%s: tensor %s: element %llu (%g) cannot be encoded by %s (%s)", s->path,
                  s->name, (unsigned long long)at, (double)v, qc_codec_name((qc_codec)codec),
                  qins_strerror(rc));
}

typedef struct qs__bufs {
  uint8_t *raw;      /* source bytes */
  size_t raw_cap;
  float *f;          /* f32 rows */
  size_t f_cap;      /* elements */
} qs__bufs;

static int qs__bufs_need(qs__bufs *b, uint64_t raw, uint64_t nf) {
  if (raw > b->raw_cap) {
    free(b->raw);
    b->raw = malloc(raw ? raw : 1);
    b->raw_cap = b->raw ? raw : 0;
    if (!b->raw) return qs__fail(QINS_ENOMEM, "out of memory for a %llu-byte batch", (unsigned long long)raw);
  }
  if (nf > b->f_cap) {
    free(b->f);
    b->f = malloc(nf ? nf * sizeof(float) : 4);
    b->f_cap = b->f ? nf : 0;
    if (!b->f) return qs__fail(QINS_ENOMEM, "out of memory for a %llu-element batch", (unsigned long long)nf);
  }
  return 0;
}

static int qs__read_rows(const qs__src *s, uint64_t r0, uint64_t nr, qs__bufs *b, int to_f32) {
  uint64_t rb = qs__src_row_bytes(s);
  if (qs__pread_full(s->fd, b->raw, nr * rb, s->offset + r0 * rb))
    return qs__fail(QINS_EIO, "%s: tensor %s: read error at byte %llu: %s", s->path, s->name,
                    (unsigned long long)(s->offset + r0 * rb),
                    errno ? strerror(errno) : "file truncated");
  if (to_f32) qs__to_f32(s, b->raw, nr, b->f);
  return 0;
}

/* Prefixes the current qs_error() with the file's path (store calls do not know it). */
static int qs__with_path(const qs__src *s, int rc) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", qs_error());
  if (strncmp(msg, s->path, strlen(s->path))) return qs__fail(rc, "%s: %s", s->path, msg);
  return rc;
}

/* Error figures of `params` on s's rows measured against the source's own values, for sources
 * wider than the f32 rows the store encodes (f64): each batch is converted to f32 as the import
 * does, encoded, decoded, and compared with the f64 values in double. One extra encode of the
 * tensor, paid only by such sources. `whole`: b already holds all of s (raw bytes and f32). */
static int qs__measure_wide(const qs__src *s, const qc_params *params, qs__bufs *b, int whole,
                            qc_stats *st) {
  uint64_t rl = qs__src_row_len(s), nrows = rl ? s->n_elem / rl : 0, rb = qs__src_row_bytes(s);
  uint64_t batch = QS__BATCH_F32 / sizeof(float) / (rl ? rl : 1);
  if (!batch) batch = 1;
  if (batch > nrows) batch = nrows;
  int ovf = 0;
  uint64_t cb = qc_chunk_bytes(params->codec, rl, batch, &ovf);
  void *enc = ovf ? NULL : malloc(cb ? cb : 1);
  float *dec = malloc(batch * rl * sizeof *dec + sizeof *dec);
  int rc = 0;
  if (!enc || !dec) rc = qs__fail(QINS_ENOMEM, "out of memory measuring tensor %s", s->name);
  if (!rc && !whole) rc = qs__bufs_need(b, batch * rb, batch * rl);
  memset(st, 0, sizeof *st);
  for (uint64_t r = 0; !rc && r < nrows; r += batch) {
    uint64_t nr = nrows - r < batch ? nrows - r : batch;
    if (!whole && (rc = qs__read_rows(s, r, nr, b, 1))) break;
    const uint8_t *raw = whole ? b->raw + r * rb : b->raw;
    const float *f = whole ? b->f + r * rl : b->f;
    uint64_t bad = 0;
    if ((rc = qc_encode(params, rl, nr, f, enc, NULL, &bad)) ||
        (rc = qc_decode(params, rl, nr, enc, 0, nr * rl, QC_DT_F32, dec))) {
      rc = qs__fail(rc, "%s: tensor %s: codec %s: %s", s->path, s->name,
                    qc_codec_name(params->codec), qins_strerror(rc));
      break;
    }
    for (uint64_t i = 0; i < nr * rl; i++) {
      double x;
      memcpy(&x, raw + 8 * i, 8);
      if (!isfinite(x)) continue;
      double e = fabs(x - (double)dec[i]);
      st->sum_sq += x * x;
      st->err_sq += e * e;
      if (!(e <= st->max_err)) st->max_err = e;
      st->n++;
    }
  }
  free(enc);
  free(dec);
  return rc;
}

static int qs__import_one(qs_import *im, const qs__src *s, int codec, const qs_import_opts *o,
                          qs__bufs *b, qs_tensor *out, uint64_t *done, uint64_t total) {
  uint64_t rl = qs__src_row_len(s), nrows = rl ? s->n_elem / rl : 0;
  uint64_t rb = qs__src_row_bytes(s);
  qs_tensor_desc d;
  memset(&d, 0, sizeof d);
  d.name = s->name;
  d.src_dtype = s->dtype;
  d.ndim = s->ndim;
  memcpy(d.shape, s->shape, sizeof d.shape);
  d.codec = codec;
  if (s->kind != QS__K_PLAIN) d.src_bytes = s->nbytes;
  qc_params params;
  memset(&params, 0, sizeof params);
  int rc;
  int whole = codec != QS_RAW && s->n_elem * sizeof(float) <= QS__WHOLE_MAX &&
              s->nbytes <= QS__WHOLE_MAX;
  if (codec != QS_RAW) {
    params.codec = (qc_codec)codec;
    int need_fit = qc_codec_is_lossy((qc_codec)codec) || qc_params_size((qc_codec)codec) > 0;
    if (whole && (rc = qs__bufs_need(b, s->nbytes, s->n_elem))) return rc;
    if (whole && nrows && (rc = qs__read_rows(s, 0, nrows, b, 1))) return rc; /* none: empty */
    if (need_fit && nrows) {
      qc_fit *fit;
      qc_fit_opts fo = {0};
      fo.effort = o->effort;
      if ((rc = qc_fit_new((qc_codec)codec, rl, &fo, &fit)))
        return qs__fail(rc, "%s: tensor %s: codec %s: cannot fit (%s)", s->path, s->name,
                        qc_codec_name((qc_codec)codec), qins_strerror(rc));
      uint64_t batch = QS__BATCH_F32 / sizeof(float) / (rl ? rl : 1);
      if (!batch) batch = 1;
      if (!whole && (rc = qs__bufs_need(b, batch * rb, batch * rl))) {
        qc_fit_free(fit);
        return rc;
      }
      for (uint64_t r = 0; r < nrows; r += batch) {
        uint64_t nr = nrows - r < batch ? nrows - r : batch;
        const float *rows = whole ? b->f + r * rl : b->f;
        if (!whole && (rc = qs__read_rows(s, r, nr, b, 1))) {
          qc_fit_free(fit);
          return rc;
        }
        uint64_t bad = 0;
        rc = qc_fit_add(fit, rows, nr, &bad);
        if (rc) {
          qc_fit_free(fit);
          return qs__refused_value(s, rc, codec, r * rl + bad, rows[bad]);
        }
      }
      rc = qc_fit_finish(fit, &params);
      qc_fit_free(fit);
      if (rc)
        return qs__fail(rc, "%s: tensor %s: codec %s: fit failed (%s)", s->path, s->name,
                        qc_codec_name((qc_codec)codec), qins_strerror(rc));
    }
    d.params = &params;
  }
  qc_stats wide;
  if (codec != QS_RAW && s->kind == QS__K_PLAIN && s->dtype == QS_DT_F64) {
    if ((rc = qs__measure_wide(s, &params, b, whole, &wide))) return rc;
    d.src_stats = &wide;
  }
  if ((rc = qs_import_tensor_begin(im, &d))) return qs__with_path(s, rc);
  uint64_t cr = qs_import_chunk_rows(im);
  if (!whole && (rc = qs__bufs_need(b, cr * rb, codec == QS_RAW ? 0 : cr * rl))) return rc;
  for (uint64_t r = 0; r < nrows; r += cr) {
    uint64_t nr = nrows - r < cr ? nrows - r : cr;
    const void *rows;
    if (whole) {
      rows = b->f + r * rl;
    } else {
      if ((rc = qs__read_rows(s, r, nr, b, codec != QS_RAW))) return rc;
      rows = codec == QS_RAW ? (const void *)b->raw : (const void *)b->f;
    }
    uint64_t bad = UINT64_MAX;
    rc = qs_import_tensor_rows(im, rows, nr, &bad);
    /* The element's value is known only if it lies in this batch (encoding is asynchronous). */
    if ((rc == QINS_ENONFINITE || (rc == QINS_EUNSUPPORTED && codec != QS_RAW)) &&
        bad >= r * rl && bad < (r + nr) * rl)
      return qs__refused_value(s, rc, codec, bad, ((const float *)rows)[bad - r * rl]);
    if (rc) return qs__with_path(s, rc);
    *done += nr * rb;
    if (o->progress) o->progress(o->progress_ud, *done, total, s->name);
  }
  if ((rc = qs_import_tensor_end(im, out))) return qs__with_path(s, rc);
  return 0;
}

/* --------------------------------------------------------------------------------------------
 * Hugging Face directories: the JSON files kept with the model, and cache snapshot names */

/* Adds "hf": {"config": {...}, "generation_config": {...}, "tokenizer": {...}} to the metadata
 * object *meta for those of dir's config.json, generation_config.json and tokenizer.json that
 * exist (each must be valid JSON; one larger than qs__meta_max() is left out and named in
 * "hf_omitted"). Nothing changes when none exists or *meta already has an "hf" member. */
static int qs__hf_meta(const char *dir, char **meta) {
  static const char *const files[3][2] = {{"config.json", "config"},
                                          {"generation_config.json", "generation_config"},
                                          {"tokenizer.json", "tokenizer"}};
  qp_buf hb = {0}, om = {0};
  int rc = 0, n = 0, n_om = 0;
  for (int i = 0; i < 3 && !rc; i++) {
    char p[8192];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, files[i][0]);
    if (stat(p, &st) || !S_ISREG(st.st_mode)) continue;
    if ((uint64_t)st.st_size > qs__meta_max()) {
      qp_puts(&om, n_om++ ? "," : "[");
      qp_json_str(&om, files[i][0], strlen(files[i][0]), QP_JSON_U);
      continue;
    }
    char *buf;
    size_t len;
    if ((rc = qs__read_file(p, qs__meta_max(), files[i][0], &buf, &len))) break;
    qs_json *j;
    char jerr[256];
    if ((rc = qs_json_parse(buf, len, &j, jerr, sizeof jerr))) {
      free(buf);
      rc = qs__fail(rc, "%s: not valid JSON: %s", p, jerr);
      break;
    }
    qs_json_free(j);
    qp_puts(&hb, n++ ? ",\"" : "{\"");
    qp_puts(&hb, files[i][1]);
    qp_puts(&hb, "\":");
    qp_put(&hb, buf, len);
    free(buf);
  }
  if (!rc && (n || n_om)) {
    const char *m = *meta && **meta ? *meta : "{}";
    qs_json *root = NULL;
    if (qs_json_parse(m, strlen(m), &root, NULL, 0) == 0 && root->type == QS_JSON_OBJECT &&
        !qs_json_get(root, "hf") && !qs_json_get(root, "hf_omitted")) {
      qp_buf nb = {0};
      size_t ml = strlen(m);
      while (ml && m[ml - 1] != '}') ml--; /* the object's closing brace */
      qp_put(&nb, m, ml ? ml - 1 : 0);
      int empty = root->len == 0;
      if (n) {
        qp_puts(&nb, empty ? "\"hf\":" : ",\"hf\":");
        qp_put(&nb, hb.p, hb.n);
        qp_puts(&nb, "}");
        empty = 0;
      }
      if (n_om) {
        qp_puts(&nb, empty ? "\"hf_omitted\":" : ",\"hf_omitted\":");
        qp_put(&nb, om.p, om.n);
        qp_puts(&nb, "]");
      }
      qp_puts(&nb, "}");
      if (nb.oom) rc = qs__fail(QINS_ENOMEM, "out of memory");
      else {
        free(*meta);
        *meta = nb.p;
        nb.p = NULL;
      }
      free(nb.p);
    }
    qs_json_free(root);
  }
  if (!rc && (hb.oom || om.oom)) rc = qs__fail(QINS_ENOMEM, "out of memory");
  free(hb.p);
  free(om.p);
  return rc;
}

/* A path inside a Hugging Face cache snapshot (.../models--ORG--NAME/snapshots/HASH, or a file
 * directly in it) gives NAME; returns 1 and writes it, else 0. */
static int qs__hf_snapshot_name(const char *path, char *out, size_t cap) {
  char buf[8192];
  snprintf(buf, sizeof buf, "%s", path);
  size_t n = strlen(buf);
  while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
  /* Up to three trailing components: [FILE] HASH "snapshots" "models--ORG--NAME". */
  for (int tries = 0; tries < 2; tries++) {
    char *hash = strrchr(buf, '/');
    if (!hash) return 0;
    *hash = 0;
    char *snap = strrchr(buf, '/');
    const char *sname = snap ? snap + 1 : buf;
    if (!strcmp(sname, "snapshots") && snap) {
      *snap = 0;
      char *repo = strrchr(buf, '/');
      repo = repo ? repo + 1 : buf;
      const char *last = NULL;
      for (const char *q = repo; (q = strstr(q, "--")); q += 2) last = q + 2;
      if (strncmp(repo, "models--", 8) || !last || !*last) return 0;
      snprintf(out, cap, "%s", last);
      return 1;
    }
  }
  return 0;
}

/* Collects sources for path; *model_default gets the name to use without --model. */
static int qs__collect(const char *path, qs__srclist *L, char **meta,
                       char *model_default, size_t mcap) {
  struct stat st;
  if (stat(path, &st)) return qs__fail(-errno, "%s: %s", path, strerror(errno));
  qs__stem(path, model_default, mcap);
  if (S_ISDIR(st.st_mode)) {
    char p[8192];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", path);
    if (access(p, F_OK) == 0) return qs__index_sources(p, L, meta);
    DIR *d = opendir(path);
    if (!d) return qs__fail(-errno, "%s: %s", path, strerror(errno));
    char **names = NULL;
    size_t n = 0, n_st = 0, n_npy = 0, n_pt = 0, n_npz = 0, n_gguf = 0;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
      int is_st = qs__ends_with(e->d_name, ".safetensors"), is_npy = qs__ends_with(e->d_name, ".npy");
      n_pt += qs__ends_with(e->d_name, ".bin") || qs__ends_with(e->d_name, ".pt") ||
              qs__ends_with(e->d_name, ".pth");
      n_npz += qs__ends_with(e->d_name, ".npz");
      n_gguf += qs__ends_with(e->d_name, ".gguf");
      if (!is_st && !is_npy) continue;
      char **nn = realloc(names, (n + 1) * sizeof *nn);
      if (!nn || !(nn[n] = strdup(e->d_name))) {
        if (nn) names = nn;
        rc = qs__fail(QINS_ENOMEM, "out of memory");
        break;
      }
      names = nn;
      n++;
      n_st += is_st;
      n_npy += is_npy;
    }
    closedir(d);
    /* Sorted, so that a directory of .npy files always imports in the same order. */
    for (size_t i = 1; i < n; i++)
      for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
        char *t = names[j];
        names[j] = names[j - 1];
        names[j - 1] = t;
      }
    if (!rc && n_st == 1 && n_npy == 0) {
      for (size_t i = 0; i < n; i++) {
        snprintf(p, sizeof p, "%s/%s", path, names[i]);
        rc = qs__st_sources(p, L, meta);
      }
    } else if (!rc && n_st == 0 && n_npy > 0) {
      for (size_t i = 0; !rc && i < n; i++) {
        char stem[QS_MAX_NAME + 1];
        snprintf(p, sizeof p, "%s/%s", path, names[i]);
        qs__stem(names[i], stem, sizeof stem);
        int kind;
        if ((rc = qs__sniff(p, &kind))) break; /* an LFS pointer named .npy is named */
        rc = qs__npy_sources(p, stem, L);
      }
    } else if (!rc && n_st == 0 && n_npy == 0) {
      /* Name what is there instead, and what to do with it. */
      rc = qs__fail(QINS_EFORMAT,
                    "%s: directory holds no .safetensors or .npy files%s%s%s%s%s%s%s", path,
                    n_pt ? "; " : "", n_pt ? "PyTorch .bin/.pt checkpoints: convert them to "
                                             "safetensors" : "",
                    n_npz ? "; " : "", n_npz ? ".npz archives: unpack them into .npy files" : "",
                    n_gguf ? "; " : "", n_gguf ? ".gguf files: import the .gguf file itself" : "",
                    n_pt + n_npz + n_gguf ? "" : " (nothing qins can import)");
    } else if (!rc) {
      rc = qs__fail(QINS_EFORMAT,
                    "%s: directory holds %zu .safetensors and %zu .npy files and no "
                    "model.safetensors.index.json: give one file, an index, or only .npy files",
                    path, n_st, n_npy);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
  }
  if (qs__ends_with(path, ".index.json")) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *sl = strrchr(dir, '/');
    if (sl) {
      *sl = 0;
      qs__stem(dir, model_default, mcap);
    }
    return qs__index_sources(path, L, meta);
  }
  /* By content first: GGUF, NUMPY, safetensors, or a named refusal. */
  int kind, rc = qs__sniff(path, &kind);
  if (rc) return rc;
  if (kind == QS__F_GGUF) return qs__gguf_sources(path, L, meta);
  if (kind == QS__F_NPY) {
    char stem[QS_MAX_NAME + 1];
    qs__stem(path, stem, sizeof stem);
    return qs__npy_sources(path, stem, L);
  }
  return qs__st_sources(path, L, meta);
}

int qs_import_path(qs_store *s, const char *path, const qs_import_opts *o_in,
                   qs_import_result *res) {
  qs_import_opts od;
  if (!o_in) qs_import_opts_init(&od);
  const qs_import_opts *o = o_in ? o_in : &od;
  qs__srclist L;
  memset(&L, 0, sizeof L);
  char *meta = NULL;
  char model[QS_MAX_NAME + 64];
  int rc = qs__collect(path, &L, &meta, model, sizeof model);
  struct stat pst;
  if (!rc && stat(path, &pst) == 0 && S_ISDIR(pst.st_mode)) rc = qs__hf_meta(path, &meta);
  qs__hf_snapshot_name(path, model, sizeof model);
  if (o->model) snprintf(model, sizeof model, "%s", o->model);
  int *codecs = NULL;
  qs_import *im = NULL;
  qs__bufs b = {0};
  if (rc) goto out;
  /* Validate everything before the first write. */
  if ((rc = qs__name_check("model", model, 1))) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", qs_error());
    rc = qs__fail(rc, "%s: %s (use --model NAME)", path, msg);
    goto out;
  }
  codecs = calloc(L.n + 1, sizeof *codecs);
  if (!codecs) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  uint64_t total = 0;
  for (size_t i = 0; i < L.n; i++) {
    qs__src *sr = &L.v[i];
    if (sr->kind == QS__K_REFUSED) {
      rc = qs__fail(QINS_EUNSUPPORTED, "%s: tensor %s: %s", sr->path, sr->name, sr->why);
      goto out;
    }
    if (memchr(sr->name, 0, strlen(sr->name) + 1) != sr->name + strlen(sr->name) ||
        qs__name_check("tensor", sr->name, 0)) {
      char msg[1024];
      snprintf(msg, sizeof msg, "%s", qs_error());
      rc = qs__fail(QINS_ENAME, "%s: %s", sr->path, msg);
      goto out;
    }
    for (size_t j = 0; j < i; j++)
      if (!strcmp(L.v[j].name, sr->name)) {
        rc = qs__fail(QINS_EFORMAT, "%s: tensor %s also appears in %s", sr->path, sr->name,
                      L.v[j].path);
        goto out;
      }
    codecs[i] = qs__codec_for(sr, o);
    total += sr->nbytes;
  }
  if ((rc = qs_import_begin(s, model, meta, &im))) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", qs_error());
    rc = qs__fail(rc, "%s: %s", path, msg);
    goto out;
  }
  uint64_t done = 0;
  double snr_w = 0, snr_n = 0;
  qs_import_result r;
  memset(&r, 0, sizeof r);
  r.snr_db_narrowed = INFINITY;
  for (size_t i = 0; i < L.n; i++) {
    qs_tensor t;
    if ((rc = qs__import_one(im, &L.v[i], codecs[i], o, &b, &t, &done, total))) {
      qs_import_abort(im);
      im = NULL;
      goto out;
    }
    r.n_tensors++;
    r.n_elem += t.n_elem;
    r.src_bytes += t.src_bytes;
    r.stored_bytes += t.stored_bytes;
    if (t.ndim >= 2 && t.codec != QS_RAW && isfinite(t.snr_db)) {
      snr_w += t.snr_db * (double)t.n_elem;
      snr_n += (double)t.n_elem;
    }
    if (t.codec != QS_RAW && !qc_codec_is_lossy((qc_codec)t.codec) && !(t.snr_db > DBL_MAX)) {
      r.n_narrowed++;
      if (!(t.snr_db >= r.snr_db_narrowed)) {
        r.snr_db_narrowed = t.snr_db;
        memcpy(r.narrowed_tensor, t.name, sizeof r.narrowed_tensor);
      }
    }
  }
  rc = qs_import_commit(im);
  im = NULL;
  if (rc) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", qs_error());
    rc = qs__fail(rc, "%s: %s", path, msg);
    goto out;
  }
  memcpy(r.model, model, strlen(model) + 1); /* checked <= QS_MAX_NAME above */
  r.snr_db_2d = snr_n > 0 ? snr_w / snr_n : INFINITY;
  if (res) *res = r;
out:
  free(b.raw);
  free(b.f);
  free(codecs);
  free(meta);
  qs__srclist_free(&L);
  return rc;
}
