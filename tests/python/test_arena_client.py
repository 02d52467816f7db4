# SPDX-License-Identifier: MIT
"""test_arena_client.py — the Python client's arena calls (client/python/qins_arena.py through
qins.Client: attach, map, map_many, release, mapped; docs/PROTOCOL.md §4.10-4.13) against a small
in-process server that follows the protocol text: it keeps a sealed memfd, passes a read-only fd
with attach's answer (SCM_RIGHTS) and answers maps with offsets into it. Checks the arrays read the
served bytes without a copy, are read-only, share offsets between clients, release their lease when
collected (on the next arena call), explicitly and through the context manager, and that the fd is
not left open. Run with Debian's python3 (numpy, msgpack).
"""
import array
import fcntl
import gc
import mmap
import os
import socket
import sys
import tempfile
import threading
import unittest

import msgpack
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
sys.path.insert(0, HERE)
import qins  # noqa: E402

SIZE = 1 << 20
F_SEAL_FUTURE_WRITE = 0x10  # linux/fcntl.h


def values(name, n):
    """The f32 values the fake server decodes for tensor `name`."""
    return (np.arange(n, dtype="<f4") * (len(name) + 1) + ord(name[0])).astype("<f4")


class FakeServer:
    def __init__(self, path):
        fd = os.memfd_create("fake-arena", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        self.mm = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE)
        self.ro = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
        os.close(fd)
        self.entries = {}   # key -> (offset, length, shape, dtype)
        self.next_off = 0
        self.leases = {}    # lease -> conn
        self.next_lease = 0
        self.released = []
        self.decodes = 0
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns = []
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def accept(self):
        n = 0
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            n += 1
            self.conns.append(c)
            threading.Thread(target=self.serve, args=(c, n), daemon=True).start()

    def entry(self, name, dtype):
        with self.lock:
            key = (name, dtype)
            if key not in self.entries:
                n = 64 * (len(name) + 1)
                v = values(name, n)
                raw = v.tobytes() if dtype == "f32" else (v.view("<u4") >> 16).astype("<u2").tobytes()
                off = self.next_off
                self.mm[off:off + len(raw)] = raw
                self.next_off = (off + len(raw) + 63) // 64 * 64
                self.entries[key] = (off, len(raw), [n // 4, 4], dtype)
                self.decodes += 1
            self.next_lease += 1
            return self.next_lease, self.entries[key]

    def one(self, conn, name, dtype, with_name):
        lease, (off, length, shape, dt) = self.entry(name, dtype)
        self.leases[lease] = conn
        m = {"lease": lease, "shape": shape, "dtype": dt, "offset": off, "length": length}
        if with_name:
            m["name"] = name
        return m

    def serve(self, c, conn):
        up = msgpack.Unpacker(raw=False)
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                return
            if not data:
                return
            up.feed(data)
            for req in up:
                _, msgid, method, params = req
                p = params[0] if params else {}
                err, res, fd = None, None, None
                if method == "hello":
                    res = {"protocol": 1, "server": "fake", "max_request_bytes": 1 << 20,
                           "max_response_bytes": 1 << 30, "max_connections": 8, "max_ranges": 8,
                           "arena_bytes": SIZE}
                elif method == "attach":
                    res, fd = {"arena_bytes": SIZE, "max_leases": 0}, self.ro
                elif method == "map":
                    res = self.one(conn, p["name"], p.get("dtype", "f32"), False)
                elif method == "map_many":
                    res = {"maps": [self.one(conn, n, p.get("dtype", "f32"), True) for n in p["names"]]}
                elif method == "release":
                    ls = p["leases"] if "leases" in p else [p["lease"]]
                    bad = [x for x in ls if self.leases.get(x) != conn]
                    for x in ls:
                        if self.leases.get(x) == conn:
                            del self.leases[x]
                            self.released.append(x)
                    if bad:
                        err = [-1003, "lease %d is not held by this connection" % bad[0]]
                    else:
                        res = {"released": len(ls)}
                else:
                    err = [-1002, "no method %s" % method]
                out = msgpack.packb([1, msgid, err, res], use_bin_type=True)
                if fd is not None:
                    c.sendmsg([out], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                else:
                    c.sendall(out)

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        os.close(self.ro)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def daemon_lease(c, a):
    """The server's lease id behind array a (its .lease is the client's own handle)."""
    return c._arena_state.leases[a.lease][0]


class ArenaClient(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="qins-")
        self.path = os.path.join(self.dir, "s")
        self.srv = FakeServer(self.path)

    def tearDown(self):
        self.srv.close()
        os.unlink(self.path)
        os.rmdir(self.dir)

    def test_map_reads_the_served_bytes_read_only(self):
        with qins.Client(self.path) as c, qins.Client(self.path) as d:
            with self.assertRaises(qins.QinsError) as e:
                c.map("m", "w")
            self.assertEqual(e.exception.name, "INVALID")
            before = open_fds()
            self.assertEqual(c.attach()["arena_bytes"], SIZE)
            self.assertEqual(open_fds(), before, "the fd is closed once mapped")
            d.attach()
            a = c.map("m", "wq")
            np.testing.assert_array_equal(a.reshape(-1), values("wq", a.size))
            self.assertEqual(a.shape, (48, 4))
            self.assertFalse(a.flags.writeable)
            with self.assertRaises(ValueError):
                a[0, 0] = 1.0
            self.assertFalse(a.flags.owndata)
            b = d.map("m", "wq")
            self.assertEqual(self.srv.decodes, 1)
            np.testing.assert_array_equal(a, b)
            h = c.map("m", "wq", dtype="bf16")
            self.assertEqual(h.dtype, np.dtype("<u2"))
            np.testing.assert_array_equal(qins.bf16_to_f32(h).reshape(-1),
                                          (values("wq", h.size).view("<u4") & 0xFFFF0000).view("<f4"))

    def test_shared_mapping_sees_server_writes(self):
        with qins.Client(self.path) as c:
            c.attach()
            a = c.map("m", "x")
            off = self.srv.entries[("x", "f32")][0]
            self.srv.mm[off:off + 4] = np.float32(42.5).tobytes()  # the server's own mapping
            self.assertEqual(a[0, 0], 42.5, "the array is a view of the shared mapping, not a copy")

    def test_leases_released_on_gc_explicitly_and_by_context(self):
        with qins.Client(self.path) as c:
            c.attach()
            a = c.map("m", "w")
            view = a[1:3]
            la = daemon_lease(c, a)
            self.assertEqual(view.lease, a.lease)
            del a
            gc.collect()
            c.map_many("m", names=["p"])  # the next arena call: the view still pins it
            self.assertNotIn(la, self.srv.released)
            del view
            gc.collect()
            many = c.map_many("m", names=["p", "qq"])
            self.assertIn(la, self.srv.released)
            self.assertEqual(list(many), ["p", "qq"])
            np.testing.assert_array_equal(many["qq"].reshape(-1), values("qq", many["qq"].size))
            lp = daemon_lease(c, many["p"])
            self.assertEqual(c.release(many["p"]), 1)
            self.assertIn(lp, self.srv.released)
            n = len(self.srv.released)
            del many
            gc.collect()
            c.release()  # flushes the collected one ("qq") but not "p" twice
            self.assertEqual(len(self.srv.released), n + 1)
            with c.mapped("m", "ctx") as m:
                lm, hm = daemon_lease(c, m), m.lease
                self.assertNotIn(lm, self.srv.released)
            self.assertIn(lm, self.srv.released)
            with self.assertRaises(qins.QinsError) as e:
                c.release(hm)
            self.assertEqual(e.exception.name, "BAD_PARAMS")


class ArenaRealDaemon(unittest.TestCase):
    """The same calls against a real qinsd (test_client.py's Daemon): its sendmsg, our recvmsg."""

    @classmethod
    def setUpClass(cls):
        import test_client as tc
        cls.tc = tc
        cls.d = tc.Daemon()
        try:
            path = os.path.join(cls.d.dir, "t.safetensors")
            tc.write_safetensors(path, tc.TENSORS)
            os.makedirs(cls.d.store, exist_ok=True)
            cls.d.import_file(path, "t")
            cls.d.start()
        except BaseException:
            cls.d.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        status = cls.d.stop()
        assert status in (0, None), "qinsd exited %r on SIGTERM" % status

    def test_map_equals_get_and_leases_end(self):
        with qins.Client(self.d.sock) as c:
            before = open_fds()
            c.attach()
            self.assertEqual(open_fds(), before)
            for dt in ("f32", "f16", "bf16"):
                for sl in (None, "1:4", "2:5,3:9"):
                    a = c.map("t", "w", slice=sl, dtype=dt)
                    g = c.get("t", "w", slice=sl, dtype=dt, raw=True)
                    self.assertEqual(a.tobytes(), g.tobytes(), "%s %s" % (dt, sl))
                    self.assertFalse(a.flags.writeable)
            many = c.map_many("t", prefix="layers.0.")
            self.assertEqual(sorted(many), ["layers.0.x", "layers.0.y"])
            np.testing.assert_array_equal(many["layers.0.x"], self.tc.TENSORS["layers.0.x"])
            held = c.stats()["arena_leases"]
            self.assertGreater(held, 0)
            del a, many
            gc.collect()
            c.release()
            self.assertEqual(c.stats()["arena_leases"], 0)


if __name__ == "__main__":
    unittest.main()
