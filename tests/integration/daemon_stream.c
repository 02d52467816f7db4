/* SPDX-License-Identifier: MIT */
/*
 * daemon_stream.c — large gets that qinsd streams (sent chunk by chunk while the pool decodes;
 * docs/PROTOCOL.md §4.6, option stream-min-bytes, here 64K): pipelined with small requests and
 * other streams on one connection (responses never interleave), two connections at once, a client
 * leaving mid-stream, and a checksum failure found after the head went out (the connection is
 * closed; an error in the first chunk is still an ordinary CHECKSUM response), and slow readers
 * (past the worker's wait budget the rest of the answer is decoded into a buffer of its own).
 * Model "m": the standard tensors plus "huge" [2048, 1024] f32 = 8 MiB, two 4 MiB chunks (sent
 * from the store's map: zero-copy), and "hq", the same values stored qins8 (decoded in pieces).
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/stat.h>

#include "daemon_fixture.h"
#include "qins.h"

#define HUGE_SEED 50
#define HUGE_R 2048
#define HUGE_C 1024

static int fill_huge(qs_store *s, void *ud) {
  (void)ud;
  int rc = fill_model(s, "m", 0);
  if (rc) return rc;
  /* A second model holding huge: simplest with the fixture's helpers. */
  qs_import *im;
  if ((rc = qs_import_begin(s, "h", NULL, &im))) return rc;
  float *v = malloc((size_t)HUGE_R * HUGE_C * sizeof *v);
  for (uint64_t i = 0; i < (uint64_t)HUGE_R * HUGE_C; i++) v[i] = ts_value(HUGE_SEED, i);
  uint64_t shape[2] = {HUGE_R, HUGE_C};
  rc = ts_import_f32(im, "huge", 2, shape, QC_F32, v);
  if (!rc) rc = ts_import_f32(im, "hq", 2, shape, QC_QINS8, v); /* streamed by decoding */
  free(v);
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static const char *const stream_args[] = {"--stream-min-bytes", "64K", NULL};

static void setup_stream(void) {
  cr_assert_eq(ts_dir_make(&D), 0, "mkdtemp");
  cr_assert_eq(ts_store_fill(D.store, fill_huge, NULL), 0, "filling the store");
  cr_assert_eq(ts_daemon_start(&D, stream_args), 0, "starting qinsd");
}

TestSuite(daemon_stream, .init = setup_stream, .fini = teardown, .timeout = 120);

static void pack_get(msgpack_packer *pk, uint32_t id, const char *model, const char *name,
                     int64_t r0, int64_t r1) {
  qp_pack_request(pk, id, "get");
  msgpack_pack_array(pk, 1);
  msgpack_pack_map(pk, r0 >= 0 ? 3 : 2);
  qp_pack_cstr(pk, "model");
  qp_pack_cstr(pk, model);
  qp_pack_cstr(pk, "name");
  qp_pack_cstr(pk, name);
  if (r0 >= 0) {
    qp_pack_cstr(pk, "slice");
    msgpack_pack_array(pk, 1);
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint64(pk, (uint64_t)r0);
    msgpack_pack_uint64(pk, (uint64_t)r1);
  }
}

/* Checks rows [r0, r1) of huge (or of m/big when big) in a result map. */
static void check_rows(const msgpack_object *m, int big, uint64_t r0, uint64_t r1) {
  got g;
  memset(&g, 0, sizeof g);
  parse_tensor_map(m, &g);
  uint64_t cols = big ? 600 : HUGE_C, seed = big ? 3 : HUGE_SEED;
  cr_assert_eq(g.bytes, (r1 - r0) * cols * 4);
  cr_assert_eq(g.shape[0], r1 - r0);
  for (uint64_t i = 0; i < (r1 - r0) * cols; i++) {
    float v;
    memcpy(&v, g.data + 4 * i, 4);
    if (v != ts_value(seed, r0 * cols + i))
      cr_assert_fail("element %llu of rows [%llu, %llu) differs", (unsigned long long)i,
                     (unsigned long long)r0, (unsigned long long)r1);
  }
  free(g.data);
}

typedef struct spec {
  const char *model, *name;
  int64_t r0, r1; /* -1: whole */
} spec;

