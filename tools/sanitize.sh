#!/usr/bin/env bash
# Sanitizer job (issue 14): build the kernels with AddressSanitizer + UndefinedBehavior-
# Sanitizer in a copy of this tree and run the test suite under them; any report fails.
#
#   tools/sanitize.sh                  # the whole suite
#   tools/sanitize.sh tests/test_sdpa.py -k causal    # pytest arguments of your choice
#
# Environment: SANITIZE_DIR (where the copy and its venv are built; default a fresh
# temporary dir, removed on success), SANITIZE_PYTHON (an interpreter that already has
# the package's runtime, test and build dependencies, e.g. CI's venv; default: a fresh
# venv in SANITIZE_DIR with exactly those), CC (whose libasan is preloaded; default cc).
#
# How it runs:
# - In a venv of the package's own dependencies (numpy, scipy, ml_dtypes, threadpoolctl,
#   pytest, hypothesis; Cython and setuptools to build): the optional peers some tests
#   compare with are left out, and must be (OpenVINO dlopens with RTLD_DEEPBIND, which
#   the ASan runtime cannot serve; their code is not ours to check).
# - The copy is the tracked and untracked-but-not-ignored files (no build products), built
#   in place with FASTATTN_SANITIZE=1 (setup.py: -fsanitize=address,undefined
#   -fno-sanitize-recover=all -O1 -g). The developer's own build is never touched.
# - CPython is not built with ASan, so libasan is preloaded (LD_PRELOAD) for the modules'
#   instrumentation to find its runtime; PYTHONMALLOC=malloc routes Python's small objects
#   through it too. Child processes (subprocess tests, the bad-input corpus's workers)
#   inherit all of this and are checked as well.
# - detect_leaks=0: LeakSanitizer would report every allocation CPython, NumPy and
#   OpenBLAS keep until exit (interned strings, type caches, thread buffers), and its
#   suppressions match any frame of a stack, so none can exclude the interpreter without
#   excluding our kernels (which are always called from it). Kernel memory is instead
#   checked by the tests that make allocations fail (MemoryError paths) and by ASan's
#   use-after-free / overflow checks here.
# - Reports go to files (log_path) as well as stopping the process, so a report in a
#   child process whose test tolerated its exit still fails the job.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
CC="${CC:-cc}"

LIBASAN="$("$CC" -print-file-name=libasan.so)"
if [[ "$LIBASAN" != /* ]] || [[ ! -e "$LIBASAN" ]]; then
    echo "sanitize.sh: $CC has no libasan.so (install libasan / gcc)" >&2
    exit 2
fi
LIBASAN="$(readlink -f "$LIBASAN")"
# libstdc++ loaded with it: C++ libraries the tests import (OpenVINO, torch) throw
# exceptions, and ASan's __cxa_throw interceptor needs the real one at start-up
LIBSTDCXX="$(readlink -f "$("$CC" -print-file-name=libstdc++.so)")"

KEEP="${SANITIZE_DIR:+1}"
WORK="${SANITIZE_DIR:-$(mktemp -d -t fastattn-sanitize.XXXXXX)}"
mkdir -p "$WORK/tree" "$WORK/reports"
rm -f "$WORK/reports"/*

# ---- the interpreter: a venv of the package's dependencies only, unless given one
if [[ -n "${SANITIZE_PYTHON:-}" ]]; then
    PY="$SANITIZE_PYTHON"
else
    if [[ ! -x "$WORK/venv/bin/python" ]]; then
        python3 -m venv "$WORK/venv"
        # pyproject.toml's build requirements, dependencies and test extra, nothing else
        mapfile -t deps < <(python3 - "$SRC/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    meta = tomllib.load(f)
project = meta["project"]
print("\n".join(meta["build-system"]["requires"] + project["dependencies"]
                + project["optional-dependencies"]["test"]))
PY
)
        "$WORK/venv/bin/python" -m pip install -q "${deps[@]}"
    fi
    PY="$WORK/venv/bin/python"
fi

# ---- the copy: source files only, then a sanitized in-place build
cd "$SRC"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/tree"
else
    tar --exclude='*.so' --exclude=build --exclude='.ci-venv' --exclude='fastattn/_kernels/*.c' \
        -cf - . | tar -xf - -C "$WORK/tree"
fi
cd "$WORK/tree"
t0=$(date +%s)
FASTATTN_SANITIZE=1 "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1 || {
    tail -50 "$WORK/build.log"; echo "sanitize.sh: the sanitized build failed" >&2; exit 1; }
t1=$(date +%s)
echo "sanitize.sh: built in $((t1 - t0)) s in $WORK/tree"

# ---- the run
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
export PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:\
allocator_may_return_null=1:log_path=$WORK/reports/asan:strict_string_checks=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$WORK/reports/ubsan"
# the corpus and fuzz tests pick their CI profile; hypothesis keeps no database here
export FASTATTN_HYPOTHESIS_PROFILE="${FASTATTN_HYPOTHESIS_PROFILE:-ci}"
set +e
"$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
status=$?
set -e
t2=$(date +%s)
echo "sanitize.sh: tests ran in $((t2 - t1)) s (exit $status)"

# A report file holding nothing but ASan's "failed to allocate" warnings is not an error:
# with allocator_may_return_null=1 a huge request returns NULL and the code under test
# raises MemoryError (tests/test_reliability.py asks for 64 TiB on purpose).
errors=0
for r in "$WORK"/reports/*; do
    [[ -e "$r" ]] || continue
    if ! grep -v "WARNING: AddressSanitizer failed to allocate" "$r" | grep -q "[^[:space:]]"; then
        echo "sanitize.sh: note: $(basename "$r"): $(head -1 "$r")"
        continue
    fi
    echo "==== $r"; head -60 "$r"
    errors=$((errors + 1))
done
if [[ $errors -ne 0 ]]; then
    echo "sanitize.sh: FAILED: $errors sanitizer report(s) in $WORK/reports" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    echo "sanitize.sh: FAILED: the tests failed under the sanitizers (exit $status)" >&2
    exit 1
fi
echo "sanitize.sh: OK, no sanitizer report"
[[ -n "$KEEP" ]] || rm -rf "$WORK"
