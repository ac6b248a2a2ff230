"""The backward of attention on the NPU: aclnnFlashAttentionScoreGrad.

The operator (ops-transformer ``attention/flash_attention_score_grad``, doc
``aclnnFlashAttentionScoreGrad.md``, header ``aclnn_flash_attention_score_grad.h``)
takes the forward's inputs, ``dy`` (the gradient of the output), the forward's
output (``attentionIn``) and its softmax statistics, and recomputes the
probabilities tile by tile::

    S = Mask(scale * (Q K^T + pse), atten_mask)
    P = exp(S - softmaxMax) / softmaxSum          (AscendC SimpleSoftMax)
    dV = P^T dy,  dS = P * (dy V^T - rowsum(dy * Y)),
    dQ = scale * dS K,  dK = scale * dS^T Q

``softmaxMax`` / ``softmaxSum`` ([B, N, Sq, 8] float32, each row's value repeated
over a 32-byte block of 8, the operand layout of SimpleSoftMax) are the forward's
row maximum and row sum of ``exp(S - max)``, so that ``lse = max + log(sum)``.
Any pair with ``max + log(sum) = lse`` gives the same probabilities,
``P = exp(S - lse)``: given fastattn's log-sum-exp, the binding passes
``softmaxMax = lse`` and ``softmaxSum = 1``. A row with no visible key has
``lse = -inf``; it is passed as ``softmaxMax = 0`` (its masked scores, a large
negative value on the device, then give ``P = 0`` rather than ``exp(+inf)``), and
``innerPrecise = 2`` (the operator's handling of such rows) is set whenever the mask
can produce one, as for the forward.

Masks, causal modes and the additive bias (``pseShift``, added before scaling:
``mask / scale``) are converted exactly as for :func:`ascend.flash_attention`.
``dpseOut`` is reserved by the operator (not computed): there is no mask gradient.
"""

import math

import numpy as np

from ._array import DTYPES
from ._meta import DescriptorScope
from ._ops import (FLASH_ATTENTION_DTYPES, UNLIMITED_TOKENS, _LAYOUT_BNSD, _CallResources,
                   _check_devices, _check_dtypes, _flash_options, _flash_shapes,
                   _mask_tensors, _Operand, _plan_mask, _run_operator)
from ._runtime import device_index, get_runtime

__all__ = ["flash_attention_backward", "softmax_statistics"]

OPERATOR = "aclnnFlashAttentionScoreGrad"
STATISTICS_BLOCK = 8  # float32 values per 32-byte block (SimpleSoftMax's max/sum operands)


def softmax_statistics(lse):
    """``(softmaxMax, softmaxSum)`` for aclnnFlashAttentionScoreGrad from a log-sum-exp.

    Parameters
    ----------
    lse : array_like, shape (B, N, L)
        The forward's log-sum-exp of the scaled, masked scores (``-inf`` for a row
        with no visible key).

    Returns
    -------
    row_max, row_sum : ndarray, shape (B, N, L, 8), float32
        ``lse`` (0 where it is ``-inf``) and ones, each value repeated 8 times.

    Examples
    --------
    >>> row_max, row_sum = softmax_statistics(np.array([[[0.5, -np.inf]]]))
    >>> row_max.shape, row_max[0, 0, :, 0].tolist(), row_sum[0, 0, :, 0].tolist()
    ((1, 1, 2, 8), [0.5, 0.0], [1.0, 1.0])
    """
    lse = np.asarray(lse, dtype=np.float32)
    row_max = np.where(np.isneginf(lse), np.float32(0), lse)
    shape = lse.shape + (STATISTICS_BLOCK,)
    return (np.ascontiguousarray(np.broadcast_to(row_max[..., None], shape)),
            np.ones(shape, dtype=np.float32))


