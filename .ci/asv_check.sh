#!/usr/bin/env bash
# CI: the asv suite must import, validate, and run a small subset against the
# installed fastattn, so a benchmark broken by an API change fails CI.
#
# Runs in the environment where fastattn is already installed (.ci/run's venv):
#   --python=same  uses this interpreter and builds nothing (asv's "existing" env);
#   no --set-commit-hash, so nothing is saved and no branch lookup is needed (that
#   lookup is what fails in shallow clones, asv#1508);
#   ASV_PYTHONPATH is honoured by asv >= 0.6.5, which strips PYTHONPATH otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

# A small, fast subset covering the core kernel, GQA and one skipped-or-run area each.
SUBSET="${ASV_SUBSET:-^bench_(sdpa\.Sdpa\.time_sdpa|gqa|paged\.PagedDecode\.time_paged_decode)}"

python -c "import asv" 2>/dev/null || python -m pip install --quiet "asv>=0.6.5"

# asv refuses to run without machine information; --yes takes the defaults.
asv machine --yes >/dev/null

asv check --python=same

# A failed benchmark makes asv exit non-zero; the log is checked too, so a failure
# is caught whatever asv's exit code. Skips (NotImplementedError) are fine.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
asv run --python=same --quick --show-stderr -b "$SUBSET" >"$log" 2>&1 || status=$?
cat "$log"
if [ "$status" -ne 0 ] || grep -q "benchmark failed" "$log"; then
    echo "asv_check: a benchmark failed (asv exit status $status)" >&2
    exit 1
fi
echo "asv_check: ok"
