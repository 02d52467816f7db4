/* SPDX-License-Identifier: MIT */
/*
 * qinsctl_store.c — qinsctl's store commands end to end, run as a separate process on a temp
 * store (issue 3 acceptance): stories260K import -> export -> import with byte-identical exports,
 * the audit's bytes/weight and SNR, a corpus of malformed inputs that must each fail with a clear
 * message naming the file while leaving the store unchanged, usage errors, and a full store.
 *
 * The test process never opens the LMDB env: it reads the store through `qinsctl --json`.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "codec.h"
#include "json.h"
#include "qins.h"
#include "qt.h"

static char dir[64], store[128], qinsctl[4096];

static void setup(void) {
  cr_assert_eq(qt_tmpdir(dir), 0);
  snprintf(store, sizeof store, "%s/store", dir);
  qt_bin("qinsctl", qinsctl, sizeof qinsctl);
  cr_assert_eq(access(qinsctl, X_OK), 0, "%s not built", qinsctl);
}
static void teardown(void) { qt_rmrf(dir); }

TestSuite(qinsctl_store, .init = setup, .fini = teardown, .timeout = 120);

/* Runs qinsctl --store STORE args...; returns the exit status. */
static int ctl(char **out, char **err, char *const env[], const char *a1, const char *a2,
               const char *a3, const char *a4, const char *a5) {
  char *argv[12] = {qinsctl, "--store", store};
  int n = 3;
  const char *a[] = {a1, a2, a3, a4, a5};
  for (int i = 0; i < 5 && a[i]; i++) argv[n++] = (char *)a[i];
  argv[n] = NULL;
  return qt_run(argv, env, out, err);
}

static qs_json *parse(const char *text) {
  qs_json *v = NULL;
  char e[256];
  cr_assert_eq(qs_json_parse(text, strlen(text), &v, e, sizeof e), 0, "bad JSON (%s): %s", e, text);
  return v;
}

/* The store's logical content: the model list and every model's tensors with their checksums. */
static char *snapshot(void) {
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, NULL, "--json", "ls", NULL, NULL, NULL), 0, "ls: %s", err);
  free(err);
  qs_json *v = parse(out);
  size_t cap = strlen(out) + 1;
  char *snap = malloc(cap);
  strcpy(snap, out);
  const qs_json *ms = qs_json_get(v, "models");
  for (size_t i = 0; i < ms->len; i++) {
    char *o2;
    const char *name = qs_json_get(&ms->items[i], "name")->str;
    cr_assert_eq(ctl(&o2, NULL, NULL, "--json", "ls", name, NULL, NULL), 0);
    cap += strlen(o2);
    snap = realloc(snap, cap);
    strcat(snap, o2);
    free(o2);
  }
  qs_json_free(v);
  free(out);
  return snap;
}

static void verify_ok(void) {
  char *out, *err;
  int rc = ctl(&out, &err, NULL, "--json", "verify", NULL, NULL, NULL);
  cr_assert_eq(rc, 0, "verify failed: %s %s", out, err);
  free(out);
  free(err);
}

