"""The compiled kernels: one Cython module per family over one shared core.

- ``tile.pxd`` + ``vecmath.h`` + ``tilegemm.h``: the tile/softmax core (the tile
  products on AVX-512 micro-kernels or BLAS, vector exp/max/sum built per ISA, online
  softmax, partial-result merging), inlined into each family.
- ``rowsoftmax.pxd``, ``tanhscores.pxd`` + ``tanhscores.h``, ``smallgemm.pxd`` +
  ``smallgemm.h``: pieces over that core used by a few families: one whole row of a
  masked softmax (softmax, additive), the tanh scores of additive attention, the small
  GEMMs and prefetching of paged decoding.
- ``dense.pyx``: scaled dot-product attention (FlashAttention-2 style driver).
- ``sparse.pyx``: block-sparse attention over a ``BlockLayout``.
- ``gathered.pyx``: attention of query runs over key runs read through row indices (a
  sort or an assignment), and the merging of partial results: LSH and improved
  clustered attention.
- ``clustering.pyx``: what content-based attention groups rows by: k-means, LSH
  hashing, each centroid's top-k keys, Sinkhorn's block mixing.
- ``lowrank.pyx``: linear attention and Performer as chunked reductions.
- ``paged.pyx``: attention over a paged key/value cache (decoding).
- ``softmax.pyx``, ``additive.pyx``: masked softmax; Bahdanau scores.
- ``backward.pyx`` + ``tilebwd.h``: the attention backward (FlashAttention-2's) and the
  softmax backward.
- ``linear.pyx``: ``x @ W.T + b`` projections in fastattn's own threads.

Each family's Python wrapper in ``fastattn/`` validates inputs; the kernels assume
valid arguments and never touch memory outside what they are given.
"""
import os
import sys
from pathlib import Path


def _has_compiled_kernels(folder):
    return any(folder.glob("dense.*.so")) or any(folder.glob("dense.*.pyd"))


# Run from a source checkout that was installed with `pip install .` rather than built
# in place (the README's commands do exactly that), Python imports this uncompiled
# copy of the package: borrow the compiled modules from the installed copy.
_here = Path(__file__).resolve().parent
if not _has_compiled_kernels(_here):
    for _entry in sys.path:
        _candidate = (Path(_entry or os.curdir) / "fastattn" / "_kernels").resolve()
        if _candidate != _here and _has_compiled_kernels(_candidate):
            __path__.append(str(_candidate))
            break
