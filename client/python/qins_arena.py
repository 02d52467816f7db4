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

Across a daemon restart (docs/client.md §1.1): attach, map and map_many are retried whole within
the client's retry budget, like get; the first map after a reconnect re-attaches first (the new
daemon's arena; .reattaches counts it). Arrays mapped before stay valid with their bytes: each
mapping lives as long as an array over it (.old_mappings counts the earlier ones still alive) and
a dead daemon's arena is never written again. Their leases ended with the old connection, so
releasing them (explicitly or by collection) is local and never reaches the new daemon. `.lease`
is the client's handle, unique in the process, not the daemon's id (which a restarted daemon
reuses).
After the budget, QinsError CLOSED as for every call; never a bare OSError.
"""
import array
import contextlib
import ctypes
import ctypes.util
import itertools
import mmap
import os
import socket
import weakref

import msgpack
import numpy as np

_NP = {"f32": "<f4", "f16": "<f2", "bf16": "<u2", "f64": "<f8", "i8": "i1", "u8": "u1",
       "i16": "<i2", "u16": "<u2", "i32": "<i4", "u32": "<u4", "i64": "<i8", "u64": "<u8",
       "bool": "?"}


# Lease handles of the process: one counter for every client, so that a handle given to the wrong
# client never names one of its leases.
_handles = itertools.count(1)


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
    of the fd open as long as the mapping lives; this keeps none). .buf is what arrays reference;
    it is unmapped as soon as .buf is gone (the last array over it, and this object): a finalizer
    on .buf, not a reference cycle, so that no garbage collection is needed."""

    def __init__(self, fd, size):
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED or addr is None:
            e = ctypes.get_errno()
            raise OSError(e, "mmap of the %d-byte arena: %s" % (size, os.strerror(e)))
        self.addr, self.size = addr, size
        self.buf = (ctypes.c_char * size).from_address(addr)
        weakref.finalize(self.buf, _libc.munmap, addr, size)


class _State:
    """Per-client arena state: the current mapping and the leases held, by handle."""

    def __init__(self):
        self.mm = None          # the read-only _Mapping of the latest attach
        self.size = 0
        self.gen = None         # the client's connection generation it was attached on (leases end
                                # with the connection; a reconnect starts a new generation)
        self.old = []           # weakrefs to .buf of earlier attaches' mappings (alive while
                                # arrays over them are)
        self.leases = {}        # handle -> (the daemon's lease id, generation it was taken on)
        self.pending = []       # handles of collected arrays, released by the next arena call
        self.finalizers = {}    # handle -> weakref.finalize


def _state(client):
    st = getattr(client, "_arena_state", None)
    if st is None:
        st = client._arena_state = _State()
    return st


def _err(code_name, message):
    import qins
    return qins.QinsError(qins.CODES[code_name], message)


def _lost(message, e=None):
    import qins
    return qins._Lost(qins._closed(message, e))


def _attach_once(client):
    """One attach on the current connection: sends `attach`, receives the arena fd passed with the
    answer (recvmsg, SCM_RIGHTS), maps it read-only, closes the fd and makes that mapping the
    current one. Raises qins._Lost for a lost connection (the caller's retry loop reconnects)."""
    import qins
    sock = client._sock
    if sock is None:
        raise _lost("attach: the connection is closed")
    client._msgid = client._msgid % 0xFFFFFFFF + 1
    fds, truncated, result = [], False, None
    try:
        sock.sendall(msgpack.packb([0, client._msgid, "attach", []], use_bin_type=True))
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
                raise _lost("attach: the server closed the connection")
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
    except (msgpack.UnpackException, ValueError) as e:
        client._drop()
        raise _err("PROTO", "attach: malformed response: %s" % e) from None
    except OSError as e:  # the daemon went away (EPIPE, ECONNRESET), or mmap failed
        if isinstance(e, (BrokenPipeError, ConnectionError)):
            client._drop()
            raise _lost("attach: %s" % qins._why(e), e) from None
        raise _err("IO", "attach: %s" % qins._why(e)) from None
    finally:
        for fd in fds:
            os.close(fd)  # the mapping keeps the file
    st = _state(client)
    if st.mm is not None:
        st.old = [r for r in st.old if r() is not None] + [weakref.ref(st.mm.buf)]
    st.mm, st.size, st.gen = mm, size, client.generation
    return result


