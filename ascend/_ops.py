"""Attention on the NPU: aclnnFlashAttentionScore and aclnnIncreFlashAttentionV4.

Each public function

1. describes its inputs (shape, dtype, host or device) without copying,
2. validates them against the operator's documented limits, so misuse is a
   Python exception rather than a device fault,
3. converts fastattn conventions to Ascend ones (bool masks: True = keep
   becomes 1 = masked out; additive masks become ``realShift``; causal
   becomes sparse mode 2/3 with the 2048x2048 compressed mask; fastattn's
   paged KV layout already is the (blocknum, KV_N, blockSize, D) cache layout),
4. runs the two-phase call on the device's stream and synchronises.

Device buffers taken for the call (uploads, workspace, softmax statistics)
go back to the pool when it ends, also when it fails.
"""

import math
from ctypes import byref, c_uint64, create_string_buffer

import numpy as np

from . import _bands
from ._array import DTYPES, DeviceArray, download, dtype_name, host_storage
from ._library import ExecutorRef
from ._meta import DescriptorScope
from ._owner import Owner
from ._runtime import device_index, get_runtime

__all__ = ["flash_attention", "paged_attention", "check_paged_cache"]

FLASH_ATTENTION_DTYPES = ("float32", "float16", "bfloat16")
INCRE_FLASH_ATTENTION_DTYPES = ("float16", "bfloat16")
FLASH_ATTENTION_MAX_HEADS, FLASH_ATTENTION_MAX_HEAD_DIM = 256, 768
INCRE_MAX_BATCH, INCRE_MAX_HEADS, INCRE_MAX_HEAD_DIM, INCRE_MAX_GROUP = 65536, 256, 512, 64
INCRE_MAX_BLOCK_SIZE, INCRE_BLOCK_ALIGN = 512, 16

SPARSE_NONE, SPARSE_CAUSAL_TOP_LEFT, SPARSE_CAUSAL_BOTTOM_RIGHT = 0, 2, 3
INNER_PRECISE_DEFAULT, INNER_PRECISE_MASKED_ROWS = 0, 2  # 2: fully masked rows give zeros
INCRE_INNER_PRECISE_PERFORMANCE = 1
UNLIMITED_TOKENS = 2147483647  # preTokens/nextTokens default (no band)
COMPRESSED_MASK_SIZE = 2048
_LAYOUT_BNSD = create_string_buffer(b"BNSD")  # char * in the C API: a writable buffer


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

class _Operand:
    """An input as the call sees it: shape, dtype name, and where it lives."""

    __slots__ = ("value", "shape", "name", "device_array", "what")

    def __init__(self, value, what):
        self.what = what
        if isinstance(value, DeviceArray):
            value._live_buffer()  # use after free -> ValueError here
            self.device_array, self.value = value, value
            self.shape, self.name = value.shape, value._dtype_name
        else:
            array = np.asarray(value)
            self.device_array, self.value = None, array
            self.shape, self.name = array.shape, dtype_name(array.dtype)

    def host(self):
        """The value as a NumPy array (downloads a DeviceArray)."""
        return self.value.to_numpy() if self.device_array is not None else self.value


def _check_devices(operands, device):
    for operand in operands:
        array = operand.device_array
        if array is not None and array.device != device:
            raise ValueError(f"{operand.what} is on npu:{array.device} but the call runs on "
                             f"npu:{device}; all DeviceArrays of a call must be on its device")


def _check_dtypes(operands, allowed, operator):
    names = {operand.name for operand in operands}
    if len(names) != 1:
        listing = ", ".join(f"{o.what}={o.name}" for o in operands)
        raise TypeError(f"{operator} needs one dtype for all inputs, got {listing}")
    name = names.pop()
    if name not in allowed:
        raise TypeError(f"{operator} supports dtypes {', '.join(allowed)}; got {name}"
                        + ("" if name != "float64" else " (convert with .astype(np.float32))"))
    return name


def _check_rank(operand, expected, layout):
    if len(operand.shape) != expected:
        raise ValueError(f"{operand.what} must be {expected}-D {layout}, got shape {operand.shape}")


