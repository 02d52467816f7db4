/* SPDX-License-Identifier: MIT */
/*
 * codec_test.h — helpers shared by the codec unit tests (tests/unit/codec_*.c): a deterministic
 * PRNG and the synthetic tensors of issue 2 (Gaussian, Laplace with outliers, all-zero, constant,
 * tiny, huge), and where the shared fixtures live. Header-only (static functions) so that each
 * test file stays self-contained; nothing here allocates except gen_tensor's result.
 */
#ifndef QINS_CODEC_TEST_H
#define QINS_CODEC_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

/* xorshift64: deterministic across runs and machines. */
static inline uint64_t ct_next(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}
static inline double ct_unif(uint64_t *s) { return ((ct_next(s) >> 11) + 0.5) * 0x1p-53; }
static inline double ct_gauss(uint64_t *s) {
  return sqrt(-2 * log(ct_unif(s))) * cos(6.283185307179586 * ct_unif(s));
}

enum { CT_GAUSS, CT_LAPLACE_OUTLIERS, CT_ZERO, CT_CONST, CT_TINY, CT_HUGE, CT_KINDS };
static const char *const ct_kind_names[CT_KINDS] = {"gaussian", "laplace+outliers", "all-zero",
                                                    "constant", "tiny", "huge"};

/* n floats of a synthetic kind (caller frees). Every 97th weight is an exact zero (except for
 * constant tensors) so that zero preservation is exercised everywhere. */
static inline float *ct_tensor(int kind, uint64_t n, uint64_t seed) {
  float *w = malloc((n ? n : 1) * sizeof(float));
  uint64_t s = seed * 2654435761u + 88172645463325252ull;
  for (uint64_t i = 0; i < n; i++) {
    double v;
    switch (kind) {
    case CT_GAUSS: v = 0.02 * ct_gauss(&s); break;
    case CT_LAPLACE_OUTLIERS: {
      double u = ct_unif(&s) - 0.5;
      v = -0.01 * (u < 0 ? -1 : 1) * log(1 - 2 * fabs(u));
      if (ct_next(&s) % 1000 == 0) v *= 50; /* outliers */
      break;
    }
    case CT_ZERO: v = 0; break;
    case CT_CONST: v = 0.125; break;
    case CT_TINY: v = 1e-30 * ct_gauss(&s); break;
    default: v = 1e30 * ct_gauss(&s); break;
    }
    w[i] = (float)v;
    if (kind != CT_CONST && i % 97 == 3) w[i] = 0.0f;
  }
  return w;
}

/* Directory of the shared fixtures: $QINS_SHARED, else the build's, else "../shared". */
static inline const char *ct_shared(void) {
  const char *e = getenv("QINS_SHARED");
  if (e && *e) return e;
#ifdef QINS_SHARED_DIR
  return QINS_SHARED_DIR;
#else
  return "../shared";
#endif
}

/* Whole file into a malloc'd buffer (NUL-terminated), or NULL. */
static inline char *ct_slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  if (b && fread(b, 1, (size_t)n, f) != (size_t)n) free(b), b = NULL;
  fclose(f);
  if (b) b[n] = 0, *len = (size_t)n;
  return b;
}

static inline uint32_t ct_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float ct_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

#endif /* QINS_CODEC_TEST_H */
