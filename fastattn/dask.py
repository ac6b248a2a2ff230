"""Attention over Dask arrays: fastattn's kernels as the tasks of a Dask graph.

Installed with ``pip install "fastattn[dask]"``. Every function here validates its
arguments exactly as its NumPy counterpart does (the same ``fastattn._validation``
checks, on zero-stride placeholders of the inputs' shapes and dtypes) while the
graph is built, so a bad argument raises before any task runs; then it returns a
lazy dask array chunked like the query.

The graphs (``b``: a block of the batch and head axes, ``i``: a query chunk,
``j``: a key chunk)::

    scaled_dot_product_attention      local_attention          linear_attention
    ----------------------------      ---------------          ----------------
    partial(b,i,j) = kernel on        halo(b,i) = the rows     summary(b,j) = phi(K_j)^T [V_j 1]
      Q(b,i), K(b,j), V(b,j),           of the key chunks      state(b)     = tree sum over j
      mask(b,i,j) -> (out, lse)         that the window of     (causal: prefix(b,i) = exclusive
    merge over j by log-sum-exp,        query chunk i reads     scan over j of the summaries)
      split_every at a time (tree)    out(b,i) = kernel on     out(b,i) = phi(Q_i) state
    causal: pairs wholly above the      Q(b,i), halo(b,i)        (causal: kernel on the chunk
      diagonal are not in the graph                              + phi(Q_i) prefix(b,i))

Inside a task the kernel runs on :func:`task_threads` threads: the share of a
``distributed`` worker's threads that task is entitled to, never every core of the
machine in every worker process.
"""
import functools
import itertools
import math
import operator
import sys
import threading

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
    from dask.system import CPU_COUNT
except ImportError as exc:          # pragma: no cover - exercised without Dask installed
    raise ImportError('fastattn.dask needs Dask: install it with pip install "fastattn[dask]"'
                      ) from exc

from fastattn import _linear, _threads
from fastattn.attention import CAUSAL_ALIGNMENTS, _Operands
from fastattn.attention import scaled_dot_product_attention as _sdpa
from fastattn.lowrank import _check_causal_lengths
from fastattn.lowrank import linear_attention as _linear_attention
from fastattn.sparse_patterns import _global_flags
from fastattn.sparse_patterns import local_attention as _local_attention
from fastattn._validation import (HALF, check_batch_shape, check_choice, check_int, check_qkv,
                                  check_scale, check_window)

__all__ = ["scaled_dot_product_attention", "local_attention", "linear_attention",
           "task_threads"]

# Partial results merged by one task: a tree of depth ceil(log_4(key chunks)). Dask's
# own reductions default to 16, which makes a single flat merge of up to 16 chunks.
SPLIT_EVERY = 4


# ---- threads -------------------------------------------------------------------------

