# SPDX-License-Identifier: MIT
"""qins.py — the Python client for qinsd (docs/PROTOCOL.md; docs/client.md §2), for workers.

Pure Python; needs msgpack and numpy (declared in pyproject.toml; Debian's python3-msgpack and
python3-numpy serve /usr/bin/python3). `pip install client/python` installs it; or put this
directory on PYTHONPATH. One blocking connection per Client; one request in flight at a time; not
thread-safe (one Client per thread).

    import qins
    with qins.Client("/run/qins.sock") as c:
        print(c.server)                               # hello: protocol, limits
        w = c.get("stories260K", "layers.0.attention.wq.weight")          # numpy float32 array
        rows = c.get("stories260K", "tok_embeddings.weight", slice="0:8")  # first 8 rows
        cols = c.get("stories260K", "tok_embeddings.weight", slice=(slice(None), slice(0, 16)))
        layer = c.get_many("stories260K", prefix="layers.3.")           # {name: array}
        pos = c.get("m", "position_ids")              # an integer tensor: as stored (int64, ...)
        w2 = c.get("m", "w", copy=True)               # writable (the default is read-only)

Errors: every server error raises QinsError with .code (the stable negative code of PROTOCOL.md
§3), .name ("NO_TENSOR", ...) and the server's message. A lost connection (the daemon restarted)
is repaired inside the call within the retry budget (Client's docstring); then, and for a
transport failure with reconnecting off, QinsError CLOSED (never a bare OSError); TIMEOUT and PROTO
close the connection (the next call reconnects).

Arrays: `data` comes back as little-endian row-major bytes; get returns a read-only numpy array of
the result's shape over them (copy=True for a writable one): float32 for "f32" (the default for
floating-point tensors), float16 for "f16", for "bf16" float32 values widened exactly from the bf16
bits (numpy has no bfloat16; raw=True gives the uint16 bits), and integer and bool tensors in their
stored dtype.
"""
import errno
import os
import socket
import time

import msgpack
import numpy as np

__version__ = "0.1.0"
PROTOCOL = 1

