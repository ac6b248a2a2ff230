"""The row routines of vecmath.h (max, masked max, exp + sum) and smallgemm.h (small GEMMs).

Each ISA has its own version of the routines: its main loop covers 64 bytes per step (16
floats / 8 doubles, in 1, 2 or 4 registers) and a scalar loop the rest, and the partial
maxima are combined across lanes at the end. So every row length 0..70 is tried, and
the special values (the row's max, NaN, -inf) at every position: in each lane, register
and tail.

Through the kernels, these tests check the version this CPU runs (a build with
``CFLAGS="-DFASTATTN_NO_CLONES -march=x86-64-v3"``, or no -march, checks the others).
``vecmath_check.c`` checks every version this CPU can run directly, bit for bit against
scalar references; ``test_c_check`` compiles and runs it.
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastattn
from fastattn import reference
from helpers import assert_close

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "fastattn" / "_kernels"

DTYPES = [np.float32, np.float64]
LENGTHS = list(range(0, 71)) + [127, 128, 129, 257]
MASKS = ["none", "bool", "float"]


def softmax_with(x, kind, keep, log=False):
    """fastattn's (log_)softmax of x along the last axis, keep (bool) given as `kind`."""
    fn = fastattn.log_softmax if log else fastattn.masked_softmax
    mask = {"none": None, "bool": keep,
            "float": np.where(keep, 0, -np.inf).astype(x.dtype)}[kind]
    return fn(x, mask, num_threads=1)        # small rows: no thread start-up


def one_hot_rows(n, dtype, low):
    """Row p of an (n, n) array: `low` everywhere but 0 at p (the max at every position)."""
    x = np.full((n, n), low, dtype=dtype)
    np.fill_diagonal(x, 0)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