def flash_attention_backward(grad_out, query, key, value, out, lse, attn_mask=None, *,
                             is_causal=False, causal_alignment="top_left", scale=None,
                             device=0):
    """Gradients of :func:`ascend.flash_attention` with ``aclnnFlashAttentionScoreGrad``.

    Parameters
    ----------
    grad_out : ndarray or DeviceArray, shape (B, Hq, L, Ev)
        Gradient of the loss with respect to the forward's output.
    query, key, value, attn_mask, is_causal, causal_alignment, scale
        Exactly as given to the forward call (same shapes, dtypes and limits).
    out : ndarray or DeviceArray, shape (B, Hq, L, Ev)
        The forward's output. ``grad_out``, ``out``, query, key and value have one
        dtype: float32, float16 or bfloat16.
    lse : ndarray or DeviceArray, shape (B, Hq, L)
        The forward's log-sum-exp (``return_lse=True``); converted to float32 (a
        DeviceArray must be float32). It must belong to these inputs: the operator
        recomputes the probabilities from it, so another ``lse`` gives wrong
        gradients, silently.
    device : int or str

    Returns
    -------
    grad_query, grad_key, grad_value : ndarray or DeviceArray
        Shapes (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev), the inputs' dtype;
        key/value gradients summed over each group of query heads. DeviceArrays if
        any of grad_out/query/key/value/out is one.

    Examples
    --------
    >>> import numpy as np, ascend
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for _ in range(3))
    >>> out, lse = ascend.flash_attention(q, k, v, is_causal=True, return_lse=True)
    >>> dq, dk, dv = ascend.flash_attention_backward(np.ones_like(out), q, k, v, out, lse,
    ...                                              is_causal=True)
    >>> dq.shape, dk.shape, dv.dtype
    ((1, 2, 4, 8), (1, 2, 4, 8), dtype('float32'))

    The loss ``out.sum()``: each query's weights sum to one, so ``dv`` sums to the
    number of output elements:

    >>> round(float(dv.sum()), 3)
    64.0
    """
    device = device_index(device)
    runtime = get_runtime()
    q, k, v = _Operand(query, "query"), _Operand(key, "key"), _Operand(value, "value")
    dy, o = _Operand(grad_out, "grad_out"), _Operand(out, "out")
    statistics = _Operand(lse, "lse")
    operands = (q, k, v, dy, o)
    _check_devices(operands + (statistics,), device)
    name = _check_dtypes(operands, FLASH_ATTENTION_DTYPES, OPERATOR)
    batch, heads, length, head_dim, kv_heads, key_length, value_dim = _flash_shapes(
        q, k, v, OPERATOR)
    out_shape = (batch, heads, length, value_dim)
    for operand in (dy, o):
        if operand.shape != out_shape:
            raise ValueError(f"{operand.what} has shape {operand.shape}, but the forward of "
                             f"query {q.shape}, key {k.shape}, value {v.shape} gives out of "
                             f"shape {out_shape}")
    if statistics.shape != out_shape[:3]:
        raise ValueError(f"lse has shape {statistics.shape}, but the forward of these inputs "
                         f"gives (B, Hq, L) = {out_shape[:3]}")
    if statistics.device_array is not None:
        if statistics.name != "float32":
            raise TypeError(f"lse must be float32, got a {statistics.name} DeviceArray")
    elif statistics.value.dtype.kind != "f" and statistics.name != "bfloat16":
        raise TypeError(f"lse must be floating, got {statistics.value.dtype}")
    scale = _flash_options(causal_alignment, scale, head_dim)
    plan = _plan_mask(attn_mask, is_causal, causal_alignment,
                      (batch, heads, length, key_length), scale, name)
    row_max, row_sum = softmax_statistics(statistics.host())

    on_device = any(operand.device_array is not None for operand in operands)
    acl_dtype, itemsize = DTYPES[name][0], DTYPES[name][1].itemsize
    acl_float = DTYPES["float32"][0]
    grad_shapes = (q.shape, k.shape, v.shape)
    with _CallResources(runtime, device) as resources, \
            DescriptorScope(runtime.lib, runtime.descriptors) as scope:
        q_t, k_t, v_t, dy_t, o_t = (scope.tensor(resources.place(operand), operand.shape,
                                                 acl_dtype) for operand in operands)
        mask_tensor, pse_tensor = _mask_tensors(plan, runtime, device, resources, scope,
                                                acl_dtype)
        max_t, sum_t = (scope.tensor(resources.upload(host).ptr, host.shape, acl_float)
                        for host in (row_max, row_sum))
        buffers = [resources.scratch(math.prod(shape) * itemsize) for shape in grad_shapes]
        arguments = [
            q_t, k_t, v_t, dy_t,
            pse_tensor, None, None, mask_tensor,       # pseShift, dropMask, paddingMask, mask
            max_t, sum_t, None, o_t,                   # softmaxMax, softmaxSum, softmaxIn, out
            None,                                      # prefix
            scale, 1.0, UNLIMITED_TOKENS, UNLIMITED_TOKENS, heads, _LAYOUT_BNSD,
            plan.inner_precise, plan.sparse_mode,
            *(scope.tensor(buffer.ptr, shape, acl_dtype)
              for buffer, shape in zip(buffers, grad_shapes)),
            scope.tensor(None, (0,), acl_dtype),       # dpseOut: reserved, empty
        ]
        _run_operator(runtime, device, OPERATOR, arguments)
        return tuple(resources.deliver(buffer, shape, name, on_device)
                     for buffer, shape in zip(buffers, grad_shapes))

