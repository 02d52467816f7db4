/* SPDX-License-Identifier: MIT */
/*
 * codec.c — the QINS codecs' driver (codec.h): names and sizes, params serialization, the
 * standard qins8 tables, fitting (streaming, bounded memory), encoding, chunk validation, and the
 * decode dispatcher that cuts a range into block segments for the kernel picked at startup.
 * Normative rules: ../shared/docs/QINS.md; byte layouts: docs/FORMAT.md §1.
 *
 * qins8 encoding. The quantizer gives each weight the code whose *decoded* value fl(d * T[m]) is
 * nearest to |w| (midpoints compared in double, exact; a tie goes to the smaller magnitude, i.e.
 * the larger m). Working on decoded values rather than on x = |w|/d makes re-encoding a decoded
 * tensor return the same codes, bit for bit, even where table entries are an ulp apart. A
 * 2048-entry index over x gives the starting m; at most a step or two corrects it.
 *   Default effort: qc_fit_add builds a histogram of x = |w|/fp16(absmax) over 4096 bins uniform
 *   in sqrt(x) (fine where companded tables are dense), each bin holding sum d^2, sum d^2 x,
 *   sum d^2 x^2, so that the squared error of any table is a 4096-step sum. qc_fit_finish scores
 *   the standard tables on it and keeps the best; tensors with >= table_min_elems elements then
 *   get 20 Lloyd iterations on the histogram. qc_encode tries fp16(absmax) +-2 ulps per block.
 *   Effort max: QINS.md's reference encoder (A1, A2, A3u) on the buffered tensor, and +-8 ulps.
 *
 * Invariants: every standard table is computed once, deterministically (double arithmetic
 * rounded once to float), so its serialized bytes are identical for every tensor that uses it;
 * qins8 tables always satisfy T[0] = 1, T[127] = 0, non-increasing, finite; encoders never
 * write qins8 0xFF or qins16 0xFFFF; sizes are 64-bit and overflow-checked.
 */
#include <math.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <stdlib.h>

#include "codec_int.h"
#include "qins_base.h"

/* ---- names, sizes ----------------------------------------------------------------------- */

const qc_traits qc_traits_table[QC_CODEC_COUNT] = {
    /* name           block            scale code lossy bits/weight */
    {"f32", 0, 0, 4, 0, 32},
    {"f16", 0, 0, 2, 0, 16},
    {"bf16", 0, 0, 2, 0, 16},
    {"qins8", QC_QINS8_BLOCK, 2, 1, 1, 8.5},
    {"qins16", QC_QINS16_BLOCK, 1, 2, 1, 16.125},
    {"seed-log", 0, 0, 2, 1, 16},
    {"seed-rational", 0, 0, 1, 1, 8},
    /* qinsx: a 3-bit code + one raw byte on bf16 values without escapes; the real figure
     * depends on the data (about 11.2 on trained weights): qc_chunk_size. */
    {"qinsx", 0, 0, 0, 0, 11},
};
static const char *const qc_dt_names[QC_DT_COUNT] = {"f32", "f16", "bf16"};

const char *qc_codec_name(qc_codec c) {
  return (unsigned)c < QC_CODEC_COUNT ? qc_traits_table[c].name : "?";
}
int qc_codec_from_name(const char *name) {
  for (int i = 0; name && i < QC_CODEC_COUNT; i++)
    if (!strcmp(name, qc_traits_table[i].name)) return i;
  return -1;
}
const char *qc_dtype_name(qc_dtype d) { return (unsigned)d < QC_DT_COUNT ? qc_dt_names[d] : "?"; }
__attribute__((hot))
int qc_dtype_from_name(const char *name) {
  for (int i = 0; name && i < QC_DT_COUNT; i++)
    if (!strcmp(name, qc_dt_names[i])) return i;
  return -1;
}
__attribute__((hot))
size_t qc_dtype_size(qc_dtype d) { return d == QC_DT_F32 ? 4 : (unsigned)d < QC_DT_COUNT ? 2 : 0; }
int qc_codec_is_lossy(qc_codec c) { return (unsigned)c < QC_CODEC_COUNT && qc_traits_table[c].lossy; }
uint32_t qc_codec_block(qc_codec c) {
  return (unsigned)c < QC_CODEC_COUNT ? qc_traits_table[c].block : 0;
}

double qc_stats_snr_db(const qc_stats *s) {
  if (s->err_sq == 0) return INFINITY;
  return 10.0 * log10(s->sum_sq / s->err_sq);
}

/* a * b + c with overflow check. */
static int mul_add(uint64_t a, uint64_t b, uint64_t c, uint64_t *r) {
  uint64_t m;
  if (__builtin_mul_overflow(a, b, &m) || __builtin_add_overflow(m, c, r)) return -1;
  return 0;
}

/* Bytes per element of the codes array, and per block of the scales array. */
static unsigned code_bytes(qc_codec c) { return qc_traits_table[c].code_bytes; }

__attribute__((hot))
uint64_t qc_chunk_bytes(qc_codec c, uint64_t row_len, uint64_t n_rows, int *overflow) {
  uint64_t n, nb = 0, r;
  if (overflow) *overflow = 0;
  if ((unsigned)c >= QC_CODEC_COUNT || __builtin_mul_overflow(row_len, n_rows, &n)) goto ovf;
  if (c == QC_QINSX) {
    int o = 0;
    r = qc__qx_bound(n, &o);
    if (o) goto ovf;
    return r;
  }
  uint32_t B = qc_codec_block(c);
  if (B) nb = qc__blocks_per_row(row_len, B) * n_rows; /* <= n: cannot overflow */
  if (mul_add(n, code_bytes(c), nb * qc_traits_table[c].scale_bytes, &r)) goto ovf;
  return r;
ovf:
  if (overflow) *overflow = 1;
  return 0;
}

int qc_codec_varsize(qc_codec c) { return c == QC_QINSX; }

int qc_chunk_size(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
                  uint64_t avail, uint64_t *size) {
  int ovf;
  if (!p || (unsigned)p->codec >= QC_CODEC_COUNT) return QINS_EINVALID;
  uint64_t b = qc_chunk_bytes(p->codec, row_len, n_rows, &ovf);
  if (ovf) return QINS_EINVALID;
  if (p->codec == QC_QINSX) return qc__qx_size(row_len * n_rows, chunk, avail, size);
  if (avail < b) return QINS_ECORRUPT;
  *size = b;
  return 0;
}

int qc_chunk_locate(qc_codec c, uint64_t row_len, uint64_t n_rows, uint64_t elem,
                    uint64_t *scale_off, uint64_t *code_off) {
  int ovf;
  if (qc_chunk_bytes(c, row_len, n_rows, &ovf) == 0 && ovf) return QINS_EINVALID;
  if (elem >= row_len * n_rows) return QINS_EINVALID;
  uint32_t B = qc_codec_block(c);
  uint64_t n = row_len * n_rows;
  if (B) {
    uint64_t bpr = qc__blocks_per_row(row_len, B), nb = bpr * n_rows;
    uint64_t blk = (elem / row_len) * bpr + (elem % row_len) / B;
    unsigned sb = c == QC_QINS8 ? 2 : 1;
    *scale_off = blk * sb;
    *code_off = nb * sb + elem * code_bytes(c);
  } else if (c == QC_SEED_LOG) {
    *scale_off = elem;    /* sign byte */
    *code_off = n + elem; /* stored byte */
  } else if (c == QC_QINSX) { /* the header: where the rest lies depends on the data */
    *scale_off = 0;
    *code_off = 0;
  } else {
    *scale_off = 0;
    *code_off = elem * code_bytes(c);
  }
  return 0;
}

/* ---- standard qins8 tables -------------------------------------------------------------- */

