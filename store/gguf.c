/* SPDX-License-Identifier: MIT */
/*
 * gguf.c — a validating GGUF v2/v3 reader for the importer (FORMATS-AND-PEERS.md §1.3; spec
 * ggml-org/ggml:docs/gguf.md, checks as strict as ggml's gguf.cpp).
 *
 * Layout: "GGUF" | u32 version | u64 n_tensors | u64 n_kv | KVs | tensor infos | pad to ALIGNMENT |
 * data. Every length and count is checked against the bytes left in the file before anything is
 * allocated; strings and arrays are capped at 2^30; nested arrays, duplicate or empty keys, bools
 * other than 0/1, big-endian files (version & 0xFFFF == 0) and v1 are refused. Tensor infos: at
 * most 4 dims, element count without overflow, known type, offsets aligned and equal to the
 * running sum of padded sizes, data inside the file. GGUF lists dims innermost first (ne[0] is the
 * contiguous axis): the row-major shape is ne reversed, with the same bytes.
 * Types: F32, F16, BF16, F64 (codecs), I8..I64 (raw); the block types Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
 * Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K are listed as QS__K_BLOCKS with their own qs_dtype and dequantized
 * exactly by gguf_quant.c (the codec policy decides whether they are re-encoded: import.c); every
 * other quantized type (IQ*, TQ*, MXFP4, Q8_1) is refused, naming it.
 * Metadata kept with the model (docs/FORMAT.md §Model metadata): "source_format": "gguf"; every
 * string and scalar KV as a string member (keys that are not UTF-8 skipped, string values over
 * 64 KiB too); and "gguf": {"version": V, "kv": [[key, type, value], ...]} holding every KV in file
 * order with its GGUF type ("u32", "f32", "string", "[string]", ...), arrays (the tokenizer's
 * too) as JSON arrays, integers exact, floats to the bit (f32 with 9, f64 with 17 digits;
 * non-finite ones as "nan"/"inf"/"-inf"). An array that would take the list past qs__meta_max() is
 * kept as [key, "[type]", null, count]. String values that are not UTF-8 keep their valid parts
 * (U+FFFD for the rest).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "import_int.h"
#include "store_int.h"

#define QS__GGUF_MAX_STR (1ull << 30) /* ggml's cap on string bytes and array elements */
#define QS__GGUF_META_STR (64u << 10) /* longer string KVs are not kept in the model metadata */

typedef struct qs__gr {
  const char *path;
  int fd;
  uint64_t size;     /* file size */
  uint64_t pos;      /* read position */
  uint8_t buf[1 << 16];
  uint64_t boff;     /* file offset of buf[0] */
  size_t blen;       /* valid bytes in buf */
  int rc;            /* first error */
} qs__gr;

