"""DeviceArray: an n-d array resident in NPU memory, and the dtype table."""

import numpy as np

from ._meta import contiguous_strides
from ._runtime import device_index, get_runtime

__all__ = ["DeviceArray", "to_device", "DTYPES", "dtype_name", "host_storage"]

try:  # optional: gives NumPy a real bfloat16 dtype
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None

# name -> (aclDataType, NumPy dtype of the stored bits)
DTYPES = {
    "float32": (0, np.dtype(np.float32)),
    "float16": (1, np.dtype(np.float16)),
    "bfloat16": (27, np.dtype(np.uint16)),
    "int8": (2, np.dtype(np.int8)),
    "int32": (3, np.dtype(np.int32)),
    "uint8": (4, np.dtype(np.uint8)),
    "int64": (9, np.dtype(np.int64)),
    "bool": (12, np.dtype(np.bool_)),
}


def dtype_name(dtype):
    """Canonical name of a NumPy dtype or dtype string ('bfloat16' included)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return dtype
    return np.dtype(dtype).name


def _float_to_bfloat16_bits(values):
    """Round float32 values to bfloat16 (nearest even); return the uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # uint32 arithmetic wraps like C
    return np.where(is_nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


def host_storage(array, name):
    """``array`` as a C-contiguous NumPy array holding the device representation of ``name``."""
    if name == "bfloat16":
        if dtype_name(array.dtype) == "bfloat16":  # an ml_dtypes array: already the bits
            return np.ascontiguousarray(array).view(np.uint16)
        return _float_to_bfloat16_bits(array)
    return np.ascontiguousarray(array, dtype=DTYPES[name][1])


def _from_storage(bits, name):
    if name != "bfloat16":
        return bits
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    return widened.astype(_ml_dtypes.bfloat16) if _ml_dtypes is not None else widened


class DeviceArray:
    """An array in NPU memory.

    Create one with :func:`to_device`; the ascend operators return them when
    given them. Release it with :meth:`free` or a ``with`` block; garbage
    collection frees it too, as a safety net. Any use after :meth:`free`
    raises ``ValueError``.

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype or str
        ``'bfloat16'`` (a string) unless ``ml_dtypes`` is installed.
    device : int
        The device index (``npu:<device>``).

    Examples
    --------
    >>> import numpy as np, ascend
    >>> if ascend.is_available():
    ...     with ascend.to_device(np.ones((2, 3), np.float32)) as x:
    ...         print(x.shape, x.to_numpy().sum())
    ... else:
    ...     print((2, 3), 6.0)
    (2, 3) 6.0
    """

    __slots__ = ("_buffer", "_runtime", "shape", "_dtype_name", "device", "__weakref__")

    def __init__(self, buffer, shape, name, runtime):
        self._buffer = buffer
        self._runtime = runtime
        self.shape = tuple(int(n) for n in shape)
        self._dtype_name = name
        self.device = buffer.device

    @property
    def dtype(self):
        if self._dtype_name == "bfloat16":
            return np.dtype(_ml_dtypes.bfloat16) if _ml_dtypes is not None else "bfloat16"
        return np.dtype(self._dtype_name)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self):
        return DTYPES[self._dtype_name][1].itemsize

    @property
    def nbytes(self):
        return self.size * self.itemsize

    @property
    def freed(self):
        return self._buffer is None or self._buffer.ptr is None

    def _live_buffer(self):
        buffer = self._buffer
        if buffer is None or buffer.ptr is None:
            raise ValueError(f"{self!r} has been freed")
        return buffer

    def to_numpy(self):
        """Copy to the host.

        bfloat16 arrays come back as float32 (exactly) unless ``ml_dtypes`` is installed.
        """
        bits = np.empty(self.shape, dtype=DTYPES[self._dtype_name][1])
        if bits.nbytes:
            self._runtime.download(self._live_buffer(), bits)
        else:
            self._live_buffer()
        return _from_storage(bits, self._dtype_name)

    def __setitem__(self, key, value):
        """Write host values into a basic-indexed region (ints, slices; no fancy indexing).

        Used to update resident KV caches in place, e.g. ``cache[block, :, slot] = kv``.
        """
        buffer = self._live_buffer()
        keys = key if isinstance(key, tuple) else (key,)
        if not all(k is Ellipsis or (isinstance(k, (int, np.integer, slice))
                                     and not isinstance(k, (bool, np.bool_))) for k in keys):
            raise TypeError("DeviceArray supports only basic indexing (integers, slices, ...)")
        if Ellipsis not in keys:
            keys += (Ellipsis,)  # keeps the result a view even when every axis is an integer
        storage = DTYPES[self._dtype_name][1]
        # A stand-in with this shape and the storage itemsize: indexing it yields the
        # region's byte offset and strides without reading any memory.
        base = np.zeros(1, dtype=storage)
        byte_strides = tuple(s * storage.itemsize for s in contiguous_strides(self.shape))
        probe = np.lib.stride_tricks.as_strided(base, self.shape, byte_strides, writeable=False)
        region = probe[keys]
        values = host_storage(np.broadcast_to(np.asarray(value), region.shape), self._dtype_name)
        if region.size == 0:
            return
        offset = region.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        # Copy the largest C-contiguous trailing block at a time.
        inner, block_bytes = region.ndim, storage.itemsize
        while inner > 0 and (region.shape[inner - 1] == 1
                             or region.strides[inner - 1] == block_bytes):
            block_bytes *= region.shape[inner - 1]
            inner -= 1
        outer_shape, outer_strides = region.shape[:inner], region.strides[:inner]
        blocks = values.reshape(-1, block_bytes // storage.itemsize)
        for position, index in enumerate(np.ndindex(*outer_shape)):
            start = offset + sum(i * s for i, s in zip(index, outer_strides))
            self._runtime.write(buffer, start, blocks[position])

    def free(self):
        """Return the memory (to the pool); idempotent."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None and buffer.ptr is not None:
            self._runtime.release(buffer)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.free()

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown or runtime already finalised
            pass

    def __repr__(self):
        state = ", freed" if self.freed else ""
        return f"DeviceArray(shape={self.shape}, dtype={self._dtype_name}, device='npu:{self.device}'{state})"


def to_device(x, device=0, dtype=None):
    """Copy a host array to NPU memory.

    Parameters
    ----------
    x : array_like or DeviceArray
        A DeviceArray already on ``device`` (and of ``dtype``) is returned as is.
    device : int or str, default 0
        ``0``, ``"npu"`` or ``"npu:N"``.
    dtype : dtype or str, optional
        Convert on the host first; ``"bfloat16"`` rounds to nearest even.

    Returns
    -------
    DeviceArray

    Examples
    --------
    >>> import numpy as np, ascend
    >>> if ascend.is_available():
    ...     x = ascend.to_device(np.arange(4.0), dtype=np.float32)
    ...     print(x.to_numpy()); x.free()
    ... else:
    ...     print(np.arange(4.0, dtype=np.float32))
    [0. 1. 2. 3.]
    """
    index = device_index(device)
    if isinstance(x, DeviceArray):
        x._live_buffer()
        if x.device != index:
            raise ValueError(f"{x!r} is on npu:{x.device}, not npu:{index}; copy it through "
                             "the host with to_device(x.to_numpy(), ...)")
        if dtype is not None and dtype_name(dtype) != x._dtype_name:
            raise TypeError(f"{x!r} has dtype {x._dtype_name}; convert on the host")
        return x
    array = np.asarray(x)
    name = dtype_name(array.dtype if dtype is None else dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype {name} cannot be stored on the NPU; supported: {sorted(DTYPES)}")
    host = host_storage(array, name)
    runtime = get_runtime()
    buffer = runtime.allocate(index, host.nbytes)
    try:
        if host.nbytes:
            runtime.upload(buffer, host)
    except BaseException:
        runtime.release(buffer)
        raise
    return DeviceArray(buffer, host.shape, name, runtime)
