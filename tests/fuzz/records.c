/* SPDX-License-Identifier: MIT */
/*
 * records.c — fuzz target: decoding untrusted stored data, the checks qinsctl verify and every
 * read run before trusting a record (STYLE.md 15; docs/FORMAT.md §1, §2): the store's record
 * decoders (qs__tensor_rec_decode, qs__params_rec_decode, qs__chunk_rec_check: store_int.h),
 * serialized codec parameters (qc_params_read), chunk validation (qc_chunk_validate) and decoding
 * (qc_decode, each SIMD kernel, the scalar reference).
 *
 * Input: byte 0 % 3 selects the mode.
 *   0: a params blob. byte 1: codec; the rest: the serialized parameters.
 *   1: a chunk. byte 1: codec; byte 2: output dtype; bytes 3-4: row_len (1..1024); byte 5: n_rows
 *      (1..16); byte 6: parameters (qins8: standard table byte6 % 5, or, when bit 7 is set,
 *      qc_params_size bytes taken from the input; seed-log/seed-rational: always from the input);
 *      bytes 7-14: a decode range [begin, end) (two u32, reduced modulo n + 1); the rest: the chunk
 *      (qc_chunk_bytes bytes, zero-padded), in a buffer of exactly that size.
 *   2: stored records, as the store reads them for a get or verify. byte 1: bit 0 set = fix up the
 *      checksums (tensor record CRC, params blob CRC, chunk CRC) so the fuzzer reaches what follows them; u16 LT, LT
 *      bytes of tensor record; u16 LP, LP bytes of params record (read when the tensor names
 *      one); one byte: chunk index (mod n_chunks); the rest: the chunk record.
 * Every piece is copied into a buffer of exactly its size, so an overread is caught.
 *
 * Oracles: a tensor record the decoders accept is consistent (shape, counts, rows) and a chunk
 * record they accept decodes whole within its bytes; refusals are ECORRUPT, EVERSION or
 * ECHECKSUM. A params blob that reads back is written and read again to the same bytes; a chunk
 * qc_chunk_validate refuses gets QINS_ECORRUPT; one it accepts decodes with every kernel this CPU
 * has bit-identically to the reference (codec.h's promise), and a range decode equals the same
 * range of the whole decode; qc_chunk_locate stays inside the chunk.
 */
#include "codec.h"
#include "fuzz.h"
#include "qins.h"
#include "store_int.h"

/* A copy of the next n input bytes (fewer if the input ends) in a buffer of exactly that size,
 * so an overread is caught; *got is the count. */
static uint8_t *take_copy(const uint8_t **data, size_t *size, size_t n, size_t *got) {
  if (n > *size) n = *size;
  uint8_t *p = malloc(n ? n : 1);
  fz_check(p, "out of memory");
  memcpy(p, *data, n);
  *data += n;
  *size -= n;
  *got = n;
  return p;
}

