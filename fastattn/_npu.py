"""The ``device="npu"`` path: fastattn's calls run through the sibling package ``ascend``.

fastattn validates and broadcasts as it does for the CPU, reshapes to the BNSD layout
the Ascend operators take, and hands over; ``ascend`` knows nothing of fastattn.
DeviceArray inputs (already resident on the NPU) are passed through untouched and
give DeviceArray results.

dtypes: float16, bfloat16 (``ml_dtypes.bfloat16``) and float32, NumPy arrays or
DeviceArrays. NumPy operands of different dtypes are promoted as NumPy/ml_dtypes
promote (float16 with bfloat16 gives float32) and converted on the host; DeviceArrays
are never converted, so they must already have the promoted dtype. Results have that
dtype; the log-sum-exp is float32.
"""
import numpy as np

from fastattn._validation import promoted_dtype

__all__ = ["npu_devices", "is_device_array", "any_device_array", "DevicePools", "NPU_DTYPES",
           "result_dtypes", "promote", "sdpa_backward"]

NPU_DTYPES = ("float16", "bfloat16", "float32")     # what the NPU path takes
PAGED_DTYPES = ("float16", "bfloat16")              # aclnnIncreFlashAttentionV4 has no float32
_WHERE = " with device='npu'"


def result_dtypes(*arrays, names=None):
    """``(dtype, dtype)``: the promoted dtype of NPU operands, computed and returned
    as is (the ``result_dtypes`` protocol of ``fastattn._validation.check_qkv``)."""
    dtype = promoted_dtype(*arrays, names=names, supported=NPU_DTYPES, where=_WHERE)
    return dtype, dtype


def promote(arrays, names, supported=NPU_DTYPES, what=""):
    """``arrays`` (NumPy arrays or DeviceArrays) in their promoted dtype.

    NumPy arrays are converted on the host (not copied when they have it already); an
    input or a promoted dtype outside ``supported``, or a DeviceArray of another dtype,
    raises ``TypeError`` (``what`` names the operation in the message).
    """
    where = f"{_WHERE}{what}"
    if supported != NPU_DTYPES:
        where += f" (one dtype for {', '.join(names)})"
    dtype = promoted_dtype(*arrays, names=names, supported=supported, where=where)
    listing = ", ".join(f"{n} {a.dtype}" for n, a in zip(names, arrays))
    promoted = []
    for name, a in zip(names, arrays):
        if is_device_array(a):
            if a.dtype != dtype:
                raise TypeError(f"DeviceArray operands need one dtype (they are not converted "
                                f"on the device); got {listing}")
            promoted.append(a)
        else:
            promoted.append(np.asarray(a, dtype=dtype))
    return promoted


def npu_devices():
    """``["npu:0", ...]`` for the usable NPUs; empty without CANN or a device."""
    import ascend
    try:
        return ascend.devices() if ascend.is_available() else []
    except Exception:       # a broken install must not break fastattn.devices()
        return []


def is_device_array(x):
    import ascend
    return isinstance(x, ascend.DeviceArray)


def any_device_array(*arrays):
    return any(a is not None and is_device_array(a) for a in arrays)


def reject_device_arrays(**named):
    """Raise ``TypeError`` naming the first DeviceArray among ``named`` (a CPU call)."""
    for name, value in named.items():
        if value is not None and is_device_array(value):
            raise TypeError(f"{name} is an ascend.DeviceArray on npu:{value.device}: pass "
                            f"device='npu:{value.device}' to compute there, or copy it to the "
                            f"host with .to_numpy()")


def to_bnsd(a, batch_shape, heads=None):
    """Broadcast ``(..., rows, cols)`` over ``batch_shape`` and reshape to 4-D (B, H, rows, cols).

    The last batch axis is the head axis; ``heads`` overrides its size (grouped-query
    key/value heads keep their own count).
    """
    lead = tuple(batch_shape)
    if heads is not None:
        lead = lead[:-1] + (heads,)
    if not lead:
        lead = (1,)
    a = np.broadcast_to(a, lead + a.shape[-2:])
    n_heads = lead[-1]
    return a.reshape((-1, n_heads) + a.shape[-2:])