/* QINS.md's rational family: T[m] = (1 - u)/(1 + alpha*u), u = m/127, in double, rounded once. */
static void table_rat(double alpha, float T[128]) {
  for (int m = 0; m < 128; m++) {
    double u = m / 127.0;
    T[m] = (float)((1 - u) / (1 + alpha * u));
  }
  T[0] = 1.0f, T[127] = 0.0f;
}
/* QINS.md's log family: T[m] = exp(-K*u) for m < 127, T[127] = 0. */
static void table_log(double K, float T[128]) {
  for (int m = 0; m < 127; m++) T[m] = (float)exp(-K * (m / 127.0));
  T[0] = 1.0f, T[127] = 0.0f;
}
/* The 18 candidates of QINS.md's step A1, in its order. */
static void table_a1(int i, float T[128]) {
  static const double alphas[10] = {0, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32};
  if (i < 10) table_rat(alphas[i], T);
  else table_log(3 + (i - 10), T);
}
#define QC_A1_COUNT 18

/* The standard tables: which A1 candidates: rat(0), rat(0.5), rat(1), rat(2), rat(4). On
 * stories260K, picking the best of the 18 A1 tables per tensor gains nothing over the best of
 * rat(0.5) and rat(1) (46.47 dB both, with the scale search); the other three serve uniform-like
 * and heavy-tailed tensors (see choose_std). */
static const int qc_std_a1[QC_QINS8_STD_COUNT] = {0, 3, 4, 5, 6};
static int qc_std_primary(int id) { return id == 1 || id == 2; }
#define QC_STD_SECONDARY_GAIN 0.97 /* 3% less squared error, 0.13 dB: worth one more table */
static float qc_std[QC_QINS8_STD_COUNT][128];
static float qc_a1[QC_A1_COUNT][128];
static pthread_once_t qc_tables_once = PTHREAD_ONCE_INIT;
static int cpu_has(const char *k);
static int qc_enc_avx2; /* the AVX2 qins8 error estimator is usable (set by tables_init) */
static void tables_init(void) {
  const char *env = getenv("QINS_CODEC"); /* "ref" also forces the scalar encoder estimator */
  qc_enc_avx2 = cpu_has("avx2") && !(env && !strcmp(env, "ref"));
  for (int i = 0; i < QC_A1_COUNT; i++) table_a1(i, qc_a1[i]);
  for (int i = 0; i < QC_QINS8_STD_COUNT; i++) memcpy(qc_std[i], qc_a1[qc_std_a1[i]], 512);
}

int qc_params_std_qins8(int id, qc_params *p) {
  if (id < 0 || id >= QC_QINS8_STD_COUNT) return QINS_EINVALID;
  pthread_once(&qc_tables_once, tables_init);
  memset(p, 0, sizeof *p);
  p->codec = QC_QINS8;
  memcpy(p->table, qc_std[id], sizeof p->table);
  p->table_id = id;
  return 0;
}

static int table_valid(const float T[128]) {
  if (T[0] != 1.0f || T[127] != 0.0f) return 0;
  for (int m = 1; m < 128; m++)
    if (!(T[m] <= T[m - 1]) || !(T[m] >= 0.0f)) return 0; /* also rejects NaN */
  return 1;
}

/* ---- params serialization (docs/FORMAT.md §1.2) ----------------------------------------- */

size_t qc_params_size(qc_codec c) {
  switch (c) {
  case QC_QINS8: return 4 + 4 * QC_QINS8_LEVELS;
  case QC_SEED_LOG: return 4 + 8;
  case QC_SEED_RATIONAL: return 4 + 4;
  default: return 4;
  }
}

void qc_params_write(const qc_params *p, uint8_t *out) {
  out[0] = (uint8_t)p->codec, out[1] = QC_PARAMS_VERSION, out[2] = 0, out[3] = 0;
  if (p->codec == QC_QINS8)
    for (int m = 0; m < QC_QINS8_LEVELS; m++) qc__stf(out + 4 + 4 * m, p->table[m]);
  else if (p->codec == QC_SEED_LOG) qc__stf(out + 4, p->log_min), qc__stf(out + 8, p->log_max);
  else if (p->codec == QC_SEED_RATIONAL) qc__stf(out + 4, p->alpha);
}

int qc_params_read(qc_codec c, const uint8_t *in, size_t len, qc_params *out) {
  if ((unsigned)c >= QC_CODEC_COUNT || len < 4 || in[0] != (uint8_t)c) return QINS_ECORRUPT;
  if (in[1] > QC_PARAMS_VERSION) return QINS_EVERSION;
  if (in[1] != QC_PARAMS_VERSION || in[2] || in[3] || len != qc_params_size(c))
    return QINS_ECORRUPT;
  memset(out, 0, sizeof *out);
  out->codec = c;
  out->table_id = -1;
  if (c == QC_QINS8) {
    for (int m = 0; m < QC_QINS8_LEVELS; m++) out->table[m] = qc__ldf(in + 4 + 4 * m);
    if (!table_valid(out->table)) return QINS_ECORRUPT;
    pthread_once(&qc_tables_once, tables_init);
    for (int i = 0; i < QC_QINS8_STD_COUNT; i++)
      if (!memcmp(out->table, qc_std[i], sizeof out->table)) out->table_id = i;
  } else if (c == QC_SEED_LOG) {
    out->log_min = qc__ldf(in + 4), out->log_max = qc__ldf(in + 8);
    if (!isfinite(out->log_min) || !isfinite(out->log_max) || out->log_min > out->log_max)
      return QINS_ECORRUPT;
  } else if (c == QC_SEED_RATIONAL) {
    out->alpha = qc__ldf(in + 4);
    if (!isfinite(out->alpha) || !(out->alpha > 0)) return QINS_ECORRUPT;
  }
  return 0;
}

/* ---- kernel choice and the decode dispatcher -------------------------------------------- */

static const qc__kernel *qc_kern = &qc__kernel_ref;
static pthread_once_t qc_kern_once = PTHREAD_ONCE_INIT;

#if defined(__x86_64__) || defined(__i386__)
/* F16C from CPUID leaf 1 (ECX bit 29): clang before 16 has no __builtin_cpu_supports("f16c"), and
 * the fuzz build (make fuzz) uses Debian 12's clang 14. */
static int cpu_f16c(void) {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

static int cpu_has(const char *k) {
  if (!strcmp(k, "ref")) return 1;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!strcmp(k, "avx2"))
    return __builtin_cpu_supports("avx2") && cpu_f16c() && __builtin_cpu_supports("fma");
  if (!strcmp(k, "avx512"))
    return cpu_has("avx2") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vbmi");
  if (!strcmp(k, "vbmi2")) return cpu_has("avx512") && __builtin_cpu_supports("avx512vbmi2");
#endif
  return 0;
}
static const qc__kernel *kernel_by_name(const char *k) {
  if (!strcmp(k, "vbmi2") || !cpu_has(k)) return NULL;
  if (!strcmp(k, "ref")) return &qc__kernel_ref;
  if (!strcmp(k, "avx2")) return &qc__kernel_avx2;
  if (!strcmp(k, "avx512")) return &qc__kernel_avx512;
  return NULL;
}
static int qc_vbmi2; /* AVX-512 VBMI2 (vpexpandb) for the qinsx kernel: set by kern_init */
static void kern_init(void) {
  qc_vbmi2 = cpu_has("vbmi2");
  const char *env = getenv("QINS_CODEC");
  const qc__kernel *k = env && *env ? kernel_by_name(env) : NULL;
  if (!k) k = kernel_by_name("avx512");
  if (!k) k = kernel_by_name("avx2");
  qc_kern = k ? k : &qc__kernel_ref;
}
static const qc__kernel *kern(void) {
  pthread_once(&qc_kern_once, kern_init);
  return qc_kern;
}
const char *qc_kernel_name(void) { return kern()->name; }
int qc_kernel_available(const char *kernel) { return kernel_by_name(kernel) != NULL; }

void qc_to_f32(qc_dtype src_dt, const void *src, uint64_t n, float *dst) {
  if (!n) return; /* an empty tensor's buffers may be NULL */
  if (src_dt == QC_DT_F32) memmove(dst, src, n * 4);
  else if (src_dt == QC_DT_F16) kern()->f16_to_f32(src, n, dst);
  else kern()->bf16_to_f32(src, n, dst);
}
void qc_from_f32(qc_dtype dt, const float *src, uint64_t n, void *dst) {
  if (!n) return;
  if (dt == QC_DT_F32) memmove(dst, src, n * 4);
  else if (dt == QC_DT_F16) kern()->f32_to_f16(src, n, dst);
  else kern()->f32_to_bf16(src, n, dst);
}

