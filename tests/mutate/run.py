# SPDX-License-Identifier: MIT
"""run.py — `make mutate`: the project's own mutation harness (docs/TESTING.md).

Each mutant in tests/mutate/mutants.txt is one small, plausible bug: a search string that must
occur exactly once in the files its `file` glob names (so a refactor that moves or rewrites the
line makes the rule fail loudly instead of silently retiring it) and its replacement. For each
mutant the runner, in a scratch copy of the tree (BUILD/mutate/tree, kept between runs so builds
are incremental):
  1. writes the mutated file, 2. builds (make -j2), 3. runs the mutant's own tests (a Criterion
  --filter each, or a Python unittest), stopping at the first that fails: the mutant is KILLED by
  it; if all pass it SURVIVED, 4. restores the file.
Before the mutants, every test named by a selected mutant runs once against the unmutated copy
and must pass (and a Criterion filter must match at least one test): a kill only counts when the
same test passes without the bug.

Environment: MUTATE_S total seconds (default 1200: mutants not started by then are listed as not
run), MUTANTS a comma list of ids or globs (default all), QINS_SHARED, PYTHON, MUTATE_TEST_S the
timeout of one test command (default 300; a timeout counts as a kill, named as such).
Exit status: 0 when every mutant run was killed and every rule still applies; 1 otherwise.
"""
import fnmatch
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RULES = os.path.join(ROOT, "tests", "mutate", "mutants.txt")


class Rule:
    def __init__(self, rid, line):
        self.id, self.line = rid, line
        self.file = self.kind = self.why = None
        self.search, self.replace, self.tests = [], [], []
        self.paths = []  # per search string, the one file it is found in


def unescape(s):
    return s.replace("\\n", "\n").replace("\\t", "\t").replace("\\s", " ")


def parse_rules(path):
    rules, cur = [], None
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.match(r"^\[([A-Za-z0-9_.-]+)\]\s*$", line)
            if m:
                cur = Rule(m.group(1), n)
                rules.append(cur)
                continue
            m = re.match(r"^(\w+)\s*=\s?(.*)$", line)
            if not m or cur is None:
                sys.exit("%s:%d: cannot parse: %s" % (path, n, line))
            k, v = m.group(1), m.group(2)
            if k == "test":
                cur.tests.append(v.strip())
            elif k in ("search", "replace"):
                getattr(cur, k).append(unescape(v))
            elif k in ("file", "kind", "why"):
                setattr(cur, k, v.strip())
            else:
                sys.exit("%s:%d: unknown key %s" % (path, n, k))
    ids = set()
    for r in rules:
        if r.id in ids:
            sys.exit("%s:%d: duplicate id %s" % (path, r.line, r.id))
        ids.add(r.id)
        if not (r.file and r.kind and r.search and len(r.search) == len(r.replace) and r.tests):
            sys.exit("%s:%d: %s needs file, kind, search/replace pairs and at least one test"
                     % (path, r.line, r.id))
        if any(a == b for a, b in zip(r.search, r.replace)):
            sys.exit("%s:%d: %s replaces a search string with itself" % (path, r.line, r.id))
    return rules


def locate(rule, tree):
    """Sets rule.paths; returns an error string when a search string is not found exactly once."""
    rule.paths = []
    for search in rule.search:
        hits = []
        files = sorted(set(p for pat in rule.file.split() for p in glob.glob(os.path.join(tree, pat))))
        for p in files:
            with open(p, errors="surrogateescape") as f:
                n = f.read().count(search)
            if n:
                hits.append((os.path.relpath(p, tree), n))
        total = sum(n for _, n in hits)
        if total == 0:
            return "search string not found in %s: %r" % (rule.file, search)
        if total > 1:
            return "search string %r found %d times in %s (%s): make it unique" % (
                search, total, rule.file, ", ".join("%s x%d" % h for h in hits))
        rule.paths.append(hits[0][0])
    return None


