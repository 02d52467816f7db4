/* SPDX-License-Identifier: MIT */
/*
 * request.c — fuzz target: qinsd's whole request path (framing with qp_scan, unpacking, the
 * envelope checks, dispatch through the method table, every handler, replies) against a real small
 * store, through qd_serve_bytes (daemon/qinsd.h): one embedded connection per input, no socket.
 * PROTOCOL.md §1-§4.
 *
 * Input: byte 0 chooses server options, the rest is the client's byte stream (then end of stream).
 *   bits 0-1  read size: whole buffer, 1 byte, 7 bytes, 64 bytes (scanner resumption)
 *   bit 2     inline-decode-bytes 0: every get/get_many decodes on the thread pool
 *   bit 3     stream-min-bytes 4 KiB (pieces of 4 KiB): large gets are streamed chunk by chunk
 *   bit 4     max-request-bytes 256 instead of 64 KiB
 *   bit 5     max-pending 1: backpressure after each pool decode
 * Store (built once per process in a temp dir): model "m" with a tensor of each codec, a raw i32,
 * a scalar, a 5-D tensor and a two-chunk bf16 tensor; model "n" with one tensor.
 *
 * Oracles: the output is a sequence of whole responses [1, msgid, error, result]; every error
 * carries a code the protocol lists for bad requests (a valid store must never give CHECKSUM,
 * CORRUPT, INTERNAL, NOMEM, BUSY or SHUTDOWN); every `data` bin is the last key of its map and holds
 * exactly prod(shape) values of its dtype; after the input the connection is closed and freed and
 * nothing is left queued or reserved; map answers are aligned extents inside the arena (1 MiB, 8
 * leases a connection: ARENA_FULL is an expected answer) and no lease outlives the connection.
 */
#include <dirent.h>
#include <math.h>

#include <msgpack.h>

#include "arena.h"
#include "daemon.h"
#include "fuzz.h"
#include "map.h"
#include "qinsd.h"

static char dir[64];  /* temp dir holding the store */
static int verbose;   /* $QINS_FUZZ_VERBOSE: print every response */
static char store_path[96];

/* ---- the store ------------------------------------------------------------------------------ */
typedef struct spec {
  const char *name;
  int ndim;
  uint64_t shape[5];
  int codec; /* qc_codec, or QS_RAW for i32 */
} spec;

static const spec model_m[] = {
  {"a.w", 2, {64, 40}, QC_QINS8},
  {"a.b", 1, {40}, QC_F32},
  {"b.q16", 2, {8, 70}, QC_QINS16},
  {"c.f16", 3, {2, 3, 5}, QC_F16},
  {"d.bf16", 2, {3, 33}, QC_BF16},
  {"e.log", 2, {4, 16}, QC_SEED_LOG},
  {"f.rat", 2, {4, 16}, QC_SEED_RATIONAL},
  {"g.i32", 2, {2, 3}, QS_RAW},
  {"h.5d", 5, {2, 2, 2, 2, 3}, QC_F32},
  {"s", 0, {0}, QC_F32},
  {"z", 2, {0, 4}, QC_F32},
  {"big", 2, {70000, 32}, QC_BF16}, /* 4.48 MB stored: two chunks (65536 rows per chunk) */
};
static const spec model_n[] = {{"x", 2, {4, 4}, QC_QINS8}};

/* Model m's metadata (FORMAT.md §2.3.1) gives model_info members, GGUF entries of each kind (an
 * array, one left out at import) and an HF file to page through; model n has members only. */
static const char meta_m[] =
    "{\"fuzz\":\"1\",\"general.architecture\":\"llama\",\"gguf\":{\"version\":3,\"kv\":["
    "[\"general.architecture\",\"string\",\"llama\"],[\"llama.block_count\",\"u32\",2],"
    "[\"llama.rope.freq_base\",\"f32\",10000],[\"tokenizer.ggml.tokens\",\"[string]\",[\"a\",\"b\",\"c\"]],"
    "[\"tokenizer.ggml.merges\",\"[string]\",null,99]]},"
    "\"hf\":{\"config\":{\"hidden_size\":8,\"rope_theta\":1e4,\"x\":[true,null,-1.5]}}}";

