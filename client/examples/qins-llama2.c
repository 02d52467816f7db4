/* SPDX-License-Identifier: MIT */
/*
 * qins-llama2.c — an inference worker for llama2.c's model architecture whose weights come from
 * qinsd (through libqins) or, as the FP32 reference, straight from a safetensors file; with both it
 * measures how far the served weights move the model's output (issue 5; ../shared/models/README.md;
 * usage and output: docs/client.md §3).
 *
 *   qins-llama2 --socket PATH --model NAME [--steps N] [--temperature T --topp P --seed S]
 *               [--reference FILE.safetensors] [--tokens-out FILE] [--budget BYTES]
 *   qins-llama2 --reference FILE.safetensors [--simulate q8_0] ...
 *
 * Forward pass. llama2.c's run.c, written as strict left-to-right float32: every dot product is
 * one float accumulator summed in index order, RMSNorm eps 1e-5, RoPE on adjacent pairs with
 * 1/10000^(2i/head_size) per head, grouped-query attention, SwiGLU, final RMSNorm and the
 * classifier tied to the token embedding. No FMA contraction: this file must be compiled in an ISO
 * C mode (-std=c11, where GCC's default is -ffp-contract=off) without -ffast-math; the #error
 * guards below refuse anything else. That is what makes the reference logits bit-identical to
 * run.c's (the reference greedy500.txt was made by run.c).
 *
 * Weight providers (struct wprov). Weights are used one *unit* at a time: unit l < n_layers is
 * layer l's nine tensors, unit n_layers the head (final norm and classifier); a token's embedding
 * row is fetched on its own (a one-row slice through qinsd).
 *  - memory: every tensor in memory as FP32 — from a .safetensors file (the reference), from a
 *    llama2.c legacy .bin checkpoint, or those weights passed through a simulated codec
 *    (--simulate q8_0: llama.cpp's Q8_0, blocks of 32, fp16 scale absmax/127, round half away
 *    from zero).
 *  - qinsd: units fetched with get_many (one round trip per unit, payload read straight into the
 *    unit's buffer) into a cache holding at most --budget bytes of decoded weights. While the
 *    worker computes with unit u, a prefetch thread (its own connection: libqins is one
 *    connection per thread) fetches unit u+1 (wrapping to layer 0 after the head) if it fits in
 *    the budget beside what is pinned; least recently used units are evicted to make room. The
 *    default budget is the smallest that streams: the two largest units.
 *  - qinsd-map (--map): units mapped from qinsd's shared arena (map_many), read in place: no
 *    private copy; all units stay mapped unless the arena or --budget is smaller than the model,
 *    then least recently used units are released, as the qinsd provider streams.
 *
 * Comparison (both paths). The FP32 path generates a sequence S (greedy or run.c's sampler). The
 * served path runs teacher-forced on S (same tokens, for the KL divergence and top-1 agreement of
 * each next-token distribution) and free-running with its own sampler (same seed) for token
 * parity; the two share one state until the free-running tokens first differ from S, when the
 * state is copied (exact: both have seen the same tokens). Weights are fetched once per unit per
 * step and applied to both states.
 *
 * Invariants: positions < seq_len; every tensor's shape is checked against the config before use;
 * KLD is computed in double from the float logits (softmax at temperature 1).
 */
#if defined(__FAST_MATH__)
#error "qins-llama2.c must be built without -ffast-math: its logits must match run.c bit for bit"
#endif
#if defined(__GNUC__) && !defined(__clang__) && !defined(__STRICT_ANSI__)
#error "build qins-llama2.c with -std=c11 (ISO mode: GCC then defaults to -ffp-contract=off)"
#endif

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "qins.h"
#include "safetensors.h"

/* ------------------------------------------------------------------------------------------------
 * Config and tensor names */

typedef struct cfg {
  int dim;        /* transformer width */
  int hidden_dim; /* feed-forward width */
  int n_layers;   /* layers */
  int n_heads;    /* query heads */
  int n_kv_heads; /* key/value heads (GQA: n_heads is a multiple) */
  int vocab_size; /* tokens */
  int seq_len;    /* maximum positions */
} cfg;

enum { W_ATT_NORM, W_Q, W_K, W_V, W_O, W_FFN_NORM, W_1, W_2, W_3, W_LAYER_N };
enum { W_NORM = 0, W_CLS = 1, W_HEAD_N = 2 };
#define W_MAX W_LAYER_N

#define EMBED_NAME "tok_embeddings.weight"

static int unit_count(const cfg *c) { return c->n_layers + 1; }
static int unit_ntensors(const cfg *c, int u) { return u < c->n_layers ? W_LAYER_N : W_HEAD_N; }

/* Served models may carry other checkpoints' names (issue 15): Hugging Face's
 * (model.layers.N.self_attn.q_proj.weight ...) or GGUF's (blk.N.attn_q.weight ...), tensor for
 * tensor the same shapes (GGUF's reversed dims are row-major again in the store). The classifier
 * is its own tensor when the model has one (lm_head.weight, output.weight), else the embedding.
 * Hugging Face's q_proj/k_proj rows are permuted for its half-split rotary (transformers'
 * convert_llama_weights_to_hf); llama.cpp's converter undoes that, so GGUF holds them in llama2.c's
 * (Meta's) adjacent-pair order, and only HF weights are un-permuted after a fetch (hf_unpermute),
 * or, read in place (--map), the q and k vectors they produce (each element is the same row's dot
 * product in either order, so both give llama2.c's values bit for bit). */
enum { NS_LLAMA2C, NS_HF, NS_GGUF, NS_COUNT };
static const char *const ns_name[NS_COUNT] = {"llama2.c", "Hugging Face", "GGUF"};
static const char *const ns_prefix[NS_COUNT] = {"layers.", "model.layers.", "blk."};
static const char *const ns_layer[NS_COUNT][W_LAYER_N] = { /* after "PREFIX N." */
    {"attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
     "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
     "feed_forward.w3.weight"},
    {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
     "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
     "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"},
    {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
     "ffn_norm.weight", "ffn_gate.weight", "ffn_down.weight", "ffn_up.weight"}};
static const char *const ns_norm[NS_COUNT] = {"norm.weight", "model.norm.weight", "output_norm.weight"};
static const char *const ns_embed[NS_COUNT] = {EMBED_NAME, "model.embed_tokens.weight", "token_embd.weight"};
static const char *const ns_cls[NS_COUNT] = {NULL, "lm_head.weight", "output.weight"};

typedef struct tnames {
  int ns;         /* NS_* */
  int own_cls;    /* the classifier is ns_cls[ns], not the embedding */
} tnames;

static void ns_tensor_name(const tnames *nm, const cfg *c, int u, int i, char *out, size_t n) {
  if (u < c->n_layers)
    snprintf(out, n, "%s%d.%s", ns_prefix[nm->ns], u, ns_layer[nm->ns][i]);
  else
    snprintf(out, n, "%s", i == W_NORM ? ns_norm[nm->ns] : nm->own_cls ? ns_cls[nm->ns] : ns_embed[nm->ns]);
}

/* llama2.c's names (the reference file's). */
static void tensor_name(const cfg *c, int u, int i, char *out, size_t n) {
  static const tnames ll = {NS_LLAMA2C, 0};
  ns_tensor_name(&ll, c, u, i, out, n);
}

/* HF's q/k rows back to adjacent-pair rotary order: within each head of hs rows, HF row
 * j * hs/2 + i holds llama2.c's row 2i + j. */
static void hf_unpermute(float *w, int heads, int hs, int cols) {
  size_t rb = (size_t)cols * sizeof(float);
  float *tmp = malloc((size_t)hs * rb);
  if (!tmp) {
    fprintf(stderr, "qins-llama2: out of memory\n");
    exit(1);
  }
  for (int h = 0; h < heads; h++) {
    float *hw = w + (size_t)h * (size_t)hs * (size_t)cols;
    memcpy(tmp, hw, (size_t)hs * rb);
    for (int i = 0; i < hs / 2; i++)
      for (int j = 0; j < 2; j++)
        memcpy(hw + (size_t)(2 * i + j) * (size_t)cols, tmp + (size_t)(j * (hs / 2) + i) * (size_t)cols, rb);
  }
  free(tmp);
}

/* Expected [rows, cols] of tensor i of unit u (1-D tensors: rows 1). */
static void tensor_shape(const cfg *c, int u, int i, int *rows, int *cols) {
  int hs = c->dim / c->n_heads, kv_dim = hs * c->n_kv_heads;
  *rows = 1;
  *cols = c->dim;
  if (u == c->n_layers) {
    if (i == W_CLS) *rows = c->vocab_size;
    return;
  }
  switch (i) {
  case W_Q: case W_O: *rows = c->dim; break;
  case W_K: case W_V: *rows = kv_dim; break;
  case W_1: case W_3: *rows = c->hidden_dim; break;
  case W_2: *rows = c->dim; *cols = c->hidden_dim; break;
  default: break;
  }
}

static size_t tensor_elems(const cfg *c, int u, int i) {
  int r, k;
  tensor_shape(c, u, i, &r, &k);
  return (size_t)r * (size_t)k;
}

