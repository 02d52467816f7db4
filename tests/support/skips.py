# SPDX-License-Identifier: MIT
"""skips.py — the end of `make test`: every skipped test by name with its reason (docs/TESTING.md).

Reads REPORTS/unit.json and REPORTS/integration.json (Criterion --json) and REPORTS/py-*.txt (the
Python tests' output), prints each suite's totals (Criterion's closing Synthesis figures) and one
line per skipped test. A skip is never a pass: under CI (CI=true) with the shared models present,
a skipped test is a failure (exit 1) unless its reason is one of CI_MAY_LACK below, the things a
CI machine is not promised. Tests that Criterion filtered out (CRITERION_ARGS with --filter) are
reported by Criterion as skipped with its default message; those are not counted.
"""
import glob
import json
import os
import re
import sys

DEFAULT_MSG = "The test was skipped."
# Reasons a skip may give under CI: what CI is not promised (not root-only or model-only needs:
# CI runs as root with ../shared beside the clone).
CI_MAY_LACK = [
    (r"cannot mount a tmpfs", "CAP_SYS_ADMIN to mount in a private namespace (containers drop it)"),
    (r"cannot map \d+ sparse bytes", "address space for a sparse 16 GiB mapping (vm.overcommit)"),
]


def criterion(path, filtered):
    with open(path) as f:
        rep = json.load(f)
    tot = {"passed": 0, "failed": 0, "errored": 0, "skipped": 0}
    skips = []
    for suite in rep.get("test_suites", []):
        for t in suite.get("tests", []):
            st = t.get("status")
            msgs = [m for m in t.get("messages", []) if m]
            if st == "SKIPPED":
                if filtered and msgs == [DEFAULT_MSG]:
                    continue
                skips.append(("%s/%s" % (suite["name"], t["name"]), "; ".join(msgs) or "no reason given"))
                tot["skipped"] += 1
            elif st == "PASSED":
                tot["passed"] += 1
            elif st == "FAILED":
                tot["failed"] += 1
            else:
                tot["errored"] += 1
    return tot, skips


def python(path):
    name = os.path.basename(path)[3:-4]
    skips = []
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"^(test\w+) \(([\w.]+)\).*\.\.\. skipped '(.*)'$", line.strip())
            if m:
                skips.append(("%s/%s.%s" % (name, m.group(2), m.group(1)), m.group(3)))
            elif line.startswith("SKIP: "):
                skips.append((name, line[6:].strip()))
    return skips


def main():
    reports = sys.argv[1]
    shared = sys.argv[2] if len(sys.argv) > 2 else ""
    filtered = "--filter" in os.environ.get("CRITERION_ARGS", "")
    ci = os.environ.get("CI", "").lower() in ("true", "1", "yes")
    have_shared = bool(shared) and os.path.exists(os.path.join(shared, "models"))
    all_skips = []
    for kind in ("unit", "integration"):
        p = os.path.join(reports, kind + ".json")
        if not os.path.exists(p):
            continue
        tot, skips = criterion(p, filtered)
        n = sum(tot.values())
        print("%-11s Synthesis: Tested: %d | Passing: %d | Failing: %d | Crashing: %d | Skipped: %d"
              % (kind, n - tot["skipped"], tot["passed"], tot["failed"], tot["errored"], tot["skipped"]))
        all_skips += [(kind, t, why) for t, why in skips]
    for p in sorted(glob.glob(os.path.join(reports, "py-*.txt"))):
        all_skips += [("python", t, why) for t, why in python(p)]
    if not all_skips:
        print("skipped: none")
        return 0
    print("skipped: %d test(s)" % len(all_skips))
    bad = 0
    for kind, t, why in all_skips:
        allowed = [lack for pat, lack in CI_MAY_LACK if re.search(pat, why)]
        mark = ""
        if ci and have_shared and not allowed:
            mark = "  <- FAILS under CI: CI has what this test needs"
            bad += 1
        elif allowed:
            mark = "  (needs %s)" % allowed[0]
        print("  SKIP %-11s %s: %s%s" % (kind, t, why, mark))
    if bad:
        print("make test: %d skip(s) under CI count as failures" % bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
