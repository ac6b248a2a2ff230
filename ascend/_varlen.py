"""Packed variable-length attention on the NPU: aclnnFlashAttentionVarLenScore (TND).

ops-transformer ``attention/flash_attention_score/docs/aclnnFlashAttentionVarLenScore.md``:
query ``(Tq, N, D)``, key/value ``(Tkv, Nkv, D | Dv)`` in layout TND; sequence ``b`` is
delimited by ``actualSeqQLen`` / ``actualSeqKvLen``, each sequence's *cumulative* end
(flash-attn's ``cu_seqlens`` without its leading 0); the softmax statistics are
``[N, T, 8]``, so the log-sum-exp comes out ``(N, Tq)``, flash-attn's varlen layout.

Mapping of fastattn's options (anything else raises ``NotImplementedError`` naming it):

* causal top-left: sparse mode 2; causal bottom-right: sparse mode 3, which supports no
  invalid rows: every sequence needs ``Sq <= Skv`` ("When the value is set to 3,
  computation on invalid rows is not supported").
* window ``(left, right)``: sparse mode 4 (band, lower-right origin; ``preTokens = left``,
  ``nextTokens = right``, ``min(right, 0)`` when causal), i.e. bottom-right alignment, or
  top-left when every sequence has ``Sq == Skv``. A row whose band holds no key is an
  invalid row, which the TND operator cannot compute (``innerPrecise`` is reserved):
  refused.
* ALiBi: TND takes ``realShift`` only in its compressed ALiBi form (``[B, N, 1024, Skv]``,
  causal sequences with ``Sq == Skv > 1024``): not mapped.
* sequences with no query rows are dropped; sequences with no keys give zeros and an lse
  of ``-inf`` on the host (the operator documents no empty sequence).
"""

import math
from ctypes import create_string_buffer

import numpy as np

from . import _bands
from ._array import DTYPES, host_storage
from ._meta import DescriptorScope
from ._ops import (COMPRESSED_MASK_SIZE, FLASH_ATTENTION_DTYPES, FLASH_ATTENTION_MAX_HEAD_DIM,
                   FLASH_ATTENTION_MAX_HEADS, UNLIMITED_TOKENS, _CallResources, _check_dtypes,
                   _Operand, _run_operator, compressed_causal_mask)
from ._runtime import device_index, get_runtime

__all__ = ["flash_attention_varlen"]

OPERATOR = "aclnnFlashAttentionVarLenScore"
MAX_TOKENS = 1 << 20
SPARSE_NONE, SPARSE_CAUSAL_TOP_LEFT, SPARSE_CAUSAL_BOTTOM_RIGHT = 0, 2, 3
_LAYOUT_TND = create_string_buffer(b"TND")