static void fuzz_store_records(const uint8_t *data, size_t size) {
  int fix = (int)fz_take(&data, &size, 1) & 1;
  size_t lt, lp, lc;
  uint8_t *trec = take_copy(&data, &size, (size_t)fz_take(&data, &size, 2), &lt);
  uint8_t *prec = take_copy(&data, &size, (size_t)fz_take(&data, &size, 2), &lp);
  uint64_t ci = fz_take(&data, &size, 1);
  uint8_t *crec = take_copy(&data, &size, size, &lc);
  qs_tensor t;
  qs__trec r;
  /* fix: valid checksums (the record's own, the params blob's), so mutations reach the checks
   * behind them; otherwise the checksum is fuzzed as it comes. */
  if (fix && lt > QS_TENSOR_CRC + 4 && qs__get_u32(trec + QS_TENSOR_CRC))
    qs__put_u32(trec + QS_TENSOR_CRC, qs__rec_crc(trec, lt, QS_TENSOR_CRC));
  int rc = qs__tensor_rec_decode("fuzz", "m", trec, lt, &t, &r);
  if (getenv("QINS_FUZZ_VERBOSE")) /* which stage an input reaches, for looking into one */
    fprintf(stderr, "tensor record: %s\n", rc ? qs_error() : "ok");
  if (rc) {
    fz_check(rc == QINS_ECORRUPT || rc == QINS_EVERSION || rc == QINS_ECHECKSUM,
             "tensor record: %d", rc);
    goto out;
  }
  /* What the readers rely on from here on (record.c). */
  uint64_t n = 1;
  for (int d = 0; d < t.ndim; d++) n *= t.shape[d];
  fz_check(t.ndim <= QS_MAX_NDIM && n == t.n_elem && t.row_len * t.n_rows == t.n_elem,
           "an inconsistent tensor record was accepted");
  if (r.params_id) {
    if (fix && lp >= QS_PARAMS_HDR)
      qs__put_u32(prec + 20, qs__crc32c(0, prec + QS_PARAMS_HDR, lp - QS_PARAMS_HDR));
    rc = qs__params_rec_decode("fuzz", &r, prec, lp, &t);
    if (getenv("QINS_FUZZ_VERBOSE")) fprintf(stderr, "params record: %s\n", rc ? qs_error() : "ok");
    if (rc) {
      fz_check(rc == QINS_ECORRUPT, "params record: %d", rc);
      goto out;
    }
  }
  if (t.n_chunks == 0) goto out;
  ci %= t.n_chunks;
  if (fix && lc >= QS_CHUNK_HDR)
    qs__put_u32(crec + 4, qs__crc32c(0, crec + QS_CHUNK_HDR, lc - QS_CHUNK_HDR));
  uint64_t rows;
  rc = qs__chunk_rec_check(&t, ci, crec, lc, 1, &rows);
  if (getenv("QINS_FUZZ_VERBOSE")) fprintf(stderr, "chunk record: %s\n", rc ? qs_error() : "ok");
  if (rc) {
    fz_check(rc == QINS_ECORRUPT || rc == QINS_ECHECKSUM, "chunk record: %d", rc);
    goto out;
  }
  /* An accepted chunk decodes whole, as a get or verify would (raw chunks are copied as is). */
  fz_check(rows <= t.n_rows && rows * t.row_len <= t.n_elem, "chunk rows");
  uint64_t ne = rows * t.row_len;
  if (t.codec != QS_RAW && ne) {
    float *out = malloc(ne * sizeof *out);
    fz_check(out, "out of memory");
    fz_check(qc_decode(&t.params, t.row_len, rows, crec + QS_CHUNK_HDR, 0, ne, QC_DT_F32, out) == 0,
             "decode of a validated chunk failed");
    free(out);
  }
out:
  free(crec);
  free(prec);
  free(trec);
}

static void fuzz_params(const uint8_t *data, size_t size) {
  qc_codec c = (qc_codec)(fz_take(&data, &size, 1) % QC_CODEC_COUNT);
  uint8_t *in = malloc(size ? size : 1); /* exact size: overreads are caught */
  fz_check(in, "out of memory");
  memcpy(in, data, size);
  qc_params p;
  int rc = qc_params_read(c, in, size, &p);
  free(in);
  if (rc) {
    fz_check(rc == QINS_ECORRUPT || rc == QINS_EVERSION, "qc_params_read: %d", rc);
    return;
  }
  size_t n = qc_params_size(c);
  fz_check(n == size && p.codec == c, "accepted %zu bytes for a %zu-byte record", size, n);
  uint8_t a[QC_PARAMS_MAX], b[QC_PARAMS_MAX];
  qc_params_write(&p, a);
  qc_params q;
  fz_check(qc_params_read(c, a, n, &q) == 0, "a written record does not read back");
  qc_params_write(&q, b);
  fz_check(memcmp(a, b, n) == 0, "params do not round-trip");
}

