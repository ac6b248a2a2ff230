"""fastattn.scaled_dot_product_attention_backward(device="npu") through the C test double:
the same gradients as the CPU backward (float32, float16, bfloat16 tolerances) and the
float64 reference, for the forward's options (masks and their broadcast shapes, causal
both alignments, grouped-query attention, broadcast batches, mixed dtypes), resident
DeviceArrays, and the errors of what the NPU does not do."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend
import fastattn
from fastattn import reference
from helpers import RTOL, load_ascend_harness

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
BF16 = ml_dtypes.bfloat16


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def assert_grad_close(actual, expected, dtype):
    """Error <= RTOL[dtype] * max|expected|, with twice the forward's tolerance: the
    gradients go through the forward's rounded output (rowsum(dO * O))."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    bound = 2 * RTOL[np.dtype(dtype)] * max(float(np.abs(expected).max(initial=0.0)), 1.0)
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= bound, f"max error {error:.3g} > {bound:.3g}"


def both(grad_out, q, k, v, mask=None, **options):
    """(NPU gradients, CPU gradients), each from its own device's forward."""
    results = []
    for device in ("npu", "cpu"):
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True,
                                                         device=device, **options)
        results.append(fastattn.scaled_dot_product_attention_backward(
            grad_out, q, k, v, out, lse, mask, device=device, **options))
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(7, 7), (5, 11), (11, 5)])
def test_npu_backward_matches_cpu(runtime, rng, dtype, alignment, L, S):
    q = rng.standard_normal((2, 3, L, 16)).astype(dtype)
    k = rng.standard_normal((2, 3, S, 16)).astype(dtype)
    v = rng.standard_normal((2, 3, S, 8)).astype(dtype)
    grad_out = rng.standard_normal((2, 3, L, 8)).astype(dtype)
    npu, cpu = both(grad_out, q, k, v, is_causal=True, causal_alignment=alignment)
    for got, want, x in zip(npu, cpu, (q, k, v)):
        assert isinstance(got, np.ndarray) and got.dtype == x.dtype and got.shape == x.shape
        assert_grad_close(got, want, dtype)
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", [(6, 9), (1, 6, 9), (3, 1, 9), (2, 3, 6, 9), (2, 1, 1, 9)])
def test_masks_and_their_broadcast_shapes(runtime, rng, kind, mask_shape):
    q = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    grad_out = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.6
        mask[..., 0, :] = False if mask_shape[-2] > 1 else mask[..., 0, :]   # a row with no key
    else:
        mask = rng.standard_normal(mask_shape).astype(np.float32)
        mask[rng.random(mask_shape) < 0.2] = -np.inf
    npu, cpu = both(grad_out, q, k, v, mask)
    expected = reference.scaled_dot_product_attention_backward(grad_out, q, k, v, mask)
    for got, want, exact in zip(npu, cpu, expected):
        assert_grad_close(got, want, np.float32)
        assert_grad_close(got, exact, np.float32)
    harness.assert_no_leak(runtime)


def test_grouped_query_attention_and_broadcast_batches(runtime, rng):
    q = rng.standard_normal((2, 6, 5, 8)).astype(np.float16)
    k = rng.standard_normal((2, 2, 7, 8)).astype(np.float16)          # GQA: 3 heads a group
    v = rng.standard_normal((2, 2, 7, 8)).astype(np.float16)
    grad_out = rng.standard_normal((2, 6, 5, 8)).astype(np.float16)
    npu, cpu = both(grad_out, q, k, v, enable_gqa=True, is_causal=True)
    for got, want in zip(npu, cpu):
        assert_grad_close(got, want, np.float16)
    # key/value shared by the batch and the heads: their gradients are summed over both
    q = rng.standard_normal((3, 4, 5, 8)).astype(np.float32)
    kv = rng.standard_normal((7, 8)).astype(np.float32)
    grad_out = rng.standard_normal((3, 4, 5, 8)).astype(np.float32)
    npu, cpu = both(grad_out, q, kv, kv)
    assert [g.shape for g in npu] == [(3, 4, 5, 8), (7, 8), (7, 8)]
    for got, want in zip(npu, cpu):
        assert_grad_close(got, want, np.float32)
    harness.assert_no_leak(runtime)


def test_mixed_dtypes_give_each_input_its_own_dtype(runtime, rng):
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float16)
    k = rng.standard_normal((1, 2, 4, 8)).astype(BF16)                  # promoted: float32
    v = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, device="npu")
    assert out.dtype == np.float32
    grads = fastattn.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v, out, lse,
                                                           device="npu")
    assert [g.dtype for g in grads] == [np.dtype(np.float16), np.dtype(BF16),
                                        np.dtype(np.float32)]
    assert harness.last_launch(runtime)["dtypes"]["query"] == 0       # the operator ran float32
    expected = reference.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v)
    for got, want in zip(grads, expected):
        assert_grad_close(got, want, BF16)
    harness.assert_no_leak(runtime)


