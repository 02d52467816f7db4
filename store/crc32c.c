/* SPDX-License-Identifier: MIT */
/*
 * crc32c.c — CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of stored chunks, and the
 * 64-bit content hash that keys shared codec parameters (docs/FORMAT.md §2).
 *
 * The SSE4.2 crc32 instruction is used when __builtin_cpu_supports("sse4.2") says so (compiled
 * through a target attribute, so the file needs no special flags); otherwise a slicing-by-8 table
 * gives the same values. The check value of "123456789" is 0xE3069283 (tests/unit/store_crc.c).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

static uint32_t qs__crc_tab[8][256];
static int qs__crc_hw;     /* 0 table, 1 SSE4.2; set once by qs__crc_once */
static pthread_once_t qs__crc_once_ctl = PTHREAD_ONCE_INIT;

static void qs__crc_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    qs__crc_tab[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++)
    for (int t = 1; t < 8; t++)
      qs__crc_tab[t][i] = (qs__crc_tab[t - 1][i] >> 8) ^ qs__crc_tab[0][qs__crc_tab[t - 1][i] & 0xFF];
}

static uint32_t qs__crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
  while (n >= 8) {
    uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                         (uint32_t)p[3] << 24);
    crc = qs__crc_tab[7][lo & 0xFF] ^ qs__crc_tab[6][(lo >> 8) & 0xFF] ^
          qs__crc_tab[5][(lo >> 16) & 0xFF] ^ qs__crc_tab[4][lo >> 24] ^ qs__crc_tab[3][p[4]] ^
          qs__crc_tab[2][p[5]] ^ qs__crc_tab[1][p[6]] ^ qs__crc_tab[0][p[7]];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ qs__crc_tab[0][(crc ^ *p++) & 0xFF];
  return crc;
}

static void qs__crc_once(void) {
  qs__crc_init();
#if defined(__x86_64__)
  __builtin_cpu_init();
  qs__crc_hw = __builtin_cpu_supports("sse4.2") && !getenv("QINS_CRC_SOFT") ? 1 : 0;
#endif
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t qs__crc_hw_run(uint32_t crc, const uint8_t *p,
                                                                 size_t n) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = (uint32_t)c;
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
#endif

uint32_t qs__crc32c(uint32_t crc, const void *buf, size_t len) {
  pthread_once(&qs__crc_once_ctl, qs__crc_once);
  crc = ~crc;
#if defined(__x86_64__)
  if (qs__crc_hw == 1) return ~qs__crc_hw_run(crc, buf, len);
#endif
  return ~qs__crc_sw(crc, buf, len);
}

uint64_t qs__hash64(const void *buf, size_t len, uint64_t seed) {
  const uint8_t *p = buf;
  uint64_t h = 0xcbf29ce484222325ull ^ seed;
  for (size_t i = 0; i < len; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}
