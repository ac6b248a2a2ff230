"""ascend.flash_attention_backward (aclnnFlashAttentionScoreGrad) against a float64 NumPy
backward, through the C test double; and the operator's documented contract in the
double (ops-transformer ``attention/flash_attention_score_grad/docs/
aclnnFlashAttentionScoreGrad.md``): arguments, status codes, how the softmax statistics
are used, the forward's masks and sparse modes."""
import ml_dtypes
import numpy as np
import pytest
from helpers import load_ascend_harness
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend
from ascend import _grad, _ops
from ascend._meta import DescriptorScope

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
reference_backward = harness.reference_attention_backward

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
RTOL = {"float32": 2e-4, "float16": 4e-3, "bfloat16": 3e-2}   # of max |reference|


@pytest.fixture
def rng():
    return np.random.default_rng(1515)


def make(rng, shape, dtype):
    return rng.standard_normal(shape).astype(DTYPES[dtype])


def assert_close(actual, expected, dtype):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    bound = RTOL[dtype] * max(float(np.abs(expected).max(initial=0.0)), 1.0)
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= bound, f"max error {error:.3g} > {bound:.3g}"


def check(rng, dtype="float32", batch=2, heads=4, kv_heads=2, length=5, key_length=7,
          head_dim=16, value_dim=None, mask=None, is_causal=False, alignment="top_left",
          scale=None):
    """Forward on the NPU, backward on the NPU, against the float64 backward."""
    value_dim = head_dim if value_dim is None else value_dim
    q = make(rng, (batch, heads, length, head_dim), dtype)
    k = make(rng, (batch, kv_heads, key_length, head_dim), dtype)
    v = make(rng, (batch, kv_heads, key_length, value_dim), dtype)
    out, lse = ascend.flash_attention(q, k, v, mask, is_causal=is_causal,
                                      causal_alignment=alignment, scale=scale, return_lse=True)
    grad_out = make(rng, out.shape, dtype)
    grads = ascend.flash_attention_backward(grad_out, q, k, v, out, lse, mask,
                                            is_causal=is_causal, causal_alignment=alignment,
                                            scale=scale)
    keep, bias = None, None
    if mask is not None and mask.dtype == np.bool_:
        keep = mask
    elif mask is not None:
        keep, bias = ~np.isneginf(mask), np.where(np.isneginf(mask), 0.0, mask)
    if is_causal:
        causal = harness.causal_keep(length, key_length, alignment == "bottom_right")
        keep = causal if keep is None else keep & causal
    expected = reference_backward(grad_out, q, k, v, keep=keep, bias=bias, scale=scale)
    for got, want, x in zip(grads, expected, (q, k, v)):
        assert got.dtype == x.dtype and got.shape == x.shape
        assert np.isfinite(np.asarray(got, np.float64)).all()
        assert_close(got, want, dtype)
    return grads


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gqa_matches_the_float64_backward(runtime, rng, dtype):
    check(rng, dtype)
    harness.assert_no_leak(runtime)


def test_value_dim_smaller_and_explicit_scale(runtime, rng):
    check(rng, head_dim=24, value_dim=8, scale=0.3)
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("length,key_length", [(6, 6), (4, 9), (9, 4)])
def test_causal_both_alignments(runtime, rng, alignment, length, key_length):
    # bottom-right with L > S has rows without a key: zero gradients (innerPrecise 2)
    grads = check(rng, "float16", length=length, key_length=key_length, is_causal=True,
                  alignment=alignment)
    if alignment == "bottom_right" and length > key_length:
        assert not np.asarray(grads[0], np.float64)[:, :, :length - key_length].any()
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("shape", [(5, 7), (2, 1, 5, 7), (2, 4, 5, 7)])
def test_bool_masks_with_fully_masked_rows(runtime, rng, shape):
    mask = rng.random(shape) < 0.6
    mask[..., 1, :] = False                                  # no key for query 1
    grads = check(rng, "bfloat16", mask=mask)
    assert not np.asarray(grads[0], np.float64)[:, :, 1].any()
    harness.assert_no_leak(runtime)


