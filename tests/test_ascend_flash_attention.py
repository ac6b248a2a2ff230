"""ascend.flash_attention (aclnnFlashAttentionScore) against a float64 NumPy
reference, through the C test double; plus the operator's own contract
(status codes, executor single use, workspace) and leak checks."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import load_ascend_harness
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend
from ascend import _ops




harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
reference_attention, causal_keep = harness.reference_attention, harness.causal_keep


def make_qkv(rng, batch=2, heads=4, kv_heads=2, length=5, key_length=7, head_dim=16,
             value_dim=None, dtype=np.float32):
    value_dim = head_dim if value_dim is None else value_dim
    q = rng.standard_normal((batch, heads, length, head_dim))
    k = rng.standard_normal((batch, kv_heads, key_length, head_dim))
    v = rng.standard_normal((batch, kv_heads, key_length, value_dim))
    return tuple(x.astype(dtype) for x in (q, k, v))


def assert_close(actual, expected, dtype_name):
    rtol, atol = harness.TOLERANCE[dtype_name]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unmasked_gqa_matches_reference(runtime, rng, dtype):
    q, k, v = make_qkv(rng, dtype=dtype)
    out, lse = ascend.flash_attention(q, k, v, return_lse=True)
    expected, expected_lse = reference_attention(q, k, v)
    assert out.dtype == dtype and out.shape == (2, 4, 5, 16)
    assert_close(out, expected, np.dtype(dtype).name)
    assert lse.dtype == np.float32 and lse.shape == (2, 4, 5)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)
    harness.assert_no_leak(runtime)


def test_bfloat16_resident_inputs(runtime, rng):
    q, k, v = make_qkv(rng)
    arrays = [ascend.to_device(x, dtype="bfloat16") for x in (q, k, v)]
    out = ascend.flash_attention(*arrays)
    assert isinstance(out, ascend.DeviceArray) and str(out.dtype) == "bfloat16"
    rounded = [harness.bf16_round(x) for x in (q, k, v)]
    assert_close(out.to_numpy(), reference_attention(*rounded)[0], "bfloat16")
    for array in (*arrays, out):
        array.free()
    harness.assert_no_leak(runtime)


def test_value_head_dim_smaller_than_query_head_dim(runtime, rng):
    q, k, v = make_qkv(rng, head_dim=32, value_dim=8)
    out = ascend.flash_attention(q, k, v, scale=0.3)
    assert out.shape == (2, 4, 5, 8)
    assert_close(out, reference_attention(q, k, v, scale=0.3)[0], "float32")


def test_bool_mask_polarity_true_means_keep(runtime, rng):
    q, k, v = make_qkv(rng)
    keep = rng.random((2, 4, 5, 7)) < 0.6
    keep[..., 0] = True
    out = ascend.flash_attention(q, k, v, keep)
    assert_close(out, reference_attention(q, k, v, keep=keep)[0], "float32")
    # the inverse mask gives a different answer: polarity matters and is honoured
    inverse = ascend.flash_attention(q, k, v, ~keep)
    assert_close(inverse, reference_attention(q, k, v, keep=~keep)[0], "float32")
    assert not np.allclose(out, inverse)


def test_mask_is_sent_as_ascend_one_means_masked(runtime, rng):
    keep = rng.random((1, 1, 3, 4)) < 0.5
    keep[..., 0] = True
    plan = _ops._plan_mask(keep, False, "top_left", (1, 1, 3, 4), 1.0, "float32")
    assert plan.masked_out.dtype == np.bool_
    assert np.array_equal(plan.masked_out, ~keep[0, 0])  # [S, S] form, 1 = masked out
    assert plan.inner_precise == 2 and plan.sparse_mode == 0


@pytest.mark.parametrize("mask_shape", [(7,), (5, 7), (2, 1, 1, 7), (1, 4, 5, 7), (2, 4, 5, 7),
                                        (2, 1, 5, 7), (4, 1, 7)])
def test_mask_broadcast_shapes(runtime, rng, mask_shape):
    q, k, v = make_qkv(rng)
    keep = rng.random(mask_shape) < 0.7
    out = ascend.flash_attention(q, k, v, keep)
    full = np.broadcast_to(keep, (2, 4, 5, 7))
    assert_close(out, reference_attention(q, k, v, keep=full)[0], "float32")


def test_fully_masked_rows_give_zeros_and_minus_inf_lse(runtime, rng):
    q, k, v = make_qkv(rng)
    keep = np.ones((2, 4, 5, 7), bool)
    keep[0, 1, 2] = False
    keep[1, :, 4] = False
    out, lse = ascend.flash_attention(q, k, v, keep, return_lse=True)
    assert np.all(out[0, 1, 2] == 0) and np.all(out[1, :, 4] == 0)
    assert np.isneginf(lse[0, 1, 2]) and np.isneginf(lse[1, :, 4]).all()
    expected, expected_lse = reference_attention(q, k, v, keep=keep)
    assert_close(out, expected, "float32")
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_additive_float_mask_maps_to_real_shift(runtime, rng, dtype):
    q, k, v = make_qkv(rng, dtype=dtype)
    bias = rng.standard_normal((1, 4, 5, 7))
    bias[0, 0, 0, 3:] = -np.inf  # -inf entries become masked-out bits
    out, lse = ascend.flash_attention(q, k, v, bias.astype(dtype), scale=0.5, return_lse=True)
    expected, expected_lse = reference_attention(q, k, v, bias=bias.astype(dtype), scale=0.5)
    assert_close(out, expected, np.dtype(dtype).name)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-2 if dtype == np.float16 else 1e-5,
                               atol=1e-2 if dtype == np.float16 else 1e-5)


def test_additive_key_padding_mask(runtime, rng):
    q, k, v = make_qkv(rng)
    bias = np.where(np.arange(7) < 5, 0.0, -np.inf)[None, None, None, :]
    out = ascend.flash_attention(q, k, v, np.broadcast_to(bias, (2, 1, 1, 7)))
    assert_close(out, reference_attention(q, k, v, bias=np.broadcast_to(bias, (2, 4, 5, 7)))[0],
                 "float32")


@pytest.mark.parametrize("length,key_length", [(5, 5), (4, 9), (9, 4)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_causal_sparse_modes(runtime, rng, length, key_length, alignment):
    q, k, v = make_qkv(rng, length=length, key_length=key_length)
    out, lse = ascend.flash_attention(q, k, v, is_causal=True, causal_alignment=alignment,
                                      return_lse=True)
    keep = causal_keep(length, key_length, bottom_right=alignment == "bottom_right")
    expected, expected_lse = reference_attention(q, k, v, keep=keep)
    assert_close(out, expected, "float32")
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)
    plan = _ops._plan_mask(None, True, alignment, q.shape[:3] + (key_length,), 1.0, "float32")
    assert plan.sparse_mode == (2 if alignment == "top_left" else 3) and plan.compressed
    harness.assert_no_leak(runtime)


def test_top_left_and_bottom_right_differ_when_lengths_differ(runtime, rng):
    q, k, v = make_qkv(rng, length=3, key_length=6)
    top = ascend.flash_attention(q, k, v, is_causal=True)
    bottom = ascend.flash_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert not np.allclose(top, bottom)
    np.testing.assert_allclose(top[:, :, 0], v.repeat(2, axis=1)[:, :, 0], rtol=1e-5, atol=1e-6)


def test_causal_combined_with_mask(runtime, rng):
    q, k, v = make_qkv(rng, length=6, key_length=6)
    keep = rng.random((2, 1, 6, 6)) < 0.7
    out = ascend.flash_attention(q, k, v, keep, is_causal=True, causal_alignment="bottom_right")
    expected = reference_attention(q, k, v, keep=keep & causal_keep(6, 6, True))[0]
    assert_close(out, expected, "float32")


def test_resident_inputs_give_resident_outputs(runtime, rng):
    q, k, v = make_qkv(rng)
    arrays = [ascend.to_device(x) for x in (q, k, v)]
    out, lse = ascend.flash_attention(*arrays, is_causal=True, return_lse=True)
    assert isinstance(out, ascend.DeviceArray) and isinstance(lse, ascend.DeviceArray)
    expected, expected_lse = reference_attention(q, k, v, keep=causal_keep(5, 7, False))
    assert_close(out.to_numpy(), expected, "float32")
    np.testing.assert_allclose(lse.to_numpy(), expected_lse, rtol=1e-5, atol=1e-5)
    # mixing a NumPy input with DeviceArrays uploads it for the call
    mixed = ascend.flash_attention(arrays[0], k, arrays[2])
    assert isinstance(mixed, ascend.DeviceArray)
    assert_close(mixed.to_numpy(), reference_attention(q, k, v)[0], "float32")
    for array in (*arrays, out, lse, mixed):
        array.free()
    harness.assert_no_leak(runtime)


def test_repeated_calls_reuse_pool_and_descriptors(runtime, rng):
    q, k, v = (ascend.to_device(x) for x in make_qkv(rng))
    ascend.flash_attention(q, k, v).free()
    before = harness.mem_stats(runtime)
    tensors_before = harness.object_stats(runtime)["tensors"]
    for _ in range(20):
        ascend.flash_attention(q, k, v).free()
    after = harness.mem_stats(runtime)
    assert after["allocs"] == before["allocs"]  # no aclrtMalloc in steady state
    assert harness.object_stats(runtime)["tensors"] == tensors_before
    for array in (q, k, v):
        array.free()
    harness.assert_no_leak(runtime)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 3),
       length=st.integers(1, 9), key_length=st.integers(1, 9), head_dim=st.integers(1, 24),
       causal=st.sampled_from([None, "top_left", "bottom_right"]), masked=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_random_shapes(runtime, batch, kv_heads, group, length, key_length, head_dim, causal,
                       masked, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, batch, kv_heads * group, kv_heads, length, key_length, head_dim)
    keep = rng.random((batch, 1, length, key_length)) < 0.8 if masked else None
    out, lse = ascend.flash_attention(q, k, v, keep, is_causal=causal is not None,
                                      causal_alignment=causal or "top_left", return_lse=True)
    full_keep = np.ones((length, key_length), bool) if keep is None else keep
    if causal is not None:
        full_keep = full_keep & causal_keep(length, key_length, causal == "bottom_right")
    expected, expected_lse = reference_attention(q, k, v, keep=full_keep)
    assert_close(out, expected, "float32")
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# bad input: clear Python exceptions before anything reaches the device
# ---------------------------------------------------------------------------

def _good(rng):
    return make_qkv(rng, batch=1, heads=2, kv_heads=1, length=3, key_length=4, head_dim=8)


@pytest.mark.parametrize("change,error,match", [
    (lambda q, k, v: (q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)),
     TypeError, "float64"),
    (lambda q, k, v: (q, k.astype(np.float16), v), TypeError, "one dtype"),
    (lambda q, k, v: (q.astype(np.int32), k.astype(np.int32), v.astype(np.int32)),
     TypeError, "supports dtypes"),
    (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
    (lambda q, k, v: (q, k[:, :, :3], v), ValueError, "inconsistent"),
    (lambda q, k, v: (q[:, :1].repeat(3, 1), k.repeat(2, 1), v.repeat(2, 1)), ValueError,
     "multiple of key/value heads"),
    (lambda q, k, v: (q.repeat(129, 1), k.repeat(258, 1), v.repeat(258, 1)), ValueError,
     "at most 256 heads"),
    (lambda q, k, v: (np.zeros((1, 2, 3, 800), np.float32), np.zeros((1, 1, 4, 800), np.float32),
                      np.zeros((1, 1, 4, 800), np.float32)), ValueError, "E <= 768"),
    (lambda q, k, v: (q, k, np.concatenate([v, v], axis=-1)), ValueError, "Ev <= E"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "empty"),
])
def test_bad_tensors(runtime, rng, change, error, match):
    q, k, v = change(*_good(rng))
    with pytest.raises(error, match=match):
        ascend.flash_attention(q, k, v)
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(attn_mask=np.ones((3, 5), bool)), ValueError, "does not broadcast"),
    (dict(attn_mask=np.ones((2, 2, 2, 3, 4), bool)), ValueError, "does not broadcast"),
    (dict(attn_mask=np.ones((3, 4), np.int32)), TypeError, "bool .True = keep. or floating"),
    (dict(attn_mask=np.full((3, 4), np.nan)), ValueError, "NaN"),
    (dict(attn_mask=np.full((3, 4), np.inf)), ValueError, r"\+inf"),
    (dict(is_causal=True, causal_alignment="upper_left"), ValueError, "causal_alignment"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(device=5), ValueError, "does not exist"),
    (dict(device="gpu"), ValueError, "'npu' or 'npu:N'"),
])
def test_bad_arguments(runtime, rng, kwargs, error, match):
    with pytest.raises(error, match=match):
        ascend.flash_attention(*_good(rng), **kwargs)
    harness.assert_no_leak(runtime)


def test_device_array_mask_is_rejected(runtime, rng):
    with ascend.to_device(np.ones((3, 4), bool)) as mask:
        with pytest.raises(TypeError, match="NumPy array"):
            ascend.flash_attention(*_good(rng), mask)
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# failures inside the call: named errors, nothing leaks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("function,code", [
    ("aclnnFlashAttentionScoreGetWorkspaceSize", 561002),
    ("aclnnFlashAttentionScore", 507015),
    ("aclrtSynchronizeStream", 507014),
    ("aclrtMemcpy", 100000),
])
def test_failing_call_raises_and_leaks_nothing(runtime, rng, function, code):
    q, k, v = _good(rng)
    harness.fail_next(runtime, function, code)
    with pytest.raises(ascend.AscendError) as info:
        ascend.flash_attention(q, k, v, np.ones((3, 4), bool) & (np.arange(4) < 3),
                               return_lse=True)
    assert (info.value.code, info.value.name) == (code, function)
    assert "injected" in info.value.message
    harness.assert_no_leak(runtime)


def test_workspace_allocation_failure_destroys_the_executor(runtime, rng):
    q, k, v = (ascend.to_device(x) for x in _good(rng))
    ascend.flash_attention(q, k, v).free()  # every buffer of this shape is now pooled
    workspace_capacity = -(-(4096 + 4 * 8) // 512) * 512
    idle = runtime._idle[(0, workspace_capacity)]
    runtime._free(idle.pop())  # only the workspace will miss the pool
    runtime._idle_bytes[0] -= workspace_capacity
    harness.fail_next(runtime, "aclrtMalloc", 207001)
    with pytest.raises(ascend.AscendError, match="aclrtMalloc"):
        ascend.flash_attention(q, k, v)
    assert harness.object_stats(runtime)["executors"] == 0
    for array in (q, k, v):
        array.free()
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# the operator contract of the test double, called directly
# ---------------------------------------------------------------------------

class DirectCall:
    """Phase-1 arguments of aclnnFlashAttentionScore built by hand."""

    def __init__(self, runtime, length=3, key_length=4, head_dim=8):
        from ascend._meta import DescriptorScope
        self.runtime = runtime
        self.buffers = []
        self.scope = DescriptorScope(runtime.lib)
        shapes = [(1, 1, length, head_dim), (1, 1, key_length, head_dim),
                  (1, 1, key_length, head_dim), (1, 1, length, 8), (1, 1, length, 8),
                  (1, 1, length, head_dim)]
        self.tensors = []
        for shape in shapes:
            buffer = runtime.allocate(0, 4 * int(np.prod(shape)))
            runtime.upload(buffer, np.ones(shape, np.float32))
            self.buffers.append(buffer)
            self.tensors.append(self.scope.tensor(buffer.ptr, shape, 0))

    def arguments(self, **overrides):
        q, k, v, smax, ssum, out = self.tensors
        args = dict(query=q, key=k, value=v, pse=None, drop=None, padding=None, mask=None,
                    prefix=None, scale=1.0, keep_prob=1.0, pre=2147483647, next=2147483647,
                    heads=1, layout=b"BNSD", inner=0, sparse=0, smax=smax, ssum=ssum,
                    softmax_out=None, out=out)
        args.update(overrides)
        return list(args.values())

    def phase1(self, **overrides):
        return harness.phase1(self.runtime, "aclnnFlashAttentionScore",
                              self.arguments(**overrides))

    def close(self):
        self.scope.close()
        for buffer in self.buffers:
            self.runtime._free(buffer)


@pytest.fixture
def direct(runtime):
    call = DirectCall(runtime)
    yield call
    call.close()
    harness.assert_no_leak(runtime)


_message = harness.error_message


@pytest.mark.parametrize("argument", ["query", "key", "value", "layout", "smax", "ssum", "out"])
def test_null_required_argument_is_161001(direct, argument):
    status, _, _ = direct.phase1(**{argument: None})
    assert status == 161001
    assert "must not be NULL" in _message(direct.runtime)


@pytest.mark.parametrize("overrides,text", [
    (dict(layout=b"NSBD"), "inputLayout"),
    (dict(heads=2), "headNum"),
    (dict(keep_prob=0.0), "keepProb"),
    (dict(sparse=9), "sparseMode"),
    (dict(inner=3), "innerPrecise"),
])
def test_invalid_parameter_is_161002(direct, overrides, text):
    status, _, _ = direct.phase1(**overrides)
    assert status == 161002 and text in _message(direct.runtime)


def test_executor_runs_once_and_needs_its_workspace(direct):
    runtime = direct.runtime
    operator = runtime.lib.operator("aclnnFlashAttentionScore")
    stream = runtime.activate(0)
    status, size, executor = direct.phase1()
    assert status == 0 and size >= 4096
    assert operator.launch(None, 0, executor, stream) == 161002  # workspace missing
    assert "workspace" in _message(runtime)
    status, size, executor = direct.phase1()
    workspace = runtime.allocate(0, size)
    assert operator.launch(workspace.ptr, size, executor, stream) == 0
    assert operator.launch(workspace.ptr, size, executor, stream) == 161002  # spent
    assert "executor is not live" in _message(runtime)
    runtime._free(workspace)


def test_sparse_causal_modes_need_the_compressed_mask(direct):
    runtime = direct.runtime
    operator = runtime.lib.operator("aclnnFlashAttentionScore")
    wrong = np.tril(np.ones((2048, 2048), bool))  # the SDPA polarity: rejected at launch
    buffer = runtime.allocate(0, wrong.nbytes)
    runtime.upload(buffer, wrong)
    mask = direct.scope.tensor(buffer.ptr, (2048, 2048), 12)
    status, size, executor = direct.phase1(mask=mask, sparse=2)
    assert status == 0
    workspace = runtime.allocate(0, size)
    assert operator.launch(workspace.ptr, size, executor, runtime.activate(0)) == 161002
    assert "compressed mask" in _message(runtime)
    small = direct.scope.tensor(buffer.ptr, (4, 4), 12)
    assert direct.phase1(mask=small, sparse=3)[0] == 161002
    runtime._free(workspace)
    runtime._free(buffer)


def test_freed_memory_is_refused_at_launch(direct):
    runtime = direct.runtime
    operator = runtime.lib.operator("aclnnFlashAttentionScore")
    status, size, executor = direct.phase1()
    runtime._free(direct.buffers.pop(0))  # the query's memory
    workspace = runtime.allocate(0, size)
    assert operator.launch(workspace.ptr, size, executor, runtime.activate(0)) == 361001
    assert "outside device memory" in _message(runtime)
    runtime._free(workspace)


def test_dense_call_overhead_stays_small(runtime):
    """Regression guard for the cached path (target < 100 us; loose bound for busy CI)."""
    spec = importlib.util.spec_from_file_location(
        "ascend_sim_measure", Path(__file__).parent / "ascend_sim" / "measure_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.measure(calls=300, repeats=3)
    assert result["overhead_us"] < 250, result
    harness.assert_no_leak(runtime)