static const spec mix[] = {
  {"h", "huge", -1, -1},     {"m", "big", 0, 1},       {"h", "huge", 1000, 1100},
  {"m", "big", -1, -1},      {"h", "nope", -1, -1},    {"h", "huge", -1, -1},
  {"h", "huge", 0, 1},       {"h", "huge", 1023, 2048}, {"m", "big", 7, 900},
  {"h", "huge", -1, -1},
};
#define N_MIX (sizeof mix / sizeof mix[0])

static void run_mix(int *errors) {
  int fd = ts_connect(D.sock);
  if (fd < 0) {
    (*errors)++;
    return;
  }
  ts_rx rx;
  ts_rx_init(&rx, fd);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  for (size_t i = 0; i < N_MIX; i++) {
    pack_get(&pk, (uint32_t)(500 + i), mix[i].model, mix[i].name, mix[i].r0, mix[i].r1);
    qp_pack_request(&pk, (uint32_t)(900 + i), "ping");
    msgpack_pack_array(&pk, 0);
  }
  if (ts_send(fd, sb.data, sb.size)) (*errors)++;
  msgpack_sbuffer_destroy(&sb);
  int seen[2 * N_MIX] = {0};
  for (size_t k = 0; k < 2 * N_MIX; k++) {
    const msgpack_object *o;
    if (ts_rx_next(&rx, 60000, &o) != 1) {
      (*errors)++;
      break;
    }
    uint32_t id = (uint32_t)o->via.array.ptr[1].via.u64;
    if (id >= 900) {
      seen[N_MIX + id - 900]++;
      if (!qp_obj_str_eq(ts_resp_result(o), "pong")) (*errors)++;
      continue;
    }
    size_t i = id - 500;
    seen[i]++;
    const spec *sp = &mix[i];
    if (!strcmp(sp->name, "nope")) {
      if (ts_resp_code(o) != QINS_ENO_TENSOR) (*errors)++;
      continue;
    }
    if (ts_resp_code(o) != 0) {
      (*errors)++;
      continue;
    }
    int big = !strcmp(sp->name, "big");
    uint64_t rows = big ? 1024 : HUGE_R;
    check_rows(ts_resp_result(o), big, sp->r0 < 0 ? 0 : (uint64_t)sp->r0,
               sp->r0 < 0 ? rows : (uint64_t)sp->r1);
  }
  for (size_t k = 0; k < 2 * N_MIX; k++)
    if (seen[k] != 1) (*errors)++;
  ts_rx_destroy(&rx);
}

Test(daemon_stream, pipelined_streams_and_small_requests_do_not_interleave) {
  int errors = 0;
  run_mix(&errors);
  cr_assert_eq(errors, 0);
}

static void *mix_thread(void *p) {
  run_mix(p);
  return NULL;
}

Test(daemon_stream, concurrent_connections_streaming) {
  pthread_t th[3];
  int errs[3] = {0};
  for (int i = 0; i < 3; i++) pthread_create(&th[i], NULL, mix_thread, &errs[i]);
  for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
  cr_assert_eq(errs[0] + errs[1] + errs[2], 0);
}