__attribute__((hot))
int qc__check_decode(const qc_params *p, uint64_t row_len, uint64_t n_rows, uint64_t begin,
                     uint64_t end, qc_dtype dt) {
  int ovf;
  if (!p || (unsigned)p->codec >= QC_CODEC_COUNT || (unsigned)dt >= QC_DT_COUNT)
    return QINS_EINVALID;
  qc_chunk_bytes(p->codec, row_len, n_rows, &ovf);
  if (ovf || begin > end || end > row_len * n_rows) return QINS_EINVALID;
  return 0;
}

#define QC_NT_MIN (4u << 20) /* f32 outputs this large use non-temporal stores (see codec.h) */
#define QC_TILE 1024         /* elements decoded per f32 tile when the output is f16/bf16 */

/* Per-call state of a decode: the kernel, the per-code table, the chunk's arrays. */
typedef struct dec {
  const qc__kernel *k;
  const qc_params *p;
  uint64_t row_len, bpr, n; /* elements per row, blocks per row, elements in chunk */
  const uint8_t *scales, *codes;
  const float *lut;  /* the per-code table: buf, or qins8's per-thread copy */
  float buf[256];
} dec;

/* qins8's 256-entry table for the last params table this thread decoded with: rebuilding it on
 * every call cost more than decoding a short range (a 64-element row of a column slice: 35% of
 * its time). Keyed by the table's bits, so any params are served exactly; 2.5 KB per thread. */
static _Thread_local struct {
  float T[QC_QINS8_LEVELS]; /* the table lut was built from */
  float lut[256];
  int ok;
} q8_lut;

static const float *qins8_lut(const qc_params *p) {
  if (!q8_lut.ok || memcmp(q8_lut.T, p->table, sizeof q8_lut.T)) {
    memcpy(q8_lut.T, p->table, sizeof q8_lut.T);
    qc__qins8_lut(p, q8_lut.lut);
    q8_lut.ok = 1;
  }
  return q8_lut.lut;
}

/* Decodes [begin, end) as f32 into out: cut into segments of equal-size blocks. */
static void dec_f32(const dec *D, uint64_t begin, uint64_t end, uint8_t *out, int nt) {
  const qc__kernel *k = D->k;
  qc_codec c = D->p->codec;
  if (c == QC_SEED_LOG) {
    k->seedlog(D->lut, (const int8_t *)D->scales + begin, D->codes + begin, end - begin, out, nt);
    return;
  }
  if (c == QC_SEED_RATIONAL) {
    k->lut8(D->lut, D->codes + begin, end - begin, out, nt);
    return;
  }
  uint32_t B = qc_codec_block(c);
  uint64_t L = D->row_len;
  while (begin < end) {
    uint64_t r = begin / L, col = begin % L;
    /* Rows that are whole blocks chain into one segment. */
    uint64_t seg_end = L % B == 0 ? end : (r + 1) * L < end ? (r + 1) * L : end;
    uint64_t blk = r * D->bpr + col / B, off = col % B, n = seg_end - begin;
    if (c == QC_QINS8)
      k->qins8(D->lut, D->scales + 2 * blk, D->codes + begin, off, n, out, nt);
    else
      k->qins16((const int8_t *)D->scales + blk, D->codes + 2 * begin, off, n, out, nt);
    out += 4 * n;
    begin = seg_end;
  }
}

/* Values of dtype sdt at `base` (elements [begin, end)) as dtype dt: the passthrough codecs and
 * qinsx's raw variants. */
__attribute__((hot))
static void decode_plain(const qc__kernel *k, qc_dtype sdt, const uint8_t *base, uint64_t begin,
                         uint64_t end, qc_dtype dt, void *out) {
  {
    unsigned es = (unsigned)qc_dtype_size(sdt);
    const uint8_t *src = base + es * begin;
    uint64_t cnt = end - begin;
    if (sdt == dt) memcpy(out, src, cnt * es);
    else if (dt == QC_DT_F32) (sdt == QC_DT_F16 ? k->f16_to_f32 : k->bf16_to_f32)(src, cnt, out);
    else if (sdt == QC_DT_F32) (dt == QC_DT_F16 ? k->f32_to_f16 : k->f32_to_bf16)(src, cnt, out);
    else { /* f16 <-> bf16 through f32 tiles */
      float tile[QC_TILE];
      for (uint64_t i = 0; i < cnt; i += QC_TILE) {
        uint64_t t = cnt - i < QC_TILE ? cnt - i : QC_TILE;
        (sdt == QC_DT_F16 ? k->f16_to_f32 : k->bf16_to_f32)(src + 2 * i, t, tile);
        (dt == QC_DT_F16 ? k->f32_to_f16 : k->f32_to_bf16)(tile, t, (uint8_t *)out + 2 * i);
      }
    }
  }
}

/* qinsx (docs/FORMAT.md §1.5): raw variants as passthrough; coded ones through the kernel, which
 * writes f32 (or, for the bf16 variant, the stored bf16 bits); other dtypes via f32 tiles. */
static void decode_qinsx(const qc__kernel *k, const uint8_t *c, uint64_t n, uint64_t begin,
                         uint64_t end, qc_dtype dt, void *out) {
  int v = c[0];
  if (v == QC_QX_F16_RAW || v == QC_QX_BF16_RAW || v == QC_QX_F32_RAW) {
    qc_dtype sdt = v == QC_QX_F16_RAW ? QC_DT_F16 : v == QC_QX_BF16_RAW ? QC_DT_BF16 : QC_DT_F32;
    decode_plain(k, sdt, c + QC_QX_HDR, begin, end, dt, out);
    return;
  }
  uint64_t (*kq)(const qc__qx *, uint64_t, uint64_t, uint64_t, void *, int, int) = k->qinsx;
  if (k == &qc__kernel_avx512 && !qc_vbmi2) kq = qc__avx2_qinsx; /* no vpexpandb */
  qc__qx x;
  qc__qx_view(c, n, &x);
  uint64_t ei = qc__qx_esc_before(c, &x, begin);
  if (dt == QC_DT_F32 || (dt == QC_DT_BF16 && v == QC_QX_BF16)) {
    kq(&x, begin, end - begin, ei, out, dt == QC_DT_BF16, (end - begin) * 4 >= QC_NT_MIN);
    return;
  }
  float tile[QC_TILE];
  void (*conv)(const void *, uint64_t, void *) = dt == QC_DT_F16 ? k->f32_to_f16 : k->f32_to_bf16;
  for (uint64_t i = begin; i < end; i += QC_TILE) {
    uint64_t t = end - i < QC_TILE ? end - i : QC_TILE;
    ei = kq(&x, i, t, ei, tile, 0, 0);
    conv(tile, t, (uint8_t *)out + 2 * (i - begin));
  }
}

