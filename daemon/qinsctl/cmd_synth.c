/* SPDX-License-Identifier: MIT */
/*
 * cmd_synth.c — `qinsctl synth`: writes a synthetic model with a real architecture's tensor names
 * and shapes (Phi-3.5-mini, or smaller variants for quick runs; llama2.c's Llama with stories260K's
 * or stories110M's shapes) straight into the store through the store's write API (store.h:
 * qs_import_begin ... qs_import_commit), so that scale tests need no 15 GB source file and
 * `make demo` runs on a bare clone. Usage and output fields: docs/qinsctl.md §synth.
 *
 * The llama2 archs carry llama2.c's hyper-parameters in the model's metadata (dim, hidden_dim,
 * n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len as strings, as in a safetensors
 * __metadata__), so qins-llama2 configures itself from the server, and `qinsctl export` of an f32
 * synth is a complete FP32 reference file for it.
 *
 * Statistics (trained-like, not Gaussian noise): every matrix element is
 *     w[r][c] = sigma_t * rowscale_r * colscale_c * x
 * with x drawn from a heavy-tailed unit-variance mixture (half Laplace, half Student-t with 5
 * degrees of freedom: kurtosis about 7.5), rowscale_r log-normal (per-row scales that vary by
 * about 30%), a few outlier input columns per tensor (1..4 of them, colscale 2..4) and a few
 * large single outliers per tensor (4..16 of them, 12..36 sigma_t). sigma_t is about
 * gain/sqrt(fan_in). Norm vectors (1-D) are near gain (a per-tensor mean within gain * (1 +- 0.1),
 * spread 0.04, or 0.1 * gain for the llama2 archs). gain is 1 except in the llama2 archs, whose
 * gains follow stories260K's trained weights (wq and wk 1.6, wv and wo 0.7) and keep a random
 * model generating varied tokens: the classifier is the embedding, so the embedding stays plain
 * (gain 1, row scales spread 10%, no outlier columns, no single outliers) and the final norm (gain 3) sets logits about
 * as peaked as stories260K's; the other llama2 matrices' single outliers are 3..9 sigma_t, as in
 * stories260K. Nothing exceeds a few units, so every codec accepts every value.
 *
 * Generation is cheap: each row has its own key (splitmix64 of the tensor key and the row index)
 * seeding a wyrand stream; each 64-bit step gives three draws of 21 bits: a sign bit, a 15-bit
 * index into a 32768-bin inverse-CDF table of |x| and 5 bits of linear interpolation within the
 * bin. A row can thus be generated on its own, in any order, by any thread, with the same bytes:
 * the model is a pure function of (arch, seed, QSYN_VERSION).
 *
 * Streaming with bounded memory, two passes per tensor as the file importer does (import.c): a
 * fitter thread generates each tensor in 256 KiB batches and fits its codec parameters
 * (qc_fit_*), running ahead of the writer; the main thread regenerates the tensor a chunk of rows
 * at a time and hands the rows to qs_import_tensor_rows, whose worker threads encode the chunks
 * ($QINS_IMPORT_THREADS). Peak memory is a chunk-sized row buffer plus the store's jobs and one
 * staging transaction, whatever the model size. The model appears atomically at commit; any
 * failure aborts the import and leaves the store as it was.
 */
#include <fnmatch.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qinsctl.h"
#include "store.h"

#define QSYN_VERSION 1            /* bump when the generated values change for a given seed */
#define QSYN_TBITS 15             /* inverse-CDF table: 2^15 bins over |x| */
#define QSYN_TBINS (1u << QSYN_TBITS)
#define QSYN_ROW_SIGMA 0.3        /* log-normal spread of row scales: ~30% like trained rows */
#define QSYN_FIT_BATCH (64u << 10) /* floats per fit batch: 256 KiB, stays in L2 */
#define QSYN_MAX_OUTLIERS 16      /* single large outliers per matrix: 4..16 */
#define QSYN_GOLDEN 0x9E3779B97F4A7C15ull /* splitmix64's increment */

/* ---------------------------------------------------------------------------------------------
 * Architectures: the Phi-3 layout (fused qkv and gate_up projections, untied lm_head) and
 * llama2.c's (its PyTorch names, separate q/k/v and w1/w2/w3, classifier tied to the embedding). */
typedef enum qsyn_layout { QSYN_PHI3, QSYN_LLAMA2 } qsyn_layout;

