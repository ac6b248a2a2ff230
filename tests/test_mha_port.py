"""Porting aids of multi_head_attention / MultiHeadAttention, checked against PyTorch's
nn.MultiheadAttention and Hugging Face attention layers (skipped without them)."""
import numpy as np
import pytest

import fastattn
from fastattn import reference
from helpers import assert_close


def torch_module(torch, E, H, *, batch_first, kdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                    bias=bias).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def torch_masks(rng, torch_convention_kind, B, H, L, S):
    """(attn_mask, key_padding_mask) in the torch convention, every row keeping a key."""
    kpm = np.zeros((B, S), bool)
    kpm[0, S - 2:] = True                                  # padding: True = masked out
    if torch_convention_kind == "bool2d":
        am = rng.random((L, S)) < 0.3
        am[:, 0] = False
    elif torch_convention_kind == "bool3d":
        am = rng.random((B * H, L, S)) < 0.3
        am[:, :, 0] = False
    elif torch_convention_kind == "float":
        am = rng.standard_normal((L, S)).astype(np.float32)
    else:
        am = None
    return am, kpm


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,bias", [(None, True), (6, True), (None, False)])
@pytest.mark.parametrize("masks", ["bool2d", "bool3d", "float", "none"])
def test_from_torch_matches_the_module(rng, batch_first, kdim, bias, masks):
    torch = pytest.importorskip("torch")
    E, H, B, L, S = 16, 4, 3, 5, 7
    m = torch_module(torch, E, H, batch_first=batch_first, kdim=kdim, bias=bias)
    mha = fastattn.MultiHeadAttention.from_torch(m)
    assert mha.batch_first == batch_first and mha.mask_convention == "torch"
    shape = (lambda n, x: (n, x)) if batch_first else (lambda n, x: (x, n))
    q = rng.standard_normal(shape(B, L) + (E,)).astype(np.float32)
    kv = rng.standard_normal(shape(B, S) + (kdim or E,)).astype(np.float32)
    am, kpm = torch_masks(rng, masks, B, H, L, S)
    t = torch.from_numpy
    for average in (True, False):
        with torch.no_grad():
            want, want_w = m(t(q), t(kv), t(kv), key_padding_mask=t(kpm),
                             attn_mask=None if am is None else t(am), need_weights=True,
                             average_attn_weights=average)
        got, got_w = mha(q, kv, kv, key_padding_mask=kpm, attn_mask=am, need_weights=True,
                         average_attn_weights=average)
        assert got.shape == tuple(want.shape) and got_w.shape == tuple(want_w.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_w, want_w.numpy(), rtol=1e-4, atol=1e-5)
    # the function form, same conventions by argument
    w = dict(q_weight=mha.q_weight, k_weight=mha.k_weight, v_weight=mha.v_weight,
             out_weight=mha.out_weight, q_bias=mha.q_bias, k_bias=mha.k_bias,
             v_bias=mha.v_bias, out_bias=mha.out_bias)
    out = fastattn.multi_head_attention(q, kv, kv, H, **w, key_padding_mask=kpm, attn_mask=am,
                                        batch_first=batch_first, mask_convention="torch")
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-4, atol=1e-4)


def test_float_key_padding_mask_and_unbatched(rng):
    torch = pytest.importorskip("torch")
    E, H, L, S = 8, 2, 4, 6
    for batch_first in (True, False):
        m = torch_module(torch, E, H, batch_first=batch_first)
        mha = fastattn.MultiHeadAttention.from_torch(m)
        x = rng.standard_normal((L, E)).astype(np.float32)          # unbatched
        mem = rng.standard_normal((S, E)).astype(np.float32)
        kpm = rng.standard_normal(S).astype(np.float32)              # float: added
        am = rng.random((H, L, S)) < 0.3                             # (H, L, S) unbatched
        am[:, :, 0] = False
        t = torch.from_numpy
        with torch.no_grad():
            want, want_w = m(t(x), t(mem), t(mem), key_padding_mask=t(kpm), attn_mask=t(am))
        got, got_w = mha(x, mem, mem, key_padding_mask=kpm, attn_mask=am, need_weights=True)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_w, want_w.numpy(), rtol=1e-4, atol=1e-5)