__attribute__((hot))
static int decode_with(const qc__kernel *k, const qc_params *p, uint64_t row_len, uint64_t n_rows,
                       const void *chunk, uint64_t begin, uint64_t end, qc_dtype dt, void *out) {
  int rc = qc__check_decode(p, row_len, n_rows, begin, end, dt);
  if (rc || begin == end) return rc;
  const uint8_t *c = chunk;
  uint64_t n = row_len * n_rows;
  if (p->codec <= QC_BF16) { /* passthrough: QC_F32/F16/BF16 share values with qc_dtype */
    decode_plain(k, (qc_dtype)p->codec, c, begin, end, dt, out);
    return 0;
  }
  if (p->codec == QC_QINSX) {
    decode_qinsx(k, c, n, begin, end, dt, out);
    return 0;
  }
  dec D;
  D.k = k, D.p = p, D.row_len = row_len, D.n = n, D.lut = D.buf;
  uint32_t B = qc_codec_block(p->codec);
  D.bpr = B ? qc__blocks_per_row(row_len, B) : 0;
  uint64_t nb = D.bpr * n_rows;
  switch (p->codec) {
  case QC_QINS8:
    D.scales = c, D.codes = c + 2 * nb;
    D.lut = qins8_lut(p);
    break;
  case QC_QINS16: D.scales = c, D.codes = c + nb; break;
  case QC_SEED_LOG:
    D.scales = c, D.codes = c + n;
    if (end - begin >= 256) qc__seedlog_lut(p, D.buf);
    else k = D.k = &qc__kernel_ref; /* fewer expf calls than a table; same values */
    break;
  default:
    D.scales = NULL, D.codes = c;
    qc__seedrat_lut(p, D.buf);
    break;
  }
  if (k == &qc__kernel_ref && p->codec == QC_SEED_LOG && end - begin < 256)
    return qc_decode_ref(p, row_len, n_rows, chunk, begin, end, dt, out);
  if (dt == QC_DT_F32) {
    dec_f32(&D, begin, end, out, (end - begin) * 4 >= QC_NT_MIN);
    return 0;
  }
  float tile[QC_TILE];
  void (*conv)(const void *, uint64_t, void *) = dt == QC_DT_F16 ? k->f32_to_f16 : k->f32_to_bf16;
  for (uint64_t i = begin; i < end; i += QC_TILE) {
    uint64_t t = end - i < QC_TILE ? end - i : QC_TILE;
    dec_f32(&D, i, i + t, (uint8_t *)tile, 0);
    conv(tile, t, (uint8_t *)out + 2 * (i - begin));
  }
  return 0;
}

__attribute__((hot))
int qc_decode(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk,
              uint64_t begin, uint64_t end, qc_dtype dt, void *out) {
  const qc__kernel *k = kern();
  if (k == &qc__kernel_ref) return qc_decode_ref(p, row_len, n_rows, chunk, begin, end, dt, out);
  return decode_with(k, p, row_len, n_rows, chunk, begin, end, dt, out);
}

int qc_decode_with(const char *kernel, const qc_params *p, uint64_t row_len, uint64_t n_rows,
                   const void *chunk, uint64_t begin, uint64_t end, qc_dtype dt, void *out) {
  pthread_once(&qc_kern_once, kern_init);
  const qc__kernel *k = kernel ? kernel_by_name(kernel) : NULL;
  if (!k) return QINS_EUNSUPPORTED;
  return decode_with(k, p, row_len, n_rows, chunk, begin, end, dt, out);
}

/* ---- validation ------------------------------------------------------------------------- */

int qc_chunk_validate(const qc_params *p, uint64_t row_len, uint64_t n_rows, const void *chunk) {
  int ovf;
  if (!p || (unsigned)p->codec >= QC_CODEC_COUNT) return QINS_ECORRUPT;
  qc_chunk_bytes(p->codec, row_len, n_rows, &ovf);
  if (ovf) return QINS_ECORRUPT;
  const uint8_t *c = chunk;
  uint64_t n = row_len * n_rows;
  uint32_t B = qc_codec_block(p->codec);
  uint64_t bpr = B ? qc__blocks_per_row(row_len, B) : 0, nb = bpr * n_rows;
  switch (p->codec) {
  case QC_QINS8:
    if (!table_valid(p->table)) return QINS_ECORRUPT;
    for (uint64_t b = 0; b < nb; b++) {
      uint16_t h = qc__ld16(c + 2 * b);
      if ((h & 0x8000u) || (h & 0x7C00u) == 0x7C00u) return QINS_ECORRUPT; /* < 0, Inf, NaN */
    }
    break;
  case QC_QINS16:
    for (uint64_t r = 0; r < n_rows; r++)
      for (uint64_t b = 0; b < bpr; b++) {
        int e = (int8_t)c[r * bpr + b];
        uint64_t i0 = r * row_len + b * B, i1 = i0 + qc__block_len(row_len, b, B);
        if (e != QC_QINS16_EZERO && e < QC_QINS16_EMIN) return QINS_ECORRUPT;
        for (uint64_t i = i0; i < i1; i++) {
          uint16_t code = qc__ld16(c + nb + 2 * i);
          if (e == QC_QINS16_EZERO && (code & 0x7FFFu) != QC_QINS16_ZERO)
            return QINS_ECORRUPT;
        }
      }
    break;
  case QC_SEED_LOG:
    if (!isfinite(p->log_min) || !isfinite(p->log_max)) return QINS_ECORRUPT;
    for (uint64_t i = 0; i < n; i++)
      if ((int8_t)c[i] < -1 || (int8_t)c[i] > 1) return QINS_ECORRUPT;
    break;
  case QC_SEED_RATIONAL:
    if (!isfinite(p->alpha) || !(p->alpha > 0)) return QINS_ECORRUPT;
    break;
  case QC_QINSX: return qc__qx_validate(n, c);
  default: break;
  }
  return 0;
}

/* ---- qins8 quantizer -------------------------------------------------------------------- */

#define Q8_GUESS QC__Q8_GUESS

typedef struct q8tab {
  float T[128];
  float thr[129];              /* thr[m]: x-domain midpoint of T[m-1] and T[m]; thr[0] = +inf,
                                * thr[128] = -inf */
  float safe_lo[129], safe_hi[129]; /* thr[m] * (1 -+ 2^-19): outside, x-domain == exact */
  float lut[256];              /* signed entries, as the decoder's */
  uint8_t guess[Q8_GUESS + 1]; /* nearest m to x = i / Q8_GUESS (the largest m of the bin) */
  float bin_t0[Q8_GUESS + 1];  /* T[guess[i]]: the bin's level ... */
  float bin_t1[Q8_GUESS + 1];  /* ... and the next larger one, T[guess[i] - 1] (T[0] for m = 0) */
} q8tab;

static void q8tab_init(q8tab *q, const float T[128]) {
  memcpy(q->T, T, sizeof q->T);
  q->thr[0] = INFINITY;
  for (int m = 1; m < 128; m++) q->thr[m] = (float)(0.5 * ((double)T[m - 1] + T[m]));
  q->thr[128] = -INFINITY;
  for (int m = 0; m < 129; m++)
    q->safe_lo[m] = q->thr[m] * (1 - 0x1p-19f), q->safe_hi[m] = q->thr[m] * (1 + 0x1p-19f);
  for (int c = 0; c < 256; c++) q->lut[c] = (c & 0x80) ? -T[c & 0x7F] : T[c & 0x7F];
  int m = 127;
  for (int i = 0; i <= Q8_GUESS; i++) {
    double x = (double)i / Q8_GUESS;
    while (m > 0 && x > 0.5 * ((double)T[m - 1] + T[m])) m--;
    q->guess[i] = (uint8_t)m;
    q->bin_t0[i] = T[m], q->bin_t1[i] = T[m > 0 ? m - 1 : 0];
  }
}

/* Estimated squared error of a block at scale d > 0: the nearer of the two levels that can be
 * nearest in the weight's bin (exact when levels are >= 1/Q8_GUESS apart, a close estimate
 * otherwise). Only ranks candidate scales; codes always come from q8_nearest. */
static float q8_err_fast(const q8tab *q, float d, const float *w, uint32_t n) {
  if (n == QC_QINS8_BLOCK && qc_enc_avx2) return qc__avx2_q8_err32(q->bin_t0, q->bin_t1, d, w);
  float inv = 1.0f / d, acc[8] = {0};
  for (uint32_t j = 0; j < n; j++) {
    float a = fabsf(w[j]), x = a * inv;
    int i = (int)(fminf(x, 1.0f) * Q8_GUESS);
    float e0 = a - d * q->bin_t0[i], e1 = a - d * q->bin_t1[i];
    acc[j & 7] += fminf(e0 * e0, e1 * e1);
  }
  float s = acc[0];
  for (int l = 1; l < 8; l++) s += acc[l];
  return s;
}

/* Nearest m for magnitude a at scale d > 0 (inv = 1/d), by decoded value; ties to larger m. */
static inline unsigned q8_nearest(const q8tab *q, float d, float inv, float a) {
  float x = a * inv;
  unsigned m = q->guess[x >= 1.0f ? Q8_GUESS : (int)(x * Q8_GUESS)];
  m -= x > q->thr[m];
  /* x well inside m's cell in the x domain: the decoded-value rule gives the same m, since
   * fl(d*T) and a*inv are within 2^-23 of exact and the band is 2^-19 wide. */
  if (x < q->safe_lo[m] && x > q->safe_hi[m + 1]) return m;
  double ad = a;
  while (m > 0 && ad > 0.5 * ((double)(d * q->T[m - 1]) + (double)(d * q->T[m]))) m--;
  while (m < 127 && ad <= 0.5 * ((double)(d * q->T[m]) + (double)(d * q->T[m + 1]))) m++;
  return m;
}