Test(qinsctl_store, stories260K_import_export_import_is_deterministic) {
  char src[4096], e1[128], e2[128], e3[128];
  qt_shared("models/stories260K.safetensors", src, sizeof src);
  if (access(src, R_OK)) cr_skip_test("%s absent: skipping the stories260K round trip", src);
  snprintf(e1, sizeof e1, "%s/e1.safetensors", dir);
  snprintf(e2, sizeof e2, "%s/e2.safetensors", dir);
  snprintf(e3, sizeof e3, "%s/e3.safetensors", dir);
  char *err;
  cr_assert_eq(ctl(NULL, &err, NULL, "import", src, NULL, NULL, NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "stories260K", e1, NULL, NULL), 0);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "stories260K", e2, NULL, NULL), 0);
  size_t l1, l2, l3;
  char *b1 = qt_read(e1, &l1), *b2 = qt_read(e2, &l2);
  cr_assert(b1 && b2 && l1 == l2 && !memcmp(b1, b2, l1), "two exports differ");
  /* The export is valid safetensors with the source's names, shapes and metadata; 1-D tensors
   * (f32 passthrough) are bit-exact and 2-D ones are close. */
  qs_st_file *fs, *fe;
  char es[512];
  cr_assert_eq(qs_st_open(src, &fs, es, sizeof es), 0, "%s", es);
  cr_assert_eq(qs_st_open(e1, &fe, es, sizeof es), 0, "export invalid: %s", es);
  cr_assert_eq(qs_st_count(fe), qs_st_count(fs));
  cr_assert_str_eq(qs_st_metadata_json(fe), qs_st_metadata_json(fs));
  for (size_t i = 0; i < qs_st_count(fs); i++) {
    const qs_st_tensor *a = qs_st_tensor_at(fs, i), *b = qs_st_find(fe, a->name);
    cr_assert_not_null(b, "export lacks %s", a->name);
    cr_assert_eq(b->ndim, a->ndim);
    cr_assert_eq(b->nbytes, a->nbytes);
    for (int d = 0; d < a->ndim; d++) cr_assert_eq(b->shape[d], a->shape[d]);
    float *x = malloc(a->nbytes), *y = malloc(b->nbytes);
    cr_assert_eq(qs_st_read(fs, a, 0, a->nbytes, x, es, sizeof es), 0);
    cr_assert_eq(qs_st_read(fe, b, 0, b->nbytes, y, es, sizeof es), 0);
    double s2 = 0, e2s = 0;
    for (uint64_t k = 0; k < a->n_elem; k++) {
      s2 += (double)x[k] * x[k];
      e2s += ((double)x[k] - y[k]) * ((double)x[k] - y[k]);
    }
    if (a->ndim == 1) cr_assert_eq(memcmp(x, y, a->nbytes), 0, "%s not exact", a->name);
    else cr_assert_gt(10 * log10(s2 / e2s), 40.0, "%s: SNR too low", a->name);
    free(x);
    free(y);
  }
  qs_st_close(fe);
  qs_st_close(fs);
  /* Import the export; its export is valid and again deterministic. */
  cr_assert_eq(ctl(NULL, &err, NULL, "import", e1, "--model", "again", NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "again", e3, NULL, NULL), 0);
  cr_assert_eq(qs_st_open(e3, &fe, es, sizeof es), 0, "%s", es);
  cr_assert_eq(qs_st_count(fe), 47);
  qs_st_close(fe);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "again", e2, NULL, NULL), 0);
  char *b3 = qt_read(e3, &l3);
  free(b2);
  b2 = qt_read(e2, &l2);
  cr_assert(l2 == l3 && !memcmp(b2, b3, l3), "two exports of the re-import differ");
  free(b1);
  free(b2);
  free(b3);
  /* f16 / bf16 exports are valid too. */
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "stories260K", e2, "--dtype", "bf16"), 0);
  cr_assert_eq(qs_st_open(e2, &fe, es, sizeof es), 0, "%s", es);
  cr_assert_eq(qs_st_tensor_at(fe, 0)->dtype, QS_ST_BF16);
  qs_st_close(fe);
  verify_ok();
}

