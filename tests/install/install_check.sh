#!/bin/sh
# SPDX-License-Identifier: MIT
# install_check.sh — `make install` and `make uninstall` into a temporary PREFIX (issue 15), run by
# tests/integration/install.c in `make test`. Usage: install_check.sh BUILD_DIR (from the
# repository root; make's variables such as OPT and SAN come through MAKEFLAGS as for any sub-make).
#
# Checks, each failure named: every file in place; libqins.so.MAJOR.MINOR with SONAME
# libqins.so.MAJOR and the two symlinks; the shared library (built and installed) exports only
# qins_*; a program outside the build (tests/install/prog.c) compiles with `pkg-config --cflags
# --libs qins` alone, needs libqins.so.MAJOR and talks to the installed qinsd serving a model made
# by the installed qinsctl, and links with libqins.a and `pkg-config --static`; the Python module from the install does the same; --version on the
# three programs; the man pages render (man -l, no warnings) and name every qinsd option and
# qinsctl command; `man qinsctl` finds the page on MANPATH; the systemd units run the installed
# qinsd; bash completion completes commands and model names; `make uninstall` leaves no file.
set -eu
BUILD=$(cd "$1" && pwd)
# make is given the build directory by the name the repository's own build uses (relative to the
# root when it lies below it): under another name (/abs/build/obj/x.o against build/obj/x.o) make
# takes every target for a different file, rebuilds what its .d files name that way and relinks
# programs other tests are running.
case "$BUILD" in "$PWD"/*) MKBUILD=${BUILD#"$PWD"/} ;; *) MKBUILD=$BUILD ;; esac
PY=${PYTHON:-/usr/bin/python3}
T=$(mktemp -d /tmp/qins-inst-XXXXXX)   # short: the socket path must stay under 108 bytes
P=$T/usr
PID=""
. tests/support/daemon_lib.sh
cleanup() {
  stop_daemon "$PID"
  rm -rf "$T"
}
trap cleanup EXIT INT TERM
fail() { echo "install_check: FAIL: $*" >&2; exit 1; }
ok() { echo "install_check: ok: $*"; }

make --no-print-directory BUILD="$MKBUILD" PREFIX="$P" install > "$T/install.log" 2>&1 ||
  { cat "$T/install.log" >&2; fail "make install PREFIX=$P"; }
VERSION=$(sed -n 's/^#define QINS_VERSION_STRING "\(.*\)"/\1/p' proto/qins_base.h)
MAJOR=${VERSION%%.*}; MINOR=${VERSION#*.}; MINOR=${MINOR%%.*}
SITE=$(cd "$P" && find lib -name qins.py -path '*-packages/*' | head -1)
[ -n "$SITE" ] || fail "no qins.py installed under $P/lib/python3*/*-packages"
SITE=$P/$(dirname "$SITE")
for f in bin/qinsd bin/qinsctl bin/qins-llama2 include/qins.h include/qins_base.h lib/libqins.a "lib/libqins.so.$MAJOR.$MINOR" \
         lib/pkgconfig/qins.pc share/man/man8/qinsd.8 share/man/man1/qinsctl.1 \
         lib/systemd/system/qinsd.service lib/systemd/system/qinsd.socket lib/tmpfiles.d/qinsd.conf \
         share/doc/qins/qinsd.conf.example share/bash-completion/completions/qinsctl; do
  [ -f "$P/$f" ] || fail "$P/$f is not installed"
done
ok "every file installed"

# The shared library: SONAME, symlinks, exports.
[ "$(readlink "$P/lib/libqins.so.$MAJOR")" = "libqins.so.$MAJOR.$MINOR" ] || fail "libqins.so.$MAJOR is not a symlink to libqins.so.$MAJOR.$MINOR"
[ "$(readlink "$P/lib/libqins.so")" = "libqins.so.$MAJOR" ] || fail "libqins.so is not a symlink to libqins.so.$MAJOR"
readelf -d "$P/lib/libqins.so.$MAJOR.$MINOR" | grep -q "(SONAME).*\[libqins.so.$MAJOR\]" ||
  fail "libqins.so.$MAJOR.$MINOR has no SONAME libqins.so.$MAJOR"