/* Squared error of one block of n weights at scale d (codes into out when non-NULL). */
static double q8_block(const q8tab *q, float d, const float *w, uint32_t n, uint8_t *out) {
  double err = 0;
  if (d == 0.0f) {
    for (uint32_t j = 0; j < n; j++) {
      err += (double)w[j] * w[j];
      if (out) out[j] = QC_QINS8_ZERO;
    }
    return err;
  }
  float inv = 1.0f / d;
  for (uint32_t j = 0; j < n; j++) {
    float a = fabsf(w[j]);
    unsigned m = q8_nearest(q, d, inv, a);
    double e = (double)a - (double)(d * q->T[m]);
    err += e * e;
    if (out) out[j] = (uint8_t)(m | (w[j] < 0 && m != 127 ? 0x80u : 0u));
  }
  return err;
}

static float block_absmax(const float *w, uint32_t n) {
  float mx = 0;
  for (uint32_t j = 0; j < n; j++) mx = fmaxf(mx, fabsf(w[j]));
  return mx;
}

/* Best fp16 scale of a block among fp16(absmax) +- S ulps (fp16(absmax) first, then by distance;
 * the first best wins). Returns the fp16 bits; *err its squared error. */
static uint16_t q8_scale_search(const q8tab *q, const float *w, uint32_t n, float absmax, int S,
                                double *err) {
  uint16_t h0 = qc_f32_to_f16(absmax);
  double best = q8_block(q, qc_f16_to_f32(h0), w, n, NULL);
  uint16_t hb = h0;
  for (int s = 1; s <= S; s++)
    for (int sg = -1; sg <= 1; sg += 2) {
      int h = (int)h0 + sg * s;
      if (h < 0 || h > 0x7BFF) continue;
      double e = q8_block(q, qc_f16_to_f32((uint16_t)h), w, n, NULL);
      if (e < best) best = e, hb = (uint16_t)h;
    }
  if (err) *err = best;
  return hb;
}

/* Least-squares scale refit: from the codes at fp16(absmax), the scale minimizing the block's
 * error for those codes is sum(a T[m]) / sum(T[m]^2); round it to fp16 (kept within +-8 ulps of
 * fp16(absmax)), requantize, keep it if better, and repeat up to `rounds` times. Returns the fp16
 * bits. Three quantizer passes get most of what the 17-pass search of QINS.md's A3u gets. */
static uint16_t q8_scale_fit(const q8tab *q, const float *w, uint32_t n, float absmax, int rounds,
                             double *err) {
  uint8_t codes[2][QC_QINS8_BLOCK];
  int cur = 0;
  uint16_t h0 = qc_f32_to_f16(absmax), hb = h0;
  double best = q8_block(q, qc_f16_to_f32(h0), w, n, codes[cur]);
  for (int it = 0; it < rounds && best > 0; it++) {
    double num = 0, den = 0;
    for (uint32_t j = 0; j < n; j++) {
      double t = q->T[codes[cur][j] & 0x7F];
      num += fabs((double)w[j]) * t, den += t * t;
    }
    if (den == 0) break;
    int h = qc_f32_to_f16((float)(num / den));
    if (h < (int)h0 - 8) h = h0 - 8;
    if (h > (int)h0 + 8) h = h0 + 8;
    if (h < 0) h = 0;
    if (h > 0x7BFF) h = 0x7BFF;
    if (h == hb) break;
    double e = q8_block(q, qc_f16_to_f32((uint16_t)h), w, n, codes[!cur]);
    if (!(e < best)) break;
    best = e, hb = (uint16_t)h, cur = !cur;
  }
  if (err) *err = best;
  return hb;
}

/* fp16(absmax) +- S ulps ranked by q8_err_fast (first best wins). */
static uint16_t q8_scale_fast(const q8tab *q, const float *w, uint32_t n, float absmax, int S) {
  uint16_t h0 = qc_f32_to_f16(absmax), hb = h0;
  if (h0 == 0) return 0;
  float best = q8_err_fast(q, qc_f16_to_f32(h0), w, n);
  /* Even offsets first, then the two odd neighbours of the best: 11 of the 17 candidates. */
  for (int s = 2; s <= S; s += 2)
    for (int sg = -1; sg <= 1; sg += 2) {
      int h = (int)h0 + sg * s;
      if (h <= 0 || h > 0x7BFF) continue;
      float e = q8_err_fast(q, qc_f16_to_f32((uint16_t)h), w, n);
      if (e < best) best = e, hb = (uint16_t)h;
    }
  uint16_t hc = hb;
  for (int sg = -1; sg <= 1; sg += 2) {
    int h = (int)hc + sg;
    if (h <= 0 || h > 0x7BFF || h < (int)h0 - S || h > (int)h0 + S) continue;
    float e = q8_err_fast(q, qc_f16_to_f32((uint16_t)h), w, n);
    if (e < best) best = e, hb = (uint16_t)h;
  }
  return hb;
}

/* The scale of one block as p->scale_search asks (codec.h). */
static uint16_t q8_scale(const q8tab *q, const float *w, uint32_t n, int mode) {
  float mx = block_absmax(w, n);
  if (mode >= QC_SCALE_FAST) return q8_scale_fast(q, w, n, mx, mode - QC_SCALE_FAST > 8 ? 8 : mode - QC_SCALE_FAST);
  if (mode >= QC_SCALE_FIT) return q8_scale_fit(q, w, n, mx, mode - QC_SCALE_FIT, NULL);
  return q8_scale_search(q, w, n, mx, mode < 0 ? 0 : mode > 8 ? 8 : mode, NULL);
}

/* Index of the first element of w[0..n) that is not finite, or of magnitude >= lim; n if none. */
static uint64_t first_bad(const float *w, uint64_t n, float lim, int *nonfinite) {
  for (uint64_t i = 0; i < n; i++) {
    if (!isfinite(w[i])) return *nonfinite = 1, i;
    if (fabsf(w[i]) >= lim) return *nonfinite = 0, i;
  }
  return n;
}

/* Scans rows for input a lossy codec refuses. 0, or the error with *bad set. */
static int check_input(qc_codec c, const float *w, uint64_t n, uint64_t *bad) {
  float lim = c == QC_QINS8 ? 65520.0f : INFINITY; /* qins16 checks > 2^127 per block */
  int nf = 0;
  uint64_t i = first_bad(w, n, lim, &nf);
  if (i == n) return 0;
  if (bad) *bad = i;
  return nf ? QINS_ENONFINITE : QINS_EUNSUPPORTED;
}

/* ---- encode ----------------------------------------------------------------------------- */

static void stats_add(qc_stats *st, float w, float v) {
  double e = fabs((double)w - (double)v);
  st->sum_sq += (double)w * w;
  st->err_sq += e * e;
  if (e > st->max_err) st->max_err = e;
  st->n++;
}

static int encode_qins8(const qc_params *p, uint64_t L, uint64_t R, const float *src, uint8_t *dst,
                        qc_stats *st) {
  pthread_once(&qc_tables_once, tables_init); /* sets qc_enc_avx2 */
  q8tab *q = malloc(sizeof *q);
  if (!q) return QINS_ENOMEM;
  q8tab_init(q, p->table);
  uint64_t bpr = qc__blocks_per_row(L, QC_QINS8_BLOCK), nb = bpr * R;
  uint8_t *codes = dst + 2 * nb;
  for (uint64_t r = 0; r < R; r++)
    for (uint64_t b = 0; b < bpr; b++) {
      uint64_t i0 = r * L + b * QC_QINS8_BLOCK;
      uint32_t n = qc__block_len(L, b, QC_QINS8_BLOCK);
      const float *w = src + i0;
      uint16_t h;
      if (p->scale_search == QC_SCALE_KEEP) {
        h = qc__ld16(dst + 2 * (r * bpr + b));
        if ((h & 0x8000u) || (h & 0x7C00u) == 0x7C00u) return free(q), QINS_EINVALID;
      } else {
        h = q8_scale(q, w, n, p->scale_search);
      }
      float d = qc_f16_to_f32(h);
      qc__st16(dst + 2 * (r * bpr + b), h);
      q8_block(q, d, w, n, codes + i0);
      if (st)
        for (uint32_t j = 0; j < n; j++) {
          uint8_t cd = codes[i0 + j];
          stats_add(st, w[j], d * q->lut[cd]);
        }
    }
  free(q);
  return 0;
}

