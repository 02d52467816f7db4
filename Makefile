# qins — plain Makefile. Outputs go in $(BUILD)/ (build/ by default; build/asan/ for `make asan`).
#
# Modules and their archives (dependencies run daemon -> store, proto; client -> proto; proto ->
# nothing; every module sees proto/qins_base.h; the include paths below enforce it):
#   store/   -> $(BUILD)/store.a   codecs (codec*.c), LMDB store, importers
#   proto/   -> $(BUILD)/proto.a   msgpack-RPC framing, bounded request scanner
#   client/  -> $(BUILD)/libqins.a libqins, the worker-facing client library (client/qins.h)
#   daemon/  -> $(BUILD)/qinsd     the daemon
#   daemon/qinsctl/ -> $(BUILD)/qinsctl   the admin CLI
#   client/examples/qins-llama2.c -> $(BUILD)/qins-llama2
# Tests: tests/unit/*.c -> $(BUILD)/tests/unit, tests/integration/*.c -> $(BUILD)/tests/integration
# (Criterion), tests/python/*.py run with Debian's python3.

BUILD     ?= build
PREFIX    ?= /usr/local
DESTDIR   ?=
CC        ?= cc
PYTHON    ?= /usr/bin/python3
DURATION  ?= 60
SHARED    ?= $(abspath ../shared)

PKGS      := libuv lmdb
MSGPACK   := $(shell pkg-config --exists msgpack-c 2>/dev/null && echo msgpack-c || echo msgpack)
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) $(MSGPACK) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) $(MSGPACK) 2>/dev/null || echo -luv -llmdb -lmsgpackc)

WARN      := -Wall -Wextra -Werror -Wformat=2 -Wstrict-prototypes -Wshadow
OPT       ?= -O2 -g
SAN       ?=
CFLAGS    ?=
CPPFLAGS  += -DQINS_SHARED_DIR='"$(SHARED)"'
# Include paths per module: a file sees its own directory and the modules it depends on, nothing
# else, so a wrong include (store/ including a daemon header, proto/ including store.h or qins.h)
# fails to compile. proto/qins_base.h (version, limits, the error map) and proto/qins_text.h (the
# growable buffer and JSON string escaper) are what every module shares; store/ includes them, never
# client/qins.h. The first prefix that matches a source path wins.
INC_daemon/qinsctl/   := -Idaemon/qinsctl -Istore -Iclient -Iproto
INC_daemon/           := -Idaemon -Istore -Iproto -Iclient
INC_client/examples/  := -Iclient -Istore -Iproto
INC_client/           := -Iclient -Iproto
INC_proto/            := -Iproto
INC_store/            := -Istore -Iproto
INC_tests/            := -Iclient -Iproto -Istore -Idaemon -Itests/support
INC_PREFIXES := daemon/qinsctl/ daemon/ client/examples/ client/ proto/ store/ tests/
includes = $(INC_$(firstword $(foreach d,$(INC_PREFIXES),$(if $(filter $(d)%,$(1)),$(d)))))
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE $(WARN) $(OPT) $(SAN) -pthread -fPIC $(PKG_CFLAGS) $(CFLAGS)
LDLIBS    += $(PKG_LIBS) -lcurl -lcrypto -lm -lpthread
ALL_LDFLAGS = $(SAN) -pthread $(LDFLAGS)

# Codec files are compiled without FMA contraction (QINS.md: decode is bit-exact); SIMD kernels get
# their ISA flags per file and are chosen at run time, never -march=native.
CODEC_FLAGS  := -ffp-contract=off
AVX2_FLAGS   := -mavx2 -mf16c -mfma
AVX512_FLAGS := -mavx512f -mavx512bw -mavx512vl -mavx512vbmi -mavx2 -mf16c

