# SPDX-License-Identifier: MIT
"""test_package.py — client/python is an installable package (issue 15; docs/client.md §2).

pip builds and installs it with nothing but its pyproject.toml (pure Python, setuptools backend),
offline (--no-index: the tests never reach a registry; the declared dependencies, msgpack and
numpy, come from Debian's packages, hence --no-deps and a venv made with --system-site-packages):
  - into a venv: the venv's python imports the installed module (not this tree's), its metadata
    declares msgpack and numpy, and it fetches a tensor from a real qinsd;
  - with Debian's python3 itself, into a --target directory that is then put on sys.path.
The package is built from a copy of client/python, so the build leaves nothing in the tree.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_client import serve  # noqa: E402

PKG = os.path.join(ROOT, "client", "python")
PYTHON = os.environ.get("PYTHON", "/usr/bin/python3")
PIP_OFFLINE = ["install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
               "--disable-pip-version-check", "-q"]


def run(argv, **kw):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError("%s exited %d:\n%s" % (" ".join(argv), p.returncode, p.stdout))
    return p.stdout


class PackageTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="qins-pkg-", dir="/tmp")
        self.src = os.path.join(self.tmp, "src")
        shutil.copytree(PKG, self.src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                      "__pycache__"))
        self.elsewhere = os.path.join(self.tmp, "cwd")  # imports must not find the tree's copy
        os.mkdir(self.elsewhere)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_installs_into_a_venv_and_serves(self):
        venv = os.path.join(self.tmp, "venv")
        run([PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", venv])
        py = os.path.join(venv, "bin", "python")
        run([py, "-m", "pip"] + PIP_OFFLINE + [self.src], cwd=self.elsewhere)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        out = run([py, "-c", "import qins, importlib.metadata as m; print(qins.__file__); "
                   "print(m.version('qins')); print(sorted(r.split()[0] for r in m.requires('qins')))"],
                  cwd=self.elsewhere, env=env).split("\n")
        self.assertTrue(out[0].startswith(os.path.join(venv, "lib")), out[0])
        self.assertEqual(out[1], "0.1.0")
        self.assertEqual(out[2], "['msgpack', 'numpy']")
        # The installed module talks to a real daemon.
        a = np.arange(12, dtype="<f4").reshape(3, 4) - 5.5
        d = serve({"t": a}, "p")
        try:
            got = run([py, "-c", "import qins; c = qins.Client(%r); print(c.get('p', 't').tolist())"
                       % d.sock], cwd=self.elsewhere, env=env)
            self.assertEqual(got.strip(), str(a.tolist()))
            # ... and maps from its arena (the arena module is installed with it).
            got = run([py, "-c", "import qins; c = qins.Client(%r); c.attach(); "
                       "print(c.map('p', 't').tolist())" % d.sock], cwd=self.elsewhere, env=env)
            self.assertEqual(got.strip(), str(a.tolist()))
        finally:
            d.stop()

    def test_installs_with_debian_python3(self):
        target = os.path.join(self.tmp, "target")
        run([PYTHON, "-m", "pip"] + PIP_OFFLINE + ["--target", target, self.src],
            cwd=self.elsewhere)
        self.assertTrue(os.path.isfile(os.path.join(target, "qins.py")))
        env = dict(os.environ, PYTHONPATH=target)
        out = run([PYTHON, "-c", "import qins; print(qins.__file__, qins.__version__)"],
                  cwd=self.elsewhere, env=env)
        self.assertEqual(out.split(), [os.path.join(target, "qins.py"), "0.1.0"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
