"""Chunk planning of multi-head attention: how a batch is cut into chunks of sequences.

:func:`batch_chunks` decides whether :func:`fastattn.multi_head_attention` takes a
batch a chunk of sequences at a time, and how many sequences (hence how large the
work buffers) a chunk has. Private: used by :mod:`fastattn.multihead` only.
"""
import math

import numpy as np

# Query rows (sequences x L) per thread in a chunk, when a batch of sequences is taken a
# chunk at a time. Each projection of a chunk is then cut into one block of up to 256 rows
# per thread (about where single-threaded sgemm reaches its best; smaller blocks cost up
# to 15%). Measured on a 2-core AVX-512 machine, B=8, S=256, E=768, H=12, float32,
# interleaved runs, time relative to the whole batch at once: 128 rows per thread 1.01,
# 256 0.92, 384 1.00, 512 0.99. Most of the gain is page faults not taken: at 256 the
# four 1.5 MB work buffers are reused from the heap, while from about 3 MB on glibc hands
# out fresh mmap'ed (zeroed) pages on each call.
CHUNK_ROWS_PER_THREAD = 256


def batch_chunks(q, k, v, mask, chunk_rows):
    # Arguments of multihead._Layer.attend_chunked when the batch is worth chunking,
    # else None: query, key and value share their batch shape (no broadcasting between
    # them), its entries are more than one chunk of about chunk_rows query rows, the
    # batch axes flatten into one without copying, and the mask is per sequence
    # (flattening the same way) or shared by all. Anything else takes the one-shot path.
    batch_shape = q.shape[:-2]
    if not batch_shape or k.shape[:-2] != batch_shape or v.shape[:-2] != batch_shape:
        return None
    chunk = max(1, chunk_rows // max(q.shape[-2], 1))
    if math.prod(batch_shape) <= chunk:
        return None
    flat = [_flatten_batch(a, len(batch_shape)) for a in (q, k, v)]
    per_sequence = False
    if mask is not None:
        # (..., heads, L, S), batch axes first; they must not add to the query's
        mask = np.asarray(mask)
        lead = mask.shape[:-3]
        if len(lead) > len(batch_shape):
            return None
        if any(size != 1 for size in lead):
            try:
                full = np.broadcast_to(mask, batch_shape + mask.shape[-3:])
            except ValueError:
                return None             # the one-shot path names the bad shapes
            mask, per_sequence = _flatten_batch(full, len(batch_shape)), True
            flat.append(mask)
        elif lead:
            mask = mask.reshape(mask.shape[-3:])
    if any(a is None for a in flat):
        return None
    return (*flat[:3], mask, per_sequence, batch_shape, chunk)


def _flatten_batch(a, nbatch):
    # a (*batch, ...) as (prod(batch), ...) without copying, or None when the batch axes
    # do not step through memory evenly
    axes = [(n, s) for n, s in zip(a.shape[:nbatch], a.strides[:nbatch]) if n != 1]
    if any(s0 != s1 * n1 for (_, s0), (n1, s1) in zip(axes, axes[1:])):
        return None
    return a.reshape((-1,) + a.shape[nbatch:])