Test(qinsctl_store, stories260K_audit_matrices_within_1_08_bytes_per_weight) {
  char src[4096];
  qt_shared("models/stories260K.safetensors", src, sizeof src);
  if (access(src, R_OK)) cr_skip_test("%s absent: skipping the stories260K audit", src);
  char *out, *err;
  cr_assert_eq(ctl(NULL, &err, NULL, "import", src, NULL, NULL, NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ctl(&out, &err, NULL, "--json", "audit", NULL, NULL, NULL), 0, "%s", err);
  qs_json *v = parse(out);
  const qs_json *m = qs_json_at(qs_json_get(v, "models"), 0);
  const qs_json *mat = qs_json_get(m, "matrices");
  double bpw = qs_json_get(mat, "bytes_per_weight")->num, snr = qs_json_get(mat, "snr_db")->num;
  uint64_t nt = qs_json_get(mat, "n_tensors")->u64;
  fprintf(stderr, "stories260K audit: %llu 2-D tensors, %.4f bytes/weight, element-weighted SNR %.2f dB\n",
          (unsigned long long)nt, bpw, snr);
  cr_assert_eq(nt, 36);
  cr_assert_leq(bpw, 1.08, "2-D tensors at %.4f bytes/weight", bpw);
  cr_assert_gt(snr, 40.0);
  /* Totals and LMDB figures are present and consistent. */
  const qs_json *tot = qs_json_get(v, "totals"), *lm = qs_json_get(v, "lmdb");
  cr_assert_eq(qs_json_get(tot, "elements")->u64, 260032);
  cr_assert_eq(qs_json_get(tot, "source_bytes")->u64, 260032 * 4);
  cr_assert_gt(qs_json_get(lm, "file_bytes")->u64, 0);
  cr_assert_not_null(qs_json_get(lm, "free_pages"));
  /* Per-tensor stored bytes sum to the model's stored bytes (shared tables counted once). */
  const qs_json *ts = qs_json_get(m, "tensors");
  double sum = 0;
  for (size_t i = 0; i < ts->len; i++) sum += qs_json_get(&ts->items[i], "stored_bytes")->num;
  double ms = (double)qs_json_get(qs_json_get(m, "all"), "stored_bytes")->u64;
  cr_assert(fabs(sum - ms) < 1.0 + 1e-6 * ms, "tensors sum %.1f, model %.1f", sum, ms);
  qs_json_free(v);
  free(out);
  free(err);
}

/* ---------------------------------------------------------------------------------------------
 * Malformed inputs */

/* A safetensors file from a header text and data_len bytes of 0x3c (0.0117 as f32 pieces). */
static void st_raw(const char *path, const char *hdr, uint64_t hlen, size_t data_len) {
  qt_buf b = {0};
  qt_put_u64(&b, hlen ? hlen : strlen(hdr));
  qt_put(&b, hdr, strlen(hdr));
  for (size_t i = 0; i < data_len; i++) qt_put(&b, "\x3c", 1);
  cr_assert_eq(qt_write(path, b.p, b.n), 0);
  free(b.p);
}

typedef struct gguf_opt {
  uint32_t version;      /* 3 */
  const char *magic;     /* "GGUF" */
  int dup_kv;            /* add the same key twice */
  int bad_align;         /* general.alignment = 24 */
  uint64_t offset;       /* tensor offset (0) */
  uint32_t type;         /* tensor type (0 = F32) */
  int truncate;          /* drop the data's last bytes */
} gguf_opt;

/* A GGUF v3 file with one F32 tensor "w" of ne = {8, 4} (row-major [4, 8]). */
static void gguf_write(const char *path, gguf_opt o) {
  qt_buf b = {0};
  qt_put(&b, o.magic ? o.magic : "GGUF", 4);
  qt_put_u32(&b, o.version ? o.version : 3);
  qt_put_u64(&b, 1);
  qt_put_u64(&b, o.dup_kv ? 3 : 2);
  qt_put_gstr(&b, "general.architecture");
  qt_put_u32(&b, 8);
  qt_put_gstr(&b, "llama");
  qt_put_gstr(&b, "general.alignment");
  qt_put_u32(&b, 4);
  qt_put_u32(&b, o.bad_align ? 24 : 32);
  if (o.dup_kv) {
    qt_put_gstr(&b, "general.architecture");
    qt_put_u32(&b, 8);
    qt_put_gstr(&b, "other");
  }
  qt_put_gstr(&b, "w");
  qt_put_u32(&b, 2);
  qt_put_u64(&b, 8);
  qt_put_u64(&b, 4);
  qt_put_u32(&b, o.type);
  qt_put_u64(&b, o.offset);
  while (b.n % 32) qt_put(&b, "\0", 1);
  for (int i = 0; i < 32; i++) {
    float f = (float)i / 8;
    qt_put(&b, &f, 4);
  }
  if (o.offset) for (uint64_t i = 0; i < o.offset; i++) qt_put(&b, "\0", 1);
  if (o.truncate) b.n -= 16;
  cr_assert_eq(qt_write(path, b.p, b.n), 0);
  free(b.p);
}

static void npy_write(const char *path, int major, const char *dict, size_t data_len) {
  qt_buf b = {0};
  qt_put(&b, "\x93NUMPY", 6);
  uint8_t v[2] = {(uint8_t)major, 0};
  qt_put(&b, v, 2);
  char h[512];
  int hl = snprintf(h, sizeof h, "%s", dict);
  while ((10 + hl + 1) % 64) h[hl++] = ' ';
  h[hl++] = '\n';
  if (major == 1) {
    uint16_t l = (uint16_t)hl;
    qt_put(&b, &l, 2);
  } else {
    qt_put_u32(&b, (uint32_t)hl);
  }
  qt_put(&b, h, (size_t)hl);
  for (size_t i = 0; i < data_len; i++) qt_put(&b, "\0", 1);
  cr_assert_eq(qt_write(path, b.p, b.n), 0);
  free(b.p);
}

Test(qinsctl_store, malformed_inputs_fail_clearly_and_leave_the_store_unchanged) {
  /* A store holding one good model first. */
  char good[256];
  snprintf(good, sizeof good, "%s/good.safetensors", dir);
  float gw[16 * 8], gn[8];
  qt_fill_gauss(gw, 16 * 8, 1, 0.1f);
  qt_fill_gauss(gn, 8, 2, 1.0f);
  qt_tensor gt[2] = {{"w", QS_ST_F32, 2, {16, 8}, gw, sizeof gw}, {"n", QS_ST_F32, 1, {8}, gn, sizeof gn}};
  cr_assert_eq(qt_st_write(good, gt, 2, "{\"format\":\"pt\"}"), 0);
  char *err;
  cr_assert_eq(ctl(NULL, &err, NULL, "import", good, "--model", "base", NULL), 0, "%s", err);
  free(err);
  char *before = snapshot();

  const char *ok = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  char h[1024], p[256];
  int n = 0;
  struct { char path[256]; const char *want; } cases[64];
#define CASE(name, want_)                                        \
  do {                                                           \
    snprintf(cases[n].path, sizeof cases[n].path, "%s/%s", dir, name); \
    cases[n].want = want_;                                       \
    memcpy(p, cases[n].path, sizeof p);                          \
    n++;                                                         \
  } while (0)
  /* safetensors */
  CASE("empty.safetensors", "too small for the 8-byte header length");
  cr_assert_eq(qt_write(p, "", 0), 0);
  CASE("short.safetensors", "too small for the 8-byte header length");
  cr_assert_eq(qt_write(p, "\x10\0\0\0\0", 5), 0);
  CASE("hdr_past_eof.safetensors", "runs past the end of the file");
  st_raw(p, "{}", 1000, 0);
  CASE("hdr_too_big.safetensors", "exceeds the limit of 100000000 bytes");
  st_raw(p, "{}", 100000001, 0);
  CASE("bad_json.safetensors", "header is not valid JSON");
  st_raw(p, "{\"a\":", 0, 0);
  CASE("not_object.safetensors", "header is a JSON array, not an object");
  st_raw(p, "[1,2]", 0, 0);
  CASE("dup_names.safetensors", "duplicate key \"a\"");
  snprintf(h, sizeof h, "{%s,%s}", ok, ok);
  st_raw(p, h, 0, 8);
  CASE("overlap.safetensors", "overlapping");
  snprintf(h, sizeof h, "{%s,\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", ok);
  st_raw(p, h, 0, 12);
  CASE("gap.safetensors", "leaving a gap");
  snprintf(h, sizeof h, "{%s,\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", ok);
  st_raw(p, h, 0, 16);
  CASE("out_of_range.safetensors", "past the data buffer");
  st_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 0, 8);
  CASE("shape_mismatch.safetensors", "need 12 bytes but data_offsets span 8");
  st_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 0, 8);
  CASE("count_overflow.safetensors", "overflows 64 bits");
  st_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],\"data_offsets\":[0,8]}}", 0, 8);
  CASE("unknown_dtype.safetensors", "unknown dtype \"F12\"");
  st_raw(p, "{\"a\":{\"dtype\":\"F12\",\"shape\":[2],\"data_offsets\":[0,8]}}", 0, 8);
  CASE("trailing.safetensors", "trailing bytes");
  snprintf(h, sizeof h, "{%s}", ok);
  st_raw(p, h, 0, 12);
  CASE("bad_utf8.safetensors", "invalid UTF-8");
  st_raw(p, "{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 0, 8);
  CASE("meta_not_string.safetensors", "__metadata__ value of \"k\" is a JSON number");
  snprintf(h, sizeof h, "{\"__metadata__\":{\"k\":1},%s}", ok);
  st_raw(p, h, 0, 8);
  CASE("reversed_offsets.safetensors", "END 0 < BEGIN 8");
  st_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 0, 8);
  CASE("negative_dim.safetensors", "is not a non-negative 64-bit integer");
  st_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 0, 8);
  CASE("fp8.safetensors", "dtype F8_E4M3 is not supported");
  st_raw(p, "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[8],\"data_offsets\":[0,8]}}", 0, 8);
  {
    /* NaN / Inf in a matrix bound for qins8, after a good tensor was already staged. */
    static float w1[64 * 64], w2[64 * 64];
    qt_fill_gauss(w1, 64 * 64, 3, 0.05f);
    qt_fill_gauss(w2, 64 * 64, 4, 0.05f);
    w2[1234] = NAN;
    qt_tensor t[2] = {{"a.weight", QS_ST_F32, 2, {64, 64}, w1, sizeof w1},
                      {"b.weight", QS_ST_F32, 2, {64, 64}, w2, sizeof w2}};
    CASE("nan.safetensors", "tensor b.weight: element 1234 is NaN");
    cr_assert_eq(qt_st_write(p, t, 2, NULL), 0);
    w2[1234] = 0;
    w2[77] = -INFINITY;
    CASE("inf.safetensors", "tensor b.weight: element 77 is infinite");
    cr_assert_eq(qt_st_write(p, t, 2, NULL), 0);
  }
  {
    char longname[300];
    memset(longname, 'x', 299);
    longname[299] = 0;
    float x[2] = {1, 2};
    qt_tensor t[1] = {{longname, QS_ST_F32, 1, {2}, x, 8}};
    CASE("long_name.safetensors", "at most 256 allowed");
    cr_assert_eq(qt_st_write(p, t, 1, NULL), 0);
  }
  /* GGUF */
  CASE("bad_magic.gguf", "bad magic");
  gguf_write(p, (gguf_opt){.magic = "GGUX"});
  CASE("v1.gguf", "GGUF version 1 is not supported");
  gguf_write(p, (gguf_opt){.version = 1});
  CASE("big_endian.gguf", "big-endian GGUF");
  gguf_write(p, (gguf_opt){.version = 0x03000000});
  CASE("bad_alignment.gguf", "general.alignment 24 is not a power of two");
  gguf_write(p, (gguf_opt){.bad_align = 1});
  CASE("misaligned.gguf", "is not a multiple of the alignment 32");
  gguf_write(p, (gguf_opt){.offset = 8});
  CASE("unknown_type.gguf", "unknown ggml type 99");
  gguf_write(p, (gguf_opt){.type = 99});
  CASE("iq4xs.gguf", "quantized type IQ4_XS");
  gguf_write(p, (gguf_opt){.type = 23});
  CASE("q8_0.gguf", "not a multiple of Q8_0's block of 32");
  gguf_write(p, (gguf_opt){.type = 8});
  CASE("truncated.gguf", "runs past the end");
  gguf_write(p, (gguf_opt){.truncate = 1});
  CASE("dup_kv.gguf", "duplicate KV key \"general.architecture\"");
  gguf_write(p, (gguf_opt){.dup_kv = 1});
  /* .npy */
  CASE("v4.npy", ".npy version 4.0 is not supported");
  npy_write(p, 4, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8);
  CASE("big_endian.npy", "big-endian dtype '>f4'");
  npy_write(p, 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8);
  CASE("fortran.npy", "Fortran-order arrays are not supported");
  npy_write(p, 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16);
  CASE("truncated.npy", "truncated");
  npy_write(p, 2, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }", 60);
  CASE("object.npy", "object arrays");
  npy_write(p, 1, "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", 16);
  CASE("bad_header.npy", ".npy header");
  npy_write(p, 3, "{'descr': '<f4', 'shape': (2,), 'bogus': 1}", 8);
  /* Sharded: index naming a tensor its shard lacks; a tensor in two shards. */
  {
    char sd[256], sp[300];
    float x[4] = {1, 2, 3, 4};
    snprintf(sd, sizeof sd, "%s/sharded_missing", dir);
    mkdir(sd, 0755);
    qt_tensor t1[1] = {{"a", QS_ST_F32, 1, {4}, x, 16}};
    snprintf(sp, sizeof sp, "%s/s1.safetensors", sd);
    cr_assert_eq(qt_st_write(sp, t1, 1, NULL), 0);
    snprintf(sp, sizeof sp, "%s/model.safetensors.index.json", sd);
    const char *ix = "{\"metadata\":{},\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\"}}";
    cr_assert_eq(qt_write(sp, ix, strlen(ix)), 0);
    snprintf(cases[n].path, sizeof cases[n].path, "%s", sd);
    cases[n++].want = "tensor \"b\" is mapped to s1.safetensors but that shard lacks it";
    snprintf(sd, sizeof sd, "%s/sharded_dup", dir);
    mkdir(sd, 0755);
    snprintf(sp, sizeof sp, "%s/s1.safetensors", sd);
    cr_assert_eq(qt_st_write(sp, t1, 1, NULL), 0);
    snprintf(sp, sizeof sp, "%s/s2.safetensors", sd);
    qt_tensor t2[2] = {{"a", QS_ST_F32, 1, {4}, x, 16}, {"z", QS_ST_F32, 1, {4}, x, 16}};
    cr_assert_eq(qt_st_write(sp, t2, 2, NULL), 0);
    snprintf(sp, sizeof sp, "%s/model.safetensors.index.json", sd);
    ix = "{\"weight_map\":{\"a\":\"s1.safetensors\",\"z\":\"s2.safetensors\"}}";
    cr_assert_eq(qt_write(sp, ix, strlen(ix)), 0);
    snprintf(cases[n].path, sizeof cases[n].path, "%s", sd);
    cases[n++].want = "tensor a also appears in";
  }
  cr_assert_geq(n, 25);
  for (int i = 0; i < n; i++) {
    char *out, *e;
    int rc = ctl(&out, &e, NULL, "import", cases[i].path, "--model", "victim", NULL);
    cr_expect_eq(rc, 1, "%s: exit %d (want 1): %s", cases[i].path, rc, e);
    /* The message names the file (or the shard directory's index) and what is wrong. */
    const char *base = strrchr(cases[i].path, '/') + 1;
    cr_expect(strstr(e, base), "%s: error does not name the file: %s", cases[i].path, e);
    cr_expect(strstr(e, cases[i].want), "%s: error is '%s', want '%s'", cases[i].path, e,
              cases[i].want);
    free(out);
    free(e);
  }
  char *after = snapshot();
  cr_assert_str_eq(after, before, "store changed by malformed imports");
  verify_ok();
  char *out;
  cr_assert_eq(ctl(&out, NULL, NULL, "--json", "audit", NULL, NULL, NULL), 0);
  qs_json *v = parse(out);
  cr_assert_eq(qs_json_get(qs_json_get(v, "lmdb"), "staging")->u64, 0, "staging left behind");
  qs_json_free(v);
  free(out);
  free(before);
  free(after);
}