static size_t unit_bytes(const cfg *c, int u) {
  size_t b = 0;
  for (int i = 0; i < unit_ntensors(c, u); i++) b += tensor_elems(c, u, i) * sizeof(float);
  return b;
}

static int cfg_check(const cfg *c, char *err, size_t errlen) {
  if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
      c->n_kv_heads <= 0 || c->vocab_size <= 1 || c->seq_len <= 0 || c->dim % c->n_heads ||
      c->n_heads % c->n_kv_heads || (c->dim / c->n_heads) % 2 || c->dim > 1 << 20 ||
      c->hidden_dim > 1 << 22 || c->n_layers > 4096 || c->vocab_size > 1 << 22 ||
      c->seq_len > 1 << 20) {
    snprintf(err, errlen,
             "implausible config: dim %d hidden %d layers %d heads %d kv_heads %d vocab %d seq %d",
             c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size,
             c->seq_len);
    return -1;
  }
  return 0;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("qins-llama2: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (!p) die("out of memory (%zu x %zu bytes)", n, size);
  return p;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------------------------------------
 * Weight providers */

typedef struct wprov wprov;
struct wprov {
  const char *kind;                                        /* "fp32", "q8_0", "qinsd" */
  int (*embed)(wprov *p, int token, float *out);           /* row `token` of the embedding */
  int (*acquire)(wprov *p, int unit, const float **w);     /* w[W_MAX]: the unit's tensors */
  void (*release)(wprov *p, int unit);                     /* done with the unit */
  void (*destroy)(wprov *p);
  uint64_t fetched_bytes; /* decoded bytes received from the daemon (qinsd provider) */
  uint64_t fetches;       /* round trips for weights */
  uint64_t peak_bytes;    /* most decoded bytes held at once */
  uint64_t budget;        /* qinsd: bytes of decoded weights it may hold */
  uint64_t reconnects;    /* qinsd: connections libqins reopened (daemon restarts ridden out) */
  int qk_hf;              /* q/k rows in Hugging Face's order (read in place): layer_forward
                             un-permutes the q and k vectors instead of the weights */
};

/* --- memory provider --------------------------------------------------------------------------*/

typedef struct memprov {
  wprov base;
  cfg c;
  float **t;      /* t[u * W_MAX + i]: tensor i of unit u, owned */
  void *map;      /* the mapped file (reference), or NULL */
  size_t map_len; /* its length */
} memprov;

static float **mem_slot(memprov *m, int u, int i) { return &m->t[(size_t)u * W_MAX + (size_t)i]; }

static int mem_embed(wprov *p, int token, float *out) {
  memprov *m = (memprov *)p;
  const float *e = *mem_slot(m, m->c.n_layers, W_CLS);
  memcpy(out, e + (size_t)token * (size_t)m->c.dim, (size_t)m->c.dim * sizeof(float));
  return 0;
}
static int mem_acquire(wprov *p, int u, const float **w) {
  memprov *m = (memprov *)p;
  for (int i = 0; i < unit_ntensors(&m->c, u); i++) w[i] = *mem_slot(m, u, i);
  return 0;
}
static void mem_release(wprov *p, int u) { (void)p, (void)u; }
static void mem_destroy(wprov *p) {
  memprov *m = (memprov *)p;
  if (!m) return;
  for (int u = 0; u < unit_count(&m->c); u++)
    for (int i = 0; i < unit_ntensors(&m->c, u); i++) free(*mem_slot(m, u, i));
  free(m->t);
  free(m);
}

static memprov *mem_new(const cfg *c, const char *kind) {
  memprov *m = xcalloc(1, sizeof *m);
  m->c = *c;
  m->t = xcalloc((size_t)unit_count(c) * W_MAX, sizeof(float *));
  m->base = (wprov){.kind = kind, .embed = mem_embed, .acquire = mem_acquire,
                    .release = mem_release, .destroy = mem_destroy};
  uint64_t total = 0;
  for (int u = 0; u < unit_count(c); u++) {
    for (int i = 0; i < unit_ntensors(c, u); i++)
      *mem_slot(m, u, i) = xcalloc(tensor_elems(c, u, i), sizeof(float));
    total += unit_bytes(c, u);
  }
  m->base.peak_bytes = total;
  return m;
}

/* llama2.c legacy checkpoint: 7 int32 then the float arrays in run.c's order (each weight kind
 * for all layers in turn). Kept to validate the forward pass against run.c's own input. */
static memprov *load_bin(const char *path, cfg *c) {
  FILE *f = fopen(path, "rb");
  if (!f) die("%s: %s", path, strerror(errno));
  int32_t h[7];
  if (fread(h, sizeof h, 1, f) != 1) die("%s: truncated header", path);
  int shared = h[5] > 0;
  *c = (cfg){h[0], h[1], h[2], h[3], h[4], abs(h[5]), h[6]};
  char err[256];
  if (cfg_check(c, err, sizeof err)) die("%s: %s", path, err);
  memprov *m = mem_new(c, "fp32");
  int L = c->n_layers;
#define RD(ptr, n)                                                                          \
  do {                                                                                      \
    if (fread((ptr), sizeof(float), (n), f) != (size_t)(n)) die("%s: truncated", path);    \
  } while (0)
  RD(*mem_slot(m, L, W_CLS), tensor_elems(c, L, W_CLS));
  static const int order[] = {W_ATT_NORM, W_Q, W_K, W_V, W_O, W_FFN_NORM, W_1, W_2, W_3};
  for (size_t k = 0; k < sizeof order / sizeof order[0]; k++)
    for (int l = 0; l < L; l++) RD(*mem_slot(m, l, order[k]), tensor_elems(c, l, order[k]));
  RD(*mem_slot(m, L, W_NORM), (size_t)c->dim);
#undef RD
  if (!shared) die("%s: untied classifier not supported", path);
  fclose(f);
  return m;
}

/* Reads an integer hyper-parameter from a JSON metadata object (values are strings in
 * safetensors metadata, numbers elsewhere). */
static int meta_int(const qs_json *meta, const char *key, int *out) {
  const qs_json *v = qs_json_get(meta, key);
  if (!v) return -1;
  if (v->type == QS_JSON_NUMBER && (v->num_flags & QS_JSON_IS_I64)) {
    if (v->i64 < INT32_MIN || v->i64 > INT32_MAX) return -1;
    *out = (int)v->i64;
    return 0;
  }
  if (v->type != QS_JSON_STRING) return -1;
  char *end;
  errno = 0;
  long x = strtol(v->str, &end, 10);
  if (errno || end == v->str || *end || x < INT32_MIN || x > INT32_MAX) return -1;
  *out = (int)x;
  return 0;
}

/* Seven hyper-parameters from obj under the given keys (each prefixed by `prefix`), in cfg order
 * dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a NULL or absent
 * n_kv_heads key means n_heads, a NULL vocab key is left to the caller. */
static int cfg_keys(const qs_json *obj, const char *prefix, const char *const keys[7], cfg *c,
                    char *err, size_t errlen) {
  int *dst[7] = {&c->dim,        &c->hidden_dim, &c->n_layers, &c->n_heads,
                 &c->n_kv_heads, &c->vocab_size, &c->seq_len};
  for (int i = 0; i < 7; i++) {
    char k[128];
    if (!keys[i]) continue;
    snprintf(k, sizeof k, "%s%s", prefix, keys[i]);
    if (meta_int(obj, k, dst[i])) {
      if (i == 4 && !qs_json_get(obj, k)) {
        c->n_kv_heads = c->n_heads;
        continue;
      }
      snprintf(err, errlen, "metadata lacks integer \"%s\"", k);
      return -1;
    }
  }
  if (!keys[4]) c->n_kv_heads = c->n_heads;
  return 0;
}

/* The rotary base, if the metadata gives one, must be llama2.c's 10000. */
static int rope_check(const qs_json *obj, const char *key, char *err, size_t errlen) {
  const qs_json *v = qs_json_get(obj, key);
  double th = v && v->type == QS_JSON_NUMBER ? v->num : v && v->type == QS_JSON_STRING ? atof(v->str) : 10000;
  if (th == 10000) return 0;
  snprintf(err, errlen, "%s is %g: this worker's rotary embedding uses 10000", key, th);
  return -1;
}

/* Fills c from the hyper-parameters in metadata JSON text: llama2.c's names (dim, hidden_dim, ...
 * as its export writes them), else a Hugging Face llama config.json (kept under "hf"."config"),
 * else GGUF llama keys (ARCH.embedding_length, ...; the vocabulary from ARCH.vocab_size or the
 * tokenizer's token list). */
static int cfg_from_meta(const char *text, size_t len, cfg *c, char *err, size_t errlen) {
  qs_json *j = NULL;
  if (qs_json_parse(text, len, &j, err, errlen)) return -1;
  static const char *const ll[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                                    "vocab_size", "max_seq_len"};
  static const char *const hf[7] = {"hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "vocab_size",
                                    "max_position_embeddings"};
  static const char *const gg[7] = {"embedding_length", "feed_forward_length", "block_count",
                                    "attention.head_count", "attention.head_count_kv", NULL,
                                    "context_length"};
  const qs_json *h = qs_json_get(qs_json_get(j, "hf"), "config");
  const qs_json *arch = qs_json_get(j, "general.architecture");
  int rc;
  if (qs_json_get(j, "dim") || (!h && !arch)) {
    rc = cfg_keys(j, "", ll, c, err, errlen);
  } else if (h) {
    rc = cfg_keys(h, "", hf, c, err, errlen);
    if (!rc) rc = rope_check(h, "rope_theta", err, errlen);
  } else {
    char pre[96], k[128];
    snprintf(pre, sizeof pre, "%s.", arch->type == QS_JSON_STRING ? arch->str : "?");
    rc = cfg_keys(j, pre, gg, c, err, errlen);
    snprintf(k, sizeof k, "%svocab_size", pre);
    if (!rc && meta_int(j, k, &c->vocab_size)) {
      const qs_json *kv = qs_json_get(qs_json_get(j, "gguf"), "kv");
      c->vocab_size = 0;
      for (size_t i = 0; kv && i < kv->len; i++) {
        const qs_json *e = &kv->items[i], *k0 = qs_json_at(e, 0), *v = qs_json_at(e, 2);
        const qs_json *cnt = qs_json_at(e, 3); /* [key, type, null, count]: a list sent apart */
        if (k0 && k0->type == QS_JSON_STRING && !strcmp(k0->str, "tokenizer.ggml.tokens") && v)
          c->vocab_size = cnt && (cnt->num_flags & QS_JSON_IS_I64) && cnt->i64 <= INT32_MAX
                              ? (int)cnt->i64 : (int)v->len;
      }
      if (!c->vocab_size) {
        snprintf(err, errlen, "metadata lacks %s and the tokenizer's token list", k);
        rc = -1;
      }
    }
    snprintf(k, sizeof k, "%srope.freq_base", pre);
    if (!rc) rc = rope_check(j, k, err, errlen);
  }
  qs_json_free(j);
  return rc ? rc : cfg_check(c, err, errlen);
}

/* The FP32 reference: a .safetensors file read through the store's validating reader (F32
 * tensors only: the reference is FP32 by definition). */
static memprov *load_safetensors(const char *path, cfg *c) {
  qs_st_file *st = NULL;
  char err[512];
  int rc = qs_st_open(path, &st, err, sizeof err);
  if (rc) die("%s", err);
  const char *meta = qs_st_metadata_json(st);
  if (cfg_from_meta(meta, strlen(meta), c, err, sizeof err))
    die("%s: __metadata__: %s", path, err);
  memprov *m = mem_new(c, "fp32");
  for (int u = 0; u < unit_count(c); u++)
    for (int i = 0; i < unit_ntensors(c, u); i++) {
      char name[QINS_MAX_NAME + 1];
      tensor_name(c, u, i, name, sizeof name);
      const qs_st_tensor *t = qs_st_find(st, name);
      if (!t) die("%s: no tensor %s", path, name);
      int rows, cols;
      tensor_shape(c, u, i, &rows, &cols);
      int ok = t->dtype == QS_ST_F32 &&
               ((t->ndim == 1 && rows == 1 && t->shape[0] == (uint64_t)cols) ||
                (t->ndim == 2 && t->shape[0] == (uint64_t)rows && t->shape[1] == (uint64_t)cols));
      if (!ok) die("%s: %s is not F32 of shape [%d, %d]", path, name, rows, cols);
      rc = qs_st_read(st, t, 0, t->nbytes, *mem_slot(m, u, i), err, sizeof err);
      if (rc) die("%s", err);
    }
  qs_st_close(st);
  return m;
}

/* llama.cpp's Q8_0 (ggml-quants.c quantize_row_q8_0_ref): per block of 32, d = absmax / 127 stored
 * as fp16, q = roundf(x * (1/d)) (half away from zero), x' = q * fp16(d). Applied row by row (a
 * row's last block may be shorter, as the qins codecs do) to every 2-D weight matrix; the 1-D norm
 * weights stay FP32 as llama.cpp keeps them. */
static void q8_0_row(float *x, size_t n) {
  for (size_t b = 0; b < n; b += 32) {
    size_t m = n - b < 32 ? n - b : 32;
    float amax = 0.0f;
    for (size_t j = 0; j < m; j++) {
      float a = fabsf(x[b + j]);
      if (a > amax) amax = a;
    }
    float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    float dh = (float)(_Float16)d;
    for (size_t j = 0; j < m; j++) {
      float q = roundf(x[b + j] * id);
      x[b + j] = q * dh;
    }
  }
}

static memprov *simulate_q8_0(const memprov *src) {
  const cfg *c = &src->c;
  memprov *m = mem_new(c, "q8_0");
  for (int u = 0; u < unit_count(c); u++)
    for (int i = 0; i < unit_ntensors(c, u); i++) {
      int rows, cols;
      tensor_shape(c, u, i, &rows, &cols);
      float *dst = *mem_slot(m, u, i);
      memcpy(dst, *mem_slot((memprov *)src, u, i), (size_t)rows * (size_t)cols * sizeof(float));
      if (rows > 1)
        for (int r = 0; r < rows; r++) q8_0_row(dst + (size_t)r * (size_t)cols, (size_t)cols);
    }
  return m;
}

/* --- qinsd provider ---------------------------------------------------------------------------*/

enum { U_EMPTY, U_LOADING, U_READY };

typedef struct qunit {
  int state;       /* U_EMPTY, U_LOADING (by the prefetcher), U_READY */
  int pins;        /* users now; a pinned unit is never evicted */
  uint64_t used;   /* tick of last use (LRU) */
  float *buf;      /* all the unit's tensors back to back, owned */
  const float *w[W_MAX];
} qunit;

typedef struct qprov {
  wprov base;
  cfg c;
  tnames nm;             /* the served model's tensor names */
  char *model;
  qins_client *cl;       /* the worker thread's connection */
  qins_client *pf;       /* the prefetch thread's connection */
  qunit *u;              /* [unit_count] */
  uint64_t held;         /* decoded bytes held (ready or loading) */
  uint64_t tick;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thr;
  int want;              /* unit the prefetcher should load, or -1 */
  int stop;
  int pf_err;            /* last prefetch failure (the worker then loads itself) */
  uint64_t pf_reconnects; /* the prefetch connection's reconnects (set by its thread) */
} qprov;

/* Sums both connections' reconnects into base.reconnects (lock held, on the worker thread: each
 * client's counters are read by the thread that uses it). */
static void q_count_reconnects(qprov *q) {
  qins_conn_stats st;
  qins_client_stats(q->cl, &st);
  q->base.reconnects = st.reconnects + q->pf_reconnects;
}

/* Fetches unit u into buf on connection cl (no lock held). */
static int q_fetch(qprov *q, qins_client *cl, int u, float *buf) {
  qins_get_req req[W_MAX];
  char names[W_MAX][QINS_MAX_NAME + 1];
  int n = unit_ntensors(&q->c, u);
  float *p = buf;
  for (int i = 0; i < n; i++) {
    ns_tensor_name(&q->nm, &q->c, u, i, names[i], sizeof names[i]);
    size_t bytes = tensor_elems(&q->c, u, i) * sizeof(float);
    req[i] = (qins_get_req){.name = names[i], .buf = p, .buf_bytes = bytes};
    p += tensor_elems(&q->c, u, i);
  }
  int rc = qins_get_many_into(cl, q->model, req, n, QINS_F32);
  if (rc) {
    fprintf(stderr, "qins-llama2: fetching unit %d of %s: %s\n", u, q->model,
            qins_client_error(cl));
    return rc;
  }
  for (int i = 0; i < n; i++) {
    int rows, cols;
    tensor_shape(&q->c, u, i, &rows, &cols);
    int ok = req[i].out_bytes == tensor_elems(&q->c, u, i) * sizeof(float) &&
             ((req[i].ndim == 1 && rows == 1 && req[i].shape[0] == (uint64_t)cols) ||
              (req[i].ndim == 2 && req[i].shape[0] == (uint64_t)rows &&
               req[i].shape[1] == (uint64_t)cols));
    if (!ok) {
      fprintf(stderr, "qins-llama2: %s/%s has an unexpected shape\n", q->model, names[i]);
      return QINS_EFORMAT;
    }
  }
  if (q->nm.ns == NS_HF && u < q->c.n_layers) {
    int hs = q->c.dim / q->c.n_heads;
    hf_unpermute((float *)req[W_Q].buf, q->c.n_heads, hs, q->c.dim);
    hf_unpermute((float *)req[W_K].buf, q->c.n_kv_heads, hs, q->c.dim);
  }
  return 0;
}

/* Evicts LRU unpinned ready units until `need` more bytes fit. Lock held. 0 or -1 (cannot). */
static int q_make_room(qprov *q, uint64_t need) {
  while (q->held + need > q->base.budget) {
    int victim = -1;
    for (int i = 0; i < unit_count(&q->c); i++)
      if (q->u[i].state == U_READY && q->u[i].pins == 0 &&
          (victim < 0 || q->u[i].used < q->u[victim].used))
        victim = i;
    if (victim < 0) return -1;
    free(q->u[victim].buf);
    q->u[victim].buf = NULL;
    q->u[victim].state = U_EMPTY;
    q->held -= unit_bytes(&q->c, victim);
  }
  return 0;
}

static void q_set_ptrs(qprov *q, int u) {
  float *p = q->u[u].buf;
  for (int i = 0; i < unit_ntensors(&q->c, u); i++) {
    q->u[u].w[i] = p;
    p += tensor_elems(&q->c, u, i);
  }
}

static void q_note_held(qprov *q) {
  if (q->held > q->base.peak_bytes) q->base.peak_bytes = q->held;
}

static void *q_prefetch_main(void *arg) {
  qprov *q = arg;
  pthread_mutex_lock(&q->mu);
  for (;;) {
    while (!q->stop && q->want < 0) pthread_cond_wait(&q->cv, &q->mu);
    if (q->stop) break;
    int u = q->want;
    q->want = -1;
    uint64_t bytes = unit_bytes(&q->c, u);
    if (q->u[u].state != U_EMPTY || q_make_room(q, bytes)) continue;
    q->u[u].state = U_LOADING;
    q->held += bytes;
    q_note_held(q);
    pthread_mutex_unlock(&q->mu);
    float *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
    int rc = buf ? q_fetch(q, q->pf, u, buf) : QINS_ENOMEM;
    qins_conn_stats st;
    qins_client_stats(q->pf, &st);
    pthread_mutex_lock(&q->mu);
    q->pf_reconnects = st.reconnects;
    if (rc) {
      free(buf);
      q->u[u].state = U_EMPTY;
      q->held -= bytes;
      q->pf_err = rc;
    } else {
      q->u[u].buf = buf;
      q->u[u].state = U_READY;
      q_set_ptrs(q, u);
      q->base.fetched_bytes += bytes;
      q->base.fetches++;
    }
    pthread_cond_broadcast(&q->cv);
  }
  pthread_mutex_unlock(&q->mu);
  return NULL;
}

static int q_acquire(wprov *p, int u, const float **w) {
  qprov *q = (qprov *)p;
  int rc = 0;
  pthread_mutex_lock(&q->mu);
  while (q->u[u].state == U_LOADING) pthread_cond_wait(&q->cv, &q->mu);
  if (q->u[u].state == U_EMPTY) {
    uint64_t bytes = unit_bytes(&q->c, u);
    if (q_make_room(q, bytes)) {
      pthread_mutex_unlock(&q->mu);
      fprintf(stderr, "qins-llama2: budget %" PRIu64 " cannot hold unit %d (%" PRIu64 " bytes)\n",
              q->base.budget, u, bytes);
      return QINS_EBUFFER;
    }
    q->u[u].state = U_LOADING;
    q->held += bytes;
    q_note_held(q);
    pthread_mutex_unlock(&q->mu);
    float *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
    rc = buf ? q_fetch(q, q->cl, u, buf) : QINS_ENOMEM;
    pthread_mutex_lock(&q->mu);
    if (rc) {
      free(buf);
      q->u[u].state = U_EMPTY;
      q->held -= bytes;
      pthread_cond_broadcast(&q->cv);
      pthread_mutex_unlock(&q->mu);
      return rc;
    }
    q->u[u].buf = buf;
    q->u[u].state = U_READY;
    q_set_ptrs(q, u);
    q->base.fetched_bytes += bytes;
    q->base.fetches++;
  }
  q_count_reconnects(q);
  q->u[u].pins++;
  q->u[u].used = ++q->tick;
  for (int i = 0; i < unit_ntensors(&q->c, u); i++) w[i] = q->u[u].w[i];
  /* Prefetch the unit used next (layer 0 of the next token after the head). */
  if (q->pf) {
    int next = (u + 1) % unit_count(&q->c);
    if (q->u[next].state == U_EMPTY) {
      q->want = next;
      pthread_cond_broadcast(&q->cv);
    }
  }
  pthread_mutex_unlock(&q->mu);
  return 0;
}

static void q_release(wprov *p, int u) {
  qprov *q = (qprov *)p;
  pthread_mutex_lock(&q->mu);
  q->u[u].pins--;
  pthread_mutex_unlock(&q->mu);
}

static int q_embed(wprov *p, int token, float *out) {
  qprov *q = (qprov *)p;
  qins_range r = {(uint64_t)token, (uint64_t)token + 1};
  size_t got = 0;
  int rc = qins_get_into(q->cl, q->model, ns_embed[q->nm.ns], &r, 1, QINS_F32, out,
                         (size_t)q->c.dim * sizeof(float), &got, NULL, NULL);
  if (rc) {
    fprintf(stderr, "qins-llama2: embedding row %d: %s\n", token, qins_client_error(q->cl));
    return rc;
  }
  if (got != (size_t)q->c.dim * sizeof(float)) return QINS_EFORMAT;
  pthread_mutex_lock(&q->mu);
  q_count_reconnects(q);
  pthread_mutex_unlock(&q->mu);
  return 0;
}

static void q_destroy(wprov *p) {
  qprov *q = (qprov *)p;
  if (!q) return;
  if (q->pf) {
    pthread_mutex_lock(&q->mu);
    q->stop = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->thr, NULL);
    qins_close(q->pf);
  }
  for (int i = 0; i < unit_count(&q->c); i++) free(q->u[i].buf);
  free(q->u);
  qins_close(q->cl);
  free(q->model);
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->cv);
  free(q);
}