/* qins16: nearest decoded magnitude among floor/ceil of -2048*log2(x) (QINS.md). */
/* |decoded| of qins16 magnitude m < 32767 in a block of exponent e >= -100: MT[m & 2047] with
 * e - (m >> 11) added to its exponent field, which equals QINS.md's ldexpf exactly because the
 * result is a normal float (>= 2^-116). */
static inline float q16_mag(const float *MT, int e, int m) {
  return qc__bitsf(qc__fbits(MT[m & 2047]) + (uint32_t)((e - (m >> 11)) * (1 << 23)));
}

/* qins16 code of w in a block of exponent e (QINS.md): m0 = floor(-2048*log2(|w|/2^e)) and
 * m0 + 1, whichever decodes nearer (tie: m0 + 1); 32766 becomes 32767 (zero) when |w| is nearer to
 * 0. log2f's error (<< 1/2048 here) can only move m0 by one near an integer, so m0 - 1 is tried
 * too: the nearest of the three with ties to the larger m is QINS.md's choice. */
static uint16_t q16_code(const float *MT, int e, float w) {
  float a = fabsf(w);
  if (a == 0.0f) return QC_QINS16_ZERO;
  double x = (double)a * ldexp(1.0, -e); /* exact */
  double l = floor(-2048.0 * (double)log2f((float)x));
  int m0 = l < 0 ? 0 : l > 32766 ? 32766 : (int)l;
  int m = m0 > 0 ? m0 - 1 : 0;
  double best = fabs(a - (double)q16_mag(MT, e, m));
  for (int k = m + 1; k <= m0 + 1 && k <= 32766; k++) {
    double dk = fabs(a - (double)q16_mag(MT, e, k));
    if (dk <= best) best = dk, m = k;
  }
  if (m == 32766 && a < best) m = QC_QINS16_ZERO;
  return (uint16_t)(m | (w < 0 && m != QC_QINS16_ZERO ? 0x8000u : 0u));
}

static int encode_qins16(uint64_t L, uint64_t R, const float *src, uint8_t *dst, qc_stats *st,
                         uint64_t *bad) {
  const float *MT = qc_qins16_mantissa();
  uint64_t bpr = qc__blocks_per_row(L, QC_QINS16_BLOCK), nb = bpr * R;
  for (uint64_t r = 0; r < R; r++)
    for (uint64_t b = 0; b < bpr; b++) {
      uint64_t i0 = r * L + b * QC_QINS16_BLOCK;
      uint32_t n = qc__block_len(L, b, QC_QINS16_BLOCK);
      const float *w = src + i0;
      float mx = block_absmax(w, n);
      int e;
      if (mx < 0x1p-100f) e = QC_QINS16_EZERO;
      else {
        int k;
        float f = frexpf(mx, &k); /* mx = f * 2^k, f in [0.5, 1) */
        e = f == 0.5f ? k - 1 : k;
        if (e > 127) {
          for (uint32_t j = 0; j < n; j++)
            if (fabsf(w[j]) > 0x1p127f) return *bad = i0 + j, QINS_EUNSUPPORTED;
        }
      }
      dst[r * bpr + b] = (uint8_t)(int8_t)e;
      for (uint32_t j = 0; j < n; j++) {
        uint16_t code = e == QC_QINS16_EZERO ? QC_QINS16_ZERO : q16_code(MT, e, w[j]);
        qc__st16(dst + nb + 2 * (i0 + j), code);
        if (st) stats_add(st, w[j], e == QC_QINS16_EZERO ? 0.0f : qc__qins16_value(e, code));
      }
    }
  return 0;
}

int qc_encode(const qc_params *p, uint64_t row_len, uint64_t n_rows, const float *src, void *dst,
              qc_stats *st, uint64_t *bad_index) {
  int ovf;
  uint64_t bad = 0;
  if (!p || (unsigned)p->codec >= QC_CODEC_COUNT) return QINS_EINVALID;
  qc_chunk_bytes(p->codec, row_len, n_rows, &ovf);
  if (ovf) return QINS_EINVALID;
  uint64_t n = row_len * n_rows;
  uint8_t *o = dst;
  int rc = 0;
  if (qc_codec_is_lossy(p->codec) && (rc = check_input(p->codec, src, n, &bad))) goto out;
  switch (p->codec) {
  case QC_F32:
  case QC_F16:
  case QC_BF16:
    qc_from_f32((qc_dtype)p->codec, src, n, dst);
    if (st)
      for (uint64_t i = 0; i < n; i++) {
        float v = p->codec == QC_F32    ? src[i]
                  : p->codec == QC_F16 ? qc_f16_to_f32(qc__ld16(o + 2 * i))
                                       : qc_bf16_to_f32(qc__ld16(o + 2 * i));
        if (isfinite(src[i])) stats_add(st, src[i], v);
      }
    break;
  case QC_QINS8:
    if (!table_valid(p->table)) return QINS_EINVALID;
    rc = encode_qins8(p, row_len, n_rows, src, o, st);
    break;
  case QC_QINS16: rc = encode_qins16(row_len, n_rows, src, o, st, &bad); break;
  case QC_QINSX: rc = qc__qx_encode(n, src, o, st); break;
  case QC_SEED_LOG: {
    if (!isfinite(p->log_min) || !isfinite(p->log_max)) return QINS_EINVALID;
    float range = p->log_max - p->log_min;
    for (uint64_t i = 0; i < n; i++) {
      float w = src[i];
      float a = logf(fmaxf(fabsf(w), 1e-8f));
      float nn = range != 0 ? (a - p->log_min) / range : 0.0f;
      float s = rintf(255.0f - nn * 254.0f);
      uint8_t q = (uint8_t)(s < 1 ? 1 : s > 255 ? 255 : s);
      int8_t sg = w > 0 ? 1 : w < 0 ? -1 : 0;
      o[i] = (uint8_t)sg, o[n + i] = q;
      if (st) stats_add(st, w, (float)sg * qc__seedlog_mag(p, q));
    }
    break;
  }
  case QC_SEED_RATIONAL: {
    float al = p->alpha;
    if (!isfinite(al) || !(al > 0)) return QINS_EINVALID;
    for (uint64_t i = 0; i < n; i++) {
      float w = src[i];
      float s = w >= 0 ? 1.0f : -1.0f;
      float z = s / (1.0f + al * fabsf(w));
      float qf = rintf((z + 1.0f) * 127.5f);
      uint8_t q = (uint8_t)(qf < 0 ? 0 : qf > 255 ? 255 : qf);
      o[i] = q;
      if (st) stats_add(st, w, qc__seedrat_value(al, q));
    }
    break;
  }
  default: return QINS_EINVALID;
  }
out:
  if (rc && bad_index) *bad_index = bad;
  return rc;
}

/* ---- fitting ---------------------------------------------------------------------------- */

#define HBINS 4096 /* histogram bins over sqrt(x), x = |w| / d */

struct qc_fit {
  qc_codec codec;
  uint64_t row_len;
  qc_fit_opts o;
  uint64_t n;          /* elements added */
  int failed;          /* an add failed: finish refuses */
  float log_lo, log_hi; /* seed-log running min/max of logf(max(|w|, 1e-8)) */
  double *h;           /* qins8 default: HBINS x {sum d^2, sum d^2 x, sum d^2 x^2} */
  float *buf;          /* qins8: max effort, the whole tensor; default effort, the tensor while it
                        * is below table_min_elems (so the standard table is chosen by a real
                        * encode), then freed */
  uint64_t cap;        /* floats allocated in buf */
};