typedef struct qsyn_arch {
  const char *name;    /* --arch value */
  const char *summary; /* one line for --list */
  qsyn_layout layout;
  uint32_t layers;     /* decoder layers */
  uint32_t hidden;     /* hidden size (llama2.c's dim) */
  uint32_t qkv;        /* Phi-3: rows of self_attn.qkv_proj (q + k + v heads) */
  uint32_t inter;      /* MLP intermediate size (Phi-3's gate_up_proj has 2x rows; hidden_dim) */
  uint32_t vocab;      /* embedding (and lm_head) rows */
  uint32_t heads;      /* llama2: query heads */
  uint32_t kv_heads;   /* llama2: key/value heads */
  uint32_t seq_len;    /* llama2: maximum positions */
} qsyn_arch;

static const qsyn_arch qsyn_archs[] = {
    {.name = "phi-3.5-mini",
     .summary = "Phi-3.5-mini: 32 layers, hidden 3072, vocab 32064 (3.82 B weights, 15.3 GB FP32)",
     .layout = QSYN_PHI3, .layers = 32, .hidden = 3072, .qkv = 9216, .inter = 8192, .vocab = 32064},
    {.name = "phi-mini-4l",
     .summary = "Phi-3.5-mini's shapes with 4 layers (0.65 B weights, 2.6 GB FP32)",
     .layout = QSYN_PHI3, .layers = 4, .hidden = 3072, .qkv = 9216, .inter = 8192, .vocab = 32064},
    {.name = "tiny",
     .summary = "Phi-3.5-mini's layout scaled down: 2 layers, hidden 256 (1.8 M weights, 7.3 MB FP32)",
     .layout = QSYN_PHI3, .layers = 2, .hidden = 256, .qkv = 768, .inter = 512, .vocab = 1024},
    {.name = "llama2-tiny",
     .summary = "llama2.c's Llama with stories260K's shapes: dim 64, 5 layers, 8 heads, 4 KV heads, "
                "hidden 172, vocab 512 (260 K weights, 1.0 MB FP32)",
     .layout = QSYN_LLAMA2, .layers = 5, .hidden = 64, .inter = 172, .vocab = 512, .heads = 8,
     .kv_heads = 4, .seq_len = 512},
    {.name = "llama2-110m",
     .summary = "llama2.c's Llama with stories110M's shapes: dim 768, 12 layers, 12 heads, hidden "
                "2048, vocab 32000 (110 M weights, 438 MB FP32)",
     .layout = QSYN_LLAMA2, .layers = 12, .hidden = 768, .inter = 2048, .vocab = 32000,
     .heads = 12, .kv_heads = 12, .seq_len = 1024},
};
#define QSYN_NARCHS (sizeof qsyn_archs / sizeof qsyn_archs[0])

/* One tensor to synthesize. */
typedef struct qsyn_tensor {
  char name[96];  /* e.g. model.layers.3.mlp.down_proj.weight, layers.3.feed_forward.w2.weight */
  int ndim;       /* 1 (norm) or 2 (matrix) */
  uint64_t rows;  /* 1 for a norm */
  uint64_t cols;  /* row length */
  uint64_t key;   /* per-tensor seed: mix(seed, name) */
  double gain;    /* scale multiplier (matrices: of sigma; norms: of the mean) */
  double norm_sd; /* norms: spread around the mean */
  double out_lo;  /* matrices: single outliers are out_lo..3 out_lo sigma (0: none) */
  int out_cols;   /* matrices: 1..4 outlier input columns (0: none) */
  double row_sd;  /* matrices: log-normal spread of the row scales */
} qsyn_tensor;

static inline uint64_t qsyn_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static inline double qsyn_unit(uint64_t z) { return (double)(z >> 11) * 0x1p-53; } /* [0, 1) */