Test(qinsctl_store, store_full_aborts_and_leaves_the_store_as_it_was) {
  char good[256], big[256];
  snprintf(good, sizeof good, "%s/small.safetensors", dir);
  snprintf(big, sizeof big, "%s/big.safetensors", dir);
  static float w[256 * 256];
  qt_fill_gauss(w, 256 * 256, 9, 0.1f);
  qt_tensor t[1] = {{"w", QS_ST_F32, 2, {256, 256}, w, sizeof w}};
  cr_assert_eq(qt_st_write(good, t, 1, NULL), 0);
  /* 16 MiB of f32 to be stored as f32: cannot fit in a 4 MiB map. */
  size_t n = 4u << 20;
  float *bw = malloc(n * sizeof *bw);
  qt_fill_gauss(bw, n, 10, 0.1f);
  qt_tensor tb[1] = {{"big", QS_ST_F32, 2, {4096, 1024}, bw, n * 4}};
  cr_assert_eq(qt_st_write(big, tb, 1, NULL), 0);
  free(bw);
  char *env[] = {"QINS_STORE_MAX_MAP=4194304", NULL};
  char *err;
  cr_assert_eq(ctl(NULL, &err, env, "import", good, NULL, NULL, NULL), 0, "%s", err);
  free(err);
  char *before = snapshot();
  int rc = ctl(NULL, &err, env, "import", big, "--codec", "f32", NULL);
  cr_assert_eq(rc, 1, "import into a full store: exit %d: %s", rc, err);
  cr_assert(strstr(err, "big.safetensors") && strstr(err, "map is full"), "%s", err);
  free(err);
  char *after = snapshot();
  cr_assert_str_eq(after, before);
  verify_ok();
  /* Without the cap the map grows and the same import succeeds. */
  cr_assert_eq(ctl(NULL, &err, NULL, "import", big, "--codec", "f32", NULL), 0, "%s", err);
  free(err);
  verify_ok();
  free(before);
  free(after);
}