class _CallResources(Owner):
    """Device buffers of one call (an :class:`~ascend._owner.Owner`): on close, every
    temporary goes back to the pool; buffers delivered as DeviceArrays are theirs."""

    def __init__(self, runtime, device):
        self.runtime, self.device = runtime, device
        self._temporary = []
        Owner.__init__(self)

    def _release(self):
        temporary, self._temporary = self._temporary, []
        for buffer in temporary:
            self.runtime.release(buffer)

    def scratch(self, nbytes):
        if not self._open:
            self._check_open()
        buffer = self.runtime.allocate(self.device, nbytes)
        self._temporary.append(buffer)
        return buffer

    def place(self, operand):
        """Device pointer of ``operand``, uploading host data into a temporary buffer."""
        if not self._open:
            self._check_open()
        if operand.device_array is not None:
            return operand.device_array._live_buffer().ptr
        return self.upload(host_storage(operand.value, operand.name)).ptr

    def upload(self, host):
        buffer = self.scratch(host.nbytes)
        if host.nbytes:
            self.runtime.upload(buffer, host)
        return buffer

    def deliver(self, buffer, shape, name, on_device):
        """The result in ``buffer``: a DeviceArray (which then owns it) or a NumPy copy
        (the buffer stays a temporary)."""
        if not self._open:
            self._check_open()
        if not on_device:
            return download(self.runtime, buffer, shape, name)
        self._temporary.remove(buffer)
        return DeviceArray(buffer, shape, name, self.runtime)


class _Executor(Owner):
    """The ``aclOpExecutor`` of one two-phase call (an :class:`~ascend._owner.Owner`).

    Phase 1 writes it into :attr:`handle`. CANN documents two lifetimes
    (hiascend aolapi "aclDestroyAclOpExecutor", "aclSetAclOpExecutorRepeatable"):
    a single-use executor is created by phase 1 and released by phase 2, and
    nothing else may release it; a repeatable one belongs to the caller until
    ``aclDestroyAclOpExecutor``, the only use that function is documented for.
    When something between the phases can fail (a workspace that needs a new
    ``aclrtMalloc``; one taken from the pool cannot fail), :meth:`adopt`, called
    right after phase 1, makes the executor repeatable, so that this object can
    destroy it on close, after the launch or instead of it. Otherwise it stays
    single-use and the launch releases it. If the operator refuses reuse (the
    documented limits: operators that copy between host and device inside, or
    create device tensors), the executor stays single-use too; closed without a
    launch, it is then left to CANN, as no documented call releases it.
    """

    def __init__(self, meta):
        self._meta = meta
        self.handle = ExecutorRef()  # NULL until phase 1 succeeds
        self.repeatable = False
        Owner.__init__(self)

    def _release(self):
        handle, self.handle = self.handle, None
        if handle and self.repeatable:
            self._meta.aclDestroyAclOpExecutor(handle)

    def adopt(self):
        """Right after phase 1: make the executor repeatable (owned by this object)."""
        if not self._open:
            self._check_open()
        self.repeatable = self._meta.aclSetAclOpExecutorRepeatable(self.handle) == 0

    def launch(self, operator, workspace, workspace_size, stream):
        """Phase 2 of ``operator``; returns its status. Closes this object."""
        if not self._open:
            self._check_open()
        handle = self.handle
        if not self.repeatable:
            self.handle = None  # phase 2 consumes a single-use executor, whatever its status
        try:
            return operator.launch(workspace, workspace_size, handle, stream)
        finally:
            self.close()


def _run_operator(runtime, device, operator_name, phase1_arguments):
    """Two-phase aclnn call: workspace size + executor, workspace, launch, synchronise.

    The workspace is taken from the pool for this launch only and returned once
    the stream is synchronised (or the call failed).
    """
    operator = runtime.lib.operator(operator_name)
    stream = runtime.activate(device)
    workspace_size = c_uint64(0)
    workspace = None
    try:
        with _Executor(runtime.lib.meta) as executor:
            runtime.lib.check(operator.get_workspace_size(*phase1_arguments,
                                                          byref(workspace_size),
                                                          byref(executor.handle)),
                              operator.phase1_name)
            if workspace_size.value:
                workspace = runtime.take_idle(device, workspace_size.value)
                if workspace is None:  # a new allocation can fail: own the executor first
                    executor.adopt()
                    workspace = runtime.allocate(device, workspace_size.value)
            runtime.lib.check(executor.launch(operator, workspace.ptr if workspace else None,
                                              workspace_size.value, stream), operator.name)
        runtime.lib.check(runtime.lib.acl.aclrtSynchronizeStream(stream),
                          "aclrtSynchronizeStream")
    finally:
        if workspace is not None:
            runtime.release(workspace)


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------

