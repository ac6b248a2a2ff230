"""Per-call overhead of ascend's Python/ctypes path, measured against the simulator.

Usage::

    python tests/ascend_sim/measure_overhead.py [--calls 2000] [--shape 1,1,8,16]

Builds the test double in a temporary directory, runs ``flash_attention`` on
device-resident inputs, and splits the wall time per call into the time spent
inside the simulated launch (``ascendsim_launch_stats``) and everything else:
validation, descriptors, pool, two-phase call, synchronisation, output wrapping.
"""

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def measure(calls=2000, shape=(1, 1, 8, 16), repeats=5, causal=False):
    """Best of ``repeats``: dict(total_us, launch_us, overhead_us) per call."""
    import numpy as np

    import ascend
    from ascend._runtime import get_runtime

    rng = np.random.default_rng(0)
    q, k, v = (ascend.to_device(rng.standard_normal(shape).astype(np.float32)) for _ in range(3))
    ascend.flash_attention(q, k, v, is_causal=causal).free()  # warm pool and caches
    stats = (ctypes.c_int64 * 2)()
    operators = get_runtime().lib.operator_libraries[0]
    best = None
    for _ in range(repeats):
        operators.ascendsim_launch_stats(stats)
        launches, launch_ns = stats[0], stats[1]
        start = time.perf_counter()
        for _ in range(calls):
            ascend.flash_attention(q, k, v, is_causal=causal).free()
        total_us = (time.perf_counter() - start) / calls * 1e6
        operators.ascendsim_launch_stats(stats)
        launch_us = (stats[1] - launch_ns) / (stats[0] - launches) / 1e3
        result = dict(total_us=total_us, launch_us=launch_us, overhead_us=total_us - launch_us)
        if best is None or result["overhead_us"] < best["overhead_us"]:
            best = result
    for array in (q, k, v):
        array.free()
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--shape", default="1,1,8,16", help="B,H,L,E of q = k = v")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build import build

    with tempfile.TemporaryDirectory() as root:
        build(root)
        os.environ["ASCEND_HOME_PATH"] = root
        result = measure(args.calls, tuple(int(n) for n in args.shape.split(",")),
                         causal=args.causal)
        print(f"flash_attention, resident inputs, shape {args.shape}: "
              f"{result['total_us']:.1f} us per call = {result['launch_us']:.1f} us in the "
              f"simulated launch + {result['overhead_us']:.1f} us Python/ctypes overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
