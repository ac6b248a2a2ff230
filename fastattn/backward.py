"""Gradients: the backward pass of scaled dot-product attention and of the softmax."""
import math
import operator

import numpy as np

from fastattn import _npu, _threads
from fastattn._kernels import backward as _backward
from fastattn._kernels.plan import AttentionPlan
from fastattn._layout import PreparedMask, as_kernel_array, as_matrix_stack, batch_offsets
from fastattn._validation import (
    CPU_AND_NPU, as_array, check_batch_shape, check_choice, check_device, check_dropout, check_qkv,
    check_scale, is_floating, result_dtypes, storage_dtype,
)
from fastattn.attention import CAUSAL_ALIGNMENTS, _Operands
from fastattn.block_layout import BlockLayout
from fastattn.reference import unbroadcast

__all__ = ["scaled_dot_product_attention_backward", "masked_softmax_backward",
           "block_sparse_attention_backward"]

_AxisError = getattr(np, "exceptions", np).AxisError

# Tiles of the backward (query rows x key rows). A key block's dK and dV rows stay in
# cache while its item walks the query blocks; see benchmarks/bench_backward.py.
BLOCK_Q = 64
BLOCK_K = 128
# How dQ is accumulated without races when the heads alone cannot keep every thread busy
# and key blocks are split between threads: "splits" gives each key split its own dQ,
# summed at the end (memory: one dQ per split); "two_pass" runs a second parallel pass
# over query blocks that recomputes P and dS for dQ alone (7 tile products instead of 5).
# Measured in benchmarks/bench_backward.py (DqStrategy).
DQ_STRATEGY = "splits"
# Rows per item of the softmax backward.
SOFTMAX_ROWS = 64


