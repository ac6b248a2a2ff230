"""A Hugging Face ``transformers`` attention backend that computes with fastattn.

After :func:`register`, ``attn_implementation="fastattn"`` runs every attention layer of
a model through :func:`fastattn.scaled_dot_product_attention` on CPU torch tensors::

    import fastattn.integrations.transformers as fastattn_hf
    fastattn_hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")
    model.set_attn_implementation("fastattn")        # or switch an existing model

What the backend does with what transformers passes (``sdpa_attention_forward`` of
transformers 5.x is the model it follows, and the reference the tests compare with):

- **Tensors** are shared with NumPy, not copied: ``Tensor.numpy()`` reads any strides
  (the ``(B, H, L, D)`` views of ``(B, L, H, D)`` projections included), bfloat16 is
  reinterpreted as ``ml_dtypes.bfloat16``, and the kernel writes the ``(B, L, H, D)``
  output transformers wants straight into a fresh tensor's memory.
- **Grouped-query attention** reads the ``(B, Hkv, S, D)`` keys and values as they are
  (``enable_gqa=True``): no ``repeat_kv``.
- **Masks**: :func:`register` also registers transformers' ``sdpa_mask`` builder under
  the same name in ``masking_utils.AttentionMaskInterface``, so the backend receives
  the boolean ``(B, 1, L, S)`` padding/causal/sliding-window mask (True = attend) that
  ``sdpa`` receives, or None where ``is_causal`` says it all. Without that second
  registration transformers would build no mask at all and padding would be lost.
- **Sliding windows** (Mistral, Qwen2, Gemma 2 ``sliding_window``) are in that mask;
  the backend refuses (``NotImplementedError``) the one case where they would not be:
  no mask and more keys than the window.
- **Refused, never ignored** (``NotImplementedError`` naming the option): logit
  soft-capping (``softcap``: Gemma 2's ``attn_logit_softcapping``), attention weights
  (``output_attentions=True``), autograd (a tensor that requires grad: run inference
  under ``torch.no_grad()`` / ``torch.inference_mode()``), non-CPU tensors, and any
  keyword transformers passes that this backend does not know.
- **Dtypes**: float32, float64, float16 and bfloat16 (the half types computed in
  float32 and returned in their own type, as fastattn does).
- **Threads**: ``torch.get_num_threads()`` at each call bounds the kernel's threads, so
  ``torch.set_num_threads`` sets both.

torch and transformers are imported only when :func:`register` or the attention
function is called: ``pip install "fastattn[transformers]"``.
"""
import numpy as np

from fastattn._validation import BFLOAT16
from fastattn.attention import scaled_dot_product_attention

__all__ = ["register", "attention_forward", "NAME"]

NAME = "fastattn"

# Keywords transformers passes to every attention function that do not change what
# attention computes here (the mask already carries positions, padding and packing;
# caches were updated by the layer before the call).
_IGNORED = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
    "encoder_hidden_states", "output_hidden_states", "output_router_logits",
    "num_items_in_batch", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx", "layer_idx", "return_dict",
})