static size_t qsyn_plan(const qsyn_arch *a, uint64_t seed, qsyn_tensor *v /* may be NULL */) {
  size_t n = 0;
  /* Phi-3 (a large model): outliers of 12..36 sigma. llama2 (stories260K, a small one): none
   * past ~9 sigma, and a plain embedding, which the tied classifier reads back: a large embedding
   * row or outlier makes its token the argmax of almost every step of a random model. */
  double nsd = a->layout == QSYN_LLAMA2 ? 0.1 : 0.04, out_lo = a->layout == QSYN_LLAMA2 ? 3 : 12;
  int out_cols = 1;
  double row_sd = QSYN_ROW_SIGMA;
#define QSYN_ADD(nd, r, c, g, ...)                                                                \
  do {                                                                                            \
    if (v) {                                                                                      \
      snprintf(v[n].name, sizeof v[n].name, __VA_ARGS__);                                         \
      v[n].ndim = (nd), v[n].rows = (r), v[n].cols = (c), v[n].gain = (g);                        \
      v[n].norm_sd = nsd * (g), v[n].out_lo = out_lo, v[n].out_cols = out_cols;                   \
      v[n].row_sd = row_sd;                                                                       \
      uint64_t h = 0xCBF29CE484222325ull; /* FNV-1a 64 of the name, then mixed with the seed */  \
      for (const char *p = v[n].name; *p; p++) h = (h ^ (unsigned char)*p) * 0x100000001B3ull;   \
      v[n].key = qsyn_mix(qsyn_mix(seed + QSYN_GOLDEN) ^ h);                                       \
    }                                                                                             \
    n++;                                                                                          \
  } while (0)
  if (a->layout == QSYN_LLAMA2) {
    uint64_t kv = (uint64_t)a->hidden / a->heads * a->kv_heads;
    out_lo = 0, out_cols = 0, row_sd = 0.1;
    QSYN_ADD(2, a->vocab, a->hidden, 1.0, "tok_embeddings.weight");
    out_lo = 3, out_cols = 1, row_sd = QSYN_ROW_SIGMA;
    for (uint32_t l = 0; l < a->layers; l++) {
      QSYN_ADD(1, 1, a->hidden, 1.0, "layers.%u.attention_norm.weight", l);
      QSYN_ADD(2, a->hidden, a->hidden, 1.6, "layers.%u.attention.wq.weight", l);
      QSYN_ADD(2, kv, a->hidden, 1.6, "layers.%u.attention.wk.weight", l);
      QSYN_ADD(2, kv, a->hidden, 0.7, "layers.%u.attention.wv.weight", l);
      QSYN_ADD(2, a->hidden, a->hidden, 0.7, "layers.%u.attention.wo.weight", l);
      QSYN_ADD(1, 1, a->hidden, 1.0, "layers.%u.ffn_norm.weight", l);
      QSYN_ADD(2, a->inter, a->hidden, 1.0, "layers.%u.feed_forward.w1.weight", l);
      QSYN_ADD(2, a->hidden, a->inter, 1.0, "layers.%u.feed_forward.w2.weight", l);
      QSYN_ADD(2, a->inter, a->hidden, 1.0, "layers.%u.feed_forward.w3.weight", l);
    }
    QSYN_ADD(1, 1, a->hidden, 3.0, "norm.weight");
    return n;
  }
  QSYN_ADD(2, a->vocab, a->hidden, 1.0, "model.embed_tokens.weight");
  for (uint32_t l = 0; l < a->layers; l++) {
    QSYN_ADD(1, 1, a->hidden, 1.0, "model.layers.%u.input_layernorm.weight", l);
    QSYN_ADD(2, a->qkv, a->hidden, 1.0, "model.layers.%u.self_attn.qkv_proj.weight", l);
    QSYN_ADD(2, a->hidden, a->hidden, 1.0, "model.layers.%u.self_attn.o_proj.weight", l);
    QSYN_ADD(1, 1, a->hidden, 1.0, "model.layers.%u.post_attention_layernorm.weight", l);
    QSYN_ADD(2, 2ull * a->inter, a->hidden, 1.0, "model.layers.%u.mlp.gate_up_proj.weight", l);
    QSYN_ADD(2, a->hidden, a->inter, 1.0, "model.layers.%u.mlp.down_proj.weight", l);
  }
  QSYN_ADD(1, 1, a->hidden, 1.0, "model.norm.weight");
  QSYN_ADD(2, a->vocab, a->hidden, 1.0, "lm_head.weight");
#undef QSYN_ADD
  return n;
}

/* ---------------------------------------------------------------------------------------------
 * The heavy-tailed draw: |x| by inverse CDF of 0.5 Laplace(var 1) + 0.5 t5(var 1), tabulated at
 * 2^15 + 1 points (the last one at p = 1 - 2^-17, the tail cap: about 9.6 for this mixture);
 * each entry holds the value and the step to the next, so a draw is one 8-byte load. */
typedef struct qsyn_bin {
  float v;  /* |x| at the bin's left edge */
  float dv; /* to the next edge */
} qsyn_bin;
static qsyn_bin qsyn_table[QSYN_TBINS];
static pthread_once_t qsyn_table_once = PTHREAD_ONCE_INIT;

/* P(|X| <= x) for the mixture. t5's CDF in closed form (odd degrees of freedom). */
static double qsyn_abs_cdf(double x) {
  double lap = 1.0 - exp(-sqrt(2.0) * x);            /* Laplace with b = 1/sqrt(2): variance 1 */
  double t = x * sqrt(5.0 / 3.0), th = atan(t / sqrt(5.0)); /* t5 has variance 5/3 */
  double c = cos(th), s = sin(th);
  double t5 = (2.0 / M_PI) * (th + s * c * (1.0 + 2.0 / 3.0 * c * c)); /* 2 F(t) - 1 */
  return 0.5 * lap + 0.5 * t5;
}

