/* SPDX-License-Identifier: MIT */
/*
 * codec_test.h — helpers shared by the codec unit tests (tests/unit/codec_*.c): a deterministic
 * PRNG and the synthetic tensors of issue 2 (Gaussian, Laplace with outliers, all-zero, constant,
 * tiny, huge), where the shared fixtures live, and the kernel-vs-reference comparison. Header-only (static functions) so that each
 * test file stays self-contained; nothing here allocates except gen_tensor's result.
 */
#ifndef QINS_CODEC_TEST_H
#define QINS_CODEC_TEST_H

#include <criterion/criterion.h>
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

/* Decodes [b, e) with qc_decode_ref and with each kernel this CPU has ("ref": the portable
 * segment kernels, "avx2", "avx512"), into outputs at byte offsets 0..3, and compares the bytes
 * (and that nothing is written around the output). Returns the number of comparisons made. */
static inline int ct_same_as_ref(const qc_params *p, uint64_t L, uint64_t R, const void *chunk,
                                 uint64_t b, uint64_t e) {
  static const char *const ct_kernels[] = {"ref", "avx2", "avx512"};
  int cmp = 0;
  size_t cap = (size_t)(e - b) * 4 + 8;
  uint8_t *ref = malloc(cap), *got = malloc(cap);
  for (int dt = 0; dt < QC_DT_COUNT; dt++) {
    size_t bytes = (size_t)(e - b) * qc_dtype_size((qc_dtype)dt);
    cr_assert_eq(qc_decode_ref(p, L, R, chunk, b, e, (qc_dtype)dt, ref), 0);
    for (int k = 0; k < 3; k++) {
      if (!qc_kernel_available(ct_kernels[k])) continue;
      for (int off = 0; off < 4; off += (dt == 0 ? 1 : 3)) {
        memset(got, 0xA5, cap);
        cr_assert_eq(qc_decode_with(ct_kernels[k], p, L, R, chunk, b, e, (qc_dtype)dt, got + off), 0);
        if (memcmp(ref, got + off, bytes)) {
          size_t i = 0;
          while (ref[i] == got[off + i]) i++;
          cr_assert_fail("%s %s: %s L=%llu R=%llu [%llu,%llu) out+%d: first difference at byte %zu",
                   ct_kernels[k], qc_dtype_name((qc_dtype)dt), qc_codec_name(p->codec),
                   (unsigned long long)L, (unsigned long long)R, (unsigned long long)b,
                   (unsigned long long)e, off, i);
        }
        cr_assert_eq(got[off + bytes], 0xA5, "%s wrote past the end", ct_kernels[k]);
        if (off) cr_assert_eq(got[off - 1], 0xA5, "%s wrote before the start", ct_kernels[k]);
        cmp++;
      }
    }
  }
  free(ref);
  free(got);
  return cmp;
}

#endif /* QINS_CODEC_TEST_H */