Test(daemon_stream, client_leaving_mid_stream) {
  for (int i = 0; i < 4; i++) {
    int fd = ts_connect(D.sock);
    cr_assert_geq(fd, 0);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_get(&pk, 1, "h", "huge", -1, -1);
    pack_get(&pk, 2, "h", "huge", -1, -1);
    cr_assert_eq(ts_send(fd, sb.data, sb.size), 0);
    msgpack_sbuffer_destroy(&sb);
    char buf[1 << 16];
    cr_assert_gt(recv(fd, buf, sizeof buf, 0), 0);
    close(fd);
  }
  ts_rx rx;
  open_rx(&rx);
  got g = do_get(&rx, "h", "huge", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  cr_assert_eq(g.bytes, (size_t)HUGE_R * HUGE_C * 4);
  free(g.data);
  ts_rx_destroy(&rx);
}

/* Flips one bit of element `elem` of huge in the store file (the daemon maps it read-only and
 * sees the change through the page cache). */
static void corrupt_huge(uint64_t elem) {
  char path[160];
  snprintf(path, sizeof path, "%s/data.mdb", D.store);
  int fd = open(path, O_RDWR);
  cr_assert_geq(fd, 0, "open %s", path);
  struct stat st;
  fstat(fd, &st);
  uint8_t *all = malloc((size_t)st.st_size);
  cr_assert_eq(pread(fd, all, (size_t)st.st_size, 0), st.st_size);
  float pat[8];
  for (int i = 0; i < 8; i++) pat[i] = ts_value(HUGE_SEED, elem + (uint64_t)i);
  uint8_t *hit = memmem(all, (size_t)st.st_size, pat, sizeof pat);
  cr_assert(hit, "element %llu not found in the store file", (unsigned long long)elem);
  uint8_t b = hit[1] ^ 0x10;
  cr_assert_eq(pwrite(fd, &b, 1, hit + 1 - all), 1);
  free(all);
  close(fd);
}

Test(daemon_stream, checksum_failure_after_the_head_closes_the_connection) {
  corrupt_huge((uint64_t)1500 * HUGE_C + 100); /* in the second chunk (rows 1024..2047) */
  ts_rx rx;
  open_rx(&rx);
  /* The first chunk alone is fine. */
  const uint64_t first[1][2] = {{0, 10}};
  got g = do_get(&rx, "h", "huge", 1, first, NULL);
  cr_assert_eq(g.code, 0);
  free(g.data);
  /* A small get in the bad chunk: an ordinary CHECKSUM error naming the tensor. */
  const uint64_t bad[1][2] = {{1500, 1501}};
  g = do_get(&rx, "h", "huge", 1, bad, NULL);
  cr_assert_eq(g.code, QINS_ECHECKSUM);
  ts_rx_destroy(&rx);
  /* A streamed get whose second chunk is bad: head and first chunk sent, then a close. The head
   * goes out when the daemon's loop thread runs after the pool thread decoded the first piece;
   * a loop thread kept off the CPU past the ring's wait budget (20 ms + 1 ns a byte, counted from
   * the decode's start) lets the worker decode the rest into its own buffer and fail before any
   * byte was sent, and then the answer is an ordinary CHECKSUM response (as in
   * stream_failing_behind_another_stream). That outcome is checked too, and the get is repeated
   * on a new connection until the head went out first (the case under test). */
  int closed = 0, ordinary = 0;
  while (!closed && ordinary < 50) {
    open_rx(&rx);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_get(&pk, 42, "h", "huge", -1, -1);
    cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
    msgpack_sbuffer_destroy(&sb);
    const msgpack_object *o;
    if (ts_rx_next(&rx, 30000, &o) == 1) {
      cr_assert_eq(o->via.array.ptr[1].via.u64, 42, "msgid");
      cr_assert_eq(ts_resp_code(o), QINS_ECHECKSUM, "a complete answer can only be CHECKSUM: %s",
                   ts_resp_msg(o));
      cr_assert(strstr(ts_resp_msg(o), "huge"), "names the tensor: %s", ts_resp_msg(o));
      ordinary++;
      cr_assert_eq(ts_rx_next(&rx, 200, &o), -1, "nothing follows an ordinary error");
      g = do_get(&rx, "m", "a.w", -1, NULL, NULL);
      cr_assert_eq(g.code, 0, "the connection stays usable after an ordinary error");
      free(g.data);
    } else {
      closed = 1; /* no complete response; the connection closed */
    }
    ts_rx_destroy(&rx);
  }
  if (ordinary) fprintf(stderr, "checksum_failure_after_the_head: %d ordinary CHECKSUM answers "
                                "(head not yet sent) before a mid-stream close\n", ordinary);
  cr_assert(closed, "no streamed get of 50 had its head sent before the failure");
  /* Others are still served; the error is counted and logged. */
  open_rx(&rx);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  g = do_get(&rx, "m", "a.w", -1, NULL, NULL);
  cr_assert_eq(g.code, 0);
  free(g.data);
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  qp_pack_request(&pk, 7, "stats");
  msgpack_pack_array(&pk, 0);
  const msgpack_object *r = ts_call(&rx, &sb, 7);
  msgpack_sbuffer_destroy(&sb);
  cr_assert(r);
  const msgpack_object *e = qp_map_get(qp_map_get(ts_resp_result(r), "errors"), "CHECKSUM");
  cr_assert(e && e->via.u64 == 2 + (uint64_t)ordinary, "CHECKSUM counted %d times: %llu",
            2 + ordinary, e ? (unsigned long long)e->via.u64 : 0ull);
  ts_rx_destroy(&rx);
  FILE *f = fopen(D.log, "r");
  char line[1024];
  int found = 0;
  while (f && fgets(line, sizeof line, f))
    found |= strstr(line, "CHECKSUM") && strstr(line, "closing the connection") && strstr(line, "huge");
  if (f) fclose(f);
  cr_assert(found, "the mid-stream failure is logged naming the tensor");
}

/* Two streamed gets pipelined, the second failing in its second chunk: whichever way the race
 * goes (it may fail while waiting for the socket, and then answers CHECKSUM; or after its head
 * went out, and then the connection closes), every complete response is correct and the daemon
 * keeps serving. */
/* Each piece of a zero-copy stream is checked right before it is sent (stream-piece-bytes, 256K),
 * not the whole 4 MiB chunk up front: once the chunk has been read (and verified whole) a bit
 * flipped near its end is found when the stream reaches that piece, after the pieces before it
 * went out, and the stream is cut there. A check of the whole chunk before sending answers an
 * ordinary CHECKSUM instead, with nothing of the tensor sent. Counted in bytes received, not
 * time; attempts where the worker missed the socket (its wait budget, see above) and failed
 * before sending are retried. */
Test(daemon_stream, zero_copy_pieces_are_checked_right_before_they_are_sent) {
  ts_rx rx;
  open_rx(&rx);
  got g = do_get(&rx, "h", "huge", -1, NULL, NULL); /* the first read verifies both chunks whole */
  cr_assert_eq(g.code, 0);
  free(g.data);
  ts_rx_destroy(&rx);
  const uint64_t bad = (uint64_t)1000 * HUGE_C + 100; /* late in the first chunk (rows 0..1023) */
  corrupt_huge(bad);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  pack_get(&pk, 42, "h", "huge", -1, -1);
  size_t got_bytes = 0;
  int cut = 0, ordinary = 0;
  static char buf[1 << 16];
  while (!cut && ordinary < 50) {
    int fd = ts_connect(D.sock);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ts_send(fd, sb.data, sb.size), 0);
    shutdown(fd, SHUT_WR); /* the daemon answers, then closes: either way the reads end */
    got_bytes = 0;
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, 0)) > 0) got_bytes += (size_t)n;
    close(fd);
    if (got_bytes < 4096) ordinary++; /* a CHECKSUM answer: nothing of the tensor */
    else cut = 1;
  }
  msgpack_sbuffer_destroy(&sb);
  cr_log_info("piece checks: %zu bytes before the cut, %d ordinary answers first", got_bytes,
              ordinary);
  cr_assert(cut, "50 streamed gets were refused whole before sending: the chunk was checked up front");
  /* Everything before the bad piece went out (pieces of 64 Ki elements), nothing from it on. */
  const uint64_t piece = 65536, bad_piece = bad / piece * piece;
  cr_assert_geq(got_bytes, bad_piece * 4, "%zu bytes arrived before the cut", got_bytes);
  cr_assert_lt(got_bytes, bad * 4, "%zu bytes arrived: the bad bytes were sent", got_bytes);
}