static void fuzz_chunk(const uint8_t *data, size_t size) {
  qc_codec c = (qc_codec)(fz_take(&data, &size, 1) % QC_CODEC_COUNT);
  qc_dtype dt = (qc_dtype)(fz_take(&data, &size, 1) % QC_DT_COUNT);
  uint64_t row_len = fz_take(&data, &size, 2) % 1024 + 1;
  uint64_t n_rows = fz_take(&data, &size, 1) % 16 + 1;
  unsigned psel = (unsigned)fz_take(&data, &size, 1);
  uint64_t r0 = fz_take(&data, &size, 4), r1 = fz_take(&data, &size, 4);
  qc_params p;
  memset(&p, 0, sizeof p);
  p.codec = c;
  size_t ps = qc_params_size(c);
  if (c == QC_QINS8 && !(psel & 0x80)) {
    fz_check(qc_params_std_qins8((int)(psel % QC_QINS8_STD_COUNT), &p) == 0, "standard table");
  } else if (ps) {
    if (size < ps) return;
    if (qc_params_read(c, data, ps, &p)) return; /* the store refuses it before any chunk */
    data += ps;
    size -= ps;
  }
  int ovf;
  uint64_t cb = qc_chunk_bytes(c, row_len, n_rows, &ovf);
  fz_check(!ovf && cb > 0, "chunk size");
  uint8_t *chunk = malloc(cb);
  fz_check(chunk, "out of memory");
  memset(chunk, 0, cb);
  memcpy(chunk, data, size < cb ? size : cb);
  int rc = qc_chunk_validate(&p, row_len, n_rows, chunk);
  if (rc) {
    fz_check(rc == QINS_ECORRUPT, "qc_chunk_validate: %d", rc);
    free(chunk);
    return;
  }
  uint64_t n = row_len * n_rows;
  size_t es = qc_dtype_size(dt);
  uint8_t *ref = malloc(n * es), *out = malloc(n * es);
  fz_check(ref && out, "out of memory");
  fz_check(qc_decode_ref(&p, row_len, n_rows, chunk, 0, n, dt, ref) == 0, "reference decode");
  static const char *const kernels[] = {"avx2", "avx512"};
  for (int k = 0; k < 2; k++) {
    if (!qc_kernel_available(kernels[k])) continue;
    fz_check(qc_decode_with(kernels[k], &p, row_len, n_rows, chunk, 0, n, dt, out) == 0, "decode");
    fz_check(memcmp(ref, out, n * es) == 0, "%s differs from the reference (%s, %s)", kernels[k],
             qc_codec_name(c), qc_dtype_name(dt));
  }
  uint64_t b = r0 % (n + 1), e = r1 % (n + 1);
  if (b > e) {
    uint64_t t = b;
    b = e;
    e = t;
  }
  uint8_t *part = malloc((e - b) * es + 1);
  fz_check(part, "out of memory");
  fz_check(qc_decode(&p, row_len, n_rows, chunk, b, e, dt, part) == 0, "range decode");
  fz_check(memcmp(part, ref + b * es, (e - b) * es) == 0, "range [%llu, %llu) differs",
           (unsigned long long)b, (unsigned long long)e);
  fz_check(qc_decode_ref(&p, row_len, n_rows, chunk, b, e, dt, part) == 0, "range decode (ref)");
  fz_check(memcmp(part, ref + b * es, (e - b) * es) == 0, "ref range differs");
  uint64_t so, co;
  if (b < n) {
    fz_check(qc_chunk_locate(c, row_len, n_rows, b, &so, &co) == 0 && so < cb && co < cb,
             "qc_chunk_locate(%llu) outside the chunk", (unsigned long long)b);
  }
  fz_check(qc_chunk_locate(c, row_len, n_rows, n, &so, &co) == QINS_EINVALID, "locate past end");
  free(part);
  free(out);
  free(ref);
  free(chunk);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  unsigned mode = (unsigned)fz_take(&data, &size, 1) % 3;
  if (mode == 1) fuzz_chunk(data, size);
  else if (mode == 2) fuzz_store_records(data, size);
  else fuzz_params(data, size);
  return 0;
}
