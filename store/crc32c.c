/* SPDX-License-Identifier: MIT */
/*
 * crc32c.c — CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of stored chunks, and the
 * 64-bit content hash that keys shared codec parameters (docs/FORMAT.md §2).
 *
 * The SSE4.2 crc32 instruction is used when __builtin_cpu_supports("sse4.2") says so (compiled
 * through a target attribute, so the file needs no special flags); otherwise a slicing-by-8 table
 * gives the same values. The instruction has a latency of 3 cycles and a throughput of 1, so long
 * buffers run three independent CRCs over three adjacent blocks and join them: the CRC of the
 * first block is carried over the zero bytes of the other two by a precomputed operator (tables
 * of the "append n zero bytes" linear map over GF(2), for blocks of 8 KiB and of 256 bytes; the
 * method of Mark Adler's crc32c.c). Every chunk a request reads is checked, so this is on the
 * serving path. The check value of "123456789" is 0xE3069283 (tests/unit/store_crc.c).
 *
 * On a CPU with AVX-512 and VPCLMULQDQ, buffers of QS_CRC_FOLD_MIN bytes or more are folded with
 * carry-less multiplies instead (qs__crc_fold, target attribute again): four zmm accumulators
 * (16 lanes of 128 bits) each step forward over 256 bytes, a lane L = lo * x^64 + hi being
 * replaced by lo * (x^(D+64) mod P) + hi * (x^D mod P), which is congruent to L * x^D and so
 * leaves the CRC of the whole unchanged. The accumulators are then folded into one 128-bit lane;
 * that lane and the tail go through the crc32 instruction, whose CRC of the folded lane equals
 * the CRC of all it replaced (the initial CRC is xor'ed into the first bytes, so it starts from
 * 0) — no Barrett reduction. The fold constants are computed at init from qs__crc_xpow.
 * QINS_CRC_NO_CLMUL keeps the SSE4.2 path, QINS_CRC_SOFT the table (tests compare all three).
 */
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

static uint32_t qs__crc_tab[8][256];
#define QS_CRC_LONG 8192 /* bytes per stream of a 3-way round on long buffers */
#define QS_CRC_SHORT 256 /* and on what is left */
static uint32_t qs__crc_zl[4][256], qs__crc_zs[4][256]; /* append LONG / SHORT zero bytes */
static uint32_t qs__crc_zseg[4][256];                     /* append QS_SEG zero bytes */
static int qs__crc_hw;     /* 0 table, 1 SSE4.2, 2 VPCLMULQDQ fold; set once by qs__crc_once */
#define QS_CRC_FOLD_MIN 256 /* shortest buffer the fold kernel takes */
/* Fold constants, as 64-bit reflected clmul operands (x^k mod P in the CRC register's order,
 * shifted up 32 bits), in pairs (low half, high half of a lane): [0..1] for a 256-byte step,
 * [2..3] for 64 bytes, [4..9] for 48, 32, 16 bytes (lanes 0-2 onto lane 3), [10..11] zero
 * (lane 3 stays as it is). */
static uint64_t qs__crc_k[12];
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

/* GF(2) 32x32 matrix (column n = image of bit n) times a vector, and a matrix squared. */
static uint32_t qs__gf2_times(const uint32_t *mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec; vec >>= 1, mat++)
    if (vec & 1) sum ^= *mat;
  return sum;
}
static void qs__gf2_square(uint32_t *sq, const uint32_t *mat) {
  for (int n = 0; n < 32; n++) sq[n] = qs__gf2_times(mat, mat[n]);
}

/* Tables applying the operator "append len zero bytes" (len a power of two) to a raw CRC
 * register, one table per byte of the register. */
static void qs__crc_zeros(uint32_t z[4][256], size_t len) {
  uint32_t even[32], odd[32];
  odd[0] = 0x82F63B78u; /* one zero bit */
  for (int n = 1; n < 32; n++) odd[n] = 1u << (n - 1);
  qs__gf2_square(even, odd); /* two zero bits */
  qs__gf2_square(odd, even); /* four */
  uint32_t *op = even;
  for (;;) { /* the first square gives one zero byte (in even), each next one twice as many */
    qs__gf2_square(even, odd);
    op = even;
    if (!(len >>= 1)) break;
    qs__gf2_square(odd, even);
    op = odd;
    if (!(len >>= 1)) break;
  }
  for (uint32_t n = 0; n < 256; n++)
    for (int b = 0; b < 4; b++) z[b][n] = qs__gf2_times(op, n << (8 * b));
}

static inline uint32_t qs__crc_shift(uint32_t z[4][256], uint32_t crc) {
  return z[0][crc & 0xFF] ^ z[1][(crc >> 8) & 0xFF] ^ z[2][(crc >> 16) & 0xFF] ^ z[3][crc >> 24];
}

