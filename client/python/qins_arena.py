# SPDX-License-Identifier: MIT
"""qins_arena.py — the decoded-weights arena for the Python client (docs/PROTOCOL.md §4.10-4.13;
docs/client.md "The arena"). Used through qins.Client: attach(), map(), map_many(), release(),
mapped().

    with qins.Client() as c:
        c.attach()                                   # receives and maps the arena, read-only
        w = c.map("stories260K", "layers.0.attention.wq.weight")   # numpy view, no copy
        with c.mapped("stories260K", "tok_embeddings.weight", slice="0:8") as rows:
            ...                                      # released on leaving the block

map() returns a read-only numpy array (MappedArray) backed by the shared mapping: the bytes every
worker of the host reads, decoded once by qinsd. Its lease (`.lease`) pins them until the array
(and every view of it) is garbage-collected, or c.release(array) is called; leases of collected
arrays are released with the client's next arena call (never from inside the garbage collector,
which may run in the middle of another call), and all of them when the connection closes. Do not
read an array after releasing it explicitly: its bytes may be reused. bf16 is returned as its raw
uint16 bits (widening to float32 would be a private copy; use qins.bf16_to_f32 if you want one).
"""
import array
import contextlib
import ctypes
import ctypes.util
import mmap
import os
import socket
import weakref

import msgpack
import numpy as np

_NP = {"f32": "<f4", "f16": "<f2", "bf16": "<u2", "f64": "<f8", "i8": "i1", "u8": "u1",
       "i16": "<i2", "u16": "<u2", "i32": "<i4", "u32": "<u4", "i64": "<i8", "u64": "<u8",
       "bool": "?"}


class MappedArray(np.ndarray):
    """A read-only array in the arena; .lease is the lease pinning it (None for derived arrays
    that own their data)."""

    def __array_finalize__(self, obj):
        self.lease = getattr(obj, "lease", None)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """A read-only MAP_SHARED mapping made with libc's mmap (Python's mmap module keeps a duplicate
    of the fd open as long as the mapping lives; this keeps none). Unmapped when the last array
    over it is gone: arrays reference .buf, which references this."""

    def __init__(self, fd, size):
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED or addr is None:
            e = ctypes.get_errno()
            raise OSError(e, "mmap of the %d-byte arena: %s" % (size, os.strerror(e)))
        self.addr, self.size = addr, size
        self.buf = (ctypes.c_char * size).from_address(addr)
        self.buf.owner = self  # numpy keeps buf, buf keeps this

    def __del__(self):
        _libc.munmap(self.addr, self.size)


class _State:
    """Per-client arena state: the mapping and the leases waiting to be released."""

    def __init__(self):
        self.mm = None          # the read-only _Mapping of the arena
        self.size = 0
        self.gen = None         # the client's connection generation it belongs to (leases end
                                # with the connection; a reconnect starts a new generation)
        self.pending = []       # leases of collected arrays, released by the next arena call
        self.finalizers = {}    # lease -> weakref.finalize


def _state(client):
    st = getattr(client, "_arena_state", None)
    if st is None:
        st = client._arena_state = _State()
    return st


def _err(code_name, message):
    import qins
    return qins.QinsError(qins.CODES[code_name], message)


def attach(client):
    """Sends `attach`, receives the arena fd passed with the answer (recvmsg, SCM_RIGHTS), maps it
    read-only and closes the fd. Returns the answer ({arena_bytes, max_leases, ...})."""
    import qins
    sock = client._sock
    if sock is None:
        raise _err("CLOSED", "attach: the connection is closed")
    client._msgid = client._msgid % 0xFFFFFFFF + 1
    sock.sendall(msgpack.packb([0, client._msgid, "attach", []], use_bin_type=True))
    fds, truncated, result = [], False, None
    try:
        while result is None:
            for msg in client._unpacker:
                result = client._answer(msg, "attach")  # raises on an error answer
                break
            if result is not None:
                break
            data, anc, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            truncated |= bool(flags & socket.MSG_CTRUNC)
            if not data:
                client._drop()
                raise _err("CLOSED", "attach: the server closed the connection")
            client._unpacker.feed(data)
        if not fds:
            why = ("the arena fd was dropped on receipt (MSG_CTRUNC: this process is at its "
                   "RLIMIT_NOFILE)" if truncated else "the answer carried no file descriptor")
            raise _err("PROTO", "attach: " + why)
        size = int(result["arena_bytes"])
        if os.fstat(fds[0]).st_size < size or size <= 0:
            raise _err("PROTO", "attach: the passed fd does not hold the announced %d bytes" % size)
        mm = _Mapping(fds[0], size)
    except socket.timeout:
        client._drop()
        raise qins.QinsError(qins.CODES["TIMEOUT"], "attach: timed out") from None
    except OSError as e:  # the daemon went away
        client._drop()
        raise _err("CLOSED", "attach: %s" % e) from None
    finally:
        for fd in fds:
            os.close(fd)  # the mapping keeps the file
    st = _state(client)
    st.mm, st.size, st.gen = mm, size, getattr(client, "generation", None)
    st.pending.clear()
    return result


