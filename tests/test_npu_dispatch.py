"""fastattn's device="npu" path end to end: fastattn -> ascend -> the C test double.

Every NPU result is compared with fastattn's own CPU kernel on the same inputs, and
the simulator's device-memory accounting must balance after every test.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from helpers import assert_close, load_ascend_harness

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
sdpa = fastattn.scaled_dot_product_attention


def make(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("causal,alignment", [(False, "top_left"), (True, "top_left"),
                                              (True, "bottom_right")])
@pytest.mark.parametrize("L,S", [(7, 7), (5, 12), (12, 5)])
def test_sdpa_npu_matches_cpu(runtime, rng, causal, alignment, L, S):
    q, k, v = make(rng, (2, 4, L, 16)), make(rng, (2, 4, S, 16)), make(rng, (2, 4, S, 8))
    kw = dict(is_causal=causal, causal_alignment=alignment, return_lse=True)
    out, lse = sdpa(q, k, v, device="npu", **kw)
    ref, ref_lse = sdpa(q, k, v, **kw)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert_close(out, ref, np.float32)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", [(6, 9), (2, 1, 6, 9), (1, 3, 1, 9)])
def test_sdpa_npu_masks_keep_true_means_attend(runtime, rng, kind, mask_shape):
    # fastattn's True = keep must reach Ascend as 0 = keep (1 = masked out)
    q, k, v = make(rng, (2, 3, 6, 8)), make(rng, (2, 3, 9, 8)), make(rng, (2, 3, 9, 8))
    keep = rng.random(mask_shape) > 0.4
    keep[..., 0, :] = False                       # a fully masked row -> zeros on both paths
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    out = sdpa(q, k, v, mask, device="npu")
    assert_close(out, sdpa(q, k, v, mask), np.float32)
    assert np.all(out[..., 0, :] == 0)


def test_sdpa_npu_batch_shapes_gqa_and_float16(runtime, rng):
    q, k, v = make(rng, (6, 16)), make(rng, (4, 16)), make(rng, (4, 16))     # no batch axes
    assert_close(sdpa(q, k, v, device="npu:0"), sdpa(q, k, v), np.float32)
    q, k, v = make(rng, (2, 3, 4, 6, 8)), make(rng, (2, 3, 4, 5, 8)), make(rng, (2, 3, 4, 5, 8))
    assert_close(sdpa(q, k, v, device="npu"), sdpa(q, k, v), np.float32)
    q, k, v = make(rng, (2, 8, 5, 16)), make(rng, (2, 2, 7, 16)), make(rng, (2, 2, 7, 16))
    assert_close(sdpa(q, k, v, enable_gqa=True, device="npu"),
                 sdpa(q, k, v, enable_gqa=True), np.float32)
    h = [a.astype(np.float16) for a in (q[:, :2], k, v)]
    out = sdpa(*h, device="npu")
    assert out.dtype == np.float16
    assert_close(out, sdpa(*h), np.float16)
    buf = np.empty((2, 2, 5, 16), np.float16)
    assert sdpa(*h, out=buf, device="npu") is buf


def test_resident_device_arrays_stay_on_the_device(runtime, rng):
    import ascend
    q, k, v = make(rng, (1, 2, 8, 16)), make(rng, (1, 2, 8, 16)), make(rng, (1, 2, 8, 16))
    with ascend.to_device(q) as dq, ascend.to_device(k) as dk, ascend.to_device(v) as dv:
        out = sdpa(dq, dk, dv, is_causal=True, device="npu")
        assert isinstance(out, ascend.DeviceArray)
        assert_close(out.to_numpy(), sdpa(q, k, v, is_causal=True), np.float32)
        out.free()
        with pytest.raises(TypeError, match="all NumPy arrays or all"):
            sdpa(dq, k, dv, device="npu")
        with pytest.raises(ValueError, match="out="):
            sdpa(dq, dk, dv, out=np.empty((1, 2, 8, 16), np.float32), device="npu")


def test_multi_head_attention_on_npu(runtime, rng):
    E, H = 32, 4
    x = make(rng, (2, 7, E))
    w = {name: make(rng, (E, E)) * 0.2 for name in ("q_weight", "k_weight", "v_weight",
                                                     "out_weight")}
    out = fastattn.multi_head_attention(x, x, x, H, **w, is_causal=True, device="npu")
    assert_close(out, fastattn.multi_head_attention(x, x, x, H, **w, is_causal=True),
                 np.float32)


def test_paged_attention_on_npu(runtime, rng):
    # the CPU cache stores float32; the NPU operator takes float16/bfloat16 pools
    cache = fastattn.PagedKVCache(16, 16, 2, 16)
    seqs = [cache.add_sequence() for _ in range(3)]
    for s, n in zip(seqs, (5, 1, 40)):
        cache.append(s, make(rng, (2, n, 16)), make(rng, (2, n, 16)))
    table, lens = cache.block_table(seqs)
    kb, vb = cache.key_blocks.astype(np.float16), cache.value_blocks.astype(np.float16)
    q = make(rng, (3, 4, 1, 16), np.float16)
    out = fastattn.paged_attention(q, kb, vb, table, lens, device="npu")
    ref = fastattn.paged_attention(q, kb, vb, table, lens)
    assert_close(out, ref, np.float16)


def test_devices_lists_the_npus(runtime):
    assert fastattn.devices()[:2] == ["cpu", "npu:0"]


def test_bad_npu_requests(runtime, rng):
    q = make(rng, (1, 2, 4, 8))
    with pytest.raises(ValueError):
        sdpa(q, q, q, device="npu:99")
    with pytest.raises(ValueError):
        sdpa(q, q, q, device="npu:x")
    with pytest.raises(TypeError):
        sdpa(q.astype(np.float64), q, q, device="npu")      # the operator has no float64


def test_no_runtime_gives_a_clear_error(tmp_path):
    # a fresh interpreter that finds no CANN anywhere
    env = {k: v for k, v in os.environ.items()
           if k not in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_LIB_DIR",
                        "LD_LIBRARY_PATH")}
    env["ASCEND_LIB_DIR"] = str(tmp_path)
    code = ("import numpy as np, fastattn, ascend\n"
            "q = np.ones((2, 4), np.float32)\n"
            "assert fastattn.devices() == ['cpu']\n"
            "try:\n"
            "    fastattn.scaled_dot_product_attention(q, q, q, device='npu')\n"
            "except ascend.AscendRuntimeNotFound as e:\n"
            "    print('not found:', 'set_env.sh' in str(e))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    if "/usr/local/Ascend" in done.stdout + done.stderr and "not found" not in done.stdout:
        pytest.skip("a real CANN install is present")
    assert done.stdout.strip() == "not found: True", done.stderr
