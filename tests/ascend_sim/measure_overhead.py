"""Per-call overhead of ascend's Python/ctypes path, measured against the simulator.

Usage::

    python tests/ascend_sim/measure_overhead.py [--calls 2000] [--shape 1,1,8,16] [--causal]
    python tests/ascend_sim/measure_overhead.py --paged [--calls 2000] [--paged-shape 1,1,16,16]

Builds the test double in a temporary directory, runs ``flash_attention`` on
device-resident inputs (or, with ``--paged``, a decode step over a
``fastattn.PagedKVCache(..., device="npu")`` with a resident query), and splits the
wall time per call into the time spent inside the simulated launch
(``ascendsim_launch_stats``) and everything else: validation, descriptors, pool,
two-phase call, synchronisation, output wrapping.
"""

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _best_of(call, calls, repeats):
    """Best of ``repeats`` loops of ``calls`` calls: dict(total_us, launch_us, overhead_us)."""
    from ascend._runtime import get_runtime

    call()  # warm pool and caches
    stats = (ctypes.c_int64 * 2)()
    operators = get_runtime().lib.operator_libraries[0]
    best = None
    for _ in range(repeats):
        operators.ascendsim_launch_stats(stats)
        launches, launch_ns = stats[0], stats[1]
        start = time.perf_counter()
        for _ in range(calls):
            call()
        total_us = (time.perf_counter() - start) / calls * 1e6
        operators.ascendsim_launch_stats(stats)
        launch_us = (stats[1] - launch_ns) / (stats[0] - launches) / 1e3
        result = dict(total_us=total_us, launch_us=launch_us, overhead_us=total_us - launch_us)
        if best is None or result["overhead_us"] < best["overhead_us"]:
            best = result
    return best


def measure(calls=2000, shape=(1, 1, 8, 16), repeats=5, causal=False):
    """``flash_attention`` on resident q, k, v of ``shape`` (B, H, L, E), best of ``repeats``."""
    import numpy as np

    import ascend

    rng = np.random.default_rng(0)
    q, k, v = (ascend.to_device(rng.standard_normal(shape).astype(np.float32)) for _ in range(3))
    best = _best_of(lambda: ascend.flash_attention(q, k, v, is_causal=causal).free(), calls,
                    repeats)
    for array in (q, k, v):
        array.free()
    return best


def measure_paged(calls=2000, shape=(1, 1, 16, 16), repeats=5, block_size=16):
    """A resident decode step: ``PagedKVCache(device="npu").attention`` with a resident query.

    ``shape`` is (B, H_kv, S, E): B sequences of S tokens, H = H_kv query heads, float16.
    Returns dict(total_us, launch_us, overhead_us) for ``fastattn.paged_attention`` with
    the cache's pools and table (``fastattn``) and for ``ascend.paged_attention`` on the
    same operands (``ascend``).
    """
    import numpy as np

    import ascend
    import fastattn

    batch, kv_heads, length, head_dim = shape
    rng = np.random.default_rng(0)
    blocks = batch * -(-length // block_size)
    with fastattn.PagedKVCache(blocks, block_size, kv_heads, head_dim, dtype=np.float16,
                               device="npu") as cache:
        seqs = [cache.add_sequence() for _ in range(batch)]
        for seq in seqs:
            kv = rng.standard_normal((kv_heads, length, head_dim)).astype(np.float16)
            cache.append(seq, kv, kv)
        table, lengths = cache.block_table(seqs)
        keys, values = cache.key_blocks, cache.value_blocks
        with ascend.to_device(rng.standard_normal((batch, kv_heads, 1, head_dim))
                              .astype(np.float16)) as query:
            through_fastattn = _best_of(
                lambda: fastattn.paged_attention(query, keys, values, table, lengths,
                                                 device="npu").free(), calls, repeats)
            direct = _best_of(
                lambda: ascend.paged_attention(query, keys, values, table, lengths).free(),
                calls, repeats)
    return dict(fastattn=through_fastattn, ascend=direct)


def _ints(text):
    return tuple(int(n) for n in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--shape", default="1,1,8,16", help="B,H,L,E of q = k = v")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--paged", action="store_true",
                        help="a resident paged decode step instead of flash_attention")
    parser.add_argument("--paged-shape", default="1,1,16,16",
                        help="B,H_kv,S,E of the paged cache (H = H_kv query heads)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build import build

    with tempfile.TemporaryDirectory() as root:
        build(root)
        os.environ["ASCEND_HOME_PATH"] = root
        if args.paged:
            results = measure_paged(args.calls, _ints(args.paged_shape))
            for label, result in results.items():
                print(f"paged decode via {label}, resident cache and query, B,H_kv,S,E = "
                      f"{args.paged_shape}: {result['total_us']:.1f} us per call = "
                      f"{result['launch_us']:.1f} us in the simulated launch + "
                      f"{result['overhead_us']:.1f} us Python/ctypes overhead")
            return 0
        result = measure(args.calls, _ints(args.shape), causal=args.causal)
        print(f"flash_attention, resident inputs, shape {args.shape}: "
              f"{result['total_us']:.1f} us per call = {result['launch_us']:.1f} us in the "
              f"simulated launch + {result['overhead_us']:.1f} us Python/ctypes overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
