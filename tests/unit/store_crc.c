/* SPDX-License-Identifier: MIT */
/*
 * store_crc.c — CRC-32C of stored chunks (store/crc32c.c; docs/FORMAT.md §2.5): the standard
 * check value, incremental use, and the VPCLMULQDQ fold, SSE4.2 and table paths each equal to a
 * byte-table reference over every length to 4096, every start alignment 0-63, random lengths to
 * 1 MiB, random initial CRCs and chained calls (QINS_CRC_SOFT forces the table, QINS_CRC_NO_CLMUL
 * the SSE4.2 path; each Criterion test is its own process, so the choice is made fresh per test).
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

static uint32_t ref_crc(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

static void check_all(void) {
  cr_assert_eq(qs__crc32c(0, "123456789", 9), 0xE3069283u);
  cr_assert_eq(qs__crc32c(0, "", 0), 0);
  uint8_t *b = malloc(4099);
  for (int i = 0; i < 4099; i++) b[i] = (uint8_t)(i * 131 + 7);
  for (size_t off = 0; off < 9; off++)
    for (size_t n = 0; n < 300; n += (n < 40 ? 1 : 37)) {
      uint32_t want = ref_crc(b + off, n);
      cr_assert_eq(qs__crc32c(0, b + off, n), want, "off %zu len %zu", off, n);
      /* Incremental: crc(a ++ b) == crc(b, crc(a)). */
      size_t cut = n / 3;
      cr_assert_eq(qs__crc32c(qs__crc32c(0, b + off, cut), b + off + cut, n - cut), want);
    }
  cr_assert_eq(qs__crc32c(0, b, 4099), ref_crc(b, 4099));
  free(b);
  /* Long buffers (the hardware path joins three streams of 8 KiB, then of 256 bytes). */
  size_t big = 200000;
  b = malloc(big);
  for (size_t i = 0; i < big; i++) b[i] = (uint8_t)(i * 2654435761u >> 13);
  size_t lens[] = {767, 768, 769, 24575, 24576, 24577, 24576 + 768 + 13, 3 * 24576 + 5, big - 3};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    uint32_t want = ref_crc(b + 3, lens[i]);
    cr_assert_eq(qs__crc32c(0, b + 3, lens[i]), want, "len %zu", lens[i]);
    if (lens[i] > 1000)
      cr_assert_eq(qs__crc32c(qs__crc32c(0, b + 3, 1000), b + 1003, lens[i] - 1000), want);
    /* Joined from the CRCs of two parts computed apart. */
    for (size_t cut = 0; cut <= lens[i]; cut += lens[i] / 3 + 1)
      cr_assert_eq(qs__crc32c_combine(qs__crc32c(0, b + 3, cut), qs__crc32c(0, b + 3 + cut, lens[i] - cut),
                                      lens[i] - cut),
                   want, "combine at %zu of %zu", cut, lens[i]);
  }
  /* Segment CRCs joined as the store joins them (a table for QS_SEG-byte parts), with a
   * shorter last part. */
  size_t nseg = 5 * QS_SEG + 100;
  uint32_t j = 0;
  for (size_t off = 0; off < nseg; off += QS_SEG) {
    size_t len = nseg - off < QS_SEG ? nseg - off : QS_SEG;
    uint32_t c = qs__crc32c(0, b + 7 + off, len);
    j = off ? qs__crc32c_combine(j, c, len) : c;
  }
  cr_assert_eq(j, ref_crc(b + 7, nseg), "segments joined");
  free(b);
}

Test(store_crc, matches_the_bitwise_definition) { check_all(); }

Test(store_crc, table_path_matches_too) {
  setenv("QINS_CRC_SOFT", "1", 1);
  check_all();
}

