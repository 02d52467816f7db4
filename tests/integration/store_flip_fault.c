/* SPDX-License-Identifier: MIT */
/*
 * store_flip_fault.c — fault: bytes flipped inside stored records while qinsd is stopped (issue 7).
 * One byte is flipped in the stored data of tensors of three record kinds: m/a.w (an f32 chunk),
 * q8 of m or o (a qins8 chunk, located by its chunk header) and ints of both (raw i32 chunks). Then
 * `qinsctl verify` exits 1 naming exactly those four tensors (`verify MODEL` only that model's);
 * a restarted qinsd answers CHECKSUM naming the tensor for a get of each (whole or sliced,
 * and for a get_many including one) instead of wrong numbers, `qinsctl get` of one fails saying
 * CHECKSUM, the failure is logged, and every other tensor of both models serves the same bytes as
 * before. docs/PROTOCOL.md §4.6, docs/FORMAT.md §2.5, docs/OPERATIONS.md "Errors".
 *
 * Related, not repeated here: tests/unit/store_api.c (a flipped chunk through the store API) and
 * tests/integration/daemon_stream.c (a chunk corrupted under a running daemon, mid-stream).
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>

#include "daemon_fixture.h"
#include "qt.h"

static int fill_two(qs_store *s, void *ud) {
  (void)ud;
  int rc = fill_model(s, "m", 0);
  return rc ? rc : fill_model(s, "o", 50);
}

static void setup_two(void) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_two, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, NULL), 0, "starting qinsd");
}

TestSuite(store_flip_fault, .init = setup_two, .fini = teardown, .timeout = 90);

static int ctl(char **out, char **err, const char *a1, const char *a2, const char *a3) {
  char bin[512];
  qt_bin("qinsctl", bin, sizeof bin);
  char *argv[] = {bin, "--store", D.store, "--socket", D.sock, (char *)a1, (char *)a2, (char *)a3, NULL};
  return qt_run(argv, NULL, out, err);
}

/* The store file, whole (the daemon is stopped). */
static uint8_t *read_store(size_t *len) {
  char p[160];
  snprintf(p, sizeof p, "%s/data.mdb", D.store);
  uint8_t *b = (uint8_t *)qt_read(p, len);
  cr_assert(b, "read %s", p);
  return b;
}

static void flip_at(size_t off) {
  char p[160];
  snprintf(p, sizeof p, "%s/data.mdb", D.store);
  int fd = open(p, O_RDWR);
  cr_assert_geq(fd, 0);
  uint8_t b;
  cr_assert_eq(pread(fd, &b, 1, (off_t)off), 1);
  b ^= 0x24;
  cr_assert_eq(pwrite(fd, &b, 1, (off_t)off), 1);
  close(fd);
}

/* Offset of the only occurrence of pat in the file (asserted unique). */
static size_t find_unique(const uint8_t *all, size_t len, const void *pat, size_t n, const char *what) {
  const uint8_t *hit = memmem(all, len, pat, n);
  cr_assert(hit, "%s not found in data.mdb", what);
  cr_assert_null(memmem(hit + 1, len - (size_t)(hit + 1 - all), pat, n), "%s found twice", what);
  return (size_t)(hit - all);
}

/* The chunk record of q8 (one chunk): magic QSCK, CRC, then its payload size (FORMAT.md §2.5). */
static size_t find_chunk_by_size(const uint8_t *all, size_t len, uint64_t payload) {
  size_t found = 0;
  int n = 0;
  for (const uint8_t *p = all; (p = memmem(p, len - (size_t)(p - all), "QSCK", 4)); p++) {
    if ((size_t)(p - all) + 16 + payload > len) break;
    uint64_t sz = 0;
    for (int i = 7; i >= 0; i--) sz = (sz << 8) | p[8 + i];
    if (sz == payload) {
      found = (size_t)(p - all);
      n++;
    }
  }
  cr_assert_eq(n, 2, "q8's payload size matches one chunk per model (m, o): %d", n);
  return found; /* the last: m and o are interleaved by id; the caller picks by content */
}

typedef struct resp {
  int code;
  char msg[512];
  got g;
} resp;

