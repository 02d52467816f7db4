#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""llama2c_to_safetensors.py — a llama2.c legacy checkpoint (.bin: stories260K.bin, stories15M.bin,
stories42M.bin, stories110M.bin from Hugging Face's karpathy/tinyllamas) as a safetensors file
qinsctl imports and qins-llama2 reads as its FP32 reference: llama2.c's PyTorch tensor names
(tok_embeddings.weight, layers.N.attention.wq.weight, ...), F32, shapes [out, in], and the
hyper-parameters as strings in __metadata__ (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, max_seq_len). Standard library only; the bytes are copied, never converted.

    python3 llama2c_to_safetensors.py stories15M.bin stories15M.safetensors

The .bin layout (llama2.c run.c): 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; a negative vocab_size means an untied classifier), then float32
arrays: the token embedding, each weight kind for all layers in turn (attention_norm, wq, wk, wv,
wo, ffn_norm, w1, w2, w3), the final norm, two RoPE tables of seq_len * head_size / 2 floats
(unused), and the classifier when untied. qins-llama2 runs tied models only, so an untied one is
refused with that reason.
"""
import json
import os
import struct
import sys


def fail(msg):
    sys.exit("llama2c_to_safetensors: " + msg)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def plan(dim, hidden, layers, heads, kv_heads, vocab):
    """(name, shape) in the .bin's order, layer kinds grouped as run.c reads them."""
    kv = dim // heads * kv_heads
    out = [("tok_embeddings.weight", [vocab, dim])]
    kinds = [("attention_norm.weight", [dim]), ("attention.wq.weight", [dim, dim]),
             ("attention.wk.weight", [kv, dim]), ("attention.wv.weight", [kv, dim]),
             ("attention.wo.weight", [dim, dim]), ("ffn_norm.weight", [dim]),
             ("feed_forward.w1.weight", [hidden, dim]), ("feed_forward.w2.weight", [dim, hidden]),
             ("feed_forward.w3.weight", [hidden, dim])]
    for kind, shape in kinds:
        out += [("layers.%d.%s" % (l, kind), shape) for l in range(layers)]
    out.append(("norm.weight", [dim]))
    return out


def main(argv):
    if len(argv) != 3:
        fail("usage: llama2c_to_safetensors.py MODEL.bin OUT.safetensors")
    src, dst = argv[1], argv[2]
    size = os.path.getsize(src)
    with open(src, "rb") as f:
        head = f.read(28)
        if len(head) != 28:
            fail("%s: %d bytes: not a llama2.c checkpoint (7 int32 header)" % (src, len(head)))
        dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", head)
        if vocab < 0:
            fail("%s: untied classifier (negative vocab_size): qins-llama2 runs tied models only" % src)
        if (min(dim, hidden, layers, heads, kv_heads, vocab, seq) <= 0 or dim % heads or
                heads % kv_heads or (dim // heads) % 2):
            fail("%s: implausible header: dim %d hidden %d layers %d heads %d kv_heads %d vocab %d "
                 "seq_len %d (a llama2.c legacy .bin?)" % (src, dim, hidden, layers, heads, kv_heads,
                                                          vocab, seq))
        tensors = plan(dim, hidden, layers, heads, kv_heads, vocab)
        n_floats = sum(numel(s) for _, s in tensors)
        rope = seq * (dim // heads)  # two tables of seq_len * head_size / 2
        want = 28 + 4 * (n_floats + rope)
        if size != want:
            fail("%s: %d bytes, but its header (dim %d, %d layers, vocab %d, seq_len %d) means %d"
                 % (src, size, dim, layers, vocab, seq, want))
        meta = {"format": "pt", "source": "llama2.c legacy checkpoint " + os.path.basename(src),
                "dim": str(dim), "hidden_dim": str(hidden), "n_layers": str(layers),
                "n_heads": str(heads), "n_kv_heads": str(kv_heads), "vocab_size": str(vocab),
                "max_seq_len": str(seq), "tied_embeddings": "true"}
        header = {"__metadata__": meta}
        off = 0
        for name, shape in tensors:
            n = 4 * numel(shape)
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
            off += n
        hj = json.dumps(header, separators=(",", ":")).encode()
        hj += b" " * (-len(hj) % 8)  # data starts 8-byte aligned
        tmp = dst + ".tmp"
        with open(tmp, "wb") as o:
            o.write(struct.pack("<Q", len(hj)))
            o.write(hj)
            left = 4 * n_floats
            while left:
                b = f.read(min(left, 1 << 22))
                if not b:
                    fail("%s: truncated" % src)
                o.write(b)
                left -= len(b)
        os.replace(tmp, dst)
    print("%s: %d tensors, %d weights, dim %d, %d layers, %d heads (%d KV), hidden %d, vocab %d, "
          "seq_len %d -> %s" % (src, len(tensors), n_floats, dim, layers, heads, kv_heads, hidden,
                                vocab, seq, dst))


if __name__ == "__main__":
    main(sys.argv)