static int qs__gr_fail(qs__gr *r, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qs__gr_fail(qs__gr *r, int rc, const char *fmt, ...) {
  if (r->rc) return r->rc;
  char msg[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  r->rc = qs__fail(rc, "%s: %s", r->path, msg);
  return r->rc;
}

/* Reads n bytes at the position (n <= sizeof buf when out is used) or skips them (out NULL). */
static int qs__gr_read(qs__gr *r, void *out, uint64_t n, const char *what) {
  if (r->rc) return r->rc;
  if (n > r->size - r->pos)
    return qs__gr_fail(r, QINS_EFORMAT, "truncated: %s needs %llu bytes at offset %llu (file is %llu bytes)",
                       what, (unsigned long long)n, (unsigned long long)r->pos,
                       (unsigned long long)r->size);
  if (!out) {
    r->pos += n;
    return 0;
  }
  uint8_t *o = out;
  while (n) {
    if (r->pos < r->boff || r->pos >= r->boff + r->blen) {
      ssize_t got;
      do got = pread(r->fd, r->buf, sizeof r->buf, (off_t)r->pos);
      while (got < 0 && errno == EINTR);
      if (got <= 0) return qs__gr_fail(r, QINS_EIO, "read error at offset %llu", (unsigned long long)r->pos);
      r->boff = r->pos;
      r->blen = (size_t)got;
    }
    size_t off = (size_t)(r->pos - r->boff), take = r->blen - off;
    if (take > n) take = (size_t)n;
    memcpy(o, r->buf + off, take);
    o += take;
    n -= take;
    r->pos += take;
  }
  return 0;
}

static uint32_t qs__gr_u32(qs__gr *r, const char *what) {
  uint8_t b[4] = {0};
  qs__gr_read(r, b, 4, what);
  return qs__get_u32(b);
}
static uint64_t qs__gr_u64(qs__gr *r, const char *what) {
  uint8_t b[8] = {0};
  qs__gr_read(r, b, 8, what);
  return qs__get_u64(b);
}

/* Reads a string into a malloc'd NUL-terminated buffer (or skips it if out is NULL). */
static int qs__gr_str(qs__gr *r, char **out, uint64_t *len, uint64_t max, const char *what) {
  uint64_t n = qs__gr_u64(r, what);
  if (r->rc) return r->rc;
  if (n > max)
    return qs__gr_fail(r, QINS_EFORMAT, "%s at offset %llu is %llu bytes (limit %llu)", what,
                       (unsigned long long)(r->pos - 8), (unsigned long long)n,
                       (unsigned long long)max);
  if (n > r->size - r->pos)
    return qs__gr_fail(r, QINS_EFORMAT, "truncated: %s of %llu bytes at offset %llu runs past the end",
                       what, (unsigned long long)n, (unsigned long long)r->pos);
  if (len) *len = n;
  if (!out) return qs__gr_read(r, NULL, n, what);
  char *s = malloc(n + 1);
  if (!s) return qs__gr_fail(r, QINS_ENOMEM, "out of memory");
  uint64_t done = 0;
  while (done < n && !r->rc) {
    uint64_t take = n - done > sizeof r->buf ? sizeof r->buf : n - done;
    qs__gr_read(r, s + done, take, what);
    done += take;
  }
  if (r->rc) {
    free(s);
    return r->rc;
  }
  s[n] = 0;
  *out = s;
  return 0;
}

enum { G_U8, G_I8, G_U16, G_I16, G_U32, G_I32, G_F32, G_BOOL, G_STRING, G_ARRAY, G_U64, G_I64, G_F64 };
static const unsigned char qs__gsz[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
static const char *const qs__gtname[13] = {"u8",     "i8",    "u16", "i16", "u32", "i32", "f32",
                                           "bool",   "string", "array", "u64", "i64", "f64"};

/* A scalar KV value of type ty (bytes at v) as JSON: integers exactly, f32 with 9 and f64 with 17
 * significant digits (both read back to the same bits), non-finite floats as the strings "nan",
 * "inf", "-inf" (JSON has no such numbers). */
static void qs__gguf_json_scalar(qp_buf *b, uint32_t ty, const uint8_t *v) {
  char num[64];
  double f = 0;
  int is_f = 0;
  switch (ty) {
  case G_U8: snprintf(num, sizeof num, "%u", v[0]); break;
  case G_I8: snprintf(num, sizeof num, "%d", (int8_t)v[0]); break;
  case G_U16: snprintf(num, sizeof num, "%u", qs__get_u16(v)); break;
  case G_I16: snprintf(num, sizeof num, "%d", (int16_t)qs__get_u16(v)); break;
  case G_U32: snprintf(num, sizeof num, "%u", qs__get_u32(v)); break;
  case G_I32: snprintf(num, sizeof num, "%d", (int32_t)qs__get_u32(v)); break;
  case G_U64: snprintf(num, sizeof num, "%llu", (unsigned long long)qs__get_u64(v)); break;
  case G_I64: snprintf(num, sizeof num, "%lld", (long long)qs__get_u64(v)); break;
  case G_BOOL: snprintf(num, sizeof num, "%s", v[0] ? "true" : "false"); break;
  case G_F32: {
    uint32_t u = qs__get_u32(v);
    float x;
    memcpy(&x, &u, 4);
    f = x;
    is_f = 1;
    snprintf(num, sizeof num, "%.9g", f);
    break;
  }
  case G_F64:
    f = qs__get_f64(v);
    is_f = 1;
    snprintf(num, sizeof num, "%.17g", f);
    break;
  default: snprintf(num, sizeof num, "null");
  }
  if (is_f && !isfinite(f)) snprintf(num, sizeof num, "\"%s\"", isnan(f) ? "nan" : f > 0 ? "inf" : "-inf");
  qp_puts(b, num);
}

typedef struct qs__gtype {
  const char *name;   /* ggml name, NULL = no such id */
  unsigned blck;      /* elements per block */
  unsigned bytes;     /* bytes per block */
} qs__gtype;

static const qs__gtype qs__gtypes[] = {
    [0] = {"F32", 1, 4},       [1] = {"F16", 1, 2},       [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},    [6] = {"Q5_0", 32, 22},    [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},    [9] = {"Q8_1", 32, 36},    [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110}, [12] = {"Q4_K", 256, 144}, [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210}, [15] = {"Q8_K", 256, 292}, [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74}, [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18}, [21] = {"IQ3_S", 256, 110}, [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},     [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},      [27] = {"I64", 1, 8},      [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56}, [30] = {"BF16", 1, 2},     [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66}, [39] = {"MXFP4", 32, 17},
};
#define QS__NGTYPES (sizeof qs__gtypes / sizeof qs__gtypes[0])

/* The qs_dtype of a ggml block type qins dequantizes, or -1. */
static int qs__gblock_dtype(uint32_t ty) {
  switch (ty) {
  case 2: return QS_DT_Q4_0;
  case 3: return QS_DT_Q4_1;
  case 6: return QS_DT_Q5_0;
  case 7: return QS_DT_Q5_1;
  case 8: return QS_DT_Q8_0;
  case 10: return QS_DT_Q2_K;
  case 11: return QS_DT_Q3_K;
  case 12: return QS_DT_Q4_K;
  case 13: return QS_DT_Q5_K;
  case 14: return QS_DT_Q6_K;
  case 15: return QS_DT_Q8_K;
  default: return -1;
  }
}

static int qs__key_cmp(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Whether KV `key` goes into the model metadata: its JSON object must keep distinct keys, so a
 * key that is not well-formed UTF-8 (two such keys could both become "\ufffd"...) and our own
 * "source_format" and "gguf" are left out of the flat string map, as arrays are (the typed list
 * keeps every KV). */
static int qs__gguf_meta_key(const char *key, uint64_t kl) {
  return qp_utf8_valid(key, (size_t)kl) && !(kl == 13 && !memcmp(key, "source_format", 13)) &&
         !(kl == 4 && !memcmp(key, "gguf", 4));
}

int qs__gguf_sources(const char *path, qs__srclist *L, char **meta_json) {
  qs__gr *r = calloc(1, sizeof *r);
  if (!r) return qs__fail(QINS_ENOMEM, "out of memory");
  r->path = path;
  struct stat st;
  r->fd = qs__open_read(path, &st);
  if (r->fd < 0) {
    int rc = r->fd;
    free(r);
    return rc;
  }
  r->size = (uint64_t)st.st_size;
  int fi = qs__srclist_file(L, path, r->fd); /* the list owns the fd from here */
  if (fi < 0) {
    free(r);
    return fi;
  }
  char **keys = NULL;
  uint64_t n_keys = 0;
  qp_buf mb = {0};
  size_t first = L->n;
  qp_puts(&mb, "{\"source_format\":\"gguf\"");
  uint8_t magic[4];
  if (qs__gr_read(r, magic, 4, "the magic")) goto out;
  if (memcmp(magic, "GGUF", 4)) {
    qs__gr_fail(r, QINS_EFORMAT, "bad magic %02x %02x %02x %02x (expected \"GGUF\")", magic[0],
                magic[1], magic[2], magic[3]);
    goto out;
  }
  uint32_t ver = qs__gr_u32(r, "the version");
  if (r->rc) goto out;
  if ((ver & 0xFFFF) == 0 && ver) {
    qs__gr_fail(r, QINS_EUNSUPPORTED, "big-endian GGUF (version field 0x%08x) is not supported", ver);
    goto out;
  }
  if (ver != 2 && ver != 3) {
    qs__gr_fail(r, QINS_EVERSION, "GGUF version %u is not supported (2 and 3 are)", ver);
    goto out;
  }
  uint64_t n_t = qs__gr_u64(r, "the tensor count"), n_kv = qs__gr_u64(r, "the KV count");
  if (r->rc) goto out;
  /* A KV takes at least 13 bytes and a tensor info at least 32: bound counts by the file. */
  if (n_kv > r->size / 13 || n_t > r->size / 32) {
    qs__gr_fail(r, QINS_EFORMAT, "%llu KVs and %llu tensors cannot fit in %llu bytes",
                (unsigned long long)n_kv, (unsigned long long)n_t, (unsigned long long)r->size);
    goto out;
  }
  keys = calloc(n_kv + 1, sizeof *keys);
  if (!keys) {
    qs__gr_fail(r, QINS_ENOMEM, "out of memory");
    goto out;
  }
  uint64_t align = 32;
  qp_buf kv = {0}; /* the typed KV list: [[key, type, value], ...] */
  uint64_t meta_max = qs__meta_max();
  qp_puts(&kv, "[");
  for (uint64_t i = 0; i < n_kv && !r->rc; i++) {
    char *key;
    uint64_t kl;
    if (qs__gr_str(r, &key, &kl, 65535, "a KV key")) break;
    keys[n_keys++] = key;
    if (kl == 0 || strlen(key) != kl) {
      qs__gr_fail(r, QINS_EFORMAT, "KV %llu has an empty key or a NUL in it", (unsigned long long)i);
      break;
    }
    uint32_t ty = qs__gr_u32(r, "a KV type");
    if (r->rc) break;
    if (ty > G_F64) {
      qs__gr_fail(r, QINS_EFORMAT, "KV \"%.100s\" has unknown type %u", key, ty);
      break;
    }
    size_t entry = kv.n; /* to roll back an array that does not fit */
    if (i) qp_puts(&kv, ",");
    qp_puts(&kv, "[");
    qp_json_str(&kv, key, kl, QP_JSON_U);
    if (ty == G_ARRAY) {
      uint32_t et = qs__gr_u32(r, "an array type");
      uint64_t cnt = qs__gr_u64(r, "an array count");
      if (r->rc) break;
      if (et > G_F64 || et == G_ARRAY) {
        qs__gr_fail(r, QINS_EFORMAT, "KV \"%.100s\": array of %s", key,
                    et == G_ARRAY ? "arrays (nested arrays are refused)" : "an unknown type");
        break;
      }
      if (cnt > QS__GGUF_MAX_STR) {
        qs__gr_fail(r, QINS_EFORMAT, "KV \"%.100s\": array of %llu elements (limit 2^30)", key,
                    (unsigned long long)cnt);
        break;
      }
      if (et != G_STRING && cnt * qs__gsz[et] > r->size - r->pos) {
        qs__gr_fail(r, QINS_EFORMAT, "truncated: KV \"%.100s\" array of %llu elements runs past the end",
                    key, (unsigned long long)cnt);
        break;
      }
      qp_puts(&kv, ",\"[");
      qp_puts(&kv, qs__gtname[et]);
      qp_puts(&kv, "]\",[");
      int elided = 0;
      for (uint64_t j = 0; j < cnt && !r->rc; j++) {
        if (!elided && kv.n > meta_max) { /* too big to keep: the count stands for it */
          elided = 1;
          kv.n = entry;
          kv.p[kv.n] = 0;
          if (i) qp_puts(&kv, ",");
          qp_puts(&kv, "[");
          qp_json_str(&kv, key, kl, QP_JSON_U);
          qp_puts(&kv, ",\"[");
          qp_puts(&kv, qs__gtname[et]);
          qp_puts(&kv, "]\",null,");
          char num[32];
          snprintf(num, sizeof num, "%llu", (unsigned long long)cnt);
          qp_puts(&kv, num);
        }
        if (et == G_STRING) {
          char *sv;
          uint64_t svl;
          if (elided) {
            qs__gr_str(r, NULL, NULL, QS__GGUF_MAX_STR, "an array string");
            continue;
          }
          if (qs__gr_str(r, &sv, &svl, QS__GGUF_MAX_STR, "an array string")) break;
          if (j) qp_puts(&kv, ",");
          qp_json_str(&kv, sv, (size_t)svl, QP_JSON_U);
          free(sv);
        } else {
          uint8_t v[8] = {0};
          if (qs__gr_read(r, v, qs__gsz[et], "an array element")) break;
          if (et == G_BOOL && v[0] > 1) {
            qs__gr_fail(r, QINS_EFORMAT, "KV \"%.100s\": bool element is %u", key, v[0]);
            break;
          }
          if (elided) continue;
          if (j) qp_puts(&kv, ",");
          qs__gguf_json_scalar(&kv, et, v);
        }
      }
      if (r->rc) break;
      qp_puts(&kv, elided ? "]" : "]]");
      continue;
    }
    qp_puts(&kv, ",\"");
    qp_puts(&kv, qs__gtname[ty]);
    qp_puts(&kv, "\",");
    if (ty == G_STRING) {
      char *val;
      uint64_t vl;
      if (qs__gr_str(r, &val, &vl, QS__GGUF_MAX_STR, "a string value")) break;
      if (vl <= QS__GGUF_META_STR && strlen(val) == vl && qs__gguf_meta_key(key, kl)) {
        qp_puts(&mb, ",");
        qp_json_str(&mb, key, kl, QP_JSON_U);
        qp_puts(&mb, ":");
        qp_json_str(&mb, val, vl, QP_JSON_U);
      }
      qp_json_str(&kv, val, (size_t)vl, QP_JSON_U);
      qp_puts(&kv, "]");
      free(val);
      continue;
    }
    uint8_t v[8] = {0};
    if (qs__gr_read(r, v, qs__gsz[ty], "a value")) break;
    if (ty == G_BOOL && v[0] > 1) {
      qs__gr_fail(r, QINS_EFORMAT, "KV \"%.100s\": bool value is %u (must be 0 or 1)", key, v[0]);
      break;
    }
    qp_buf num = {0};
    qs__gguf_json_scalar(&num, ty, v);
    qp_put(&kv, num.p ? num.p : "null", num.p ? num.n : 4);
    qp_puts(&kv, "]");
    if (!strcmp(key, "general.alignment")) {
      if (ty != G_U32) {
        free(num.p);
        qs__gr_fail(r, QINS_EFORMAT, "general.alignment has type %u, not u32", ty);
        break;
      }
      align = qs__get_u32(v);
      if (align == 0 || (align & (align - 1))) {
        free(num.p);
        qs__gr_fail(r, QINS_EFORMAT, "general.alignment %llu is not a power of two",
                    (unsigned long long)align);
        break;
      }
    }
    if (qs__gguf_meta_key(key, kl) && num.p) { /* the flat map keeps scalars as strings */
      const char *t = num.p;
      size_t tl = num.n;
      if (t[0] == '"') t++, tl -= 2; /* non-finite floats are already strings */
      qp_puts(&mb, ",");
      qp_json_str(&mb, key, kl, QP_JSON_U);
      qp_puts(&mb, ":");
      qp_json_str(&mb, t, tl, QP_JSON_U);
    }
    free(num.p);
  }
  qp_puts(&kv, "]");
  if (!r->rc) {
    char hdr[64];
    snprintf(hdr, sizeof hdr, ",\"gguf\":{\"version\":%u,\"kv\":", ver);
    qp_puts(&mb, hdr);
    qp_put(&mb, kv.p ? kv.p : "[]", kv.p ? kv.n : 2);
    qp_puts(&mb, "}");
    if (kv.oom) mb.oom = 1;
  }
  free(kv.p);
  if (r->rc) goto out;
  qsort(keys, n_keys, sizeof *keys, qs__key_cmp);
  for (uint64_t i = 1; i < n_keys; i++)
    if (!strcmp(keys[i - 1], keys[i])) {
      qs__gr_fail(r, QINS_EFORMAT, "duplicate KV key \"%.100s\"", keys[i]);
      goto out;
    }
  /* Tensor infos. */
  uint64_t *offs = calloc(n_t + 1, sizeof *offs), *sizes = calloc(n_t + 1, sizeof *sizes);
  if (!offs || !sizes) {
    free(offs);
    free(sizes);
    qs__gr_fail(r, QINS_ENOMEM, "out of memory");
    goto out;
  }
  for (uint64_t i = 0; i < n_t && !r->rc; i++) {
    char *name;
    uint64_t nl;
    if (qs__gr_str(r, &name, &nl, QS_MAX_NAME, "a tensor name")) break;
    qs__src *s = qs__srclist_add(L, name, nl, fi);
    if (!s) {
      free(name);
      qs__gr_fail(r, QINS_ENOMEM, "out of memory");
      break;
    }
    free(name);
    if (strlen(s->name) != nl || nl == 0) {
      qs__gr_fail(r, QINS_EFORMAT, "tensor %llu has an empty name or a NUL in it", (unsigned long long)i);
      break;
    }
    uint32_t nd = qs__gr_u32(r, "n_dims");
    if (r->rc) break;
    if (nd == 0 || nd > 4) {
      qs__gr_fail(r, QINS_EFORMAT, "tensor %s has %u dimensions (1 to 4 allowed)", s->name, nd);
      break;
    }
    uint64_t ne[4], n = 1;
    int ovf = 0;
    for (uint32_t d = 0; d < nd; d++) {
      ne[d] = qs__gr_u64(r, "a dimension");
      if (ne[d] > (uint64_t)INT64_MAX || __builtin_mul_overflow(n, ne[d], &n)) ovf = 1;
    }
    uint32_t ty = qs__gr_u32(r, "a tensor type");
    offs[i] = qs__gr_u64(r, "a tensor offset");
    if (r->rc) break;
    if (ovf) {
      qs__gr_fail(r, QINS_EFORMAT, "tensor %s: element count overflows 64 bits", s->name);
      break;
    }
    if (ty >= QS__NGTYPES || !qs__gtypes[ty].name) {
      qs__gr_fail(r, QINS_EFORMAT, "tensor %s has unknown ggml type %u", s->name, ty);
      break;
    }
    const qs__gtype *gt = &qs__gtypes[ty];
    if (gt->blck > 1 && qs__gblock_dtype(ty) < 0) {
      qs__gr_fail(r, QINS_EUNSUPPORTED,
                  "tensor %s has quantized type %s, which is not supported (Q4_0 Q4_1 Q5_0 Q5_1 "
                  "Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K are, and F32 F16 BF16 F64 I8..I64)",
                  s->name, gt->name);
      break;
    }
    if (ne[0] % gt->blck) {
      qs__gr_fail(r, QINS_EFORMAT, "tensor %s: row length %llu is not a multiple of %s's block of %u",
                  s->name, (unsigned long long)ne[0], gt->name, gt->blck);
      break;
    }
    if (__builtin_mul_overflow(n / gt->blck, (uint64_t)gt->bytes, &sizes[i])) {
      qs__gr_fail(r, QINS_EFORMAT, "tensor %s: byte size overflows", s->name);
      break;
    }
    s->ndim = (int)nd;
    for (uint32_t d = 0; d < nd; d++) s->shape[d] = ne[nd - 1 - d];
    s->n_elem = n;
    s->nbytes = sizes[i];
    s->kind = QS__K_PLAIN;
    switch (ty) {
    case 0: s->dtype = QS_DT_F32; break;
    case 1: s->dtype = QS_DT_F16; break;
    case 30: s->dtype = QS_DT_BF16; break;
    case 28: s->dtype = QS_DT_F64; break;
    case 24: s->dtype = QS_DT_I8; break;
    case 25: s->dtype = QS_DT_I16; break;
    case 26: s->dtype = QS_DT_I32; break;
    case 27: s->dtype = QS_DT_I64; break;
    default:
      if (gt->blck > 1) {
        s->kind = QS__K_BLOCKS;
        s->dtype = (qs_dtype)qs__gblock_dtype(ty);
        break;
      }
      qs__gr_fail(r, QINS_EINTERNAL, "tensor %s: unhandled type %s", s->name, gt->name);
    }
  }
  if (!r->rc) {
    uint64_t data = (r->pos + align - 1) / align * align, run = 0;
    for (uint64_t i = 0; i < n_t; i++) {
      qs__src *s = &L->v[first + i];
      if (offs[i] % align) {
        qs__gr_fail(r, QINS_EFORMAT, "tensor %s: offset %llu is not a multiple of the alignment %llu",
                    s->name, (unsigned long long)offs[i], (unsigned long long)align);
        break;
      }
      if (offs[i] != run) {
        qs__gr_fail(r, QINS_EFORMAT, "tensor %s: offset %llu, expected %llu (tensors must be packed in order)",
                    s->name, (unsigned long long)offs[i], (unsigned long long)run);
        break;
      }
      if (data > r->size || offs[i] > r->size - data || sizes[i] > r->size - data - offs[i]) {
        qs__gr_fail(r, QINS_EFORMAT, "truncated: tensor %s's data (%llu bytes at %llu) runs past the end (file is %llu bytes)",
                    s->name, (unsigned long long)sizes[i], (unsigned long long)(data + offs[i]),
                    (unsigned long long)r->size);
        break;
      }
      s->offset = data + offs[i];
      uint64_t padded = (sizes[i] + align - 1) / align * align;
      run += padded;
    }
  }
  free(offs);
  free(sizes);
out:
  qp_puts(&mb, "}");
  for (uint64_t i = 0; i < n_keys; i++) free(keys[i]);
  free(keys);
  int rc = r->rc;
  if (!rc && mb.oom) rc = qs__fail(QINS_ENOMEM, "out of memory");
  if (!rc && meta_json && !*meta_json) {
    *meta_json = mb.p;
    mb.p = NULL;
  }
  free(mb.p);
  free(r);
  return rc;
}
