"""The Hugging Face transformers backend (fastattn.integrations.transformers).

Small models with random weights are built from configs (nothing is downloaded) and run
with attn_implementation="fastattn" and with transformers' own "sdpa" (Gemma 2: "eager"):
float32 logits must agree within 1e-4 and greedy generation must give the same tokens.
Skipped without torch and transformers.
"""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastattn                                                        # noqa: E402
import fastattn.integrations.transformers as fastattn_hf               # noqa: E402

NAME = fastattn_hf.register()
VOCAB = 128
NEW_TOKENS = 32


def _small(config_cls, **kw):
    return config_cls(vocab_size=VOCAB, **kw)


def llama():
    return _small(transformers.LlamaConfig, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=256)


def gpt2():
    return _small(transformers.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=1, eos_token_id=2)


def mistral():
    # a window shorter than prompt + generated tokens, so it excludes keys
    return _small(transformers.MistralConfig, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  sliding_window=12, max_position_embeddings=256)


def qwen2():
    return _small(transformers.Qwen2Config, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)


def qwen2_sliding():
    return _small(transformers.Qwen2Config, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  use_sliding_window=True, sliding_window=10, max_window_layers=1,
                  max_position_embeddings=256)


def gemma2_no_softcap():
    # Gemma 2 with its attention soft-capping switched off: sliding and global layers,
    # query_pre_attn_scalar scaling
    return _small(transformers.Gemma2Config, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, sliding_window=10, query_pre_attn_scalar=16,
                  attn_logit_softcapping=None, max_position_embeddings=256)


# (config builder, the model's own reference implementation)
DECODERS = {
    "llama": (llama, "sdpa"),
    "gpt2": (gpt2, "sdpa"),
    "mistral": (mistral, "sdpa"),
    "qwen2": (qwen2, "sdpa"),
    "qwen2-sliding": (qwen2_sliding, "sdpa"),
    "gemma2": (gemma2_no_softcap, "eager"),
}


def build(config, implementation, dtype=torch.float32, cls=None):
    torch.manual_seed(0)
    cls = cls or transformers.AutoModelForCausalLM
    return cls.from_config(config, attn_implementation=implementation,
                           dtype=dtype).eval()


def prompts(batch=3, length=20, left_pad=(0, 7, 13)):
    # a left-padded batch as generate() pads it (tokenizer padding_side="left")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(left_pad[:batch]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def logits_and_tokens(model, ids, mask):
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


def real_positions(mask):
    # logits of padding positions are not compared (their rows see no key at all)
    return mask.bool()


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_matches_own_implementation(name):
    make_config, reference = DECODERS[name]
    model = build(make_config(), NAME)
    ids, mask = prompts()
    got_logits, got_tokens = logits_and_tokens(model, ids, mask)
    model.set_attn_implementation(reference)
    want_logits, want_tokens = logits_and_tokens(model, ids, mask)
    keep = real_positions(mask)
    err = (got_logits[keep] - want_logits[keep]).abs().max().item()
    assert err < 1e-4, f"{name}: max logit difference {err:.3g}"
    assert torch.equal(got_tokens, want_tokens)
    assert got_tokens.shape[1] == ids.shape[1] + NEW_TOKENS


def test_unpadded_batch_uses_causal_flag():
    # without padding transformers passes no mask (is_causal instead): prefill and decode
    model = build(llama(), NAME)
    ids, mask = prompts(left_pad=(0, 0, 0))
    got = logits_and_tokens(model, ids, None)
    model.set_attn_implementation("sdpa")
    want = logits_and_tokens(model, ids, None)
    assert (got[0] - want[0]).abs().max().item() < 1e-4
    assert torch.equal(got[1], want[1])


def test_set_attn_implementation_switches_an_existing_model():
    model = build(qwen2(), "sdpa")
    ids, mask = prompts()
    calls = []
    forward = fastattn_hf.attention_forward

    def counting(*args, **kwargs):
        calls.append(args[0])
        return forward(*args, **kwargs)

    transformers.AttentionInterface.register("fastattn-counting", counting)
    transformers.masking_utils.AttentionMaskInterface.register(
        "fastattn-counting", transformers.masking_utils.sdpa_mask)
    model.set_attn_implementation("fastattn-counting")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert len(calls) == model.config.num_hidden_layers      # every attention layer


def test_bert_padding_bidirectional():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4)
    ids, mask = prompts(left_pad=(0, 4, 9))
    mask = mask.flip(-1)                       # BERT pads on the right
    outs = {}
    for impl in (NAME, "sdpa"):
        model = build(config, impl, cls=transformers.AutoModel)
        with torch.no_grad():
            outs[impl] = model(ids, attention_mask=mask).last_hidden_state
    keep = real_positions(mask)
    assert (outs[NAME][keep] - outs["sdpa"][keep]).abs().max().item() < 1e-4