/* Which names the served model uses: the scheme whose embedding it has; and whether it has its
 * own classifier. */
static tnames ns_detect(qins_client *cl, const char *model) {
  tnames nm = {NS_LLAMA2C, 0};
  qins_tensor_info ti;
  int k;
  for (k = 0; k < NS_COUNT; k++)
    if (!qins_info(cl, model, ns_embed[k], &ti)) break;
  if (k == NS_COUNT)
    die("model %s has none of %s, %s, %s: not a llama model this worker knows", model,
        ns_embed[0], ns_embed[1], ns_embed[2]);
  nm.ns = k;
  nm.own_cls = ns_cls[k] && !qins_info(cl, model, ns_cls[k], &ti);
  return nm;
}

/* Config of a served model: from its metadata (method model_info: llama2.c keys, an HF
 * config.json or GGUF llama keys: cfg_from_meta); else (no hyper-parameters there, or a server
 * without model_info) from the tensors' shapes (`info`) with n_heads from the command line (shapes
 * cannot tell heads apart) and seq_len given or 512. --seq-len given wins over the metadata. */
static void q_config(qins_client *cl, const char *model, const tnames *nm, int n_heads, int seq_len,
                     cfg *c) {
  char err[256] = "", *meta = NULL;
  int rc = qins_model_metadata(cl, model, &meta);
  if (rc == QINS_ENO_MODEL) die("no model %s on the server", model);
  if (rc && rc != QINS_EUNKNOWN_METHOD) die("model_info: %s", qins_client_error(cl));
  int from_meta = !rc && !cfg_from_meta(meta, strlen(meta), c, err, sizeof err);
  qins_free(meta);
  if (from_meta) {
    if (seq_len > 0) c->seq_len = seq_len;
    return;
  }
  if (n_heads <= 0)
    die("model %s: no hyper-parameters from the server (%s): give --n-heads (or --reference)",
        model, rc ? "it has no model_info method" : err);
  qins_tensor_info emb, w1, wk;
  uint64_t total = 0;
  qins_tensor_info *ts = NULL;
  size_t nt = 0;
  char n_w1[QINS_MAX_NAME + 1], n_wk[QINS_MAX_NAME + 1];
  const char *prefix = ns_prefix[nm->ns];
  snprintf(n_w1, sizeof n_w1, "%s0.%s", prefix, ns_layer[nm->ns][W_1]);
  snprintf(n_wk, sizeof n_wk, "%s0.%s", prefix, ns_layer[nm->ns][W_K]);
  if (qins_info(cl, model, ns_embed[nm->ns], &emb) || qins_info(cl, model, n_w1, &w1) ||
      qins_info(cl, model, n_wk, &wk) || qins_list(cl, model, prefix, 0, 0, &ts, &nt, &total))
    die("model %s: %s", model, qins_client_error(cl));
  int layers = 0;
  for (size_t i = 0; i < nt; i++) {
    int l;
    if (sscanf(ts[i].name + strlen(prefix), "%d.", &l) == 1 && l + 1 > layers) layers = l + 1;
  }
  qins_free(ts);
  if (emb.ndim != 2 || w1.ndim != 2 || wk.ndim != 2) die("model %s: unexpected shapes", model);
  c->dim = (int)emb.shape[1];
  c->vocab_size = (int)emb.shape[0];
  c->hidden_dim = (int)w1.shape[0];
  c->n_layers = layers;
  c->n_heads = n_heads;
  c->n_kv_heads = c->dim % n_heads ? 0 : (int)(wk.shape[0] / (uint64_t)(c->dim / n_heads));
  c->seq_len = seq_len > 0 ? seq_len : 512;
  if (cfg_check(c, err, sizeof err)) die("model %s: %s", model, err);
}

