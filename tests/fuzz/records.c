/* SPDX-License-Identifier: MIT */
/*
 * records.c — fuzz target: decoding untrusted stored data, the checks qinsctl verify and every
 * read run before trusting a record (STYLE.md 15; docs/FORMAT.md §1.2, §1.1): serialized codec
 * parameters (qc_params_read), chunk validation (qc_chunk_validate) and decoding (qc_decode, each
 * SIMD kernel, the scalar reference).
 *
 * Input: byte 0 selects the mode.
 *   even: a params record. byte 1: codec; the rest: the serialized parameters.
 *   odd:  a chunk. byte 1: codec; byte 2: output dtype; bytes 3-4: row_len (1..1024); byte 5:
 *         n_rows (1..16); byte 6: parameters (qins8: standard table byte6 % 5, or, when bit 7 is
 *         set, qc_params_size bytes taken from the input; seed-log/seed-rational: always from the
 *         input); bytes 7-14: a decode range [begin, end) (two u32, reduced modulo n + 1);
 *         the rest: the chunk (qc_chunk_bytes bytes, zero-padded), in a buffer of exactly that
 *         size so an overread is caught.
 *
 * Oracles: a params record that reads back is written and read again to the same bytes; a chunk
 * qc_chunk_validate refuses gets QINS_ECORRUPT; one it accepts decodes with every kernel this CPU
 * has bit-identically to the reference (codec.h's promise), and a range decode equals the same
 * range of the whole decode; qc_chunk_locate stays inside the chunk.
 */
#include "codec.h"
#include "fuzz.h"
#include "qins.h"

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
  unsigned mode = (unsigned)fz_take(&data, &size, 1);
  if (mode & 1) fuzz_chunk(data, size);
  else fuzz_params(data, size);
  return 0;
}
