#!/usr/bin/env bash
# Sanitizer job (issue 14): build the kernels with AddressSanitizer + UndefinedBehavior-
# Sanitizer in a copy of this tree and run the test suite under them; any report fails.
#
#   tools/sanitize.sh                  # the whole suite
#   tools/sanitize.sh tests/test_sdpa.py -k causal    # pytest arguments of your choice
#
# Environment: SANITIZE_DIR (where the copy is built; default a fresh temporary dir,
# removed on success), CC (the compiler whose libasan is preloaded; default cc).
#
# How it runs:
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
PY="${PYTHON:-python}"

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

reports=("$WORK"/reports/*)
if [[ -e "${reports[0]}" ]]; then
    for r in "${reports[@]}"; do echo "==== $r"; head -60 "$r"; done
    echo "sanitize.sh: FAILED: ${#reports[@]} sanitizer report(s) in $WORK/reports" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    echo "sanitize.sh: FAILED: the tests failed under the sanitizers (exit $status)" >&2
    exit 1
fi
echo "sanitize.sh: OK, no sanitizer report"
[[ -n "$KEEP" ]] || rm -rf "$WORK"