int qc_fit_new(qc_codec c, uint64_t row_len, const qc_fit_opts *opts, qc_fit **out) {
  *out = NULL;
  if ((unsigned)c >= QC_CODEC_COUNT) return QINS_EINVALID;
  qc_fit *f = calloc(1, sizeof *f);
  if (!f) return QINS_ENOMEM;
  f->codec = c, f->row_len = row_len;
  if (opts) f->o = *opts;
  if (f->o.alpha == 0) f->o.alpha = 1.0f;
  if (f->o.table_min_elems == 0) f->o.table_min_elems = QC_QINS8_CUSTOM_MIN;
  f->log_lo = INFINITY, f->log_hi = -INFINITY;
  if (c == QC_SEED_RATIONAL && (!isfinite(f->o.alpha) || f->o.alpha <= 0)) {
    free(f);
    return QINS_EINVALID;
  }
  if (c == QC_QINS8 && f->o.effort != QC_EFFORT_MAX && !(f->h = calloc(3 * HBINS, sizeof(double)))) {
    free(f);
    return QINS_ENOMEM;
  }
  pthread_once(&qc_tables_once, tables_init);
  *out = f;
  return 0;
}

void qc_fit_free(qc_fit *f) {
  if (!f) return;
  free(f->h);
  free(f->buf);
  free(f);
}

/* Adds one qins8 block's x = |w|/d to the histogram. */
static void hist_block(double *h, const float *w, uint32_t n) {
  float mx = block_absmax(w, n);
  float d = qc_f16_to_f32(qc_f32_to_f16(mx));
  if (d == 0.0f) return; /* every weight decodes exactly (to 0, or below fp16's reach) */
  double d2 = (double)d * d, inv = 1.0 / d;
  for (uint32_t j = 0; j < n; j++) {
    double x = fabs((double)w[j]) * inv;
    if (x == 0) continue; /* exact zeros cost nothing in any table */
    int i = (int)(sqrt(x) * HBINS);
    if (i >= HBINS) i = HBINS - 1;
    h[3 * i] += d2, h[3 * i + 1] += d2 * x, h[3 * i + 2] += d2 * x * x;
  }
}

int qc_fit_add(qc_fit *f, const float *rows, uint64_t n_rows, uint64_t *bad_index) {
  uint64_t n, bad = 0;
  if (__builtin_mul_overflow(f->row_len, n_rows, &n)) return f->failed = 1, QINS_EINVALID;
  if (qc_codec_is_lossy(f->codec)) {
    int rc = check_input(f->codec, rows, n, &bad);
    if (!rc && f->codec == QC_QINS16)
      for (uint64_t i = 0; i < n; i++)
        if (fabsf(rows[i]) > 0x1p127f) {
          rc = QINS_EUNSUPPORTED, bad = i;
          break;
        }
    if (rc) {
      if (bad_index) *bad_index = bad;
      f->failed = 1;
      return rc;
    }
  }
  if (f->codec == QC_SEED_LOG)
    for (uint64_t i = 0; i < n; i++) {
      float a = logf(fmaxf(fabsf(rows[i]), 1e-8f));
      f->log_lo = fminf(f->log_lo, a), f->log_hi = fmaxf(f->log_hi, a);
    }
  if (f->codec == QC_QINS8) {
    if (f->h) {
      uint64_t L = f->row_len;
      for (uint64_t r = 0; r < n_rows; r++)
        for (uint64_t b = 0, bpr = qc__blocks_per_row(L, QC_QINS8_BLOCK); b < bpr; b++)
          hist_block(f->h, rows + r * L + b * QC_QINS8_BLOCK, qc__block_len(L, b, QC_QINS8_BLOCK));
    }
    if (f->h && f->n + n >= f->o.table_min_elems) { /* a fitted table: no need for the rows */
      free(f->buf);
      f->buf = NULL, f->cap = 0;
    } else {
      if (f->n + n > f->cap) {
        uint64_t cap = f->cap ? f->cap : 1024;
        while (cap < f->n + n) cap *= 2;
        float *nb = realloc(f->buf, cap * sizeof(float));
        if (!nb) return f->failed = 1, QINS_ENOMEM;
        f->buf = nb, f->cap = cap;
      }
      if (n) memcpy(f->buf + f->n, rows, n * sizeof(float));
    }
  }
  f->n += n;
  return 0;
}

/* Histogram error of table T: each bin goes to the level nearest its mean. */
static double hist_err(const double *h, const float T[128], uint8_t *assign) {
  double err = 0;
  int m = 127;
  for (int i = 0; i < HBINS; i++) {
    double s0 = h[3 * i], s1 = h[3 * i + 1], s2 = h[3 * i + 2];
    if (s0 == 0) {
      if (assign) assign[i] = 255;
      continue;
    }
    double x = s1 / s0;
    while (m > 0 && x > 0.5 * ((double)T[m - 1] + T[m])) m--; /* bins ascend in x */
    double t = T[m];
    err += s2 - 2 * t * s1 + t * t * s0;
    if (assign) assign[i] = (uint8_t)m;
  }
  return err;
}

/* Restores T[0] = 1, T[127] = 0, interpolates empty cells, enforces T non-increasing. */
static void table_fix(float T[128], const int *filled) {
  T[0] = 1.0f, T[127] = 0.0f;
  for (int m = 1; m < 127; m++) {
    if (filled[m]) continue;
    int a = m - 1, b = m + 1;
    while (b < 127 && !filled[b]) b++;
    for (int k = m; k < b; k++) T[k] = (float)(T[a] + (double)(T[b] - T[a]) * (k - a) / (b - a));
    m = b - 1;
  }
  for (int m = 1; m < 128; m++)
    if (!(T[m] <= T[m - 1])) T[m] = T[m - 1];
  for (int m = 1; m < 127; m++) /* keep interior entries distinct where room allows */
    if (T[m] >= T[m - 1] && T[m - 1] > 0) T[m] = nextafterf(T[m - 1], 0.0f);
  for (int m = 1; m < 128; m++)
    if (!(T[m] <= T[m - 1])) T[m] = T[m - 1];
  T[127] = 0.0f;
}

/* Lloyd iterations on the histogram from T; T becomes the best table seen. */
static void hist_lloyd(const double *h, float T[128], int iters) {
  uint8_t assign[HBINS];
  float cur[128];
  memcpy(cur, T, sizeof cur);
  double best = hist_err(h, T, NULL);
  for (int it = 0; it < iters; it++) {
    double num[128] = {0}, den[128] = {0};
    hist_err(h, cur, assign);
    for (int i = 0; i < HBINS; i++)
      if (assign[i] != 255) num[assign[i]] += h[3 * i + 1], den[assign[i]] += h[3 * i];
    int filled[128] = {0};
    for (int m = 1; m < 127; m++)
      if (den[m] > 0) cur[m] = (float)(num[m] / den[m]), filled[m] = 1;
    table_fix(cur, filled);
    double e = hist_err(h, cur, NULL);
    if (e < best) best = e, memcpy(T, cur, sizeof cur);
  }
}

/* ---- the reference encoder (effort max), on the buffered tensor ---------------------------- */

typedef struct ref8 {
  const float *w;
  uint64_t L, R, bpr;
  float *d; /* per-block scale */
} ref8;

static uint32_t ref_blk(const ref8 *z, uint64_t blk, const float **w) {
  uint64_t r = blk / z->bpr, b = blk % z->bpr;
  *w = z->w + r * z->L + b * QC_QINS8_BLOCK;
  return qc__block_len(z->L, b, QC_QINS8_BLOCK);
}

/* Quantizes everything with T at the current scales; returns the error; accumulates Lloyd sums. */
static double ref_pass(const ref8 *z, const float T[128], double *num, double *den) {
  q8tab *q = malloc(sizeof *q);
  if (!q) return INFINITY;
  q8tab_init(q, T);
  double err = 0;
  uint8_t codes[QC_QINS8_BLOCK];
  for (uint64_t blk = 0; blk < z->bpr * z->R; blk++) {
    const float *w;
    uint32_t n = ref_blk(z, blk, &w);
    float d = z->d[blk];
    err += q8_block(q, d, w, n, codes);
    if (num && d > 0)
      for (uint32_t j = 0; j < n; j++) {
        unsigned m = codes[j] & 0x7F;
        num[m] += (double)d * fabsf(w[j]), den[m] += (double)d * d;
      }
  }
  free(q);
  return err;
}

