"""The compiled kernels: one Cython module per family over one shared core.

- ``tile.pxd`` + ``vecmath.h``: the tile/softmax core (BLAS tile products, vector
  exp/max/sum, online softmax, partial-result merging), inlined into each family.
- ``dense.pyx``: scaled dot-product attention (FlashAttention-2 style driver).

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