for so in "$BUILD/libqins.so" "$P/lib/libqins.so"; do
  nm -D --defined-only "$so" | awk '{print $NF}' > "$T/syms"
  grep -q '^qins_connect$' "$T/syms" || fail "$so does not export qins_connect"
  if grep -v '^qins_' "$T/syms" > "$T/other"; then fail "$so exports more than qins_*: $(tr '\n' ' ' < "$T/other")"; fi
done
ok "libqins.so.$MAJOR.$MINOR: SONAME libqins.so.$MAJOR, symlinks, $(wc -l < "$T/syms") symbols, all qins_*"

# The installed programs, a model and a daemon.
for b in qinsd qinsctl qins-llama2; do
  [ "$("$P/bin/$b" --version)" = "$b $VERSION" ] || fail "$b --version does not print \"$b $VERSION\""
done
ok "--version on qinsd, qinsctl and qins-llama2: $VERSION"
mkdir "$T/store"
"$P/bin/qinsctl" --store "$T/store" synth --arch llama2-tiny --model tiny > /dev/null || fail "installed qinsctl synth"
"$P/bin/qinsd" --store "$T/store" --socket "$T/s" --log "$T/qinsd.log" &
PID=$!
wait_daemon "$P/bin/qinsctl" "$T/s" "$PID" "$T/qinsd.log" || fail "the installed qinsd did not start"

# A program of the user's, built with pkg-config alone.
export PKG_CONFIG_PATH="$P/lib/pkgconfig"
[ "$(pkg-config --modversion qins)" = "$VERSION" ] || fail "pkg-config --modversion qins is not $VERSION"
CC=${CC:-cc}
# A library built with sanitizers (make asan) needs a program built with them.
SANFLAGS=""
nm -D "$P/lib/libqins.so" | grep -q ' U __asan_' && SANFLAGS="-fsanitize=address,undefined"
# shellcheck disable=SC2046
$CC $SANFLAGS -o "$T/prog" tests/install/prog.c $(pkg-config --cflags --libs qins) 2> "$T/cc.log" ||
  fail "cc tests/install/prog.c \$(pkg-config --cflags --libs qins): $(cat "$T/cc.log")"
readelf -d "$T/prog" | grep -q "(NEEDED).*\[libqins.so.$MAJOR\]" || fail "prog does not need libqins.so.$MAJOR"
LD_LIBRARY_PATH="$P/lib" "$T/prog" "$T/s" tiny > "$T/prog.out" 2>&1 || fail "prog: $(cat "$T/prog.out")"
for want in "libqins $VERSION (header $VERSION)" "NO_MODEL: no such model" "model tiny: 47 tensors" \
            "row 0: shape [1, 64], 256 bytes, sum |x| finite, nonzero"; do
  grep -qF "$want" "$T/prog.out" || fail "prog printed no \"$want\": $(cat "$T/prog.out")"
done
ok "a program built with pkg-config --cflags --libs qins talks to the installed qinsd"
# The same against libqins.a: the static flags (Libs.private) suffice, nothing needs the .so.
# shellcheck disable=SC2046
$CC $SANFLAGS -o "$T/prog-static" tests/install/prog.c $(pkg-config --cflags qins) -L"$P/lib" \
  -Wl,-Bstatic -lqins -Wl,-Bdynamic $(pkg-config --static --libs-only-l qins | sed 's/-lqins//') \
  2> "$T/cc.log" || fail "cc tests/install/prog.c with libqins.a and pkg-config --static: $(cat "$T/cc.log")"
if readelf -d "$T/prog-static" | grep -q "(NEEDED).*libqins"; then fail "prog-static needs libqins.so"; fi
"$T/prog-static" "$T/s" tiny > "$T/prog.out" 2>&1 && grep -qF "model tiny: 47 tensors" "$T/prog.out" ||
  fail "prog-static: $(cat "$T/prog.out")"
ok "the same program linked with libqins.a and pkg-config --static"

# The Python module, from the install only.
QINS_SOCKET="$T/s" PYTHONPATH="$SITE" "$PY" -c '
import os, sys, qins
assert qins.__file__.startswith(sys.argv[1]), qins.__file__
ms = qins.Client().models()
assert [m["name"] for m in ms] == ["tiny"], ms
print("python: qins from", os.path.dirname(qins.__file__), "sees", ms[0]["name"])' "$SITE" ||
  fail "the installed Python module"