/* a(x) * b(x) mod P(x) in the reflected bit order of the CRC (bit 31 is x^0); a != 0. */
static uint32_t qs__crc_mulmod(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if (!(a & (m - 1))) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ 0x82F63B78u : b >> 1;
  }
  return p;
}

/* x^k mod P(x), same order. */
static uint32_t qs__crc_xpow(uint64_t k) {
  uint32_t x = 1u << 30, r = 1u << 31; /* x^1, x^0 */
  for (; k; k >>= 1) {
    if (k & 1) r = qs__crc_mulmod(x, r);
    x = qs__crc_mulmod(x, x);
  }
  return r;
}

/* Operand pair folding a 128-bit lane forward by d bits. The reflected clmul of two 64-bit
 * operands comes out one bit short of the product (bit k holds x^(126-k) where the lane's bit k
 * means x^(127-k)), so each exponent is one less than the x^(d+64), x^d the lane needs. */
static void qs__crc_fold_k(uint64_t *k, uint64_t d) {
  k[0] = (uint64_t)qs__crc_xpow(d + 63) << 32; /* for the lane's low half (x^127..x^64) */
  k[1] = (uint64_t)qs__crc_xpow(d - 1) << 32;  /* for its high half (x^63..x^0) */
}

static void qs__crc_once(void) {
  qs__crc_init();
  qs__crc_zeros(qs__crc_zl, QS_CRC_LONG);
  qs__crc_zeros(qs__crc_zs, QS_CRC_SHORT);
  qs__crc_zeros(qs__crc_zseg, QS_SEG);
#if defined(__x86_64__)
  __builtin_cpu_init();
  qs__crc_hw = __builtin_cpu_supports("sse4.2") && !getenv("QINS_CRC_SOFT") ? 1 : 0;
  if (qs__crc_hw && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
      !getenv("QINS_CRC_NO_CLMUL"))
    qs__crc_hw = 2;
#endif
  qs__crc_fold_k(qs__crc_k, 8 * 256);
  qs__crc_fold_k(qs__crc_k + 2, 8 * 64);
  for (int i = 0; i < 3; i++) qs__crc_fold_k(qs__crc_k + 4 + 2 * i, 8 * (48 - 16 * i));
}

#if defined(__x86_64__)
/* Three CRCs of `blk`-byte blocks at p, p + blk, p + 2 blk, joined into c (z: blk zeros). */
__attribute__((target("sse4.2"))) static inline uint64_t qs__crc_hw3(uint64_t c, const uint8_t *p,
                                                                    size_t blk,
                                                                    uint32_t z[4][256]) {
  uint64_t c1 = 0, c2 = 0;
  for (size_t i = 0; i < blk; i += 8) {
    uint64_t v0, v1, v2;
    memcpy(&v0, p + i, 8);
    memcpy(&v1, p + blk + i, 8);
    memcpy(&v2, p + 2 * blk + i, 8);
    c = __builtin_ia32_crc32di(c, v0);
    c1 = __builtin_ia32_crc32di(c1, v1);
    c2 = __builtin_ia32_crc32di(c2, v2);
  }
  c = qs__crc_shift(z, (uint32_t)c) ^ (uint32_t)c1;
  return qs__crc_shift(z, (uint32_t)c) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2"))) static uint32_t qs__crc_hw_run(uint32_t crc, const uint8_t *p,
                                                                 size_t n) {
  uint64_t c = crc;
  while (n >= 3 * QS_CRC_LONG) {
    c = qs__crc_hw3(c, p, QS_CRC_LONG, qs__crc_zl);
    p += 3 * QS_CRC_LONG;
    n -= 3 * QS_CRC_LONG;
  }
  while (n >= 3 * QS_CRC_SHORT) {
    c = qs__crc_hw3(c, p, QS_CRC_SHORT, qs__crc_zs);
    p += 3 * QS_CRC_SHORT;
    n -= 3 * QS_CRC_SHORT;
  }
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

/* The lanes of a, each folded forward by the operand pair in its lane of k, xor'ed with b. */
__attribute__((target("avx512f,vpclmulqdq"))) static inline __m512i
qs__crc_fold512(__m512i a, __m512i k, __m512i b) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(a, k, 0x00),
                                   _mm512_clmulepi64_epi128(a, k, 0x11), b, 0x96);
}