STORE_SRC  := $(wildcard store/*.c)
PROTO_SRC  := $(wildcard proto/*.c)
CLIENT_SRC := $(wildcard client/*.c)
DAEMON_SRC := $(wildcard daemon/*.c)
CTL_SRC    := $(wildcard daemon/qinsctl/*.c)
SUPPORT_SRC:= $(wildcard tests/support/*.c)
UNIT_SRC   := $(wildcard tests/unit/*.c)
INTEG_SRC  := $(wildcard tests/integration/*.c)
BENCH_SRC  := $(wildcard tests/bench/*.c)
FUZZ_SRC   := $(filter-out tests/fuzz/replay_main.c,$(wildcard tests/fuzz/*.c))
FUZZ_NAMES := $(patsubst tests/fuzz/%.c,%,$(FUZZ_SRC))

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))

STORE_A  := $(BUILD)/store.a
PROTO_A  := $(BUILD)/proto.a
CLIENT_A := $(BUILD)/libqins.a
CLIENT_SO:= $(BUILD)/libqins.so
SUPPORT_A:= $(BUILD)/support.a

BINS := $(if $(DAEMON_SRC),$(BUILD)/qinsd) $(if $(CTL_SRC),$(BUILD)/qinsctl) \
        $(if $(wildcard client/examples/qins-llama2.c),$(BUILD)/qins-llama2)
LIBS := $(STORE_A) $(if $(PROTO_SRC),$(PROTO_A)) $(if $(CLIENT_SRC),$(CLIENT_A) $(CLIENT_SO))
TEST_BINS := $(if $(UNIT_SRC),$(BUILD)/tests/unit) $(if $(INTEG_SRC),$(BUILD)/tests/integration) \
             $(BUILD)/tests/fault.so
BENCH_BINS := $(patsubst tests/bench/%.c,$(BUILD)/bench/%,$(BENCH_SRC))
REPLAY_BINS := $(patsubst %,$(BUILD)/fuzz-replay/%,$(FUZZ_NAMES))

.PHONY: all deps test unit integration pytest skips fuzz-replay fuzz-bins asan bench fuzz soak \
        demo install uninstall clean mutate
.DEFAULT_GOAL := all
# Keep intermediate objects (fuzz-replay and bench objects are built through chained rules).
.SECONDARY:

all: $(LIBS) $(BINS)

# Installs missing Debian packages (apt-get as root, or via sudo); quick when all are present.
deps:
	@sh .ci/deps

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(call includes,$<) $(CPPFLAGS) $(ALL_CFLAGS) $(if $(filter store/codec%,$<),$(CODEC_FLAGS)) \
	  $(if $(filter %_avx2.c,$<),$(AVX2_FLAGS)) $(if $(filter %_avx512.c,$<),$(AVX512_FLAGS)) \
	  $(if $(filter %_vbmi2.c,$<),$(AVX512_FLAGS) -mavx512vbmi2) \
	  -MMD -MP -c $< -o $@

$(STORE_A): $(call obj,$(STORE_SRC))
$(PROTO_A): $(call obj,$(PROTO_SRC))
$(CLIENT_A): $(call obj,$(CLIENT_SRC) $(PROTO_SRC))
$(SUPPORT_A): $(call obj,$(SUPPORT_SRC))
$(BUILD)/%.a:
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# libqins.so.MAJOR.MINOR with the SONAME libqins.so.MAJOR (client/qins.h's version), exporting
# only qins_* (client/libqins.map); libqins.so.MAJOR and libqins.so are symlinks to it.
QINS_VERSION := $(shell sed -n 's/^\#define QINS_VERSION_STRING "\(.*\)"/\1/p' proto/qins_base.h)
QINS_MAJOR   := $(word 1,$(subst ., ,$(QINS_VERSION)))
QINS_MINOR   := $(word 2,$(subst ., ,$(QINS_VERSION)))
SO_NAME      := libqins.so.$(QINS_MAJOR)
SO_FILE      := libqins.so.$(QINS_MAJOR).$(QINS_MINOR)
$(BUILD)/$(SO_FILE): $(call obj,$(CLIENT_SRC) $(PROTO_SRC)) client/libqins.map
	$(CC) -shared $(ALL_LDFLAGS) -Wl,-soname,$(SO_NAME) -Wl,--version-script=client/libqins.map \
	  -Wl,-z,defs -Wl,--as-needed -o $@ $(filter %.o,$^) $(PKG_LIBS) -lm
$(BUILD)/$(SO_NAME): $(BUILD)/$(SO_FILE)
	ln -sf $(SO_FILE) $@
$(CLIENT_SO): $(BUILD)/$(SO_NAME)
	ln -sf $(SO_NAME) $@

$(BUILD)/qinsd: $(call obj,$(DAEMON_SRC)) $(STORE_A) $(PROTO_A)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILD)/qinsctl: $(call obj,$(CTL_SRC)) $(STORE_A) $(CLIENT_A) $(PROTO_A)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILD)/qins-llama2: $(call obj,client/examples/qins-llama2.c) $(CLIENT_A) $(STORE_A)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LDLIBS)

TEST_LINK = $(SUPPORT_A) $(STORE_A) $(if $(CLIENT_SRC),$(CLIENT_A)) $(if $(PROTO_SRC),$(PROTO_A))
# Unit tests reach daemon internals (daemon/arena.c) through the daemon archive: only the objects
# a test uses are linked.
UNIT_LINK = $(if $(DAEMON_SRC),$(BUILD)/qinsd-core.a) $(TEST_LINK)
$(BUILD)/tests/unit: $(call obj,$(UNIT_SRC)) $(UNIT_LINK)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ -lcriterion $(LDLIBS)
$(BUILD)/tests/integration: $(call obj,$(INTEG_SRC)) $(TEST_LINK)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ -lcriterion $(LDLIBS)
# The LD_PRELOAD fault injector for commit and sync faults (tests/fault/shim.c): never built with
# sanitizers, since it is preloaded into programs that may or may not be.
$(BUILD)/tests/fault.so: tests/fault/shim.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) -O2 -g -fPIC -shared $(PKG_CFLAGS) -o $@ $< -ldl
$(BUILD)/bench/%: $(BUILD)/obj/tests/bench/%.o $(TEST_LINK)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LDLIBS)

# Fuzz targets (tests/fuzz/<name>.c): the daemon without main.c (qd_serve_bytes) is an archive, so
# only the request target pulls it in. fuzz-replay/<name>: the target + replay_main.c, normal
# compiler (make test); fuzzer/<name>: the target + libFuzzer (make fuzz, clang, in build/fuzz).
$(BUILD)/qinsd-core.a: $(call obj,$(filter-out daemon/main.c,$(DAEMON_SRC)))
FUZZ_LINK = $(BUILD)/qinsd-core.a $(SUPPORT_A) $(STORE_A) $(PROTO_A)
$(BUILD)/fuzz-replay/%: $(BUILD)/obj/tests/fuzz/%.o $(BUILD)/obj/tests/fuzz/replay_main.o $(FUZZ_LINK)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILD)/fuzzer/%: $(BUILD)/obj/tests/fuzz/%.o $(FUZZ_LINK)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_LDFLAGS) -fsanitize=fuzzer -o $@ $^ $(LDLIBS)

# Tests find binaries and the shared models through the environment.
TEST_ENV = QINS_BUILD=$(abspath $(BUILD)) QINS_SHARED=$(SHARED) PYTHON=$(PYTHON)

# Ends with every skipped test named with its reason (tests/support/skips.py); under CI=true a skip
# of a test CI can run is a failure.
REPORTS = $(BUILD)/reports
test: deps
	@$(MAKE) --no-print-directory all $(TEST_BINS) $(REPLAY_BINS)
	@rm -rf $(REPORTS)
	@$(MAKE) --no-print-directory unit integration pytest fuzz-replay
	@$(MAKE) --no-print-directory skips
skips:
	@CRITERION_ARGS="$(CRITERION_ARGS)" $(PYTHON) tests/support/skips.py $(REPORTS) $(SHARED)

unit: $(if $(UNIT_SRC),$(BUILD)/tests/unit)
	@mkdir -p $(REPORTS)
	$(if $(UNIT_SRC),$(TEST_ENV) $(BUILD)/tests/unit --json=$(REPORTS)/unit.json $(CRITERION_ARGS))
integration: all $(if $(INTEG_SRC),$(BUILD)/tests/integration $(BUILD)/tests/fault.so)
	@mkdir -p $(REPORTS)
	$(if $(INTEG_SRC),$(TEST_ENV) $(BUILD)/tests/integration --json=$(REPORTS)/integration.json \
	  $(CRITERION_ARGS))
pytest: all
	@mkdir -p $(REPORTS)
	@set -e; for t in $(wildcard tests/python/test_*.py); do \
	  echo "== $$t"; r=$(REPORTS)/py-$$(basename $$t .py).txt; \
	  if $(TEST_ENV) $(PYTHON) $$t >$$r 2>&1; then cat $$r; else cat $$r; exit 1; fi; done
# Every seed and every saved crasher of each fuzz target, without libFuzzer.
fuzz-replay: $(REPLAY_BINS)
	@set -e; for t in $(FUZZ_NAMES); do c=tests/fuzz/crashers/$$t; [ -d $$c ] || c=; \
	  $(BUILD)/fuzz-replay/$$t tests/fuzz/corpus/$$t $$c; done

# ASan + UBSan: the same suites, built apart in build/asan.
asan: deps
	@LSAN_OPTIONS=suppressions=$(abspath tests/support/lsan.supp):print_suppressions=0 \
	  $(MAKE) --no-print-directory BUILD=build/asan OPT="-O1 -g -fno-omit-frame-pointer" \
	  SAN="-fsanitize=address,undefined -fno-sanitize-recover=all" test

# libFuzzer + ASan + UBSan with Debian's clang, in build/fuzz; each target runs DURATION seconds
# (FUZZ_JOBS at a time, FUZZ_TARGETS to pick some). Clang's packages are installed here only.
FUZZ_CC  ?= clang
FUZZ_SAN := -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all
fuzz:
	@QINS_FUZZ=1 sh .ci/deps
	@$(MAKE) --no-print-directory BUILD=build/fuzz CC=$(FUZZ_CC) SAN="$(FUZZ_SAN)" \
	  OPT="-O1 -g -fno-omit-frame-pointer" fuzz-bins
	@sh tests/fuzz/run.sh build/fuzz $(DURATION) $(or $(FUZZ_TARGETS),$(FUZZ_NAMES))
fuzz-bins: $(patsubst %,$(BUILD)/fuzzer/%,$(FUZZ_NAMES))

# The soak test (tests/soak/soak.c): a real qinsd, 64 clients, DURATION seconds; prints requests,
# errors, the daemon's RSS and descriptors; fails on any unexpected answer, growth or leak.
$(BUILD)/soak: $(BUILD)/obj/tests/soak/soak.o $(TEST_LINK)
	$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LDLIBS)
soak: deps
	@$(MAKE) --no-print-directory all $(BUILD)/soak
	$(TEST_ENV) $(BUILD)/soak --duration $(DURATION)

# The mutation harness (tests/mutate/, docs/TESTING.md): each mutant of tests/mutate/mutants.txt in
# a scratch copy (build/mutate), built and run against its own tests; MUTATE_S bounds the seconds,
# MUTANTS=id,glob picks some. Not part of `make test`.
MUTATE_S ?= 1200
mutate: deps
	@MUTATE_S=$(MUTATE_S) MUTANTS="$(MUTANTS)" QINS_SHARED=$(SHARED) PYTHON=$(PYTHON) \
	  $(PYTHON) tests/mutate/run.py

# The benchmarks' same-run references that are programs of their own (Redis for the latency lines,
# nginx-light and curl for the pull lines) are installed like the build's packages.
bench: deps all $(BENCH_BINS)
	@QINS_EXTRA_PKGS="redis-server nginx-light curl" sh .ci/deps
	@sh tests/bench/run.sh $(abspath $(BUILD)) $(SHARED)

# Issue 6 at full scale (tests/bench/bench_scale.sh): synth Phi-3.5-mini (3.82 B weights) into a
# temporary store, serve it to 4 workers at once through qinsd; import MB/s, stored size, GB/s,
# RSS and PSS; about 5-20 minutes on 2 cores. ARCH=phi-mini-4l or ARCH=tiny for a quick run.
.PHONY: bench-scale
bench-scale: deps all $(BENCH_BINS)
	@sh tests/bench/bench_scale.sh $(abspath $(BUILD))

# Issue 12's before/after (tests/bench/bench_core_compare.sh): builds the qinsd of REV (default
# c8b3cf1, the serving core before its redesign) in a temporary worktree and runs bench_serve
# against it and this tree's qinsd in turn, ROUNDS rounds (default 3; about 3-6 minutes on 2
# cores). Rewrites docs/BENCHMARKS.md's before/after figures. Not part of `make bench`.
.PHONY: bench-compare
ROUNDS ?= 3
REV ?= c8b3cf1
bench-compare: deps all $(BUILD)/bench/bench_serve
	@QINS_EXTRA_PKGS="redis-server" sh .ci/deps
	@sh tests/bench/bench_core_compare.sh $(abspath $(BUILD)) $(ROUNDS) $(REV)

# The README's main-job command: builds, imports MODEL=path (.safetensors or a llama2.c .bin), else
# ../shared/models/stories260K.safetensors, else a synthetic llama2-tiny (qinsctl synth) into a
# temporary store, serves it with qinsd to 4 qins-llama2 workers at once.
demo: deps
	@$(MAKE) --no-print-directory all
	@PYTHON=$(PYTHON) sh tests/support/demo.sh $(abspath $(BUILD)) $(SHARED) $(MODEL)

# `make install` (PREFIX, DESTDIR): the programs, qins.h, libqins (shared with its SONAME and
# symlinks, and static), qins.pc, the man pages, the systemd units and tmpfiles.d entry (with
# this PREFIX's paths), the example config, bash completion and the Python module; `make
# uninstall` removes exactly those files. tests/support/install_check.sh (make test) checks both.
BINDIR      ?= $(PREFIX)/bin
LIBDIR      ?= $(PREFIX)/lib
INCLUDEDIR  ?= $(PREFIX)/include
MANDIR      ?= $(PREFIX)/share/man
DOCDIR      ?= $(PREFIX)/share/doc/qins
UNITDIR     ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
# Where $(PYTHON) looks under PREFIX: lib/python3.X/dist-packages on Debian, site-packages elsewhere.
PYTHONDIR   ?= $(PREFIX)/$(shell $(PYTHON) -c 'import sys; print("lib/python%d.%d/%s" % (sys.version_info[0], \
  sys.version_info[1], "dist-packages" if any(p.endswith("dist-packages") for p in sys.path) else "site-packages"))')
PY_MODULE   := $(wildcard client/python/qins.py client/python/qins_arena.py)
PY_PACKAGE  := $(patsubst %/__init__.py,%,$(wildcard client/python/qins/__init__.py))
D := $(DESTDIR)
INSTALLED = $(addprefix $(D)$(BINDIR)/,$(notdir $(BINS))) $(D)$(INCLUDEDIR)/qins.h $(D)$(INCLUDEDIR)/qins_base.h \
  $(D)$(LIBDIR)/libqins.a $(D)$(LIBDIR)/$(SO_FILE) $(D)$(LIBDIR)/$(SO_NAME) $(D)$(LIBDIR)/libqins.so \
  $(D)$(LIBDIR)/pkgconfig/qins.pc $(D)$(MANDIR)/man8/qinsd.8 $(D)$(MANDIR)/man1/qinsctl.1 \
  $(D)$(UNITDIR)/qinsd.service $(D)$(UNITDIR)/qinsd.socket $(D)$(TMPFILESDIR)/qinsd.conf \
  $(D)$(DOCDIR)/qinsd.conf.example $(D)$(BASHCOMPDIR)/qinsctl \
  $(foreach m,$(basename $(notdir $(PY_MODULE))),$(D)$(PYTHONDIR)/$(m).py $(D)$(PYTHONDIR)/__pycache__/$(m).*.pyc)

install: all
	install -d $(D)$(BINDIR) $(D)$(LIBDIR)/pkgconfig $(D)$(INCLUDEDIR) $(D)$(MANDIR)/man1 \
	  $(D)$(MANDIR)/man8 $(D)$(DOCDIR) $(D)$(UNITDIR) $(D)$(TMPFILESDIR) $(D)$(BASHCOMPDIR) $(D)$(PYTHONDIR)
	install -m 0755 $(BINS) $(D)$(BINDIR)/
	install -m 0644 client/qins.h proto/qins_base.h $(D)$(INCLUDEDIR)/
	install -m 0644 $(CLIENT_A) $(D)$(LIBDIR)/
	install -m 0755 $(BUILD)/$(SO_FILE) $(D)$(LIBDIR)/
	ln -sf $(SO_FILE) $(D)$(LIBDIR)/$(SO_NAME)
	ln -sf $(SO_NAME) $(D)$(LIBDIR)/libqins.so
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(LIBDIR)|; s|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	  -e 's|@VERSION@|$(QINS_VERSION)|' client/qins.pc.in > $(D)$(LIBDIR)/pkgconfig/qins.pc
	install -m 0644 docs/man/qinsd.8 $(D)$(MANDIR)/man8/
	install -m 0644 docs/man/qinsctl.1 $(D)$(MANDIR)/man1/
	for u in qinsd.service qinsd.socket; do \
	  sed 's|/usr/local/bin/|$(BINDIR)/|g' docs/systemd/$$u > $(D)$(UNITDIR)/$$u || exit 1; done
	install -m 0644 docs/systemd/qinsd-tmpfiles.conf $(D)$(TMPFILESDIR)/qinsd.conf
	install -m 0644 docs/qinsd.conf.example $(D)$(DOCDIR)/
	install -m 0644 daemon/qinsctl/qinsctl.bash $(D)$(BASHCOMPDIR)/qinsctl
	$(if $(PY_MODULE),install -m 0644 $(PY_MODULE) $(D)$(PYTHONDIR)/)
	$(if $(PY_PACKAGE),cp -R $(PY_PACKAGE) $(D)$(PYTHONDIR)/ && chmod -R a+rX $(D)$(PYTHONDIR)/qins)

uninstall:
	rm -f $(INSTALLED)
	$(if $(PY_PACKAGE),rm -rf $(D)$(PYTHONDIR)/qins)
	rmdir $(D)$(DOCDIR) $(D)$(PYTHONDIR)/__pycache__ 2>/dev/null || true

clean:
	rm -rf build

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