/* The units' decoded bytes: in all, the largest and the second largest (each may be NULL). */
static void unit_sizes(const cfg *c, uint64_t *total, uint64_t *big1, uint64_t *big2) {
  uint64_t t = 0, b1 = 0, b2 = 0;
  for (int u = 0; u < unit_count(c); u++) {
    uint64_t b = unit_bytes(c, u);
    t += b;
    if (b > b1) b2 = b1, b1 = b;
    else if (b > b2) b2 = b;
  }
  if (total) *total = t;
  if (big1) *big1 = b1;
  if (big2) *big2 = b2;
}

static qprov *q_new(const char *sock, const char *model, const cfg *c, const tnames *nm,
                    uint64_t budget, int prefetch) {
  qprov *q = xcalloc(1, sizeof *q);
  q->base = (wprov){.kind = "qinsd", .embed = q_embed, .acquire = q_acquire,
                    .release = q_release, .destroy = q_destroy};
  q->c = *c;
  q->nm = *nm;
  q->model = strdup(model);
  q->want = -1;
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->cv, NULL);
  q->u = xcalloc((size_t)unit_count(c), sizeof *q->u);
  uint64_t big1, big2;
  unit_sizes(c, NULL, &big1, &big2);
  q->base.budget = budget ? budget : big1 + big2;
  if (q->base.budget < big1)
    die("--budget %" PRIu64 " is below the largest unit (%" PRIu64 " bytes of decoded weights)",
        budget, big1);
  int rc = qins_connect(&q->cl, sock, 5000);
  if (rc) die("connect %s: %s", sock, qins_strerror(rc));
  if (prefetch && q->base.budget >= big1 + big2) {
    rc = qins_connect(&q->pf, sock, 5000);
    if (rc) die("connect %s (prefetch): %s", sock, qins_strerror(rc));
    if (pthread_create(&q->thr, NULL, q_prefetch_main, q)) die("pthread_create failed");
  }
  return q;
}