def test_seq_first_output_is_a_view_and_chains(rng):
    H, E = 2, 8
    mha = fastattn.MultiHeadAttention(E, H, rng=0, batch_first=False)
    x = rng.standard_normal((5, 3, E)).astype(np.float32)        # (L, N, E)
    out = mha(x)
    assert out.shape == (5, 3, E) and out.base is not None
    bf = fastattn.MultiHeadAttention(E, H, rng=0)
    np.testing.assert_allclose(out, bf(x.transpose(1, 0, 2)).transpose(1, 0, 2), atol=1e-6)
    np.testing.assert_allclose(mha(out), bf(bf(x.transpose(1, 0, 2))).transpose(1, 0, 2),
                               atol=1e-5)
    # per call, the object's layout can be overridden
    assert mha(x.transpose(1, 0, 2), batch_first=True).shape == (3, 5, E)


def test_mask_conventions_agree(rng):
    # the same masks, once in each convention, give the same result; per-head weights
    H, E, B, L = 2, 8, 2, 5
    w = {n: rng.standard_normal((E, E)) / 3 for n in ("q_weight", "k_weight", "v_weight",
                                                       "out_weight")}
    x = rng.standard_normal((B, L, E))
    keep = fastattn.padding_mask([5, 3], L)[:, 0, 0]
    allowed = rng.random((B * H, L, L)) < 0.7
    allowed[:, :, 0] = True
    mine = fastattn.multi_head_attention(x, x, x, H, **w, key_padding_mask=keep,
                                         attn_mask=allowed.reshape(B, H, L, L),
                                         need_weights=True, average_attn_weights=False)
    ported = fastattn.multi_head_attention(x, x, x, H, **w, key_padding_mask=~keep,
                                           attn_mask=~allowed, mask_convention="torch",
                                           need_weights=True, average_attn_weights=False)
    for a, b in zip(mine, ported):
        np.testing.assert_array_equal(a, b)
    assert mine[1].shape == (B, H, L, L)
    want = reference.multi_head_attention(x, x, x, H, **w, key_padding_mask=keep,
                                          attn_mask=allowed.reshape(B, H, L, L),
                                          need_weights=True)
    assert_close(mine[0], want[0], np.float64)
    assert_close(mine[1].mean(axis=1), want[1], np.float64)


def test_chunked_batches_give_per_head_weights(rng, monkeypatch):
    import fastattn._mha_plan as plan
    import fastattn.multihead as multihead
    monkeypatch.setattr(multihead, "CHUNK_ROWS_PER_THREAD", 4)
    H, E, B, L = 2, 8, 6, 3
    w = {n: rng.standard_normal((E, E)) / 3 for n in ("q_weight", "k_weight", "v_weight",
                                                       "out_weight")}
    x = rng.standard_normal((B, L, E))
    assert plan.batch_chunks(x, x, x, None, 4) is not None
    out, weights = fastattn.multi_head_attention(x, x, x, H, **w, need_weights=True,
                                                 average_attn_weights=False, is_causal=True)
    want = reference.multi_head_attention(x, x, x, H, **w, need_weights=True, is_causal=True)
    assert weights.shape == (B, H, L, L)
    assert_close(out, want[0], np.float64)
    assert_close(weights.mean(axis=1), want[1], np.float64)


def test_port_errors_name_the_fix(rng):
    x = np.ones((2, 4, 8))
    w = {n: np.eye(8) for n in ("q_weight", "k_weight", "v_weight", "out_weight")}
    mha = fastattn.multi_head_attention
    with pytest.raises(ValueError, match=r"batch_first=False query must be \(L, N, E\)"):
        mha(np.ones((1, 2, 4, 8)), x, x, 2, **w, batch_first=False)
    with pytest.raises(TypeError, match=r"key_padding_mask.astype\(bool\)"):
        mha(x, x, x, 2, **w, key_padding_mask=np.zeros((2, 4), np.uint8),
            mask_convention="torch")
    with pytest.raises(TypeError, match=r"attn_mask.astype\(bool\)"):
        mha(x, x, x, 2, **w, attn_mask=np.zeros((4, 4), np.int64), mask_convention="torch")
    with pytest.raises(ValueError, match=r"expected 2\*2=4 masks"):
        mha(x, x, x, 2, **w, attn_mask=np.zeros((2, 4, 4), bool), mask_convention="torch")
    with pytest.raises(ValueError, match="mask_convention"):
        mha(x, x, x, 2, **w, mask_convention="pytorch")
    with pytest.raises(ValueError, match="mask_convention"):
        fastattn.MultiHeadAttention(8, 2, mask_convention="keras")