Test(qinsctl_store, disk_full_at_a_staged_data_commit_aborts_and_leaves_the_store_as_it_was) {
  /* The data file may not grow past its size + 1 MiB (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail
   * with EFBIG, as they would with ENOSPC): the import's first staged-data commit fails, the store
   * stays as it was. The disk filling at the publish commit itself is
   * store_commit_fault/disk_full_at_the_publish_commit_keeps_the_old_model. */
  char good[256], big[256];
  snprintf(good, sizeof good, "%s/small.safetensors", dir);
  snprintf(big, sizeof big, "%s/big.safetensors", dir);
  static float w[64 * 64];
  qt_fill_gauss(w, 64 * 64, 13, 0.1f);
  qt_tensor t[1] = {{"w", QS_ST_F32, 2, {64, 64}, w, sizeof w}};
  cr_assert_eq(qt_st_write(good, t, 1, NULL), 0);
  size_t n = 2u << 20;
  float *bw = malloc(n * sizeof *bw);
  qt_fill_gauss(bw, n, 14, 0.1f);
  qt_tensor tb[1] = {{"big", QS_ST_F32, 2, {2048, 1024}, bw, n * 4}};
  cr_assert_eq(qt_st_write(big, tb, 1, NULL), 0);
  free(bw);
  char *err;
  cr_assert_eq(ctl(NULL, &err, NULL, "import", good, NULL, NULL, NULL), 0, "%s", err);
  free(err);
  char *before = snapshot();
  char db[256];
  snprintf(db, sizeof db, "%s/data.mdb", store);
  struct stat st;
  cr_assert_eq(stat(db, &st), 0);
  int ep[2];
  cr_assert_eq(pipe(ep), 0);
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl = {(rlim_t)st.st_size + (1 << 20), (rlim_t)st.st_size + (1 << 20)};
    setrlimit(RLIMIT_FSIZE, &rl);
    dup2(ep[1], 2);
    close(ep[0]);
    execl(qinsctl, qinsctl, "--store", store, "import", big, "--codec", "f32", (char *)NULL);
    _exit(127);
  }
  close(ep[1]);
  char msg[2048] = "";
  ssize_t got, total = 0;
  while ((got = read(ep[0], msg + total, sizeof msg - 1 - (size_t)total)) > 0) total += got;
  msg[total] = 0;
  close(ep[0]);
  int ws;
  waitpid(pid, &ws, 0);
  cr_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 1, "status %d: %s", ws, msg);
  /* EFBIG from pwrite, or LMDB's EIO for a short write (what a full disk gives). */
  cr_assert(strstr(msg, "big.safetensors") &&
                (strstr(msg, "file size limit reached") || strstr(msg, "I/O error")),
            "%s", msg);
  char *after = snapshot();
  cr_assert_str_eq(after, before);
  verify_ok();
  /* Without the limit the next import succeeds (and reclaims anything staged). */
  cr_assert_eq(ctl(NULL, &err, NULL, "import", big, "--codec", "f32", NULL), 0, "%s", err);
  free(err);
  verify_ok();
  free(before);
  free(after);
}