Test(daemon_stream, stream_failing_behind_another_stream) {
  corrupt_huge((uint64_t)1500 * HUGE_C + 100);
  for (int round = 0; round < 4; round++) {
    ts_rx rx;
    open_rx(&rx);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_get(&pk, 1, "h", "huge", 0, 1024);    /* chunk 0 only: fine */
    pack_get(&pk, 2, "h", "huge", 1000, 1600); /* into chunk 1: fails there */
    cr_assert_eq(ts_send(rx.fd, sb.data, sb.size), 0);
    msgpack_sbuffer_destroy(&sb);
    const msgpack_object *o;
    int answered = 0; /* both answered: the connection stays open, nothing more comes */
    while (answered < 2 && ts_rx_next(&rx, 30000, &o) == 1) {
      uint32_t id = (uint32_t)o->via.array.ptr[1].via.u64;
      answered++;
      if (id == 1) {
        cr_assert_eq(ts_resp_code(o), 0);
        check_rows(ts_resp_result(o), 0, 0, 1024);
      } else {
        cr_assert_eq(id, 2);
        cr_assert_eq(ts_resp_code(o), QINS_ECHECKSUM);
      }
    }
    ts_rx_destroy(&rx);
  }
  cr_assert_eq(ts_ping(D.sock), 0);
}