def register(name=NAME):
    """Register fastattn as the transformers attention implementation ``name``.

    Registers :func:`attention_forward` in ``transformers.AttentionInterface`` and
    transformers' ``sdpa_mask`` builder in ``masking_utils.AttentionMaskInterface``
    under the same name (the boolean masks the backend reads). Calling it again is
    harmless.

    Parameters
    ----------
    name : str, default="fastattn"
        The name to pass as ``attn_implementation``. Avoid names containing "sdpa" or
        "flash", which transformers treats specially.

    Returns
    -------
    name : str

    Raises
    ------
    ImportError
        Without transformers (``pip install "fastattn[transformers]"``).

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, AutoModelForCausalLM
    >>> import fastattn.integrations.transformers as fastattn_hf
    >>> fastattn_hf.register()
    'fastattn'
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")
    >>> ids = torch.tensor([[1, 5, 9, 2]])
    >>> with torch.no_grad():
    ...     logits = model(ids).logits
    >>> model.set_attn_implementation("sdpa")
    >>> with torch.no_grad():
    ...     expected = model(ids).logits
    >>> bool(torch.allclose(logits, expected, atol=1e-5))
    True
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError(f"fastattn's transformers backend needs transformers and torch: "
                          f"pip install \"fastattn[transformers]\" ({error})") from error
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, position_bias=None,
                      **kwargs):
    """The attention function transformers calls for ``attn_implementation="fastattn"``.

    Takes what transformers' ``sdpa_attention_forward`` takes: ``query (B, Hq, L, D)``,
    ``key``/``value (B, Hkv, S, D)`` CPU tensors, the mask built by ``sdpa_mask`` (bool,
    True = attend) or a float additive mask or None, and returns
    ``(attn_output (B, L, Hq, Dv), None)``.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer; its ``is_causal`` attribute (default True) says whether
        a call without a mask is causal.
    query, key, value : torch.Tensor
    attention_mask : torch.Tensor or None
    dropout : float, default=0.0
        Dropout on the probabilities (``dropout_p``; a fresh seed per call).
    scaling : float, optional
        The softmax scale; default ``1 / sqrt(D)``.
    sliding_window : int, optional
        Checked only: the window must be in ``attention_mask`` (``sdpa_mask`` puts it
        there whenever it excludes a key).
    softcap : float, optional
        Not supported yet: ``NotImplementedError``.
    is_causal : bool, optional
        Overrides ``module.is_causal``.
    position_bias : torch.Tensor, optional
        Added to the scores (T5-style relative bias), broadcastable to ``(B, Hq, L, S)``.
    **kwargs
        Keywords that do not change the result (``position_ids``, ``use_cache``, ...);
        any other one that is not None raises ``NotImplementedError``.

    Returns
    -------
    attn_output : torch.Tensor, shape (B, L, Hq, Dv)
        The dtype of ``query``, contiguous.
    attn_weights : None

    Raises
    ------
    NotImplementedError
        For an option fastattn does not compute (named in the message), tensors that
        require grad, and tensors not on the CPU.

    Examples
    --------
    >>> import torch
    >>> from fastattn.integrations.transformers import attention_forward
    >>> layer = torch.nn.Module()          # stands for an attention layer; is_causal
    >>> layer.is_causal = True
    >>> q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    >>> out, weights = attention_forward(layer, q, k, v, None)
    >>> out.shape, weights
    (torch.Size([1, 6, 4, 8]), None)
    >>> expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
    ...                                                             enable_gqa=True)
    >>> bool(torch.allclose(out, expected.transpose(1, 2), atol=1e-6))
    True
    """
    import torch

    unknown = [name for name, val in kwargs.items()
               if val is not None and name not in _IGNORED
               and not (name == "output_attentions" and not val)]
    if unknown:
        if "output_attentions" in unknown:
            raise NotImplementedError(
                "output_attentions=True: fastattn never forms the attention weights; use "
                "attn_implementation=\"eager\" to get them")
        raise NotImplementedError(f"the fastattn attention backend does not support "
                                  f"{', '.join(sorted(unknown))} (passed by "
                                  f"{type(module).__name__})")
    # Keywords of scaled_dot_product_attention beyond torch's. Soft-capping and the
    # sliding window are wired by replacing their raise below with the commented line.
    options = {}
    if softcap is not None:
        # options["softcap"] = softcap
        raise NotImplementedError(f"softcap={softcap} (attn_logit_softcapping): fastattn "
                                  f"does not soft-cap attention scores yet; use "
                                  f"attn_implementation=\"eager\" for this model")
    L, S = query.shape[-2], key.shape[-2]
    if sliding_window is not None and attention_mask is None and S > sliding_window:
        # options.update(window=(sliding_window - 1, 0), causal_alignment="bottom_right")
        # (transformers' window: key j visible from query i when i - j < sliding_window;
        # the queries are the last L positions of the keys)
        raise NotImplementedError(f"sliding_window={sliding_window} without a mask that "
                                  f"carries it ({S} keys): fastattn has no window option yet")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        raise NotImplementedError("the fastattn attention backend computes no gradients: run "
                                  "the model under torch.no_grad() or torch.inference_mode()")
    if not (query.is_cpu and key.is_cpu and value.is_cpu):
        where = ", ".join(f"{name} on {t.device}" for name, t in
                          (("query", query), ("key", key), ("value", value)) if not t.is_cpu)
        raise NotImplementedError(f"the fastattn attention backend runs on CPU tensors, "
                                  f"got {where}")

    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # as sdpa: causal only for several queries and no mask (one query sees all keys);
    # top-left alignment, which is what sdpa's cropping of empty static-cache slots gives
    is_causal = bool(is_causal) and L > 1 and attention_mask is None

    q, k, v = _to_numpy(query, torch), _to_numpy(key, torch), _to_numpy(value, torch)
    mask = None
    if attention_mask is not None:
        mask = _to_numpy(attention_mask, torch)
        if mask.dtype != np.bool_:
            mask = mask.astype(_float_mask_dtype(q))
    if position_bias is not None:
        bias = _to_numpy(position_bias, torch).astype(_float_mask_dtype(q))
        if mask is None:
            mask = bias
        elif mask.dtype == np.bool_:
            mask = np.where(mask, bias, -np.inf).astype(bias.dtype)
        else:
            mask = bias + mask

    mask_lead = mask.shape[:-2] if mask is not None else ()     # (B, H) or fewer
    B = max(q.shape[0], k.shape[0], mask_lead[0] if len(mask_lead) == 2 else 1)
    Hq, Hkv, Dv = q.shape[1], k.shape[1], v.shape[-1]
    nthreads = max(1, torch.get_num_threads())
    out = np.empty((B, L, Hq, Dv), q.dtype)
    if L == 1 and Hq != Hkv and (not mask_lead or mask_lead[-1] == 1):
        # Decoding with grouped heads: the query heads sharing a key/value head become
        # the rows of one (Hq / Hkv, D) query (views both ways), so each key/value head
        # is read once per step -- transformers' pack_gqa for sdpa does the same.
        q = q.reshape(q.shape[0], Hkv, Hq // Hkv, q.shape[-1])
        view = out.reshape(B, Hkv, Hq // Hkv, Dv)
        gqa = False
    else:
        # the kernel writes the (B, L, Hq, Dv) result in place, through a (B, Hq, L, Dv) view
        view = out.transpose(0, 2, 1, 3)
        gqa = Hq != Hkv
    if q.dtype == k.dtype == v.dtype:
        scaled_dot_product_attention(q, k, v, mask, dropout, is_causal, scaling, gqa,
                                     out=view, num_threads=nthreads, **options)
    else:
        view[...] = scaled_dot_product_attention(q, k, v, mask, dropout, is_causal, scaling,
                                                 gqa, num_threads=nthreads, **options)
    return _from_numpy(out, torch), None


def _float_mask_dtype(q):
    # additive masks and biases in the compute dtype: float64 for float64, else float32
    return np.float64 if q.dtype == np.float64 else np.float32


def _to_numpy(tensor, torch):
    # A NumPy view of a CPU tensor (any strides); bfloat16 as ml_dtypes.bfloat16.
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def _from_numpy(array, torch):
    # A tensor sharing the memory of a C-contiguous array; bfloat16 through int16.
    if array.dtype.kind == "V":          # ml_dtypes.bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