Test(qinsctl_store, usage_errors_exit_2_and_failures_exit_1) {
  char *argv[] = {qinsctl, "frobnicate", NULL};
  cr_assert_eq(qt_run(argv, NULL, NULL, NULL), 2);
  char *argv2[] = {qinsctl, NULL};
  cr_assert_eq(qt_run(argv2, NULL, NULL, NULL), 2);
  char *out;
  char *argv3[] = {qinsctl, "import", "--help", NULL};
  cr_assert_eq(qt_run(argv3, NULL, &out, NULL), 0);
  cr_assert(strstr(out, "--codec-for GLOB=NAME"), "%s", out);
  free(out);
  cr_assert_eq(ctl(NULL, NULL, NULL, "import", NULL, NULL, NULL, NULL), 2);
  cr_assert_eq(ctl(NULL, NULL, NULL, "import", "x", "--codec", "nope", NULL), 2);
  cr_assert_eq(ctl(NULL, NULL, NULL, "import", "x", "--codec-for", "noequals", NULL), 2);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "m", NULL, NULL, NULL), 2);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "m", "o", "--dtype", "f8"), 2);
  char *argv4[] = {qinsctl, "ls", NULL};
  char *env[] = {"QINS_STORE=", NULL};
  cr_assert_eq(qt_run(argv4, env, NULL, NULL), 2, "no store given must be a usage error");
  /* A missing store or model is a failure (1) with a message. */
  char *e;
  cr_assert_eq(ctl(NULL, &e, NULL, "ls", NULL, NULL, NULL, NULL), 1);
  cr_assert(strstr(e, store), "%s", e);
  free(e);
  char x[256];
  snprintf(x, sizeof x, "%s/x.npy", dir);
  npy_write(x, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 24);
  cr_assert_eq(ctl(NULL, NULL, NULL, "import", x, NULL, NULL, NULL), 0);
  cr_assert_eq(ctl(NULL, &e, NULL, "rm", "nope", NULL, NULL, NULL), 1);
  cr_assert(strstr(e, "no model \"nope\""), "%s", e);
  free(e);
  cr_assert_eq(ctl(NULL, &e, NULL, "info", "x/nope", NULL, NULL, NULL), 1);
  cr_assert(strstr(e, "no tensor \"nope\""), "%s", e);
  free(e);
  cr_assert_eq(ctl(&out, NULL, NULL, "--json", "info", "x/x", NULL, NULL), 0);
  qs_json *v = parse(out);
  cr_assert_str_eq(qs_json_get(v, "codec")->str, "qins8");
  cr_assert_eq(qs_json_get(v, "shape")->len, 2);
  qs_json_free(v);
  free(out);
  cr_assert_eq(ctl(NULL, NULL, NULL, "rm", "x", NULL, NULL, NULL), 0);
  cr_assert_eq(ctl(&out, NULL, NULL, "--json", "ls", NULL, NULL, NULL), 0);
  cr_assert_str_eq(out, "{\"models\":[]}\n");
  free(out);
}