/* Reads one response of a streamed get from fd: first `slow` bytes in 16 KiB sips a millisecond
 * apart (a client slower than the ring's wait budget: the daemon decodes the rest into a buffer
 * of its own mid-stream), then the rest at once; checks every row of huge. */
static void read_streamed_huge(int fd, size_t slow) {
  const size_t cap = (size_t)HUGE_R * HUGE_C * 4 + 4096;
  char *buf = malloc(cap);
  cr_assert(buf);
  size_t n = 0;
  for (;;) {
    size_t want = n < slow ? 16384 : cap - n;
    cr_assert_gt(cap - n, 0, "response larger than expected");
    if (want > cap - n) want = cap - n;
    ssize_t k = recv(fd, buf + n, want, 0);
    cr_assert_gt(k, 0, "connection closed after %zu bytes", n);
    n += (size_t)k;
    if (n < slow) usleep(1000);
    if (n < (size_t)HUGE_R * HUGE_C * 4) continue;
    msgpack_zone z;
    msgpack_zone_init(&z, 4096);
    msgpack_object o;
    size_t off = 0;
    if (msgpack_unpack(buf, n, &off, &z, &o) == MSGPACK_UNPACK_SUCCESS) {
      cr_assert_eq(off, n, "nothing after the response");
      cr_assert_eq(ts_resp_code(&o), 0);
      check_rows(ts_resp_result(&o), 0, 0, HUGE_R);
      msgpack_zone_destroy(&z);
      break;
    }
    msgpack_zone_destroy(&z);
  }
  free(buf);
}

/* Slow clients: one that waits before reading at all, one that sips the first 2 MiB; both get
 * every byte right (ring pieces, then the worker's own buffer), and the daemon keeps serving. */
Test(daemon_stream, slow_readers_get_the_whole_stream) {
  for (int round = 0; round < 2; round++) {
    int fd = ts_connect(D.sock);
    cr_assert_geq(fd, 0);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_get(&pk, 3, "h", "huge", -1, -1);
    cr_assert_eq(ts_send(fd, sb.data, sb.size), 0);
    msgpack_sbuffer_destroy(&sb);
    if (round == 0) usleep(300 * 1000);
    read_streamed_huge(fd, round == 0 ? 0 : (size_t)2 << 20);
    close(fd);
  }
  cr_assert_eq(ts_ping(D.sock), 0);
}

/* Sends get(h/hq, rows [r0, r1) or all when r0 < 0, dtype) on fd; optionally waits before reading
 * (a slow reader: the worker's budget runs out and the rest is buffered); returns the payload. */
static got get_hq(ts_rx *rx, int fd, int64_t r0, int64_t r1, const char *dtype, int slow_ms) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  qp_pack_request(&pk, 77, "get");
  msgpack_pack_array(&pk, 1);
  msgpack_pack_map(&pk, r0 >= 0 ? 4 : 3);
  qp_pack_cstr(&pk, "model");
  qp_pack_cstr(&pk, "h");
  qp_pack_cstr(&pk, "name");
  qp_pack_cstr(&pk, "hq");
  qp_pack_cstr(&pk, "dtype");
  qp_pack_cstr(&pk, dtype);
  if (r0 >= 0) {
    qp_pack_cstr(&pk, "slice");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint64(&pk, (uint64_t)r0);
    msgpack_pack_uint64(&pk, (uint64_t)r1);
  }
  cr_assert_eq(ts_send(fd, sb.data, sb.size), 0);
  msgpack_sbuffer_destroy(&sb);
  if (slow_ms) usleep((useconds_t)slow_ms * 1000);
  const msgpack_object *o;
  cr_assert_eq(ts_rx_next(rx, 60000, &o), 1, "no answer");
  got g;
  memset(&g, 0, sizeof g);
  cr_assert_eq(ts_resp_code(o), 0);
  parse_tensor_map(ts_resp_result(o), &g);
  return g;
}

