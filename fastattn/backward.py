"""Gradients: the backward pass of scaled dot-product attention and of the softmax."""
import numpy as np

from fastattn import _threads
from fastattn._layout import as_mask
from fastattn._validation import (
    CPU_AND_NPU, check_choice, check_device, check_scale, is_floating, result_dtypes,
    storage_dtype,
)
from fastattn.attention import CAUSAL_ALIGNMENTS, _Operands

__all__ = ["scaled_dot_product_attention_backward", "masked_softmax_backward"]

_AxisError = getattr(np, "exceptions", np).AxisError


def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse,
                                          attn_mask=None, *, is_causal=False, scale=None,
                                          enable_gqa=False, causal_alignment="top_left",
                                          mask_grad=False, num_threads=None, device="cpu"):
    r"""Gradients of :func:`fastattn.scaled_dot_product_attention` (the backward pass).

    Given the gradient of a loss with respect to the attention output, returns its
    gradients with respect to ``query``, ``key`` and ``value`` (and with
    ``mask_grad=True`` the float ``attn_mask``). Computed by a fused kernel
    (FlashAttention-2's backward): each tile's probabilities are recomputed from
    ``query``, ``key`` and the forward's ``lse``, so the ``(L, S)`` matrix is never
    formed and extra memory stays O(L + S) per head.

    Parameters
    ----------
    grad_out : array_like, shape (..., L, Ev)
        Gradient of the loss with respect to ``out``: the dtype of ``out`` (for
        float16/bfloat16 results, float32 is accepted too).
    query, key, value, attn_mask
        Exactly as given to the forward call that produced ``out`` and ``lse``.
    out : array_like, shape (..., L, Ev)
        The forward's result.
    lse : array_like, shape (..., L)
        The forward's log-sum-exp, from ``return_lse=True``: float32, or float64 for
        float64 inputs.
    is_causal, scale, enable_gqa, causal_alignment
        As in the forward call; they must be the same.
    mask_grad : bool, default=False
        Also return the gradient of a float ``attn_mask`` (a learned additive bias,
        e.g. relative positions or ALiBi slopes), summed over the dimensions the mask
        was broadcast along: its own shape.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.
    device : {"cpu"}, default="cpu"
        ``"npu"`` is not implemented yet and raises ``NotImplementedError``.

    Returns
    -------
    grad_query, grad_key, grad_value : ndarray
        Each of its input's shape and dtype (float64 for integer inputs). With
        ``enable_gqa`` the key/value gradients are summed over each group of query
        heads; inputs broadcast along batch dimensions get the sum over them.
    grad_mask : ndarray
        Only with ``mask_grad=True``: the mask's shape and dtype.

    Raises
    ------
    TypeError
        For non-real inputs, or ``grad_out``, ``out`` or ``lse`` of a dtype the
        forward of these inputs does not give.
    ValueError
        For shapes that do not match or broadcast (``grad_out``, ``out`` and ``lse``
        are named), ``mask_grad=True`` without a float mask, an unknown
        ``causal_alignment`` or ``device``.
    NotImplementedError
        For ``device="npu"``.

    Notes
    -----
    **The lse contract.** ``out`` and ``lse`` must be what
    ``scaled_dot_product_attention(query, key, value, attn_mask, ..., return_lse=True)``
    returned for these very inputs and options. This cannot be checked in general:
    given another ``lse``, the recomputed probabilities are wrong and so are the
    gradients, silently. Rows with no visible key have ``lse = -inf`` and zero
    gradients.

    ``D = rowsum(grad_out * out)`` is computed first; then, in parallel over key
    blocks, each key block's ``dK`` and ``dV`` tiles are accumulated by the thread that
    owns them, while ``dQ`` is accumulated per key split (a few splits only when there
    are fewer heads than threads) and the splits summed at the end: no two threads
    write the same element. Tiles that the causal band or a bool mask rule out are
    skipped. float16 and bfloat16 inputs are computed in float32. A NaN in
    ``grad_out`` gives NaN gradients wherever it reaches; it never raises.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 16, 8)) for _ in range(3))
    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
    ...                                                  return_lse=True)
    >>> grad_out = np.ones_like(out)          # the loss is out.sum()
    >>> dq, dk, dv = fastattn.scaled_dot_product_attention_backward(
    ...     grad_out, q, k, v, out, lse, is_causal=True)
    >>> dq.shape, dk.shape, dv.shape
    ((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))

    Every query's weights sum to one, so the loss ``out.sum()`` grows by exactly the
    number of queries that see a key when one is added to every value:

    >>> float(dv.sum())
    128.0

    A learned bias shared by the batch gets its gradient at its own shape:

    >>> bias = rng.standard_normal((4, 16, 16))            # (H, L, S)
    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, bias, return_lse=True)
    >>> grads = fastattn.scaled_dot_product_attention_backward(
    ...     grad_out, q, k, v, out, lse, bias, mask_grad=True)
    >>> grads[3].shape
    (4, 16, 16)
    """
    kind = check_device(device, CPU_AND_NPU)
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    if kind == "npu":
        raise NotImplementedError("scaled_dot_product_attention_backward: device='npu' is "
                                  "not implemented yet; use device='cpu'")
    ops = _Operands(query, key, value, attn_mask, enable_gqa)
    scale = check_scale(scale, ops.E)
    grad_out, out, lse = _check_saved(ops, grad_out, out, lse)
    if mask_grad and (ops.mask is None or ops.mask.dtype == np.bool_):
        got = "no attn_mask" if ops.mask is None else "a bool attn_mask"
        raise ValueError(f"mask_grad=True needs a floating attn_mask (an additive bias), "
                         f"got {got}")
    nthreads = _threads.resolve_num_threads(num_threads)
    raise NotImplementedError("scaled_dot_product_attention_backward: the CPU kernel is "
                              "not part of this build yet")


