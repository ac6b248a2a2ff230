"""bfloat16 (``fastattn.bfloat16``, ml_dtypes') and mixed half dtypes on device="npu".

Through fastattn -> ascend -> the C test double, which records what the last launch
received and produced (``harness.last_launch``): bfloat16 must reach the operators as
aclDataType 27 tensors, and their output must come back bit for bit. Results are
checked against ``fastattn.reference`` (float64) on the same bfloat16-rounded inputs.
"""
import ml_dtypes
import numpy as np
import pytest

import ascend
import fastattn
from fastattn import reference
from helpers import load_ascend_harness

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
sdpa = fastattn.scaled_dot_product_attention
bf16 = fastattn.bfloat16
ACL_FLOAT, ACL_FLOAT16, ACL_BF16 = 0, 1, 27
ACL_CODES = {np.dtype(np.float32): ACL_FLOAT, np.dtype(np.float16): ACL_FLOAT16,
             np.dtype(bf16): ACL_BF16}
# error <= TOL * max|reference| (bfloat16 keeps 8 significant bits)
TOL = 1e-2


def make(rng, shape, dtype=bf16):
    return rng.standard_normal(shape).astype(dtype)


def assert_near_reference(out, expected):
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(out, np.float64)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max(initial=0.0))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= TOL * max(scale, 1e-30), f"max error {err:.3g}, max |out| {scale:.3g}"


def assert_operator_saw(runtime, operator, code, result, pse=None):
    """The last launch was ``operator`` on ``code`` tensors and ``result`` holds its
    output bit for bit."""
    last = harness.last_launch(runtime)
    assert last["operator"] == operator
    for name in ("query", "key", "value", "out"):
        assert last["dtypes"][name] == code, last["dtypes"]
    if pse is not None:
        assert last["dtypes"]["pse"] == pse
    host = result.to_numpy() if isinstance(result, ascend.DeviceArray) else result
    stored = np.ascontiguousarray(host).view(last["out"].dtype).reshape(-1)
    np.testing.assert_array_equal(stored, last["out"].reshape(-1))   # bit-exact, NaNs too


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def test_bfloat16_is_ml_dtypes():
    assert fastattn.bfloat16 is ml_dtypes.bfloat16
    assert "bfloat16" in fastattn.__all__


# ---------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal,alignment", [(False, "top_left"), (True, "top_left"),
                                              (True, "bottom_right")])
@pytest.mark.parametrize("L,S", [(7, 7), (5, 12), (12, 5)])
def test_sdpa_bfloat16_numpy(runtime, rng, causal, alignment, L, S):
    q, k, v = make(rng, (2, 3, L, 16)), make(rng, (2, 3, S, 16)), make(rng, (2, 3, S, 8))
    kw = dict(is_causal=causal, causal_alignment=alignment)
    out, lse = sdpa(q, k, v, device="npu", return_lse=True, **kw)
    assert isinstance(out, np.ndarray) and out.dtype == bf16 and out.shape == (2, 3, L, 8)
    assert lse.dtype == np.float32 and lse.shape == (2, 3, L)
    assert_operator_saw(runtime, "aclnnFlashAttentionScore", ACL_BF16, out)
    expected, expected_lse = reference.scaled_dot_product_attention(*f64(q, k, v), **kw,
                                                                    return_lse=True)
    assert_near_reference(out, expected)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=1e-5, atol=1e-5)


def test_sdpa_bfloat16_batch_shapes_gqa_and_out(runtime, rng):
    q, k, v = make(rng, (6, 16)), make(rng, (4, 16)), make(rng, (4, 16))     # no batch axes
    out = sdpa(q, k, v, device="npu")
    assert out.dtype == bf16 and out.shape == (6, 16)
    assert_near_reference(out, reference.scaled_dot_product_attention(*f64(q, k, v)))
    q, k, v = make(rng, (2, 8, 5, 16)), make(rng, (2, 2, 7, 16)), make(rng, (2, 2, 7, 16))
    out = sdpa(q, k, v, enable_gqa=True, device="npu")
    assert_operator_saw(runtime, "aclnnFlashAttentionScore", ACL_BF16, out)
    assert_near_reference(out, reference.scaled_dot_product_attention(*f64(q, k, v),
                                                                      enable_gqa=True))
    buf = np.empty((2, 8, 5, 16), bf16)
    assert sdpa(q, k, v, enable_gqa=True, out=buf, device="npu") is buf
    np.testing.assert_array_equal(buf.view(np.uint16), out.view(np.uint16))
    with pytest.raises(TypeError, match="the result has dtype bfloat16"):
        sdpa(q, k, v, enable_gqa=True, out=np.empty((2, 8, 5, 16), np.float32), device="npu")


