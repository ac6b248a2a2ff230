"""fastattn: fused, multi-threaded attention kernels for NumPy arrays.

The public API is re-exported here; each function lives in a small module:

- :mod:`fastattn.attention` -- ``scaled_dot_product_attention`` (the fused kernel)
- :mod:`fastattn.backward` -- its gradients and the softmax's (training)
- :mod:`fastattn.reference` -- plain NumPy float64 definitions used as ground truth
- ``set_num_threads`` / ``get_num_threads`` -- the default thread count
- ``show_config`` -- how the kernels were built and what they use on this machine
- ``bfloat16`` -- the NumPy bfloat16 dtype of ``ml_dtypes``, re-exported

Kernels live in ``fastattn._kernels``: one Cython module per family over one shared
tile/softmax core (``tile.pxd`` + ``vecmath.h``).
"""
from ml_dtypes import bfloat16

from fastattn import reference
from fastattn._config import show_config
from fastattn._threads import get_num_threads, set_num_threads
from fastattn.attention import scaled_dot_product_attention
from fastattn.backward import (block_sparse_attention_backward, masked_softmax_backward,
                               scaled_dot_product_attention_backward)
from fastattn.masks import causal_mask, combine_masks, padding_mask
from fastattn.multihead import (MultiHeadAttention, merge_heads, multi_head_attention,
                                multi_head_attention_backward, split_heads)
from fastattn.positional import apply_rotary, sinusoidal_positional_encoding
from fastattn.scoring import additive_attention, concat_attention, dot_attention, general_attention
from fastattn.softmax import attention_weights, log_softmax, masked_softmax
from fastattn.paged import PagedKVCache, paged_attention
from fastattn.varlen import varlen_attention

from fastattn.sparse import BlockLayout, block_sparse_attention
from fastattn.sparse_patterns import (bigbird_attention, bigbird_layout, global_attention,
                                      local_attention, longformer_attention, strided_attention)
from fastattn.lowrank import (linear_attention, linformer_attention, performer_attention,
                              performer_features, synthesizer_attention)
from fastattn.content_sparse import (clustered_attention, lsh_attention, sinkhorn,
                                     sinkhorn_attention)

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention",
    "varlen_attention",
    # training: the backward pass
    "scaled_dot_product_attention_backward", "masked_softmax_backward",
    "block_sparse_attention_backward", "multi_head_attention_backward",
    # long sequences: one block-sparse kernel + patterns, content-based sparsity (hashing,
    # clustering, sorting), low-rank and kernelised variants
    "BlockLayout", "block_sparse_attention", "local_attention", "strided_attention",
    "global_attention", "longformer_attention", "bigbird_attention", "bigbird_layout",
    "lsh_attention", "clustered_attention", "sinkhorn_attention", "sinkhorn",
    "linear_attention", "performer_attention", "performer_features",
    "linformer_attention", "synthesizer_attention",
    # building blocks (masks, softmax, heads, positions, classic scoring rules)
    "masked_softmax", "log_softmax", "attention_weights",
    "causal_mask", "padding_mask", "combine_masks",
    "sinusoidal_positional_encoding", "apply_rotary",
    "split_heads", "merge_heads", "multi_head_attention", "MultiHeadAttention",
    "additive_attention", "concat_attention", "general_attention", "dot_attention",
    "PagedKVCache",
    "paged_attention",
    "set_num_threads",
    "get_num_threads",
    "show_config",
    "reference",
    "devices",
    "bfloat16",
]


def devices():
    """The devices fastattn can compute on here, e.g. ``['cpu', 'npu:0']``.

    ``"npu:N"`` entries appear when the CANN runtime is installed and sees an Ascend
    NPU (see the ``ascend`` package); pass them as ``device=`` to
    :func:`scaled_dot_product_attention`, :func:`multi_head_attention` and
    :func:`paged_attention`.

    Examples
    --------
    >>> import fastattn
    >>> "cpu" in fastattn.devices()
    True
    """
    from fastattn._npu import npu_devices
    return ["cpu"] + npu_devices()