Test(qinsctl_store, codec_policy_and_overrides) {
  char p[256];
  snprintf(p, sizeof p, "%s/m.safetensors", dir);
  static float w[32 * 64], b[64];
  int32_t ids[5] = {1, 2, 3, 4, 5};
  qt_fill_gauss(w, 32 * 64, 5, 0.1f);
  qt_fill_gauss(b, 64, 6, 1.0f);
  uint16_t h[32 * 64];
  for (int i = 0; i < 32 * 64; i++) h[i] = qc_f32_to_bf16(w[i]);
  qt_tensor t[4] = {{"attn.weight", QS_ST_F32, 2, {32, 64}, w, sizeof w},
                    {"attn.bias", QS_ST_F32, 1, {64}, b, sizeof b},
                    {"emb.weight", QS_ST_BF16, 2, {32, 64}, h, sizeof h},
                    {"ids", QS_ST_I32, 1, {5}, ids, sizeof ids}};
  cr_assert_eq(qt_st_write(p, t, 4, NULL), 0);
  char *out, *err;
  cr_assert_eq(ctl(NULL, &err, NULL, "import", p, "--codec-for", "emb.*=qins16", NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ctl(&out, NULL, NULL, "--json", "ls", "m", NULL, NULL), 0);
  qs_json *v = parse(out);
  const qs_json *ts = qs_json_get(v, "tensors");
  const char *want[4][2] = {{"attn.bias", "f32"}, {"attn.weight", "qins8"}, {"emb.weight", "qins16"}, {"ids", "raw"}};
  cr_assert_eq(ts->len, 4);
  for (int i = 0; i < 4; i++) {
    cr_assert_str_eq(qs_json_get(&ts->items[i], "name")->str, want[i][0]);
    cr_assert_str_eq(qs_json_get(&ts->items[i], "codec")->str, want[i][1], "%s", want[i][0]);
  }
  cr_assert_str_eq(qs_json_get(&ts->items[2], "src_dtype")->str, "bf16");
  cr_assert_str_eq(qs_json_get(&ts->items[3], "src_dtype")->str, "i32");
  qs_json_free(v);
  free(out);
  /* --codec for all float tensors, later --codec-for wins; ints stay raw; export keeps i32. */
  cr_assert_eq(ctl(NULL, &err, NULL, "import", p, "--codec", "bf16", NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ctl(&out, NULL, NULL, "--json", "ls", "m", NULL, NULL), 0);
  v = parse(out);
  ts = qs_json_get(v, "tensors");
  for (int i = 0; i < 3; i++) cr_assert_str_eq(qs_json_get(&ts->items[i], "codec")->str, "bf16");
  cr_assert_str_eq(qs_json_get(&ts->items[3], "codec")->str, "raw");
  qs_json_free(v);
  free(out);
  char e1[256];
  snprintf(e1, sizeof e1, "%s/e.safetensors", dir);
  cr_assert_eq(ctl(NULL, NULL, NULL, "export", "m", e1, NULL, NULL), 0);
  qs_st_file *f;
  char es[256];
  cr_assert_eq(qs_st_open(e1, &f, es, sizeof es), 0, "%s", es);
  const qs_st_tensor *it = qs_st_find(f, "ids");
  cr_assert_eq(it->dtype, QS_ST_I32);
  int32_t got[5];
  cr_assert_eq(qs_st_read(f, it, 0, 20, got, es, sizeof es), 0);
  cr_assert_eq(memcmp(got, ids, 20), 0);
  /* bf16 source through the bf16 codec is exact. */
  const qs_st_tensor *et = qs_st_find(f, "emb.weight");
  float *ev = malloc(et->nbytes);
  cr_assert_eq(qs_st_read(f, et, 0, et->nbytes, ev, es, sizeof es), 0);
  for (int i = 0; i < 32 * 64; i++) cr_assert_eq(ev[i], qc_bf16_to_f32(h[i]));
  free(ev);
  qs_st_close(f);
}