@pytest.mark.parametrize("kind", ["bool", np.float32, np.float16, "bfloat16"])
def test_sdpa_bfloat16_masks(runtime, rng, kind):
    q, k, v = make(rng, (2, 3, 6, 8)), make(rng, (2, 3, 9, 8)), make(rng, (2, 3, 9, 8))
    keep = rng.random((2, 1, 6, 9)) > 0.3
    keep[..., 0, :] = False                                  # a fully masked row: zeros
    if kind == "bool":
        mask, pse = keep, None
    else:
        dtype = bf16 if kind == "bfloat16" else kind
        mask = np.where(keep, rng.standard_normal(keep.shape), -np.inf).astype(dtype)
        pse = ACL_BF16                                       # the bias in the query's dtype
    out = sdpa(q, k, v, mask, device="npu")
    assert out.dtype == bf16
    assert_operator_saw(runtime, "aclnnFlashAttentionScore", ACL_BF16, out, pse=pse)
    expected = reference.scaled_dot_product_attention(
        *f64(q, k, v), keep if kind == "bool" else np.asarray(mask, np.float64))
    assert_near_reference(out, expected)
    assert np.all(np.asarray(out[..., 0, :], np.float32) == 0)


def test_bfloat16_device_arrays_stay_bfloat16(runtime, rng):
    q, k, v = make(rng, (1, 4, 8, 16)), make(rng, (1, 2, 8, 16)), make(rng, (1, 2, 8, 16))
    with ascend.to_device(q) as dq, ascend.to_device(k) as dk, ascend.to_device(v) as dv:
        assert dq.dtype == bf16
        out, lse = sdpa(dq, dk, dv, is_causal=True, enable_gqa=True, return_lse=True,
                        device="npu")
        assert isinstance(out, ascend.DeviceArray) and out.dtype == bf16
        assert isinstance(lse, ascend.DeviceArray) and lse.dtype == np.float32
        assert_operator_saw(runtime, "aclnnFlashAttentionScore", ACL_BF16, out)
        host = out.to_numpy()
        assert host.dtype == bf16
        assert_near_reference(host, reference.scaled_dot_product_attention(
            *f64(q, k, v), is_causal=True, enable_gqa=True))
        # the same inputs from the host give the same bits
        np.testing.assert_array_equal(
            sdpa(q, k, v, is_causal=True, enable_gqa=True, device="npu").view(np.uint16),
            host.view(np.uint16))
        out.free()
        lse.free()
        with ascend.to_device(k.astype(np.float16)) as dk16:
            with pytest.raises(TypeError, match="DeviceArray operands need one dtype"):
                sdpa(dq, dk16, dv, device="npu")
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("dtypes,expected", [
    ((bf16, bf16, bf16), bf16),
    ((bf16, np.float32, bf16), np.float32),
    ((np.float32, bf16, bf16), np.float32),
    ((np.float16, bf16, bf16), np.float32),
    ((bf16, np.float16, np.float16), np.float32),
    ((np.float16, np.float16, np.float16), np.float16),
    ((np.float16, np.float32, np.float16), np.float32),
])
def test_mixed_dtypes_promote_like_numpy(runtime, rng, dtypes, expected):
    q, k, v = (make(rng, (2, 2, 5, 8), d) for d in dtypes)
    assert np.result_type(q, k, v) == expected             # NumPy/ml_dtypes' own rule
    out, lse = sdpa(q, k, v, device="npu", return_lse=True)
    assert out.dtype == expected and lse.dtype == np.float32
    assert_operator_saw(runtime, "aclnnFlashAttentionScore", ACL_CODES[np.dtype(expected)],
                        out)
    expected_out = reference.scaled_dot_product_attention(*f64(q, k, v))
    assert_near_reference(out, expected_out)


def test_wrong_shape_raises_the_same_value_error(runtime, rng):
    def message(dtype, device, **kw):
        q, k, v = make(rng, (2, 3, 5, 8), dtype), make(rng, (2, 3, 6, 4), dtype), \
            make(rng, (2, 3, 6, 8), dtype)
        with pytest.raises(ValueError) as info:
            sdpa(q, k, v, device=device, **kw)
        return str(info.value)
    assert message(bf16, "npu") == message(np.float32, "npu") == message(np.float32, "cpu")

    def broadcast_message(dtype):
        q, k = make(rng, (2, 3, 5, 8), dtype), make(rng, (4, 3, 6, 8), dtype)
        with pytest.raises(ValueError) as info:
            sdpa(q, k, k, device="npu")
        return str(info.value)
    assert broadcast_message(bf16) == broadcast_message(np.float32)


@pytest.mark.parametrize("bad", [np.complex64, object, np.int32, np.bool_, np.float64])
def test_unsupported_dtypes_name_the_supported_ones(runtime, rng, bad):
    q = make(rng, (1, 2, 4, 8))
    launches = harness.launch_count(runtime)
    with pytest.raises(TypeError, match=r"query must be float16, bfloat16 or float32 with "
                                        r"device='npu', got dtype"):
        sdpa(q.astype(np.float32).astype(bad), q, q, device="npu")
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        sdpa(q, q, q, np.ones((4, 4), np.int8), device="npu")
    assert harness.launch_count(runtime) == launches


