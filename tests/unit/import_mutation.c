/* SPDX-License-Identifier: MIT */
/*
 * import_mutation.c — hostile-input robustness of the parsers (json.c, safetensors.c, gguf.c,
 * npy.c): thousands of randomly mutated copies of valid inputs (byte flips, truncations, length
 * fields set to extremes) must each be accepted or refused with a message, never crash, hang or
 * read out of bounds (run under ASan by `make asan`). Deterministic seeds, so a failure replays.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "import_int.h"
#include "json.h"
#include "qt.h"
#include "safetensors.h"
#include "store_int.h"

static char dir[64];
static void setup(void) { cr_assert_eq(qt_tmpdir(dir), 0); }
static void teardown(void) { qt_rmrf(dir); }
TestSuite(import_mutation, .init = setup, .fini = teardown, .timeout = 120);

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

/* Applies 1-3 random mutations to b (len n, capacity >= n); returns the new length. */
static size_t mutate(uint8_t *b, size_t n) {
  int k = 1 + (int)(next() % 3);
  for (int i = 0; i < k && n; i++) {
    size_t at = (size_t)(next() % n);
    switch (next() % 6) {
    case 0: b[at] ^= (uint8_t)(1u << (next() % 8)); break;
    case 1: b[at] = (uint8_t)next(); break;
    case 2: n = at; break;                                   /* truncate */
    case 3: if (at + 8 <= n) memset(b + at, 0xFF, 8); break; /* huge length */
    case 4: if (at + 8 <= n) memset(b + at, 0, 8); break;    /* zero length */
    default: b[at] = (uint8_t)"{}[]\":,0\\"[next() % 10]; break;
    }
  }
  return n;
}

static uint8_t *load(const char *path, size_t *n) {
  uint8_t *b = (uint8_t *)qt_read(path, n);
  cr_assert_not_null(b);
  return b;
}

Test(import_mutation, safetensors_and_json_survive_mutations) {
  char good[128], bad[128];
  snprintf(good, sizeof good, "%s/g.safetensors", dir);
  snprintf(bad, sizeof bad, "%s/m.safetensors", dir);
  float w[6 * 4], v[3];
  for (int i = 0; i < 24; i++) w[i] = (float)i;
  qt_tensor t[3] = {{"w", QS_ST_F32, 2, {6, 4}, w, sizeof w},
                    {"v", QS_ST_F32, 1, {3}, v, sizeof v},
                    {"e", QS_ST_I8, 2, {0, 3}, w, 0}};
  cr_assert_eq(qt_st_write(good, t, 3, "{\"format\":\"pt\",\"x\":\"\\u00e9\"}"), 0);
  size_t n;
  uint8_t *orig = load(good, &n);
  uint8_t *b = malloc(n);
  int ok = 0, refused = 0;
  for (int it = 0; it < 3000; it++) {
    memcpy(b, orig, n);
    size_t m = mutate(b, n);
    cr_assert_eq(qt_write(bad, b, m), 0);
    qs_st_file *f;
    char err[512];
    int rc = qs_st_open(bad, &f, err, sizeof err);
    if (rc == 0) {
      ok++;
      for (size_t i = 0; i < qs_st_count(f); i++) {
        const qs_st_tensor *x = qs_st_tensor_at(f, i);
        uint8_t tmp[512];
        if (x->nbytes <= sizeof tmp) cr_assert_eq(qs_st_read(f, x, 0, x->nbytes, tmp, err, sizeof err), 0);
      }
      qs_st_close(f);
    } else {
      refused++;
      cr_assert(strstr(err, bad), "message does not name the file: %s", err);
    }
    /* The header text alone through the JSON parser. */
    if (m > 8) {
      qs_json *j;
      if (qs_json_parse((const char *)b + 8, m - 8, &j, err, sizeof err) == 0) qs_json_free(j);
      else cr_assert(!strncmp(err, "byte ", 5), "%s", err);
    }
  }
  fprintf(stderr, "safetensors mutations: %d accepted, %d refused\n", ok, refused);
  cr_assert_gt(refused, 0);
  free(b);
  free(orig);
}

