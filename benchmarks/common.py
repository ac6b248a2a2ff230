"""Shared pieces of the asv suite: seeded data, sizes, machine baselines, feature checks.

The seeds and sizes below define the benchmark history: append new ones, never
change existing ones (NumPy's rule), or old results stop being comparable.

Benchmarks whose feature is not in the installed fastattn (it is built by another
issue, or an older commit is being measured) call :func:`require` in ``setup``,
which raises ``NotImplementedError``: asv records them as skipped and their
parameter lists stay the same whether or not the feature exists.
"""
import functools
import resource
import statistics
import sys
import time

import numpy as np

import fastattn

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:        # outside asv (tests): its base class, which asv also skips on
    SkipNotImplemented = NotImplementedError

SEED = 20240601
DTYPE = np.float32
HEADS = 8
HEAD_DIM = 64
TRACK_REPEAT = 3           # timed calls behind each track_* number (median)
MASK_KEEP_PROBABILITY = 0.9


def dtype_named(name):
    """The NumPy dtype of a benchmark's ``dtype`` parameter ("float32", "float16",
    "bfloat16"); bfloat16 is skipped (``NotImplementedError``) on a fastattn without it."""
    if name == "bfloat16":
        return np.dtype(require("bfloat16"))
    return np.dtype(name)


def require(name, module=fastattn):
    """``module.<name>``, or ``NotImplementedError`` (asv's skip) when it is missing."""
    feature = getattr(module, name, None)
    if feature is None:
        version = getattr(module, "__version__", "")
        raise NotImplementedError(f"{module.__name__} {version} has no {name!r}")
    return feature


# --- seeded data --------------------------------------------------------------------

def random_array(shape, seed=0, dtype=DTYPE):
    """Standard-normal data, the same on every run and machine for one ``seed``."""
    rng = np.random.default_rng([SEED, seed])
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


def qkv(batch, heads, L, S, dim=HEAD_DIM, kv_heads=None, dtype=DTYPE):
    """Query ``(batch, heads, L, dim)`` and key/value ``(batch, kv_heads, S, dim)``."""
    kv_heads = heads if kv_heads is None else kv_heads
    return (random_array((batch, heads, L, dim), 1, dtype),
            random_array((batch, kv_heads, S, dim), 2, dtype),
            random_array((batch, kv_heads, S, dim), 3, dtype))


def random_bool_mask(shape, seed=4):
    """True = keep, with probability 0.9; the diagonal is always kept (no empty rows)."""
    rng = np.random.default_rng([SEED, seed])
    mask = rng.random(shape) < MASK_KEEP_PROBABILITY
    rows, cols = shape[-2:]
    idx = np.arange(min(rows, cols))
    mask[..., idx, idx] = True
    return mask


def float_mask(bool_mask, dtype=DTYPE):
    """The additive form of a bool mask: 0 where kept, -inf where masked."""
    return np.where(bool_mask, dtype(0), dtype(-np.inf)).astype(dtype)


# --- machine baselines (measured once per benchmark process) ------------------------

def _bench_module():
    try:
        from fastattn import bench
    except ImportError:    # commits before fastattn.bench existed
        raise SkipNotImplemented("this fastattn has no fastattn.bench") from None
    return bench


@functools.lru_cache(maxsize=None)
def sgemm_gflops():
    """NumPy float32 2048² matmul rate of this machine, GFLOP/s."""
    return _bench_module().sgemm_gflops()


@functools.lru_cache(maxsize=None)
def memory_bandwidth_gbs():
    """Read memory bandwidth of this machine (all threads, STREAM-style), GB/s."""
    return _bench_module().memory_bandwidth_gbs()


def attention_flops(batch, heads, L, S, E, Ev, causal):
    """The flash-attention FLOP convention (see :func:`fastattn.bench.attention_flops`)."""
    return _bench_module().attention_flops(batch, heads, L, S, E, Ev, causal)


# --- measurements behind track_* benchmarks -----------------------------------------

def median_seconds(fn, repeat=TRACK_REPEAT):
    """Median wall time of ``fn()`` over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gflops(fn, flops):
    """GFLOP/s of ``fn()`` doing ``flops()`` floating-point operations.

    ``flops`` is a callable so that ``setup`` needs nothing from fastattn.bench:
    on commits without it only the track_* benchmarks are skipped.
    """
    return flops() / median_seconds(fn) / 1e9


def peak_rss_growth_mib(fn):
    """How far ``fn()`` raises the process's peak resident memory, MiB (a lower bound
    of its transient memory: growth beyond the peak reached before it ran)."""
    before = _peak_rss_bytes()
    fn()
    return (_peak_rss_bytes() - before) / 2 ** 20


def _peak_rss_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024      # Linux reports KiB
