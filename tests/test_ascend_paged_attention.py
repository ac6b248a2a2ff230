"""ascend.paged_attention (aclnnIncreFlashAttentionV4 with a block table)
against a float64 gather-then-attend reference, through the C test double."""


import numpy as np
import pytest
from helpers import load_ascend_harness
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend




harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime


def make_paged(rng, batch=3, heads=4, kv_heads=2, tokens=1, head_dim=16, block_size=16,
               max_blocks=4, num_blocks=None, seq_lens=None, dtype=np.float16):
    """A shuffled cache: sequence b owns max_blocks distinct physical blocks."""
    num_blocks = batch * max_blocks + 2 if num_blocks is None else num_blocks
    shape = (num_blocks, kv_heads, block_size, head_dim)
    key_blocks = rng.standard_normal(shape).astype(dtype)
    value_blocks = rng.standard_normal(shape).astype(dtype)
    block_table = rng.permutation(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks)
    block_table = block_table.astype(np.int32)
    if seq_lens is None:
        seq_lens = rng.integers(tokens, max_blocks * block_size + 1, size=batch)
    query = rng.standard_normal((batch, heads, tokens, head_dim)).astype(dtype)
    return query, key_blocks, value_blocks, block_table, np.asarray(seq_lens, np.int32)


def assert_close(actual, expected, name="float16"):
    rtol, atol = harness.TOLERANCE[name]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def test_decode_matches_reference(runtime, rng):
    inputs = make_paged(rng, seq_lens=[1, 37, 64])
    out = ascend.paged_attention(*inputs)
    assert out.shape == (3, 4, 1, 16) and out.dtype == np.float16
    assert_close(out, harness.reference_paged(*inputs))
    harness.assert_no_leak(runtime)


def test_bfloat16_resident_cache(runtime, rng):
    q, k, v, table, lens = make_paged(rng, dtype=np.float32)
    arrays = [ascend.to_device(x, dtype="bfloat16") for x in (q, k, v)]
    resident_table = ascend.to_device(table)
    out = ascend.paged_attention(*arrays, resident_table, lens, scale=0.2)
    assert isinstance(out, ascend.DeviceArray) and str(out.dtype) == "bfloat16"
    rounded = [harness.bf16_round(x) for x in (q, k, v)]
    expected = harness.reference_paged(*rounded, table, lens, scale=0.2)
    assert_close(out.to_numpy(), expected, "bfloat16")
    for array in (*arrays, resident_table, out):
        array.free()
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("causal", [True, False])
def test_several_query_tokens(runtime, rng, causal):
    inputs = make_paged(rng, tokens=3, seq_lens=[3, 20, 64])
    out = ascend.paged_attention(*inputs, causal=causal)
    assert out.shape == (3, 4, 3, 16)
    assert_close(out, harness.reference_paged(*inputs, causal=causal))
    resident_query = ascend.to_device(inputs[0])
    out_resident = ascend.paged_attention(resident_query, *inputs[1:], causal=causal)
    assert isinstance(out_resident, ascend.DeviceArray)
    np.testing.assert_array_equal(out_resident.to_numpy(), out)
    resident_query.free()
    out_resident.free()
    harness.assert_no_leak(runtime)


def test_empty_sequence_without_causal_gives_zeros(runtime, rng):
    inputs = make_paged(rng, seq_lens=[0, 5, 16])
    out = ascend.paged_attention(*inputs, causal=False)
    assert np.all(out[0] == 0)
    assert_close(out, harness.reference_paged(*inputs, causal=False))


