/* SPDX-License-Identifier: MIT */
/*
 * client_llama_names.c — qins-llama2 on one synthetic llama model written three ways by the test
 * (issue 15): llama2.c's safetensors (the FP32 reference, with its hyper-parameters in
 * __metadata__), a GGUF with llama.cpp's names and llama keys (q/k in Meta's rotary order, as
 * llama.cpp's converter leaves them), and a Hugging Face directory (config.json, HF names, q/k rows
 * permuted for HF's half-split rotary, its own lm_head). Each is imported exactly (f32) and served;
 * the worker must produce the reference's logits exactly: parity N/N and mean KLD 0.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "daemon.h"
#include "qt.h"

enum { DIM = 32, HID = 64, LAYERS = 2, HEADS = 4, KV = 2, VOCAB = 40, SEQ = 32, HS = DIM / HEADS };

typedef struct lw {
  float emb[VOCAB * DIM], norm[DIM];
  float an[LAYERS][DIM], fn[LAYERS][DIM];
  float wq[LAYERS][DIM * DIM], wk[LAYERS][KV * HS * DIM], wv[LAYERS][KV * HS * DIM];
  float wo[LAYERS][DIM * DIM], w1[LAYERS][HID * DIM], w2[LAYERS][DIM * HID], w3[LAYERS][HID * DIM];
} lw;

static lw W;
static float hq[LAYERS][DIM * DIM], hk[LAYERS][KV * HS * DIM];
static ts_daemon D;

static void fill_weights(void) {
  uint64_t seed = 11;
  qt_fill_gauss(W.emb, VOCAB * DIM, seed++, 1.0f);
  for (int i = 0; i < DIM; i++) W.norm[i] = 1.0f + 0.01f * (float)i;
  for (int l = 0; l < LAYERS; l++) {
    for (int i = 0; i < DIM; i++) W.an[l][i] = W.fn[l][i] = 1.0f - 0.005f * (float)i;
    qt_fill_gauss(W.wq[l], DIM * DIM, seed++, 0.3f);
    qt_fill_gauss(W.wk[l], KV * HS * DIM, seed++, 0.3f);
    qt_fill_gauss(W.wv[l], KV * HS * DIM, seed++, 0.2f);
    qt_fill_gauss(W.wo[l], DIM * DIM, seed++, 0.2f);
    qt_fill_gauss(W.w1[l], HID * DIM, seed++, 0.2f);
    qt_fill_gauss(W.w2[l], DIM * HID, seed++, 0.2f);
    qt_fill_gauss(W.w3[l], HID * DIM, seed++, 0.2f);
  }
}

/* HF's permutation of q/k rows (transformers' convert_llama_weights_to_hf): within each head,
 * Meta row 2i + j goes to row j * HS/2 + i. */
static void hf_permute(const float *meta, float *hf, int heads) {
  for (int h = 0; h < heads; h++)
    for (int i = 0; i < HS / 2; i++)
      for (int j = 0; j < 2; j++)
        memcpy(hf + ((size_t)h * HS + (size_t)j * (HS / 2) + (size_t)i) * DIM,
               meta + ((size_t)h * HS + 2 * (size_t)i + (size_t)j) * DIM, DIM * sizeof(float));
}