def flash_attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                           causal_alignment="bottom_right", scale=None, window=None,
                           return_lse=False, device=0):
    """Attention over packed variable-length sequences with ``aclnnFlashAttentionVarLenScore``.

    Parameters
    ----------
    query : ndarray, shape (Tq, Hq, E)
    key : ndarray, shape (Tkv, Hkv, E)
    value : ndarray, shape (Tkv, Hkv, Ev)
        NumPy arrays of one dtype: float32, float16 or bfloat16; ``Hq % Hkv == 0``,
        ``Hq <= 256``, ``Ev <= E <= 768``, ``T <= 1M``.
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (batch + 1,)
        Cumulative lengths from 0 (flash-attn's), already validated by the caller.
    is_causal, causal_alignment, scale, window
        As in :func:`ascend.flash_attention`, per sequence.
    return_lse : bool
        Also return the log-sum-exp, shape (Hq, Tq), float32.
    device : int or str

    Returns
    -------
    out : ndarray, shape (Tq, Hq, Ev), dtype of ``query``
    lse : ndarray, shape (Hq, Tq), float32; only with ``return_lse``

    Examples
    --------
    >>> import numpy as np, ascend
    >>> x = np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32)
    >>> out = ascend.flash_attention_varlen(x, x, x, [0, 2, 5], [0, 2, 5], is_causal=True)
    >>> out.shape, bool(np.allclose(out[0], x[0]))       # row 0 sees only its own key
    ((5, 2, 8), True)
    """
    device = device_index(device)
    runtime = get_runtime()
    q, k, v = _Operand(query, "query"), _Operand(key, "key"), _Operand(value, "value")
    if any(o.device_array is not None for o in (q, k, v)):
        raise NotImplementedError(f"{OPERATOR}: DeviceArray inputs are not supported (the "
                                  "packed rows are arranged on the host)")
    name = _check_dtypes((q, k, v), FLASH_ATTENTION_DTYPES, OPERATOR)
    for operand, layout in ((q, "(Tq, Hq, E)"), (k, "(Tkv, Hkv, E)"), (v, "(Tkv, Hkv, Ev)")):
        if len(operand.shape) != 3:
            raise ValueError(f"{operand.what} must be 3-D {layout}, got {operand.shape}")
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, value_dim = v.shape
    if k.shape[:2] != (total_k, kv_heads) or k.shape[2] != head_dim:
        raise ValueError(f"inconsistent shapes: query {q.shape}, key {k.shape}, value {v.shape}")
    if kv_heads < 1 or heads % kv_heads or heads > FLASH_ATTENTION_MAX_HEADS:
        raise ValueError(f"{OPERATOR} needs Hq a multiple of Hkv, Hq <= "
                         f"{FLASH_ATTENTION_MAX_HEADS}; got Hq={heads}, Hkv={kv_heads}")
    if not 1 <= value_dim <= head_dim <= FLASH_ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"{OPERATOR} needs 1 <= Ev <= E <= {FLASH_ATTENTION_MAX_HEAD_DIM}, "
                         f"got E={head_dim}, Ev={value_dim}")
    if max(total_q, total_k) > MAX_TOKENS:
        raise ValueError(f"{OPERATOR} takes at most {MAX_TOKENS} tokens, got {total_q} query "
                         f"and {total_k} key tokens")
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got "
                         f"{causal_alignment!r}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    cq = np.asarray(cu_seqlens_q, dtype=np.int64)
    ck = np.asarray(cu_seqlens_k, dtype=np.int64)
    len_q, len_k = np.diff(cq), np.diff(ck)

    band = _bands.check_window(window, is_causal) if window is not None else None
    sparse_mode, pre, nxt = SPARSE_NONE, UNLIMITED_TOKENS, UNLIMITED_TOKENS
    run = (len_q > 0) & (len_k > 0)            # the sequences the operator computes
    if band is not None:
        if causal_alignment == "top_left" and (len_q[run] != len_k[run]).any():
            raise NotImplementedError(
                f"{OPERATOR}: a top-left window needs Sq == Skv in every sequence (sparse "
                f"mode 4 is the lower-right band)")
        left, right = band
        if right is not None and (len_q[run] - len_k[run] > right).any():
            raise NotImplementedError(
                f"{OPERATOR}: the window leaves rows without keys (Sq - Skv > right in a "
                f"sequence); the TND operator cannot compute invalid rows")
        sparse_mode = _bands.SPARSE_BAND
        pre = UNLIMITED_TOKENS if left is None else left
        nxt = UNLIMITED_TOKENS if right is None else right
    elif is_causal and causal_alignment == "top_left":
        sparse_mode = SPARSE_CAUSAL_TOP_LEFT
    elif is_causal:
        if (len_q[run] > len_k[run]).any():
            raise NotImplementedError(
                f"{OPERATOR}: bottom-right causal (sparse mode 3) needs Sq <= Skv in every "
                f"sequence (invalid rows are not supported)")
        sparse_mode = SPARSE_CAUSAL_BOTTOM_RIGHT

    out = np.zeros((total_q, heads, value_dim), dtype=q.value.dtype)
    lse = np.full((heads, total_q), -np.inf, dtype=np.float32)
    if run.any():
        rows_q = np.concatenate([np.arange(cq[b], cq[b + 1]) for b in np.flatnonzero(run)])
        rows_k = np.concatenate([np.arange(ck[b], ck[b + 1]) for b in np.flatnonzero(run)])
        whole = rows_q.size == total_q and rows_k.size == total_k
        qh, kh, vh = q.value, k.value, v.value
        if not whole:
            qh, kh, vh = q.value[rows_q], k.value[rows_k], v.value[rows_k]
        ends_q, ends_k = np.cumsum(len_q[run]), np.cumsum(len_k[run])
        res, row_lse = _launch(runtime, device, name, qh, kh, vh, ends_q, ends_k, scale, pre,
                               nxt, sparse_mode)
        out[rows_q] = res
        lse[:, rows_q] = row_lse
    return (out, lse) if return_lse else out


def _launch(runtime, device, name, q, k, v, ends_q, ends_k, scale, pre, nxt, sparse_mode):
    total_q, heads, _ = q.shape
    value_dim = v.shape[2]
    acl_dtype = DTYPES[name][0]
    out_shape, stats_shape = (total_q, heads, value_dim), (heads, total_q, 8)
    with _CallResources(runtime, device) as resources, \
            DescriptorScope(runtime.lib, runtime.descriptors) as scope:
        tensors = [scope.tensor(resources.upload(host_storage(a, name)).ptr, a.shape, acl_dtype)
                   for a in (q, k, v)]
        mask_tensor = None
        if sparse_mode != SPARSE_NONE:
            mask = runtime.constant(device, "compressed_causal_mask", compressed_causal_mask)
            mask_tensor = scope.tensor(mask.ptr, (COMPRESSED_MASK_SIZE,) * 2,
                                       DTYPES["bool"][0])
        out_buffer = resources.scratch(math.prod(out_shape) * DTYPES[name][1].itemsize)
        max_buffer = resources.scratch(math.prod(stats_shape) * 4)
        sum_buffer = resources.scratch(math.prod(stats_shape) * 4)
        acl_float = DTYPES["float32"][0]
        arguments = [
            *tensors, None, None, None, mask_tensor, None,
            scope.int_array(ends_q), scope.int_array(ends_k),
            scale, 1.0, pre, nxt, heads, _LAYOUT_TND, 0, sparse_mode,
            scope.tensor(max_buffer.ptr, stats_shape, acl_float),
            scope.tensor(sum_buffer.ptr, stats_shape, acl_float),
            scope.tensor(None, (0,), acl_dtype),  # softmaxOut: reserved, empty
            scope.tensor(out_buffer.ptr, out_shape, acl_dtype),
        ]
        _run_operator(runtime, device, OPERATOR, arguments)
        row_max = np.empty(stats_shape, np.float32)
        row_sum = np.empty(stats_shape, np.float32)
        runtime.download(max_buffer, row_max)
        runtime.download(sum_buffer, row_sum)
        out = resources.deliver(out_buffer, out_shape, name, False)
    row_max, row_sum = row_max[..., 0], row_sum[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(row_sum > 0, row_max + np.log(row_sum), -np.inf).astype(np.float32)
    return out, lse