def sdpa(ops, *, is_causal, causal_alignment, scale, return_lse, out, device, window=None,
         alibi_slopes=None):
    """Run prepared SDPA operands (see ``attention._Operands``) on the NPU. ``window``
    ``(left, right)`` and ``alibi_slopes`` (validated: ``(H,)``, or broadcast to the batch
    shape) map onto the operator's band modes and ``pse`` (``ascend._bands``)."""
    import ascend
    index = ascend.parse_device(device)
    # mixed dtypes: converted to the promoted one before broadcasting (views) and upload
    q0, k0, v0 = (np.asarray(a, dtype=ops.result) for a in (ops.q, ops.k, ops.v))
    q = to_bnsd(q0, ops.batch_shape)
    kv_heads = k0.shape[-3] if ops.group > 1 else None
    k = to_bnsd(k0, ops.batch_shape, kv_heads)
    v = to_bnsd(v0, ops.batch_shape, kv_heads)
    mask = None
    if ops.mask is not None:
        mask = np.broadcast_to(ops.mask, ops.batch_shape + ops.mask.shape[-2:])
        mask = to_bnsd(mask, ops.batch_shape)
    slopes = None
    if alibi_slopes is not None:
        # (H,) as is (one pse plane per head); else one row of slopes per BNSD batch entry
        slopes = (alibi_slopes if alibi_slopes.ndim == 1
                  else alibi_slopes.reshape(-1, alibi_slopes.shape[-1]))
    result = ascend.flash_attention(q, k, v, mask, is_causal=is_causal,
                                    causal_alignment=causal_alignment, scale=scale,
                                    return_lse=return_lse, device=index, window=window,
                                    alibi_slopes=slopes)
    res, lse = result if return_lse else (result, None)
    res = res.reshape(ops.batch_shape + res.shape[-2:])
    if out is not None:
        out[...] = res
        res = out
    if return_lse:
        return res, lse.reshape(ops.batch_shape + lse.shape[-1:])
    return res


def sdpa_resident(query, key, value, attn_mask, *, is_causal, causal_alignment, scale,
                  enable_gqa, return_lse, out, device, window=None, alibi_slopes=None):
    """DeviceArray inputs: already 4-D BNSD on the device; results stay there."""
    import ascend
    if out is not None:
        raise ValueError("out= is not supported with DeviceArray inputs; the result is a "
                         "new DeviceArray")
    arrays = (query, key, value)
    if not all(is_device_array(a) for a in arrays):
        raise TypeError("query, key and value must be all NumPy arrays or all ascend.DeviceArray")
    promote(arrays, ("query", "key", "value"))      # one supported dtype, or TypeError
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise ValueError(f"key/value heads differ from the query's: query {query.shape}, key "
                         f"{key.shape}; pass enable_gqa=True for grouped-query attention")
    return ascend.flash_attention(query, key, value, attn_mask, is_causal=is_causal,
                                  causal_alignment=causal_alignment, scale=scale,
                                  return_lse=return_lse, device=ascend.parse_device(device),
                                  window=window, alibi_slopes=alibi_slopes)


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal, causal_alignment, scale,
           window, return_lse, out, device):
    """Validated packed operands (one NPU dtype) to ``aclnnFlashAttentionVarLenScore`` (TND)."""
    import ascend
    result = ascend.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                           is_causal=is_causal,
                                           causal_alignment=causal_alignment, scale=scale,
                                           window=window, return_lse=return_lse,
                                           device=ascend.parse_device(device))
    res, lse = result if return_lse else (result, None)
    if out is not None:
        out[...] = res
        res = out
    return (res, lse) if return_lse else res


def paged_attention(query, key_blocks, value_blocks, block_table, seq_lens, *, scale, causal,
                    return_lse, device):
    """Validated paged-attention operands to ``aclnnIncreFlashAttentionV4`` on the NPU."""
    import ascend
    return ascend.paged_attention(query, key_blocks, value_blocks, block_table, seq_lens,
                                  scale=scale, causal=causal, return_lse=return_lse,
                                  device=ascend.parse_device(device))


class DevicePools:
    """The key and value block pools of a ``PagedKVCache`` in NPU memory.

    Only the data lives here; the cache's bookkeeping (tables, lengths, free list,
    refcounts) stays on the host. Writes upload just the written slots; a
    copy-on-write block copy stays on the device.
    """

    def __init__(self, key_shape, value_shape, dtype, device):
        import ascend
        index = ascend.parse_device(device)
        # the operator's limits, before anything is allocated
        ascend.check_paged_cache(key_shape, value_shape, dtype)
        self.device = f"npu:{index}"
        # zeroed: slots past a sequence's length are read by no one, but must not be NaN
        # garbage either (a kernel multiplying whole tiles by zero weights would spread it)
        self._keys = ascend.zeros(key_shape, dtype, index)
        try:
            self._values = ascend.zeros(value_shape, dtype, index)
        except BaseException:
            self._keys.free()
            raise

    # A new view per access: freeing one (or leaving its ``with`` block) cannot
    # invalidate the next.
    @property
    def key_view(self):
        return self._keys.view(readonly=True)

    @property
    def value_view(self):
        return self._values.view(readonly=True)

    def write(self, block, slot, key, value):
        """Tokens ``slot, slot + 1, ...`` of ``block`` = ``key``/``value`` (H_kv, n, E):
        one 2-D host-to-device copy per pool."""
        n = key.shape[1]
        self._keys[block, :, slot:slot + n] = key
        self._values[block, :, slot:slot + n] = value

    def copy_block(self, destination, source):
        self._keys.copy_region(destination, self._keys, source)
        self._values.copy_region(destination, self._values, source)

    def close(self):
        self._keys.free()
        self._values.free()


