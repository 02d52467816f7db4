/* SPDX-License-Identifier: MIT */
/*
 * npy.c — a validating .npy v1/v2/v3 reader for the importer (FORMATS-AND-PEERS.md §1.4; the
 * numpy.lib.format spec): one array per file becomes one tensor.
 *
 * Layout: "\x93NUMPY" | u8 major | u8 minor | HEADER_LEN (u16 LE for 1.0, u32 LE for 2.0/3.0) |
 * header: a Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...), } ended by
 * '\n' and padded with spaces | data. The dict is parsed strictly (exactly those three keys,
 * string/bool/tuple-of-ints values); the data must be exactly prod(shape) * itemsize bytes.
 * Accepted descr: little-endian (or '|', or '=' on this little-endian host) f4, f2, f8 (float),
 * b1, i1, u1, i2, u2, i4, u4, i8, u8 (raw). Refused with a reason: big-endian, Fortran order,
 * object arrays (pickles), anything else.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "import_int.h"
#include "store_int.h"

#define QS__NPY_MAX_HEADER (1u << 20) /* numpy reads at most 10000 by default; be a bit kinder */

typedef struct qs__np {
  const char *s;   /* header text */
  size_t n, i;     /* length, cursor */
} qs__np;

static void qs__np_ws(qs__np *p) {
  while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n')) p->i++;
}

/* A Python string literal '...' or "..." without escapes; copies it into out. */
static int qs__np_str(qs__np *p, char *out, size_t cap) {
  if (p->i >= p->n || (p->s[p->i] != '\'' && p->s[p->i] != '"')) return -1;
  char q = p->s[p->i++];
  size_t k = 0;
  while (p->i < p->n && p->s[p->i] != q) {
    if (p->s[p->i] == '\\' || k + 1 >= cap) return -1;
    out[k++] = p->s[p->i++];
  }
  if (p->i >= p->n) return -1;
  p->i++;
  out[k] = 0;
  return 0;
}