def sync_tree(tree):
    """Copies the working tree's files (tracked and untracked, not ignored) into tree, rewriting
    only files whose bytes differ so make's timestamps keep the build incremental."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    keep = set()
    for rel in files:
        if not rel:
            continue
        rel = rel.decode()
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        keep.add(rel)
        dst = os.path.join(tree, rel)
        with open(src, "rb") as f:
            data = f.read()
        try:
            with open(dst, "rb") as f:
                same = f.read() == data
        except OSError:
            same = False
        if not same:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(data)
            shutil.copymode(src, dst)
    for d, dirs, names in os.walk(tree):
        if os.path.relpath(d, tree) == ".":
            dirs[:] = [x for x in dirs if x != "build"]
        for nm in names:
            rel = os.path.relpath(os.path.join(d, nm), tree)
            if rel not in keep:
                os.unlink(os.path.join(d, nm))


def make(tree, targets, log):
    shared = os.environ.get("QINS_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    r = subprocess.run(["make", "-j2", "--no-print-directory", "SHARED=" + shared] + targets, cwd=tree,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with open(log, "ab") as f:
        f.write(r.stdout)
    return r.returncode == 0, r.stdout.decode(errors="replace")


def targets_for(tests):
    t = ["all", "build/tests/fault.so"]
    for spec in tests:
        kind = spec.split()[0]
        if kind in ("unit", "integration"):
            t.append("build/tests/" + kind)
    return sorted(set(t))


def run_test(tree, spec, env, timeout):
    """Runs one test spec: (passed, tested count or None, seconds, tail of its output)."""
    kind, _, arg = spec.partition(" ")
    arg = arg.strip()
    if kind in ("unit", "integration"):
        cmd = [os.path.join(tree, "build", "tests", kind), "--filter", arg, "--jobs", "2"]
    elif kind == "python":
        parts = arg.split()
        cmd = [env.get("PYTHON", "/usr/bin/python3"), os.path.join(tree, parts[0])] + parts[1:]
    else:
        raise SystemExit("unknown test kind in %r" % spec)
    t0 = time.time()
    # Its own process group, killed whole afterwards: a mutant that breaks shutdown leaves the
    # qinsd its test started running, and the next mutant's tests must not meet it.
    p = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        raw, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raw = None
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if raw is None:  # timed out: what it printed before the kill
        raw, _ = p.communicate()
        out = raw.decode(errors="replace")
        return False, None, time.time() - t0, "timeout after %ds\n" % timeout + out[-2000:]
    r = subprocess.CompletedProcess(cmd, p.returncode, raw)
    out = r.stdout.decode(errors="replace")
    tested = None
    m = re.search(r"Synthesis: Tested: (\d+)", out)
    if m:
        tested = int(m.group(1))
    m = re.search(r"^Ran (\d+) tests?", out, re.M)
    if m:
        tested = int(m.group(1))
    return r.returncode == 0, tested, time.time() - t0, out[-3000:]


def main():
    budget = float(os.environ.get("MUTATE_S", "1200"))
    test_timeout = int(os.environ.get("MUTATE_TEST_S", "300"))
    pick = [p for p in os.environ.get("MUTANTS", "").split(",") if p.strip()]
    scratch = os.path.abspath(os.environ.get("MUTATE_DIR", os.path.join(ROOT, "build", "mutate")))
    tree = os.path.join(scratch, "tree")
    log = os.path.join(scratch, "build.log")
    os.makedirs(tree, exist_ok=True)
    t_start = time.time()

    rules = parse_rules(RULES)
    sync_tree(tree)
    stale = [(r, e) for r in rules for e in [locate(r, tree)] if e]
    for r, e in stale:
        print("STALE    %-28s %s (rule at mutants.txt:%d)" % (r.id, e, r.line))
    sel = [r for r in rules if not pick or any(fnmatch.fnmatch(r.id, p.strip()) for p in pick)]
    sel = [r for r in sel if r.paths]
    if not sel:
        print("mutate: no mutant selected (MUTANTS=%s)" % os.environ.get("MUTANTS", ""))
        return 1
    env = dict(os.environ)
    env["QINS_BUILD"] = os.path.join(tree, "build")
    env.setdefault("QINS_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
    env.setdefault("PYTHON", "/usr/bin/python3")

    open(log, "wb").close()
    all_targets = sorted(set(t for r in sel for t in targets_for(r.tests)))
    ok, out = make(tree, all_targets, log)
    if not ok:
        print(out[-3000:])
        print("mutate: the unmutated tree does not build (log: %s)" % log)
        return 1

    # Baseline: each test spec once, on the unmutated build.
    specs = []
    for r in sel:
        for s in r.tests:
            if s not in specs:
                specs.append(s)
    bad = {}
    for s in specs:
        passed, tested, secs, out = run_test(tree, s, env, test_timeout)
        if not passed or tested == 0:
            bad[s] = "matches no test" if passed else "fails without any mutant"
            print("BASELINE %-60s %s\n%s" % (s, bad[s], out[-1500:]))
    print("mutate: %d mutants selected of %d, %d test commands pass unmutated (%.0fs so far)"
          % (len(sel), len(rules), len(specs) - len(bad), time.time() - t_start))
    sys.stdout.flush()

    results = []  # (rule, status, detail)
    for r in sel:
        if time.time() - t_start > budget:
            results.append((r, "NOT-RUN", "MUTATE_S=%g s used up" % budget))
            continue
        if any(s in bad for s in r.tests):
            results.append((r, "INVALID", "a test of it fails unmutated"))
            print("INVALID  %-28s a test of it fails unmutated" % r.id)
            continue
        origs = {}
        for p in r.paths:
            with open(os.path.join(tree, p), errors="surrogateescape") as f:
                origs[p] = f.read()
        try:
            text = dict(origs)
            for p, a, b in zip(r.paths, r.search, r.replace):
                text[p] = text[p].replace(a, b, 1)
            for p, t in text.items():
                with open(os.path.join(tree, p), "w", errors="surrogateescape") as f:
                    f.write(t)
            t0 = time.time()
            ok, out = make(tree, targets_for(r.tests), log)
            if not ok:
                tail = "\n".join(l for l in out.splitlines() if "error:" in l)[:600]
                results.append((r, "BUILD-ERROR", tail))
                print("BUILDERR %-28s %s: %s" % (r.id, ", ".join(origs), tail))
                continue
            status, detail = "SURVIVED", "all of: " + "; ".join(r.tests)
            for s in r.tests:
                passed, tested, secs, out = run_test(tree, s, env, test_timeout)
                if not passed:
                    how = "timeout" if out.startswith("timeout") else "failed"
                    status, detail = "KILLED", "%s (%s, %.1fs)" % (s, how, secs)
                    break
            results.append((r, status, detail))
            print("%-8s %-28s %s  [%s; %.0fs]" % (status, r.id, detail, r.kind, time.time() - t0))
            sys.stdout.flush()
        finally:
            for p, t in origs.items():
                with open(os.path.join(tree, p), "w", errors="surrogateescape") as f:
                    f.write(t)

    count = {}
    for _, st, _ in results:
        count[st] = count.get(st, 0) + 1
    ran = count.get("KILLED", 0) + count.get("SURVIVED", 0)
    print("\nmutate summary (%.0fs):" % (time.time() - t_start))
    for r, st, d in results:
        if st != "KILLED":
            print("  %-11s %-28s %s" % (st, r.id, d))
    print("mutate: %d rules, %d run: %d killed, %d survived, %d build errors, %d invalid, "
          "%d not run, %d stale; kill rate %d/%d%s"
          % (len(rules), ran, count.get("KILLED", 0), count.get("SURVIVED", 0),
             count.get("BUILD-ERROR", 0), count.get("INVALID", 0), count.get("NOT-RUN", 0),
             len(stale), count.get("KILLED", 0), ran,
             " (%.1f%%)" % (100.0 * count.get("KILLED", 0) / ran) if ran else ""))
    failed = stale or any(st != "KILLED" for _, st, _ in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
