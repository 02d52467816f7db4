# SPDX-License-Identifier: MIT
"""test_arena_restart.py — the Python client's map() rides through qinsd restarts (issue 18;
client/python/qins_arena.py, docs/client.md §1.1).

A worker thread maps tensors (map whole and row ranges, map_many), checks every mapped byte against
get of the same request, holds a few arrays across iterations (released several at once: old and
new leases mixed) and holds its first arrays for the whole run, re-reading them each iteration,
while qinsd is restarted 5 times (SIGTERM + start, once SIGKILL + start): no error reaches it, no
byte differs, one reconnect and one re-attach per restart; once its old arrays are released and
gone, their mapping is gone from /proc/self/maps. After a restart (SIGTERM, and SIGKILL), releasing
old leases (explicitly, mixed with a new one, and by garbage collection) is local: the same
client's new lease that the new daemon numbered like an old one and another client's leases stay
held (the daemon's arena_leases). Without re-attaching, the first map after a restart raises
CLOSED. Progress is polled, never timed. Run with Debian's python3.
"""
import os
import signal
import sys
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_reconnect as base  # noqa: E402  its daemon, model and restart
from test_reconnect import MODEL, TENSORS, qins, restart, wait_until  # noqa: E402

NAMES = sorted(n for n, a in TENSORS.items() if a.dtype == np.float32)  # map() asks for f32
RING = 3  # arrays the worker holds across iterations


def setUpModule():
    base.setUpModule()


def tearDownModule():
    status = base.D.stop()
    assert status in (0, None), "qinsd exited %r on SIGTERM" % status


def address(a):
    return a.__array_interface__["data"][0]