def task_threads(num_threads=None):
    """Threads a fastattn kernel call inside the current Dask task may use.

    - ``num_threads`` given: that number (checked like the NumPy functions' argument).
    - In a ``distributed`` worker: the worker's threads divided among the tasks it is
      running now, at least 1 (a worker with ``nthreads=4`` running one task gives it
      4; running four, 1 each). Nanny-started workers set ``OMP_NUM_THREADS=1``,
      which would otherwise hold every call at one thread.
    - On Dask's local threaded scheduler: :func:`fastattn.get_num_threads` divided by
      its threads (``dask.config`` ``num_workers``, else the CPU count).
    - Anywhere else (the synchronous scheduler, plain code):
      :func:`fastattn.get_num_threads`.

    Parameters
    ----------
    num_threads : int, optional

    Returns
    -------
    int

    Examples
    --------
    >>> import fastattn
    >>> import fastattn.dask
    >>> fastattn.dask.task_threads() == fastattn.get_num_threads()   # not in a task
    True
    >>> fastattn.dask.task_threads(3)
    3
    """
    if num_threads is not None:
        return _threads.resolve_num_threads(num_threads)
    worker = _current_worker()
    if worker is not None:
        state = worker.state
        return max(1, state.nthreads // max(1, state.executing_count))
    if threading.current_thread() is threading.main_thread():
        return _threads.get_num_threads()
    workers = dask.config.get("num_workers", None) or CPU_COUNT
    return max(1, _threads.get_num_threads() // workers)


def _current_worker():
    # A distributed worker runs in a process that has imported distributed: without it
    # there is none, and importing it here (a third of a second, in the first task of
    # the local scheduler) would only find that out.
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except ValueError:
        return None


# ---- inputs --------------------------------------------------------------------------

def _wrap(x, name):
    """``x`` as a dask array of known chunk sizes (NumPy input is wrapped)."""
    a = x if isinstance(x, da.Array) else da.asarray(np.asarray(x))
    if any(math.isnan(c) for dim in a.chunks for c in dim):
        raise ValueError(f"{name} has unknown chunk sizes (chunks={a.chunks}); call "
                         f"{name}.compute_chunk_sizes() first")
    return a


def _placeholder(a):
    # the shape and dtype of `a` at no cost in memory: what the NumPy validation reads
    return np.broadcast_to(np.zeros((), dtype=a.dtype), a.shape)


def _check_split_every(split_every):
    return SPLIT_EVERY if split_every is None else check_int("split_every", split_every, 2)


def _ranges(chunks):
    starts = np.concatenate([[0], np.cumsum(chunks)]).astype(int).tolist()
    return list(zip(starts[:-1], starts[1:]))


def _rechunk(x, chunks):
    chunks = tuple(tuple(c) for c in chunks)
    return x if x.chunks == chunks else x.rechunk(chunks)


class _Batch:
    """The block structure of the broadcast batch axes, shared by all operands.

    Every batch axis takes the chunks of the first operand (query, key, value, mask)
    that spans it; the others are rechunked to match (``targets``). An operand of
    size 1 on an axis is broadcast: its block 0 serves every block. With
    grouped-query attention the head axis (the last batch axis) is chunked like the
    query, except that a query chunk straddling a group boundary off the group grid
    is split there, and the key/value heads are chunked so that each query chunk
    reads exactly one key/value chunk.
    """

    def __init__(self, batch_shape, arrays, group=1):
        nb = len(batch_shape)
        self.targets = {name: list(a.chunks) for name, a in arrays.items()}
        self._maps = {name: [] for name in arrays}   # per operand batch axis: how to index
        chunks = []
        for d, size in enumerate(batch_shape):
            sizes = {name: _dim(a, nb, d) for name, a in arrays.items()}
            if group > 1 and d == nb - 1:
                q_chunks, kv_chunks, kv_of = _group_pieces(
                    arrays["query"].chunks[_axis(arrays["query"], nb, d)], group)
                chunks.append(q_chunks)
                for name, n in sizes.items():
                    if n is not None and n != 1:
                        gqa = name in ("key", "value")
                        self.targets[name][_axis(arrays[name], nb, d)] = \
                            kv_chunks if gqa else q_chunks
                        self._maps[name].append(kv_of if gqa else "same")
                    elif n == 1:
                        self._maps[name].append(None)
                continue
            spanning = [name for name, n in sizes.items() if n == size and size != 1]
            axis_chunks = (arrays[spanning[0]].chunks[_axis(arrays[spanning[0]], nb, d)]
                           if spanning else (size,))
            chunks.append(tuple(axis_chunks))
            for name, n in sizes.items():
                if name in spanning:
                    self.targets[name][_axis(arrays[name], nb, d)] = axis_chunks
                    self._maps[name].append("same")
                elif n is not None:
                    self._maps[name].append(None)
        self.chunks = tuple(chunks)

    def blocks(self):
        """Every batch block: (block index, block shape)."""
        for idx in itertools.product(*(range(len(c)) for c in self.chunks)):
            yield idx, tuple(c[b] for c, b in zip(self.chunks, idx))

    def index(self, name, idx):
        """The batch part of operand ``name``'s block key in batch block ``idx``."""
        maps = self._maps[name]
        idx = idx[len(idx) - len(maps):]
        return tuple(b if m == "same" else 0 if m is None else m[b] for m, b in zip(maps, idx))


def _dim(a, nb, d):
    # operand a's size on broadcast batch axis d (None: a has no such axis)
    axis = d - (nb - (a.ndim - 2))
    return a.shape[axis] if axis >= 0 else None


def _axis(a, nb, d):
    return d - (nb - (a.ndim - 2))


def _group_pieces(chunks, group):
    """Query-head chunks split where they straddle a group boundary off the group grid;
    the key/value head chunks they induce; the key/value chunk of each query chunk."""
    q_chunks, kv_ranges, kv_of = [], [], []
    start = 0
    for n in chunks:
        stop = start + n
        cuts = {start, stop, -(-start // group) * group, stop // group * group}
        cuts = sorted(c for c in cuts if start <= c <= stop)
        for lo, hi in zip(cuts, cuts[1:]):
            kv = (lo // group, (hi - 1) // group + 1)
            if not kv_ranges or kv_ranges[-1] != kv:
                kv_ranges.append(kv)
            q_chunks.append(hi - lo)
            kv_of.append(len(kv_ranges) - 1)
        start = stop
    return tuple(q_chunks), tuple(hi - lo for lo, hi in kv_ranges), kv_of


def _array(dsk, name, dependencies, chunks, dtype):
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=dependencies)
    dtype = np.dtype(dtype)
    return da.Array(graph, name, chunks=chunks, meta=np.empty((0,) * len(chunks), dtype=dtype))


def _results(dsk, name, dependencies, batch_chunks, row_chunks, ev, result, compute,
             return_lse):
    """The output array of a graph whose final tasks (see :func:`_block_tasks`) are keyed
    ``(name, *b, i, 0)``; with ``return_lse`` they are keyed ``(name + "-pair", *b, i)``
    and return ``(out, lse)`` block pairs, and the result is ``(out, lse)``."""
    if not return_lse:
        return _array(dsk, name, dependencies, batch_chunks + (row_chunks, (ev,)), result)
    pairs = _array(dsk, name + "-pair", dependencies, batch_chunks + (row_chunks,), object)
    out = {(name,) + key[1:] + (0,): (operator.getitem, key, 0) for key in _block_keys(pairs)}
    lse = {(name + "-lse",) + key[1:]: (operator.getitem, key, 1) for key in _block_keys(pairs)}
    return (_array(out, name, [pairs], batch_chunks + (row_chunks, (ev,)), result),
            _array(lse, name + "-lse", [pairs], batch_chunks + (row_chunks,), compute))


def _block_keys(a):
    return list(itertools.product([a.name], *(range(len(c)) for c in a.chunks)))


# ---- task bodies ---------------------------------------------------------------------

def _mask_part(mask, rows, cols):
    if mask is None:
        return None
    return mask[..., rows if mask.shape[-2] != 1 else slice(None),
                cols if mask.shape[-1] != 1 else slice(None)]


def _attend(q, k, v, mask, *, offset, scale, enable_gqa, num_threads, cast):
    """(out, lse) of one query chunk over one key chunk.

    ``offset`` None: no causal band inside the block; else row ``i`` sees key ``j``
    iff ``j <= i + offset`` (block coordinates). ``cast``: the dtype to compute the
    query in (partials of half inputs are kept in float32), or None.
    """
    if cast is not None:
        q = q.astype(cast)
    sdpa = functools.partial(_sdpa, scale=scale, enable_gqa=enable_gqa, return_lse=True,
                             num_threads=task_threads(num_threads))
    if offset is None:
        return sdpa(q, k, v, mask)
    # Rows [0, r0) see no key of this block, rows [r0, r1) see a causal band (keys
    # j <= i + offset: bottom-right alignment over the first r1 + offset keys), rows
    # [r1, L) see all of them.
    L, S = q.shape[-2], k.shape[-2]
    r0 = min(max(-offset, 0), L)
    r1 = max(r0, min(L, S - offset))
    outs, lses = [], []
    if r1 > r0:
        n = r1 + offset
        o, l_ = sdpa(q[..., r0:r1, :], k[..., :n, :], v[..., :n, :],
                     _mask_part(mask, slice(r0, r1), slice(0, n)),
                     is_causal=True, causal_alignment="bottom_right")
        outs.append(o)
        lses.append(l_)
    if r1 < L:
        o, l_ = sdpa(q[..., r1:, :], k, v, _mask_part(mask, slice(r1, None), slice(None)))
        outs.append(o)
        lses.append(l_)
    if r0:
        # (the graph never holds a block none of whose rows sees a key, so outs is not empty)
        o, l_ = outs[0], lses[0]
        outs.insert(0, np.zeros(o.shape[:-2] + (r0, o.shape[-1]), dtype=o.dtype))
        lses.insert(0, np.full(l_.shape[:-1] + (r0,), -np.inf, dtype=l_.dtype))
    if len(outs) == 1:
        return outs[0], lses[0]
    return np.concatenate(outs, axis=-2), np.concatenate(lses, axis=-1)


def _merge(parts, *, final=None):
    """Merge ``(out, lse)`` partials over disjoint key sets by their log-sum-exp.

    ``final``: None to return the merged ``(out, lse)``, else ``(result dtype,
    return_lse)`` to finish a block. A row no key reached anywhere (every lse -inf)
    gets 0 and an lse of -inf, as in the NumPy function.
    """
    top = functools.reduce(np.maximum, [lse for _, lse in parts])
    top = np.where(np.isneginf(top), 0, top)    # such rows: all weights exp(-inf) = 0
    out = total = 0
    for o, lse in parts:
        w = np.exp(lse - top)                   # out = sum_p w_p out_p / sum_p w_p
        total = total + w
        out = out + w[..., None] * o
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = top + np.log(total)
        out = np.where(total[..., None] > 0, out / total[..., None], 0).astype(o.dtype)
    return (out, lse) if final is None else _finish((out, lse), *final)


def _finish(pair, result, return_lse):
    out, lse = pair
    out = out.astype(result, copy=False)
    return (out, lse) if return_lse else out


def _finished(fn, *args, final, **kwargs):
    # a block with one partial: computed and finished by one task
    return _finish(fn(*args, **kwargs), *final)


def _empty(out_shape, lse_shape, result, compute, return_lse):
    # a block no key reaches (S = 0, or every key chunk above the causal diagonal)
    out = np.zeros(out_shape, dtype=result)
    return (out, np.full(lse_shape, -np.inf, dtype=compute)) if return_lse else out


def _merge_tree(dsk, parts, key, merge_name, split_every, final):
    """Tasks merging the partial keys ``parts`` ``split_every`` at a time, the last
    one (keyed ``key``) finishing the block."""
    level, depth = list(parts), 0
    while len(level) > split_every:
        nxt = []
        for g in range(0, len(level), split_every):
            group = level[g:g + split_every]
            if len(group) == 1:
                nxt.append(group[0])
                continue
            k = (merge_name,) + key[1:] + (depth, g // split_every)
            dsk[k] = (_merge, group)
            nxt.append(k)
        level, depth = nxt, depth + 1
    dsk[key] = (functools.partial(_merge, final=final), level)


def _block_tasks(dsk, out_key, parts, part_key, merge_name, split_every, final, cast, empty):
    """The tasks of the output block ``out_key`` from its partials ``parts``, each
    ``(function, input keys, keywords)`` computing an ``(out, lse)`` pair: none, one
    :func:`_empty` task (arguments ``empty``); one, a task computing and finishing it;
    several, a task each (keyed ``part_key + (j,)``, the query computed in ``cast``)
    merged by :func:`_merge_tree`."""
    if not parts:
        dsk[out_key] = (_empty,) + empty
    elif len(parts) == 1:
        fn, keys, kw = parts[0]
        dsk[out_key] = (functools.partial(_finished, fn, final=final, cast=None, **kw), *keys)
    else:
        keys_of_parts = []
        for j, (fn, keys, kw) in enumerate(parts):
            pk = part_key + (j,)
            dsk[pk] = (functools.partial(fn, cast=cast, **kw), *keys)
            keys_of_parts.append(pk)
        _merge_tree(dsk, keys_of_parts, out_key, merge_name, split_every, final)


# ---- scaled dot-product attention ----------------------------------------------------

def scaled_dot_product_attention(query, key, value, attn_mask=None, *, is_causal=False,
                                 scale=None, enable_gqa=False, causal_alignment="top_left",
                                 return_lse=False, split_every=None, num_threads=None):
    r"""Scaled dot-product attention on dask arrays: lazy, chunked like the query.

    The same arguments and results as :func:`fastattn.scaled_dot_product_attention`
    (NumPy arrays are accepted and wrapped). Chunks:

    - batch and head chunks are independent blocks, and so are query-length chunks;
    - key-length chunks are **sequence parallelism**: each (query chunk, key chunk)
      pair is one task computing a partial output and its log-sum-exp with the
      fused kernel; the partials of a query chunk are merged by their log-sum-exp,
      ``split_every`` per task (a tree), never by gathering every key in one task.
      With ``is_causal`` the pairs wholly above the diagonal are not in the graph;
    - a mask is chunked like the scores (query rows, key columns; a broadcast axis
      stays broadcast); grouped-query key/value heads are never repeated.

    Chunks of query, key, value and mask that do not line up are rechunked to the
    query's (batch, heads, query length) and the key's (key length) chunks; E and Ev
    are taken whole.

    Parameters
    ----------
    query, key, value, attn_mask, is_causal, scale, enable_gqa, causal_alignment, return_lse
        As for :func:`fastattn.scaled_dot_product_attention`; dask arrays or
        array_like.
    split_every : int, optional
        Partial results merged per task (at least 2); default 4.
    num_threads : int, optional
        Threads of each task's kernel call; default :func:`task_threads`.

    Returns
    -------
    out : dask.array.Array, shape (..., L, Ev)
        Chunked like the query on the batch and length axes, one chunk of Ev.
    lse : dask.array.Array, shape (..., L)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError, ValueError
        Whatever :func:`fastattn.scaled_dot_product_attention` raises for these
        arguments, while the graph is built; ``ValueError`` for an input of unknown
        chunk sizes.

    Notes
    -----
    With grouped-query attention a query head chunk that straddles a group
    boundary off the group grid is split at it (so that it reads one key/value
    chunk): the output then has those finer head chunks.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import fastattn
    >>> import fastattn.dask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 256, 16), dtype=np.float32) for _ in range(3))
    >>> dq = da.from_array(q, chunks=(1, 2, 64, 16))      # batch, heads, query chunks
    >>> dk = da.from_array(k, chunks=(1, 2, 128, 16))     # key chunks: sequence parallel
    >>> dv = da.from_array(v, chunks=(1, 2, 128, 16))
    >>> out = fastattn.dask.scaled_dot_product_attention(dq, dk, dv, is_causal=True)
    >>> out.chunks[2]
    (64, 64, 64, 64)
    >>> ref = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool(np.allclose(out.compute(scheduler="sync"), ref, atol=1e-5))
    True
    """
    q, k, v = _wrap(query, "query"), _wrap(key, "key"), _wrap(value, "value")
    mask = None if attn_mask is None else _wrap(attn_mask, "attn_mask")
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    ops = _Operands(_placeholder(q), _placeholder(k), _placeholder(v),
                    None if mask is None else _placeholder(mask), enable_gqa)
    scale = check_scale(scale, ops.E)
    split_every = _check_split_every(split_every)
    if num_threads is not None:
        _threads.resolve_num_threads(num_threads)
    L, S, E, Ev = ops.L, ops.S, ops.E, ops.Ev
    while mask is not None and mask.ndim < 2:
        mask = mask[np.newaxis]

    arrays = dict(query=q, key=k, value=v)
    if mask is not None:
        arrays["attn_mask"] = mask
    batch = _Batch(ops.batch_shape, arrays, ops.group)
    t = batch.targets
    q_rows, k_rows = t["query"][-2], k.chunks[-2]
    t["query"][-1] = t["key"][-1] = (E,)
    t["value"][-2], t["value"][-1] = k_rows, (Ev,)
    if mask is not None:
        if mask.shape[-2] != 1:
            t["attn_mask"][-2] = q_rows
        if mask.shape[-1] != 1:
            t["attn_mask"][-1] = k_rows
    arrays = {name: _rechunk(a, t[name]) for name, a in arrays.items()}
    q, k, v, mask = arrays["query"], arrays["key"], arrays["value"], arrays.get("attn_mask")

    is_causal = bool(is_causal)
    token = tokenize(q.name, k.name, v.name, None if mask is None else mask.name, is_causal,
                     causal_alignment, scale, bool(enable_gqa), return_lse, split_every,
                     num_threads)
    name = f"fastattn-sdpa-{token}"
    part_name, merge_name = f"fastattn-sdpa-partial-{token}", f"fastattn-sdpa-merge-{token}"
    key_of = name + "-pair" if return_lse else name
    compute, result = ops.compute, ops.result
    cast = compute if result in HALF else None
    final = (result, return_lse)
    common = dict(scale=scale, enable_gqa=bool(enable_gqa), num_threads=num_threads)
    diagonal = 0 if causal_alignment == "top_left" else S - L   # query i sees j <= i + diagonal

    dsk = {}
    for bidx, bshape in batch.blocks():
        qb, kb, vb = batch.index("query", bidx), batch.index("key", bidx), \
            batch.index("value", bidx)
        mb = None if mask is None else batch.index("attn_mask", bidx)
        for i, (a, b) in enumerate(_ranges(q_rows)):
            out_key = (key_of,) + bidx + (i,) + ((0,) if not return_lse else ())
            parts = []                                  # (function, keys, keywords)
            for j, (c, d) in enumerate(_ranges(k_rows)):
                if d == c:
                    continue
                offset = None
                if is_causal:
                    if c > b - 1 + diagonal:
                        continue                    # wholly above the diagonal: no task
                    if d - 1 > a + diagonal:
                        offset = a + diagonal - c   # crosses it
                m_key = None if mask is None else (
                    (mask.name,) + mb + (0 if mask.shape[-2] == 1 else i,
                                         0 if mask.shape[-1] == 1 else j))
                parts.append((_attend, ((q.name,) + qb + (i, 0), (k.name,) + kb + (j, 0),
                                        (v.name,) + vb + (j, 0), m_key),
                              dict(offset=offset, **common)))
            _block_tasks(dsk, out_key, parts, (part_name,) + bidx + (i,), merge_name,
                         split_every, final, cast,
                         (bshape + (b - a, Ev), bshape + (b - a,), result, compute, return_lse))
    return _results(dsk, name, list(arrays.values()), batch.chunks, q_rows, Ev, result,
                    compute, return_lse)


# ---- local (sliding-window) attention ------------------------------------------------

def _take_rows(x, lo, hi):
    return x[..., lo:hi, :]


def _concat_rows(pieces):
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-2)


def _local_part(q, k_pieces, v_pieces, *, pad, window, dilation, global_flags, scale,
                num_threads, cast):
    """(out, lse) of a query chunk over its window's keys (the halo).

    ``pad`` zero query rows are appended so that the kernel's bottom-right alignment
    puts query ``i`` at its own key position in the halo; they are dropped again.
    """
    k, v = _concat_rows(k_pieces), _concat_rows(v_pieces)
    if cast is not None:
        q = q.astype(cast)
    rows = q.shape[-2]
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-2] + (pad, q.shape[-1]), dtype=q.dtype)],
                           axis=-2)
    out, lse = _local_attention(q, k, v, window, dilation=dilation, global_tokens=global_flags,
                                scale=scale, return_lse=True,
                                num_threads=task_threads(num_threads))
    return out[..., :rows, :], lse[..., :rows]