/* A coded tensor is streamed by decoding pieces (not zero-copy): the streamed answer, whole or a
 * row range, in f32, f16 and bf16, fast or read late (the rest past the worker's budget is
 * buffered, possibly from the middle of an element), equals the same rows fetched as small
 * inline gets of 8 rows (32 KiB, under stream-min-bytes). */
Test(daemon_stream, coded_tensors_stream_the_same_bytes_as_small_gets) {
  const char *dts[3] = {"f32", "f16", "bf16"};
  int fd = ts_connect(D.sock);
  cr_assert_geq(fd, 0);
  ts_rx rx; /* owns fd */
  ts_rx_init(&rx, fd);
  for (int k = 0; k < 3; k++) {
    size_t es = k == 0 ? 4 : 2, row = HUGE_C * es;
    uint8_t *ref = malloc((size_t)HUGE_R * row);
    for (int r = 0; r < HUGE_R; r += 8) {
      got g = get_hq(&rx, fd, r, r + 8, dts[k], 0);
      cr_assert_eq(g.bytes, 8 * row);
      memcpy(ref + (size_t)r * row, g.data, g.bytes);
      free(g.data);
    }
    for (int slow = 0; slow < 2; slow++) {
      got w = get_hq(&rx, fd, -1, -1, dts[k], slow ? 300 : 0);
      cr_assert_eq(w.bytes, (size_t)HUGE_R * row);
      cr_assert_str_eq(w.dtype, dts[k]);
      cr_assert(!memcmp(w.data, ref, w.bytes), "%s whole (slow %d) differs from the small gets",
                dts[k], slow);
      free(w.data);
      got s = get_hq(&rx, fd, 1001, 2047, dts[k], slow ? 300 : 0);
      cr_assert_eq(s.bytes, (size_t)1046 * row);
      cr_assert(!memcmp(s.data, ref + (size_t)1001 * row, s.bytes), "%s rows differ", dts[k]);
      free(s.data);
    }
    free(ref);
  }
  ts_rx_destroy(&rx);
  cr_assert_eq(ts_ping(D.sock), 0);
}

/* libqins (client/qins.h "Reconnecting"): a payload cut short is fetched once more after a
 * reconnect, as the daemon may have restarted under it; cut again (the damaged chunk), or answered
 * CHECKSUM when the rest was decoded before the head went out, the call fails at once instead of
 * fetching until its retry budget is spent, and the client keeps serving. */
Test(daemon_stream, libqins_reports_a_damaged_stream_without_spending_its_budget) {
  corrupt_huge((uint64_t)1500 * HUGE_C + 100); /* in the second chunk */
  qins_client *c = NULL;
  cr_assert_eq(qins_connect(&c, D.sock, 10000), 0);
  qins_set_retry(c, 20000);
  void *p = (void *)1;
  size_t n = 0;
  int rc = qins_get(c, "h", "huge", NULL, 0, QINS_F32, &p, &n, NULL, NULL);
  cr_expect(rc == QINS_ECLOSED || rc == QINS_ECHECKSUM, "%s: %s", qins_err_name(rc),
            qins_client_error(c));
  cr_expect_null(p);
  if (rc == QINS_ECLOSED)
    cr_expect(strstr(qins_client_error(c), "inside the payload twice") != NULL, "%s",
              qins_client_error(c));
  qins_conn_stats st;
  qins_client_stats(c, &st);
  cr_expect_leq(st.reconnects, 1, "refetched %llu times", (unsigned long long)st.reconnects);
  cr_expect_eq(st.budgets_spent, 0);
  float row[129];
  qins_range r = {0, 1};
  cr_expect_eq(qins_get_into(c, "m", "a.w", &r, 1, QINS_F32, row, sizeof row, NULL, NULL, NULL), 0,
               "%s", qins_client_error(c));
  qins_close(c);
}
