# SPDX-License-Identifier: MIT
"""test_reconnect.py — the Python client rides through qinsd restarts (issue 18; docs/client.md §2).

A worker thread keeps calling get (whole tensors, slices, get_many) while qinsd is restarted 5
times on the same store and socket (SIGTERM + start four times, SIGKILL + start once): no error
reaches it, every answer is byte-identical to the source, and it counts one reconnect per restart.
A daemon that stays down gives QinsError CLOSED naming the socket and the budget, after the budget
and within it + 10% (a functional bound of the retry loop); the client recovers once the daemon is
back. With reconnecting off, a restart raises QinsError (never a bare OSError). The on_reconnect
hook runs once per reconnect. Progress is polled, never timed. Run with Debian's python3.
"""
import os
import signal
import sys
import threading
import time
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_client import qins, serve  # noqa: E402

MODEL = "r"
rng = np.random.default_rng(18)
TENSORS = {
    "w": rng.standard_normal((64, 96)).astype("<f4"),
    "big": rng.standard_normal((512, 600)).astype("<f4"),  # 1.2 MB
    "v": rng.standard_normal((40,)).astype("<f4"),
    "ids": np.arange(30, dtype="<i8"),
}

D = None


def setUpModule():
    global D
    D = serve(TENSORS, MODEL)


def tearDownModule():
    D.stop()


def restart(sig=signal.SIGTERM):
    D.restart(sig)


def wait_until(pred, what):
    """Polls pred (bounded only so that a broken client cannot hang the suite)."""
    end = time.monotonic() + 120
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("gave up waiting for " + what)
        time.sleep(0.002)


class Worker(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.stop = False
        self.ok = 0
        self.errors = []
        self.wrong = []
        self.client = None

    def run(self):
        try:
            c = self.client = qins.Client(D.sock, retry=60)  # no error may reach this caller
            k = 0
            while not self.stop:
                name = ("w", "big", "v", "ids")[k % 4]
                a = TENSORS[name]
                if k % 3 == 0:
                    got = {name: c.get(MODEL, name)}
                elif k % 3 == 1:
                    got = {name: c.get(MODEL, name, slice="2:5")}
                    a = a[2:5]
                else:
                    got = c.get_many(MODEL, names=[name, "v"])
                for n, g in got.items():
                    want = a if n == name else TENSORS[n]
                    if g.dtype != want.dtype or g.tobytes() != want.tobytes():
                        self.wrong.append(n)
                self.ok += 1
                k += 1
        except Exception as e:  # noqa: BLE001 - any error reaching the caller fails the test
            self.errors.append(repr(e))


class ReconnectTest(unittest.TestCase):
    def test_gets_ride_through_five_restarts(self):  # issue 18's acceptance
        w = Worker()
        w.start()
        wait_until(lambda: w.ok >= 5 or w.errors, "the first answers")
        for r in range(5):
            restart(signal.SIGKILL if r == 2 else signal.SIGTERM)
            at = w.ok  # answers from here on come from the new daemon: each needed a reconnect
            wait_until(lambda: w.ok >= at + 5 or w.errors, "answers after restart %d" % r)
        w.stop = True
        w.join(60)
        self.assertEqual(w.errors, [], "an error reached the caller")
        self.assertEqual(w.wrong, [], "answers differing from the source")
        self.assertEqual(w.client.reconnects, 5, "one reconnect per restart")
        self.assertEqual(w.client.generation, 6)
        self.assertEqual(w.client.budgets_spent, 0)
        w.client.close()

    def test_a_daemon_that_stays_down_spends_the_budget(self):
        c = qins.Client(D.sock, retry=1.5)
        self.assertEqual(c.ping(), "pong")
        D.proc.send_signal(signal.SIGTERM)
        self.assertEqual(D.proc.wait(30), 0)
        try:
            t0 = time.monotonic()
            with self.assertRaises(qins.QinsError) as e:
                c.get(MODEL, "v")
            took = time.monotonic() - t0
        finally:
            D.start()
        self.assertEqual(e.exception.name, "CLOSED")
        self.assertIn(D.sock, e.exception.message)
        self.assertIn("1500 ms", e.exception.message)
        self.assertGreaterEqual(took, 1.5)
        self.assertLessEqual(took, 1.65, "gave up after %.3f s, past the budget + 10%%" % took)
        self.assertEqual(c.budgets_spent, 1)
        # Back up: the same client serves its next call.
        self.assertEqual(c.get(MODEL, "v").tobytes(), TENSORS["v"].tobytes())
        self.assertEqual((c.reconnects, c.generation), (1, 2))
        c.close()

    def test_with_retry_zero_a_restart_is_a_qins_error(self):
        c = qins.Client(D.sock, retry=0)
        self.assertEqual(c.ping(), "pong")
        restart()
        with self.assertRaises(qins.QinsError) as e:  # not BrokenPipeError / ConnectionResetError
            c.ping()
        self.assertIn(e.exception.name, ("CLOSED", "SHUTDOWN"))
        with self.assertRaises(qins.QinsError) as e:
            c.ping()
        self.assertEqual(e.exception.name, "CLOSED")
        self.assertEqual(c.reconnects, 0)
        c.close()

    def test_close_is_final(self):  # an explicit close is not a lost connection
        c = qins.Client(D.sock, retry=60)
        c.close()
        with self.assertRaises(qins.QinsError) as e:
            c.ping()
        self.assertEqual(e.exception.name, "CLOSED")
        self.assertEqual(c.reconnects, 0)

    def test_on_reconnect_runs_once_per_reconnect(self):
        c = qins.Client(D.sock, retry=60)
        seen = []
        c.on_reconnect = lambda cl: seen.append((cl.generation, cl.ping()))
        self.assertEqual(c.ping(), "pong")
        self.assertEqual(seen, [])
        restart()
        self.assertEqual(c.get(MODEL, "ids").tolist(), list(range(30)))
        self.assertEqual(seen, [(2, "pong")], "once, on the new connection")
        self.assertGreater(c.server["max_response_bytes"], 0, "hello re-read")
        c.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