ok "the Python module installed in $SITE"

# Man pages: render without warnings; every qinsd option and qinsctl command is in its page.
for pg in man8/qinsd.8 man1/qinsctl.1; do
  MANWIDTH=80 man --warnings -l "$P/share/man/$pg" > "$T/page" 2> "$T/warn" || fail "man -l $pg"
  [ ! -s "$T/warn" ] || fail "man -l $pg warns: $(cat "$T/warn")"
  grep -q '^NAME' "$T/page" || fail "man -l $pg has no NAME section"
done
MANWIDTH=80 man --warnings -l "$P/share/man/man8/qinsd.8" > "$T/qinsd.txt"
for o in $("$P/bin/qinsd" --help | grep -o '^  --[a-z-]*'); do
  grep -q -- "$o" "$T/qinsd.txt" || fail "qinsd.8 does not document $o (qinsd --help has it)"
done
MANWIDTH=200 man -l "$P/share/man/man1/qinsctl.1" > "$T/qinsctl.txt"
for c in $("$P/bin/qinsctl" help | awk '/^  [a-z]/ {print $1}'); do
  grep -qE "^       $c( |\$)" "$T/qinsctl.txt" || fail "qinsctl.1 does not document the command $c"
done
MANPATH="$P/share/man" man -w qinsctl | grep -q "^$P/share/man/man1/qinsctl.1" || fail "man qinsctl does not find the page"
ok "man pages: qinsd(8) with every option, qinsctl(1) with every command, man qinsctl finds it"

# systemd units and the example config.
grep -q "^ExecStart=$P/bin/qinsd --config /etc/qinsd.conf\$" "$P/lib/systemd/system/qinsd.service" ||
  fail "qinsd.service does not run $P/bin/qinsd"
grep -q '^ListenStream=/run/qinsd/qinsd.sock$' "$P/lib/systemd/system/qinsd.socket" || fail "qinsd.socket: no ListenStream"
grep -q '^d /run/qinsd 0750 qinsd qinsd-clients' "$P/lib/tmpfiles.d/qinsd.conf" || fail "tmpfiles.d/qinsd.conf: no /run/qinsd"
cmp -s docs/qinsd.conf.example "$P/share/doc/qins/qinsd.conf.example" || fail "qinsd.conf.example differs"
ok "systemd units run the installed qinsd; tmpfiles.d; example config"

# Bash completion: commands, --arch values and model names from the store on the line.
PATH="$P/bin:$PATH" bash -c '
. "$1/share/bash-completion/completions/qinsctl"
c() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _qinsctl; echo "${COMPREPLY[*]}"; }
[ "$(c qinsctl sy)" = synth ] || { echo "qinsctl sy -> $(c qinsctl sy)"; exit 1; }
[ "$(c qinsctl synth --arch llama2-t)" = llama2-tiny ] || { echo "--arch llama2-t -> $(c qinsctl synth --arch llama2-t)"; exit 1; }
[ "$(c qinsctl --store "$2" ls ti)" = tiny ] || { echo "ls ti -> $(c qinsctl --store "$2" ls ti)"; exit 1; }
[ "$(c qinsctl export --dt)" = --dtype ] || { echo "export --dt -> $(c qinsctl export --dt)"; exit 1; }
' sh "$P" "$T/store" > "$T/comp" 2>&1 || fail "bash completion: $(cat "$T/comp")"
ok "bash completion"

# Stop the daemon, then uninstall: nothing may be left.
kill -TERM "$PID"; wait "$PID" || fail "the installed qinsd did not exit 0 on SIGTERM"
PID=""
make --no-print-directory BUILD="$MKBUILD" PREFIX="$P" uninstall > "$T/uninstall.log" 2>&1 ||
  { cat "$T/uninstall.log" >&2; fail "make uninstall PREFIX=$P"; }
left=$(find "$P" -type f -o -type l)
[ -z "$left" ] || fail "make uninstall left: $left"
ok "make uninstall removes every file"
echo "install_check: all passed"
