# SPDX-License-Identifier: MIT
"""test_export_reader.py — an independent check of `qinsctl export` (issue 3 acceptance).

Imports ../shared/models/stories260K.safetensors into a temporary store with $QINS_BUILD/qinsctl,
exports it twice (f32) and once as bf16, and validates the files with a safetensors reader written
here from the format description alone (standard library only: struct, json): header length and
cap, UTF-8 JSON without duplicate keys, known dtypes, contiguous offsets covering the data exactly,
element counts matching shapes; then compares the values with the source (1-D tensors exact, 2-D
tensors within the SNR the audit reports) and checks that the two f32 exports are byte-identical.
Skips (exit 0, with a message) when the model is absent.
"""
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

BUILD = os.path.abspath(os.environ.get("QINS_BUILD", "build"))
SHARED = os.path.abspath(os.environ.get("QINS_SHARED", os.path.join("..", "shared")))
QINSCTL = os.path.join(BUILD, "qinsctl")
MODEL = os.path.join(SHARED, "models", "stories260K.safetensors")

DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64}


def no_dup_pairs(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in header")
    return dict(pairs)


def read_safetensors(path):
    """Returns (metadata, {name: (dtype, shape, bytes)}) after checking every rule."""
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) >= 8, "file shorter than 8 bytes"
    (n,) = struct.unpack("<Q", data[:8])
    assert n <= 100_000_000, "header too large"
    assert 8 + n <= len(data), "header past EOF"
    header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=no_dup_pairs)
    assert isinstance(header, dict)
    meta = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    buf = data[8 + n:]
    entries = []
    for name, e in header.items():
        assert set(e) == {"dtype", "shape", "data_offsets"}, name
        assert e["dtype"] in DTYPE_BITS, e["dtype"]
        count = 1
        for d in e["shape"]:
            assert isinstance(d, int) and d >= 0
            count *= d
        b, end = e["data_offsets"]
        assert 0 <= b <= end <= len(buf), name
        assert (end - b) * 8 == count * DTYPE_BITS[e["dtype"]], name
        entries.append((b, end, name, e))
    entries.sort()
    pos = 0
    for b, end, name, _ in entries:
        assert b == pos, "gap or overlap at %s" % name
        pos = end
    assert pos == len(buf), "data not covered exactly"
    return meta, {name: (e["dtype"], e["shape"], buf[b:end]) for b, end, name, e in entries}


def floats(dtype, raw):
    if dtype == "F32":
        return struct.unpack("<%df" % (len(raw) // 4), raw)
    if dtype == "BF16":
        hs = struct.unpack("<%dH" % (len(raw) // 2), raw)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in hs]
    raise ValueError(dtype)


def run(*args):
    p = subprocess.run([QINSCTL, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit("qinsctl %s failed (%d): %s" % (" ".join(args), p.returncode, p.stderr))
    return p.stdout


def main():
    if not os.path.exists(MODEL):
        print("SKIP: %s absent" % MODEL)
        return 0
    tmp = tempfile.mkdtemp(prefix="qins-py-")
    try:
        store = os.path.join(tmp, "store")
        e1, e2, e3 = (os.path.join(tmp, n) for n in ("e1.safetensors", "e2.safetensors", "e3.safetensors"))
        run("--store", store, "import", MODEL)
        run("--store", store, "export", "stories260K", e1)
        run("--store", store, "export", "stories260K", e2)
        run("--store", store, "export", "stories260K", e3, "--dtype", "bf16")
        h1 = hashlib.sha256(open(e1, "rb").read()).hexdigest()
        h2 = hashlib.sha256(open(e2, "rb").read()).hexdigest()
        assert h1 == h2, "two exports differ"
        smeta, src = read_safetensors(MODEL)
        meta, out = read_safetensors(e1)
        _, out16 = read_safetensors(e3)
        assert meta == smeta, "metadata changed"
        assert set(out) == set(src), "tensor names differ"
        num = den = 0.0
        for name, (dt, shape, raw) in src.items():
            odt, oshape, oraw = out[name]
            assert odt == "F32" and oshape == shape, name
            assert out16[name][0] == "BF16" and out16[name][1] == shape, name
            x, y = floats(dt, raw), floats(odt, oraw)
            if len(shape) == 1:
                assert raw == oraw, "%s: 1-D tensor not exact" % name
                continue
            s2 = sum(v * v for v in x)
            err2 = sum((a - b) ** 2 for a, b in zip(x, y))
            snr = 10 * math.log10(s2 / err2)
            assert snr > 40, "%s: SNR %.2f dB" % (name, snr)
            num += snr * len(x)
            den += len(x)
        audit = json.loads(run("--store", store, "--json", "audit"))
        mat = audit["models"][0]["matrices"]
        print("export: %d tensors valid, two exports identical (sha256 %s...), 2-D SNR by this "
              "reader %.2f dB, audit says %.2f dB at %.4f bytes/weight"
              % (len(out), h1[:12], num / den, mat["snr_db"], mat["bytes_per_weight"]))
        assert abs(num / den - mat["snr_db"]) < 0.05, "audit SNR disagrees with the export"
        assert mat["bytes_per_weight"] <= 1.08
        # Import of the export is valid too.
        run("--store", store, "import", e1, "--model", "again")
        run("--store", store, "export", "again", e2)
        read_safetensors(e2)
        print("ok")
        return 0
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