def test_padding_reaches_the_backend():
    # the mask trap: the name must be registered for the mask builder too, or
    # transformers passes attention_mask=None and padding is silently dropped
    seen = []

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return fastattn_hf.attention_forward(module, query, key, value, attention_mask, **kw)

    transformers.AttentionInterface.register("fastattn-spy", spy)
    transformers.masking_utils.AttentionMaskInterface.register(
        "fastattn-spy", transformers.masking_utils.sdpa_mask)
    model = build(llama(), "fastattn-spy")
    ids, mask = prompts()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert seen and all(m is not None and m.dtype == torch.bool for m in seen)
    assert tuple(seen[0].shape) == (3, 1, 20, 20)


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(name, dtype):
    make_config, reference = DECODERS[name]
    ids, mask = prompts()
    keep = real_positions(mask)
    got = build(make_config(), NAME, dtype=dtype)
    want = build(make_config(), reference, dtype=dtype)
    with torch.no_grad():
        a = got(ids, attention_mask=mask).logits
        b = want(ids, attention_mask=mask).logits
        exact = build(make_config(), reference)(ids, attention_mask=mask).logits
    assert a.dtype == dtype
    # fastattn computes half inputs in float32: no further from the float32 model than
    # the model's own half-precision sdpa, and close to it
    err = (a[keep].float() - exact[keep]).abs().max().item()
    err_ref = (b[keep].float() - exact[keep]).abs().max().item()
    assert err <= 1.5 * err_ref + 1e-3, (err, err_ref)
    with torch.no_grad():
        tokens = got.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=0)
    assert tokens.shape == (3, 28)


# ---- options transformers passes ------------------------------------------------------

def test_gemma2_soft_capping_is_refused_by_name():
    config = _small(transformers.Gemma2Config, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, attn_logit_softcapping=50.0)
    model = build(config, NAME)
    ids, mask = prompts()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="softcap=50.0"):
        model(ids, attention_mask=mask)


class Layer(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def qkv(L=6, S=6, dtype=torch.float32, Hq=4, Hkv=2, D=8, B=2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, Hq, D, generator=gen).to(dtype).transpose(1, 2)   # (B, H, L, D) views
    k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
    return q, k, v


def sdpa_forward(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(*args, **kwargs)


@pytest.mark.parametrize("option", [dict(s_aux=torch.zeros(4)), dict(attention_chunk=8),
                                    dict(output_attentions=True)])
def test_unknown_options_are_refused_by_name(option):
    q, k, v = qkv()
    name = next(iter(option))
    with pytest.raises(NotImplementedError, match=name):
        fastattn_hf.attention_forward(Layer(), q, k, v, None, **option)


def test_harmless_options_are_accepted():
    q, k, v = qkv()
    out, weights = fastattn_hf.attention_forward(
        Layer(), q, k, v, None, position_ids=torch.arange(6)[None], use_cache=True,
        output_attentions=False, unknown_but_none=None)
    assert weights is None and out.shape == (2, 6, 4, 8)


def test_sliding_window_without_a_mask_is_refused():
    q, k, v = qkv(L=1, S=20)
    with pytest.raises(NotImplementedError, match="sliding_window=8"):
        fastattn_hf.attention_forward(Layer(), q, k, v, None, sliding_window=8)
    # a window longer than the keys excludes nothing
    fastattn_hf.attention_forward(Layer(), q, k, v, None, sliding_window=32)


def test_gradients_are_refused_not_dropped():
    q, k, v = qkv()
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="torch.no_grad"):
        fastattn_hf.attention_forward(Layer(), q, k, v, None)
    with torch.no_grad():
        fastattn_hf.attention_forward(Layer(), q, k, v, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "bias"])
@pytest.mark.parametrize("L", [5, 1])          # 1: a decode step (grouped heads packed)
def test_direct_calls_match_sdpa_forward(dtype, mask_kind, L):
    q, k, v = qkv(L=L, S=9, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    mask, kw = None, {}
    if mask_kind == "bool":
        mask = torch.rand(2, 1, L, 9, generator=gen) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.where(torch.rand(2, 1, L, 9, generator=gen) > 0.3, 0.0, -1e4).to(dtype)
        mask[..., 0] = 0
    elif mask_kind == "bias":
        kw["position_bias"] = torch.randn(1, 4, L, 9, generator=gen).to(dtype)
    out, _ = fastattn_hf.attention_forward(Layer(), q, k, v, mask, scaling=0.3, **kw)
    # the reference: transformers' sdpa forward in float32
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    want, _ = sdpa_forward(Layer(), q.float(), k.float(), v.float(), mask, scaling=0.3,
                           **{name: t.float() for name, t in kw.items()})
    assert out.dtype == dtype and out.shape == (2, L, 4, 8) and out.is_contiguous()
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3,
           torch.bfloat16: 2e-2}[dtype]
    assert (out.float() - want).abs().max().item() < tol


def test_zero_copy_views():
    q, k, v = qkv(dtype=torch.bfloat16)
    q_np = fastattn_hf._to_numpy(q, torch)
    assert q_np.dtype == fastattn.bfloat16
    assert q_np.__array_interface__["data"][0] == q.data_ptr()
    assert q_np.strides == tuple(s * 2 for s in q.stride())
    out = np.zeros((2, 3), fastattn.bfloat16)
    assert fastattn_hf._from_numpy(out, torch).data_ptr() == out.ctypes.data


def test_importing_the_module_imports_neither_torch_nor_transformers():
    code = ("import sys, fastattn.integrations.transformers as m; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers'))")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("shape", [(1, 9), ("L", 9), (2, 4, "L", 9), (1, 1, 1, 9)])
def test_mask_shapes_broadcast_like_sdpa(L, shape):
    # masks of other shapes than transformers' own (B, 1, L, S): per head, 2-D
    q, k, v = qkv(L=L, S=9)
    shape = tuple(L if n == "L" else n for n in shape)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[..., 0] = True
    out, _ = fastattn_hf.attention_forward(Layer(), q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    assert (out - want.transpose(1, 2)).abs().max().item() < 1e-5


def test_tensors_not_on_the_cpu_are_refused():
    q, k, v = qkv()
    meta = torch.empty(q.shape, device="meta")
    with pytest.raises(NotImplementedError, match="CPU tensors, got key on meta"):
        fastattn_hf.attention_forward(Layer(), q, meta[:, :2], v, None)
