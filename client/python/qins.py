# SPDX-License-Identifier: MIT
"""qins.py — a minimal Python client for qinsd (docs/PROTOCOL.md; docs/client.md §2), for workers.

Needs Debian's python3-msgpack and python3-numpy (run with /usr/bin/python3). One blocking
connection per Client; one request in flight at a time; not thread-safe (one Client per thread).

    import qins
    with qins.Client("/run/qins.sock") as c:
        print(c.server)                               # hello: protocol, limits
        w = c.get("stories260K", "layers.0.attention.wq.weight")          # numpy float32 array
        rows = c.get("stories260K", "tok_embeddings.weight", slice="0:8")  # first 8 rows
        cols = c.get("stories260K", "tok_embeddings.weight", slice=(slice(None), slice(0, 16)))
        layer = c.get_many("stories260K", prefix="layers.3.")           # {name: array}

Errors: every server error raises QinsError with .code (the stable negative code of PROTOCOL.md
§3), .name ("NO_TENSOR", ...) and the server's message. Transport failures raise QinsError with
code CLOSED / TIMEOUT / PROTO and the connection is closed.

Arrays: `data` comes back as little-endian row-major bytes; get returns a numpy array of the
result's shape: float32 for "f32", float16 for "f16", and for "bf16" float32 values widened
exactly from the bf16 bits (numpy has no bfloat16; pass raw=True to get the uint16 bits).
"""
import os
import socket

import msgpack
import numpy as np

PROTOCOL = 1

# PROTOCOL.md §3 (client/qins.h QINS_ERR_MAP), name by code.
ERRORS = {
    -1000: "PROTO", -1001: "TOO_LARGE", -1002: "UNKNOWN_METHOD", -1003: "BAD_PARAMS",
    -1004: "NO_MODEL", -1005: "NO_TENSOR", -1006: "BAD_SLICE", -1007: "RESPONSE_TOO_LARGE",
    -1008: "DENIED", -1009: "BUSY", -1010: "CHECKSUM", -1011: "CORRUPT", -1012: "NONFINITE",
    -1013: "FORMAT", -1014: "UNSUPPORTED", -1015: "STORE_FULL", -1016: "NAME", -1017: "SHUTDOWN",
    -1018: "INTERNAL", -1019: "NOMEM", -1020: "IO", -1021: "TIMEOUT", -1022: "CLOSED",
    -1023: "DTYPE", -1024: "INVALID", -1025: "BUFFER", -1026: "VERSION", -1027: "LOCKED",
}
CODES = {v: k for k, v in ERRORS.items()}

# Wire dtype name -> numpy dtype of the payload.
_NP = {
    "f32": "<f4", "f16": "<f2", "bf16": "<u2", "f64": "<f8",
    "i8": "i1", "u8": "u1", "i16": "<i2", "u16": "<u2", "i32": "<i4", "u32": "<u4",
    "i64": "<i8", "u64": "<u8", "bool": "?",
}


class QinsError(Exception):
    """A failed call: .code (negative int), .name, .message."""

    def __init__(self, code, message):
        self.code = code
        self.name = ERRORS.get(code, "UNKNOWN")
        self.message = message
        super().__init__("%s (%d): %s" % (self.name, code, message))


def bf16_to_f32(u16):
    """Widens bfloat16 bit patterns (uint16 array) to float32 exactly."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _array(t, raw=False):
    dt = t["dtype"]
    if dt not in _NP:
        raise QinsError(CODES["PROTO"], "unknown dtype %r in the answer" % dt)
    shape = tuple(int(d) for d in t["shape"])
    a = np.frombuffer(t["data"], dtype=_NP[dt])
    n = 1
    for d in shape:
        n *= d
    if a.size != n:
        raise QinsError(CODES["PROTO"], "payload of %d elements for shape %r" % (a.size, shape))
    a = a.reshape(shape)
    if dt == "bf16" and not raw:
        a = bf16_to_f32(a)
    return a


def parse_slice(spec, shape=None):
    """Turns a slice spec into PROTOCOL.md's [[start, stop], ...] (one per leading dimension).

    spec: "0:64,:" (numpy-like text), a tuple/list of slice objects, ints or (start, stop) pairs,
    or a single one of those. Steps are not supported. Open bounds need the tensor's shape, except
    trailing whole dimensions, which are simply left out.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            if ":" in part:
                a, _, b = part.partition(":")
                if ":" in b:
                    raise ValueError("slice steps are not supported: %r" % part)
                items.append(slice(int(a) if a.strip() else None, int(b) if b.strip() else None))
            else:
                items.append(int(part))
    elif isinstance(spec, (list, tuple)) and not (len(spec) == 2 and all(isinstance(x, int) for x in spec)):
        items = list(spec)
    else:
        items = [spec]
    # Trailing whole dimensions need no range.
    while items and isinstance(items[-1], slice) and items[-1] == slice(None):
        items.pop()
    out = []
    for i, it in enumerate(items):
        if isinstance(it, (int, np.integer)):
            out.append([int(it), int(it) + 1])
            continue
        if isinstance(it, (list, tuple)) and len(it) == 2:
            out.append([int(it[0]), int(it[1])])
            continue
        if not isinstance(it, slice):
            raise TypeError("bad slice item %r" % (it,))
        if it.step not in (None, 1):
            raise ValueError("slice steps are not supported")
        start, stop = it.start, it.stop
        if (start is None or start < 0 or stop is None or stop < 0) and shape is None:
            return ("need-shape", spec)
        dim = shape[i] if shape is not None and i < len(shape) else None
        start = 0 if start is None else (start + dim if start < 0 else start)
        stop = dim if stop is None else (stop + dim if stop < 0 else stop)
        out.append([int(start), int(stop)])
    return out


