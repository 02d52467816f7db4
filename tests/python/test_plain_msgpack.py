# SPDX-License-Identifier: MIT
"""test_plain_msgpack.py — qinsd is plain msgpack-RPC: a script with no qins code (only msgpack,
socket and numpy) fetches a tensor and a slice and gets exactly the values written.

Generates a safetensors file, imports it with `qinsctl import --codec f32` into a temporary store,
starts $QINS_BUILD/qinsd on a temporary socket, and always stops the daemon. PROTOCOL.md §1, §4.6.
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

import msgpack
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(os.environ.get("QINS_BUILD", os.path.join(ROOT, "build")))


def main():
    d = tempfile.mkdtemp(prefix="qins-mp-", dir="/tmp")
    store, sock, log = os.path.join(d, "store"), os.path.join(d, "s"), os.path.join(d, "log")
    proc = None
    try:
        # A safetensors file with known values.
        w = (np.arange(24 * 40, dtype=np.float64).reshape(24, 40) / 7.0 - 60.0).astype("<f4")
        h = json.dumps({"w": {"dtype": "F32", "shape": [24, 40], "data_offsets": [0, w.nbytes]}}).encode()
        h += b" " * (-len(h) % 8)
        src = os.path.join(d, "m.safetensors")
        with open(src, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + w.tobytes())
        os.makedirs(store)
        subprocess.run([os.path.join(BUILD, "qinsctl"), "import", "--store", store, src,
                        "--model", "m", "--codec", "f32"], check=True, stdout=subprocess.DEVNULL)
        proc = subprocess.Popen([os.path.join(BUILD, "qinsd"), "--store", store, "--socket", sock,
                                 "--log", log])
        s = None
        deadline = time.monotonic() + 10
        while s is None:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
            except OSError:
                s.close()
                s = None
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("qinsd did not come up")
                time.sleep(0.01)
        s.settimeout(10)
        unpacker = msgpack.Unpacker(raw=False)

        def call(msgid, method, params):
            s.sendall(msgpack.packb([0, msgid, method, [params]], use_bin_type=True))
            while True:
                for msg in unpacker:
                    return msg
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise RuntimeError("connection closed")
                unpacker.feed(chunk)

        # Whole tensor: [1, msgid, nil, {shape, dtype, data}].
        r = call(7, "get", {"model": "m", "name": "w"})
        assert r[0] == 1 and r[1] == 7 and r[2] is None, r[:3]
        res = r[3]
        assert res["shape"] == [24, 40] and res["dtype"] == "f32", res
        assert list(res)[-1] == "data", "data is the last key (PROTOCOL.md §1)"
        got = np.frombuffer(res["data"], dtype="<f4").reshape(res["shape"])
        assert np.array_equal(got, w), "values differ"
        # A hyperslab: rows 3..9, columns 5..16.
        r = call(8, "get", {"model": "m", "name": "w", "slice": [[3, 9], [5, 17]]})
        assert r[2] is None, r[2]
        got = np.frombuffer(r[3]["data"], dtype="<f4").reshape(r[3]["shape"])
        assert np.array_equal(got, w[3:9, 5:17]), "slice differs"
        # An error: [1, msgid, [code, message], nil].
        r = call(9, "get", {"model": "m", "name": "nope"})
        assert r[1] == 9 and r[2][0] == -1005 and isinstance(r[2][1], str) and r[3] is None, r
        s.close()
        print("test_plain_msgpack: ok (whole tensor, slice, error)")
    finally:
        status = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)
    if status not in (0, None):
        print("qinsd exited %r on SIGTERM" % status)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
