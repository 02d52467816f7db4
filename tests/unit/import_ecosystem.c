/* SPDX-License-Identifier: MIT */
/*
 * import_ecosystem.c — the importer on files as they come from Hugging Face, mlx and llama.cpp
 * (issue 15; store.h §Importers): "__metadata__": null, files sniffed by content (Git LFS
 * pointers, zips, .npz, pickles named in the error; formats found by magic, not extension),
 * every GGUF block-quantized type dequantized bit for bit against an independent dequantizer
 * written here from ggml's block layouts, SNR against the true source values (f64 narrowed to
 * f32), and the default policy for 1-D f16/bf16 tensors. Every input is generated here.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qins.h"
#include "qt.h"
#include "store.h"

static char dir[64], sdir[128];
static qs_store *st;

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(sdir, sizeof sdir, "%s/store", dir);
  cr_assert_eq(qs_open(&st, sdir, QS_OPEN_CREATE), 0);
}
static void teardown(void) {
  qs_close(st);
  qt_rmrf(dir);
}
TestSuite(import_ecosystem, .init = setup, .fini = teardown, .timeout = 120);

static int import_opts(const char *path, const char *model, int codec, int requant) {
  qs_import_opts o;
  qs_import_opts_init(&o);
  o.model = model;
  o.codec = codec;
  o.allow_requant = requant;
  return qs_import_path(st, path, &o, NULL);
}

static float *read_tensor(const char *model, const char *name, qs_tensor *out) {
  qs_txn *t;
  cr_assert_eq(qs_txn_begin(st, &t), 0);
  cr_assert_eq(qs_tensor_get(t, model, name, out), 0, "%s", qs_error());
  float *x = malloc(out->n_elem * 4 + 4);
  cr_assert_eq(qs_tensor_read(t, out, NULL, QC_DT_F32, 0, out->n_elem, x), 0, "%s", qs_error());
  qs_txn_end(t);
  return x;
}

static char *model_metadata(const char *model) {
  qs_txn *t;
  qs_model m;
  cr_assert_eq(qs_txn_begin(st, &t), 0);
  cr_assert_eq(qs_model_get(t, model, &m), 0, "%s", qs_error());
  char *md = strdup(m.metadata);
  qs_txn_end(t);
  return md;
}

static void path_of(char *p, size_t cap, const char *name) { snprintf(p, cap, "%s/%s", dir, name); }

/* ---------------------------------------------------------------------------------------------
 * safetensors "__metadata__": null; sniffing */
