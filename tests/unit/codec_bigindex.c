/* SPDX-License-Identifier: MIT */
/*
 * codec_bigindex.c — tensors above 2^32 elements (64-bit sizes and offsets throughout): a qins8
 * chunk of 4.3e9 weights and a qins16 chunk of 4.4e9 weights live in sparse anonymous mappings
 * (MAP_NORESERVE: only the pages touched are ever backed), a few rows around element 2^32 and at
 * the very end are filled in, and ranges there are decoded by every kernel and checked against
 * values computed here from the bytes written, and against qc_chunk_locate's offsets.
 */
#include <criterion/criterion.h>
#include <sys/mman.h>

#include "codec_test.h"
#include "qins.h"

static const char *const kernels[] = {"ref", "avx2", "avx512"};

static void *sparse(uint64_t bytes) {
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) cr_skip_test("cannot map %llu sparse bytes", (unsigned long long)bytes);
  return p;
}

Test(codec_bigindex, qins8_past_2_pow_32) {
  const uint64_t L = 100, R = 43000000, n = L * R, bpr = 4, nb = bpr * R; /* 4.3e9 weights */
  cr_assert_gt(n, 1ull << 32);
  uint64_t bytes = qc_chunk_bytes(QC_QINS8, L, R, NULL);
  cr_assert_eq(bytes, 2 * nb + n);
  uint8_t *c = sparse(bytes);
  qc_params p;
  cr_assert_eq(qc_params_std_qins8(2, &p), 0);
  uint64_t s = 7;
  /* rows around element 2^32 (row 42949672 holds it at column 96) and the last two rows */
  uint64_t rows[] = {42949671, 42949672, 42949673, R - 2, R - 1};
  for (int k = 0; k < 5; k++) {
    uint64_t r = rows[k];
    for (uint64_t b = 0; b < bpr; b++) {
      uint16_t h = (uint16_t)(0x2000 + ct_next(&s) % 0x4000);
      c[2 * (r * bpr + b)] = (uint8_t)h, c[2 * (r * bpr + b) + 1] = (uint8_t)(h >> 8);
    }
    for (uint64_t i = r * L; i < (r + 1) * L; i++) c[2 * nb + i] = (uint8_t)ct_next(&s);
  }
  uint64_t ranges[][2] = {{(1ull << 32) - 150, (1ull << 32) + 150}, {n - 250, n}, {n - 1, n}};
  float out[300];
  for (int t = 0; t < 3; t++) {
    uint64_t b = ranges[t][0], e = ranges[t][1];
    for (int k = 0; k < 3; k++) {
      if (!qc_kernel_available(kernels[k])) continue;
      cr_assert_eq(qc_decode_with(kernels[k], &p, L, R, c, b, e, QC_DT_F32, out), 0);
      for (uint64_t i = b; i < e; i++) {
        uint64_t blk = (i / L) * bpr + (i % L) / 32, so, co;
        cr_assert_eq(qc_chunk_locate(QC_QINS8, L, R, i, &so, &co), 0);
        cr_assert_eq(so, 2 * blk);
        cr_assert_eq(co, 2 * nb + i);
        float d = qc_f16_to_f32((uint16_t)(c[so] | c[so + 1] << 8));
        uint8_t code = c[co];
        float want = d * ((code & 0x80) ? -p.table[code & 0x7F] : p.table[code & 0x7F]);
        cr_assert_eq(ct_bits(out[i - b]), ct_bits(want), "%s element %llu", kernels[k],
                     (unsigned long long)i);
      }
    }
  }
  uint64_t so, co;
  cr_assert_eq(qc_chunk_locate(QC_QINS8, L, R, n, &so, &co), QINS_EINVALID);
  munmap(c, bytes);
}

Test(codec_bigindex, qins16_past_2_pow_32) {
  const uint64_t L = 64 * 1024 + 7, R = 67000, n = L * R, bpr = 1025, nb = bpr * R;
  cr_assert_gt(n, 1ull << 32);
  uint64_t bytes = qc_chunk_bytes(QC_QINS16, L, R, NULL);
  cr_assert_eq(bytes, nb + 2 * n);
  uint8_t *c = sparse(bytes);
  qc_params p = {.codec = QC_QINS16};
  uint64_t s = 9, r0 = (1ull << 32) / L;
  for (uint64_t r = r0; r <= r0 + 1; r++) {
    for (uint64_t b = 0; b < bpr; b++) c[r * bpr + b] = (uint8_t)(int8_t)(-20 + (int)(ct_next(&s) % 40));
    for (uint64_t i = r * L; i < (r + 1) * L; i++) {
      uint16_t code = (uint16_t)ct_next(&s);
      c[nb + 2 * i] = (uint8_t)code, c[nb + 2 * i + 1] = (uint8_t)(code >> 8);
    }
  }
  uint64_t b = (1ull << 32) - 100, e = (1ull << 32) + 100;
  float out[200];
  for (int k = 0; k < 3; k++) {
    if (!qc_kernel_available(kernels[k])) continue;
    cr_assert_eq(qc_decode_with(kernels[k], &p, L, R, c, b, e, QC_DT_F32, out), 0);
    for (uint64_t i = b; i < e; i++) {
      uint64_t so, co;
      cr_assert_eq(qc_chunk_locate(QC_QINS16, L, R, i, &so, &co), 0);
      cr_assert_eq(so, (i / L) * bpr + (i % L) / 64);
      cr_assert_eq(co, nb + 2 * i);
      int ex = (int8_t)c[so];
      uint16_t code = (uint16_t)(c[co] | c[co + 1] << 8);
      uint32_t m = code & 0x7FFF;
      float v = m == 32767 ? 0.0f : ldexpf(qc_qins16_mantissa()[m & 2047], ex - (int)(m >> 11));
      if (code & 0x8000) v = -v;
      cr_assert_eq(ct_bits(out[i - b]), ct_bits(v), "%s element %llu", kernels[k], (unsigned long long)i);
    }
  }
  munmap(c, bytes);
}