def _ready(client, what):
    st = _state(client)
    if st.mm is None:
        raise _err("INVALID", "%s: not attached: call attach() first" % what)
    if client._sock is None or getattr(client, "generation", None) != st.gen:
        raise _err("CLOSED", "%s: the connection was lost or re-established since attach() (its "
                   "leases ended with it): call attach() again" % what)
    flush(client)
    return st


def _array(client, st, m):
    dt = m["dtype"]
    if dt not in _NP:
        raise _err("PROTO", "unknown dtype %r in the answer" % dt)
    shape = tuple(int(d) for d in m["shape"])
    off, length, lease = int(m["offset"]), int(m["length"]), int(m["lease"])
    if off < 0 or length < 0 or off + length > st.size:
        raise _err("PROTO", "extent [%d, +%d) outside the %d-byte arena" % (off, length, st.size))
    n = 1
    for d in shape:
        n *= d
    if n * np.dtype(_NP[dt]).itemsize != length:
        raise _err("PROTO", "length %d for shape %r of %s" % (length, shape, dt))
    a = np.frombuffer(st.mm.buf, dtype=_NP[dt], count=n, offset=off).reshape(shape)
    a.flags.writeable = False  # and the pages are PROT_READ: a write through ctypes faults
    a = a.view(MappedArray)
    a.lease = lease
    st.finalizers[lease] = weakref.finalize(a, st.pending.append, lease)
    return a


def map(client, model, name, slice=None, dtype="f32"):
    """The tensor (or slice, as Client.get) as a read-only MappedArray over the arena."""
    import qins
    st = _ready(client, "map")
    p = {"model": model, "name": name}
    if dtype is not None:
        p["dtype"] = dtype
    rng = qins.parse_slice(slice)
    if isinstance(rng, tuple):
        rng = qins.parse_slice(slice, client.info(model, name)["shape"])
    if rng:
        p["slice"] = rng
    return _array(client, st, client.call("map", **p))


def map_many(client, model, names=None, prefix=None, dtype="f32"):
    """{name: MappedArray} for the listed names (in order) or every tensor under prefix."""
    import qins
    st = _ready(client, "map_many")
    res = client.call("map_many", **qins._many_params(model, names, prefix, dtype))
    return {m["name"]: _array(client, st, m) for m in res["maps"]}


def flush(client):
    """Releases the leases of arrays that were garbage-collected."""
    st = _state(client)
    if st.pending and client._sock is not None and getattr(client, "generation", None) == st.gen:
        leases, st.pending[:] = list(st.pending), []
        for lease in leases:
            st.finalizers.pop(lease, None)
        client.call("release", leases=leases)


def release(client, items):
    """Releases MappedArrays (or lease ids) now. Their bytes must not be read afterwards."""
    st = _state(client)
    leases = []
    for it in items:
        lease = getattr(it, "lease", it)
        if lease is None:
            continue
        fin = st.finalizers.pop(int(lease), None)
        if fin is not None:
            fin.detach()  # released here, not again when collected
        leases.append(int(lease))
    leases.extend(st.pending)
    st.pending.clear()
    if client._sock is None or getattr(client, "generation", None) != st.gen:
        return 0  # they ended with the connection they belonged to
    if not leases:
        return 0
    return client.call("release", leases=leases)["released"]


@contextlib.contextmanager
def mapped(client, model, name, slice=None, dtype="f32"):
    """with c.mapped(...) as a: the lease ends when the block does."""
    a = map(client, model, name, slice, dtype)
    try:
        yield a
    finally:
        if client._sock is not None:
            release(client, [a])
