#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""make_seeds.py — writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/).

Every seed is small and synthetic (no model files are copied): valid inputs of each format, a few
near misses, and for the request target whole client sessions, each prefixed with the option byte
tests/fuzz/request.c reads. Deterministic: rerunning rewrites the same files. Run from the repo
root: /usr/bin/python3 tests/fuzz/make_seeds.py (Debian's python3-msgpack)
"""
import json
import os
import struct

import msgpack

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- request: option byte + msgpack-RPC stream (PROTOCOL.md) ---------------------------------
def req(msgid, method, params=None):
    return msgpack.packb([0, msgid, method, [] if params is None else [params]], use_bin_type=True)


def session(*reqs):
    return b"".join(reqs)


M = "m"
sessions = {
    "hello": session(req(1, "hello"), req(2, "ping"), req(3, "models"), req(4, "stats")),
    "list": session(req(1, "list", {"model": M}), req(2, "list", {"model": M, "prefix": "a.", "offset": 1, "limit": 2}),
                    req(3, "list", {"model": "nope"}), req(4, "list", {"model": 5})),
    "info": session(req(1, "info", {"model": M, "name": "a.w"}), req(2, "info", {"model": M, "name": "s"}),
                    req(3, "info", {"model": M, "name": "missing"}), req(4, "info", {"model": "n", "name": "x"})),
    "get": session(req(1, "get", {"model": M, "name": "a.w"}),
                   req(2, "get", {"model": M, "name": "a.w", "slice": [[1, 3], [2, 5]]}),
                   req(3, "get", {"model": M, "name": "b.q16", "dtype": "f16"}),
                   req(4, "get", {"model": M, "name": "d.bf16", "dtype": "bf16", "slice": [[0, 3]]}),
                   req(5, "get", {"model": M, "name": "c.f16", "slice": [[1, 2], [0, 3], [4, 5]]})),
    "get_codecs": session(req(1, "get", {"model": M, "name": "e.log"}), req(2, "get", {"model": M, "name": "f.rat"}),
                          req(3, "get", {"model": M, "name": "g.i32"}), req(4, "get", {"model": M, "name": "g.i32", "dtype": "f32"}),
                          req(5, "get", {"model": M, "name": "s"}), req(6, "get", {"model": M, "name": "z"}),
                          req(7, "get", {"model": M, "name": "a.b", "slice": [[3, 3]]})),
    "get_5d": session(req(1, "get", {"model": M, "name": "h.5d", "slice": [[0, 2], [1, 2], [0, 1]]}),
                      req(2, "get", {"model": M, "name": "h.5d", "slice": [[0, 1]] * 5}),
                      req(3, "get", {"model": M, "name": "h.5d", "slice": [[0, 1]] * 6})),
    "get_big": session(req(1, "get", {"model": M, "name": "big", "slice": [[65530, 65540]]}),
                       req(2, "get", {"model": M, "name": "big"}),
                       req(3, "get", {"model": M, "name": "big", "slice": [[100, 300], [4, 8]], "dtype": "f16"})),
    "get_bad": session(req(1, "get", {"model": M, "name": "a.w", "slice": [[3, 1]]}),
                       req(2, "get", {"model": M, "name": "a.w", "slice": [[0, 65]]}),
                       req(3, "get", {"model": M, "name": "a.w", "slice": [[0, 1, 2]]}),
                       req(4, "get", {"model": M, "name": "a.w", "slice": 7}),
                       req(5, "get", {"model": M, "name": "a.w", "dtype": "f64"}),
                       req(6, "get", {"model": M, "name": "a.w", "dtype": 3}),
                       req(7, "get", {"model": M}), req(8, "get", {"model": M, "name": "a\x00w"}),
                       req(9, "get", {"model": M, "name": "x" * 300})),
    "get_many": session(req(1, "get_many", {"model": M, "names": ["a.b", "c.f16", "g.i32"]}),
                        req(2, "get_many", {"model": M, "prefix": "a."}),
                        req(3, "get_many", {"model": M, "prefix": "zz"}),
                        req(4, "get_many", {"model": M, "names": ["a.b"], "prefix": "a"}),
                        req(5, "get_many", {"model": M, "names": [1]}),
                        req(6, "get_many", {"model": M, "names": ["a.b"], "slice": [[0, 1]]}),
                        req(7, "get_many", {"model": M, "names": ["a.b"], "dtype": "bf16"})),
    "map": session(req(1, "attach"), req(2, "map", {"model": M, "name": "a.w"}),
                   req(3, "map", {"model": M, "name": "a.w", "slice": [[1, 3], [2, 5]], "dtype": "f16"}),
                   req(4, "map", {"model": M, "name": "g.i32"}), req(5, "map", {"model": M, "name": "a.w"}),
                   req(6, "map_many", {"model": M, "names": ["a.b", "c.f16", "a.b"], "dtype": "bf16"}),
                   req(7, "map_many", {"model": M, "prefix": "d."}), req(8, "release", {"lease": 1}),
                   req(9, "release", {"leases": [2, 3, 999]}), req(10, "stats")),
    "map_bad": session(req(1, "map", {"model": M, "name": "big"}),
                       req(2, "map", {"model": M, "name": "g.i32", "dtype": "f32"}),
                       req(3, "map", {"model": M, "name": "a.w", "slice": [[3, 1]]}),
                       req(4, "map_many", {"model": M, "names": ["a.b"], "slice": [[0, 1]]}),
                       req(5, "map_many", {"model": M, "names": ["a.b", "nope"]}),
                       req(6, "release", {"lease": "x"}), req(7, "release", {"lease": 1, "leases": [1]}),
                       req(8, "release", {}), req(9, "map", {"model": "n", "name": "x"}),
                       req(10, "map", {"model": M, "name": "h.5d", "slice": [[0, 1]] * 5})),
    "map_limit": session(*[req(i + 1, "map", {"model": M, "name": n, "dtype": d})
                           for i, (n, d) in enumerate([(n, d) for n in ("a.w", "b.q16", "d.bf16", "e.log", "f.rat")
                                                       for d in ("f32", "f16")])]),
    "model_info": session(req(1, "model_info", {"model": M}),
                          req(2, "model_info", {"model": M, "offset": 1, "limit": 2}),
                          req(3, "model_info", {"model": M, "key": "tokenizer.ggml.tokens", "offset": 1}),
                          req(4, "model_info", {"model": M, "key": "tokenizer.ggml.merges"}),
                          req(5, "model_info", {"model": M, "key": "llama.block_count"}),
                          req(6, "model_info", {"model": M, "key": "hf.config"}),
                          req(7, "model_info", {"model": "n", "offset": 99}),
                          req(8, "model_info", {"model": "nope"}),
                          req(9, "model_info", {"model": M, "limit": "x"})),
    "admin": session(req(1, "shutdown"), req(2, "nosuch"), req(3, "ping")),
    "notify": msgpack.packb([2, "ping", []]) + req(1, "ping"),
    "method_not_str": msgpack.packb([0, 1, 5, []]) + req(2, "ping"),
    "params_bad": msgpack.packb([0, 1, "ping", 5]) + msgpack.packb([0, 2, "info", [1, 2]]) + req(3, "ping"),
    "bad_c1": req(1, "ping") + b"\xc1",
    "bad_tag": msgpack.packb([1, 1, "ping", []]),
    "bad_msgid": msgpack.packb([0, -1, "ping", []]),
    "bad_len3": msgpack.packb([0, 1, "ping"]),
    "bad_not_array": msgpack.packb({"a": 1}),
    "huge_bin": b"\x94\x00\x01\xa4ping\x91\x81\xa1a\xc6\xff\xff\xff\xff",
    "huge_array": b"\xdd\xff\xff\xff\xff",
    "deep": b"\x91" * 12 + b"\x00",
    "truncated": req(1, "get", {"model": M, "name": "a.w"})[:-3],
}
variants = {0: "", 1: "_p1", 2: "_p7", 3: "_p64", 4: "_pool", 12: "_stream", 36: "_pend1", 16: "_small"}
for name, body in sessions.items():
    put("request", name, bytes([0]) + body)
for opt, suffix in variants.items():
    if opt:
        for name in ("get", "get_big", "get_many", "hello", "map"):
            put("request", name + suffix, bytes([opt]) + sessions[name])
put("request", "stream_rows", bytes([12]) + session(
    req(1, "get", {"model": M, "name": "big", "slice": [[65300, 65700]]}),
    req(2, "get", {"model": M, "name": "big", "slice": [[0, 200]], "dtype": "bf16"}), req(3, "ping")))

# ---- safetensors -------------------------------------------------------------------------------
def safetensors(tensors, meta=None, pad=True):
    hdr, data = {}, b""
    if meta is not None:
        hdr["__metadata__"] = meta
    for name, dtype, shape, raw in tensors:
        hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(hdr, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


f32 = lambda *v: struct.pack("<%df" % len(v), *v)
put("safetensors", "one_f32", safetensors([("w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6))]))
put("safetensors", "dtypes", safetensors([
    ("a", "F16", [2], b"\x00\x3c\x00\xc0"), ("b", "BF16", [2], b"\x80\x3f\x00\x40"),
    ("c", "I64", [1], struct.pack("<q", -5)), ("d", "BOOL", [3], b"\x01\x00\x01"),
    ("e", "U8", [1, 1, 1], b"\x07"), ("f", "F64", [], struct.pack("<d", 2.5)),
    ("g", "F32", [0, 4], b""), ("h", "I32", [2], struct.pack("<ii", 1, -1))],
    meta={"format": "pt", "k": "v\u00e9"}))
put("safetensors", "f8_f4", safetensors([("a", "F8_E4M3", [4], b"\x01\x02\x03\x04"), ("b", "F4", [2, 4], b"\x12\x34\x56\x78")]))
put("safetensors", "empty", safetensors([]))
put("safetensors", "meta_only", safetensors([], meta={"a": "b"}))
put("safetensors", "gap", safetensors([("w", "F32", [1], f32(1))])[:-1] + b"\x00\x00")
put("safetensors", "nopad", safetensors([("w", "F32", [1], f32(1))], pad=False))
put("safetensors", "short", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")

# ---- GGUF (v3 and v2) --------------------------------------------------------------------------
def gstr(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def gguf(kvs, tensors, version=3, align=32):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, typ, payload in kvs:
        out += gstr(key) + struct.pack("<I", typ) + payload
    off, datas = 0, []
    infos = b""
    for name, dims, typ, raw in tensors:
        infos += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", typ, off)
        datas.append(raw + b"\x00" * (-len(raw) % align))
        off += len(datas[-1])
    out += infos
    out += b"\x00" * (-len(out) % align)
    return out + b"".join(datas)


kv_basic = [("general.architecture", 8, gstr("llama")), ("general.alignment", 4, struct.pack("<I", 32)),
            ("llama.block_count", 4, struct.pack("<I", 1)), ("general.flag", 7, b"\x01"),
            ("general.f", 6, struct.pack("<f", 0.5)), ("general.u64", 10, struct.pack("<Q", 7)),
            ("general.i8", 1, b"\xff"), ("general.f64", 12, struct.pack("<d", 1.5)),
            ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("\"q\\")),
            ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + f32(0.0, -1.0))]
q8 = (struct.pack("<e", 0.5) + bytes(range(32)))
q4 = (struct.pack("<e", 0.25) + bytes(range(16)))
put("gguf", "v3_f32", gguf(kv_basic, [("tok.weight", [4, 2], 0, f32(*range(8)))]))
put("gguf", "v3_types", gguf(kv_basic[:2], [
    ("a", [2], 1, b"\x00\x3c\x00\xc0"), ("b", [2], 30, b"\x80\x3f\x00\x40"), ("c", [32, 2], 8, q8 * 2),
    ("d", [32], 2, q4), ("e", [3], 26, struct.pack("<3i", 1, 2, 3)), ("f", [1], 28, struct.pack("<d", 1.0)),
    ("g", [2, 2, 2, 1], 24, b"\x01\x02\x03\x04\x05\x06\x07\x08")]))
put("gguf", "v3_refused", gguf(kv_basic[:1], [("k", [256], 23, b"\x00" * 136)]))  # IQ4_XS
# Every block type qins dequantizes: (ggml type, weights, bytes per block) and one block of
# patterned bytes each (scales included: the target checks sizes and in-bounds dequantization).
blocks = [(2, 32, 18), (3, 32, 20), (6, 32, 22), (7, 32, 24), (8, 32, 34), (10, 256, 84),
          (11, 256, 110), (12, 256, 144), (13, 256, 176), (14, 256, 210), (15, 256, 292)]
put("gguf", "v3_blocks", gguf(kv_basic[:1], [
    ("q%d" % ty, [w], ty, bytes((i * 37 + ty) % 251 for i in range(nb))) for ty, w, nb in blocks]))
put("gguf", "v2_f16", gguf([("general.name", 8, gstr("x"))], [("w", [2, 2], 1, b"\x00\x3c" * 4)], version=2))
put("gguf", "no_tensors", gguf(kv_basic, []))
put("gguf", "align64", gguf([("general.alignment", 4, struct.pack("<I", 64))], [("w", [3], 0, f32(1, 2, 3)), ("v", [1], 0, f32(4))], align=64))
put("gguf", "truncated", gguf(kv_basic, [("w", [4], 0, f32(1, 2, 3, 4))])[:-9])

# ---- .npy --------------------------------------------------------------------------------------
def npy(descr, shape, data, fortran=False, version=1):
    d = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, repr(tuple(shape)))
    pre = 10 if version == 1 else 12
    h = d + " " * (-(pre + len(d) + 1) % 64) + "\n"
    lenf = struct.pack("<H", len(h)) if version == 1 else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes([version, 0]) + lenf + h.encode("latin1") + data


put("npy", "f4_2x3", npy("<f4", [2, 3], f32(1, 2, 3, 4, 5, 6)))
put("npy", "f2", npy("<f2", [2], b"\x00\x3c\x00\xc0"))
put("npy", "f8_scalar", npy("<f8", [], struct.pack("<d", 3.0)))
put("npy", "i4", npy("<i4", [3], struct.pack("<3i", 1, -2, 3)))
put("npy", "b1", npy("|b1", [4], b"\x01\x00\x01\x01"))
put("npy", "u1_v2", npy("|u1", [2, 1], b"\x05\x06", version=2))
put("npy", "i8_v3", npy("<i8", [1], struct.pack("<q", 9), version=3))
put("npy", "zero", npy("<f4", [0, 5], b""))
put("npy", "fortran", npy("<f4", [2, 2], f32(1, 2, 3, 4), fortran=True))
put("npy", "bigendian", npy(">f4", [1], struct.pack(">f", 1.0)))
put("npy", "object", npy("|O", [1], b"\x00" * 8))
put("npy", "short_data", npy("<f4", [3], f32(1, 2)))

# ---- records: mode byte, then params or chunk (tests/fuzz/records.c) ---------------------------
table = struct.pack("<128f", *[1.0 - m / 127.0 for m in range(128)])
params = {3: table, 5: f32(-8.0, 2.0), 6: f32(1.0), 0: b"", 1: b"", 2: b"", 4: b""}
for c, body in params.items():
    put("records", "params_%d" % c, bytes([0, c]) + bytes([c, 1, 0, 0]) + body)
put("records", "params_bad_version", bytes([0, 3, 3, 2, 0, 0]) + table)


def chunk_seed(c, dt, row_len, n_rows, psel, rng, pbytes, body):
    return bytes([1, c, dt]) + struct.pack("<HBB", row_len - 1, n_rows - 1, psel) + \
        struct.pack("<II", *rng) + pbytes + body


half = struct.pack("<e", 0.5)
put("records", "chunk_f32", chunk_seed(0, 0, 5, 2, 0, (1, 7), b"", f32(*range(10))))
put("records", "chunk_f16", chunk_seed(1, 1, 3, 1, 0, (0, 3), b"", b"\x00\x3c\x01\x80\xff\x7b"))
put("records", "chunk_bf16", chunk_seed(2, 2, 4, 1, 0, (1, 3), b"", b"\x80\x3f\xc0\x7f\x80\xff\x00\x00"))
put("records", "chunk_qins8_std", chunk_seed(3, 0, 40, 2, 2, (3, 70), b"", half * 4 + bytes(range(0, 240, 3))))
put("records", "chunk_qins8_table", chunk_seed(3, 1, 33, 1, 0x80, (0, 33), bytes([3, 1, 0, 0]) + table,
                                               half * 2 + bytes(range(33))))
put("records", "chunk_qins16", chunk_seed(4, 0, 70, 1, 0, (5, 66), b"", bytes([0x02, 0x80]) + struct.pack("<70H", *range(0, 63000, 900))))
put("records", "chunk_seedlog", chunk_seed(5, 0, 8, 1, 0, (0, 8), bytes([5, 1, 0, 0]) + f32(-8.0, 2.0),
                                           bytes([1, 0xff, 0, 1, 1, 0xff, 0, 1]) + bytes(range(0, 256, 32))))
put("records", "chunk_seedrat", chunk_seed(6, 2, 8, 2, 0, (2, 9), bytes([6, 1, 0, 0]) + f32(1.0), bytes(range(0, 256, 16))))


# Store records (mode 2): tensor record (docs/FORMAT.md §2; store_int.h QS_TENSOR_HDR = 176),
# params record (QS_PARAMS_HDR = 24), chunk record (QS_CHUNK_HDR = 16). Checksums are left 0: the
# seeds set the fix-up flag, the target computes them.
def trec(name, codec, src_dtype, shape, rows_per_chunk, params_id=0, params_bytes=0):
    n = 1
    for d in shape:
        n *= d
    row_len = shape[-1] if shape else 1
    n_rows = n // row_len if row_len else 0
    n_chunks = (n_rows + rows_per_chunk - 1) // rows_per_chunk if n_rows else 0
    h = b"QSTN" + struct.pack("<HBBBBH", 1, codec, src_dtype, len(shape), 0, len(name))
    h += struct.pack("<I", 0) + b"".join(struct.pack("<Q", d) for d in (list(shape) + [0] * 8)[:8])
    h += struct.pack("<QQQQQQQQIIdd", n, row_len, n_rows, rows_per_chunk, n_chunks, (4 * n) % (1 << 64), 0,
                     params_id, params_bytes, 0, float("inf"), 0.0)
    h += b"\x00" * (176 - len(h))
    return h + name.encode() + b"\x00"


def precord(codec, blob):
    return b"QSPM" + bytes([codec]) + b"\x00" * 11 + struct.pack("<II", len(blob), 0) + blob


def crecord(payload):
    return b"QSCK" + struct.pack("<IQ", 0, len(payload)) + payload


def rec_seed(t, p, ci, c, fix=1):
    return bytes([2, fix]) + struct.pack("<H", len(t)) + t + struct.pack("<H", len(p)) + p + bytes([ci]) + c


q8blob = bytes([3, 1, 0, 0]) + table
put("records", "store_f32", rec_seed(trec("w", 0, 0, [4, 8], 4, 1, 4), precord(0, bytes([0, 1, 0, 0])), 0, crecord(f32(*range(32)))))
put("records", "store_f32_badcrc", rec_seed(trec("w", 0, 0, [4, 8], 4, 1, 4), precord(0, bytes([0, 1, 0, 0])), 0, crecord(f32(*range(32))), fix=0))
put("records", "store_qins8", rec_seed(trec("q", 3, 0, [3, 40], 3, 7, len(q8blob)), precord(3, q8blob), 0,
                                       crecord(half * 6 + bytes(range(120)))))
put("records", "store_qins16", rec_seed(trec("h", 4, 0, [2, 70], 2, 2, 4), precord(4, bytes([4, 1, 0, 0])), 0,
                                        crecord(bytes([2, 2, 2, 2]) + struct.pack("<140H", *range(0, 140 * 400, 400)))))
put("records", "store_raw_i32", rec_seed(trec("i", 255, 8, [2, 3], 2), b"", 0, crecord(struct.pack("<6i", *range(6)))))
put("records", "store_bf16_last_chunk", rec_seed(trec("b", 2, 2, [10, 4], 3, 3, 4), precord(2, bytes([2, 1, 0, 0])), 3, crecord(b"\x80\x3f" * 4)))
put("records", "store_scalar", rec_seed(trec("s", 0, 0, [], 1, 1, 4), precord(0, bytes([0, 1, 0, 0])), 0, crecord(f32(2.5))))
put("records", "store_seedlog", rec_seed(trec("l", 5, 0, [1, 8], 1, 9, 12), precord(5, bytes([5, 1, 0, 0]) + f32(-8.0, 2.0)), 0,
                                         crecord(bytes([1, 0xff, 0, 1, 1, 0xff, 0, 1]) + bytes(range(0, 256, 32)))))
# A qins16 tensor of 2^63 elements in one row: its chunk's payload size (2 * 2^63 + ...) does not
# fit in 64 bits. The tensor record is refused (record.c); before, the wrapped size let a 16-byte
# chunk record through to qc_chunk_validate, which refused it on its own overflow check.
put("records", "store_chunk_size_overflow", rec_seed(trec("o", 4, 0, [1 << 63], 1, 2, 4), precord(4, bytes([4, 1, 0, 0])), 0, crecord(b"")))