def _global_part(q, k, v, *, query_global, key_global, outside, scale, num_threads, cast):
    """(out, lse) of a query chunk over the keys of one key chunk outside its halo that
    it attends through global tokens: all of them for a global query, else the global
    keys."""
    if cast is not None:
        q = q.astype(cast)
    keep = (query_global[:, None] & outside[None, :]) | key_global[None, :]
    return _sdpa(q, k, v, keep, scale=scale, return_lse=True,
                 num_threads=task_threads(num_threads))


def local_attention(query, key, value, window, *, dilation=1, global_tokens=None, scale=None,
                    return_lse=False, split_every=None, num_threads=None):
    """Sliding-window attention on dask arrays, each query chunk reading only its halo.

    The same arguments and results as :func:`fastattn.local_attention` (query ``i``
    sees key ``j`` iff ``-left <= j - i' <= right`` and ``(j - i') % dilation == 0``,
    ``i' = i + S - L``; plus ``global_tokens``). Each query chunk is one task over
    the rows of the key/value chunks its window covers (the halo, like
    ``dask.array.map_overlap``: only those rows are moved, from at most the chunks
    the window spans); batch and head chunks are independent. A window wider than a
    chunk simply reads from more neighbours.

    With ``global_tokens``, the keys outside the halo that a query chunk attends
    (global keys, or every key for a global query) are extra (query chunk, key
    chunk) tasks merged with the halo's result by log-sum-exp, as in
    :func:`scaled_dot_product_attention`; key chunks with nothing to attend are
    not in the graph.

    Parameters
    ----------
    query, key, value, window, dilation, global_tokens, scale, return_lse
        As for :func:`fastattn.local_attention`; dask arrays or array_like.
    split_every : int, optional
        Partial results merged per task (with ``global_tokens``); default 4.
    num_threads : int, optional
        Threads of each task's kernel call; default :func:`task_threads`.

    Returns
    -------
    out : dask.array.Array, shape (..., L, Ev)
    lse : dask.array.Array, shape (..., L)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError, ValueError
        Whatever :func:`fastattn.local_attention` raises for these arguments, while
        the graph is built.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import fastattn
    >>> import fastattn.dask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1000, 16)) for _ in range(3))
    >>> dq, dk, dv = (da.from_array(x, chunks=(1, 250, 16)) for x in (q, k, v))
    >>> out = fastattn.dask.local_attention(dq, dk, dv, window=(64, 0))
    >>> ref = fastattn.reference.local_attention(q, k, v, window=(64, 0))
    >>> bool(np.allclose(out.compute(scheduler="sync"), ref))
    True
    """
    q, k, v = _wrap(query, "query"), _wrap(key, "key"), _wrap(value, "value")
    _, _, _, compute, result = check_qkv(_placeholder(q), _placeholder(k), _placeholder(v))
    L, E, S, Ev = q.shape[-2], q.shape[-1], v.shape[-2], v.shape[-1]
    batch_shape = check_batch_shape([q.shape[:-2], k.shape[:-2], v.shape[:-2]],
                                    query=q.shape, key=k.shape, value=v.shape)
    left, right = check_window(window)
    dilation = check_int("dilation", dilation)
    scale = check_scale(scale, E)
    gq, gk = (None, None) if global_tokens is None else _global_flags(global_tokens, L, S)
    split_every = _check_split_every(split_every)
    if num_threads is not None:
        _threads.resolve_num_threads(num_threads)

    arrays = dict(query=q, key=k, value=v)
    batch = _Batch(batch_shape, arrays)
    t = batch.targets
    q_rows, k_rows = t["query"][-2], k.chunks[-2]
    t["query"][-1] = t["key"][-1] = (E,)
    t["value"][-2], t["value"][-1] = k_rows, (Ev,)
    q, k, v = (_rechunk(a, t[name]) for name, a in arrays.items())

    token = tokenize(q.name, k.name, v.name, left, right, dilation,
                     None if gk is None else np.flatnonzero(gk), scale, return_lse,
                     split_every, num_threads)
    name = f"fastattn-local-{token}"
    part_name, merge_name = f"fastattn-local-partial-{token}", f"fastattn-local-merge-{token}"
    halo_k, halo_v = f"fastattn-local-halo-key-{token}", f"fastattn-local-halo-value-{token}"
    key_of = name + "-pair" if return_lse else name
    cast = compute if result in HALF else None
    final = (result, return_lse)
    common = dict(scale=scale, num_threads=num_threads)
    shift = S - L                               # query i sits at key position i + shift

    dsk = {}
    for bidx, bshape in batch.blocks():
        qb, kb, vb = (batch.index(n, bidx) for n in ("query", "key", "value"))
        for i, (a, b) in enumerate(_ranges(q_rows)):
            out_key = (key_of,) + bidx + (i,) + ((0,) if not return_lse else ())
            q_key = (q.name,) + qb + (i, 0)
            ks = min(max(a + shift - left, 0), S)       # the halo: keys [ks, ke)
            ke = min(max(b + shift + right, 0), S)
            parts = []                                  # (function, keys, keywords)
            if b > a and ke > ks:
                k_pieces, v_pieces = [], []
                for j, (c, d) in enumerate(_ranges(k_rows)):
                    lo, hi = max(c, ks) - c, min(d, ke) - c
                    if hi <= lo:
                        continue
                    for pieces, arr, idx, halo in ((k_pieces, k, kb, halo_k),
                                                   (v_pieces, v, vb, halo_v)):
                        whole = (arr.name,) + idx + (j, 0)
                        if (lo, hi) == (0, d - c):
                            pieces.append(whole)
                        else:
                            piece = (halo,) + idx + (i, j)
                            dsk[piece] = (functools.partial(_take_rows, lo=lo, hi=hi), whole)
                            pieces.append(piece)
                flags = None
                if gk is not None and gk[ks:ke].any():
                    flags = gk[ks:ke].copy()
                parts.append((_local_part, (q_key, k_pieces, v_pieces),
                              dict(pad=ke - (b + shift), window=(left, right),
                                   dilation=dilation, global_flags=flags, **common)))
            if gk is not None and b > a:
                query_global = gq[a:b]
                for j, (c, d) in enumerate(_ranges(k_rows)):
                    outside = np.ones(d - c, dtype=bool)
                    if ke > ks:
                        outside[max(c, ks) - c:max(min(d, ke) - c, 0)] = False
                    key_global = gk[c:d] & outside
                    if key_global.any() or (query_global.any() and outside.any()):
                        parts.append((_global_part, (q_key, (k.name,) + kb + (j, 0),
                                                     (v.name,) + vb + (j, 0)),
                                      dict(query_global=query_global, key_global=key_global,
                                           outside=outside, **common)))
            _block_tasks(dsk, out_key, parts, (part_name,) + bidx + (i,), merge_name,
                         split_every, final, cast,
                         (bshape + (b - a, Ev), bshape + (b - a,), result, compute, return_lse))
    return _results(dsk, name, [q, k, v], batch.chunks, q_rows, Ev, result, compute, return_lse)