def test_from_torch_refuses_what_it_cannot_port():
    torch = pytest.importorskip("torch")
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        fastattn.MultiHeadAttention.from_torch(
            torch.nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(NotImplementedError, match=r"module.eval\(\)"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, dropout=0.1))
    fastattn.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, dropout=0.1).eval())
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.Linear(8, 8))


def test_from_torch_copies_bfloat16_weights():
    torch = pytest.importorskip("torch")
    m = torch_module(torch, 8, 2, batch_first=True).to(torch.bfloat16)
    mha = fastattn.MultiHeadAttention.from_torch(m)
    assert mha.q_weight.dtype == fastattn.bfloat16
    np.testing.assert_array_equal(mha.out_weight.astype(np.float32),
                                  m.out_proj.weight.float().detach().numpy())
    with torch.no_grad():
        m.out_proj.weight.zero_()                        # a snapshot, not a view
    assert np.abs(mha.out_weight.astype(np.float32)).max() > 0


def test_repr():
    mha = fastattn.MultiHeadAttention(16, 4, num_kv_heads=2, kdim=6, bias=False,
                                      batch_first=False, mask_convention="torch",
                                      dtype=np.float64)
    assert repr(mha) == ("MultiHeadAttention(embed_dim=16, num_heads=4, num_kv_heads=2, kdim=6, "
                         "vdim=16, bias=False, batch_first=False, mask_convention='torch', "
                         "dtype=float64)")
    sd = {"in_proj_weight": np.ones((24, 8), np.float32), "out_proj.weight": np.ones((4, 8))}
    loaded = fastattn.MultiHeadAttention.from_torch_state_dict(sd, 2)
    assert "out_dim=4" in repr(loaded) and "batch_first=True" in repr(loaded)


# ---- Hugging Face q_proj / k_proj / v_proj / o_proj -----------------------------------

def hf_state_dict(rng, E, H, Hkv, prefix="", out="o_proj", biases=()):
    D = E // H
    sd = {f"{prefix}q_proj.weight": rng.standard_normal((E, E)) / 4,
          f"{prefix}k_proj.weight": rng.standard_normal((Hkv * D, E)) / 4,
          f"{prefix}v_proj.weight": rng.standard_normal((Hkv * D, E)) / 4,
          f"{prefix}{out}.weight": rng.standard_normal((E, E)) / 4}
    for b in biases:
        rows = sd[f"{prefix}{b}.weight"].shape[0]
        sd[f"{prefix}{b}.bias"] = rng.standard_normal(rows)
    return sd


def test_from_hf_state_dict_names_gqa_and_biases(rng):
    sd = hf_state_dict(rng, 32, 8, 2, prefix="model.layers.3.self_attn.",
                       biases=("q_proj", "k_proj", "v_proj"))
    mha = fastattn.MultiHeadAttention.from_hf_state_dict(sd, 8,
                                                         prefix="model.layers.3.self_attn.")
    assert (mha.num_heads, mha.num_kv_heads) == (8, 2)
    assert mha.q_bias is not None and mha.out_bias is None
    assert mha.k_weight is sd["model.layers.3.self_attn.k_proj.weight"]
    x = rng.standard_normal((2, 5, 32))
    want = reference.multi_head_attention(
        x, x, x, 8, num_kv_heads=2, q_weight=mha.q_weight, k_weight=mha.k_weight,
        v_weight=mha.v_weight, out_weight=mha.out_weight, q_bias=mha.q_bias,
        k_bias=mha.k_bias, v_bias=mha.v_bias, is_causal=True)
    assert_close(mha(x, is_causal=True), want, np.float64)
    # out_proj (BART, OPT, Whisper) is found too; num_kv_heads given explicitly
    bart = hf_state_dict(rng, 16, 4, 4, out="out_proj", biases=("q_proj", "out_proj"))
    mha = fastattn.MultiHeadAttention.from_hf_state_dict(bart, 4, num_kv_heads=4)
    assert mha.out_bias is bart["out_proj.bias"] and mha.k_bias is None