static double qsyn_abs_quantile(double p) {
  double lo = 0, hi = 64;
  for (int i = 0; i < 60; i++) {
    double mid = 0.5 * (lo + hi);
    if (qsyn_abs_cdf(mid) < p) lo = mid;
    else hi = mid;
  }
  return 0.5 * (lo + hi);
}

static void qsyn_table_init(void) {
  double prev = 0;
  for (uint32_t i = 0; i <= QSYN_TBINS; i++) {
    double q = i == QSYN_TBINS ? qsyn_abs_quantile(1.0 - 0x1p-17) : qsyn_abs_quantile((double)i / QSYN_TBINS);
    if (i > 0) qsyn_table[i - 1].dv = (float)(q - prev);
    if (i < QSYN_TBINS) qsyn_table[i].v = (float)q;
    prev = q;
  }
}

/* One draw from 21 random bits: bit 20 the sign, bits 19..5 the bin, bits 4..0 the position
 * within it (32 steps of linear interpolation). */
static inline float qsyn_draw(uint64_t b) {
  const qsyn_bin *e = &qsyn_table[(b >> 5) & (QSYN_TBINS - 1)];
  float m = e->v + (float)(b & 31) * (1.0f / 32.0f) * e->dv;
  uint32_t u; /* the sign goes in without a branch: a random branch mispredicts half the time */
  memcpy(&u, &m, 4);
  u ^= (uint32_t)(b >> 20 & 1) << 31;
  memcpy(&m, &u, 4);
  return m;
}

/* wyrand: 64 random bits per step from a 64-bit state (one 64x64->128 multiply). */
static inline uint64_t qsyn_next(uint64_t *s) {
  *s += 0xA0761D6478BD642Full;
  __uint128_t m = (__uint128_t)*s * (*s ^ 0xE7037ED1A0B428DBull);
  return (uint64_t)(m >> 64) ^ (uint64_t)m;
}

/* A standard normal from one 64-bit value (Box-Muller), clamped to +-4. */
static double qsyn_gauss(uint64_t z) {
  double u1 = ((double)(z >> 40) + 0.5) * 0x1p-24, u2 = (double)(z & 0xFFFFFF) * 0x1p-24;
  double g = sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
  return g > 4 ? 4 : g < -4 ? -4 : g;
}

/* ---------------------------------------------------------------------------------------------
 * Per-tensor generator state (each thread has its own). */
typedef struct qsyn_gen {
  const qsyn_tensor *t;
  double sigma;             /* base scale: ~1/sqrt(fan_in) (matrices), spread (norms) */
  double mean;              /* norms: the per-tensor mean near 1 */
  float *colscale;          /* matrices: cols multipliers (1, or 2..4 on outlier columns) */
  int n_out;                /* single outliers */
  uint64_t out_row[QSYN_MAX_OUTLIERS], out_col[QSYN_MAX_OUTLIERS];
  float out_val[QSYN_MAX_OUTLIERS];
} qsyn_gen;

static int qsyn_gen_init(qsyn_gen *g, const qsyn_tensor *t) {
  memset(g, 0, sizeof *g);
  g->t = t;
  uint64_t k = t->key;
  if (t->ndim == 1) {
    g->mean = t->gain * (1.0 + 0.2 * (qsyn_unit(qsyn_mix(k + 1)) - 0.5));
    g->sigma = t->norm_sd;
    return 0;
  }
  g->sigma = t->gain * (0.7 + 0.6 * qsyn_unit(qsyn_mix(k + 1))) / sqrt((double)t->cols);
  if (!(g->colscale = malloc(t->cols * sizeof(float)))) return -1;
  for (uint64_t c = 0; c < t->cols; c++) g->colscale[c] = 1.0f;
  int n_oc = t->out_cols ? 1 + (int)(qsyn_mix(k + 2) % 4) : 0; /* 1..4 outlier input features */
  for (int i = 0; i < n_oc; i++) {
    uint64_t h = qsyn_mix(k + 100 + (uint64_t)i);
    g->colscale[h % t->cols] = (float)(2.0 + 2.0 * qsyn_unit(qsyn_mix(h)));
  }
  g->n_out = t->out_lo > 0 ? 4 + (int)(qsyn_mix(k + 3) % (QSYN_MAX_OUTLIERS - 3)) : 0; /* 4..16 */
  for (int i = 0; i < g->n_out; i++) {
    uint64_t h = qsyn_mix(k + 200 + (uint64_t)i), h2 = qsyn_mix(h);
    g->out_row[i] = h % t->rows;
    g->out_col[i] = (h >> 32) % t->cols;
    float m = (float)(g->sigma * (t->out_lo + 2.0 * t->out_lo * qsyn_unit(h2)));
    g->out_val[i] = (h2 & 1) ? -m : m;
  }
  return 0;
}