def test_resident_cache_updated_in_place_then_decoded(runtime, rng):
    """The serving loop: cache stays on the NPU, new tokens are written into it."""
    q, k, v, table, lens = make_paged(rng, batch=2, seq_lens=[10, 30])
    key_cache, value_cache = ascend.to_device(k), ascend.to_device(v)
    for step in range(3):
        new_k = rng.standard_normal((2, 2, 16)).astype(np.float16)
        new_v = rng.standard_normal((2, 2, 16)).astype(np.float16)
        for b in range(2):  # append token lens[b] of sequence b
            block, slot = table[b, lens[b] // 16], lens[b] % 16
            key_cache[int(block), :, int(slot)] = new_k[b]
            value_cache[int(block), :, int(slot)] = new_v[b]
            k[block, :, slot], v[block, :, slot] = new_k[b], new_v[b]
        lens = lens + 1
        out = ascend.paged_attention(q, key_cache, value_cache, table, lens)
        assert isinstance(out, np.ndarray)  # query was NumPy
        assert_close(out, harness.reference_paged(q, k, v, table, lens))
    np.testing.assert_array_equal(key_cache.to_numpy(), k)
    key_cache.free()
    value_cache.free()
    harness.assert_no_leak(runtime)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       tokens=st.integers(1, 3), head_dim=st.integers(1, 20), block_size=st.sampled_from([16, 32]),
       max_blocks=st.integers(1, 3), causal=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_random_shapes(runtime, batch, kv_heads, group, tokens, head_dim, block_size, max_blocks,
                       causal, seed):
    rng = np.random.default_rng(seed)
    inputs = make_paged(rng, batch, kv_heads * group, kv_heads, tokens, head_dim, block_size,
                        max_blocks)
    out = ascend.paged_attention(*inputs, causal=causal)
    assert_close(out, harness.reference_paged(*inputs, causal=causal))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def _small(rng, **kwargs):
    return list(make_paged(rng, batch=2, heads=2, kv_heads=1, head_dim=8, max_blocks=2,
                           seq_lens=[5, 20], **kwargs))


@pytest.mark.parametrize("change,error,match", [
    (lambda a: [x.astype(np.float32) if i < 3 else x for i, x in enumerate(a)], TypeError,
     "float16, bfloat16"),
    (lambda a: [a[0][:, :, :, :4]] + a[1:], ValueError, "one shape"),
    (lambda a: [a[0], a[1][:, :, :8], a[2][:, :, :8]] + a[3:], ValueError, "multiple of 16"),
    (lambda a: a[:3] + [a[3].astype(np.float32), a[4]], TypeError, "int32"),
    (lambda a: a[:3] + [a[3][:1], a[4]], ValueError, "rows for a batch"),
    (lambda a: a[:4] + [np.array([5, 33])], ValueError, "seq_lens must lie"),
    (lambda a: a[:4] + [np.array([0, 3])], ValueError, "seq_lens must lie"),
    (lambda a: a[:4] + [np.array([5])], ValueError, "seq_lens must be 2"),
    (lambda a: a[:3] + [np.full((2, 2), 99, np.int32), a[4]], ValueError, "outside"),
    (lambda a: [a[0].repeat(65, 1)] + a[1:], ValueError, "ratio <= 64"),
    (lambda a: [a[0][:, :1].repeat(3, 1), a[1].repeat(2, 1), a[2].repeat(2, 1)] + a[3:],
     ValueError, "multiple of key/value heads"),
    (lambda a: [np.zeros((2, 2, 1, 520), np.float16), np.zeros((6, 1, 16, 520), np.float16),
                np.zeros((6, 1, 16, 520), np.float16)] + a[3:], ValueError, "D <= 512"),
    (lambda a: [a[0][0]] + a[1:], ValueError, "4-D"),
])
def test_bad_inputs(runtime, rng, change, error, match):
    with pytest.raises(error, match=match):
        ascend.paged_attention(*change(_small(rng)))
    harness.assert_no_leak(runtime)


def test_lse_is_not_available(runtime, rng):
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
        ascend.paged_attention(*_small(rng), return_lse=True)


def test_bad_block_id_in_resident_table_is_a_named_error_without_leak(runtime, rng):
    q, k, v, table, lens = _small(rng)
    bad_table = ascend.to_device(np.full_like(table, 1000))  # cannot be checked on the host
    with pytest.raises(ascend.AscendError) as info:
        ascend.paged_attention(q, k, v, bad_table, lens)
    assert info.value.name == "aclnnIncreFlashAttentionV4" and info.value.code == 361001
    assert "outside" in info.value.message
    bad_table.free()
    harness.assert_no_leak(runtime)


def test_mixing_devices_and_freed_arrays(runtime, rng):
    q, k, v, table, lens = _small(rng)
    key_on_one = ascend.to_device(k, device=1)
    with pytest.raises(ValueError, match="npu:1"):
        ascend.paged_attention(q, key_on_one, v, table, lens)
    key_on_one.free()
    with pytest.raises(ValueError, match="freed"):
        ascend.paged_attention(q, key_on_one, v, table, lens)
    out = ascend.paged_attention(*[ascend.to_device(x, device=1) for x in (q, k, v)], table,
                                 lens, device="npu:1")
    assert out.device == 1
    assert_close(out.to_numpy(), harness.reference_paged(q, k, v, table, lens))
    out.free()
    gc_collect_and_check(runtime)


def gc_collect_and_check(runtime):
    import gc
    gc.collect()
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("function,code", [
    ("aclnnIncreFlashAttentionV4GetWorkspaceSize", 561002),
    ("aclnnIncreFlashAttentionV4", 507015),
])
def test_failing_call_leaks_nothing(runtime, rng, function, code):
    harness.fail_next(runtime, function, code)
    with pytest.raises(ascend.AscendError) as info:
        ascend.paged_attention(*_small(rng))
    assert (info.value.code, info.value.name) == (code, function)
    harness.assert_no_leak(runtime)