def causal_keep(query_length, key_length, alignment):
    """Boolean (L, S) matrix, True = attend, for a causal mask of the given alignment.

    Examples
    --------
    >>> from ascend._ops import causal_keep
    >>> causal_keep(2, 3, "top_left").astype(int)
    array([[1, 0, 0],
           [1, 1, 0]])
    >>> causal_keep(2, 3, "bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    offset = 0 if alignment == "top_left" else key_length - query_length
    rows = np.arange(query_length)[:, None]
    return np.arange(key_length)[None, :] <= rows + offset


def compressed_causal_mask():
    """The 2048x2048 mask sparse modes 2/3 require: ``triu(ones, 1)``, 1 = masked out."""
    return np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), dtype=np.bool_), 1)


class _MaskPlan:
    """What to pass as attenMask / realShift / sparseMode / innerPrecise, and the band's
    preTokens / nextTokens (sparse mode 4, see ``_bands``)."""

    __slots__ = ("masked_out", "compressed", "pse", "sparse_mode", "inner_precise",
                 "pre_tokens", "next_tokens")

    def __init__(self, masked_out=None, compressed=False, pse=None,
                 sparse_mode=SPARSE_NONE, inner_precise=INNER_PRECISE_DEFAULT):
        self.masked_out, self.compressed, self.pse = masked_out, compressed, pse
        self.sparse_mode, self.inner_precise = sparse_mode, inner_precise
        self.pre_tokens = self.next_tokens = UNLIMITED_TOKENS


def _plan_mask(attn_mask, is_causal, alignment, full_shape, scale, storage_name):
    batch, heads, query_length, key_length = full_shape
    if attn_mask is None:
        if not is_causal:
            return _MaskPlan()
        if alignment == "top_left":
            return _MaskPlan(compressed=True, sparse_mode=SPARSE_CAUSAL_TOP_LEFT)
        # bottom-right with L > S leaves the first L - S rows without any key
        return _MaskPlan(compressed=True, sparse_mode=SPARSE_CAUSAL_BOTTOM_RIGHT,
                         inner_precise=INNER_PRECISE_MASKED_ROWS
                         if query_length > key_length else INNER_PRECISE_DEFAULT)
    if isinstance(attn_mask, DeviceArray):
        raise TypeError("attn_mask must be a NumPy array (it is converted to Ascend's "
                        "polarity on the host); DeviceArray masks are not supported")
    mask = np.asarray(attn_mask)
    if mask.ndim > 4 or _broadcast_shape(mask.shape, full_shape) != full_shape:
        raise ValueError(f"attn_mask of shape {mask.shape} does not broadcast to "
                         f"(B, Hq, L, S) = {full_shape}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    bias = None
    if mask.dtype == np.bool_:
        keep = mask
    elif mask.dtype.kind == "f" or dtype_name(mask.dtype) == "bfloat16":
        if mask.dtype.itemsize < 4:  # float16/bfloat16: the arithmetic below in float32
            mask = mask.astype(np.float32)
        if np.isnan(mask).any() or np.isposinf(mask).any():
            raise ValueError("additive attn_mask must not contain NaN or +inf")
        keep = ~np.isneginf(mask)  # -inf entries become masked-out bits, not -inf biases
        bias = np.where(keep, mask, 0.0)
        if not bias.any():
            bias = None
    else:
        raise TypeError(f"attn_mask must be bool (True = keep) or floating (additive), "
                        f"got {mask.dtype}")
    if is_causal:
        keep = keep & causal_keep(query_length, key_length, alignment)
    plan = _MaskPlan()
    if not keep.all():
        plan.masked_out = _mask_in_supported_shape(~keep, full_shape)  # Ascend: 1 = masked
        plan.inner_precise = INNER_PRECISE_MASKED_ROWS
    if bias is not None:
        # realShift is added before scaling: scale * (QK^T + pse) = scale * QK^T + bias
        plan.pse = host_storage(_pse_in_supported_shape(bias / scale, full_shape), storage_name)
    return plan


def _mask_tensors(plan, runtime, device, resources, scope, acl_dtype):
    """``(attenMask, realShift)`` descriptors of a :class:`_MaskPlan` (None when absent):
    the cached compressed causal mask, or the uploaded mask and bias."""
    mask_tensor = pse_tensor = None
    if plan.compressed:
        mask = runtime.constant(device, "compressed_causal_mask", compressed_causal_mask)
        mask_tensor = scope.tensor(mask.ptr, (COMPRESSED_MASK_SIZE,) * 2, DTYPES["bool"][0])
    elif plan.masked_out is not None:
        mask_tensor = scope.tensor(resources.upload(plan.masked_out).ptr,
                                   plan.masked_out.shape, DTYPES["bool"][0])
    if plan.pse is not None:
        pse_tensor = scope.tensor(resources.upload(plan.pse).ptr, plan.pse.shape, acl_dtype)
    return mask_tensor, pse_tensor


def _broadcast_shape(shape, full_shape):
    try:
        return np.broadcast_shapes(shape, full_shape)
    except ValueError:
        return None


def _mask_in_supported_shape(mask, full_shape):
    """attenMask shapes: [B,N,L,S], [B,1,L,S] or [L,S] (= [1,1,L,S])."""
    batch, heads, length, key_length = full_shape
    if mask.shape[1] != 1:
        target = (batch, heads, length, key_length)
    elif mask.shape[0] != 1:
        target = (batch, 1, length, key_length)
    else:
        return np.ascontiguousarray(np.broadcast_to(mask[0, 0], (length, key_length)))
    return np.ascontiguousarray(np.broadcast_to(mask, target))


def _pse_in_supported_shape(pse, full_shape):
    """realShift shapes: [B,N,L,S], [B,N,1,S] or [1,N,L,S]."""
    batch, heads, length, key_length = full_shape
    if pse.shape[2] == 1:
        target = (batch, heads, 1, key_length)
    elif pse.shape[0] == 1:
        target = (1, heads, length, key_length)
    else:
        target = (batch, heads, length, key_length)
    return np.broadcast_to(pse, target)


# ---------------------------------------------------------------------------
# dense attention
# ---------------------------------------------------------------------------

def _flash_shapes(q, k, v, operator):
    """``(B, Hq, L, E, Hkv, S, Ev)`` of BNSD operands, checked against the limits that
    aclnnFlashAttentionScore and aclnnFlashAttentionScoreGrad document alike."""
    for operand, layout in ((q, "(B, Hq, L, E)"), (k, "(B, Hkv, S, E)"), (v, "(B, Hkv, S, Ev)")):
        _check_rank(operand, 4, layout)
    batch, heads, length, head_dim = q.shape
    kv_heads, key_length, value_dim = k.shape[1], k.shape[2], v.shape[3]
    if k.shape[0] != batch or v.shape[0] != batch or v.shape[1] != kv_heads \
            or v.shape[2] != key_length or k.shape[3] != head_dim:
        raise ValueError(f"inconsistent shapes: query {q.shape}, key {k.shape}, value {v.shape}")
    if min(q.shape + k.shape + v.shape) < 1:
        raise ValueError(f"empty query/key/value are not supported by {operator}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads "
                         f"({kv_heads})")
    if heads > FLASH_ATTENTION_MAX_HEADS:
        raise ValueError(f"{operator} supports at most {FLASH_ATTENTION_MAX_HEADS} heads, "
                         f"got {heads}")
    if head_dim > FLASH_ATTENTION_MAX_HEAD_DIM or value_dim > head_dim:
        raise ValueError(f"{operator} needs Ev <= E <= {FLASH_ATTENTION_MAX_HEAD_DIM}, got "
                         f"E={head_dim}, Ev={value_dim}")
    return batch, heads, length, head_dim, kv_heads, key_length, value_dim


def _flash_options(causal_alignment, scale, head_dim):
    """The checked scale (default ``1 / sqrt(E)``), after checking ``causal_alignment``."""
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', "
                         f"got {causal_alignment!r}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    return scale


def flash_attention(query, key, value, attn_mask=None, *, is_causal=False,
                    causal_alignment="top_left", scale=None, return_lse=False, device=0,
                    window=None, alibi_slopes=None):
    """Scaled dot-product attention with ``aclnnFlashAttentionScore`` (layout BNSD).

    Parameters
    ----------
    query : ndarray or DeviceArray, shape (B, Hq, L, E)
    key : ndarray or DeviceArray, shape (B, Hkv, S, E)
    value : ndarray or DeviceArray, shape (B, Hkv, S, Ev)
        One dtype for all three: float32, float16 or bfloat16. ``Hq % Hkv == 0``
        (grouped-query attention), ``Hq <= 256``, ``Ev <= E <= 768``.
    attn_mask : ndarray, optional
        Broadcastable to (B, Hq, L, S). bool: True = attend (converted to
        Ascend's 1 = masked out); float: added to the scaled scores (-inf
        entries become masked-out positions). Rows with no key give zeros.
    is_causal : bool
        Causal mask, combined with ``attn_mask`` if both are given.
    causal_alignment : {"top_left", "bottom_right"}
        Query i sees keys ``j <= i`` (sparse mode 2) or ``j <= i + S - L`` (sparse mode 3).
    scale : float, optional
        Defaults to ``1 / sqrt(E)``.
    return_lse : bool
        Also return the log-sum-exp of the scaled scores, shape (B, Hq, L), float32.
    device : int or str
        Device index or ``"npu[:N]"``. DeviceArray inputs must live on it.
    window : (int or None, int or None), optional
        Sliding window: query ``i`` sees key ``j`` iff ``i + off - left <= j <= i + off +
        right`` (``off = S - L`` bottom-right, 0 top-left; None or -1: unbounded).
        Sparse mode 4 (``preTokens = left``, ``nextTokens = right``) for bottom-right
        or ``L == S``, else folded into the attenMask (see ``ascend._bands``).
    alibi_slopes : array_like, shape (Hq,) or (B, Hq), optional
        ALiBi, ``-slope * |i + off - j|`` added to the scaled scores, passed as the
        ``pse`` input (``realShift``, ``bias / scale``; an ``(L, S)`` plane per head).

    Returns
    -------
    out : ndarray or DeviceArray, shape (B, Hq, L, Ev), dtype of ``query``
        A DeviceArray if any of query/key/value is one, else NumPy.
    lse : ndarray or DeviceArray, optional
        If ``return_lse``.

    Examples
    --------
    >>> import numpy as np, ascend
    >>> q = np.random.default_rng(0).standard_normal((1, 2, 4, 8)).astype(np.float32)
    >>> out = ascend.flash_attention(q, q, q, is_causal=True)
    >>> type(out).__name__, out.shape, out.dtype
    ('ndarray', (1, 2, 4, 8), dtype('float32'))
    >>> out[0, 0, 0].tolist() == q[0, 0, 0].tolist()   # causal: query 0 sees only key 0
    True

    With DeviceArray inputs the result stays on the device:

    >>> with ascend.to_device(q) as q_dev:
    ...     out_dev, lse = ascend.flash_attention(q_dev, q_dev, q_dev, return_lse=True)
    >>> out_dev, lse.shape
    (DeviceArray(shape=(1, 2, 4, 8), dtype=float32, device='npu:0'), (1, 2, 4))
    >>> out_dev.close(); lse.close()
    """
    device = device_index(device)
    runtime = get_runtime()
    q, k, v = _Operand(query, "query"), _Operand(key, "key"), _Operand(value, "value")
    operands = (q, k, v)
    _check_devices(operands, device)
    name = _check_dtypes(operands, FLASH_ATTENTION_DTYPES, "aclnnFlashAttentionScore")
    batch, heads, length, head_dim, kv_heads, key_length, value_dim = _flash_shapes(
        q, k, v, "aclnnFlashAttentionScore")
    scale = _flash_options(causal_alignment, scale, head_dim)
    if window is None and alibi_slopes is None:
        plan = _plan_mask(attn_mask, is_causal, causal_alignment,
                          (batch, heads, length, key_length), scale, name)
    else:
        plan = _bands.plan_modifiers(_plan_mask, attn_mask, is_causal, causal_alignment,
                                     (batch, heads, length, key_length), scale, name, window,
                                     alibi_slopes, _MaskPlan)

    on_device = any(o.device_array is not None for o in operands)
    acl_dtype = DTYPES[name][0]
    out_shape, stats_shape = (batch, heads, length, value_dim), (batch, heads, length, 8)
    with _CallResources(runtime, device) as resources, \
            DescriptorScope(runtime.lib, runtime.descriptors) as scope:
        tensors = [scope.tensor(resources.place(o), o.shape, acl_dtype) for o in operands]
        mask_tensor, pse_tensor = _mask_tensors(plan, runtime, device, resources, scope,
                                                acl_dtype)
        out_buffer = resources.scratch(math.prod(out_shape) * DTYPES[name][1].itemsize)
        max_buffer = resources.scratch(math.prod(stats_shape) * 4)
        sum_buffer = resources.scratch(math.prod(stats_shape) * 4)
        acl_float = DTYPES["float32"][0]
        arguments = [
            *tensors, pse_tensor, None, None, mask_tensor, None,
            scale, 1.0, plan.pre_tokens, plan.next_tokens, heads, _LAYOUT_BNSD,
            plan.inner_precise, plan.sparse_mode,
            scope.tensor(max_buffer.ptr, stats_shape, acl_float),
            scope.tensor(sum_buffer.ptr, stats_shape, acl_float),
            scope.tensor(None, (0,), acl_dtype),  # softmaxOut: reserved, empty
            scope.tensor(out_buffer.ptr, out_shape, acl_dtype),
        ]
        _run_operator(runtime, device, "aclnnFlashAttentionScore", arguments)
        if not return_lse:
            return resources.deliver(out_buffer, out_shape, name, on_device)
        # every device copy first: a failure then leaves nothing delivered outside the pool
        lse = _log_sum_exp(runtime, max_buffer, sum_buffer, stats_shape)
        if not on_device:
            return resources.deliver(out_buffer, out_shape, name, False), lse
        lse_buffer = resources.upload(lse)
        return (resources.deliver(out_buffer, out_shape, name, True),
                resources.deliver(lse_buffer, lse.shape, "float32", True))


def _log_sum_exp(runtime, max_buffer, sum_buffer, stats_shape):
    """lse = max + log(sum) from the (replicated x8) softmax statistics; -inf for empty rows."""
    row_max = np.empty(stats_shape, np.float32)
    row_sum = np.empty(stats_shape, np.float32)
    runtime.download(max_buffer, row_max)
    runtime.download(sum_buffer, row_sum)
    row_max, row_sum = row_max[..., 0], row_sum[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = row_max + np.log(row_sum)
    return np.where(row_sum > 0, lse, -np.inf).astype(np.float32)


# ---------------------------------------------------------------------------
# paged decoding
# ---------------------------------------------------------------------------

def check_paged_cache(key_shape, value_shape, dtype):
    """Raise unless block pools of these shapes and dtype suit :func:`paged_attention`.

    The cache checks of :func:`paged_attention`, for code that allocates a
    resident cache: checked before allocating, a cache the operator cannot
    use is an error at construction rather than at the first call.

    Parameters
    ----------
    key_shape, value_shape : tuple of int
        ``(num_blocks, Hkv, block_size, D)``, equal.
    dtype : dtype or str
        float16 or bfloat16.

    Raises
    ------
    TypeError
        For another dtype.
    ValueError
        For shapes that differ or are not 4-D, ``Hkv`` outside [1, 256], ``D``
        outside [1, 512], or ``block_size`` not a multiple of 16 in [16, 512].

    Examples
    --------
    >>> from ascend import check_paged_cache
    >>> check_paged_cache((64, 8, 128, 128), (64, 8, 128, 128), "float16")
    >>> check_paged_cache((64, 8, 100, 128), (64, 8, 100, 128), "float16")
    Traceback (most recent call last):
        ...
    ValueError: aclnnIncreFlashAttentionV4 needs block_size a multiple of 16 in [16, 512], got 100
    """
    operator = "aclnnIncreFlashAttentionV4"
    name = dtype_name(dtype)
    if name not in INCRE_FLASH_ATTENTION_DTYPES:
        raise TypeError(f"{operator} supports dtypes {', '.join(INCRE_FLASH_ATTENTION_DTYPES)}; "
                        f"got {name}")
    key_shape, value_shape = tuple(key_shape), tuple(value_shape)
    if len(key_shape) != 4 or value_shape != key_shape:
        raise ValueError(f"key_blocks {key_shape} and value_blocks {value_shape} must have one "
                         f"shape (num_blocks, Hkv, block_size, D)")
    _, kv_heads, block_size, head_dim = key_shape
    if not (1 <= kv_heads <= INCRE_MAX_HEADS and 1 <= head_dim <= INCRE_MAX_HEAD_DIM):
        raise ValueError(f"{operator} limits: 1 <= Hkv <= {INCRE_MAX_HEADS}, 1 <= D <= "
                         f"{INCRE_MAX_HEAD_DIM}; got Hkv={kv_heads}, D={head_dim}")
    if block_size % INCRE_BLOCK_ALIGN or not 0 < block_size <= INCRE_MAX_BLOCK_SIZE:
        raise ValueError(f"{operator} needs block_size a multiple of {INCRE_BLOCK_ALIGN} in "
                         f"[{INCRE_BLOCK_ALIGN}, {INCRE_MAX_BLOCK_SIZE}], got {block_size}")


def paged_attention(query, key_blocks, value_blocks, block_table, seq_lens, *, scale=None,
                    causal=True, return_lse=False, device=0):
    """Attention over a paged KV cache with ``aclnnIncreFlashAttentionV4``.

    Parameters
    ----------
    query : ndarray or DeviceArray, shape (B, H, T, D)
        The T newest tokens of each sequence (T = 1 for decoding).
    key_blocks, value_blocks : ndarray or DeviceArray, shape (num_blocks, Hkv, block_size, D)
        fastattn's cache layout, which is the operator's (blocknum, KV_N,
        blockSize, D) layout, so resident caches are used without copies.
        ``block_size`` must be a multiple of 16 in [16, 512].
    block_table : ndarray or DeviceArray of int32, shape (B, max_blocks)
        Physical block of each logical block of each sequence.
    seq_lens : array_like of int, shape (B,)
        Tokens in the cache per sequence, including the T query tokens.
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        With T > 1, query token t sees the first ``seq_len - T + t + 1`` cached
        tokens; otherwise every query token sees ``seq_len`` tokens.
    return_lse : bool
        Not supported: the operator does not return the log-sum-exp.
    device : int or str

    Returns
    -------
    ndarray or DeviceArray, shape (B, H, T, D)

    Notes
    -----
    dtypes float16 and bfloat16 only (the operator has no float32), H <= 256,
    D <= 512, H / Hkv <= 64. The operator takes one query token per sequence;
    T > 1 is run as B * T sequences sharing block-table rows, which costs a host
    round trip of the query and output. The operator also needs the pool to hold
    at least the sum over its batch of the blocks each sequence reads (shared
    blocks count once per sequence) and at most 65536 sequences: a batch that
    needs more (folded tokens, forked sequences sharing blocks) is run as several
    launches over consecutive rows. A single sequence that reads more blocks
    than the pool has (a table repeating blocks) raises ``ValueError``.

    Examples
    --------
    >>> import numpy as np, ascend
    >>> rng = np.random.default_rng(0)
    >>> cache = rng.standard_normal((4, 1, 16, 8)).astype(np.float16)
    >>> q = rng.standard_normal((2, 2, 1, 8)).astype(np.float16)
    >>> table = np.array([[0, 1], [2, 3]], np.int32)
    >>> out = ascend.paged_attention(q, cache, cache, table, [20, 5])
    >>> out.shape, out.dtype
    ((2, 2, 1, 8), dtype('float16'))
    >>> ascend.paged_attention(q, cache, cache, table, [20, 40])
    Traceback (most recent call last):
        ...
    ValueError: seq_lens must lie in [1, 32] (max_blocks * block_size), got [20, 40]
    """
    device = device_index(device)
    runtime = get_runtime()
    operator = "aclnnIncreFlashAttentionV4"
    if return_lse:
        raise NotImplementedError(f"{operator} does not return the log-sum-exp; use "
                                  "return_lse=False (or flash_attention on gathered K/V)")
    q = _Operand(query, "query")
    k, v = _Operand(key_blocks, "key_blocks"), _Operand(value_blocks, "value_blocks")
    table = _Operand(block_table, "block_table")
    _check_devices((q, k, v, table), device)
    name = _check_dtypes((q, k, v), INCRE_FLASH_ATTENTION_DTYPES, operator)
    _check_rank(q, 4, "(B, H, T, D)")
    _check_rank(k, 4, "(num_blocks, Hkv, block_size, D)")
    _check_rank(v, 4, "(num_blocks, Hkv, block_size, D)")
    _check_rank(table, 2, "(B, max_blocks)")
    batch, heads, tokens, head_dim = q.shape
    num_blocks, kv_heads, block_size = k.shape[:3]
    if v.shape != k.shape or k.shape[3] != head_dim:
        raise ValueError(f"key_blocks {k.shape} and value_blocks {v.shape} must have one shape "
                         f"(num_blocks, Hkv, block_size, D) with D = {head_dim}")
    if min(q.shape + k.shape) < 1:
        raise ValueError("empty query or cache")
    check_paged_cache(k.shape, v.shape, name)
    if heads % kv_heads or heads // kv_heads > INCRE_MAX_GROUP:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads "
                         f"({kv_heads}) with ratio <= {INCRE_MAX_GROUP}")
    if heads > INCRE_MAX_HEADS:
        raise ValueError(f"{operator} supports at most {INCRE_MAX_HEADS} heads, got {heads}")
    if table.name != "int32" and not (table.device_array is None
                                      and np.issubdtype(table.value.dtype, np.integer)):
        raise TypeError(f"block_table must be int32, got {table.name}")
    if table.shape[0] != batch:
        raise ValueError(f"block_table has {table.shape[0]} rows for a batch of {batch}")
    lengths = np.asarray(seq_lens.to_numpy() if isinstance(seq_lens, DeviceArray) else seq_lens)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"seq_lens must be {batch} integers, got {lengths.dtype} {lengths.shape}")
    capacity = table.shape[1] * block_size
    if lengths.min() < (tokens if causal else 0) or lengths.max() > capacity:
        raise ValueError(f"seq_lens must lie in [{tokens if causal else 0}, {capacity}] "
                         f"(max_blocks * block_size), got {lengths.tolist()}")
    table_host = None
    if table.device_array is None or tokens > 1:
        table_host = table.host()
        needed = (np.arange(table.shape[1])[None, :] * block_size) < lengths[:, None]
        used = table_host[needed]
        if used.size and (used.min() < 0 or used.max() >= num_blocks):
            raise ValueError(f"block_table refers to blocks outside [0, {num_blocks})")
        table_host = np.ascontiguousarray(table_host, dtype=np.int32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")

    on_device = q.device_array is not None
    if tokens > 1:
        # One operator "sequence" per (b, t): query rows (B*T, H, 1, D), table rows
        # repeated T times, and per-token lengths that realise the causal limit.
        q = _Operand(np.ascontiguousarray(q.host().transpose(0, 2, 1, 3)).reshape(
            batch * tokens, heads, 1, head_dim), "query")
        q.name = name  # bfloat16 comes back from the device as float32 without ml_dtypes
        offsets = np.arange(tokens) - (tokens - 1) if causal else np.zeros(tokens, np.int64)
        lengths = (lengths[:, None] + offsets[None, :]).reshape(-1)
        table_host = np.repeat(table_host, tokens, axis=0)
        table = _Operand(table_host, "block_table")
    elif table_host is not None:
        table = _Operand(table_host, "block_table")

    chunks = _paged_launches(lengths, block_size, num_blocks)
    acl_dtype = DTYPES[name][0]
    rows = q.shape[0]
    out_shape = (rows, heads, 1, head_dim)
    max_blocks = table.shape[1]
    with _CallResources(runtime, device) as resources, \
            DescriptorScope(runtime.lib, runtime.descriptors) as scope:
        query_pointer = resources.place(q)
        key_list, value_list = (
            scope.tensor_list([scope.tensor(resources.place(o), o.shape, acl_dtype,
                                            cacheable=False)])
            for o in (k, v))
        table_pointer = resources.place(table)
        out_buffer = resources.scratch(math.prod(out_shape) * DTYPES[name][1].itemsize)
        acl_int32 = DTYPES["int32"][0]
        for first, stop in chunks:  # rows [first, stop): views at an element offset
            count = stop - first
            row_shape = (count, heads, 1, head_dim)
            row_offset = first * heads * head_dim
            arguments = [
                scope.tensor(query_pointer, row_shape, acl_dtype, offset=row_offset),
                key_list, value_list, None, None, scope.int_array(lengths[first:stop]),
                None, None, None, None, None, None, None,   # quantisation: unused
                scope.tensor(table_pointer, (count, max_blocks), acl_int32,
                             offset=first * max_blocks),
                None,                                       # kvPaddingSize
                heads, scale, _LAYOUT_BNSD, kv_heads, block_size,
                INCRE_INNER_PRECISE_PERFORMANCE,
                scope.tensor(out_buffer.ptr, row_shape, acl_dtype, offset=row_offset),
            ]
            _run_operator(runtime, device, operator, arguments)
        if tokens == 1:
            return resources.deliver(out_buffer, (batch, heads, 1, head_dim), name, on_device)
        folded = resources.deliver(out_buffer, out_shape, name, False)
        out = np.ascontiguousarray(
            folded.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3))
        if on_device:
            return resources.deliver(resources.upload(host_storage(out, name)), out.shape,
                                     name, True)
        return out


def _paged_launches(lengths, block_size, num_blocks):
    """Row ranges ``[(first, stop), ...]`` of one ``aclnnIncreFlashAttentionV4`` launch each.

    The operator requires the pool to hold at least the sum over its batch of the
    blocks each sequence needs, ``ceil(length / block_size)`` ("blocknum不能小于根据
    actualSeqLengthsKv和blockSize计算的每个batch的block数量之和", ops-transformer
    ``attention/incre_flash_attention/docs/aclnnIncreFlashAttentionV4.md``, 约束说明),
    counting shared blocks once per sequence, and at most 65536 sequences a call.
    Folded query tokens (rows repeating a block-table row) and forked sequences that
    share blocks can need more than the pool holds: consecutive rows are grouped
    greedily into launches that each respect both limits.

    Examples
    --------
    >>> import numpy as np
    >>> from ascend._ops import _paged_launches
    >>> _paged_launches(np.array([32, 32, 32]), 16, 4)   # 2 blocks each, a pool of 4
    [(0, 2), (2, 3)]
    >>> _paged_launches(np.array([80]), 16, 4)
    Traceback (most recent call last):
        ...
    ValueError: aclnnIncreFlashAttentionV4 needs a pool of at least the blocks one sequence reads: sequence 0 (80 tokens) needs 5 blocks of 16, the pool has 4
    """
    # Python ints: for the usual few rows this costs a fraction of NumPy's per-call overhead
    needs = [-(-length // block_size) for length in np.asarray(lengths).tolist()]
    rows = len(needs)
    if max(needs) > num_blocks:
        row = next(r for r, need in enumerate(needs) if need > num_blocks)
        raise ValueError(f"aclnnIncreFlashAttentionV4 needs a pool of at least the blocks one "
                         f"sequence reads: sequence {row} ({int(lengths[row])} tokens) needs "
                         f"{needs[row]} blocks of {block_size}, the pool has {num_blocks}")
    if rows <= INCRE_MAX_BATCH and sum(needs) <= num_blocks:
        return [(0, rows)]
    chunks, first, used = [], 0, 0
    for row, need in enumerate(needs):
        if used + need > num_blocks or row - first == INCRE_MAX_BATCH:
            chunks.append((first, row))
            first, used = row, 0
        used += need
    chunks.append((first, rows))
    return chunks
