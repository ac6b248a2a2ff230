"""fastattn: fused, multi-threaded attention kernels for NumPy arrays.

The public API is re-exported here; each function lives in a small module:

- :mod:`fastattn.attention` -- ``scaled_dot_product_attention`` (the fused kernel)
- :mod:`fastattn.reference` -- plain NumPy float64 definitions used as ground truth
- ``set_num_threads`` / ``get_num_threads`` -- the default thread count

Kernels live in ``fastattn._kernels``: one Cython module per family over one shared
tile/softmax core (``tile.pxd`` + ``vecmath.h``).
"""
from fastattn import reference
from fastattn._threads import get_num_threads, set_num_threads
from fastattn.attention import scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention",
    "set_num_threads",
    "get_num_threads",
    "reference",
    "devices",
]


def devices():
    """The devices fastattn can compute on here, e.g. ``['cpu']``.

    Examples
    --------
    >>> import fastattn
    >>> "cpu" in fastattn.devices()
    True
    """
    return ["cpu"]