static void qsyn_gen_free(qsyn_gen *g) { free(g->colscale); }

/* Rows [r0, r0 + nr) of the tensor into out (nr * cols floats). */
static void qsyn_gen_rows(const qsyn_gen *g, uint64_t r0, uint64_t nr, float *out) {
  const qsyn_tensor *t = g->t;
  uint64_t cols = t->cols;
  for (uint64_t r = r0; r < r0 + nr; r++, out += cols) {
    uint64_t rk = qsyn_mix(t->key ^ ((r + 1) * 0xD1B54A32D192ED03ull));
    uint64_t st = rk, z = 0;
    if (t->ndim == 1) {
      float mean = (float)g->mean, sd = (float)g->sigma;
      for (uint64_t c = 0; c < cols; c++) {
        if (c % 3 == 0) z = qsyn_next(&st);
        out[c] = mean + sd * qsyn_draw(z >> (21 * (c % 3)));
      }
      continue;
    }
    float rs = (float)(g->sigma * exp(t->row_sd * qsyn_gauss(qsyn_mix(rk ^ 0x5851F42D4C957F2Dull))));
    const float *cs = g->colscale;
    uint64_t c = 0;
    for (; c + 3 <= cols; c += 3) {
      z = qsyn_next(&st);
      out[c] = rs * cs[c] * qsyn_draw(z);
      out[c + 1] = rs * cs[c + 1] * qsyn_draw(z >> 21);
      out[c + 2] = rs * cs[c + 2] * qsyn_draw(z >> 42);
    }
    z = qsyn_next(&st);
    for (int k = 0; c < cols; c++, k++) out[c] = rs * cs[c] * qsyn_draw(z >> (21 * k));
    for (int i = 0; i < g->n_out; i++)
      if (g->out_row[i] == r) out[g->out_col[i]] = g->out_val[i];
  }
}

/* ---------------------------------------------------------------------------------------------
 * The fitter thread: fits every tensor's codec parameters in order, ahead of the writer. */
typedef struct qsyn_fitter {
  pthread_t th;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  const qsyn_tensor *v;  /* the plan */
  const int *codecs;     /* codec per tensor */
  qc_params *params;     /* out: one per tensor, valid for i < done */
  size_t n;              /* tensors */
  size_t done;           /* tensors fitted (guarded by mu) */
  int rc;                /* first error (guarded by mu), msg names the tensor */
  int stop;              /* the writer gave up (guarded by mu) */
  char msg[512];
} qsyn_fitter;

static int qsyn_fit_one(qsyn_fitter *F, size_t i, float *buf) {
  const qsyn_tensor *t = &F->v[i];
  qc_codec codec = (qc_codec)F->codecs[i];
  qc_fit *fit;
  int rc = qc_fit_new(codec, t->cols, NULL, &fit);
  if (rc) return rc;
  qsyn_gen g;
  if (qsyn_gen_init(&g, t)) {
    qc_fit_free(fit);
    return QINS_ENOMEM;
  }
  /* Lossless codecs' parameters do not depend on the data: no pass over it. */
  uint64_t batch = QSYN_FIT_BATCH / t->cols ? QSYN_FIT_BATCH / t->cols : 1;
  for (uint64_t r = 0; qc_codec_is_lossy(codec) && !rc && r < t->rows; r += batch) {
    uint64_t nr = t->rows - r < batch ? t->rows - r : batch;
    qsyn_gen_rows(&g, r, nr, buf);
    rc = qc_fit_add(fit, buf, nr, NULL);
    pthread_mutex_lock(&F->mu);
    if (F->stop) rc = QINS_EINTERNAL;
    pthread_mutex_unlock(&F->mu);
  }
  if (!rc) rc = qc_fit_finish(fit, &F->params[i]);
  qc_fit_free(fit);
  qsyn_gen_free(&g);
  return rc;
}