# PROTOCOL.md §3 (proto/qins_base.h QINS_ERR_MAP), name by code.
ERRORS = {
    -1000: "PROTO", -1001: "TOO_LARGE", -1002: "UNKNOWN_METHOD", -1003: "BAD_PARAMS",
    -1004: "NO_MODEL", -1005: "NO_TENSOR", -1006: "BAD_SLICE", -1007: "RESPONSE_TOO_LARGE",
    -1008: "DENIED", -1009: "BUSY", -1010: "CHECKSUM", -1011: "CORRUPT", -1012: "NONFINITE",
    -1013: "FORMAT", -1014: "UNSUPPORTED", -1015: "STORE_FULL", -1016: "NAME", -1017: "SHUTDOWN",
    -1018: "INTERNAL", -1019: "NOMEM", -1020: "IO", -1021: "TIMEOUT", -1022: "CLOSED",
    -1023: "DTYPE", -1024: "INVALID", -1025: "BUFFER", -1026: "VERSION", -1027: "LOCKED",
    -1028: "ARENA_FULL",
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
        self.errno = None  # the OS error's number, for a transport failure
        super().__init__("%s (%d): %s" % (self.name, code, message))


def _why(e):
    """An OSError as text: its errno name and message (EPIPE: Broken pipe)."""
    num = getattr(e, "errno", None)
    name = errno.errorcode.get(num, type(e).__name__) if num else type(e).__name__
    return "%s: %s" % (name, e.strerror or e)


def _closed(message, oserror=None):
    """QinsError CLOSED for a transport failure; .errno keeps the OS error's number."""
    e = QinsError(CODES["CLOSED"], message)
    e.errno = getattr(oserror, "errno", None)
    return e


def bf16_to_f32(u16):
    """Widens bfloat16 bit patterns (uint16 array) to float32 exactly."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _array(t, raw=False, copy=False):
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
        return bf16_to_f32(a)  # a new array: writable
    return a.copy() if copy else a  # frombuffer over the received bytes: read-only


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


# Methods sent again whole after a reconnect: every method but shutdown only reads. The arena's
# attach, map and map_many are retried by qins_arena.py (re-attaching first); release is not: a
# lost connection ends its leases.
_NOT_RETRIED = frozenset(["shutdown", "attach", "map", "map_many", "release"])
# Answers to hello that a restarting daemon explains (try again): BUSY, SHUTDOWN.
_TRANSIENT_CODES = frozenset([-1009, -1017])
_BACKOFF_MIN = 0.005  # first pause between reconnect attempts (s)
_BACKOFF_MAX = 0.2    # pauses double up to this: a daemon that is back is found soon


def _env_retry():
    """$QINS_RETRY_MS in seconds, else the default (5 s)."""
    v = os.environ.get("QINS_RETRY_MS", "")
    return int(v) / 1000.0 if v.isdigit() else 5.0


class _Lost(Exception):
    """The connection was lost under a call: .error is what the caller sees if it is not retried,
    .cut is True when the answer had begun to arrive."""

    def __init__(self, error, cut=False):
        super().__init__(error.message)
        self.error = error
        self.cut = cut


class Client:
    """One connection to qinsd. socket_path defaults to $QINS_SOCKET.

    timeout: seconds a call (and the connect + hello) may take; None waits forever.
    retry: the reconnect budget in seconds (default $QINS_RETRY_MS / 1000, else 5; 0 turns
    reconnecting off). A call that finds its connection lost (EOF, reset, broken pipe, a SHUTDOWN
    answer, or a connection closed by an earlier failure) reconnects to the same path (hello again,
    .server re-read), spacing attempts 5 ms, 10 ms, ... 200 ms apart, and is sent again whole (every
    method but shutdown only reads); only when the budget is spent does it raise QinsError CLOSED
    naming the socket and the budget. Counters: .generation (1, +1 per reconnect), .reconnects,
    .retried_calls, .budgets_spent, .reattaches (arena attaches redone by a map after a
    reconnect), .old_mappings (arena mappings of earlier connections still alive). .on_reconnect,
    if set, is called with the client after each reconnect, before the call is sent again (calls
    it makes do not themselves reconnect).
    """

    def __init__(self, socket_path=None, timeout=5.0, retry=None):
        path = socket_path or os.environ.get("QINS_SOCKET")
        if not path:
            raise ValueError("no socket path (argument or QINS_SOCKET)")
        self.path = path
        self.timeout = timeout
        self.retry = _env_retry() if retry is None else float(retry)
        self.server = None
        self.generation = 0
        self.reconnects = 0
        self.retried_calls = 0
        self.budgets_spent = 0
        self.reattaches = 0
        self.on_reconnect = None
        self._in_callback = False
        self._shut = False
        self._sock = None
        self._msgid = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._open(deadline)
        except _Lost as e:
            raise e.error from None
        self.generation = 1

    def _open(self, deadline):
        """Connects and exchanges hello before deadline (monotonic s, or None). Raises _Lost for
        what a restarting daemon explains, QinsError for the rest."""
        self._drop()
        # Responses are at most max_response_bytes (<= 2^32 - 1) plus a small header.
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=(1 << 32) + (1 << 20),
                                          strict_map_key=False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        sock.settimeout(left)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError, ConnectionResetError,
                BrokenPipeError, socket.timeout) as e:
            sock.close()
            raise _Lost(_closed("connect %s: %s" % (self.path, _why(e)), e)) from None
        except OSError as e:
            sock.close()
            raise _closed("connect %s: %s" % (self.path, _why(e)), e) from None
        self._sock = sock
        try:
            server = self._call_once("hello", {})
        except QinsError as e:
            self._drop()
            if e.code in _TRANSIENT_CODES or e.code == CODES["TIMEOUT"]:
                raise _Lost(e) from None
            raise
        except _Lost:
            self._drop()
            raise
        if server.get("protocol") != PROTOCOL:
            self._drop()
            raise QinsError(CODES["VERSION"], "server speaks protocol %r" % server.get("protocol"))
        sock.settimeout(self.timeout)
        self.server = server

    def close(self):
        """Closes the connection for good: later calls raise QinsError CLOSED."""
        self._shut = True
        self._drop()

    def _drop(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method, **params):
        """One request; returns the result or raises QinsError. params -> [ {params} ] (or [])."""
        return self._retrying(method, lambda: self._call_once(method, params),
                              method not in _NOT_RETRIED)

    def _retrying(self, method, attempt, retried=True):
        """Runs attempt() (one try of a call, raising _Lost for a lost connection); after a loss,
        reconnects within the budget and runs it again whole (unless retried is False)."""
        if self._shut:
            raise QinsError(CODES["CLOSED"], "%s: the client is closed" % method)
        deadline = None
        cuts = 0
        while True:
            try:
                return attempt()
            except _Lost as lost:
                if lost.cut:
                    cuts += 1
                if (self.retry <= 0 or self._in_callback or not retried or cuts > 1):
                    if cuts > 1:
                        raise QinsError(CODES["CLOSED"], "%s: the connection to %s closed inside "
                                        "the answer twice: the server may have found a damaged "
                                        "chunk (its log names it; treat as CHECKSUM)"
                                        % (method, self.path)) from None
                    raise lost.error from None
                if deadline is None:
                    deadline = time.monotonic() + self.retry
                self._reconnect(method, deadline, lost)

    def _reconnect(self, method, deadline, lost):
        # Only the messages are kept: an exception held in a local would tie its traceback's
        # frames (and the caller's arrays) into a cycle only the garbage collector frees.
        attempts, pause, last = 0, _BACKOFF_MIN, lost.error.message
        while True:
            attempts += 1
            try:
                self._open(deadline)
                break
            except _Lost as e:
                last = e.error.message
            except QinsError as e:
                raise QinsError(e.code, "%s: reconnecting to %s: %s"
                                % (method, self.path, e.message)) from None
            left = deadline - time.monotonic()
            if left <= 0:
                self.budgets_spent += 1
                raise QinsError(CODES["CLOSED"], "%s: lost the connection to %s (%s) and could not "
                                "reconnect within the %d ms retry budget (%d attempts, last: %s)"
                                % (method, self.path, lost.error.message, round(self.retry * 1000),
                                   attempts, last)) from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, _BACKOFF_MAX)
        self.reconnects += 1
        self.generation += 1
        if self.on_reconnect is not None:
            self._in_callback = True
            try:
                self.on_reconnect(self)
            finally:
                self._in_callback = False
        self.retried_calls += 1

    def _call_once(self, method, params):
        if self._sock is None:
            raise _Lost(QinsError(CODES["CLOSED"], "%s: the connection is closed" % method))
        self._msgid = self._msgid % 0xFFFFFFFF + 1
        req = msgpack.packb([0, self._msgid, method, [params] if params else []], use_bin_type=True)
        received = 0
        try:
            self._sock.sendall(req)
            while True:
                for msg in self._unpacker:
                    return self._answer(msg, method)
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    self._drop()
                    raise _Lost(QinsError(CODES["CLOSED"], "%s: the server closed the connection"
                                          % method), cut=received > 0)
                received += len(chunk)
                self._unpacker.feed(chunk)
        except socket.timeout:
            self._drop()
            raise QinsError(CODES["TIMEOUT"], "%s: timed out" % method) from None
        except (msgpack.UnpackException, ValueError) as e:
            self._drop()
            raise QinsError(CODES["PROTO"], "%s: malformed response: %s" % (method, e)) from None
        except OSError as e:  # EPIPE, ECONNRESET, ENOTCONN: the daemon went away
            self._drop()
            raise _Lost(_closed("%s: %s" % (method, _why(e)), e), cut=received > 0) from None

    def _answer(self, msg, method):
        if not isinstance(msg, list) or len(msg) != 4 or msg[0] != 1:
            self._drop()
            raise QinsError(CODES["PROTO"], "%s: not a msgpack-RPC response" % method)
        _, msgid, err, result = msg
        if err is not None:
            if msgid == 0:
                self._drop()  # the server closes after errors it cannot tie to a request
            code, text = (err[0], err[1]) if isinstance(err, list) and len(err) >= 2 else (-1000, repr(err))
            e = QinsError(code, "%s: %s" % (method, text))
            if code == CODES["SHUTDOWN"]:  # the daemon is stopping: it closes after this answer
                self._drop()
                raise _Lost(e)
            raise e
        if msgid != self._msgid:
            self._drop()
            raise QinsError(CODES["PROTO"], "%s: response msgid %r, expected %d" % (method, msgid, self._msgid))
        return result

    # --- methods (PROTOCOL.md §4) ---------------------------------------------------------------
    def ping(self):
        return self.call("ping")

    def models(self):
        return self.call("models")

    def list(self, model, prefix=None, offset=0, limit=None):
        """{"total": n, "tensors": [info...]}"""
        return self.call("list", **_given(model=model, offset=offset, prefix=prefix, limit=limit))

    def info(self, model, name):
        return self.call("info", model=model, name=name)

    def model_info(self, model, key=None, offset=0, limit=None):
        """One page of a model's metadata (PROTOCOL.md §4.14): without key {"metadata": {...},
        "total": n, "offset": o, "entries": [[key, type, value], ...]}; with key, the elements
        of that array entry: {"type": t, "total": n, "offset": o, "values": [...]}."""
        return self.call("model_info", **_given(model=model, offset=offset, key=key, limit=limit))

    def metadata(self, model):
        """The whole metadata as the store keeps it (FORMAT.md §2.3.1), read page by page: the
        members, "gguf": {"version", "kv": [...]}, "hf": {...}. An array too large for one answer
        stays [key, type, None, count]: read its elements with model_info(model, key=...)."""
        out, kv, hf, off = None, [], {}, 0
        while True:
            page = self.model_info(model, offset=off)
            if out is None:
                out = dict(page["metadata"])
                if "gguf_version" in page:
                    out["gguf"] = {"version": page["gguf_version"], "kv": kv}
            for e in page["entries"]:
                if len(e) == 3 and e[1] == "json" and e[0].startswith("hf."):
                    hf[e[0][3:]] = e[2]
                else:
                    kv.append(list(e))
            off += len(page["entries"])
            if off >= page["total"]:
                break
            if not page["entries"]:
                raise QinsError(CODES["PROTO"], "model_info: an empty page at entry %d" % off)
        if hf:
            out["hf"] = hf
        return out

    def get(self, model, name, slice=None, dtype=None, raw=False, copy=False):
        """The tensor (or slice) as a numpy array; see parse_slice for slice specs.

        dtype None (the default) asks for the stored kind: floating-point tensors come back as
        float32 (whatever their codec), integer and bool tensors as stored (int32, uint8, ...);
        "f32", "f16" or "bf16" ask for that float type (an integer tensor then fails with DTYPE).
        The array is a read-only view of the received bytes (no copy); copy=True returns a
        writable copy (bf16 widened to float32 is always a new, writable array).
        """
        p = _given(model=model, name=name, dtype=dtype)
        rng = parse_slice(slice)
        if isinstance(rng, tuple):  # open or negative bounds: resolve against the shape
            rng = parse_slice(slice, self.info(model, name)["shape"])
        if rng:
            p["slice"] = rng
        return _array(self.call("get", **p), raw, copy)

    def get_many(self, model, names=None, prefix=None, dtype=None, raw=False, copy=False):
        """{name: array} for the listed names (in that order) or every tensor under prefix;
        dtype and copy as for get."""
        res = self.call("get_many", **_many_params(model, names, prefix, dtype))
        out = {}
        for i, t in enumerate(res["tensors"]):
            name = t.get("name") or (names[i] if names is not None else str(i))
            out[name] = _array(t, raw, copy)
        return out

    def stats(self):
        return self.call("stats")

    # --- the arena: zero-copy read-only arrays (PROTOCOL.md §4.10-4.13; qins_arena.py) ---------
    def attach(self):
        return _arena().attach(self)

    def map(self, model, name, slice=None, dtype="f32"):
        return _arena().map(self, model, name, slice, dtype)

    def map_many(self, model, names=None, prefix=None, dtype="f32"):
        return _arena().map_many(self, model, names, prefix, dtype)

    def release(self, *arrays_or_leases):
        return _arena().release(self, arrays_or_leases)

    def mapped(self, model, name, slice=None, dtype="f32"):
        return _arena().mapped(self, model, name, slice, dtype)

    @property
    def old_mappings(self):
        """Arena mappings of earlier connections still mapped (arrays over them alive)."""
        st = getattr(self, "_arena_state", None)
        return 0 if st is None else sum(r() is not None for r in st.old)

    def shutdown(self):
        return self.call("shutdown")


def _many_params(model, names, prefix, dtype):
    """get_many's and map_many's params: exactly one of names and prefix."""
    if (names is None) == (prefix is None):
        raise ValueError("give exactly one of names and prefix")
    return _given(model=model, names=None if names is None else list(names), prefix=prefix,
                  dtype=dtype)


def _given(**params):
    """The params that are not None: a request leaves an optional key out to take its default."""
    return {k: v for k, v in params.items() if v is not None}


def _arena():
    import qins_arena  # beside this file
    return qins_arena


def connect(socket_path=None, timeout=5.0, retry=None):
    return Client(socket_path, timeout, retry)
