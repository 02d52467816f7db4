/* SPDX-License-Identifier: MIT */
/*
 * fuzz.h — helpers shared by the fuzz targets in tests/fuzz/ (fz_). Each target is one .c file
 * defining LLVMFuzzerTestOneInput (and, if it needs one-time setup, LLVMFuzzerInitialize). It is
 * built two ways: with clang -fsanitize=fuzzer,address,undefined by `make fuzz` (libFuzzer's main,
 * build/fuzz/fuzzer/<target>), and with gcc plus replay_main.c by `make test`, which replays the
 * seed corpus (tests/fuzz/corpus/<target>/) and every saved crasher (tests/fuzz/crashers/<target>/).
 *
 * Oracles. A target fails by crashing: a sanitizer report, or fz_check() (always on) when an
 * invariant a parser or the server promises does not hold. A plain error return from the code
 * under test is the expected answer to bad input, never a failure.
 */
#ifndef QINS_FUZZ_H
#define QINS_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* An invariant of the code under test: prints and aborts (the fuzzer saves the input). */
#define fz_check(expr, ...)                                                          \
  do {                                                                               \
    if (!(expr)) {                                                                   \
      fprintf(stderr, "%s:%d: fuzz invariant failed: %s: ", __FILE__, __LINE__, #expr); \
      fprintf(stderr, __VA_ARGS__);                                                  \
      fprintf(stderr, "\n");                                                         \
      abort();                                                                       \
    }                                                                                \
  } while (0)

/* The input as a file the path-based parsers can open: an anonymous memfd, reached through
 * /proc/self/fd. Returns the fd (close it after use) and fills path; -1 on failure. */
static inline int fz_memfile(const void *data, size_t size, char *path, size_t cap) {
  int fd = memfd_create("qins-fuzz", MFD_CLOEXEC);
  if (fd < 0) return -1;
  const char *p = data;
  while (size) {
    ssize_t w = write(fd, p, size);
    if (w <= 0) {
      close(fd);
      return -1;
    }
    p += w;
    size -= (size_t)w;
  }
  snprintf(path, cap, "/proc/self/fd/%d", fd);
  return fd;
}

/* Takes n bytes from the front of the input (zeros once it is used up). */
static inline uint64_t fz_take(const uint8_t **data, size_t *size, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) {
    uint8_t b = 0;
    if (*size) {
      b = **data;
      (*data)++;
      (*size)--;
    }
    v |= (uint64_t)b << (8 * i);
  }
  return v;
}

#endif /* QINS_FUZZ_H */
