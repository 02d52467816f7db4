# SPDX-License-Identifier: MIT
"""test_errors.py — the Python client's error map (client/python/qins.py ERRORS) is the C one.

proto/qins_base.h's QINS_ERR_MAP is the single source of the error codes and names that cross the
wire; the Python client keeps its own copy (it ships without the C headers), so this test reads
the header and requires the same (value, NAME) pairs, both ways, and CODES to be its inverse.
"""
import os
import re
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
import qins  # noqa: E402

ENTRY = re.compile(r'X\(\s*([A-Z_0-9]+)\s*,\s*(-?\d+)\s*,\s*"')


def c_error_map(path=os.path.join(ROOT, "proto", "qins_base.h")):
    """{value: NAME} of every X(NAME, value, "message") in QINS_ERR_MAP."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index("#define QINS_ERR_MAP(X)")
    body = []
    for line in text[start:].splitlines():
        body.append(line)
        if not line.rstrip().endswith("\\"):
            break
    found = {}
    for name, value in ENTRY.findall("\n".join(body)):
        assert int(value) not in found, "QINS_ERR_MAP repeats the value %s" % value
        found[int(value)] = name
    return found


class ErrorMapTest(unittest.TestCase):
    def test_header_parses(self):
        m = c_error_map()
        self.assertGreaterEqual(len(m), 28)
        self.assertEqual(m[-1000], "PROTO")

    def test_python_matches_c(self):
        c = c_error_map()
        missing = {v: n for v, n in c.items() if qins.ERRORS.get(v) != n}
        extra = {v: n for v, n in qins.ERRORS.items() if c.get(v) != n}
        self.assertEqual(missing, {}, "codes in QINS_ERR_MAP that qins.py ERRORS lacks or names "
                         "differently")
        self.assertEqual(extra, {}, "codes in qins.py ERRORS that QINS_ERR_MAP lacks or names "
                         "differently")

    def test_codes_inverse(self):
        self.assertEqual(qins.CODES, {n: v for v, n in qins.ERRORS.items()})


if __name__ == "__main__":
    unittest.main()