static int fill_model(qs_store *s, const char *model, const spec *v, size_t n) {
  qs_import *im;
  int rc = qs_import_begin(s, model, strcmp(model, "m") ? "{\"fuzz\":\"1\"}" : meta_m, &im);
  if (rc) return rc;
  for (size_t i = 0; i < n && !rc; i++) {
    uint64_t ne = 1;
    for (int d = 0; d < v[i].ndim; d++) ne *= v[i].shape[d];
    if (v[i].codec == QS_RAW) {
      int32_t *d32 = malloc((ne ? ne : 1) * sizeof *d32);
      if (!d32) return QINS_ENOMEM;
      for (uint64_t k = 0; k < ne; k++) d32[k] = (int32_t)(k * 7919u) - 1000;
      rc = ts_import_i32(im, v[i].name, v[i].ndim, v[i].shape, d32);
      free(d32);
    } else {
      float *f = malloc((ne ? ne : 1) * sizeof *f);
      if (!f) return QINS_ENOMEM;
      for (uint64_t k = 0; k < ne; k++) f[k] = ts_value(i + 1, k);
      rc = ts_import_f32(im, v[i].name, v[i].ndim, v[i].shape, v[i].codec, f);
      free(f);
    }
  }
  if (rc) {
    qs_import_abort(im);
    return rc;
  }
  return qs_import_commit(im);
}

static void cleanup(void) {
  if (qd_srv.store) qs_close(qd_srv.store);
  qd_srv.store = NULL;
  qd_embed_fini();
  DIR *d = opendir(store_path);
  if (d) {
    struct dirent *e;
    char p[400];
    while ((e = readdir(d)))
      if (e->d_name[0] != '.') {
        snprintf(p, sizeof p, "%s/%s", store_path, e->d_name);
        unlink(p);
      }
    closedir(d);
    rmdir(store_path);
  }
  rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  snprintf(dir, sizeof dir, "/tmp/qins-fuzz-XXXXXX");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    exit(1);
  }
  snprintf(store_path, sizeof store_path, "%s/store", dir);
  char sock[96];
  snprintf(sock, sizeof sock, "%s/s", dir);
  char *args[] = {"qinsd", "--store", store_path, "--socket", sock, "--max-response-bytes", "64K",
                  "--arena-bytes", "1M", "--arena-max-leases", "8", NULL};
  qd_config_load(11, args);
  setenv("QINS_IMPORT_THREADS", "1", 1);
  qs_store *s;
  int rc = qs_open(&s, store_path, QS_OPEN_CREATE);
  if (!rc) rc = fill_model(s, "m", model_m, sizeof model_m / sizeof model_m[0]);
  if (!rc) rc = fill_model(s, "n", model_n, 1);
  if (s) qs_close(s);
  if (!rc) rc = qs_open(&qd_srv.store, store_path, QS_OPEN_RDONLY);
  if (!rc) rc = qd_embed_init();
  if (rc) {
    fprintf(stderr, "request fuzzer: cannot build the store: %s: %s\n", qins_strerror(rc),
            qs_error());
    exit(1);
  }
  atexit(cleanup);
  verbose = getenv("QINS_FUZZ_VERBOSE") != NULL;
  /* Every log line is formatted (its code runs) and thrown away. */
  qd_log_open("/dev/null");
  qd_log_level = QD_LOG_DEBUG;
  return 0;
}

/* ---- checking the responses ------------------------------------------------------------------- */
static const msgpack_object *map_get(const msgpack_object *m, const char *key, int *last) {
  if (m->type != MSGPACK_OBJECT_MAP) return NULL;
  for (uint32_t i = 0; i < m->via.map.size; i++) {
    const msgpack_object *k = &m->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key) &&
        memcmp(k->via.str.ptr, key, k->via.str.size) == 0) {
      if (last) *last = i + 1 == m->via.map.size;
      return &m->via.map.ptr[i].val;
    }
  }
  return NULL;
}