class Client:
    """One connection to qinsd. socket_path defaults to $QINS_SOCKET."""

    def __init__(self, socket_path=None, timeout=5.0):
        path = socket_path or os.environ.get("QINS_SOCKET")
        if not path:
            raise ValueError("no socket path (argument or QINS_SOCKET)")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._msgid = 0
        # Responses are at most max_response_bytes (<= 2^32 - 1) plus a small header.
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=(1 << 32) + (1 << 20),
                                          strict_map_key=False)
        self.server = self.call("hello")
        if self.server.get("protocol") != PROTOCOL:
            self.close()
            raise QinsError(CODES["VERSION"], "server speaks protocol %r" % self.server.get("protocol"))

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method, **params):
        """One request; returns the result or raises QinsError. params -> [ {params} ] (or [])."""
        if self._sock is None:
            raise QinsError(CODES["CLOSED"], "the connection is closed")
        self._msgid = self._msgid % 0xFFFFFFFF + 1
        req = msgpack.packb([0, self._msgid, method, [params] if params else []], use_bin_type=True)
        try:
            self._sock.sendall(req)
            while True:
                for msg in self._unpacker:
                    return self._answer(msg, method)
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    self.close()
                    raise QinsError(CODES["CLOSED"], "%s: the server closed the connection" % method)
                self._unpacker.feed(chunk)
        except socket.timeout:
            self.close()
            raise QinsError(CODES["TIMEOUT"], "%s: timed out" % method) from None
        except (msgpack.UnpackException, ValueError) as e:
            self.close()
            raise QinsError(CODES["PROTO"], "%s: malformed response: %s" % (method, e)) from None

    def _answer(self, msg, method):
        if not isinstance(msg, list) or len(msg) != 4 or msg[0] != 1:
            self.close()
            raise QinsError(CODES["PROTO"], "%s: not a msgpack-RPC response" % method)
        _, msgid, err, result = msg
        if err is not None:
            if msgid == 0:
                self.close()  # the server closes after errors it cannot tie to a request
            code, text = (err[0], err[1]) if isinstance(err, list) and len(err) >= 2 else (-1000, repr(err))
            raise QinsError(code, "%s: %s" % (method, text))
        if msgid != self._msgid:
            self.close()
            raise QinsError(CODES["PROTO"], "%s: response msgid %r, expected %d" % (method, msgid, self._msgid))
        return result

    # --- methods (PROTOCOL.md §4) ---------------------------------------------------------------
    def ping(self):
        return self.call("ping")

    def models(self):
        return self.call("models")

    def list(self, model, prefix=None, offset=0, limit=None):
        """{"total": n, "tensors": [info...]}"""
        p = {"model": model, "offset": offset}
        if prefix is not None:
            p["prefix"] = prefix
        if limit is not None:
            p["limit"] = limit
        return self.call("list", **p)

    def info(self, model, name):
        return self.call("info", model=model, name=name)

    def get(self, model, name, slice=None, dtype="f32", raw=False):
        """The tensor (or slice) as a numpy array; see parse_slice for slice specs."""
        p = {"model": model, "name": name}
        if dtype is not None:
            p["dtype"] = dtype
        rng = parse_slice(slice)
        if isinstance(rng, tuple):  # open or negative bounds: resolve against the shape
            rng = parse_slice(slice, self.info(model, name)["shape"])
        if rng:
            p["slice"] = rng
        return _array(self.call("get", **p), raw)

    def get_many(self, model, names=None, prefix=None, dtype="f32", raw=False):
        """{name: array} for the listed names (in that order) or every tensor under prefix."""
        p = {"model": model}
        if (names is None) == (prefix is None):
            raise ValueError("give exactly one of names and prefix")
        if names is not None:
            p["names"] = list(names)
        else:
            p["prefix"] = prefix
        if dtype is not None:
            p["dtype"] = dtype
        res = self.call("get_many", **p)
        out = {}
        for i, t in enumerate(res["tensors"]):
            name = t.get("name") or (names[i] if names is not None else str(i))
            out[name] = _array(t, raw)
        return out

    def stats(self):
        return self.call("stats")

    def shutdown(self):
        return self.call("shutdown")


def connect(socket_path=None, timeout=5.0):
    return Client(socket_path, timeout)