def test_from_hf_state_dict_key_errors_name_the_key(rng):
    sd = hf_state_dict(rng, 16, 4, 4, prefix="enc.")
    del sd["enc.o_proj.weight"]
    with pytest.raises(KeyError, match=r"'enc.o_proj.weight' or 'enc.out_proj.weight' "
                                       r"\(out_weight\)"):
        fastattn.MultiHeadAttention.from_hf_state_dict(sd, 4, prefix="enc.")
    with pytest.raises(KeyError, match=r"'enc.attention.self.query.weight' \(q_weight\)"):
        fastattn.MultiHeadAttention.from_hf_state_dict(
            sd, 4, prefix="enc.", key_map={"q_weight": "attention.self.query.weight"})
    with pytest.raises(KeyError, match=r"'enc.q_proj.bias' \(q_bias\)"):
        fastattn.MultiHeadAttention.from_hf_state_dict(
            sd, 4, prefix="enc.", key_map={"q_bias": "q_proj.bias",
                                           "out_weight": "q_proj.weight"})
    with pytest.raises(ValueError, match="key_map names"):
        fastattn.MultiHeadAttention.from_hf_state_dict(sd, 4, key_map={"query": "q"})
    sd["enc.o_proj.weight"] = np.ones((16, 16))
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        fastattn.MultiHeadAttention.from_hf_state_dict(sd, 3, prefix="enc.")
    with pytest.raises(ValueError, match="not a whole number of heads"):
        fastattn.MultiHeadAttention.from_hf_state_dict(
            dict(sd, **{"enc.k_proj.weight": np.ones((6, 16))}), 4, prefix="enc.")


def test_bert_style_key_map(rng):
    E = 16
    sd = {f"attention.self.{n}.{p}": rng.standard_normal((E, E) if p == "weight" else E)
          for n in ("query", "key", "value") for p in ("weight", "bias")}
    sd["attention.output.dense.weight"] = rng.standard_normal((E, E))
    sd["attention.output.dense.bias"] = rng.standard_normal(E)
    key_map = {"q_weight": "self.query.weight", "q_bias": "self.query.bias",
               "k_weight": "self.key.weight", "k_bias": "self.key.bias",
               "v_weight": "self.value.weight", "v_bias": "self.value.bias",
               "out_weight": "output.dense.weight", "out_bias": "output.dense.bias"}
    mha = fastattn.MultiHeadAttention.from_hf_state_dict(sd, 4, prefix="attention.",
                                                         key_map=key_map)
    assert mha.v_bias is sd["attention.self.value.bias"]
    assert mha.out_bias is sd["attention.output.dense.bias"]


def test_from_hf_matches_transformers_attention_layers(rng):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # Llama (grouped-query, no biases) with the identity rotation (cos 1, sin 0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64,
                                   num_hidden_layers=1, vocab_size=50)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    layer = model.model.layers[0].self_attn
    mha = fastattn.MultiHeadAttention.from_hf_state_dict(
        model.state_dict(), 4, prefix="model.layers.0.self_attn.")
    assert mha.num_kv_heads == 2 and mha.q_weight.dtype == np.float32
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    D = 8
    identity = (torch.ones(2, 6, D), torch.zeros(2, 6, D))
    with torch.no_grad():
        want = layer(torch.from_numpy(x), position_embeddings=identity, attention_mask=None)[0]
    np.testing.assert_allclose(mha(x), want.numpy(), rtol=1e-4, atol=1e-5)
    # BART (out_proj, all biases)
    bart_cfg = transformers.BartConfig(d_model=16, encoder_attention_heads=4)
    bart_cfg._attn_implementation = "eager"
    from transformers.models.bart.modeling_bart import BartAttention
    attn = BartAttention(16, 4, config=bart_cfg).eval()
    mha = fastattn.MultiHeadAttention.from_hf_state_dict(attn.state_dict(), 4)
    y = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        want = attn(torch.from_numpy(y))[0]
    np.testing.assert_allclose(mha(y), want.numpy(), rtol=1e-4, atol=1e-5)