/* --- mapped provider (--map) ------------------------------------------------------------------
 * Every weight read straight from qinsd's arena (docs/PROTOCOL.md §4.10): a unit is mapped with
 * one map_many round trip and its tensors are used where they lie in the read-only shared mapping:
 * no private copy and, once every unit is mapped, no request per token. When the arena (or
 * --budget) cannot hold the whole model, least recently used unpinned units are released to make
 * room, unit by unit, as the qinsd provider's streaming does; re-mapping a released unit the
 * daemon still caches costs a round trip and no decode. */

typedef struct munit {
  int mapped;                    /* leases held */
  int pins;                      /* users now */
  uint64_t used;                 /* tick of last use (LRU) */
  uint64_t lease[W_MAX];         /* one per tensor */
  const float *w[W_MAX];         /* in the mapping */
} munit;

typedef struct mprov {
  wprov base;
  cfg c;
  tnames nm;                     /* the model's tensor names */
  const float *emb;              /* its own embedding table, mapped whole (own classifier only) */
  char *model;
  qins_client *cl;
  munit *u;                      /* [unit_count] */
  uint64_t held, tick;           /* bytes mapped; LRU clock */
} mprov;

static void m_unmap(mprov *m, int u) {
  if (qins_release(m->cl, m->u[u].lease, unit_ntensors(&m->c, u)))
    fprintf(stderr, "qins-llama2: releasing unit %d: %s\n", u, qins_client_error(m->cl));
  m->u[u].mapped = 0;
  m->held -= unit_bytes(&m->c, u);
}

/* Releases the least recently used unpinned unit; 0, or -1 when none is left. */
static int m_evict(mprov *m) {
  int victim = -1;
  for (int i = 0; i < unit_count(&m->c); i++)
    if (m->u[i].mapped && !m->u[i].pins && (victim < 0 || m->u[i].used < m->u[victim].used))
      victim = i;
  if (victim < 0) return -1;
  m_unmap(m, victim);
  return 0;
}

/* libqins rides out a daemon restart inside the map calls (docs/client.md §1.1): it reconnects,
 * re-attaches the new daemon's arena and maps again; units mapped before stay readable where they
 * are (the old mapping lives while their leases are held; releasing those is local). */
static void m_count_reconnects(mprov *m) {
  qins_conn_stats st;
  qins_client_stats(m->cl, &st);
  m->base.reconnects = st.reconnects;
}

static int m_map_unit(mprov *m, int u) {
  const char *names[W_MAX];
  char nb[W_MAX][QINS_MAX_NAME + 1];
  qins_mapped mp[W_MAX];
  int n = unit_ntensors(&m->c, u), rc;
  uint64_t bytes = unit_bytes(&m->c, u);
  for (int i = 0; i < n; i++) ns_tensor_name(&m->nm, &m->c, u, i, nb[i], sizeof nb[i]), names[i] = nb[i];
  while (m->held + bytes > m->base.budget)
    if (m_evict(m)) break;
  while ((rc = qins_map_many(m->cl, m->model, names, n, QINS_F32, mp)) == QINS_EARENA_FULL)
    if (m_evict(m)) break; /* the arena is full of our own leases: stream */
  m_count_reconnects(m);
  if (rc) {
    fprintf(stderr, "qins-llama2: mapping unit %d of %s: %s\n", u, m->model,
            qins_client_error(m->cl));
    return rc;
  }
  m->u[u].mapped = 1;
  m->held += bytes;
  for (int i = 0; i < n; i++) {
    m->u[u].lease[i] = mp[i].lease;
    m->u[u].w[i] = mp[i].data;
    if (mp[i].bytes != tensor_elems(&m->c, u, i) * sizeof(float) || strcmp(mp[i].dtype, "f32")) {
      fprintf(stderr, "qins-llama2: %s/%s has an unexpected shape\n", m->model, names[i]);
      return QINS_EFORMAT;
    }
  }
  if (m->held > m->base.peak_bytes) m->base.peak_bytes = m->held;
  m->base.fetches++;
  m->base.fetched_bytes += bytes;
  return 0;
}

static int m_acquire(wprov *p, int u, const float **w) {
  mprov *m = (mprov *)p;
  int rc = m->u[u].mapped ? 0 : m_map_unit(m, u);
  if (rc) return rc;
  m->u[u].pins++;
  m->u[u].used = ++m->tick;
  for (int i = 0; i < unit_ntensors(&m->c, u); i++) w[i] = m->u[u].w[i];
  return 0;
}

static void m_release(wprov *p, int u) { ((mprov *)p)->u[u].pins--; }

/* A token's embedding row, read from the mapped classifier (tied to the embedding), or from the
 * model's own embedding table, mapped whole once and kept. */
static int m_embed(wprov *p, int token, float *out) {
  mprov *m = (mprov *)p;
  if (m->nm.own_cls) {
    qins_mapped e;
    if (!m->emb) {
      int rc = qins_map(m->cl, m->model, ns_embed[m->nm.ns], NULL, 0, QINS_F32, &e);
      m_count_reconnects(m);
      if (rc) {
        fprintf(stderr, "qins-llama2: mapping the embedding: %s\n", qins_client_error(m->cl));
        return rc;
      }
      if (e.bytes != (size_t)m->c.vocab_size * (size_t)m->c.dim * sizeof(float)) return QINS_EFORMAT;
      m->emb = e.data;
    }
    memcpy(out, m->emb + (size_t)token * (size_t)m->c.dim, (size_t)m->c.dim * sizeof(float));
    return 0;
  }
  const float *w[W_MAX];
  int head = m->c.n_layers, rc = m_acquire(p, head, w);
  if (rc) return rc;
  memcpy(out, w[W_CLS] + (size_t)token * (size_t)m->c.dim, (size_t)m->c.dim * sizeof(float));
  m_release(p, head);
  return 0;
}

static void m_destroy(wprov *p) {
  mprov *m = (mprov *)p;
  qins_close(m->cl); /* ends the leases and unmaps the arena */
  free(m->u);
  free(m->model);
  free(m);
}

/* This process's memory (smaps_rollup: PSS splits shared pages between their mappers) and the
 * decoded weights the served provider holds privately (none when they are mapped). */
static void print_memory(const wprov *p) {
  unsigned long long pss = 0, rss = 0, v;
  char line[256];
  FILE *f = fopen("/proc/self/smaps_rollup", "r");
  while (f && fgets(line, sizeof line, f)) {
    if (sscanf(line, "Pss: %llu kB", &v) == 1) pss = v;
    if (sscanf(line, "Rss: %llu kB", &v) == 1) rss = v;
  }
  if (f) fclose(f);
  int mapped = !strcmp(p->kind, "qinsd-map");
  printf("memory: pss %llu KiB, rss %llu KiB; decoded weights held privately %" PRIu64
         " bytes%s\n", pss, rss, mapped ? 0 : p->peak_bytes,
         mapped ? " (read in place from qinsd's shared arena)" : "");
}

static mprov *m_new(const char *sock, const char *model, const cfg *c, const tnames *nm,
                    uint64_t budget) {
  mprov *m = xcalloc(1, sizeof *m);
  m->base = (wprov){.kind = "qinsd-map", .embed = m_embed, .acquire = m_acquire,
                    .release = m_release, .destroy = m_destroy};
  m->base.qk_hf = nm->ns == NS_HF; /* the mapped rows stay as stored: q and k are un-permuted */
  m->c = *c;
  m->nm = *nm;
  m->model = strdup(model);
  m->u = xcalloc((size_t)unit_count(c), sizeof *m->u);
  uint64_t total, big;
  unit_sizes(c, &total, &big, NULL);
  m->base.budget = budget ? budget : total;
  if (m->base.budget < big)
    die("--budget %" PRIu64 " is below the largest unit (%" PRIu64 " bytes)", budget, big);
  int rc = qins_connect(&m->cl, sock, 5000);
  if (rc) die("connect %s: %s", sock, qins_strerror(rc));
  if (qins_attach(m->cl, NULL)) die("--map: attach: %s", qins_client_error(m->cl));
  return m;
}

