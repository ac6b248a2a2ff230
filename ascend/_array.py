"""DeviceArray: an n-d array resident in NPU memory, and the dtype table."""

import functools
import operator

import numpy as np

from ._meta import contiguous_strides
from ._owner import Owner
from ._runtime import device_index, get_runtime

__all__ = ["DeviceArray", "to_device", "zeros", "DTYPES", "dtype_name", "host_storage",
           "download"]

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
    try:
        return _dtype_name(dtype)
    except TypeError:  # unhashable: not cached (or not a dtype: raises again below)
        return np.dtype(dtype).name


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype):
    # cached: numpy's dtype.name costs microseconds, on every operand of every call
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
    if _ml_dtypes is not None:  # the device's bits as they are (NaN payloads included)
        return bits.view(_ml_dtypes.bfloat16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def download(runtime, buffer, shape, name):
    """A host copy of the ``shape`` array of dtype ``name`` at the start of ``buffer``.

    bfloat16 comes back as float32 (exactly) unless ``ml_dtypes`` is installed.
    """
    bits = np.empty(shape, dtype=DTYPES[name][1])
    if bits.nbytes:
        runtime.download(buffer, bits)
    return _from_storage(bits, name)


class DeviceArray(Owner):
    """An array in NPU memory.

    Create one with :func:`to_device` or :func:`zeros`; the ascend operators
    return them when given them. Release it with :meth:`close` (alias
    :meth:`free`) or a ``with`` block; garbage collection frees it too, as a
    safety net. Any use after that raises ``ValueError``. DeviceArray follows
    the owner protocol of ``ascend._owner.Owner``.

    Write host data into a region with basic indexing (``x[i, :, a:b] = values``),
    copy regions on the device with :meth:`copy_region`, and read with
    :meth:`to_numpy`. There is no implicit conversion: ``np.asarray(x)`` raises
    ``TypeError``.

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype or str
        ``'bfloat16'`` (a string) unless ``ml_dtypes`` is installed.
    device : int
        The device index (``npu:<device>``).
    readonly : bool
        True for read-only views (:meth:`view`): writes raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np, ascend
    >>> with ascend.to_device(np.ones((2, 3), np.float32)) as x:
    ...     print(x.shape, x.to_numpy().sum())
    (2, 3) 6.0
    >>> x.closed
    True
    >>> x.to_numpy()
    Traceback (most recent call last):
        ...
    ValueError: DeviceArray(shape=(2, 3), dtype=float32, device='npu:0', closed) is closed (freed)
    """

    __slots__ = ("_buffer", "_runtime", "shape", "_dtype_name", "device", "_base", "_readonly",
                 "__weakref__")

    def __init__(self, buffer, shape, name, runtime, base=None, readonly=False):
        self._buffer = buffer
        self._runtime = runtime
        self._base = base          # the owner of the memory, for views; None if we own it
        Owner.__init__(self)       # from here on, close() (or collection) releases buffer
        self.shape = tuple(int(n) for n in shape)
        self._dtype_name = name
        self.device = buffer.device
        self._readonly = readonly

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
    def readonly(self):
        return self._readonly

    @property
    def closed(self):
        """True after :meth:`close` of this array, or of the owner of a view, or
        after the runtime's teardown at interpreter exit."""
        return (not getattr(self, "_open", None) or self._buffer.ptr is None  # runtime teardown
                or (self._base is not None and self._base.closed))

    @property
    def freed(self):
        """Alias of :attr:`closed`."""
        return self.closed

    def _closed_message(self):
        return f"{self!r} is closed (freed)"

    def _live_buffer(self):
        if self.closed:         # inlined check: this runs for every operand of every call
            self._check_open()  # raises
        return self._buffer

    def _writable_buffer(self):
        buffer = self._live_buffer()
        if self.readonly:
            raise ValueError(f"assignment destination is read-only: {self!r}")
        return buffer

    def __array__(self, dtype=None, copy=None):
        # NumPy would otherwise wrap the object in a 0-d object array and fail later
        raise TypeError(f"{self!r} is in NPU memory and is not converted implicitly; copy it "
                        f"to the host with .to_numpy()")

    def to_numpy(self):
        """Copy to the host.

        bfloat16 arrays come back as float32 (exactly) unless ``ml_dtypes`` is installed.
        """
        return download(self._runtime, self._live_buffer(), self.shape, self._dtype_name)

    def view(self, *, readonly=False):
        """A DeviceArray on the same memory that does not own it.

        Closing the view frees nothing; closing the owner (this array, or the
        owner of this view) closes the view too. A view keeps its owner
        alive as long as it exists. Views of read-only views are read-only.

        Examples
        --------
        >>> import numpy as np, ascend
        >>> x = ascend.zeros((2, 2), np.float32)
        >>> v = x.view(readonly=True)
        >>> v[0] = 1.0
        Traceback (most recent call last):
            ...
        ValueError: assignment destination is read-only: DeviceArray(shape=(2, 2), ...)
        >>> v.close()                  # lets go of the memory, frees nothing
        >>> x[0] = 1.0
        >>> x.to_numpy()[0]
        array([1., 1.], dtype=float32)
        >>> w = x.view()
        >>> x.close()                  # frees the memory: every view is closed too
        >>> w.closed
        True
        """
        buffer = self._live_buffer()
        owner = self if self._base is None else self._base
        return DeviceArray(buffer, self.shape, self._dtype_name, self._runtime, base=owner,
                           readonly=readonly or self.readonly)

    def _region(self, key):
        """(shape, byte offset, byte strides) of the basic-indexed region ``self[key]``."""
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
        offset = region.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        return region.shape, offset, region.strides

    def __setitem__(self, key, value):
        """Write into a basic-indexed region (ints, slices; no fancy indexing).

        ``value``: host values broadcast to the region (one host-to-device copy per
        2-D slab of the region, e.g. ``cache[block, :, a:b] = kv`` is one copy), or a
        DeviceArray of the region's shape (see :meth:`copy_region`).
        """
        if isinstance(value, DeviceArray):
            self.copy_region(key, value)
            return
        buffer = self._writable_buffer()
        shape, offset, strides = self._region(key)
        values = host_storage(np.broadcast_to(np.asarray(value), shape), self._dtype_name)
        if values.size == 0:
            return
        itemsize = values.itemsize
        axis, run = _contiguous_tail(shape, strides, itemsize)
        if axis == 0:
            self._runtime.write(buffer, offset, values)
            return
        rows, pitch = shape[axis - 1], strides[axis - 1]
        if pitch >= run:  # rows along one axis are one 2-D copy
            slabs = values.reshape(-1, rows * run // itemsize)
            for position, index in enumerate(np.ndindex(*shape[:axis - 1])):
                start = offset + sum(i * s for i, s in zip(index, strides))
                self._runtime.write_rows(buffer, start, pitch, slabs[position], rows, run)
            return
        runs = values.reshape(-1, run // itemsize)  # negative steps: one copy per run
        for position, index in enumerate(np.ndindex(*shape[:axis])):
            start = offset + sum(i * s for i, s in zip(index, strides))
            self._runtime.write(buffer, start, runs[position])

    def copy_region(self, key, source, source_key=Ellipsis):
        """``self[key] = source[source_key]``, copied device to device.

        Both are basic-indexed regions of the same shape (no broadcasting), on the
        same device with the same dtype; ``source`` may be ``self`` if the regions
        do not overlap. One ``aclrtMemcpy`` per contiguous run.

        Examples
        --------
        >>> import numpy as np, ascend
        >>> with ascend.to_device(np.arange(6.0, dtype=np.float32).reshape(3, 2)) as x:
        ...     x.copy_region(2, x, 0)
        ...     print(x.to_numpy().tolist())
        [[0.0, 1.0], [2.0, 3.0], [0.0, 1.0]]
        """
        if not isinstance(source, DeviceArray):
            raise TypeError(f"source must be a DeviceArray, got {type(source).__name__}")
        buffer = self._writable_buffer()
        source_buffer = source._live_buffer()
        if source.device != self.device:
            raise ValueError(f"{source!r} is on npu:{source.device}, not npu:{self.device}; "
                             "copy it through the host")
        if source._dtype_name != self._dtype_name:
            raise TypeError(f"cannot copy {source._dtype_name} into {self._dtype_name} on the "
                            "device; convert on the host")
        shape, offset, strides = self._region(key)
        source_shape, source_offset, source_strides = source._region(source_key)
        if source_shape != shape:
            raise ValueError(f"source region {source_shape} and destination region {shape} "
                             "differ in shape")
        if 0 in shape:
            return
        itemsize = DTYPES[self._dtype_name][1].itemsize
        if source_buffer is buffer and _overlap((offset, shape, strides),
                                                (source_offset, shape, source_strides),
                                                itemsize):
            raise ValueError("source and destination regions overlap")
        axis = max(_contiguous_tail(shape, strides, itemsize)[0],
                   _contiguous_tail(shape, source_strides, itemsize)[0])
        run = itemsize * int(np.prod(shape[axis:], dtype=np.int64))
        for index in np.ndindex(*shape[:axis]):
            self._runtime.copy(buffer, offset + sum(i * s for i, s in zip(index, strides)),
                               source_buffer,
                               source_offset + sum(i * s for i, s in zip(index, source_strides)),
                               run)

    def _release(self):
        # the Owner hook: an owner returns its memory to the pool; a view only lets go
        buffer, self._buffer = self._buffer, None
        if self._base is None:
            self._runtime.release(buffer)

    def free(self):
        """Alias of :meth:`close`: return the memory (to the pool); idempotent.
        A view only lets go of it."""
        self.close()

    def __repr__(self):
        state = ", closed" if self.closed else (", read-only view" if self.readonly else "")
        return f"DeviceArray(shape={self.shape}, dtype={self._dtype_name}, device='npu:{self.device}'{state})"


def _contiguous_tail(shape, strides, itemsize):
    """``(axis, run_bytes)``: axes ``axis:`` of the region are one C-contiguous run."""
    axis, run = len(shape), itemsize
    while axis > 0 and (shape[axis - 1] == 1 or strides[axis - 1] == run):
        run *= shape[axis - 1]
        axis -= 1
    return axis, run


def _overlap(first, second, itemsize):
    """Whether the byte extents of two (offset, shape, strides) regions intersect."""
    def extent(offset, shape, strides):
        low = offset + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
        high = offset + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + itemsize
        return low, high
    (low1, high1), (low2, high2) = extent(*first), extent(*second)
    return low1 < high2 and low2 < high1


def _storable_name(dtype):
    """:func:`dtype_name` of ``dtype``; ``TypeError`` if the NPU cannot store it."""
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype {name} cannot be stored on the NPU; supported: {sorted(DTYPES)}")
    return name


def _filled_buffer(runtime, index, nbytes, fill):
    """A new buffer of ``nbytes`` on device ``index``, written by ``fill(buffer)`` unless
    empty; released again if that fails, so that a failed call leaks no device memory."""
    buffer = runtime.allocate(index, nbytes)
    try:
        if nbytes:
            fill(buffer)
    except BaseException:
        runtime.release(buffer)
        raise
    return buffer


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
    >>> x = ascend.to_device(np.arange(4.0), dtype=np.float32)
    >>> x
    DeviceArray(shape=(4,), dtype=float32, device='npu:0')
    >>> x.to_numpy()
    array([0., 1., 2., 3.], dtype=float32)
    >>> x.close()
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
    name = _storable_name(array.dtype if dtype is None else dtype)
    host = host_storage(array, name)
    runtime = get_runtime()
    buffer = _filled_buffer(runtime, index, host.nbytes, lambda b: runtime.upload(b, host))
    return DeviceArray(buffer, array.shape, name, runtime)  # host_storage makes 0-d 1-d


def zeros(shape, dtype=np.float32, device=0):
    """A new DeviceArray of zeros (``aclrtMemset``; device memory is not zeroed otherwise).

    Parameters
    ----------
    shape : int or tuple of int
    dtype : dtype or str, default float32
        Any dtype :func:`to_device` stores, ``"bfloat16"`` included.
    device : int or str, default 0

    Returns
    -------
    DeviceArray

    Examples
    --------
    >>> import numpy as np, ascend
    >>> with ascend.zeros((2, 3), "float16", device="npu:1") as x:
    ...     print(x.shape, x.dtype, x.device, x.to_numpy().sum())
    (2, 3) float16 1 0.0
    """
    index = device_index(device)
    name = _storable_name(dtype)
    try:
        shape = tuple(operator.index(n) for n in (shape if isinstance(shape, tuple)
                                                  else (shape,)))
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"negative dimensions are not allowed, got shape {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[name][1].itemsize
    runtime = get_runtime()
    buffer = _filled_buffer(runtime, index, nbytes, lambda b: runtime.memset(b, 0))
    return DeviceArray(buffer, shape, name, runtime)