def test_lse_of_a_cpu_forward_and_float32_grad_out(runtime, rng):
    q, k, v = (rng.standard_normal((2, 4, 6, 8)).astype(np.float16) for _ in range(3))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True)   # on the CPU
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    npu = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         device="npu")
    cpu = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse)
    for got, want in zip(npu, cpu):
        assert got.dtype == np.float16
        assert_grad_close(got, want, np.float16)
    harness.assert_no_leak(runtime)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=st.integers(1, 3), L=st.integers(1, 9), S=st.integers(1, 9), E=st.integers(1, 12),
       cut=st.integers(0, 3), causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]),
       masking=st.sampled_from([None, "bool", "float"]), scale=st.sampled_from([None, 0.7]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_random_shapes_against_the_reference(runtime, heads, L, S, E, cut, causal, alignment,
                                             masking, scale, seed):
    rng = np.random.default_rng(seed)
    Ev = max(1, E - cut)
    q = rng.standard_normal((heads, L, E)).astype(np.float32)
    k = rng.standard_normal((heads, S, E)).astype(np.float32)
    v = rng.standard_normal((heads, S, Ev)).astype(np.float32)
    grad_out = rng.standard_normal((heads, L, Ev)).astype(np.float32)
    mask = None
    if masking == "bool":
        mask = rng.random((L, S)) < 0.7
    elif masking == "float":
        mask = rng.standard_normal((1, L, S)).astype(np.float32)
    options = dict(is_causal=causal, causal_alignment=alignment, scale=scale)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True,
                                                     device="npu", **options)
    grads = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse, mask,
                                                           device="npu", **options)
    expected = reference.scaled_dot_product_attention_backward(grad_out, q, k, v, mask,
                                                               **options)
    for got, want in zip(grads, expected):
        assert np.isfinite(got).all()
        assert_grad_close(got, want, np.float32)
    harness.assert_no_leak(runtime)


def test_resident_inputs_give_resident_gradients(runtime, rng):
    q, k, v = (rng.standard_normal((1, 4, 6, 8)).astype(np.float16) for _ in range(3))
    grad_out = rng.standard_normal((1, 4, 6, 8)).astype(np.float16)
    with ascend.to_device(q) as qd, ascend.to_device(k[:, :2]) as kd, \
            ascend.to_device(v[:, :2]) as vd, ascend.to_device(grad_out) as gd:
        out, lse = fastattn.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                         enable_gqa=True, return_lse=True,
                                                         device="npu")
        grads = fastattn.scaled_dot_product_attention_backward(
            gd, qd, kd, vd, out, lse, is_causal=True, enable_gqa=True, device="npu")
        assert all(isinstance(g, ascend.DeviceArray) for g in grads)
        assert [g.shape for g in grads] == [(1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)]
        expected = reference.scaled_dot_product_attention_backward(
            grad_out, q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
        for got, want in zip(grads, expected):
            assert_grad_close(got.to_numpy(), want, np.float16)
            got.close()
        out.close()
        lse.close()
    harness.assert_no_leak(runtime)


def test_what_the_npu_does_not_do_raises(runtime, rng):
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    bias = rng.standard_normal((4, 4)).astype(np.float32)
    out, lse = fastattn.scaled_dot_product_attention(q, q, q, bias, return_lse=True)
    backward = fastattn.scaled_dot_product_attention_backward
    with pytest.raises(NotImplementedError, match="mask_grad=True with device='npu'"):
        backward(out, q, q, q, out, lse, bias, mask_grad=True, device="npu")
    with pytest.raises(ValueError, match="grad_out has shape"):
        backward(out[:, :3], q, q, q, out, lse, device="npu")
    with pytest.raises(ValueError, match="lse has shape"):
        backward(out, q, q, q, out, lse[:, :3], device="npu")
    with pytest.raises(TypeError, match="out has dtype float16"):
        backward(out, q, q, q, out.astype(np.float16), lse, device="npu")
    with pytest.raises(TypeError, match="float64"):
        backward(out, q.astype(np.float64), q, q, out, lse, device="npu")
    with ascend.to_device(q[None]) as x:
        with pytest.raises(TypeError, match="all NumPy arrays or all ascend.DeviceArray"):
            backward(out[None], x, x, x, out[None], lse[None], device="npu")
    harness.assert_no_leak(runtime)