static void *qsyn_fitter_main(void *arg) {
  qsyn_fitter *F = arg;
  uint64_t maxc = 1;
  for (size_t i = 0; i < F->n; i++)
    if (F->v[i].cols > maxc) maxc = F->v[i].cols;
  uint64_t cap = QSYN_FIT_BATCH > maxc ? QSYN_FIT_BATCH : maxc;
  float *buf = malloc(cap * sizeof(float));
  int rc = buf ? 0 : QINS_ENOMEM;
  size_t i = 0;
  for (; !rc && i < F->n; i++) {
    rc = qsyn_fit_one(F, i, buf);
    pthread_mutex_lock(&F->mu);
    if (!rc) F->done = i + 1;
    pthread_cond_broadcast(&F->cv);
    pthread_mutex_unlock(&F->mu);
  }
  free(buf);
  pthread_mutex_lock(&F->mu);
  if (rc && !F->rc) {
    F->rc = rc;
    snprintf(F->msg, sizeof F->msg, "tensor %s: codec %s: fit failed (%s)",
             i > 0 && i <= F->n ? F->v[i - 1].name : "?",
             qc_codec_name((qc_codec)F->codecs[i > 0 ? i - 1 : 0]), qins_strerror(rc));
  }
  pthread_cond_broadcast(&F->cv);
  pthread_mutex_unlock(&F->mu);
  return NULL;
}

/* Waits until tensor i is fitted: 0, or the fitter's error. */
static int qsyn_fitter_wait(qsyn_fitter *F, size_t i) {
  pthread_mutex_lock(&F->mu);
  while (F->done <= i && !F->rc) pthread_cond_wait(&F->cv, &F->mu);
  int rc = F->done > i ? 0 : F->rc;
  pthread_mutex_unlock(&F->mu);
  return rc;
}

/* ---------------------------------------------------------------------------------------------
 * The command */
static void qsyn_list(void) {
  for (size_t i = 0; i < QSYN_NARCHS; i++) {
    size_t n = qsyn_plan(&qsyn_archs[i], 0, NULL);
    qsyn_tensor *v = calloc(n, sizeof *v);
    uint64_t el = 0;
    if (v) {
      qsyn_plan(&qsyn_archs[i], 0, v);
      for (size_t j = 0; j < n; j++) el += v[j].rows * v[j].cols;
    }
    printf("%-14s %4zu tensors %14" PRIu64 " weights  %s\n", qsyn_archs[i].name, n, el,
           qsyn_archs[i].summary);
    free(v);
  }
}

typedef struct qsyn_result {
  uint64_t n_tensors, n_elem, src_bytes, stored_bytes;
  double snr_w, snr_n; /* element-weighted SNR over lossy matrices */
} qsyn_result;