# ---- linear attention ----------------------------------------------------------------

def _features(x, feature_map, compute):
    x = x.astype(compute, copy=False)
    if isinstance(feature_map, str):                # "elu": elu(x) + 1 = x + 1 or exp(x)
        phi = np.minimum(x, 0)
        np.exp(phi, out=phi)
        np.add(x, 1, out=phi, where=x > 0)
        return phi
    return np.asarray(feature_map(x), dtype=compute)


def _feature_size(feature_map, E, compute):
    """m, the features per row, checking ``feature_map`` as the NumPy function does."""
    if isinstance(feature_map, str):
        check_choice("feature_map", feature_map, ("elu",))
        return E
    if not callable(feature_map):
        raise TypeError(f"feature_map must be 'elu' or a callable, got {feature_map!r}")
    probe = np.asarray(feature_map(np.zeros((1, E), dtype=compute)))
    if probe.ndim < 2 or probe.shape[-2] != 1 or probe.shape[-1] == 0:
        raise ValueError(f"feature_map must map (..., rows, E={E}) to (..., rows, m) with "
                         f"m >= 1, row by row (it is applied chunk by chunk), got "
                         f"{probe.shape} for an input of shape (1, {E})")
    return probe.shape[-1]


def _identity(x):
    return x


def _products(a, b, num_threads):
    """``a @ b.swapaxes(-1, -2)`` over broadcast batch axes, on fastattn's threads
    (NumPy's ``@`` would wake its BLAS threads, which spin on a busy machine)."""
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    with _threads.single_threaded_blas():
        return _linear.stacked_abt(a, b, batch, task_threads(num_threads))