def attach(client):
    """Maps the daemon's arena (see _attach_once); retried within the budget like any call.
    Returns the answer ({arena_bytes, max_leases, ...})."""
    return client._retrying("attach", lambda: _attach_once(client))


def _ready(client, what):
    """The state, attached on the live connection: after a reconnect, re-attaches first (the
    answers' offsets are in the new daemon's arena). Releases collected arrays' leases."""
    st = _state(client)
    if st.mm is None:
        raise _err("INVALID", "%s: not attached: call attach() first" % what)
    if st.gen != client.generation:
        _attach_once(client)
        client.reattaches += 1
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
    a.lease = next(_handles)
    st.leases[a.lease] = (lease, st.gen)
    st.finalizers[a.lease] = weakref.finalize(a, st.pending.append, a.lease)
    return a


def map(client, model, name, slice=None, dtype="f32"):
    """The tensor (or slice, as Client.get) as a read-only MappedArray over the arena."""
    import qins
    p = {"model": model, "name": name}
    if dtype is not None:
        p["dtype"] = dtype
    rng = qins.parse_slice(slice)
    if isinstance(rng, tuple):
        rng = qins.parse_slice(slice, client.info(model, name)["shape"])
    if rng:
        p["slice"] = rng

    def attempt():
        st = _ready(client, "map")
        return _array(client, st, client._call_once("map", p))
    return client._retrying("map", attempt)


def map_many(client, model, names=None, prefix=None, dtype="f32"):
    """{name: MappedArray} for the listed names (in order) or every tensor under prefix."""
    import qins
    p = qins._many_params(model, names, prefix, dtype)

    def attempt():
        st = _ready(client, "map_many")
        res = client._call_once("map_many", p)
        return {m["name"]: _array(client, st, m) for m in res["maps"]}
    return client._retrying("map_many", attempt)


def _end(client, st, handles):
    """Ends the leases of handles (all held): those of the live connection in one release, the
    others locally (they ended with their connection). Returns how many ended."""
    import qins
    live = []
    for h in handles:
        srv, gen = st.leases.pop(h)
        if gen == client.generation and client._sock is not None:
            live.append(srv)
    if live:
        try:
            client._call_once("release", {"leases": live})
        except qins._Lost:
            pass  # the connection, and with it these leases, is gone
    return len(handles)


def flush(client):
    """Releases the leases of arrays that were garbage-collected."""
    st = _state(client)
    if st.pending:
        handles, st.pending[:] = [h for h in st.pending if h in st.leases], []
        for h in handles:
            st.finalizers.pop(h, None)
        _end(client, st, handles)


def release(client, items):
    """Releases MappedArrays (or lease handles) now, with the leases of collected arrays. Their
    bytes must not be read afterwards. Returns how many leases ended."""
    st = _state(client)
    handles, seen, bad = [], set(), None
    for it in items:
        h = getattr(it, "lease", it)
        if h is None:
            continue
        h = int(h)
        fin = st.finalizers.pop(h, None)
        if fin is not None:
            fin.detach()  # released here, not again when collected
        if h in st.leases and h not in seen:
            handles.append(h)
            seen.add(h)
        elif bad is None:
            bad = h
    handles.extend(h for h in st.pending if h in st.leases and h not in seen)
    st.pending.clear()
    n = _end(client, st, handles)
    if bad is not None:
        raise _err("BAD_PARAMS", "release: lease %d is not held by this client (unknown or "
                   "already released); the others were released" % bad)
    return n


@contextlib.contextmanager
def mapped(client, model, name, slice=None, dtype="f32"):
    """with c.mapped(...) as a: the lease ends when the block does."""
    a = map(client, model, name, slice, dtype)
    try:
        yield a
    finally:
        release(client, [a])