def test_additive_mask_goes_to_pse_and_minus_inf_to_the_mask(runtime, rng):
    mask = rng.standard_normal((2, 4, 5, 7))
    mask[rng.random(mask.shape) < 0.3] = -np.inf
    check(rng, "float32", mask=mask.astype(np.float32), is_causal=True, alignment="bottom_right")
    launch = harness.last_launch(runtime)
    assert launch["operator"] == "aclnnFlashAttentionScoreGrad"
    assert launch["dtypes"]["pse"] == 0 and launch["dtypes"]["mask"] == 12
    harness.assert_no_leak(runtime)


@settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       length=st.integers(1, 9), key_length=st.integers(1, 9), head_dim=st.integers(1, 12),
       value_cut=st.integers(0, 4), masking=st.sampled_from(["none", "causal", "bool", "float"]),
       alignment=st.sampled_from(["top_left", "bottom_right"]),
       dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2 ** 32 - 1))
def test_random_shapes(runtime, batch, kv_heads, group, length, key_length, head_dim,
                       value_cut, masking, alignment, dtype, seed):
    rng = np.random.default_rng(seed)
    mask = None
    if masking == "bool":
        mask = rng.random((length, key_length)) < 0.7
    elif masking == "float":
        mask = rng.standard_normal((batch, 1, length, key_length)).astype(np.float32)
    check(rng, dtype, batch, kv_heads * group, kv_heads, length, key_length, head_dim,
          max(1, head_dim - value_cut), mask=mask, is_causal=masking == "causal",
          alignment=alignment)
    harness.assert_no_leak(runtime)


def test_lse_from_elsewhere_gives_the_same_gradients(runtime, rng):
    """The operator reads max and sum only through P = exp(S - max) / sum: the float64
    reference's lse (not the NPU forward's statistics) gives the same gradients."""
    q, k, v = (make(rng, (1, 2, 6, 8), "float32") for _ in range(3))
    out, lse = ascend.flash_attention(q, k, v, return_lse=True)
    _, lse64 = harness.reference_attention(q, k, v)
    grad_out = make(rng, out.shape, "float32")
    ours = ascend.flash_attention_backward(grad_out, q, k, v, out, lse)
    theirs = ascend.flash_attention_backward(grad_out, q, k, v, out, lse64)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    harness.assert_no_leak(runtime)


def test_resident_inputs_give_resident_gradients(runtime, rng):
    q, k, v = (make(rng, (1, 2, 4, 8), "bfloat16") for _ in range(3))
    with ascend.to_device(q) as qd, ascend.to_device(k) as kd, ascend.to_device(v) as vd:
        out, lse = ascend.flash_attention(qd, kd, vd, is_causal=True, return_lse=True)
        grad_out = make(rng, out.shape, "bfloat16")
        with ascend.to_device(grad_out) as dyd:
            grads = ascend.flash_attention_backward(dyd, qd, kd, vd, out, lse, is_causal=True)
        assert all(isinstance(g, ascend.DeviceArray) and g.dtype == ml_dtypes.bfloat16
                   for g in grads)
        host = [g.to_numpy() for g in grads]
        # bfloat16 results arrive bit for bit: dq as the operator stored it
        np.testing.assert_array_equal(host[0].view(np.uint16),
                                      harness.last_launch(runtime)["out"])
        expected = reference_backward(grad_out, q, k, v,
                                      keep=harness.causal_keep(4, 4, bottom_right=False))
        for got, want in zip(host, expected):
            assert_close(got, want, "bfloat16")
        for array in grads + (out, lse):
            array.close()
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# bad input: named errors before any device work
# ---------------------------------------------------------------------------

def _good(rng):
    q, k, v = (make(rng, (1, 2, 3, 8), "float16") for _ in range(3))
    out, lse = ascend.flash_attention(q, k, v, return_lse=True)
    return [np.ones_like(out), q, k, v, out, lse]