def test_every_length_matches_reference(dtype, kind):
    rng = np.random.default_rng(7)
    for n in LENGTHS:
        x = (rng.standard_normal((3, n)) * 4).astype(dtype)
        keep = rng.random((3, n)) > 0.25
        if kind == "none":
            keep[:] = True
        keep[:, :1] = True                      # no fully masked row here
        got = softmax_with(x, kind, keep)
        want = reference.softmax(x, keep)
        assert_close(got, want, dtype)
        assert (got[~keep] == 0).all()
        lg = softmax_with(x, kind, keep, log=True)
        assert np.isneginf(lg[~keep]).all()
        assert_close(lg[keep], np.log(want[keep]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("low", [-1e4, -np.inf])
def test_max_found_at_every_position(dtype, kind, low):
    # The max sits alone at position p, everything else is far below (or -inf): the output
    # is exactly one-hot. A missed max would give exp of a positive number (garbage).
    for n in LENGTHS[1:]:
        x = one_hot_rows(n, dtype, low)
        keep = np.ones((n, n), dtype=bool)
        np.testing.assert_array_equal(softmax_with(x, kind, keep), np.eye(n, dtype=dtype))
        lg = softmax_with(x, kind, keep, log=True)
        np.testing.assert_array_equal(np.diag(lg), 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_keys_never_count_for_the_max(dtype):
    # A larger score at a masked position must not become the row's max (exp(x - max) of
    # the kept scores would underflow to 0 and the row would be 0/0).
    for n in LENGTHS[2:]:
        x = one_hot_rows(n, dtype, 0)           # 0 at p, big (1e4) everywhere else ...
        x[x == 0] = 1e4
        np.fill_diagonal(x, 0)
        keep = np.eye(n, dtype=bool)            # ... but only p is kept
        for kind in ("bool", "float"):
            np.testing.assert_array_equal(softmax_with(x, kind, keep), np.eye(n, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
def test_nan_at_every_position_gives_a_nan_row(dtype, kind):
    for n in LENGTHS[1:]:
        x = np.zeros((n, n), dtype=dtype)
        np.fill_diagonal(x, np.nan)
        keep = np.ones((n, n), dtype=bool)
        assert np.isnan(softmax_with(x, kind, keep)).all(), n
        assert np.isnan(softmax_with(x, kind, keep, log=True)).all(), n


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_under_a_mask(dtype):
    # A masked-out NaN (bool False, or -inf in a float mask) is dropped: the row stays
    # finite, whatever the mask's kind (one rule, as for a tile the mask rules out).
    for n in LENGTHS[2:]:
        x = np.zeros((n, n), dtype=dtype)
        np.fill_diagonal(x, np.nan)
        keep = ~np.eye(n, dtype=bool)
        for kind in ("bool", "float"):
            got = softmax_with(x, kind, keep)
            np.testing.assert_allclose(got, keep / (n - 1.0), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
def test_all_masked_or_all_minus_inf_rows_give_zero(dtype, kind):
    for n in LENGTHS[1:]:
        x = np.zeros((2, n), dtype=dtype)
        keep = np.ones((2, n), dtype=bool)
        x[0] = -np.inf
        if kind != "none":
            keep[1] = False
        got = softmax_with(x, kind, keep)
        np.testing.assert_array_equal(got[0], 0)
        assert np.isneginf(softmax_with(x, kind, keep, log=True)[0]).all()
        if kind != "none":
            np.testing.assert_array_equal(got[1], 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_huge_and_signed_zero_scores(dtype):
    info = np.finfo(dtype)
    for n in LENGTHS[1:]:
        tiny = np.full(n, info.smallest_subnormal, dtype=dtype)
        tiny[::2] *= -1
        got = fastattn.masked_softmax(tiny, num_threads=1)
        np.testing.assert_allclose(got, 1.0 / n, rtol=1e-6)
        zeros = np.zeros(n, dtype=dtype)
        zeros[::3] = -0.0
        got = fastattn.masked_softmax(zeros, num_threads=1)
        np.testing.assert_allclose(got, 1.0 / n, rtol=1e-6)
        # the largest finite values: the max and its equals share the row, -max gives 0
        huge = np.full(n, -info.max, dtype=dtype)
        huge[n // 2:] = info.max
        got = fastattn.masked_softmax(huge, num_threads=1)
        np.testing.assert_array_equal(got[:n // 2], 0)
        np.testing.assert_allclose(got[n // 2:], 1.0 / (n - n // 2), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_over_its_whole_range(dtype):
    # exp(x - max) from 0 down past the underflow threshold, at every position of a row:
    # each probability against the float64 reference (relative to the max, 1).
    lo = -100.0 if dtype == np.float32 else -760.0
    for n in (16, 37, 64, 129):
        x = np.linspace(lo, 0, n * 8).reshape(8, n).astype(dtype)
        x[:, 0] = 0
        want = reference.softmax(x)
        got = fastattn.masked_softmax(x, num_threads=1)
        assert_close(got, want, dtype)
        # below ln(tiniest normal) the kernel's exp is exactly 0, never negative
        assert (got >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_masks_every_length(dtype, kind):
    # The fused kernel applies the mask and takes the max per tile row (fa_keep_max /
    # fa_add_max); key counts 1..70 cover every lane and tail.
    rng = np.random.default_rng(3)
    for s in range(1, 71):
        q = rng.standard_normal((2, 3, 5, 8)).astype(dtype)
        k = rng.standard_normal((2, 3, s, 8)).astype(dtype)
        v = rng.standard_normal((2, 3, s, 4)).astype(dtype)
        keep = rng.random((2, 1, 5, s)) > 0.3
        keep[..., 0] = True
        mask = keep if kind == "bool" else np.where(keep, 0, -np.inf).astype(dtype)
        got = fastattn.scaled_dot_product_attention(q, k, v, mask, num_threads=1)
        want = reference.scaled_dot_product_attention(q, k, v, keep)
        assert_close(got, want, dtype)


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="the per-ISA versions exist for x86-64 gcc builds")
@pytest.mark.parametrize("flags", [
    [],                           # the build's: every version this CPU can run
    ["-DFASTATTN_NO_CLONES"],     # one version at the width of the flags (here baseline)
], ids=["per-isa", "no-clones"])
def test_c_check(tmp_path, flags):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "vecmath_check"
    # the build's own flags (setup.py): -O3, no -ffast-math
    subprocess.run([cc, "-O3", "-fno-math-errno", *flags, f"-I{KERNELS}",
                    str(HERE / "vecmath_check.c"), "-lm", "-o", str(exe)],
                   check=True, capture_output=True)
    res = subprocess.run([str(exe), "check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:]
