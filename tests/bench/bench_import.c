/* SPDX-License-Identifier: MIT */
/*
 * bench_import.c — `make bench`: import throughput of qinsctl (MB/s of source) on synthetic
 * safetensors models, with the importer's peak RSS, next to a same-run reference: the raw read
 * throughput of the same file (pread of 4 MiB blocks, page cache warm, as the importer reads it)
 * and, for qins8, the codec alone on one thread (fit + encode of one matrix in memory; the
 * importer encodes chunks on one worker thread per CPU, $QINS_IMPORT_THREADS).
 *
 * Models: 512 MiB (8 matrices of 4096 x 4096 f32, plus norms) imported with the default policy
 * (qins8) and with --codec f32 (store overhead alone), and a 128 MiB one both ways to show that
 * peak RSS does not grow with the model (it is bounded by the batch buffers plus one staging
 * transaction's dirty pages, QS_TXN_BYTES). Each import runs as its own process
 * (fork + exec of $QINS_BUILD/qinsctl; wait4 gives ru_maxrss). Bounded: about three imports'
 * time; temp files are removed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "qt.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Writes n_mat matrices rows x cols of pseudo-Gaussian f32, plus one norm per matrix. */
static int write_model(const char *path, int n_mat, uint64_t rows, uint64_t cols, uint64_t *bytes) {
  qs_st_entry *e = calloc((size_t)n_mat * 2, sizeof *e);
  char (*names)[32] = calloc((size_t)n_mat * 2, 32);
  uint64_t shp[2] = {rows, cols}, nshp[1] = {cols};
  for (int i = 0; i < n_mat; i++) {
    snprintf(names[2 * i], 32, "layers.%02d.weight", i);
    snprintf(names[2 * i + 1], 32, "layers.%02d.norm", i);
    e[2 * i] = (qs_st_entry){names[2 * i], QS_ST_F32, 2, shp, rows * cols * 4};
    e[2 * i + 1] = (qs_st_entry){names[2 * i + 1], QS_ST_F32, 1, nshp, cols * 4};
  }
  uint8_t *h;
  size_t hl;
  if (qs_st_header_build(e, (size_t)n_mat * 2, "{\"format\":\"pt\"}", &h, &hl)) return -1;
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  fwrite(h, 1, hl, f);
  *bytes = hl;
  free(h);
  float *w = malloc(rows * cols * 4);
  for (int i = 0; i < n_mat; i++) {
    qt_fill_gauss(w, rows * cols, (uint64_t)i + 1, 0.02f);
    fwrite(w, 4, rows * cols, f);
    qt_fill_gauss(w, cols, (uint64_t)i + 1000, 1.0f);
    fwrite(w, 4, cols, f);
    *bytes += (rows * cols + cols) * 4;
  }
  free(w);
  free(e);
  free(names);
  return fclose(f);
}

static double raw_read_mbs(const char *path, uint64_t bytes) {
  int fd = open(path, O_RDONLY);
  char *b = malloc(4u << 20);
  double best = 0;
  for (int pass = 0; pass < 2; pass++) { /* the first pass warms the cache */
    double t0 = now();
    uint64_t off = 0;
    ssize_t r;
    while ((r = pread(fd, b, 4u << 20, (off_t)off)) > 0) off += (uint64_t)r;
    double mbs = (double)bytes / 1e6 / (now() - t0);
    if (mbs > best) best = mbs;
  }
  free(b);
  close(fd);
  return best;
}

/* Runs qinsctl --store S import FILE [extra]; returns seconds, *rss_kb the child's peak RSS. */
static double run_import(const char *qinsctl, const char *store, const char *file, const char *model,
                         const char *codec, long *rss_kb) {
  double t0 = now();
  pid_t pid = fork();
  if (pid == 0) {
    int dn = open("/dev/null", O_WRONLY);
    dup2(dn, 1);
    if (codec)
      execl(qinsctl, qinsctl, "--store", store, "import", file, "--model", model, "--codec", codec, (char *)NULL);
    else
      execl(qinsctl, qinsctl, "--store", store, "import", file, "--model", model, (char *)NULL);
    _exit(127);
  }
  int st;
  struct rusage ru;
  if (pid < 0 || wait4(pid, &st, 0, &ru) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) return -1;
  *rss_kb = ru.ru_maxrss;
  return now() - t0;
}

int main(void) {
  char dir[64], qinsctl[4096], big[128], small[128], store[128];
  qt_bin("qinsctl", qinsctl, sizeof qinsctl);
  if (access(qinsctl, X_OK)) {
    fprintf(stderr, "bench_import: %s not built\n", qinsctl);
    return 1;
  }
  if (qt_tmpdir(dir)) return 1;
  snprintf(big, sizeof big, "%s/big.safetensors", dir);
  snprintf(small, sizeof small, "%s/small.safetensors", dir);
  snprintf(store, sizeof store, "%s/store", dir);
  uint64_t bb, sb;
  if (write_model(big, 8, 4096, 4096, &bb) || write_model(small, 2, 4096, 4096, &sb)) {
    fprintf(stderr, "bench_import: cannot write the synthetic models in %s\n", dir);
    qt_rmrf(dir);
    return 1;
  }
  double raw = raw_read_mbs(big, bb);
  /* Second reference: the codec alone on one of the model's matrices, in memory (fit + encode,
   * as the importer calls them), so the ratio shows what reading, staging and LMDB cost on top. */
  double codec_mbs = 0;
  {
    uint64_t rows = 4096, cols = 4096, n = rows * cols;
    float *w = malloc(n * 4);
    qt_fill_gauss(w, n, 1, 0.02f);
    void *dst = malloc(qc_chunk_bytes(QC_QINS8, cols, rows, NULL));
    double t0 = now();
    qc_params p;
    int ok = qc_fit_tensor(QC_QINS8, cols, rows, w, NULL, &p, NULL) == 0 &&
             qc_encode(&p, cols, rows, w, dst, NULL, NULL) == 0;
    double dt = now() - t0;
    if (ok) codec_mbs = (double)n * 4 / 1e6 / dt;
    free(w);
    free(dst);
  }
  printf("source: synthetic safetensors, %.1f MiB (8 x 4096x4096 f32 + norms); raw pread of the "
         "file (page cache warm): %.0f MB/s\n", (double)bb / 1048576, raw);
  struct { const char *label, *file, *codec, *model; uint64_t bytes; } runs[] = {
      {"import qins8 (default policy), 512 MiB", big, NULL, "big", bb},
      {"import f32 passthrough,        512 MiB", big, "f32", "bigf32", bb},
      {"import qins8 (default policy), 128 MiB", small, NULL, "small", sb},
      {"import f32 passthrough,        128 MiB", small, "f32", "smallf32", sb}};
  int rc = 0;
  for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
    long rss = 0;
    double s = run_import(qinsctl, store, runs[i].file, runs[i].model, runs[i].codec, &rss);
    if (s < 0) {
      fprintf(stderr, "bench_import: %s failed\n", runs[i].label);
      rc = 1;
      continue;
    }
    double mbs = (double)runs[i].bytes / 1e6 / s;
    printf("%s: %6.2f s  %7.1f MB/s of source  peak RSS %6.1f MiB  | raw read %.0f MB/s  "
           "ratio %.3f",
           runs[i].label, s, mbs, (double)rss / 1024, raw, mbs / raw);
    if (!runs[i].codec && codec_mbs > 0)
      printf("  | qins8 fit+encode alone %.1f MB/s  ratio %.2f", codec_mbs, mbs / codec_mbs);
    printf("\n");
    fflush(stdout);
  }
  qt_rmrf(dir);
  return rc;
}