def _check_saved(ops, grad_out, out, lse):
    """grad_out, out and lse as arrays, checked against the forward of these inputs."""
    grad_out, out, lse = np.asarray(grad_out), np.asarray(out), np.asarray(lse)
    lse_shape = ops.batch_shape + (ops.L,)
    for name, a, shape in (("grad_out", grad_out, ops.out_shape), ("out", out, ops.out_shape),
                           ("lse", lse, lse_shape)):
        if not is_floating(a.dtype):
            raise TypeError(f"{name} must be floating, got dtype {a.dtype}")
        if a.shape != shape:
            what = "(..., L)" if name == "lse" else "(..., L, Ev)"
            raise ValueError(f"{name} has shape {a.shape}, but the forward of query "
                             f"{ops.q.shape}, key {ops.k.shape}, value {ops.v.shape} gives "
                             f"{name if name != 'grad_out' else 'out'} of shape {shape} {what}")
    if out.dtype != ops.result:
        raise TypeError(f"out has dtype {out.dtype}, but the forward of these inputs returns "
                        f"{ops.result}")
    allowed = (ops.result, ops.compute)
    if grad_out.dtype not in allowed:
        raise TypeError(f"grad_out has dtype {grad_out.dtype}; it must have out's dtype "
                        f"{ops.result}" + (f" or {ops.compute}" if ops.compute != ops.result
                                           else "") + " (convert it with .astype)")
    if lse.dtype != ops.compute:
        raise TypeError(f"lse has dtype {lse.dtype}, but the forward of these inputs returns "
                        f"a {ops.compute} lse")
    return grad_out, out, lse


def masked_softmax_backward(grad, y, axis=-1, *, scale=None, num_threads=None):
    r"""Gradient of :func:`fastattn.masked_softmax` from its output.

    For ``y = masked_softmax(x, mask, axis=axis, scale=scale)`` and the gradient
    ``grad`` of a loss with respect to ``y``, returns the gradient with respect to
    ``x``: ``scale * y * (grad - sum(grad * y, axis))``. The gradient of a float
    ``mask`` is the same with ``scale=None``. Entries the mask dropped (``y == 0``) and
    rows with every entry dropped get 0.

    Parameters
    ----------
    grad : array_like
        Gradient with respect to ``y``, of ``y``'s shape.
    y : array_like
        The softmax's output.
    axis : int, default=-1
        The axis the softmax normalised over.
    scale : float, optional
        The ``scale`` given to the softmax; default 1.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    ndarray
        ``y``'s shape; float32 or float64 as ``grad`` and ``y`` promote (float16 and
        bfloat16 computed in float32 and returned in their own type).

    Raises
    ------
    TypeError
        For non-real inputs.
    ValueError
        When ``grad`` and ``y`` differ in shape.
    numpy.exceptions.AxisError
        For an ``axis`` out of range.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> x = np.array([[1.0, 2.0, 3.0]])
    >>> y = fastattn.masked_softmax(x)
    >>> grad = np.array([[0.0, 0.0, 1.0]])        # the loss is y[0, 2]
    >>> fastattn.masked_softmax_backward(grad, y).round(4)
    array([[-0.0599, -0.1628,  0.2227]])
    """
    grad, y = np.asarray(grad), np.asarray(y)
    compute, result = result_dtypes(grad, y, names=("grad", "y"))
    if grad.shape != y.shape:
        raise ValueError(f"grad and y must have the same shape, got grad {grad.shape} and "
                         f"y {y.shape}")
    if y.ndim == 0:
        raise ValueError("y must have at least one dimension, got a 0-d array")
    if not -y.ndim <= axis < y.ndim:
        raise _AxisError(axis, y.ndim)
    scale = 1.0 if scale is None else check_scale(scale, 1)
    nthreads = _threads.resolve_num_threads(num_threads)
    raise NotImplementedError("masked_softmax_backward: the CPU kernel is not part of this "
                              "build yet")