@pytest.mark.parametrize("index,change,error,match", [
    (0, lambda a: a[..., :4], ValueError, "grad_out has shape"),
    (4, lambda a: a[:, :1], ValueError, "out has shape"),
    (5, lambda a: a[..., :2], ValueError, "lse has shape"),
    (0, lambda a: a.astype(np.float32), TypeError, "one dtype"),
    (5, lambda a: a.astype(np.int32), TypeError, "lse must be floating"),
    (2, lambda a: a[:, :, :, :4], ValueError, "inconsistent shapes"),
    (1, lambda a: a.astype(np.float64), TypeError, "one dtype"),
])
def test_bad_inputs(runtime, rng, index, change, error, match):
    arguments = _good(rng)
    arguments[index] = change(arguments[index])
    launches = harness.launch_count(runtime)
    with pytest.raises(error, match=match):
        ascend.flash_attention_backward(*arguments)
    assert harness.launch_count(runtime) == launches
    harness.assert_no_leak(runtime)


def test_resident_lse_must_be_float32_and_masks_numpy(runtime, rng):
    arguments = _good(rng)
    with ascend.to_device(arguments[5].astype(np.float16)) as lse:
        with pytest.raises(TypeError, match="lse must be float32"):
            ascend.flash_attention_backward(*arguments[:5], lse)
    with ascend.to_device(np.ones((3, 3), bool)) as mask:
        with pytest.raises(TypeError, match="DeviceArray masks are not supported"):
            ascend.flash_attention_backward(*arguments, mask)
    harness.assert_no_leak(runtime)


def test_failing_launch_raises_and_leaks_nothing(runtime, rng):
    arguments = _good(rng)
    harness.fail_next(runtime, "aclnnFlashAttentionScoreGrad", 507015)
    with pytest.raises(ascend.AscendError) as info:
        ascend.flash_attention_backward(*arguments, is_causal=True)
    assert info.value.name == "aclnnFlashAttentionScoreGrad" and info.value.code == 507015
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# the operator's contract in the test double, called directly
# ---------------------------------------------------------------------------

class GradCall:
    """Phase-1 arguments of aclnnFlashAttentionScoreGrad built by hand (float32 BNSD)."""

    SHAPES = dict(query=(1, 2, 3, 16), key=(1, 1, 4, 16), value=(1, 1, 4, 16),
                  dy=(1, 2, 3, 16), smax=(1, 2, 3, 8), ssum=(1, 2, 3, 8),
                  attention_in=(1, 2, 3, 16), dq=(1, 2, 3, 16), dk=(1, 1, 4, 16),
                  dv=(1, 1, 4, 16))

    def __init__(self, rt, rng):
        self.runtime = rt
        self.scope = DescriptorScope(rt.lib)
        self.buffers, self.tensors, self.host = {}, {}, {}
        q, k, v = (rng.standard_normal(self.SHAPES[n]).astype(np.float32)
                   for n in ("query", "key", "value"))
        out, lse = ascend.flash_attention(q, k, v, return_lse=True)
        row_max, row_sum = _grad.softmax_statistics(lse)
        data = dict(query=q, key=k, value=v, dy=rng.standard_normal(out.shape).astype(
            np.float32), smax=row_max, ssum=row_sum, attention_in=out)
        for name, shape in self.SHAPES.items():
            host = data.get(name, np.zeros(shape, np.float32))
            self.host[name] = host
            self.buffers[name] = rt.allocate(0, host.nbytes)
            rt.upload(self.buffers[name], np.ascontiguousarray(host))
            self.tensors[name] = self.scope.tensor(self.buffers[name].ptr, shape, 0,
                                                   cacheable=False)

    def arguments(self, **overrides):
        t = self.tensors
        args = dict(query=t["query"], key=t["key"], value=t["value"], dy=t["dy"], pse=None,
                    drop=None, padding=None, mask=None, smax=t["smax"], ssum=t["ssum"],
                    softmax_in=None, attention_in=t["attention_in"], prefix=None, scale=0.25,
                    keep_prob=1.0, pre=_ops.UNLIMITED_TOKENS, next=_ops.UNLIMITED_TOKENS, heads=2,
                    layout=b"BNSD", inner=0, sparse=0, dq=t["dq"], dk=t["dk"], dv=t["dv"],
                    dpse=None)
        args.update(overrides)
        return list(args.values())

    def phase1(self, **overrides):
        return harness.phase1(self.runtime, "aclnnFlashAttentionScoreGrad",
                              self.arguments(**overrides))

    def run(self, **overrides):
        """Both phases; the three gradients as NumPy arrays."""
        status, size, executor = self.phase1(**overrides)
        assert status == 0, _message(self.runtime)
        assert harness.launch(self.runtime, "aclnnFlashAttentionScoreGrad", size,
                              executor) == 0, _message(self.runtime)
        grads = []
        for name in ("dq", "dk", "dv"):
            host = np.empty(self.SHAPES[name], np.float32)
            self.runtime.download(self.buffers[name], host)
            grads.append(host)
        return grads

    def close(self):
        self.scope.close()
        for buffer in self.buffers.values():
            self.runtime._free(buffer)