/* The raw register crc after n >= QS_CRC_FOLD_MIN bytes at p (as qs__crc_hw_run). */
__attribute__((target("avx512f,vpclmulqdq,sse4.2"))) static uint32_t
qs__crc_fold(uint32_t crc, const uint8_t *p, size_t n) {
  const __m512i k256 = _mm512_broadcast_i32x4(_mm_loadu_si128((const void *)qs__crc_k));
  const __m512i k64 = _mm512_broadcast_i32x4(_mm_loadu_si128((const void *)(qs__crc_k + 2)));
  __m512i a0 = _mm512_xor_si512(_mm512_loadu_si512(p),
                                _mm512_castsi128_si512(_mm_cvtsi32_si128((int)crc)));
  __m512i a1 = _mm512_loadu_si512(p + 64), a2 = _mm512_loadu_si512(p + 128);
  __m512i a3 = _mm512_loadu_si512(p + 192);
  for (p += 256, n -= 256; n >= 256; p += 256, n -= 256) {
    a0 = qs__crc_fold512(a0, k256, _mm512_loadu_si512(p));
    a1 = qs__crc_fold512(a1, k256, _mm512_loadu_si512(p + 64));
    a2 = qs__crc_fold512(a2, k256, _mm512_loadu_si512(p + 128));
    a3 = qs__crc_fold512(a3, k256, _mm512_loadu_si512(p + 192));
  }
  a1 = qs__crc_fold512(a0, k64, a1);
  a2 = qs__crc_fold512(a1, k64, a2);
  a3 = qs__crc_fold512(a2, k64, a3);
  for (; n >= 64; p += 64, n -= 64) a3 = qs__crc_fold512(a3, k64, _mm512_loadu_si512(p));
  /* Lanes 0-2 forward by 48, 32, 16 bytes and lane 3 as it is, xor'ed into one lane. */
  __m512i t = qs__crc_fold512(a3, _mm512_loadu_si512((const void *)(qs__crc_k + 4)),
                              _mm512_maskz_mov_epi64(0xC0, a3));
  __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
  __m128i v = _mm_xor_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  uint64_t c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(v));
  c = __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(v, 1));
  return qs__crc_hw_run((uint32_t)c, p, n);
}
#endif

__attribute__((hot))
uint32_t qs__crc32c(uint32_t crc, const void *buf, size_t len) {
  pthread_once(&qs__crc_once_ctl, qs__crc_once);
  crc = ~crc;
#if defined(__x86_64__)
  if (qs__crc_hw == 2 && len >= QS_CRC_FOLD_MIN) return ~qs__crc_fold(crc, buf, len);
  if (qs__crc_hw) return ~qs__crc_hw_run(crc, buf, len);
#endif
  return ~qs__crc_sw(crc, buf, len);
}

/* Which kernel qs__crc32c uses for long buffers: 0 table, 1 SSE4.2, 2 VPCLMULQDQ (for tests). */
int qs__crc32c_kernel(void) {
  pthread_once(&qs__crc_once_ctl, qs__crc_once);
  return qs__crc_hw;
}

uint32_t qs__crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  /* crc(A ++ B) = crc(A) * x^(8 len_b) + crc(B) (as polynomials mod P); the multiply is the
   * "append len_b zero bytes" operator, which the segment length has as a table. */
  if (len_b == QS_SEG) {
    pthread_once(&qs__crc_once_ctl, qs__crc_once);
    return qs__crc_shift(qs__crc_zseg, crc_a) ^ crc_b;
  }
  return qs__crc_mulmod(qs__crc_xpow(8 * len_b), crc_a) ^ crc_b;
}

uint32_t qs__rec_crc(const uint8_t *p, size_t size, size_t off) {
  static const uint8_t zero[4];
  uint32_t c = qs__crc32c(0, p, off);
  c = qs__crc32c(c, zero, 4);
  return qs__crc32c(c, p + off + 4, size - off - 4);
}

static inline uint64_t qs__mix64(uint64_t h) {
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

__attribute__((hot))
uint64_t qs__hash_key(const void *buf, size_t len, uint64_t seed) {
  const uint8_t *p = buf;
  uint64_t h = seed ^ (len * 0x9e3779b97f4a7c15ull), w;
  for (; len >= 8; p += 8, len -= 8) {
    memcpy(&w, p, 8);
    h = ((h ^ w) * 0x100000001b3ull) ^ (h >> 29);
  }
  if (len) { /* the last 1-7 bytes, little-endian */
    w = 0;
    for (size_t i = 0; i < len; i++) w |= (uint64_t)p[i] << (8 * i);
    h = ((h ^ w) * 0x100000001b3ull) ^ (h >> 29);
  }
  return qs__mix64(h);
}

uint64_t qs__hash64(const void *buf, size_t len, uint64_t seed) {
  const uint8_t *p = buf;
  uint64_t h = 0xcbf29ce484222325ull ^ seed;
  for (size_t i = 0; i < len; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return qs__mix64(h);
}