def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse,
                                          attn_mask=None, *, is_causal=False, scale=None,
                                          enable_gqa=False, causal_alignment="top_left",
                                          mask_grad=False, dropout_p=0.0, rng=None,
                                          num_threads=None, device="cpu"):
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
    dropout_p : float, default=0.0
        The forward's ``dropout_p``. Its dropout mask is regenerated from the seed
        (nothing was stored): the gradients are those of the dropped output.
    rng : int, optional
        With ``dropout_p > 0``: the int seed the forward was given as ``rng``
        (a ``numpy.random.Generator`` drew a seed that is not known here, so it is
        refused: train with int seeds, e.g. drawn from your Generator per step).
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.
    device : {"cpu", "npu", "npu:N"}, default="cpu"
        ``"npu"`` runs ``aclnnFlashAttentionScoreGrad`` on a Huawei Ascend NPU
        (``ascend`` package; see ``docs/ascend.md``): float16, bfloat16 or float32
        inputs as for the forward, ``lse`` from the forward (any device), gradients
        in each input's dtype; ``ascend.DeviceArray`` inputs (all of ``grad_out``,
        query, key, value and ``out``, shape (B, H, L, E)) give DeviceArrays.
        ``mask_grad=True`` and dropout are not available there
        (``NotImplementedError``).

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
        For ``mask_grad=True`` or ``dropout_p > 0`` with ``device="npu"``.

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

    Every query's weights sum to one: adding ``c`` to every value adds ``c`` to every
    output, so the loss ``out.sum()`` grows by ``c * out.size``:

    >>> float(dv.sum()) == out.size
    True

    A learned bias shared by the batch gets its gradient at its own shape:

    >>> bias = rng.standard_normal((4, 16, 16))            # (H, L, S)
    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, bias, return_lse=True)
    >>> grads = fastattn.scaled_dot_product_attention_backward(
    ...     grad_out, q, k, v, out, lse, bias, mask_grad=True)
    >>> grads[3].shape
    (4, 16, 16)

    With dropout, the forward's int seed regenerates its mask:

    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, None, 0.1, True, rng=5,
    ...                                                  return_lse=True)
    >>> dq, dk, dv = fastattn.scaled_dot_product_attention_backward(
    ...     grad_out, q, k, v, out, lse, is_causal=True, dropout_p=0.1, rng=5)
    """
    kind = check_device(device, CPU_AND_NPU)
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    if isinstance(rng, np.random.Generator) or (rng is None and dropout_p != 0):
        raise ValueError("rng: the backward regenerates the forward's dropout mask from its "
                         "seed: pass the int seed the forward was given as rng")
    dropout_p, seed = check_dropout(dropout_p, rng)
    if seed is not None and kind == "npu":
        raise NotImplementedError("dropout_p > 0 is computed on the CPU only, got "
                                  f"device={device!r}")
    if kind == "npu":
        return _npu.sdpa_backward(grad_out, query, key, value, out, lse, attn_mask,
                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                  causal_alignment=causal_alignment, mask_grad=mask_grad,
                                  device=device)
    ops = _Operands(query, key, value, attn_mask, enable_gqa)
    scale = check_scale(scale, ops.E)
    grad_out, out, lse = _check_saved(ops, grad_out, out, lse)
    if mask_grad and (ops.mask is None or ops.mask.dtype == np.bool_):
        got = "no attn_mask" if ops.mask is None else "a bool attn_mask"
        raise ValueError(f"mask_grad=True needs a floating attn_mask (an additive bias), "
                         f"got {got}")
    nthreads = _threads.resolve_num_threads(num_threads)
    return _run_backward(ops, grad_out, out, lse, scale, is_causal, causal_alignment,
                         mask_grad, nthreads, attn_mask,
                         dropout=(dropout_p, seed) if seed is not None else None)


def block_sparse_attention_backward(grad_out, query, key, value, out, lse, layout, *,
                                    scale=None, num_threads=None):
    r"""Gradients of :func:`fastattn.block_sparse_attention` (the backward pass).

    The backward of the block-sparse engine: like
    :func:`scaled_dot_product_attention_backward` with the bool mask
    ``layout.to_mask()``, but only the tiles the layout visits are computed (time
    proportional to ``layout.num_blocks``, memory O(L) per head), so local, strided,
    Longformer and BigBird attention train without a dense fallback.

    Parameters
    ----------
    grad_out : array_like, shape (..., L, Ev)
        Gradient of the loss with respect to ``out``.
    query, key, value, layout, scale
        Exactly as given to the forward call.
    out, lse : array_like
        What ``block_sparse_attention(..., return_lse=True)`` returned for them (the
        lse contract of :func:`scaled_dot_product_attention_backward`).
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    grad_query, grad_key, grad_value : ndarray
        Each of its input's shape and dtype; inputs broadcast along batch dimensions
        (or against a per-head layout) get the sum over them.

    Raises
    ------
    TypeError
        For non-real inputs, a ``layout`` that is not a :class:`BlockLayout`, or
        ``grad_out``, ``out`` or ``lse`` of the wrong dtype.
    ValueError
        For shapes that do not match each other, the layout, or the forward's results.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 256, 16)) for _ in range(3))
    >>> layout = fastattn.BlockLayout.from_rule((256, 256), 64, window=(32, 0))
    >>> out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    >>> grad_out = rng.standard_normal(out.shape)
    >>> grads = fastattn.block_sparse_attention_backward(grad_out, q, k, v, out, lse, layout)
    >>> mask = layout.to_mask()                    # the same, densely
    >>> o2, l2 = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    >>> dense = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, o2, l2, mask)
    >>> all(np.allclose(a, b) for a, b in zip(grads, dense))
    True
    """
    ops = _SparseOperands(query, key, value, layout)
    scale = check_scale(scale, ops.E)
    grad_out, out, lse = _check_saved(ops, grad_out, out, lse)
    nthreads = _threads.resolve_num_threads(num_threads)
    return _run_backward(ops, grad_out, out, lse, scale, False, "top_left", False, nthreads,
                         None, layout=layout)


class _SparseOperands:
    """The operands of a block-sparse call, validated as block_sparse_attention does,
    with the attributes of attention._Operands that the backward reads."""

    def __init__(self, query, key, value, layout):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a fastattn.BlockLayout, got "
                            f"{type(layout).__name__}")
        q, k, v, self.compute, self.result = check_qkv(query, key, value)
        L, E = q.shape[-2:]
        S, Ev = v.shape[-2:]
        if (L, S) != layout.shape:
            raise ValueError(f"layout is for (L, S) = {layout.shape}, the operands give "
                             f"(L, S) = {(L, S)}: query {q.shape}, key {k.shape}")
        self.batch_shape = check_batch_shape(
            [q.shape[:-2], k.shape[:-2], v.shape[:-2], layout._leads()],
            query=q.shape, key=k.shape, value=v.shape, layout_heads=layout._leads())
        self.q, self.k, self.v, self.mask = q, k, v, None
        self.L, self.S, self.E, self.Ev = L, S, E, Ev
        self.group = 1
        self.nbatch = int(np.prod(self.batch_shape, dtype=np.int64))
        self.out_shape = self.batch_shape + (L, Ev)


def _check_saved(ops, grad_out, out, lse):
    """grad_out, out and lse as arrays, checked against the forward of these inputs."""
    grad_out, out, lse = _saved_arrays(ops, grad_out, out, lse)
    allowed = (ops.result, ops.compute)
    if grad_out.dtype not in allowed:
        raise TypeError(f"grad_out has dtype {grad_out.dtype}; it must have out's dtype "
                        f"{ops.result}" + (f" or {ops.compute}" if ops.compute != ops.result
                                           else "") + " (convert it with .astype)")
    if lse.dtype != ops.compute:
        raise TypeError(f"lse has dtype {lse.dtype}, but the forward of these inputs returns "
                        f"a {ops.compute} lse")
    return grad_out, out, lse


def _saved_arrays(ops, grad_out, out, lse, where=""):
    """grad_out, out and lse as arrays: floating, of the shapes the forward of these
    inputs gives, and out of its result dtype (``where`` ends that message). What the
    CPU and the NPU backward (``_npu._check_saved``) both require."""
    grad_out, out, lse = (as_array("grad_out", grad_out), as_array("out", out),
                          as_array("lse", lse))
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
                        f"{ops.result}{where}")
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
    grad, y = as_array("grad", grad), as_array("y", y)
    compute, result = result_dtypes(grad, y, names=("grad", "y"))
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    if grad.shape != y.shape:
        raise ValueError(f"grad and y must have the same shape, got grad {grad.shape} and "
                         f"y {y.shape}")
    if y.ndim == 0:
        raise ValueError("y must have at least one dimension, got a 0-d array")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    if not -y.ndim <= axis < y.ndim:
        raise _AxisError(axis, y.ndim)
    scale = 1.0 if scale is None else check_scale(scale, 1)
    nthreads = _threads.resolve_num_threads(num_threads)
    if y.size == 0:
        return np.zeros(y.shape, dtype=result)
    # the kernel works on the rows of C-contiguous (R, N) matrices of the compute dtype
    moved = np.moveaxis(y, axis, -1).shape
    gm = as_kernel_array(np.moveaxis(grad, axis, -1), compute).reshape(-1, moved[-1])
    ym = as_kernel_array(np.moveaxis(y, axis, -1), compute).reshape(-1, moved[-1])
    res = np.empty(gm.shape, dtype=compute)
    R, N = gm.shape
    nthreads = _threads.call_threads(nthreads, -(-R // SOFTMAX_ROWS), 4 * R * N)
    _backward.softmax_backward(gm, ym, res, scale, SOFTMAX_ROWS, nthreads)
    res = np.moveaxis(res.reshape(moved), -1, axis)
    return res if result == compute else res.astype(result)


def _grad_dtype(a, result):
    # a gradient has its input's dtype; integer inputs (computed in float64) get `result`
    return a.dtype if is_floating(a.dtype) else result


def _dest_index(lead, batch_shape, group_axis=None, group=1):
    """For each entry of the broadcast batch, the flat index of the matrix it reads in an
    array of leading shape ``lead``: where its gradient goes."""
    return batch_offsets(np.empty(tuple(lead) + (1, 1), dtype=np.int8), batch_shape,
                         group_axis, group)


def _starts(keys, n):
    # order of `keys` (ints < n) grouped by value, and each group's start in that order
    order = np.argsort(keys, kind="stable").astype(np.intp)
    starts = np.zeros(n + 1, dtype=np.intp)
    np.cumsum(np.bincount(keys, minlength=n), out=starts[1:])
    return order, starts


def _run_backward(ops, grad_out, out, lse, scale, is_causal, causal_alignment, mask_grad,
                  nthreads, attn_mask, layout=None, dropout=None):
    # The dense backward, or with `layout` (a BlockLayout; no mask, not causal) the
    # block-sparse one.
    L, S, E, Ev = ops.L, ops.S, ops.E, ops.Ev
    batch_shape, nbatch, group = ops.batch_shape, ops.nbatch, ops.group
    compute, result = ops.compute, ops.result
    k_lead, v_lead = ops.k.shape[:-2], ops.v.shape[:-2]
    mask = ops.mask
    dq_full = np.zeros(batch_shape + (L, E), dtype=compute)
    nb = len(batch_shape)
    group_axis = nb - 1 if group > 1 else None
    nk, nv = math.prod(k_lead), math.prod(v_lead)
    dm = None

    if nbatch and L and S and Ev:
        storage = storage_dtype(compute, result, ops.q, ops.k, ops.v, grad_out, out)
        # pairs: the distinct (key matrix, value matrix) read by the batch entries; each
        # has its own dK and dV, summed into their key and value matrices at the end
        if group == 1 and k_lead == batch_shape and v_lead == batch_shape:
            pair_of = np.arange(nbatch, dtype=np.intp)      # the usual case: one each
            kd_of_pair = vd_of_pair = None
        else:
            kdest = _dest_index(k_lead, batch_shape, group_axis, group)
            vdest = _dest_index(v_lead, batch_shape, group_axis, group)
            uniq, pair_of = np.unique(kdest * max(nv, 1) + vdest, return_inverse=True)
            pair_of = pair_of.reshape(-1).astype(np.intp)
            kd_of_pair, vd_of_pair = uniq // max(nv, 1), uniq % max(nv, 1)
        npairs = int(pair_of[-1]) + 1 if kd_of_pair is None else len(kd_of_pair)

        block_q, block_k = min(BLOCK_Q, L), min(BLOCK_K, S)
        sparse_args = {}
        if layout is not None:
            block_q, block_k = layout.block_size
            sparse_args = _sparse_arguments(layout, batch_shape, L, S)
        nkb = -(-S // block_k)
        prepared = None
        dm_args = (None, None, 0, 0, False)
        comp_of_pair = np.arange(npairs, dtype=np.intp)
        if mask is not None:
            prepared = PreparedMask(mask, compute, L, S, batch_shape, block_q, block_k)
        if mask_grad:
            m_lead, (Lm, Sm) = mask.shape[:-2], mask.shape[-2:]
            mdest = _dest_index(m_lead, batch_shape)
            nm = int(np.prod(m_lead, dtype=np.int64))
            by_block = Sm == 1
            sx = nkb if by_block else S
            dm = np.zeros((nm, Lm, sx), dtype=compute)
            dm_args = (dm, (mdest * (Lm * sx)).astype(np.intp), sx if Lm > 1 else 0,
                       0 if by_block else 1, by_block)
            # pairs that share a mask matrix must be in one item: connected components
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components
            graph = coo_matrix((np.ones(nbatch), (pair_of, npairs + mdest)),
                               shape=(npairs + nm, npairs + nm))
            _, labels = connected_components(graph, directed=False)
            _, comp_of_pair = np.unique(labels[:npairs], return_inverse=True)
            comp_of_pair = comp_of_pair.reshape(-1).astype(np.intp)
        ncomp = int(comp_of_pair.max()) + 1
        if not mask_grad:           # one pair per component: pair i is component i
            comp_pairs, comp_start = comp_of_pair, np.arange(npairs + 1, dtype=np.intp)
        else:
            comp_pairs, comp_start = _starts(comp_of_pair, ncomp)
        if kd_of_pair is None:      # one batch entry per pair
            pair_members, pair_start = pair_of, np.arange(npairs + 1, dtype=np.intp)
        else:
            pair_members, pair_start = _starts(pair_of, npairs)

        # key splits (each with its own dQ) only when the components cannot keep every
        # thread busy; interleaved key blocks keep causal splits even
        nsplit = 1
        if ncomp < 2 * nthreads:
            nsplit = max(1, min(nkb, -(-2 * nthreads // ncomp)))
        flops = 5.0 * nbatch * L * S * (E + Ev) * (0.5 if is_causal else 1.0)
        if layout is not None:
            flops *= layout.density
        nthreads = _threads.call_threads(nthreads, ncomp * nsplit, flops)

        q, ldq = as_matrix_stack(ops.q, storage)
        k, ldk = as_matrix_stack(ops.k, storage)
        v, ldv = as_matrix_stack(ops.v, storage)
        o, ldo = as_matrix_stack(out, storage)
        do, lddo = as_matrix_stack(grad_out, storage)
        q_off = batch_offsets(q, batch_shape)
        k_off = batch_offsets(k, batch_shape, group_axis, group)
        v_off = batch_offsets(v, batch_shape, group_axis, group)
        o_off = batch_offsets(o, batch_shape)
        do_off = batch_offsets(do, batch_shape)
        lse_c = as_kernel_array(lse, compute).reshape(nbatch, L)

        causal_offset = 0 if causal_alignment == "top_left" else S - L
        plan = AttentionPlan(q, k, v, o, lse_c, (q_off, k_off, v_off, o_off),
                             (ldq, ldk, ldv, ldo), L, S, E, Ev, prepared, scale=scale,
                             causal=bool(is_causal), causal_offset=causal_offset,
                             block_q=block_q, block_k=block_k, nsplit=nsplit,
                             nthreads=nthreads, dropout=dropout)
        native = _backward.native_products(compute == np.float32, E, Ev)
        delta = np.empty((nbatch, L), dtype=compute)
        two_pass = DQ_STRATEGY == "two_pass" and layout is None
        dq_parts = dq_full.reshape(1, nbatch, L, E) if nsplit == 1 or two_pass else \
            np.zeros((nsplit, nbatch, L, E), dtype=compute)
        dk_pairs = np.zeros((npairs, S, E), dtype=compute)
        dv_pairs = np.zeros((npairs, S, Ev), dtype=compute)
        with _threads.kernel_blas(not native):
            _backward.sdpa_backward(plan, do, do_off, lddo, delta, dq_parts, dk_pairs,
                                    dv_pairs, comp_start, comp_pairs, pair_start,
                                    pair_members, nsplit, native, *dm_args,
                                    two_pass=two_pass, **sparse_args)
        if dq_parts.shape[0] > 1:
            np.sum(dq_parts, axis=0, out=dq_full.reshape(nbatch, L, E))
        dk = _scatter_pairs(dk_pairs, kd_of_pair, nk, k_lead + (S, E))
        dv = _scatter_pairs(dv_pairs, vd_of_pair, nv, v_lead + (S, Ev))
    else:
        dk = np.zeros(ops.k.shape, dtype=compute)
        dv = np.zeros(ops.v.shape, dtype=compute)

    grads = (unbroadcast(dq_full, ops.q.shape).astype(_grad_dtype(ops.q, result), copy=False),
             dk.astype(_grad_dtype(ops.k, result), copy=False),
             dv.astype(_grad_dtype(ops.v, result), copy=False))
    if mask_grad:
        if dm is None:
            dm = np.zeros(mask.shape, dtype=compute)
        elif dm.shape[-1] != mask.shape[-1]:
            dm = dm.sum(axis=-1, keepdims=True)      # per key block -> the one column
        shape = np.shape(attn_mask)
        grads += (dm.reshape(shape).astype(mask.dtype, copy=False),)
    return grads


def _sparse_arguments(layout, batch_shape, L, S):
    """The forward's SparsePlan and the layout's transpose, for the block-sparse backward:
    for each layout head, the query blocks visiting each key block (CSC)."""
    from fastattn._kernels import sparse as _sparse
    bq, bk = layout.block_size
    nqb, nkb = -(-L // bq), -(-S // bk)
    nbatch = int(np.prod(batch_shape, dtype=np.int64))
    if layout.num_heads is not None:
        layout_off = batch_offsets(layout.indptr[:, None, :], batch_shape)
    else:
        layout_off = np.zeros(nbatch, dtype=np.intp)
    colptr, qrows, base = [], [], 0
    for ip in layout.indptr:
        kbs = layout.indices[ip[0]:ip[-1]]
        qbs = np.repeat(np.arange(nqb, dtype=np.int64), np.diff(ip))
        order = np.argsort(kbs, kind="stable")
        qrows.append(qbs[order])
        counts = np.bincount(kbs, minlength=nkb)
        colptr.append(base + np.concatenate([[0], np.cumsum(counts)]))
        base += kbs.size
    colptr = np.ascontiguousarray(np.stack(colptr), dtype=np.int64)
    qrows = np.ascontiguousarray(np.concatenate(qrows), dtype=np.int64)
    csc_off = (layout_off // (nqb + 1) * (nkb + 1)).astype(np.intp)
    plan = _sparse.SparsePlan(layout.indptr, layout.indices, layout_off,
                              layout._kernel_rule(batch_shape), offset=S - L)
    return dict(layout=plan, colptr=colptr, qrows=qrows, csc_off=csc_off)


def _scatter_pairs(grad_pairs, dest_of_pair, ndest, shape):
    # the gradient of each destination matrix: the sum of its pairs' (usually one each;
    # dest_of_pair None: pair i is matrix i)
    if dest_of_pair is None or (len(dest_of_pair) == ndest
                                and np.array_equal(dest_of_pair, np.arange(ndest))):
        return grad_pairs.reshape(shape)
    res = np.zeros((ndest,) + grad_pairs.shape[1:], dtype=grad_pairs.dtype)
    np.add.at(res, dest_of_pair, grad_pairs)
    return res.reshape(shape)