static resp get_msg(ts_rx *rx, const char *model, const char *name, int nr, uint64_t r0, uint64_t r1) {
  static uint32_t id = 1000;
  id++;
  msgpack_sbuffer sb;
  msgpack_packer pk;
  ts_req_begin(&sb, &pk, id, "get", 2 + (nr > 0));
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, model);
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, name);
  if (nr > 0) {
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, r0);
    msgpack_pack_uint64(&pk, r1);
  }
  const msgpack_object *r = ts_call(rx, &sb, id);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r, "no response to get %s/%s", model, name);
  resp out;
  memset(&out, 0, sizeof out);
  out.code = ts_resp_code(r);
  snprintf(out.msg, sizeof out.msg, "%s", ts_resp_msg(r));
  if (!out.code) parse_tensor_map(ts_resp_result(r), &out.g);
  return out;
}

static int is_flipped(const char *name) {
  return !strcmp(name, "a.w") || !strcmp(name, "q8") || !strcmp(name, "ints");
}

Test(store_flip_fault, verify_names_the_tensors_get_says_checksum_others_serve) {
  /* What every tensor serves before. */
  got before[2][N_STD];
  const char *models[2] = {"m", "o"};
  ts_rx rx;
  open_rx(&rx);
  for (int m = 0; m < 2; m++)
    for (size_t k = 0; k < N_STD; k++) {
      before[m][k] = do_get(&rx, models[m], std_tensors[k].name, -1, NULL, NULL);
      cr_assert_eq(before[m][k].code, 0);
    }
  ts_rx_destroy(&rx);
  char *out, *err;
  cr_assert_eq(ctl(&out, &err, "--json", "info", "m/q8"), 0, "%s", err);
  const char *db = strstr(out, "\"data_bytes\":");
  cr_assert(db, "%s", out);
  uint64_t q8_bytes = strtoull(db + 13, NULL, 10);
  free(out);
  free(err);

  /* Daemon stopped; one byte flipped in each of three records of m. */
  int st = ts_daemon_stop(&D);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  size_t len;
  uint8_t *all = read_store(&len);
  float aw[8];
  for (int i = 0; i < 8; i++) aw[i] = ts_value(0, 500 + (uint64_t)i); /* m/a.w: seed 0 */
  size_t off_aw = find_unique(all, len, aw, sizeof aw, "m/a.w's values");
  int32_t iv[10];
  for (int i = 0; i < 10; i++) iv[i] = (int32_t)((uint32_t)i * 1000003u) - 7;
  /* ints is the same in m and o, and small: its chunk lives in a leaf page, of which LMDB's
   * copy-on-write leaves stale copies in free pages. Flip every copy (both models' ints). q8's
   * chunk size is the same in m and o too: flip one, and learn from verify which model it was. */
  size_t off_ints[8];
  int n_ints = 0;
  for (const uint8_t *p = all; n_ints < 8 && (p = memmem(p, len - (size_t)(p - all), iv, sizeof iv)); p++)
    off_ints[n_ints++] = (size_t)(p - all);
  cr_assert_geq(n_ints, 2, "ints of m and o found");
  size_t off_q8 = find_chunk_by_size(all, len, q8_bytes);
  free(all);
  flip_at(off_aw + 13);
  for (int i = 0; i < n_ints; i++) flip_at(off_ints[i] + 17);
  flip_at(off_q8 + 16 + q8_bytes / 2);

  /* verify: exit 1, problems name exactly the flipped tensors. */
  int rc = ctl(&out, &err, "--json", "verify", NULL);
  cr_assert_eq(rc, 1, "verify must fail: %s %s", out, err);
  cr_assert(strstr(out, "\"ok\":false"), "%s", out);
  cr_assert(strstr(err, "m/a.w"), "verify names m/a.w: %s", err);
  int q8_model = strstr(err, "m/q8") ? 'm' : strstr(err, "o/q8") ? 'o' : 0;
  cr_assert(q8_model, "verify names q8: %s", err);
  cr_assert(strstr(err, "m/ints") && strstr(err, "o/ints"), "verify names both ints: %s", err);
  int lines = 0;
  for (const char *p = err; (p = strstr(p, "qinsctl verify: ")); p++) lines++;
  cr_assert_eq(lines, 4, "exactly four problems: %s", err);
  for (size_t k = 0; k < N_STD; k++) {
    char nm[64];
    snprintf(nm, sizeof nm, "/%s:", std_tensors[k].name);
    if (!is_flipped(std_tensors[k].name)) cr_assert_null(strstr(err, nm), "%s is named: %s", nm, err);
  }
  free(out);
  free(err);
  /* Verify of one model checks that model only. */
  rc = ctl(&out, &err, "verify", q8_model == 'm' ? "o" : "m", NULL);
  cr_assert_eq(rc, 1, "%s %s", out, err);
  cr_assert(strstr(err, "ints") && !strstr(err, "q8"), "%s", err);
  free(out);
  free(err);

  /* Served: CHECKSUM naming the tensor, never numbers; every other tensor as before. */
  cr_assert_eq(ts_daemon_start(&D, NULL), 0);
  open_rx(&rx);
  struct { const char *model, *name; } bad[4] = {
      {"m", "a.w"}, {q8_model == 'm' ? "m" : "o", "q8"}, {"m", "ints"}, {"o", "ints"}};
  for (int b = 0; b < 4; b++) {
    resp r = get_msg(&rx, bad[b].model, bad[b].name, 0, 0, 0);
    cr_assert_eq(r.code, QINS_ECHECKSUM, "get %s/%s: %d", bad[b].model, bad[b].name, r.code);
    char nm[64];
    snprintf(nm, sizeof nm, "%s/%s", bad[b].model, bad[b].name);
    cr_assert(strstr(r.msg, nm), "the error names %s: %s", nm, r.msg);
    r = get_msg(&rx, bad[b].model, bad[b].name, 1, 0, 1); /* a one-row slice of the bad chunk */
    cr_assert_eq(r.code, QINS_ECHECKSUM, "slice of %s", nm);
  }
  for (int m = 0; m < 2; m++)
    for (size_t k = 0; k < N_STD; k++) {
      int flipped = 0;
      for (int b = 0; b < 4; b++)
        flipped |= !strcmp(bad[b].model, models[m]) && !strcmp(bad[b].name, std_tensors[k].name);
      if (flipped) continue;
      got g = do_get(&rx, models[m], std_tensors[k].name, -1, NULL, NULL);
      cr_assert_eq(g.code, 0, "%s/%s still serves", models[m], std_tensors[k].name);
      cr_assert_eq(g.bytes, before[m][k].bytes);
      cr_assert_eq(memcmp(g.data, before[m][k].data, g.bytes), 0, "%s/%s", models[m],
                   std_tensors[k].name);
      free(g.data);
    }
  /* get_many: one bad tensor fails the whole call with CHECKSUM; good ones alone succeed. */
  msgpack_sbuffer sb;
  msgpack_packer pk;
  const char *names[2] = {"a.b", "a.w"};
  for (int pass = 0; pass < 2; pass++) {
    ts_req_begin(&sb, &pk, 77 + (uint32_t)pass, "get_many", 2);
    qp_pack_cstr(&pk, "model");
    qp_pack_cstr(&pk, "m");
    qp_pack_cstr(&pk, "names");
    msgpack_pack_array(&pk, pass ? 1 : 2);
    for (int i = 0; i < (pass ? 1 : 2); i++) qp_pack_cstr(&pk, names[i]);
    const msgpack_object *r = ts_call(&rx, &sb, 77 + (uint32_t)pass);
    msgpack_sbuffer_destroy(&sb);
    cr_assert(r);
    cr_assert_eq(ts_resp_code(r), pass ? 0 : QINS_ECHECKSUM, "get_many pass %d", pass);
  }
  ts_rx_destroy(&rx);
  for (int m = 0; m < 2; m++)
    for (size_t k = 0; k < N_STD; k++) free(before[m][k].data);

  /* qinsctl get says CHECKSUM; the daemon logged each failure naming the tensor. */
  rc = ctl(&out, &err, "get", "m/a.w", NULL);
  cr_assert_eq(rc, 1, "qinsctl get of a bad tensor fails: %s", out);
  cr_assert(strstr(err, "CHECKSUM") && strstr(err, "m/a.w"), "%s", err);
  free(out);
  free(err);
  FILE *f = fopen(D.log, "r");
  char line[1024];
  int logged = 0;
  while (f && fgets(line, sizeof line, f))
    logged += strstr(line, "warning") && strstr(line, "CHECKSUM") && strstr(line, "m/a.w") != NULL;
  if (f) fclose(f);
  cr_assert_geq(logged, 2, "each CHECKSUM is logged as a warning naming m/a.w");
}