static size_t dtype_size(const msgpack_object *d) {
  static const struct { const char *n; size_t sz; } t[] = {
    {"f32", 4}, {"f16", 2}, {"bf16", 2}, {"f64", 8}, {"i8", 1}, {"u8", 1}, {"i16", 2},
    {"u16", 2}, {"i32", 4}, {"u32", 4}, {"i64", 8}, {"u64", 8}, {"bool", 1}};
  if (!d || d->type != MSGPACK_OBJECT_STR) return 0;
  for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
    if (d->via.str.size == strlen(t[i].n) && !memcmp(d->via.str.ptr, t[i].n, d->via.str.size))
      return t[i].sz;
  return 0;
}

/* A map holding shape, dtype and data (get's result, get_many's items). */
static void check_payload(const msgpack_object *m) {
  int last = 0;
  const msgpack_object *data = map_get(m, "data", &last);
  if (!data) return;
  fz_check(last, "data is not the last key");
  fz_check(data->type == MSGPACK_OBJECT_BIN, "data is not a bin");
  const msgpack_object *shape = map_get(m, "shape", NULL);
  size_t es = dtype_size(map_get(m, "dtype", NULL));
  fz_check(shape && shape->type == MSGPACK_OBJECT_ARRAY && es, "data without shape or dtype");
  uint64_t n = 1;
  for (uint32_t i = 0; i < shape->via.array.size; i++) {
    fz_check(shape->via.array.ptr[i].type == MSGPACK_OBJECT_POSITIVE_INTEGER, "shape entry");
    n *= shape->via.array.ptr[i].via.u64;
  }
  fz_check(n * es == data->via.bin.size, "data holds %u bytes for %llu elements of %zu bytes",
           data->via.bin.size, (unsigned long long)n, es);
}

/* A map answer (map, map_many's items): an aligned extent inside the arena holding prod(shape)
 * values of its dtype. */
static void check_mapped(const msgpack_object *m) {
  const msgpack_object *lease = map_get(m, "lease", NULL);
  if (!lease) return;
  const msgpack_object *off = map_get(m, "offset", NULL), *len = map_get(m, "length", NULL);
  const msgpack_object *shape = map_get(m, "shape", NULL);
  size_t es = dtype_size(map_get(m, "dtype", NULL));
  fz_check(lease->type == MSGPACK_OBJECT_POSITIVE_INTEGER && off && len && shape && es &&
           off->type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
           len->type == MSGPACK_OBJECT_POSITIVE_INTEGER && shape->type == MSGPACK_OBJECT_ARRAY,
           "a map answer without lease, offset, length, shape or dtype");
  uint64_t n = 1;
  for (uint32_t i = 0; i < shape->via.array.size; i++) n *= shape->via.array.ptr[i].via.u64;
  fz_check(n * es == len->via.u64, "map length %llu for %llu elements",
           (unsigned long long)len->via.u64, (unsigned long long)n);
  fz_check(off->via.u64 % QD_ARENA_ALIGN == 0, "map offset %llu unaligned",
           (unsigned long long)off->via.u64);
  qd_arena *a = qd_map_arena();
  fz_check(a && off->via.u64 + len->via.u64 <= qd_arena_size(a), "map extent outside the arena");
}