_message = harness.error_message


@pytest.fixture
def direct(runtime, rng):
    call = GradCall(runtime, rng)
    yield call
    call.close()
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("argument", ["query", "key", "value", "dy", "layout", "dq", "dk", "dv"])
def test_null_required_argument_is_161001(direct, argument):
    status, _, _ = direct.phase1(**{argument: None})
    assert status == 161001 and "must not be NULL" in _message(direct.runtime)


@pytest.mark.parametrize("overrides,text", [
    (dict(layout=b"NSBD"), "inputLayout"),
    (dict(heads=1), "headNum"),
    (dict(keep_prob=0.0), "keepProb"),
    (dict(sparse=7), "sparseMode 7 is invalid"),
    (dict(sparse=4), "not simulated"),
    (dict(inner=3), "innerPrecise"),
    (dict(smax=None), "softmaxMax, softmaxSum and attentionIn"),
    (dict(attention_in=None), "softmaxMax, softmaxSum and attentionIn"),
    (dict(dy="key"), "dy must be [B, N, Sq, Dv]"),
    (dict(smax="query"), "softmaxMax/softmaxSum must be FLOAT [B, N, Sq, 8]"),
    (dict(dk="dq"), "dqOut/dkOut/dvOut"),
])
def test_invalid_parameter_is_161002(direct, overrides, text):
    overrides = {k: direct.tensors[v] if isinstance(v, str) else v for k, v in overrides.items()}
    status, _, _ = direct.phase1(**overrides)
    assert status == 161002 and text in _message(direct.runtime)


def test_the_statistics_are_used_as_exp(direct):
    """P = exp(S - max) / sum: the forward's lse as max with sum 1, or (lse - 1, e): the
    same gradients; a wrong lse: different ones."""
    rt = direct.runtime
    reference = direct.run()
    lse = direct.host["smax"][..., 0]
    for row_max, row_sum in ((lse - 1.0, np.e), (lse + 2.0, np.exp(-2.0))):
        rt.upload(direct.buffers["smax"], np.ascontiguousarray(
            np.broadcast_to(row_max[..., None], direct.SHAPES["smax"]), np.float32))
        rt.upload(direct.buffers["ssum"], np.full(direct.SHAPES["ssum"], row_sum, np.float32))
        for got, want in zip(direct.run(), reference):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    rt.upload(direct.buffers["ssum"], np.full(direct.SHAPES["ssum"], 2.0, np.float32))
    assert not np.allclose(direct.run()[0], reference[0])


def test_sparse_modes_without_a_mask_compute_everything(direct):
    reference = direct.run()
    for mode in (1, 2, 3):
        for got, want in zip(direct.run(sparse=mode), reference):
            np.testing.assert_array_equal(got, want)


def test_executor_and_workspace(direct):
    rt = direct.runtime
    operator = rt.lib.operator("aclnnFlashAttentionScoreGrad")
    status, size, executor = direct.phase1()
    assert status == 0 and size > 0
    assert operator.launch(None, 0, executor, rt.activate(0)) == 161002   # no workspace
    assert "workspace" in _message(rt)
    assert harness.object_stats(rt)["executors"] == 0                      # spent