def sdpa_backward(grad_out, query, key, value, out, lse, attn_mask, *, is_causal, scale,
                  enable_gqa, causal_alignment, mask_grad, device):
    """``scaled_dot_product_attention_backward`` on the NPU (``aclnnFlashAttentionScoreGrad``).

    NumPy inputs are validated and broadcast as for the forward (``_Operands``), reshaped
    to BNSD and sent; the gradients come back over the broadcast batch and are summed to
    each input's own shape (in float32) and dtype. DeviceArray inputs (all of grad_out,
    query, key, value and out, 4-D BNSD) stay on the device and give DeviceArrays.
    """
    import ascend
    if mask_grad:
        raise NotImplementedError("mask_grad=True with device='npu': "
                                  "aclnnFlashAttentionScoreGrad does not compute the mask's "
                                  "gradient (its dpseOut is reserved); use device='cpu'")
    index = ascend.parse_device(device)
    if any_device_array(grad_out, query, key, value, out, lse):
        return _sdpa_backward_resident(grad_out, query, key, value, out, lse, attn_mask,
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                       causal_alignment=causal_alignment, device=index)
    from fastattn.attention import _Operands
    from fastattn._validation import check_scale
    ops = _Operands(query, key, value, attn_mask, enable_gqa, npu=True)
    scale = check_scale(scale, ops.E)
    grad_out, out, lse = _check_saved(ops, grad_out, out, lse)
    dtype = ops.result
    q0, k0, v0 = (np.asarray(a, dtype=dtype) for a in (ops.q, ops.k, ops.v))
    kv_heads = k0.shape[-3] if ops.group > 1 else None
    q = to_bnsd(q0, ops.batch_shape)
    k, v = to_bnsd(k0, ops.batch_shape, kv_heads), to_bnsd(v0, ops.batch_shape, kv_heads)
    dy, o = to_bnsd(grad_out, ops.batch_shape), to_bnsd(out, ops.batch_shape)
    stats = lse.reshape(q.shape[:3])
    mask = None
    if ops.mask is not None:
        mask = np.broadcast_to(ops.mask, ops.batch_shape + ops.mask.shape[-2:])
        mask = to_bnsd(mask, ops.batch_shape)
    dq, dk, dv = ascend.flash_attention_backward(
        dy, q, k, v, o, stats, mask, is_causal=is_causal, causal_alignment=causal_alignment,
        scale=scale, device=index)
    # back to the broadcast batch (with key/value heads for grouped-query attention), then
    # summed over what each input was broadcast along
    lead = ops.batch_shape
    kv_lead = lead[:-1] + (k0.shape[-3],) if ops.group > 1 else lead
    return tuple(
        _reduce_to(g.reshape(batch + g.shape[-2:]), x)
        for g, batch, x in ((dq, lead, ops.q), (dk, kv_lead, ops.k), (dv, kv_lead, ops.v)))


def _reduce_to(grad, x):
    """``grad`` (over the broadcast batch) summed to the shape of input ``x``, in its dtype."""
    from fastattn.reference import unbroadcast
    if grad.shape != x.shape:
        grad = unbroadcast(np.asarray(grad, dtype=np.float32), x.shape)
    return np.asarray(grad).astype(x.dtype, copy=False)


def _check_saved(ops, grad_out, out, lse):
    """grad_out, out and lse of the NPU forward of these inputs: out in the promoted dtype,
    grad_out in it (float32 is accepted and converted), lse floating (sent as float32)."""
    from fastattn.backward import _saved_arrays
    grad_out, out, lse = _saved_arrays(ops, grad_out, out, lse, where=_WHERE)
    if grad_out.dtype not in (ops.result, np.dtype(np.float32)):
        raise TypeError(f"grad_out has dtype {grad_out.dtype}; it must have out's dtype "
                        f"{ops.result} or float32 (convert it with .astype)")
    return (np.asarray(grad_out, dtype=ops.result), out,
            np.asarray(lse, dtype=np.float32))


def _sdpa_backward_resident(grad_out, query, key, value, out, lse, attn_mask, *, is_causal,
                            scale, enable_gqa, causal_alignment, device):
    """DeviceArray inputs: 4-D BNSD on the device; the gradients stay there."""
    import ascend
    arrays = (grad_out, query, key, value, out)
    if not all(is_device_array(a) for a in arrays):
        raise TypeError("grad_out, query, key, value and out must be all NumPy arrays or all "
                        "ascend.DeviceArray")
    promote(arrays, ("grad_out", "query", "key", "value", "out"))  # one dtype, or TypeError
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise ValueError(f"key/value heads differ from the query's: query {query.shape}, key "
                         f"{key.shape}; pass enable_gqa=True for grouped-query attention")
    return ascend.flash_attention_backward(grad_out, query, key, value, out, lse, attn_mask,
                                           is_causal=is_causal,
                                           causal_alignment=causal_alignment, scale=scale,
                                           device=device)