int qs__npy_sources(const char *path, const char *tensor_name, qs__srclist *L) {
  struct stat st;
  int fd = qs__open_read(path, &st);
  if (fd < 0) return fd;
  int fi = qs__srclist_file(L, path, fd);
  if (fi < 0) return fi;
  uint64_t size = (uint64_t)st.st_size;
  uint8_t pre[12];
  if (size < 10 || pread(fd, pre, size < 12 ? 10 : 12, 0) < 10)
    return qs__fail(QINS_EFORMAT, "%s: truncated .npy file (%llu bytes)", path, (unsigned long long)size);
  if (memcmp(pre, "\x93NUMPY", 6))
    return qs__fail(QINS_EFORMAT, "%s: bad .npy magic", path);
  unsigned major = pre[6], minor = pre[7];
  uint64_t hl, hstart;
  if (major == 1 && minor == 0) {
    hl = qs__get_u16(pre + 8);
    hstart = 10;
  } else if ((major == 2 || major == 3) && minor == 0) {
    if (size < 12) return qs__fail(QINS_EFORMAT, "%s: truncated .npy header", path);
    hl = qs__get_u32(pre + 8);
    hstart = 12;
  } else {
    return qs__fail(QINS_EVERSION, "%s: .npy version %u.%u is not supported (1.0, 2.0, 3.0 are)",
                    path, major, minor);
  }
  if (hl > QS__NPY_MAX_HEADER)
    return qs__fail(QINS_EFORMAT, "%s: .npy header of %llu bytes exceeds the limit of %u", path,
                    (unsigned long long)hl, QS__NPY_MAX_HEADER);
  if (hstart + hl > size)
    return qs__fail(QINS_EFORMAT, "%s: .npy header length %llu runs past the end of the file",
                    path, (unsigned long long)hl);
  char *h = malloc(hl + 1);
  if (!h) return qs__fail(QINS_ENOMEM, "out of memory");
  if (pread(fd, h, hl, (off_t)hstart) != (ssize_t)hl) {
    free(h);
    return qs__fail(QINS_EIO, "%s: read error", path);
  }
  h[hl] = 0;
  qs__np p = {h, hl, 0};
  char descr[32] = "", key[32];
  int fortran = -1, have_descr = 0, have_shape = 0, ndim = 0;
  uint64_t shape[QS_MAX_NDIM];
  int rc = 0;
#define NPY_BAD(...) do { rc = qs__fail(QINS_EFORMAT, __VA_ARGS__); goto out; } while (0)
  for (size_t i = 0; i < hl; i++)
    if ((unsigned char)h[i] >= 0x80 || (h[i] < 0x20 && h[i] != '\n' && h[i] != '\t'))
      NPY_BAD("%s: .npy header byte %zu is not printable ASCII", path, i);
  qs__np_ws(&p);
  if (p.i >= p.n || p.s[p.i++] != '{') NPY_BAD("%s: .npy header is not a dict literal", path);
  for (;;) {
    qs__np_ws(&p);
    if (p.i < p.n && p.s[p.i] == '}') {
      p.i++;
      break;
    }
    if (qs__np_str(&p, key, sizeof key)) NPY_BAD("%s: .npy header: bad key at byte %zu", path, p.i);
    qs__np_ws(&p);
    if (p.i >= p.n || p.s[p.i++] != ':') NPY_BAD("%s: .npy header: ':' expected at byte %zu", path, p.i);
    qs__np_ws(&p);
    if (!strcmp(key, "descr")) {
      if (have_descr++) NPY_BAD("%s: .npy header: duplicate key 'descr'", path);
      if (qs__np_str(&p, descr, sizeof descr))
        NPY_BAD("%s: .npy header: 'descr' is not a simple dtype string (structured dtypes are not supported)", path);
    } else if (!strcmp(key, "fortran_order")) {
      if (fortran >= 0) NPY_BAD("%s: .npy header: duplicate key 'fortran_order'", path);
      if (p.n - p.i >= 4 && !memcmp(p.s + p.i, "True", 4)) { fortran = 1; p.i += 4; }
      else if (p.n - p.i >= 5 && !memcmp(p.s + p.i, "False", 5)) { fortran = 0; p.i += 5; }
      else NPY_BAD("%s: .npy header: 'fortran_order' is not True or False", path);
    } else if (!strcmp(key, "shape")) {
      if (have_shape++) NPY_BAD("%s: .npy header: duplicate key 'shape'", path);
      if (p.i >= p.n || p.s[p.i++] != '(') NPY_BAD("%s: .npy header: 'shape' is not a tuple", path);
      for (;;) {
        qs__np_ws(&p);
        if (p.i < p.n && p.s[p.i] == ')') {
          p.i++;
          break;
        }
        if (p.i >= p.n || p.s[p.i] < '0' || p.s[p.i] > '9')
          NPY_BAD("%s: .npy header: bad dimension in 'shape' at byte %zu", path, p.i);
        uint64_t v = 0;
        while (p.i < p.n && p.s[p.i] >= '0' && p.s[p.i] <= '9') {
          unsigned dg = (unsigned)(p.s[p.i++] - '0');
          if (v > (UINT64_MAX - dg) / 10) NPY_BAD("%s: .npy header: dimension overflows 64 bits", path);
          v = v * 10 + dg;
        }
        if (p.i < p.n && p.s[p.i] == 'L') p.i++;
        if (ndim >= QS_MAX_NDIM) NPY_BAD("%s: .npy array has more than %d dimensions", path, QS_MAX_NDIM);
        shape[ndim++] = v;
        qs__np_ws(&p);
        if (p.i < p.n && p.s[p.i] == ',') p.i++;
        else if (p.i < p.n && p.s[p.i] == ')') continue;
        else NPY_BAD("%s: .npy header: ',' or ')' expected in 'shape' at byte %zu", path, p.i);
      }
    } else {
      NPY_BAD("%s: .npy header: unexpected key '%s'", path, key);
    }
    qs__np_ws(&p);
    if (p.i < p.n && p.s[p.i] == ',') { p.i++; continue; }
    if (p.i < p.n && p.s[p.i] == '}') { p.i++; break; }
    NPY_BAD("%s: .npy header: ',' or '}' expected at byte %zu", path, p.i);
  }
  qs__np_ws(&p);
  if (p.i != p.n) NPY_BAD("%s: .npy header: trailing characters after the dict", path);
  if (!have_descr || fortran < 0 || !have_shape)
    NPY_BAD("%s: .npy header lacks '%s'", path, !have_descr ? "descr" : fortran < 0 ? "fortran_order" : "shape");
  if (fortran) {
    rc = qs__fail(QINS_EUNSUPPORTED, "%s: Fortran-order arrays are not supported (save a C-order copy)", path);
    goto out;
  }
  static const struct { const char *d; qs_dtype t; } map[] = {
      {"f4", QS_DT_F32}, {"f2", QS_DT_F16}, {"f8", QS_DT_F64}, {"b1", QS_DT_BOOL},
      {"i1", QS_DT_I8},  {"u1", QS_DT_U8},  {"i2", QS_DT_I16}, {"u2", QS_DT_U16},
      {"i4", QS_DT_I32}, {"u4", QS_DT_U32}, {"i8", QS_DT_I64}, {"u8", QS_DT_U64}};
  int dt = -1;
  if (descr[0] == '<' || descr[0] == '|' || descr[0] == '=')
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
      if (!strcmp(descr + 1, map[i].d)) dt = (int)map[i].t;
  if (dt < 0) {
    if (descr[0] == '>' && strcmp(descr + 1, "i1") && strcmp(descr + 1, "u1") && strcmp(descr + 1, "b1"))
      rc = qs__fail(QINS_EUNSUPPORTED, "%s: big-endian dtype '%s' is not supported", path, descr);
    else if (!strcmp(descr, "|O"))
      rc = qs__fail(QINS_EUNSUPPORTED, "%s: object arrays ('|O', pickles) are refused", path);
    else
      rc = qs__fail(QINS_EUNSUPPORTED, "%s: dtype '%s' is not supported", path, descr);
    goto out;
  }
  uint64_t n = 1;
  for (int i = 0; i < ndim; i++)
    if (__builtin_mul_overflow(n, shape[i], &n)) NPY_BAD("%s: .npy shape's element count overflows 64 bits", path);
  uint64_t bytes;
  if (__builtin_mul_overflow(n, (uint64_t)qs_dtype_size((qs_dtype)dt), &bytes))
    NPY_BAD("%s: .npy data size overflows 64 bits", path);
  uint64_t have = size - hstart - hl;
  if (have != bytes)
    NPY_BAD("%s: .npy data is %llu bytes but shape and dtype need %llu (%s)", path,
            (unsigned long long)have, (unsigned long long)bytes, have < bytes ? "truncated" : "trailing bytes");
  qs__src *s = qs__srclist_add(L, tensor_name, strlen(tensor_name), fi);
  if (!s) {
    rc = qs__fail(QINS_ENOMEM, "out of memory");
    goto out;
  }
  s->offset = hstart + hl;
  s->nbytes = bytes;
  s->ndim = ndim;
  memcpy(s->shape, shape, sizeof(uint64_t) * (size_t)ndim);
  s->n_elem = n;
  s->kind = QS__K_PLAIN;
  s->dtype = (qs_dtype)dt;
#undef NPY_BAD
out:
  free(h);
  return rc;
}