/* Streams every tensor of the plan into the open import im. */
static int qsyn_write(qctl_ctx *c, qs_import *im, const qsyn_tensor *v, size_t n, const int *codecs,
                      qsyn_result *res) {
  qsyn_fitter F;
  memset(&F, 0, sizeof F);
  F.v = v, F.codecs = codecs, F.n = n;
  if (!(F.params = calloc(n, sizeof *F.params))) return qctl_fail(c, "out of memory");
  pthread_mutex_init(&F.mu, NULL);
  pthread_cond_init(&F.cv, NULL);
  int rc = QCTL_OK;
  if (pthread_create(&F.th, NULL, qsyn_fitter_main, &F)) {
    rc = qctl_fail(c, "cannot start the fitter thread");
    goto out_nothread;
  }
  float *buf = NULL;
  size_t cap = 0;
  int tty = isatty(2);
  double t0 = qctl_now(), last = 0;
  uint64_t total = 0, done = 0;
  for (size_t i = 0; i < n; i++) total += v[i].rows * v[i].cols * sizeof(float);
  for (size_t i = 0; i < n && rc == QCTL_OK; i++) {
    const qsyn_tensor *t = &v[i];
    int e = qsyn_fitter_wait(&F, i);
    if (e) {
      rc = qctl_fail(c, "%s", F.msg);
      break;
    }
    qs_tensor_desc d;
    memset(&d, 0, sizeof d);
    d.name = t->name;
    d.src_dtype = QS_DT_F32;
    d.ndim = t->ndim;
    if (t->ndim == 1) d.shape[0] = t->cols;
    else d.shape[0] = t->rows, d.shape[1] = t->cols;
    d.codec = codecs[i];
    d.params = &F.params[i];
    if ((e = qs_import_tensor_begin(im, &d))) {
      rc = qctl_fail(c, "%s", qs_error());
      break;
    }
    uint64_t cr = qs_import_chunk_rows(im);
    if (cr > t->rows) cr = t->rows;
    if (cr * t->cols > cap) {
      free(buf);
      cap = cr * t->cols;
      if (!(buf = malloc(cap * sizeof(float)))) {
        rc = qctl_fail(c, "out of memory for a %zu-float batch", cap);
        break;
      }
    }
    qsyn_gen g;
    if (qsyn_gen_init(&g, t)) {
      rc = qctl_fail(c, "out of memory");
      break;
    }
    for (uint64_t r = 0; r < t->rows && !e; r += cr) {
      uint64_t nr = t->rows - r < cr ? t->rows - r : cr;
      qsyn_gen_rows(&g, r, nr, buf);
      e = qs_import_tensor_rows(im, buf, nr, NULL);
      done += nr * t->cols * sizeof(float);
      double now = qctl_now();
      if (tty && now - last >= 0.2) {
        last = now;
        fprintf(stderr, "\r%3d%% %9.1f MB %7.1f MB/s %-48.48s", (int)(100.0 * (double)done / (double)total),
                (double)done / 1e6, (double)done / 1e6 / (now - t0), t->name);
      }
    }
    qsyn_gen_free(&g);
    qs_tensor st;
    if (!e) e = qs_import_tensor_end(im, &st);
    if (e) {
      rc = qctl_fail(c, "%s", qs_error());
      break;
    }
    res->n_tensors++;
    res->n_elem += st.n_elem;
    res->src_bytes += st.src_bytes;
    res->stored_bytes += st.stored_bytes;
    if (st.ndim >= 2 && qc_codec_is_lossy((qc_codec)st.codec) && isfinite(st.snr_db)) {
      res->snr_w += st.snr_db * (double)st.n_elem;
      res->snr_n += (double)st.n_elem;
    }
  }
  if (tty) fprintf(stderr, "\r%90s\r", "");
  free(buf);
  pthread_mutex_lock(&F.mu);
  F.stop = 1;
  pthread_mutex_unlock(&F.mu);
  pthread_join(F.th, NULL);
out_nothread:
  pthread_mutex_destroy(&F.mu);
  pthread_cond_destroy(&F.cv);
  free(F.params);
  return rc;
}

