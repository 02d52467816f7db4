/* SPDX-License-Identifier: MIT */
/*
 * store_crc.c — CRC-32C of stored chunks (store/crc32c.c; docs/FORMAT.md §2.5): the standard
 * check value, incremental use, and the SSE4.2 path equal to the table path (QINS_CRC_SOFT forces
 * the table; each Criterion test is its own process, so the choice is made fresh per test).
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
  free(b);
}

Test(store_crc, matches_the_bitwise_definition) { check_all(); }

Test(store_crc, table_path_matches_too) {
  setenv("QINS_CRC_SOFT", "1", 1);
  check_all();
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