static void check_response(const msgpack_object *o) {
  fz_check(o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size == 4, "not [1, msgid, err, res]");
  const msgpack_object *a = o->via.array.ptr;
  fz_check(a[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER && a[0].via.u64 == QP_RESPONSE, "tag");
  fz_check(a[1].type == MSGPACK_OBJECT_POSITIVE_INTEGER && a[1].via.u64 <= UINT32_MAX, "msgid");
  if (a[2].type != MSGPACK_OBJECT_NIL) {
    fz_check(a[3].type == MSGPACK_OBJECT_NIL, "an error response with a result");
    fz_check(a[2].type == MSGPACK_OBJECT_ARRAY && a[2].via.array.size == 2, "error shape");
    const msgpack_object *e = a[2].via.array.ptr;
    fz_check(e[0].type == MSGPACK_OBJECT_NEGATIVE_INTEGER && e[1].type == MSGPACK_OBJECT_STR,
             "error is not [code, message]");
    int64_t code = e[0].via.i64;
    int expected = code == QINS_EPROTO || code == QINS_ETOO_LARGE || code == QINS_EUNKNOWN_METHOD ||
                   code == QINS_EBAD_PARAMS || code == QINS_ENO_MODEL || code == QINS_ENO_TENSOR ||
                   code == QINS_EBAD_SLICE || code == QINS_ERESPONSE_TOO_LARGE ||
                   code == QINS_EDENIED || code == QINS_EDTYPE || code == QINS_EARENA_FULL ||
                   code == QINS_ENAME || /* a name that is not clean UTF-8 */
                   code == QINS_EUNSUPPORTED; /* model_info: an array left out at import */
    fz_check(expected, "unexpected error %lld (%s): %.*s", (long long)code,
             qins_err_name((int)code), (int)e[1].via.str.size, e[1].via.str.ptr);
    return;
  }
  const msgpack_object *r = &a[3];
  check_payload(r);
  check_mapped(r);
  const msgpack_object *maps = map_get(r, "maps", NULL);
  if (maps && maps->type == MSGPACK_OBJECT_ARRAY)
    for (uint32_t i = 0; i < maps->via.array.size; i++) check_mapped(&maps->via.array.ptr[i]);
  const msgpack_object *items = map_get(r, "tensors", NULL);
  if (items && items->type == MSGPACK_OBJECT_ARRAY)
    for (uint32_t i = 0; i < items->via.array.size; i++) check_payload(&items->via.array.ptr[i]);
}

typedef struct sink_state {
  msgpack_unpacker up; /* the server's output: trusted, parsed as it comes */
  msgpack_unpacked res;
  uint64_t responses;
} sink_state;

static void sink(void *ud, const void *p, size_t n) {
  sink_state *st = ud;
  if (!n) return;
  fz_check(msgpack_unpacker_reserve_buffer(&st->up, n), "out of memory");
  memcpy(msgpack_unpacker_buffer(&st->up), p, n);
  msgpack_unpacker_buffer_consumed(&st->up, n);
  msgpack_unpack_return r;
  while ((r = msgpack_unpacker_next(&st->up, &st->res)) == MSGPACK_UNPACK_SUCCESS) {
    if (verbose) { /* QINS_FUZZ_VERBOSE=1: each response, for looking into a crasher */
      msgpack_object_print(stderr, st->res.data);
      fputc('\n', stderr);
    }
    check_response(&st->res.data);
    st->responses++;
  }
  fz_check(r == MSGPACK_UNPACK_CONTINUE, "the server wrote bytes that are not msgpack");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t opt = (uint8_t)fz_take(&data, &size, 1);
  static const size_t pieces[4] = {0, 1, 7, 64};
  qd_srv.cfg.inline_decode_bytes = opt & 4 ? 0 : 256 * 1024;
  qd_srv.cfg.stream_min_bytes = opt & 8 ? 4096 : 0;
  qd_srv.cfg.stream_piece_bytes = 4096;
  qd_srv.cfg.max_request_bytes = opt & 16 ? 256 : 64 * 1024;
  qd_srv.cfg.max_pending = opt & 32 ? 1 : 64;
  sink_state st;
  fz_check(msgpack_unpacker_init(&st.up, 64 * 1024), "out of memory");
  msgpack_unpacked_init(&st.res);
  st.responses = 0;
  int rc = qd_serve_bytes(data, size, pieces[opt & 3], sink, &st);
  fz_check(rc == 0, "qd_serve_bytes: %s", qins_err_name(rc));
  fz_check(st.up.used == st.up.off, "the output ends inside a response"); /* nothing unparsed */
  msgpack_unpacked_destroy(&st.res);
  msgpack_unpacker_destroy(&st.up);
  fz_check(qd_srv.st.connections == 0, "%llu connections left open",
           (unsigned long long)qd_srv.st.connections);
  fz_check(qd_srv.st.queued_bytes == 0, "%llu bytes left queued or reserved",
           (unsigned long long)qd_srv.st.queued_bytes);
  if (qd_map_arena()) { /* the closed connection's leases are gone, and no decode is left */
    qd_arena_stats as;
    qd_arena_stats_get(qd_map_arena(), &as);
    fz_check(as.leases == 0 && as.leased == 0, "%llu leases (%llu bytes) left after the connection "
             "closed", (unsigned long long)as.leases, (unsigned long long)as.leased);
  }
  return 0;
}