/* Byte-table CRC-32C from the bitwise definition, continuing from crc (as qs__crc32c). */
static uint32_t ref_crc_from(uint32_t crc, const uint8_t *p, size_t n) {
  static uint32_t tab[256];
  if (!tab[1])
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      tab[i] = c;
    }
  crc = ~crc;
  while (n--) crc = (crc >> 8) ^ tab[(crc ^ *p++) & 0xFF];
  return ~crc;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void) { /* xorshift64 */
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

/* The kernel in use against the reference, bit for bit. */
static void check_kernel(void) {
  size_t cap = (1u << 20) + 64;
  uint8_t *b = malloc(cap);
  cr_assert_not_null(b);
  for (size_t i = 0; i < cap; i++) b[i] = (uint8_t)next_rand();
  /* Every length 0..4096 at start alignments cycling through 0..63, random initial CRCs. */
  for (size_t n = 0; n <= 4096; n++) {
    size_t off = n % 64;
    uint32_t init = (uint32_t)next_rand();
    cr_assert_eq(qs__crc32c(init, b + off, n), ref_crc_from(init, b + off, n), "len %zu off %zu", n,
                 off);
    cr_assert_eq(qs__crc32c(0, b + 1, n), ref_crc_from(0, b + 1, n), "len %zu", n);
  }
  /* Every alignment 0..63 at lengths around the fold's steps and a 16 KiB buffer. */
  size_t lens[] = {255, 256, 257, 319, 320, 511, 512, 513, 767, 1024 + 63, 16384, 16384 + 100,
                   65536 + 17};
  for (size_t off = 0; off < 64; off++)
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
      uint32_t init = (uint32_t)next_rand();
      cr_assert_eq(qs__crc32c(init, b + off, lens[i]), ref_crc_from(init, b + off, lens[i]),
                   "len %zu off %zu", lens[i], off);
    }
  /* Random lengths up to 1 MiB at random alignments; chained calls cut at random points. */
  for (int r = 0; r < 150; r++) {
    size_t n = (size_t)(next_rand() % (1u << 20)) + 1, off = (size_t)(next_rand() % 64);
    uint32_t init = r % 3 ? (uint32_t)next_rand() : 0;
    uint32_t want = ref_crc_from(init, b + off, n);
    cr_assert_eq(qs__crc32c(init, b + off, n), want, "len %zu off %zu", n, off);
    size_t cut = (size_t)(next_rand() % (n + 1));
    size_t cut2 = cut + (size_t)(next_rand() % (n - cut + 1));
    uint32_t c = qs__crc32c(init, b + off, cut);
    c = qs__crc32c(c, b + off + cut, cut2 - cut);
    cr_assert_eq(qs__crc32c(c, b + off + cut2, n - cut2), want, "len %zu cut %zu %zu", n, cut,
                 cut2);
  }
  /* All-ones and all-zero data (every fold product set or empty). */
  for (int fill = 0; fill < 2; fill++) {
    memset(b, fill ? 0xFF : 0, 70000);
    for (size_t n = 256; n <= 70000; n = n * 3 + 1)
      cr_assert_eq(qs__crc32c(0xFFFFFFFFu, b, n), ref_crc_from(0xFFFFFFFFu, b, n),
                   "fill %d len %zu", fill, n);
  }
  free(b);
}

/* The kernel store/crc32c.c must pick on this CPU without an env knob (2 fold, 1 SSE4.2). */
static int cpu_kernel(int allow_fold) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("sse4.2")) return 0;
  int fold = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
  return allow_fold && fold ? 2 : 1;
#else
  (void)allow_fold;
  return 0;
#endif
}

Test(store_crc, fold_kernel_matches_the_reference) {
  /* On a CPU with AVX-512 and VPCLMULQDQ (the dev and CI machines) this is the fold kernel. */
  cr_assert_eq(qs__crc32c_kernel(), cpu_kernel(1));
  check_kernel();
  check_all();
}

Test(store_crc, sse42_kernel_matches_the_reference) {
  setenv("QINS_CRC_NO_CLMUL", "1", 1);
  cr_assert_eq(qs__crc32c_kernel(), cpu_kernel(0));
  check_kernel();
}

Test(store_crc, table_kernel_matches_the_reference) {
  setenv("QINS_CRC_SOFT", "1", 1);
  cr_assert_eq(qs__crc32c_kernel(), 0);
  check_kernel();
}

Test(store_crc, hash64_is_stable_and_seeded) {
  uint8_t t[512];
  for (int i = 0; i < 512; i++) t[i] = (uint8_t)i;
  uint64_t a = qs__hash64(t, 512, 3), b = qs__hash64(t, 512, 3), c = qs__hash64(t, 512, 4);
  cr_assert_eq(a, b);
  cr_assert_neq(a, c);
  t[511] ^= 1;
  cr_assert_neq(qs__hash64(t, 512, 3), a);
}