/* The model's tensors under one naming scheme: prefix per layer, names in a fixed order. */
static size_t tensors(qt_tensor *t, char names[][96], int hf, int gguf_names) {
  size_t n = 0;
#define T(NM, DATA, ND, R, C)                                                                       \
  do {                                                                                             \
    snprintf(names[n], 96, "%s", NM);                                                              \
    t[n] = (qt_tensor){names[n], QS_ST_F32, ND, {R, C}, DATA, (uint64_t)(R) * (C) * sizeof(float)}; \
    if (ND == 1) t[n].shape[0] = C, t[n].shape[1] = 0;                                             \
    n++;                                                                                           \
  } while (0)
  const char *emb = gguf_names ? "token_embd.weight" : hf ? "model.embed_tokens.weight" : "tok_embeddings.weight";
  T(emb, W.emb, 2, VOCAB, DIM);
  T(gguf_names ? "output_norm.weight" : hf ? "model.norm.weight" : "norm.weight", W.norm, 1, 1, DIM);
  if (hf) T("lm_head.weight", W.emb, 2, VOCAB, DIM);
  for (int l = 0; l < LAYERS; l++) {
    char p[64], nm[96];
    snprintf(p, sizeof p, gguf_names ? "blk.%d." : hf ? "model.layers.%d." : "layers.%d.", l);
    const char *const *s;
    static const char *const ll[9] = {"attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
                                      "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
                                      "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"};
    static const char *const hn[9] = {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                      "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                                      "mlp.down_proj.weight", "mlp.up_proj.weight"};
    static const char *const gg[9] = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                      "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                                      "ffn_down.weight", "ffn_up.weight"};
    s = gguf_names ? gg : hf ? hn : ll;
    snprintf(nm, sizeof nm, "%s%s", p, s[0]);
    T(nm, W.an[l], 1, 1, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[1]);
    T(nm, hf ? hq[l] : W.wq[l], 2, DIM, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[2]);
    T(nm, hf ? hk[l] : W.wk[l], 2, KV * HS, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[3]);
    T(nm, W.wv[l], 2, KV * HS, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[4]);
    T(nm, W.wo[l], 2, DIM, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[5]);
    T(nm, W.fn[l], 1, 1, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[6]);
    T(nm, W.w1[l], 2, HID, DIM);
    snprintf(nm, sizeof nm, "%s%s", p, s[7]);
    T(nm, W.w2[l], 2, DIM, HID);
    snprintf(nm, sizeof nm, "%s%s", p, s[8]);
    T(nm, W.w3[l], 2, HID, DIM);
  }
#undef T
  return n;
}

static void gkv_u32(qt_buf *b, const char *k, uint32_t v) {
  qt_put_gstr(b, k);
  qt_put_u32(b, 4);
  qt_put_u32(b, v);
}

/* GGUF v3: llama keys, the tensors with ggml's reversed dims. */
static void write_gguf(const char *path) {
  qt_tensor t[64];
  static char names[64][96];
  size_t n = tensors(t, names, 0, 1);
  qt_buf b = {0};
  qt_put(&b, "GGUF", 4);
  qt_put_u32(&b, 3);
  qt_put_u64(&b, n);
  qt_put_u64(&b, 8);
  qt_put_gstr(&b, "general.architecture");
  qt_put_u32(&b, 8);
  qt_put_gstr(&b, "llama");
  gkv_u32(&b, "llama.embedding_length", DIM);
  gkv_u32(&b, "llama.feed_forward_length", HID);
  gkv_u32(&b, "llama.block_count", LAYERS);
  gkv_u32(&b, "llama.attention.head_count", HEADS);
  gkv_u32(&b, "llama.attention.head_count_kv", KV);
  gkv_u32(&b, "llama.context_length", SEQ);
  /* The vocabulary's size comes from the token list, as in llama.cpp's files (no vocab_size key). */
  qt_put_gstr(&b, "tokenizer.ggml.tokens");
  qt_put_u32(&b, 9);
  qt_put_u32(&b, 8);
  qt_put_u64(&b, VOCAB);
  for (int i = 0; i < VOCAB; i++) {
    char tk[16];
    snprintf(tk, sizeof tk, "<t%d>", i);
    qt_put_gstr(&b, tk);
  }
  uint64_t off = 0;
  for (size_t i = 0; i < n; i++) {
    qt_put_gstr(&b, t[i].name);
    qt_put_u32(&b, (uint32_t)t[i].ndim);
    for (int d = t[i].ndim - 1; d >= 0; d--) qt_put_u64(&b, t[i].shape[d]);
    qt_put_u32(&b, 0);
    qt_put_u64(&b, off);
    off += (t[i].nbytes + 31) / 32 * 32;
  }
  for (size_t i = 0; i < n; i++) {
    while (b.n % 32) qt_put(&b, "\0", 1);
    qt_put(&b, t[i].data, t[i].nbytes);
  }
  cr_assert_eq(qt_write(path, b.p, b.n), 0);
  free(b.p);
}

static void setup(void) {
  fill_weights();
  for (int l = 0; l < LAYERS; l++) {
    hf_permute(W.wq[l], hq[l], HEADS);
    hf_permute(W.wk[l], hk[l], KV);
  }
  cr_assert_eq(ts_dir_make(&D), 0);
  char p[256], meta[256];
  qt_tensor t[64];
  static char names[64][96];
  /* llama2.c reference (not imported: the worker reads it directly). */
  size_t n = tensors(t, names, 0, 0);
  snprintf(meta, sizeof meta,
           "{\"dim\":\"%d\",\"hidden_dim\":\"%d\",\"n_layers\":\"%d\",\"n_heads\":\"%d\","
           "\"n_kv_heads\":\"%d\",\"vocab_size\":\"%d\",\"max_seq_len\":\"%d\"}",
           DIM, HID, LAYERS, HEADS, KV, VOCAB, SEQ);
  snprintf(p, sizeof p, "%s/ref.safetensors", D.dir);
  cr_assert_eq(qt_st_write(p, t, n, meta), 0);
  /* GGUF */
  snprintf(p, sizeof p, "%s/tiny.gguf", D.dir);
  write_gguf(p);
  char *err = NULL;
  cr_assert_eq(qt_ctl(D.store, NULL, &err, "import", p, "--model", "gg", "--codec", "f32", NULL), 0, "%s", err);
  free(err);
  /* Hugging Face directory */
  snprintf(p, sizeof p, "%s/hf", D.dir);
  cr_assert_eq(mkdir(p, 0700), 0);
  snprintf(p, sizeof p, "%s/hf/config.json", D.dir);
  char cfgj[512];
  snprintf(cfgj, sizeof cfgj,
           "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": %d, \"intermediate_size\": %d,"
           " \"num_hidden_layers\": %d, \"num_attention_heads\": %d, \"num_key_value_heads\": %d,"
           " \"vocab_size\": %d, \"max_position_embeddings\": %d, \"rope_theta\": 10000.0}",
           DIM, HID, LAYERS, HEADS, KV, VOCAB, SEQ);
  cr_assert_eq(qt_write(p, cfgj, strlen(cfgj)), 0);
  n = tensors(t, names, 1, 0);
  snprintf(p, sizeof p, "%s/hf/model.safetensors", D.dir);
  cr_assert_eq(qt_st_write(p, t, n, "{\"format\":\"pt\"}"), 0);
  snprintf(p, sizeof p, "%s/hf", D.dir);
  cr_assert_eq(qt_ctl(D.store, NULL, &err, "import", p, "--model", "hf", "--codec", "f32", NULL), 0, "%s", err);
  free(err);
  /* GGUF names in a safetensors file without hyper-parameters: the shapes plus --n-heads. */
  n = tensors(t, names, 0, 1);
  snprintf(p, sizeof p, "%s/bare.safetensors", D.dir);
  cr_assert_eq(qt_st_write(p, t, n, NULL), 0);
  cr_assert_eq(qt_ctl(D.store, NULL, &err, "import", p, "--model", "bare", "--codec", "f32", NULL), 0, "%s", err);
  free(err);
  cr_assert_eq(ts_daemon_start(&D, NULL), 0);
}

static void teardown(void) {
  int st = D.pid > 0 ? ts_daemon_stop(&D) : 0;
  ts_dir_remove(&D, !(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0));
}

TestSuite(client_llama_names, .init = setup, .fini = teardown, .timeout = 120);

static void run_against_reference(const char *model, const char *kind, int map) {
  char bin[256], ref[256], *out = NULL, *err = NULL;
  snprintf(ref, sizeof ref, "%s/ref.safetensors", D.dir);
  char *argv[] = {(char *)ts_build_path("qins-llama2", bin, sizeof bin), "--socket", D.sock,
                  "--model", (char *)model, "--reference", ref, "--steps", "24", "--temperature",
                  "0.8", "--quiet", map ? "--map" : NULL, NULL};
  int rc = qt_run(argv, NULL, &out, &err);
  cr_assert_eq(rc, 0, "%s: %s%s", model, out, err);
  char want[96];
  snprintf(want, sizeof want, "model %s has %s tensor names", model, kind);
  cr_assert(strstr(out, want), "%s", out);
  cr_assert(strstr(out, "parity: 24/24 tokens identical"), "%s", out);
  cr_assert(strstr(out, "mean KLD 0.000000e+00"), "%s", out);
  free(out);
  free(err);
}

Test(client_llama_names, gguf_import_runs_like_the_reference) {
  run_against_reference("gg", "GGUF", 0);
  run_against_reference("gg", "GGUF", 1);
}

/* Also read in place (--map): the q/k rows stay in HF's order, the vectors are un-permuted. */
Test(client_llama_names, hf_import_runs_like_the_reference) {
  run_against_reference("hf", "Hugging Face", 0);
  run_against_reference("hf", "Hugging Face", 1);
}

/* Without a reference and without --n-heads the worker configures itself from the server's
 * metadata (model_info: the GGUF llama keys and token list, the HF config.json) under GGUF and HF
 * names alike, and generates the reference's tokens. */
static void run_ok(char **argv) {
  char *out = NULL, *err = NULL;
  int rc = qt_run(argv, NULL, &out, &err);
  cr_assert_eq(rc, 0, "%s%s", out, err);
  free(out);
  free(err);
}

Test(client_llama_names, served_models_configure_from_the_server_metadata) {
  char bin[256], ref[256], a[256], b[256];
  ts_build_path("qins-llama2", bin, sizeof bin);
  snprintf(ref, sizeof ref, "%s/ref.safetensors", D.dir);
  snprintf(a, sizeof a, "%s/ref.tokens", D.dir);
  char *ra[] = {bin, "--reference", ref, "--steps", "20", "--quiet", "--tokens-out", a, NULL};
  run_ok(ra);
  size_t na;
  char *want = qt_read(a, &na);
  cr_assert(want && na > 20);
  const char *models[] = {"gg", "hf"};
  for (int i = 0; i < 2; i++) {
    snprintf(b, sizeof b, "%s/%s.tokens", D.dir, models[i]);
    char *rb[] = {bin, "--socket", D.sock, "--model", (char *)models[i], "--steps", "20",
                  "--quiet", "--tokens-out", b, NULL};
    run_ok(rb);
    size_t nb;
    char *got = qt_read(b, &nb);
    cr_assert(got && nb == na && !memcmp(got, want, na), "%s: tokens differ:\n%s\nvs\n%s",
              models[i], got, want);
    free(got);
  }
  free(want);
}

/* A served model whose metadata has no hyper-parameters: the worker asks for --n-heads, naming
 * what it lacked, and with it configures itself from the shapes. */
Test(client_llama_names, served_model_without_hyper_parameters_needs_n_heads) {
  char bin[256], ref[256], a[256], b[256];
  ts_build_path("qins-llama2", bin, sizeof bin);
  char *no[] = {bin, "--socket", D.sock, "--model", "bare", "--steps", "4", "--quiet", NULL};
  char *out = NULL, *err = NULL;
  cr_assert_neq(qt_run(no, NULL, &out, &err), 0, "%s", out);
  cr_assert(strstr(err, "give --n-heads"), "%s", err);
  free(out);
  free(err);
  snprintf(ref, sizeof ref, "%s/ref.safetensors", D.dir);
  snprintf(a, sizeof a, "%s/ref.tokens", D.dir);
  char *ra[] = {bin, "--reference", ref, "--steps", "20", "--quiet", "--tokens-out", a, NULL};
  run_ok(ra);
  snprintf(b, sizeof b, "%s/bare.tokens", D.dir);
  char *rb[] = {bin, "--socket", D.sock, "--model", "bare", "--n-heads", "4", "--seq-len", "32",
                "--steps", "20", "--quiet", "--tokens-out", b, NULL};
  run_ok(rb);
  size_t na, nb;
  char *want = qt_read(a, &na), *got = qt_read(b, &nb);
  cr_assert(want && got && na == nb && !memcmp(want, got, na), "tokens differ:\n%s\nvs\n%s", got, want);
  free(want);
  free(got);
}
