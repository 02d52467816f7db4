/* SPDX-License-Identifier: MIT */
/*
 * prog.c — a program outside the project's build, as a user writes one: built by
 * tests/install/install_check.sh with `pkg-config --cflags --libs qins` only, against an installed
 * libqins. Prints the library's version and an error name; with a socket and a model it asks the
 * daemon for the model list and one row of tok_embeddings.weight.
 *   prog [SOCKET MODEL]
 */
#include <math.h>
#include <qins.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
  unsigned v = qins_version();
  printf("libqins %u.%u.%u (header %s)\n", v >> 16, (v >> 8) & 0xff, v & 0xff, QINS_VERSION_STRING);
  printf("%s: %s\n", qins_err_name(QINS_ENO_MODEL), qins_strerror(QINS_ENO_MODEL));
  if (argc != 3) return v == QINS_VERSION_HEX ? 0 : 1;
  qins_client *c;
  int rc = qins_connect(&c, argv[1], 5000);
  if (rc) {
    fprintf(stderr, "connect %s: %s\n", argv[1], qins_strerror(rc));
    return 1;
  }
  qins_model_info *ms;
  size_t n;
  if ((rc = qins_models(c, &ms, &n))) {
    fprintf(stderr, "models: %s\n", qins_client_error(c));
    return 1;
  }
  for (size_t i = 0; i < n; i++) printf("model %s: %llu tensors\n", ms[i].name, (unsigned long long)ms[i].tensors);
  qins_free(ms);
  float row[4096];
  qins_range r = {0, 1};
  size_t got;
  uint64_t shape[QINS_MAX_NDIM];
  int ndim;
  rc = qins_get_into(c, argv[2], "tok_embeddings.weight", &r, 1, QINS_F32, row, sizeof row, &got, shape, &ndim);
  if (rc) {
    fprintf(stderr, "get: %s\n", qins_client_error(c));
    return 1;
  }
  double s = 0;
  for (size_t i = 0; i < got / sizeof(float); i++) s += fabs(row[i]);
  printf("row 0: shape [%llu, %llu], %zu bytes, sum |x| %s\n", (unsigned long long)shape[0],
         (unsigned long long)shape[1], got, s > 0 && isfinite(s) ? "finite, nonzero" : "BAD");
  qins_close(c);
  return 0;
}