/* ------------------------------------------------------------------------------------------------
 * The forward pass (run.c's, strict float32 left to right) */

typedef struct rstate {
  float *x, *xb, *xb2, *hb, *hb2, *q, *att, *logits; /* activations */
  float *key_cache, *value_cache;                    /* [layer][seq_len][kv_dim] */
} rstate;

static rstate *state_new(const cfg *c) {
  rstate *s = xcalloc(1, sizeof *s);
  size_t kv_dim = (size_t)c->dim / (size_t)c->n_heads * (size_t)c->n_kv_heads;
  size_t cache = (size_t)c->n_layers * (size_t)c->seq_len * kv_dim;
  s->x = xcalloc((size_t)c->dim, sizeof(float));
  s->xb = xcalloc((size_t)c->dim, sizeof(float));
  s->xb2 = xcalloc((size_t)c->dim, sizeof(float));
  s->hb = xcalloc((size_t)c->hidden_dim, sizeof(float));
  s->hb2 = xcalloc((size_t)c->hidden_dim, sizeof(float));
  s->q = xcalloc((size_t)c->dim, sizeof(float));
  s->att = xcalloc((size_t)c->n_heads * (size_t)c->seq_len, sizeof(float));
  s->logits = xcalloc((size_t)c->vocab_size, sizeof(float));
  s->key_cache = xcalloc(cache, sizeof(float));
  s->value_cache = xcalloc(cache, sizeof(float));
  return s;
}

static void state_copy(const cfg *c, rstate *dst, const rstate *src) {
  size_t kv_dim = (size_t)c->dim / (size_t)c->n_heads * (size_t)c->n_kv_heads;
  size_t cache = (size_t)c->n_layers * (size_t)c->seq_len * kv_dim;
  memcpy(dst->key_cache, src->key_cache, cache * sizeof(float));
  memcpy(dst->value_cache, src->value_cache, cache * sizeof(float));
}

static void state_free(rstate *s) {
  if (!s) return;
  free(s->x), free(s->xb), free(s->xb2), free(s->hb), free(s->hb2), free(s->q), free(s->att);
  free(s->logits), free(s->key_cache), free(s->value_cache);
  free(s);
}