# ---------------------------------------------------------------------------
# paged attention and PagedKVCache(device="npu")
# ---------------------------------------------------------------------------

def paged_inputs(rng, dtype=bf16, tokens=1):
    key_blocks, value_blocks = make(rng, (6, 2, 16, 8), dtype), make(rng, (6, 2, 16, 8), dtype)
    table = np.array([[5, 0, 2], [1, 3, 0]], np.int32)
    lens = np.array([40, 17])
    q = make(rng, (2, 4, tokens, 8), dtype)
    return q, key_blocks, value_blocks, table, lens


@pytest.mark.parametrize("tokens", [1, 3])
def test_paged_attention_bfloat16_numpy(runtime, rng, tokens):
    q, kb, vb, table, lens = paged_inputs(rng, tokens=tokens)
    out = fastattn.paged_attention(q, kb, vb, table, lens, device="npu")
    assert isinstance(out, np.ndarray) and out.dtype == bf16 and out.shape == q.shape
    last = harness.last_launch(runtime)
    assert last["operator"] == "aclnnIncreFlashAttentionV4"
    assert all(last["dtypes"][n] == ACL_BF16 for n in ("query", "key", "value", "out"))
    if tokens == 1:
        assert_operator_saw(runtime, "aclnnIncreFlashAttentionV4", ACL_BF16, out)
    assert_near_reference(out, reference.paged_attention(*f64(q, kb, vb), table, lens))


def test_paged_cache_bfloat16_on_the_device(runtime, rng):
    with fastattn.PagedKVCache(8, 16, 2, 8, dtype=fastattn.bfloat16, device="npu") as cache:
        assert cache.key_blocks.dtype == bf16
        seqs = [cache.add_sequence() for _ in range(2)]
        kv = {}
        for s, n in zip(seqs, (20, 5)):
            kv[s] = make(rng, (2, n, 8)), make(rng, (2, n, 8))   # bfloat16 host keys/values
            cache.append(s, *kv[s])
        fork = cache.fork(seqs[1])
        extra = make(rng, (2, 1, 8), np.float32), make(rng, (2, 1, 8), np.float32)
        cache.append(fork, *extra)                                 # float32: rounded
        seqs.append(fork)
        kv[fork] = tuple(np.concatenate([a, b.astype(bf16)], axis=1)
                         for a, b in zip(kv[seqs[1]], extra))
        # the pools hold the appended bits
        table, lens = cache.block_table(seqs)
        keys = cache.key_blocks.to_numpy()
        assert keys.dtype == bf16
        for s in seqs:
            gathered = reference.gather_blocks(keys, table[seqs.index(s)], cache.length(s))
            np.testing.assert_array_equal(np.asarray(gathered).view(np.uint16),
                                          kv[s][0].view(np.uint16))

        q = make(rng, (3, 4, 1, 8))
        out = cache.attention(q, seqs)
        assert isinstance(out, np.ndarray) and out.dtype == bf16
        assert_operator_saw(runtime, "aclnnIncreFlashAttentionV4", ACL_BF16, out)
        expected = reference.paged_attention(*f64(q, cache.key_blocks.to_numpy(),
                                                  cache.value_blocks.to_numpy()), table, lens)
        assert_near_reference(out, expected)
        with ascend.to_device(q) as q_device:
            resident = cache.attention(q_device, seqs)
            assert isinstance(resident, ascend.DeviceArray) and resident.dtype == bf16
            assert_operator_saw(runtime, "aclnnIncreFlashAttentionV4", ACL_BF16, resident)
            np.testing.assert_array_equal(resident.to_numpy().view(np.uint16),
                                          out.view(np.uint16))
            resident.free()
        # a query of another dtype promotes to float32, which the operator does not take
        launches = harness.launch_count(runtime)
        for other in (np.float16, np.float32):
            with pytest.raises(TypeError, match="float16 or bfloat16"):
                cache.attention(q.astype(other), seqs)
        assert harness.launch_count(runtime) == launches
    harness.assert_no_leak(runtime)


def test_paged_wrong_shape_and_bad_dtypes(runtime, rng):
    q, kb, vb, table, lens = paged_inputs(rng)

    def message(dtype, device):
        with pytest.raises(ValueError) as info:
            fastattn.paged_attention(q[..., :4].astype(dtype), kb.astype(dtype),
                                     vb.astype(dtype), table, lens, device=device)
        return str(info.value)
    assert message(bf16, "npu") == message(np.float16, "npu") == message(np.float32, "cpu")
    launches = harness.launch_count(runtime)
    for bad in (np.complex64, object):
        with pytest.raises(TypeError, match=r"query must be float16 or bfloat16 with "
                                            r"device='npu' for paged attention"):
            fastattn.paged_attention(q.astype(np.float32).astype(bad), kb, vb, table, lens,
                                     device="npu")
    with pytest.raises(TypeError, match="promote to float32"):
        fastattn.paged_attention(q.astype(np.float16), kb, vb, table, lens, device="npu")
    assert harness.launch_count(runtime) == launches