static void build_gguf(const char *path) {
  uint8_t b[1024];
  size_t n = 0;
#define P(d, l) do { memcpy(b + n, d, l); n += l; } while (0)
#define U32(v) do { uint32_t x_ = (v); P(&x_, 4); } while (0)
#define U64(v) do { uint64_t x_ = (v); P(&x_, 8); } while (0)
#define S(s) do { U64(strlen(s)); P(s, strlen(s)); } while (0)
  P("GGUF", 4);
  U32(3);
  U64(2);
  U64(3);
  S("general.architecture");
  U32(8);
  S("llama");
  S("general.alignment");
  U32(4);
  U32(32);
  S("x.arr");
  U32(9);
  U32(4);
  U64(3);
  U32(1);
  U32(2);
  U32(3);
  S("a");
  U32(2);
  U64(4);
  U64(2);
  U32(0);
  U64(0);
  S("b");
  U32(1);
  U64(32);
  U32(8);
  U64(32);
  while (n % 32) b[n++] = 0;
  for (int i = 0; i < 32 + 34; i++) b[n++] = (uint8_t)i;
  cr_assert_eq(qt_write(path, b, n), 0);
#undef P
#undef U32
#undef U64
#undef S
}

Test(import_mutation, gguf_and_npy_survive_mutations) {
  char good[128], bad[128], npy[128], badn[128];
  snprintf(good, sizeof good, "%s/g.gguf", dir);
  snprintf(bad, sizeof bad, "%s/m.gguf", dir);
  snprintf(npy, sizeof npy, "%s/g.npy", dir);
  snprintf(badn, sizeof badn, "%s/m.npy", dir);
  build_gguf(good);
  const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }";
  uint8_t nb[128 + 24] = "\x93NUMPY\x01\x00";
  size_t hl = sizeof hdr - 1;
  memcpy(nb + 10, hdr, hl);
  while ((10 + hl + 1) % 64) nb[10 + hl++] = ' ';
  nb[10 + hl++] = '\n';
  nb[8] = (uint8_t)hl;
  nb[9] = 0;
  cr_assert_eq(qt_write(npy, nb, 10 + hl + 24), 0);
  size_t gn, nn;
  uint8_t *g = load(good, &gn), *np = load(npy, &nn);
  /* The originals are valid. */
  qs__srclist L;
  memset(&L, 0, sizeof L);
  char *meta = NULL;
  cr_assert_eq(qs__gguf_sources(good, &L, &meta), 0, "%s", qs_error());
  cr_assert_eq(L.n, 2);
  qs__srclist_free(&L);
  free(meta);
  cr_assert_eq(qs__npy_sources(npy, "g", &L), 0, "%s", qs_error());
  qs__srclist_free(&L);
  uint8_t *b = malloc(gn > nn ? gn : nn);
  int refused = 0;
  for (int it = 0; it < 3000; it++) {
    memcpy(b, g, gn);
    size_t m = mutate(b, gn);
    cr_assert_eq(qt_write(bad, b, m), 0);
    meta = NULL;
    if (qs__gguf_sources(bad, &L, &meta)) {
      refused++;
      cr_assert(strstr(qs_error(), bad), "message does not name the file: %s", qs_error());
    }
    qs__srclist_free(&L);
    free(meta);
    memcpy(b, np, nn);
    m = mutate(b, nn);
    cr_assert_eq(qt_write(badn, b, m), 0);
    if (qs__npy_sources(badn, "t", &L)) {
      refused++;
      cr_assert(strstr(qs_error(), badn), "message does not name the file: %s", qs_error());
    }
    qs__srclist_free(&L);
  }
  fprintf(stderr, "gguf/npy mutations: %d of 6000 refused\n", refused);
  cr_assert_gt(refused, 0);
  free(b);
  free(g);
  free(np);
}
