# SPDX-License-Identifier: MIT
"""test_client.py — the Python client (client/python/qins.py) against a real qinsd.

Generates a safetensors file with known values, imports it with `qinsctl import --codec f32` into a
temporary store, starts $QINS_BUILD/qinsd on a temporary socket, checks every client call
(PROTOCOL.md §4) and always stops the daemon. Run with Debian's python3 (numpy, msgpack).
"""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
import qins  # noqa: E402

BUILD = os.path.abspath(os.environ.get("QINS_BUILD", os.path.join(ROOT, "build")))
MODEL = "t"

# name -> array; values are exact in f32 and varied in sign and magnitude.
rng = np.random.default_rng(1234)
TENSORS = {
    "w": (rng.standard_normal((37, 129)) * np.where(rng.random((37, 129)) < 0.1, 1e-3, 1.0)).astype("<f4"),
    "c3": rng.standard_normal((5, 7, 11)).astype("<f4"),
    "layers.0.x": rng.standard_normal((3, 4)).astype("<f4"),
    "layers.0.y": rng.standard_normal((4,)).astype("<f4"),
    "layers.1.x": rng.standard_normal((2, 2)).astype("<f4"),
}
# Integer, bool and f16 sources (issue 15): get() without a dtype returns floats as f32 and the
# rest as stored.
TENSORS.update({
    "position_ids": np.arange(-3, 13, dtype="<i8").reshape(2, 8),
    "mask": (rng.random((3, 5)) < 0.5).astype(np.uint8),
    "flags": rng.random(7) < 0.5,
    "ids32": rng.integers(-2**31, 2**31, size=(4, 3), dtype=np.int64).astype("<i4"),
    "h16": rng.standard_normal((3, 6)).astype("<f2"),
})
ST_DTYPE = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "uint8": "U8",
            "bool": "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    header, off, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": ST_DTYPE[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def f32_to_bf16_rne(a):
    u = np.asarray(a, dtype="<f4").view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return r


class Daemon:
    """A qinsd on a temp store and socket (short path: sun_path holds 107 bytes)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="qins-py-", dir="/tmp")
        self.store = os.path.join(self.dir, "store")
        self.sock = os.path.join(self.dir, "s")
        self.log = os.path.join(self.dir, "log")
        self.proc = None

    def import_file(self, path, model):
        subprocess.run([os.path.join(BUILD, "qinsctl"), "import", "--store", self.store, path,
                        "--model", model, "--codec", "f32"], check=True, stdout=subprocess.DEVNULL)

    def start(self, args=()):
        self.proc = subprocess.Popen([os.path.join(BUILD, "qinsd"), "--store", self.store,
                                      "--socket", self.sock, "--log", self.log, *args])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("qinsd exited %d:\n%s" % (self.proc.returncode, self.log_text()))
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.sock)
                return
            except OSError:
                time.sleep(0.01)
            finally:
                s.close()
        raise RuntimeError("qinsd did not come up:\n" + self.log_text())

    def restart(self, sig=signal.SIGTERM):
        """Stops qinsd (SIGTERM: it exits 0; SIGKILL) and starts a new one on the same store and
        socket."""
        self.proc.send_signal(sig)
        status = self.proc.wait(30)
        if sig == signal.SIGTERM:
            assert status == 0, "qinsd exited %r on SIGTERM" % status
        self.start()

    def log_text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        status = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return status


def serve(tensors, model, metadata=None):
    """A started Daemon serving `tensors` as `model` (imported --codec f32); stopped on failure."""
    d = Daemon()
    try:
        path = os.path.join(d.dir, "in.safetensors")
        write_safetensors(path, tensors, metadata)
        os.makedirs(d.store, exist_ok=True)
        d.import_file(path, model)
        d.start()
    except BaseException:
        d.stop()
        raise
    return d


D = None


def setUpModule():
    global D
    D = serve(TENSORS, MODEL, {"purpose": "test"})


def tearDownModule():
    status = D.stop()
    assert status in (0, None), "qinsd exited %r on SIGTERM" % status


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.c = qins.Client(D.sock)

    def tearDown(self):
        self.c.close()

    def test_hello_and_ping(self):  # PROTOCOL.md §4.1, §4.2
        self.assertEqual(self.c.server["protocol"], 1)
        self.assertTrue(self.c.server["server"].startswith("qinsd"))
        self.assertGreater(self.c.server["max_response_bytes"], 0)
        self.assertEqual(self.c.ping(), "pong")

    def test_models_list_info(self):  # §4.3-4.5
        ms = self.c.models()
        self.assertEqual([m["name"] for m in ms], [MODEL])
        self.assertEqual(ms[0]["tensors"], len(TENSORS))
        l = self.c.list(MODEL)
        self.assertEqual(l["total"], len(TENSORS))
        self.assertEqual([t["name"] for t in l["tensors"]], sorted(TENSORS))
        l = self.c.list(MODEL, prefix="layers.0.")
        self.assertEqual([t["name"] for t in l["tensors"]], ["layers.0.x", "layers.0.y"])
        l = self.c.list(MODEL, offset=1, limit=2)
        self.assertEqual([t["name"] for t in l["tensors"]], sorted(TENSORS)[1:3])
        i = self.c.info(MODEL, "c3")
        self.assertEqual(i["shape"], [5, 7, 11])
        self.assertEqual(i["codec"], "f32")
        self.assertEqual(i["n_elem"], 385)

    def test_get_whole(self):  # §4.6
        for name, a in TENSORS.items():
            if a.dtype != np.float32:
                continue
            g = self.c.get(MODEL, name)
            self.assertEqual(g.dtype, np.float32)
            self.assertEqual(g.shape, a.shape)
            self.assertTrue(np.array_equal(g.view(np.uint32), a.view(np.uint32)), name)

    def test_get_default_dtype(self):  # §4.6: floats as f32, integers and bool as stored
        for name, a in TENSORS.items():
            g = self.c.get(MODEL, name)
            info = self.c.info(MODEL, name)
            want = np.float32 if a.dtype.kind == "f" else a.dtype
            self.assertEqual(g.dtype, want, name)
            self.assertEqual(g.shape, a.shape, name)
            self.assertTrue(np.array_equal(g, a.astype(want)), name)
            self.assertEqual(info["src_dtype"], {"float32": "f32", "float16": "f16", "int64": "i64",
                                                 "int32": "i32", "uint8": "u8",
                                                 "bool": "bool"}[a.dtype.name], name)
        # A slice and a get_many keep the stored dtypes too.
        self.assertTrue(np.array_equal(self.c.get(MODEL, "position_ids", slice="1:2"),
                                       TENSORS["position_ids"][1:2]))
        got = self.c.get_many(MODEL, names=["mask", "w", "ids32"])
        self.assertEqual([got[k].dtype for k in got], [np.uint8, np.float32, np.int32])
        self.assertTrue(np.array_equal(got["ids32"], TENSORS["ids32"]))
        # A float type asked of an integer tensor is refused, naming it.
        with self.assertRaises(qins.QinsError) as e:
            self.c.get(MODEL, "position_ids", dtype="f32")
        self.assertEqual(e.exception.name, "DTYPE")
        self.assertIn("position_ids", e.exception.message)

    def test_read_only_unless_copy(self):  # docs/client.md §2: views of the received bytes
        g = self.c.get(MODEL, "w")
        self.assertFalse(g.flags.writeable)
        with self.assertRaises(ValueError):
            g[0, 0] = 1.0
        w = self.c.get(MODEL, "w", copy=True)
        self.assertTrue(w.flags.writeable)
        w[0, 0] = 1.0  # does not raise
        self.assertTrue(np.array_equal(w[1:], TENSORS["w"][1:]))
        for d in (self.c.get_many(MODEL, names=["w", "mask"], copy=True),
                  {"p": self.c.get(MODEL, "position_ids", copy=True),
                   "h": self.c.get(MODEL, "w", dtype="f16", copy=True)}):
            for k, v in d.items():
                self.assertTrue(v.flags.writeable, k)
        self.assertFalse(self.c.get_many(MODEL, names=["mask"])["mask"].flags.writeable)

    def test_get_slices(self):  # §4.6: rows, columns, hyperslab, empty, negative
        w, c3 = TENSORS["w"], TENSORS["c3"]
        cases = [
            ("w", "3:10", w[3:10]),
            ("w", (slice(None), slice(5, 17)), w[:, 5:17]),
            ("w", "0:37,128:", w[:, 128:]),
            ("w", "-2:,:", w[-2:]),
            ("w", 4, w[4:5]),
            ("w", "2:2", w[2:2]),
            ("c3", "1:4,2:5,3:9", c3[1:4, 2:5, 3:9]),
            ("c3", [(0, 5), (3, 3)], c3[:, 3:3]),
            ("w", "1:-1", w[1:-1]),  # a negative stop counts from the end, as in numpy
            ("w", ":,-5:-2", w[:, -5:-2]),
            ("c3", (slice(None), slice(-3, -1)), c3[:, -3:-1]),
        ]
        self.assertEqual(qins.parse_slice("2:-3,:-1", shape=(37, 129)), [[2, 34], [0, 128]])
        for name, spec, want in cases:
            g = self.c.get(MODEL, name, slice=spec)
            self.assertEqual(g.shape, want.shape, (name, spec))
            self.assertTrue(np.array_equal(g, want), (name, spec))

    def test_get_f16_bf16(self):  # §4.6 dtype
        w = TENSORS["w"]
        h = self.c.get(MODEL, "w", dtype="f16")
        self.assertEqual(h.dtype, np.float16)
        self.assertTrue(np.array_equal(h.view(np.uint16), w.astype(np.float16).view(np.uint16)))
        b = self.c.get(MODEL, "w", dtype="bf16", raw=True)
        self.assertTrue(np.array_equal(b, f32_to_bf16_rne(w)))
        bf = self.c.get(MODEL, "w", dtype="bf16")
        self.assertEqual(bf.dtype, np.float32)
        self.assertTrue(np.array_equal(bf, qins.bf16_to_f32(f32_to_bf16_rne(w))))

    def test_get_many(self):  # §4.7
        got = self.c.get_many(MODEL, names=["c3", "w"])
        self.assertEqual(list(got), ["c3", "w"])
        self.assertTrue(np.array_equal(got["w"], TENSORS["w"]))
        got = self.c.get_many(MODEL, prefix="layers.")
        self.assertEqual(list(got), ["layers.0.x", "layers.0.y", "layers.1.x"])
        for k, v in got.items():
            self.assertTrue(np.array_equal(v, TENSORS[k]), k)

    def test_errors(self):  # §3
        with self.assertRaises(qins.QinsError) as e:
            self.c.get(MODEL, "nope")
        self.assertEqual(e.exception.code, -1005)
        self.assertEqual(e.exception.name, "NO_TENSOR")
        with self.assertRaises(qins.QinsError) as e:
            self.c.get("nope", "w")
        self.assertEqual(e.exception.name, "NO_MODEL")
        with self.assertRaises(qins.QinsError) as e:
            self.c.get(MODEL, "w", slice="0:38")
        self.assertEqual(e.exception.name, "BAD_SLICE")
        with self.assertRaises(qins.QinsError) as e:
            self.c.call("no_such_method")
        self.assertEqual(e.exception.name, "UNKNOWN_METHOD")
        self.assertEqual(self.c.ping(), "pong")  # the connection survives

    def test_model_info(self):  # §4.14: the model's __metadata__ as members, no entries
        page = self.c.model_info(MODEL)
        self.assertEqual(page["metadata"], {"purpose": "test"})
        self.assertEqual((page["total"], page["offset"], page["entries"]), (0, 0, []))
        self.assertNotIn("gguf_version", page)
        self.assertEqual(self.c.metadata(MODEL), {"purpose": "test"})
        with self.assertRaises(qins.QinsError) as e:
            self.c.metadata("no-such-model")
        self.assertEqual(e.exception.name, "NO_MODEL")
        with self.assertRaises(qins.QinsError) as e:
            self.c.model_info(MODEL, key="tokenizer.ggml.tokens")
        self.assertEqual(e.exception.name, "BAD_PARAMS")
        self.assertIn("tokenizer.ggml.tokens", str(e.exception))

    def test_stats(self):  # §4.8
        self.c.get(MODEL, "layers.0.y")
        s = self.c.stats()
        self.assertGreaterEqual(s["requests"]["get"], 1)
        self.assertGreater(s["bytes_served"], 0)


def write_gguf(path, kvs, name="w", values=(1.0, 2.0, 3.0, 4.0)):
    """A GGUF v3 file: kvs [(key, "string" | "u32" | "[string]", value)], one f32 tensor."""
    def gstr(t):
        b = t.encode()
        return struct.pack("<Q", len(b)) + b
    out = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs))
    for k, t, v in kvs:
        out += gstr(k)
        if t == "string":
            out += struct.pack("<I", 8) + gstr(v)
        elif t == "u32":
            out += struct.pack("<II", 4, v)
        else:
            out += struct.pack("<IIQ", 9, 8, len(v)) + b"".join(gstr(x) for x in v)
    out += gstr(name) + struct.pack("<IQIQ", 1, len(values), 0, 0)
    out += b"\0" * (-len(out) % 32) + struct.pack("<%df" % len(values), *values)
    with open(path, "wb") as f:
        f.write(out)


class ModelInfoPagedTest(unittest.TestCase):
    """§4.14 under a 4 KiB response limit: metadata() reassembles the pages, the token list is
    too large for one answer and comes back whole through model_info(key=...) pages."""

    def test_gguf_metadata_paged(self):
        tokens = ["tok%d" % i for i in range(2000)]
        d = Daemon()
        try:
            path = os.path.join(d.dir, "m.gguf")
            write_gguf(path, [("general.architecture", "string", "llama"),
                              ("llama.block_count", "u32", 2),
                              ("tokenizer.ggml.tokens", "[string]", tokens)])
            os.makedirs(d.store, exist_ok=True)
            d.import_file(path, "g")
            d.start(("--max-response-bytes", "4K"))
            with qins.Client(d.sock) as c:
                m = c.metadata("g")
                self.assertEqual(m["general.architecture"], "llama")
                self.assertEqual(m["gguf"]["version"], 3)
                self.assertEqual(m["gguf"]["kv"][:2], [["general.architecture", "string", "llama"],
                                                       ["llama.block_count", "u32", 2]])
                self.assertEqual(m["gguf"]["kv"][2], ["tokenizer.ggml.tokens", "[string]", None, 2000])
                got, pages = [], 0
                while len(got) < 2000:
                    p = c.model_info("g", key="tokenizer.ggml.tokens", offset=len(got))
                    self.assertEqual(p["total"], 2000)
                    self.assertTrue(p["values"])
                    got += p["values"]
                    pages += 1
                self.assertEqual(got, tokens)
                self.assertGreater(pages, 3)
        finally:
            d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