int qctl_cmd_synth(qctl_ctx *c, int argc, char **argv) {
  static const struct option opts[] = {{"arch", required_argument, 0, 'A'},
                                       {"model", required_argument, 0, 'm'},
                                       {"seed", required_argument, 0, 's'},
                                       QCTL_CODEC_OPTIONS,
                                       {"list", no_argument, 0, 'l'},
                                       {0, 0, 0, 0}};
  const qsyn_arch *arch = NULL;
  const char *model = NULL;
  uint64_t seed = 1;
  int codec_all = -1, list = 0, rc = QCTL_OK, ch;
  qs_codec_rule *rules = calloc((size_t)argc + 1, sizeof *rules);
  size_t n_rules = 0;
  if (!rules) return qctl_fail(c, "out of memory");
  qctl_getopt_reset();
  while ((ch = getopt_long(argc, argv, "A:m:s:c:r:l", opts, NULL)) != -1) {
    switch (ch) {
    case 'A':
      for (size_t i = 0; i < QSYN_NARCHS; i++)
        if (!strcmp(qsyn_archs[i].name, optarg)) arch = &qsyn_archs[i];
      if (!arch) {
        fprintf(stderr, "qinsctl synth: unknown arch \"%s\" (qinsctl synth --list shows them)\n", optarg);
        rc = QCTL_USAGE;
      }
      break;
    case 'm': model = optarg; break;
    case 's': {
      char *end;
      seed = strtoull(optarg, &end, 0);
      if (!*optarg || *end || optarg[0] == '-') {
        fprintf(stderr, "qinsctl synth: --seed wants an unsigned integer, got \"%s\"\n", optarg);
        rc = QCTL_USAGE;
      }
      break;
    }
    case 'c':
      if ((codec_all = qctl_codec_arg(c, optarg)) < 0) rc = QCTL_USAGE;
      break;
    case 'r':
      if (qctl_codec_rule_arg(c, optarg, &rules[n_rules])) rc = QCTL_USAGE;
      else n_rules++;
      break;
    case 'l': list = 1; break;
    default: rc = QCTL_USAGE;
    }
  }
  if (rc == QCTL_OK && optind != argc) rc = QCTL_USAGE;
  if (rc == QCTL_OK && list) {
    free(rules);
    qsyn_list();
    return QCTL_OK;
  }
  if (rc == QCTL_OK && !arch) {
    fprintf(stderr, "qinsctl synth: --arch is required (qinsctl synth --list shows them)\n");
    rc = QCTL_USAGE;
  }
  if (rc != QCTL_OK) {
    free(rules);
    return qctl_usage(c, rc);
  }
  if ((rc = qctl_need_store(c))) {
    free(rules);
    return rc;
  }
  if (!model) model = arch->name;

  size_t n = qsyn_plan(arch, seed, NULL);
  qsyn_tensor *v = calloc(n, sizeof *v);
  int *codecs = calloc(n, sizeof *codecs);
  if (!v || !codecs) {
    free(v), free(codecs), free(rules);
    return qctl_fail(c, "out of memory");
  }
  qsyn_plan(arch, seed, v);
  /* The import policy (docs/qinsctl.md §import): last matching --codec-for, --codec, qins8 for
   * matrices and f32 for vectors. */
  for (size_t i = 0; i < n; i++) {
    codecs[i] = v[i].ndim >= 2 ? QC_QINS8 : QC_F32;
    if (codec_all >= 0) codecs[i] = codec_all;
    for (size_t k = 0; k < n_rules; k++)
      if (fnmatch(rules[k].glob, v[i].name, 0) == 0) codecs[i] = rules[k].codec;
  }
  pthread_once(&qsyn_table_once, qsyn_table_init);

  qs_store *s;
  if ((rc = qctl_open(c, &s, QS_OPEN_CREATE))) {
    free(v), free(codecs), free(rules);
    return rc;
  }
  char meta[1024];
  int ml = snprintf(meta, sizeof meta,
                    "{\"synthetic\":\"qinsctl synth\",\"synth_version\":\"%d\",\"arch\":\"%s\",\"seed\":\"%" PRIu64
                    "\",\"format\":\"pt\"",
                    QSYN_VERSION, arch->name, seed);
  /* llama2.c's hyper-parameters, as its safetensors __metadata__ holds them (strings). */
  if (arch->layout == QSYN_LLAMA2)
    ml += snprintf(meta + ml, sizeof meta - (size_t)ml,
                   ",\"source\":\"qinsctl synth: random weights, tokens are not text\",\"dim\":\"%u\","
                   "\"hidden_dim\":\"%u\",\"n_layers\":\"%u\",\"n_heads\":\"%u\",\"n_kv_heads\":\"%u\","
                   "\"vocab_size\":\"%u\",\"max_seq_len\":\"%u\",\"tied_embeddings\":\"true\"",
                   arch->hidden, arch->inter, arch->layers, arch->heads, arch->kv_heads, arch->vocab,
                   arch->seq_len);
  snprintf(meta + ml, sizeof meta - (size_t)ml, "}");
  qs_import *im;
  double t0 = qctl_now();
  qsyn_result res;
  memset(&res, 0, sizeof res);
  if (qs_import_begin(s, model, meta, &im)) {
    rc = qctl_fail(c, "%s", qs_error());
  } else if ((rc = qsyn_write(c, im, v, n, codecs, &res)) != QCTL_OK) {
    qs_import_abort(im);
  } else if (qs_import_commit(im)) {
    rc = qctl_fail(c, "%s", qs_error());
  }
  double dt = qctl_now() - t0;
  qs_close(s);
  free(v), free(codecs), free(rules);
  if (rc != QCTL_OK) return rc;

  double bpw = res.n_elem ? (double)res.stored_bytes / (double)res.n_elem : 0;
  double ratio = res.stored_bytes ? (double)res.src_bytes / (double)res.stored_bytes : 0;
  double mbs = dt > 0 ? (double)res.src_bytes / 1e6 / dt : 0;
  double snr = res.snr_n > 0 ? res.snr_w / res.snr_n : INFINITY;
  if (c->json) {
    printf("{\"model\":");
    qctl_jstr(stdout, model);
    printf(",\"arch\":\"%s\",\"seed\":%" PRIu64, arch->name, seed);
    qctl_json_sizes(res.n_tensors, res.n_elem, res.src_bytes, res.stored_bytes);
    putchar(',');
    qctl_json_import_figures(bpw, ratio, snr, dt, mbs);
  } else {
    char a[32], b[32];
    printf("synthesized %s (%s, seed %" PRIu64 "): %" PRIu64 " tensors, %" PRIu64
           " weights, %s -> %s (%.2fx, %.3f bytes/weight), matrices SNR %.2f dB, %.1f s, %.1f MB/s\n",
           model, arch->name, seed, res.n_tensors, res.n_elem, qctl_human(res.src_bytes, a, sizeof a),
           qctl_human(res.stored_bytes, b, sizeof b), ratio, bpw, snr, dt, mbs);
  }
  return QCTL_OK;
}