def is_mapped(addr):
    """True when addr lies in a mapping of this process (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def daemon_leases():
    """The daemon's arena_leases (every connection's), through a client of its own."""
    with qins.Client(base.D.sock) as c:
        return c.stats()["arena_leases"]


class Worker(base.Worker):
    """test_reconnect's worker (its counters: ok, errors, wrong), mapping instead of getting."""

    def __init__(self):
        super().__init__()
        self.first_addr = None
        self.after = None  # (old_mappings, the first mapping still mapped) after the releases

    def run(self):
        try:
            c = self.client = qins.Client(base.D.sock, retry=60)  # no error may reach this caller
            self.work(c)
            # Every array of the run went with work()'s frame: no garbage collection needed.
            self.after = (c.old_mappings, is_mapped(self.first_addr))
        except Exception as e:  # noqa: BLE001 - any error reaching the caller fails the test
            self.errors.append(repr(e))

    def work(self, c):
        """Maps and checks until told to stop, then releases what it holds."""
        c.attach()
        first = c.map_many(MODEL, names=NAMES)
        want = {n: a.tobytes() for n, a in first.items()}
        self.first_addr = address(first["big"])
        ring, k = [], 0
        while not self.stop:
            name = NAMES[k % len(NAMES)]
            good = True
            if k % 3 == 2:
                other = "v" if name != "v" else "w"
                got = c.map_many(MODEL, names=[name, other])
                for n, a in got.items():
                    good &= a.tobytes() == c.get(MODEL, n).tobytes()
                m = got[name]
                c.release(got[other])
            else:
                sl = "0:1" if (k // len(NAMES)) % 2 and TENSORS[name].ndim >= 2 else None
                m = c.map(MODEL, name, slice=sl)
                good &= m.tobytes() == c.get(MODEL, name, slice=sl).tobytes()
            # Hold m for a few iterations (across restarts); release a full ring at once.
            if len(ring) == RING:
                for a, b in ring:  # unchanged while held, whichever daemon mapped them
                    good &= a.tobytes() == b
                c.release(*(a for a, _ in ring))
                ring = []
            ring.append((m, m.tobytes()))
            for n, a in first.items():  # the first arrays still read their bytes
                good &= a.tobytes() == want[n]
            if good:
                self.ok += 1
            else:
                self.wrong.append(name)
            k += 1
        c.release(*first.values(), *(a for a, _ in ring))


class ArenaRestartTest(unittest.TestCase):
    def test_maps_ride_through_five_restarts(self):
        w = Worker()
        w.start()
        wait_until(lambda: w.ok + len(w.wrong) >= 5 or w.errors, "the first iterations")
        for r in range(5):
            restart(signal.SIGKILL if r == 2 else signal.SIGTERM)
            at = w.ok + len(w.wrong)  # iterations from here ran on the new daemon
            wait_until(lambda: w.ok + len(w.wrong) >= at + 2 * RING + 2 or w.errors,
                       "iterations after restart %d" % r)
            self.assertEqual(w.errors, [], "an error reached the caller")
            self.assertGreaterEqual(w.client.old_mappings, 1,
                                    "the first daemon's mapping is alive while its arrays are")
        w.stop = True
        w.join(60)
        self.assertEqual(w.errors, [], "an error reached the caller")
        self.assertEqual(w.wrong, [], "mapped bytes differing from get's or from before")
        c = w.client
        self.assertEqual((c.reconnects, c.reattaches, c.budgets_spent), (5, 5, 0))
        self.assertEqual(w.after, (0, False), "old mappings unmapped once their arrays are gone")
        c.close()

    def old_release_is_local(self, sig):
        a = qins.Client(base.D.sock, retry=60)
        a.attach()
        old = a.map_many(MODEL, names=NAMES)
        self.assertEqual(daemon_leases(), len(NAMES))
        want = {n: x.tobytes() for n, x in old.items()}
        old_addr = address(old["big"])
        restart(sig)
        self.assertEqual(daemon_leases(), 0, "a new daemon, no leases")
        # a first on the new daemon: its leases there have the numbers its first old ones had.
        fresh = [a.map(MODEL, "w"), a.map(MODEL, "big")]
        b = qins.Client(base.D.sock, retry=60)
        b.attach()
        bm = b.map_many(MODEL, names=["big", "v"])
        self.assertEqual(daemon_leases(), 4)
        self.assertEqual((a.reconnects, a.reattaches, a.old_mappings), (1, 1, 1))
        for n, x in old.items():
            self.assertEqual(x.tobytes(), want[n], "%s: the old mapping's bytes changed" % n)
        self.assertFalse({x.lease for x in old.values()} & {x.lease for x in fresh},
                         "a new lease handle equals an old one")
        self.assertNotEqual(address(fresh[0]), address(old["w"]), "the new arena is a new mapping")
        # One release of two old leases and a new one; the other old ones by collection (flushed
        # by the next map): only the new one reaches the daemon.
        self.assertEqual(a.release(old.pop("w"), old.pop("v"), fresh[1]), 3)
        self.assertEqual(daemon_leases(), 3, "a's other new lease and b's two are held")
        old_leases = [x.lease for x in old.values()]
        del old, x  # the last references: no garbage collection needed
        extra = a.map(MODEL, "v")
        self.assertEqual(daemon_leases(), 4)
        self.assertEqual(a.old_mappings, 0, "the old mapping went with its last array")
        self.assertFalse(is_mapped(old_addr), "the old arena is unmapped")
        with self.assertRaises(qins.QinsError) as e:
            a.release(old_leases[0])
        self.assertEqual(e.exception.name, "BAD_PARAMS")
        # What is still held is intact and releases normally.
        self.assertEqual(fresh[0].tobytes(), a.get(MODEL, "w").tobytes())
        self.assertEqual(bm["big"].tobytes(), b.get(MODEL, "big").tobytes())
        self.assertEqual(b.release(*bm.values()), 2)
        self.assertEqual(a.release(fresh[0], extra), 2)
        self.assertEqual(daemon_leases(), 0)
        a.close()
        b.close()

    def test_old_leases_are_released_locally_after_sigterm(self):
        self.old_release_is_local(signal.SIGTERM)

    def test_old_leases_are_released_locally_after_sigkill(self):
        self.old_release_is_local(signal.SIGKILL)

    def test_the_budget_spent_is_a_qins_error(self):
        c = qins.Client(base.D.sock, retry=0.5)
        c.attach()
        held = c.map(MODEL, "v")
        base.D.proc.send_signal(signal.SIGTERM)
        self.assertEqual(base.D.proc.wait(30), 0)
        try:
            with self.assertRaises(qins.QinsError) as e:  # never a bare OSError
                c.map(MODEL, "w")
        finally:
            base.D.start()
        self.assertEqual(e.exception.name, "CLOSED")
        self.assertIn(base.D.sock, e.exception.message)
        self.assertEqual(held.tobytes(), TENSORS["v"].tobytes(), "still readable")
        w = c.map(MODEL, "w")
        self.assertEqual(w.tobytes(), TENSORS["w"].tobytes(), "back up")
        self.assertEqual(c.release(held, w), 2)
        c.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