def _kv_summary(k, v, *, feature_map, compute, num_threads):
    """``phi(K)^T [V 1]`` of one key chunk: ``(..., 1, m, Ev + 1)``."""
    fk_t = np.ascontiguousarray(np.swapaxes(_features(k, feature_map, compute), -1, -2))
    rows, ev = v.shape[-2:]
    v1_t = np.empty(v.shape[:-2] + (ev + 1, rows), dtype=compute)
    v1_t[..., :ev, :] = np.swapaxes(v, -1, -2)
    v1_t[..., ev, :] = 1
    # sum_j phi(k_j) [v_j 1]^T: the state sum_j phi(k_j) v_j^T and the normaliser sum_j phi(k_j)
    return _products(fk_t, v1_t, num_threads)[..., np.newaxis, :, :]


def _with_state(fq, state, num_threads):
    # phi(Q) [S z]: (..., rows, Ev + 1)
    return _products(fq, np.ascontiguousarray(np.swapaxes(state, -1, -2)), num_threads)


def _apply_state(q, state, *, feature_map, eps, compute, result, num_threads):
    """``phi(Q) S / (phi(Q) z + eps)`` for the whole sequence's state ``[S z]``."""
    nd = _with_state(_features(q, feature_map, compute), state, num_threads)
    return (nd[..., :-1] / (nd[..., -1:] + eps)).astype(result, copy=False)