Test(import_ecosystem, safetensors_metadata_null_is_no_metadata) {
  float w[6] = {1, 2, 3, 4, 5, 6};
  qt_tensor t = {"lora_a", QS_ST_F32, 2, {2, 3}, w, sizeof w};
  char p[256];
  path_of(p, sizeof p, "adapters.safetensors");
  cr_assert_eq(qt_st_write(p, &t, 1, "null"), 0);
  cr_assert_eq(import_opts(p, "ad", QC_F32, 0), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("ad", "lora_a", &ten);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
  char *md = model_metadata("ad");
  cr_assert_null(strstr(md, "null"), "%s", md);
  free(md);
  /* Any other non-object is still refused, naming the key. */
  path_of(p, sizeof p, "bad.safetensors");
  cr_assert_eq(qt_st_write(p, &t, 1, "[1]"), 0);
  cr_assert_eq(import_opts(p, "bad", QC_F32, 0), QINS_EFORMAT);
  cr_assert(strstr(qs_error(), "__metadata__"), "%s", qs_error());
}

static void expect_named(const char *name, const void *bytes, size_t n, const char *what,
                         const char *todo) {
  char p[256];
  path_of(p, sizeof p, name);
  cr_assert_eq(qt_write(p, bytes, n), 0);
  int rc = import_opts(p, "x", -1, 0);
  cr_assert(rc != 0, "%s imported", name);
  cr_assert(strstr(qs_error(), p), "%s", qs_error());
  cr_assert(strstr(qs_error(), what), "%s: want \"%s\" in: %s", name, what, qs_error());
  cr_assert(strstr(qs_error(), todo), "%s: want \"%s\" in: %s", name, todo, qs_error());
  cr_assert_null(strstr(qs_error(), "header length"), "%s", qs_error());
}

/* A zip's first local file header naming `member` (enough for the sniffer; the rest is junk). */
static size_t zip_head(uint8_t *b, const char *member) {
  memset(b, 0, 30);
  memcpy(b, "PK\x03\x04", 4);
  size_t nl = strlen(member);
  b[26] = (uint8_t)nl;
  memcpy(b + 30, member, nl);
  memset(b + 30 + nl, 0x5A, 64);
  return 30 + nl + 64;
}

Test(import_ecosystem, foreign_files_are_named_with_what_to_do) {
  const char *lfs = "version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a2146c0f2e8f1c5f0b7d1d3b4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6\n"
                    "size 1234567\n";
  expect_named("model.safetensors", lfs, strlen(lfs), "Git LFS pointer", "fetch the real file");
  uint8_t z[256];
  size_t zn = zip_head(z, "archive/data.pkl");
  expect_named("pytorch_model.bin", z, zn, "zip archive", "convert it to safetensors");
  zn = zip_head(z, "weights.npy");
  expect_named("arrays.npz", z, zn, ".npz archive", "unpack it");
  zn = zip_head(z, "weights.npy"); /* found by content whatever the name */
  expect_named("arrays.safetensors", z, zn, ".npz archive", "unpack it");
  const uint8_t pk[] = {0x80, 0x02, 0x63, 0x63, 0x6f, 0x6c, 0x6c, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e};
  expect_named("old.bin", pk, sizeof pk, "pickle", "convert it to safetensors");
  /* An LFS pointer as a shard of an index is named too. */
  char p[256];
  path_of(p, sizeof p, "sharded");
  cr_assert_eq(mkdir(p, 0700), 0);
  path_of(p, sizeof p, "sharded/model-00001-of-00001.safetensors");
  cr_assert_eq(qt_write(p, lfs, strlen(lfs)), 0);
  path_of(p, sizeof p, "sharded/model.safetensors.index.json");
  const char *idx = "{\"weight_map\":{\"w\":\"model-00001-of-00001.safetensors\"}}";
  cr_assert_eq(qt_write(p, idx, strlen(idx)), 0);
  path_of(p, sizeof p, "sharded");
  cr_assert_neq(import_opts(p, "x", -1, 0), 0);
  cr_assert(strstr(qs_error(), "Git LFS pointer"), "%s", qs_error());
  /* A directory holding only a PyTorch checkpoint says so. */
  path_of(p, sizeof p, "hf");
  cr_assert_eq(mkdir(p, 0700), 0);
  path_of(p, sizeof p, "hf/pytorch_model.bin");
  cr_assert_eq(qt_write(p, z, zn), 0);
  path_of(p, sizeof p, "hf");
  cr_assert_neq(import_opts(p, "x", -1, 0), 0);
  cr_assert(strstr(qs_error(), "PyTorch .bin/.pt") && strstr(qs_error(), "convert"), "%s",
            qs_error());
}

Test(import_ecosystem, formats_are_found_by_magic_not_extension) {
  float w[4] = {1, -2, 3, -4};
  qt_tensor t = {"w", QS_ST_F32, 1, {4}, w, sizeof w};
  char p[256];
  path_of(p, sizeof p, "model.gguf"); /* safetensors under a GGUF name */
  cr_assert_eq(qt_st_write(p, &t, 1, NULL), 0);
  cr_assert_eq(import_opts(p, "st", QC_F32, 0), 0, "%s", qs_error());
  qs_tensor ten;
  float *x = read_tensor("st", "w", &ten);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
  /* A GGUF named .bin. */
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, 1);
  qt_put_u64(&b, 0);
  qt_put_gstr(&b, "g");
  qt_put_u32(&b, 1);
  qt_put_u64(&b, 4);
  qt_put_u32(&b, 0);
  qt_put_u64(&b, 0);
  while (b.n % 32) qt_put(&b, "\0", 1);
  qt_put(&b, w, sizeof w);
  path_of(p, sizeof p, "model.bin");
  cr_assert_eq(qt_write(p, b.p, b.n), 0);
  free(b.p);
  cr_assert_eq(import_opts(p, "gg", QC_F32, 0), 0, "%s", qs_error());
  x = read_tensor("gg", "g", &ten);
  cr_assert_eq(memcmp(x, w, sizeof w), 0);
  free(x);
}