static void ref_lloyd(const ref8 *z, float T[128], int iters) {
  float cur[128];
  memcpy(cur, T, sizeof cur);
  double best = INFINITY;
  for (int it = 0; it <= iters; it++) {
    double num[128] = {0}, den[128] = {0};
    double e = ref_pass(z, cur, num, den);
    if (e < best) best = e, memcpy(T, cur, sizeof cur);
    if (it == iters) break;
    int filled[128] = {0};
    for (int m = 1; m < 127; m++)
      if (den[m] > 0) cur[m] = (float)(num[m] / den[m]), filled[m] = 1;
    table_fix(cur, filled);
  }
}

static int ref_scale_search(const ref8 *z, const float T[128]) {
  q8tab *q = malloc(sizeof *q);
  if (!q) return QINS_ENOMEM;
  q8tab_init(q, T);
  for (uint64_t blk = 0; blk < z->bpr * z->R; blk++) {
    const float *w;
    uint32_t n = ref_blk(z, blk, &w);
    z->d[blk] = qc_f16_to_f32(q8_scale_search(q, w, n, block_absmax(w, n), 8, NULL));
  }
  free(q);
  return 0;
}

/* QINS.md reference encoder; with a standard table forced (small tensors) only A1 over the
 * standard tables, with the A3u scale search, is run. */
static int fit_qins8_max(qc_fit *f, qc_params *p) {
  ref8 z = {f->buf, f->row_len, f->row_len ? f->n / f->row_len : 0, 0, NULL};
  z.bpr = qc__blocks_per_row(z.L, QC_QINS8_BLOCK);
  uint64_t nb = z.bpr * z.R;
  z.d = malloc((nb ? nb : 1) * sizeof(float));
  if (!z.d) return QINS_ENOMEM;
  for (uint64_t blk = 0; blk < nb; blk++) {
    const float *w;
    uint32_t n = ref_blk(&z, blk, &w);
    z.d[blk] = qc_f16_to_f32(qc_f32_to_f16(block_absmax(w, n)));
  }
  int custom = f->n >= f->o.table_min_elems;
  p->scale_search = 8;
  if (!custom) { /* the best standard table, judged after the scale search */
    float *save = malloc((nb ? nb : 1) * sizeof(float));
    if (!save) return free(z.d), QINS_ENOMEM;
    memcpy(save, z.d, nb * sizeof(float));
    double E[QC_QINS8_STD_COUNT];
    int bp = -1, bs = -1;
    for (int i = 0; i < QC_QINS8_STD_COUNT; i++) {
      memcpy(z.d, save, nb * sizeof(float));
      if (ref_scale_search(&z, qc_std[i])) return free(save), free(z.d), QINS_ENOMEM;
      E[i] = ref_pass(&z, qc_std[i], NULL, NULL);
      if (qc_std_primary(i) && (bp < 0 || E[i] < E[bp])) bp = i;
      if (!qc_std_primary(i) && (bs < 0 || E[i] < E[bs])) bs = i;
    }
    int b = E[bs] < QC_STD_SECONDARY_GAIN * E[bp] ? bs : bp; /* as choose_std */
    memcpy(p->table, qc_std[b], 512), p->table_id = b;
    free(save);
    free(z.d);
    return 0;
  }
  /* A1 */
  double best = INFINITY;
  int bi = 0;
  for (int i = 0; i < QC_A1_COUNT; i++) {
    double e = ref_pass(&z, qc_a1[i], NULL, NULL);
    if (e < best) best = e, bi = i;
  }
  float T[128];
  memcpy(T, qc_a1[bi], sizeof T);
  ref_lloyd(&z, T, 10);                                     /* A2 */
  if (ref_scale_search(&z, T)) return free(z.d), QINS_ENOMEM; /* A3u */
  ref_lloyd(&z, T, 10);
  free(z.d); /* the final scale search is qc_encode's (scale_search = 8) */
  memcpy(p->table, T, sizeof T);
  p->table_id = -1;
  return 0;
}

/* The standard table of a tensor (default effort). The histogram scores every table at the
 * absmax scales; a small tensor (still buffered) is scored by real encodes instead, since the
 * scale search reorders close candidates. rat(0.5) and rat(1) are the primary tables (on real
 * weights one of them is best nearly always); the others are taken only when they cut the error
 * by QC_STD_SECONDARY_GAIN, so that a model's tensors share few tables (each distinct table costs
 * its 516 bytes once). */
static int choose_std(qc_fit *f, qc_params *out) {
  double E[QC_QINS8_STD_COUNT];
  for (int i = 0; i < QC_QINS8_STD_COUNT; i++) E[i] = hist_err(f->h, qc_std[i], NULL);
  int bs = 0; /* best secondary by the histogram */
  for (int i = 0; i < QC_QINS8_STD_COUNT; i++)
    if (!qc_std_primary(i) && E[i] < E[bs]) bs = i;
  if (f->buf && f->n < f->o.table_min_elems && f->n > 0) {
    uint64_t R = f->n / f->row_len;
    void *scratch = malloc(qc_chunk_bytes(QC_QINS8, f->row_len, R, NULL));
    if (!scratch) return QINS_ENOMEM;
    qc_params cand = *out;
    cand.scale_search = QC_SCALE_FAST + 8;
    for (int i = 0; i < QC_QINS8_STD_COUNT; i++) {
      if (!qc_std_primary(i) && i != bs) continue;
      qc_stats st = {0};
      memcpy(cand.table, qc_std[i], sizeof cand.table);
      int rc = encode_qins8(&cand, f->row_len, R, f->buf, scratch, &st);
      if (rc) return free(scratch), rc;
      E[i] = st.err_sq;
    }
    free(scratch);
  }
  int bp = -1;
  for (int i = 0; i < QC_QINS8_STD_COUNT; i++)
    if (qc_std_primary(i) && (bp < 0 || E[i] < E[bp])) bp = i;
  int b = E[bs] < QC_STD_SECONDARY_GAIN * E[bp] ? bs : bp;
  memcpy(out->table, qc_std[b], sizeof out->table);
  out->table_id = b;
  return 0;
}

int qc_fit_finish(qc_fit *f, qc_params *out) {
  if (f->failed) return QINS_EINVALID;
  memset(out, 0, sizeof *out);
  out->codec = f->codec;
  out->table_id = -1;
  switch (f->codec) {
  case QC_SEED_LOG:
    out->log_min = f->n ? f->log_lo : 0, out->log_max = f->n ? f->log_hi : 0;
    break;
  case QC_SEED_RATIONAL: out->alpha = f->o.alpha; break;
  case QC_QINS8:
    if (!f->h) return fit_qins8_max(f, out);
    {
      int rc = choose_std(f, out);
      if (rc) return rc;
      out->scale_search = QC_SCALE_FAST + 8;
      if (f->n >= f->o.table_min_elems) {
        /* Start Lloyd from the best A1 candidate, not only the standard ones. */
        double b2 = INFINITY;
        int b2i = 0;
        for (int i = 0; i < QC_A1_COUNT; i++) {
          double e = hist_err(f->h, qc_a1[i], NULL);
          if (e < b2) b2 = e, b2i = i;
        }
        memcpy(out->table, qc_a1[b2i], sizeof out->table);
        hist_lloyd(f->h, out->table, 20);
        out->table_id = -1;
      }
    }
    break;
  default: break;
  }
  return 0;
}

int qc_fit_tensor(qc_codec c, uint64_t row_len, uint64_t n_rows, const float *src,
                  const qc_fit_opts *opts, qc_params *out, uint64_t *bad_index) {
  qc_fit *f;
  int rc = qc_fit_new(c, row_len, opts, &f);
  if (rc) return rc;
  rc = qc_fit_add(f, src, n_rows, bad_index);
  if (!rc) rc = qc_fit_finish(f, out);
  qc_fit_free(f);
  return rc;
}