def _causal_chunk(q, k, v, prefix, *, feature_map, eps, compute, result, num_threads):
    """Causal linear attention of one chunk, given the state ``[P zP]`` of the keys
    before it.

    The chunk's own causal part runs on fastattn's kernel, which returns
    ``num / (den + eps)``; its numerator is recovered with ``den`` (a cumulative sum
    of the key features), the prefix's contribution added, and the row normalised.
    """
    fq, fk = _features(q, feature_map, compute), _features(k, feature_map, compute)
    own = _linear_attention(fq, fk, v, feature_map=_identity, causal=True, eps=eps,
                            num_threads=task_threads(num_threads))
    den = np.sum(fq * np.cumsum(fk, axis=-2), axis=-1)           # phi(q_i) . sum_{j<=i} phi(k_j)
    nd = _with_state(fq, prefix[..., 0, :, :], num_threads)      # phi(q_i) [P zP]
    num = own * (den + eps)[..., None] + nd[..., :-1]
    return (num / (den + nd[..., -1] + eps)[..., None]).astype(result, copy=False)


def linear_attention(query, key, value, *, feature_map="elu", causal=False, eps=1e-6,
                     split_every=None, num_threads=None):
    r"""Linear attention on dask arrays: a tree sum of key-value summaries, or a scan.

    The same arguments and result as :func:`fastattn.linear_attention`,
    ``out_i = phi(q_i) @ sum_j phi(k_j) v_j^T / (phi(q_i) @ sum_j phi(k_j) + eps)``.

    - Non-causal: each key chunk is summarised as ``phi(K_j)^T [V_j 1]``
      (``(m, Ev + 1)`` per batch entry), the summaries are summed by a tree reduction
      (``split_every`` at a time), and each query chunk is one task multiplying
      its features with the sum. Query and key chunks are independent.
    - Causal (``L == S``; the keys are chunked like the queries): each chunk's
      prefix state, the sum of the summaries of the chunks before it, comes from an
      exclusive prefix scan (``dask.array.cumsum``, Blelloch's log-depth form);
      each chunk then runs fastattn's causal kernel on its own rows and adds its
      prefix state's contribution.

    Parameters
    ----------
    query, key, value, feature_map, causal, eps
        As for :func:`fastattn.linear_attention`; dask arrays or array_like. A
        callable ``feature_map`` is applied chunk by chunk, so it must act on each
        row alone (as ``"elu"`` does).
    split_every : int, optional
        Summaries summed per task; default 4.
    num_threads : int, optional
        Threads of each task's kernel call; default :func:`task_threads`.

    Returns
    -------
    out : dask.array.Array, shape (..., L, Ev)

    Raises
    ------
    TypeError, ValueError
        Whatever :func:`fastattn.linear_attention` raises for these arguments, while
        the graph is built.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import fastattn
    >>> import fastattn.dask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1000, 8)) for _ in range(3))
    >>> dq, dk, dv = (da.from_array(x, chunks=(2, 250, 8)) for x in (q, k, v))
    >>> out = fastattn.dask.linear_attention(dq, dk, dv, causal=True)
    >>> ref = fastattn.reference.linear_attention(q, k, v, causal=True)
    >>> bool(np.allclose(out.compute(scheduler="sync"), ref))
    True
    """
    q, k, v = _wrap(query, "query"), _wrap(key, "key"), _wrap(value, "value")
    pq, pk, pv = _placeholder(q), _placeholder(k), _placeholder(v)
    _, _, _, compute, result = check_qkv(pq, pk, pv)
    causal = bool(causal)
    _check_causal_lengths(causal, pq, pk)
    batch_shape = check_batch_shape([q.shape[:-2], k.shape[:-2], v.shape[:-2]],
                                    query=q.shape, key=k.shape, value=v.shape)
    eps = float(eps)
    E, Ev = q.shape[-1], v.shape[-1]
    m = _feature_size(feature_map, E, compute)
    split_every = _check_split_every(split_every)
    if num_threads is not None:
        _threads.resolve_num_threads(num_threads)

    arrays = dict(query=q, key=k, value=v)
    batch = _Batch(batch_shape, arrays)
    t = batch.targets
    k_rows = t["query"][-2] if causal else k.chunks[-2]
    t["query"][-1] = t["key"][-1] = (E,)
    t["key"][-2] = t["value"][-2] = k_rows
    t["value"][-1] = (Ev,)
    q, k, v = (_rechunk(a, t[name]) for name, a in arrays.items())

    nb = len(batch_shape)

    def ind(ndim, *tail):
        return tuple(f"b{d}" for d in range(nb - (ndim - 2), nb)) + tail

    kv_ndim = max(k.ndim, v.ndim)
    options = dict(feature_map=feature_map, compute=compute, num_threads=num_threads)
    summaries = da.blockwise(
        _kv_summary, ind(kv_ndim, "s", "m", "c"), k, ind(k.ndim, "s", "e"),
        v, ind(v.ndim, "s", "f"), adjust_chunks={"s": 1}, new_axes={"m": m, "c": Ev + 1},
        meta=np.empty((0,) * (kv_ndim + 1), dtype=compute), concatenate=True,
        token="fastattn-linear-summary",
        **options)
    out_ind = ind(nb + 2, "l", "f")
    out_meta = np.empty((0,) * (nb + 2), dtype=result)
    if not causal:
        state = summaries.sum(axis=-3, split_every=split_every)
        return da.blockwise(
            _apply_state, out_ind, q, ind(q.ndim, "l", "e"), state, ind(kv_ndim, "m", "c"),
            new_axes={"f": Ev}, meta=out_meta, concatenate=True, token="fastattn-linear", eps=eps,
            result=result, **options)
    # the state of the keys before chunk i: an exclusive prefix sum over the summaries
    first = da.zeros(summaries.shape[:-3] + (1, m, Ev + 1), dtype=compute,
                     chunks=summaries.chunks[:-3] + ((1,), (m,), (Ev + 1,)))
    if summaries.numblocks[-3] > 1:
        first = da.concatenate([first, summaries[..., :-1, :, :]], axis=-3)
    prefix = da.cumsum(first, axis=-3, method="blelloch")
    return da.blockwise(
        _causal_chunk, out_ind, q, ind(q.ndim, "l", "e"), k, ind(k.ndim, "l", "e"),
        v, ind(v.ndim, "l", "f"), prefix, ind(kv_ndim, "l", "m", "c"), align_arrays=False,
        concatenate=True, meta=out_meta, token="fastattn-linear-causal", eps=eps, result=result,
        **options)