static void rmsnorm(float *o, const float *x, const float *weight, int size) {
  float ss = 0.0f;
  for (int j = 0; j < size; j++) ss += x[j] * x[j];
  ss /= size;
  ss += 1e-5f;
  ss = 1.0f / sqrtf(ss);
  for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

static void softmax(float *x, int size) {
  float max_val = x[0];
  for (int i = 1; i < size; i++)
    if (x[i] > max_val) max_val = x[i];
  float sum = 0.0f;
  for (int i = 0; i < size; i++) {
    x[i] = expf(x[i] - max_val);
    sum += x[i];
  }
  for (int i = 0; i < size; i++) x[i] /= sum;
}

/* W (d,n) @ x (n,) -> xout (d,), one float accumulator per row in index order. */
static void matmul(float *xout, const float *x, const float *w, int n, int d) {
  for (int i = 0; i < d; i++) {
    float val = 0.0f;
    const float *row = w + (size_t)i * (size_t)n;
    for (int j = 0; j < n; j++) val += row[j] * x[j];
    xout[i] = val;
  }
}

static void layer_forward(const cfg *p, const float *const *w, rstate *s, int l, int pos,
                          int qk_hf) {
  int dim = p->dim, hidden_dim = p->hidden_dim, head_size = dim / p->n_heads;
  int kv_dim = head_size * p->n_kv_heads, kv_mul = p->n_heads / p->n_kv_heads;
  float *x = s->x;
  size_t loff = (size_t)l * (size_t)p->seq_len * (size_t)kv_dim;
  float *k = s->key_cache + loff + (size_t)pos * (size_t)kv_dim;
  float *v = s->value_cache + loff + (size_t)pos * (size_t)kv_dim;

  rmsnorm(s->xb, x, w[W_ATT_NORM], dim);
  matmul(s->q, s->xb, w[W_Q], dim, dim);
  matmul(k, s->xb, w[W_K], dim, kv_dim);
  matmul(v, s->xb, w[W_V], dim, kv_dim);
  if (qk_hf) { /* one float per "row": the products back to adjacent-pair order */
    hf_unpermute(s->q, p->n_heads, head_size, 1);
    hf_unpermute(k, p->n_kv_heads, head_size, 1);
  }

  for (int i = 0; i < dim; i += 2) {
    int head_dim = i % head_size;
    float freq = 1.0f / powf(10000.0f, head_dim / (float)head_size);
    float val = pos * freq;
    float fcr = cosf(val), fci = sinf(val);
    int rotn = i < kv_dim ? 2 : 1;
    for (int r = 0; r < rotn; r++) {
      float *vec = r == 0 ? s->q : k;
      float v0 = vec[i], v1 = vec[i + 1];
      vec[i] = v0 * fcr - v1 * fci;
      vec[i + 1] = v0 * fci + v1 * fcr;
    }
  }

  for (int h = 0; h < p->n_heads; h++) {
    float *q = s->q + (size_t)h * (size_t)head_size;
    float *att = s->att + (size_t)h * (size_t)p->seq_len;
    for (int t = 0; t <= pos; t++) {
      const float *kt =
          s->key_cache + loff + (size_t)t * (size_t)kv_dim + (size_t)(h / kv_mul) * head_size;
      float score = 0.0f;
      for (int i = 0; i < head_size; i++) score += q[i] * kt[i];
      score /= sqrtf(head_size);
      att[t] = score;
    }
    softmax(att, pos + 1);
    float *xb = s->xb + (size_t)h * (size_t)head_size;
    memset(xb, 0, (size_t)head_size * sizeof(float));
    for (int t = 0; t <= pos; t++) {
      const float *vt =
          s->value_cache + loff + (size_t)t * (size_t)kv_dim + (size_t)(h / kv_mul) * head_size;
      float a = att[t];
      for (int i = 0; i < head_size; i++) xb[i] += a * vt[i];
    }
  }
  matmul(s->xb2, s->xb, w[W_O], dim, dim);
  for (int i = 0; i < dim; i++) x[i] += s->xb2[i];

  rmsnorm(s->xb, x, w[W_FFN_NORM], dim);
  matmul(s->hb, s->xb, w[W_1], dim, hidden_dim);
  matmul(s->hb2, s->xb, w[W_3], dim, hidden_dim);
  for (int i = 0; i < hidden_dim; i++) {
    float val = s->hb[i];
    val *= (1.0f / (1.0f + expf(-val)));
    val *= s->hb2[i];
    s->hb[i] = val;
  }
  matmul(s->xb, s->hb, w[W_2], hidden_dim, dim);
  for (int i = 0; i < dim; i++) x[i] += s->xb[i];
}

/* One position for ns states (each with its own token), fetching each unit once. */
static int forward(const cfg *c, wprov *p, rstate **st, const int *tok, int ns, int pos) {
  const float *w[W_MAX];
  int rc;
  for (int s = 0; s < ns; s++)
    if ((rc = p->embed(p, tok[s], st[s]->x))) return rc;
  for (int l = 0; l < c->n_layers; l++) {
    if ((rc = p->acquire(p, l, w))) return rc;
    for (int s = 0; s < ns; s++) layer_forward(c, w, st[s], l, pos, p->qk_hf);
    p->release(p, l);
  }
  if ((rc = p->acquire(p, c->n_layers, w))) return rc;
  for (int s = 0; s < ns; s++) {
    rmsnorm(st[s]->x, st[s]->x, w[W_NORM], c->dim);
    matmul(st[s]->logits, st[s]->x, w[W_CLS], c->dim, c->vocab_size);
  }
  p->release(p, c->n_layers);
  return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Sampling: run.c's sampler (argmax, multinomial, top-p), same xorshift generator */

typedef struct prob_index {
  float prob;
  int index;
} prob_index;

typedef struct sampler {
  int vocab_size;
  prob_index *probindex;
  float temperature, topp;
  unsigned long long rng_state;
  float *probs; /* scratch copy of the logits */
  /* The last draw, to explain flips: the point r drawn in [0, total) and the CDF interval
   * [lo, hi) of the token it picked (top-p: over the sorted, truncated list). */
  float last_r, last_lo, last_hi;
} sampler;

static int sample_argmax(const float *p, int n) {
  int max_i = 0;
  float max_p = p[0];
  for (int i = 1; i < n; i++)
    if (p[i] > max_p) max_i = i, max_p = p[i];
  return max_i;
}

static int sample_mult(sampler *s, const float *p, int n, float coin) {
  float cdf = 0.0f;
  s->last_r = coin;
  for (int i = 0; i < n; i++) {
    s->last_lo = cdf;
    cdf += p[i];
    s->last_hi = cdf;
    if (coin < cdf) return i;
  }
  return n - 1;
}

static int compare_pi(const void *a, const void *b) {
  const prob_index *x = a, *y = b;
  if (x->prob > y->prob) return -1;
  if (x->prob < y->prob) return 1;
  return 0;
}

static int sample_topp(sampler *s, const float *p, int n, float topp, prob_index *pi, float coin) {
  int n0 = 0;
  const float cutoff = (1.0f - topp) / (n - 1);
  for (int i = 0; i < n; i++)
    if (p[i] >= cutoff) pi[n0].index = i, pi[n0].prob = p[i], n0++;
  qsort(pi, (size_t)n0, sizeof(prob_index), compare_pi);
  float cum = 0.0f;
  int last = n0 - 1;
  for (int i = 0; i < n0; i++) {
    cum += pi[i].prob;
    if (cum > topp) {
      last = i;
      break;
    }
  }
  float r = coin * cum, cdf = 0.0f;
  s->last_r = r;
  for (int i = 0; i <= last; i++) {
    s->last_lo = cdf;
    cdf += pi[i].prob;
    s->last_hi = cdf;
    if (r < cdf) return pi[i].index;
  }
  return pi[last].index;
}

static unsigned int random_u32(unsigned long long *state) {
  *state ^= *state >> 12;
  *state ^= *state << 25;
  *state ^= *state >> 27;
  return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(unsigned long long *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static void sampler_init(sampler *s, int vocab, float temperature, float topp,
                         unsigned long long seed) {
  s->vocab_size = vocab;
  s->temperature = temperature;
  s->topp = topp;
  s->rng_state = seed;
  s->probindex = xcalloc((size_t)vocab, sizeof(prob_index));
  s->probs = xcalloc((size_t)vocab, sizeof(float));
}
static void sampler_free(sampler *s) { free(s->probindex), free(s->probs); }

/* Samples from logits (left untouched: a scratch copy is scaled and softmaxed). */
static int sample(sampler *s, const float *logits) {
  if (s->temperature == 0.0f) return sample_argmax(logits, s->vocab_size);
  for (int q = 0; q < s->vocab_size; q++) s->probs[q] = logits[q] / s->temperature;
  softmax(s->probs, s->vocab_size);
  float coin = random_f32(&s->rng_state);
  if (s->topp <= 0 || s->topp >= 1) return sample_mult(s, s->probs, s->vocab_size, coin);
  return sample_topp(s, s->probs, s->vocab_size, s->topp, s->probindex, coin);
}

/* ------------------------------------------------------------------------------------------------
 * Comparison helpers */

/* KL(P || Q) of the softmaxes (temperature 1) of logits a (reference) and b, in double. */
static double kld(const float *a, const float *b, int n) {
  double ma = a[0], mb = b[0];
  for (int i = 1; i < n; i++) {
    if (a[i] > ma) ma = a[i];
    if (b[i] > mb) mb = b[i];
  }
  double za = 0, zb = 0;
  for (int i = 0; i < n; i++) za += exp(a[i] - ma), zb += exp(b[i] - mb);
  double lza = log(za), lzb = log(zb), k = 0;
  for (int i = 0; i < n; i++) {
    double la = a[i] - ma - lza, lb = b[i] - mb - lzb;
    k += exp(la) * (la - lb);
  }
  return k < 0 ? 0 : k;
}

/* Top two tokens of logits. */
static void top2(const float *x, int n, int *i1, int *i2) {
  *i1 = sample_argmax(x, n);
  *i2 = *i1 == 0 ? 1 : 0;
  for (int i = 0; i < n; i++)
    if (i != *i1 && x[i] > x[*i2]) *i2 = i;
}

/* Probability of token t under softmax(logits / temperature) (temperature 0: 1). */
static double prob_of(const float *x, int n, int t, float temperature) {
  double T = temperature > 0 ? temperature : 1.0, m = x[0], z = 0;
  for (int i = 1; i < n; i++)
    if (x[i] > m) m = x[i];
  for (int i = 0; i < n; i++) z += exp((x[i] - m) / T);
  return exp((x[t] - m) / T) / z;
}

/* ------------------------------------------------------------------------------------------------
 * main */

static void usage(int code) {
  FILE *f = code ? stderr : stdout;
  fprintf(f,
          "usage: qins-llama2 --socket PATH --model NAME [options]\n"
          "       qins-llama2 --reference FILE.safetensors [options]\n"
          "Runs llama2.c's model with weights served by qinsd (--socket/--model) and/or read from\n"
          "a safetensors file (--reference, FP32). With both: per-step agreement, token parity,\n"
          "teacher-forced mean KL divergence and top-1 agreement.\n"
          "  -s, --socket PATH       qinsd's socket (default $QINS_SOCKET)\n"
          "  -m, --model NAME        model name in the store\n"
          "  -r, --reference FILE    FP32 weights: .safetensors (or a llama2.c .bin checkpoint)\n"
          "  -n, --steps N           tokens to generate (default 256, at most seq_len)\n"
          "  -t, --temperature T     0 = greedy (default 0)\n"
          "  -p, --topp P            top-p for sampling (default 0.9)\n"
          "  -S, --seed S            sampler seed (default 42)\n"
          "  -o, --tokens-out FILE   write the generated token ids, one a line (the served path's\n"
          "                          when there is one, else the reference's)\n"
          "  -b, --budget BYTES      decoded weights the worker may hold (K/M/G suffixes; default:\n"
          "                          the two largest units, the least that streams with prefetch)\n"
          "      --no-prefetch       fetch each unit only when needed\n"
          "      --map               read every weight from qinsd's shared arena (no private\n"
          "                          copy; --budget then bounds the bytes kept mapped)\n"
          "      --simulate q8_0     with --reference alone: compare FP32 with llama.cpp's Q8_0\n"
          "                          applied to the same weights\n"
          "      --n-heads N         query heads, when neither the server's metadata nor a\n"
          "                          reference gives the hyper-parameters (--seq-len N: 512)\n"
          "  -q, --quiet             no per-step lines\n"
          "  -h, --help              this text\n"
          "      --version           print the version, then exit\n");
  exit(code);
}

static uint64_t parse_bytes(const char *s) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s) usage(2);
  uint64_t mul = 1;
  if (*end == 'K' || *end == 'k') mul = 1ull << 10, end++;
  else if (*end == 'M' || *end == 'm') mul = 1ull << 20, end++;
  else if (*end == 'G' || *end == 'g') mul = 1ull << 30, end++;
  if (*end) usage(2);
  return (uint64_t)v * mul;
}

static int ends_with(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && !strcmp(s + a - b, suf);
}

int main(int argc, char **argv) {
  const char *sock = getenv("QINS_SOCKET"), *model = NULL, *ref_path = NULL, *tokens_out = NULL;
  const char *simulate = NULL;
  int steps = 256, quiet = 0, prefetch = 1, n_heads = 0, seq_len = 0;
  float temperature = 0.0f, topp = 0.9f;
  unsigned long long seed = 42;
  uint64_t budget = 0;
  int sock_given = 0, use_map = 0;
  static const struct option opts[] = {
      {"socket", required_argument, 0, 's'},      {"model", required_argument, 0, 'm'},
      {"reference", required_argument, 0, 'r'},   {"steps", required_argument, 0, 'n'},
      {"temperature", required_argument, 0, 't'}, {"topp", required_argument, 0, 'p'},
      {"seed", required_argument, 0, 'S'},        {"tokens-out", required_argument, 0, 'o'},
      {"budget", required_argument, 0, 'b'},      {"no-prefetch", no_argument, 0, 'P'},
      {"simulate", required_argument, 0, 'M'},    {"quiet", no_argument, 0, 'q'},
      {"n-heads", required_argument, 0, 'H'},     {"seq-len", required_argument, 0, 'L'},
      {"map", no_argument, 0, 'A'},
      {"help", no_argument, 0, 'h'},              {"version", no_argument, 0, 'V'},
      {0, 0, 0, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "s:m:r:n:t:p:S:o:b:qh", opts, NULL)) != -1) {
    char *end = NULL;
    switch (ch) {
    case 's': sock = optarg, sock_given = 1; break;
    case 'm': model = optarg; break;
    case 'r': ref_path = optarg; break;
    case 'n': steps = (int)strtol(optarg, &end, 10); if (*end || steps <= 0) usage(2); break;
    case 't': temperature = strtof(optarg, &end); if (*end || !(temperature >= 0)) usage(2); break;
    case 'p': topp = strtof(optarg, &end); if (*end || !(topp >= 0 && topp <= 1)) usage(2); break;
    case 'S': seed = strtoull(optarg, &end, 10); if (*end) usage(2); break;
    case 'o': tokens_out = optarg; break;
    case 'b': budget = parse_bytes(optarg); break;
    case 'P': prefetch = 0; break;
    case 'A': use_map = 1; break;
    case 'M': simulate = optarg; break;
    case 'q': quiet = 1; break;
    case 'H': n_heads = (int)strtol(optarg, &end, 10); if (*end || n_heads <= 0) usage(2); break;
    case 'L': seq_len = (int)strtol(optarg, &end, 10); if (*end || seq_len <= 0) usage(2); break;
    case 'h': usage(0); break;
    case 'V': printf("qins-llama2 %s\n", QINS_VERSION_STRING); return 0;
    default: usage(2);
    }
  }
  if (optind != argc) usage(2);
  if (seed == 0) usage(2); /* run.c's xorshift needs a nonzero state */
  int served = model != NULL;
  if (served && !sock) die("--model needs --socket (or QINS_SOCKET)");
  if (!served && sock_given) die("--socket needs --model");
  if (!served && !ref_path) usage(2);
  if (use_map && !served) die("--map needs --model");
  if (simulate && (strcmp(simulate, "q8_0") || !ref_path || served))
    die("--simulate q8_0 needs --reference and no --model");

  cfg c;
  memprov *ref = NULL;
  wprov *cand = NULL;
  if (ref_path) ref = ends_with(ref_path, ".bin") ? load_bin(ref_path, &c) : load_safetensors(ref_path, &c);
  if (served) {
    qins_client *probe = NULL;
    int rc = qins_connect(&probe, sock, 5000);
    if (rc) die("connect %s: %s", sock, qins_strerror(rc));
    tnames nm = ns_detect(probe, model);
    if (nm.ns != NS_LLAMA2C)
      printf("model %s has %s tensor names%s\n", model, ns_name[nm.ns],
             nm.own_cls ? " and its own classifier" : "");
    /* With a reference, its config is the model's (shapes are checked per fetch). */
    if (!ref) q_config(probe, model, &nm, n_heads, seq_len, &c);
    qins_close(probe);
    cand = use_map ? &m_new(sock, model, &c, &nm, budget)->base
                   : &q_new(sock, model, &c, &nm, budget, prefetch)->base;
  } else if (simulate) {
    cand = &simulate_q8_0(ref)->base;
  }
  if (steps > c.seq_len) steps = c.seq_len;

  /* The path that generates: the reference when there is one. */
  wprov *gen = ref ? &ref->base : cand;
  rstate *s_ref = state_new(&c);
  rstate *s_tf = cand && ref ? state_new(&c) : NULL;   /* candidate, teacher-forced on S */
  rstate *s_free = cand && ref ? state_new(&c) : NULL; /* candidate, its own tokens */
  sampler smp_ref, smp_cand;
  sampler_init(&smp_ref, c.vocab_size, temperature, topp, seed);
  sampler_init(&smp_cand, c.vocab_size, temperature, topp, seed);
  int *seq = xcalloc((size_t)steps, sizeof(int)), *cseq = xcalloc((size_t)steps, sizeof(int));
  float *free_logits = xcalloc((size_t)c.vocab_size, sizeof(float));
  int tok_ref = 1, tok_free = 1; /* BOS */
  int identical = 0, first_div = -1, top1 = 0, diverged = 0;
  double kld_sum = 0, t_ref = 0, t_cand = 0;
  int compare = cand && ref;

  for (int pos = 0; pos < steps; pos++) {
    double t0 = now_s();
    int rc = forward(&c, gen, &s_ref, &tok_ref, 1, pos);
    if (rc) die("step %d: forward failed: %s", pos, qins_strerror(rc));
    int next_ref = sample(&smp_ref, s_ref->logits);
    double t1 = now_s();
    t_ref += t1 - t0;
    seq[pos] = next_ref;
    if (!compare) {
      cseq[pos] = next_ref;
      tok_ref = next_ref;
      continue;
    }
    rstate *sts[2] = {s_tf, s_free};
    int toks[2] = {tok_ref, tok_free};
    rc = forward(&c, cand, sts, toks, diverged ? 2 : 1, pos);
    if (rc) die("step %d: forward (%s) failed: %s", pos, cand->kind, qins_strerror(rc));
    const float *fl = diverged ? s_free->logits : s_tf->logits;
    memcpy(free_logits, fl, (size_t)c.vocab_size * sizeof(float));
    int next_free = sample(&smp_cand, free_logits);
    t_cand += now_s() - t1;
    cseq[pos] = next_free;

    double k = kld(s_ref->logits, s_tf->logits, c.vocab_size);
    int a1, a2, b1, b2;
    top2(s_ref->logits, c.vocab_size, &a1, &a2);
    top2(s_tf->logits, c.vocab_size, &b1, &b2);
    kld_sum += k;
    top1 += a1 == b1;
    int same = next_free == next_ref;
    identical += same;
    if (!same && first_div < 0) {
      first_div = pos;
      printf("divergence at step %d: fp32 picks %d, %s picks %d\n", pos, next_ref, cand->kind,
             next_free);
      printf("  fp32 logits: top-1 %d %.6f, top-2 %d %.6f, margin %.3e (p %.4f vs %.4f at T=%g)\n",
             a1, s_ref->logits[a1], a2, s_ref->logits[a2], s_ref->logits[a1] - s_ref->logits[a2],
             prob_of(s_ref->logits, c.vocab_size, a1, temperature),
             prob_of(s_ref->logits, c.vocab_size, a2, temperature), (double)temperature);
      printf("  %s logits: top-1 %d %.6f, top-2 %d %.6f, margin %.3e\n", cand->kind, b1,
             s_tf->logits[b1], b2, s_tf->logits[b2], s_tf->logits[b1] - s_tf->logits[b2]);
      if (temperature > 0) {
        printf("  p(fp32 token %d) = %.6f under fp32, %.6f under %s; p(%s token %d) = %.6f "
               "under fp32, %.6f under %s\n",
               next_ref, prob_of(s_ref->logits, c.vocab_size, next_ref, temperature),
               prob_of(s_tf->logits, c.vocab_size, next_ref, temperature), cand->kind,
               cand->kind, next_free, prob_of(s_ref->logits, c.vocab_size, next_free, temperature),
               prob_of(s_tf->logits, c.vocab_size, next_free, temperature), cand->kind);
        float d_lo = smp_ref.last_r - smp_ref.last_lo, d_hi = smp_ref.last_hi - smp_ref.last_r;
        printf("  sampling: the draw r = %.7f fell in fp32's interval [%.7f, %.7f) and in %s's "
               "[%.7f, %.7f) of token %d: %.2e from fp32's nearest boundary\n",
               smp_ref.last_r, smp_ref.last_lo, smp_ref.last_hi, cand->kind, smp_cand.last_lo,
               smp_cand.last_hi, next_free, d_lo < d_hi ? d_lo : d_hi);
      }
    }
    if (!quiet)
      printf("step %3d  fp32 %4d  %s %4d  %s  kld %.3e  top1 %s\n", pos, next_ref, cand->kind,
             next_free, same ? "same" : "DIFF", k, a1 == b1 ? "same" : "DIFF");
    if (!diverged && next_free != next_ref) {
      state_copy(&c, s_free, s_tf);
      diverged = 1;
    }
    tok_ref = next_ref;
    tok_free = next_free;
  }

  const char *gen_kind = ref ? "fp32" : cand->kind;
  if (compare) {
    printf("parity: %d/%d tokens identical, first divergence: ", identical, steps);
    if (first_div < 0) printf("none\n");
    else printf("%d\n", first_div);
    printf("teacher-forced: mean KLD %.6e, top-1 agreement %d/%d (%.2f%%)\n", kld_sum / steps,
           top1, steps, 100.0 * top1 / steps);
    printf("speed: fp32 %.1f tokens/s, %s %.1f tokens/s\n", steps / t_ref, cand->kind,
           steps / t_cand);
  } else {
    printf("generated %d tokens (%s)\n", steps, gen_kind);
    if (!quiet) { /* no tokenizer ships with the models: the ids, from BOS (1) on */
      printf("tokens:");
      for (int i = 0; i < steps; i++) printf(" %d", seq[i]);
      printf("\n");
    }
    printf("speed: %s %.1f tokens/s\n", gen_kind, steps / t_ref);
  }
  if (cand && !strncmp(cand->kind, "qinsd", 5))
    printf("weights: %" PRIu64 " fetches, %" PRIu64 " decoded bytes received, peak held %" PRIu64
           " of budget %" PRIu64 " bytes\n",
           cand->fetches, cand->fetched_bytes, cand->peak_bytes, cand->budget);
  if (cand && !strncmp(cand->kind, "qinsd", 5)) /* libqins rode out daemon restarts this often */
    printf("reconnects: %" PRIu64 "\n", cand->reconnects);
  print_memory(cand ? cand : gen);
  if (tokens_out) {
    FILE *f = fopen(tokens_out, "w");
    if (!f) die("%s: %s", tokens_out, strerror(errno));
    for (int i = 0; i < steps; i++) fprintf(f, "%d\n", cand ? cseq[i] : seq[i]);
    if (fclose(f)) die("%s: write failed", tokens_out);
  }
  fflush(stdout);

  free(seq), free(cseq), free(free_logits);
  sampler_free(&smp_ref), sampler_free(&smp_cand);
  state_free(s_ref), state_free(s_tf), state_free(s_free);
  if (cand) cand->destroy(cand);
  if (ref) ref->base.destroy(&ref->base);
  return 0;
}
