/* SPDX-License-Identifier: MIT */
/*
 * replay_main.c — a standalone main for the fuzz targets, so `make test` replays their corpora
 * without libFuzzer (built with the normal compiler and flags, linked with one target's .c): it
 * calls LLVMFuzzerInitialize once, then LLVMFuzzerTestOneInput on every file named, descending
 * into directories (files in name order, so a run is reproducible). A target fails by crashing
 * (fuzz.h), so reaching the end means every input passed. An input is read into a buffer of
 * exactly its size, as libFuzzer does, so an overread past it is caught under ASan.
 *
 * Usage: replay FILE|DIR...   Exit status 0 when every input ran, 1 if one could not be read.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

#pragma weak LLVMFuzzerInitialize /* optional in a target, as with libFuzzer */

static unsigned long n_inputs;
static unsigned long long n_bytes;

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
    return 1;
  }
  struct stat st;
  if (fstat(fileno(f), &st) != 0) {
    fclose(f);
    return 1;
  }
  size_t n = (size_t)st.st_size;
  uint8_t *buf = malloc(n ? n : 1);
  if (!buf || fread(buf, 1, n, f) != n) {
    fprintf(stderr, "replay: %s: cannot read\n", path);
    free(buf);
    fclose(f);
    return 1;
  }
  fclose(f);
  LLVMFuzzerTestOneInput(buf, n);
  free(buf);
  n_inputs++;
  n_bytes += n;
  return 0;
}

static int by_name(const struct dirent **a, const struct dirent **b) {
  return strcmp((*a)->d_name, (*b)->d_name);
}

static int run_path(const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) {
    fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
    return 1;
  }
  if (!S_ISDIR(st.st_mode)) return run_file(path);
  struct dirent **ents;
  int n = scandir(path, &ents, NULL, by_name);
  if (n < 0) {
    fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
    return 1;
  }
  int rc = 0;
  for (int i = 0; i < n; i++) {
    if (ents[i]->d_name[0] != '.') {
      char p[4096];
      snprintf(p, sizeof p, "%s/%s", path, ents[i]->d_name);
      rc |= run_path(p);
    }
    free(ents[i]);
  }
  free(ents);
  return rc;
}

int main(int argc, char **argv) {
  if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
  int rc = 0;
  for (int i = 1; i < argc; i++) rc |= run_path(argv[i]);
  printf("replay %s: %lu inputs (%llu bytes) passed\n", argc > 0 ? argv[0] : "?", n_inputs, n_bytes);
  return rc;
}
