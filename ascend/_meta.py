"""aclnn meta objects (tensors, int arrays, tensor lists) with scoped lifetime.

A :class:`DescriptorScope` creates descriptors for one operator call and
destroys them all when the call ends, whether it succeeded or raised, so a
failing call leaks no descriptor. Two caches keep repeated calls cheap:

* ``_shape_arguments``: the ctypes arrays for a shape, built once;
* :class:`DescriptorCache`: plain ``aclTensor`` descriptors keyed by
  (address, shape, strides, offset, dtype). A descriptor only records where
  data is and how it is laid out, so one for a pooled buffer or a resident
  DeviceArray is valid for every later call on the same address. Descriptors
  that a tensor list takes over are never cached.
"""

import functools
import threading
from ctypes import c_int64

from ._errors import AscendError
from ._library import TensorRef
from ._owner import Owner

__all__ = ["DescriptorCache", "DescriptorScope", "contiguous_strides"]

ACL_FORMAT_ND = 2
ACLNN_ERR_INNER = 561000


@functools.lru_cache(maxsize=512)
def _shape_arguments(shape, strides, offset):
    """ctypes arrays for aclCreateTensor: (dims, ndim, strides, storage dims, storage ndim).

    ``strides`` (in elements) None means C-contiguous. Contiguous tensors
    describe their storage with their own shape (as the CANN samples do);
    views describe it as one flat extent from the base (as torch_npu does).
    """
    ndim = len(shape)
    contiguous = contiguous_strides(shape)
    strides = contiguous if strides is None else tuple(strides)
    dims = (c_int64 * max(ndim, 1))(*shape)
    element_strides = (c_int64 * max(ndim, 1))(*strides)
    if offset == 0 and strides == contiguous:
        return dims, ndim, element_strides, dims, ndim
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    return dims, ndim, element_strides, (c_int64 * 1)(extent), 1


def contiguous_strides(shape):
    """Element strides of a C-contiguous array of ``shape``.

    Examples
    --------
    >>> from ascend._meta import contiguous_strides
    >>> contiguous_strides((2, 3, 4))
    (12, 4, 1)
    """
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class DescriptorCache:
    """Reusable ``aclTensor`` descriptors; the oldest are destroyed beyond ``capacity``.

    Evicted descriptors are destroyed one eviction round later, so a call in
    flight on another thread never sees its descriptor destroyed under it.
    """

    def __init__(self, libraries, capacity=256):
        self._meta = libraries.meta
        self._capacity = capacity
        self._entries = {}
        self._retired = []
        self._lock = threading.Lock()

    def get(self, key):
        return self._entries.get(key)

    def put(self, key, handle):
        with self._lock:
            if len(self._entries) >= self._capacity:
                retired, self._retired = self._retired, []
                for old_key in list(self._entries)[: self._capacity // 4]:
                    self._retired.append(self._entries.pop(old_key))
            else:
                retired = []
            self._entries[key] = handle
        for old in retired:
            self._meta.aclDestroyTensor(old)

    def clear(self):
        with self._lock:
            handles = list(self._entries.values()) + self._retired
            self._entries, self._retired = {}, []
        for handle in handles:
            self._meta.aclDestroyTensor(handle)


class DescriptorScope(Owner):
    """Creates aclnn descriptors for one call and destroys them on :meth:`close`.

    An :class:`~ascend._owner.Owner`: close it (or leave its ``with`` block)
    once the call is over; creating descriptors in a closed scope raises
    ``ValueError``. Descriptors that went to the ``cache`` are the cache's.

    Examples
    --------
    >>> from ascend._meta import DescriptorScope
    >>> from ascend._runtime import get_runtime
    >>> libraries = get_runtime().lib
    >>> with DescriptorScope(libraries) as scope:
    ...     t = scope.tensor(None, (0,), 0)
    ...     lengths = scope.int_array([3, 5])
    >>> scope.closed                          # both descriptors are destroyed
    True
    >>> scope.tensor(None, (0,), 0)
    Traceback (most recent call last):
        ...
    ValueError: <ascend._meta.DescriptorScope object at 0x...> is closed
    """

    def __init__(self, libraries, cache=None):
        self._meta = libraries.meta
        self._lib = libraries
        self._cache = cache
        self._tensors = []
        self._int_arrays = []
        self._tensor_lists = []
        Owner.__init__(self)

    def _release(self):
        meta = self._meta
        tensor_lists, self._tensor_lists = self._tensor_lists, []
        tensors, self._tensors = self._tensors, []
        int_arrays, self._int_arrays = self._int_arrays, []
        for handle in tensor_lists:  # also destroys the tensors inside
            meta.aclDestroyTensorList(handle)
        for handle in tensors:
            meta.aclDestroyTensor(handle)
        for handle in int_arrays:
            meta.aclDestroyIntArray(handle)

    def _checked(self, handle, name):
        if not handle:
            raw = self._lib.acl.aclGetRecentErrMsg()
            raise AscendError(ACLNN_ERR_INNER, name,
                              (raw.decode("utf-8", "replace") if raw else "") or "returned NULL")
        return handle

    def tensor(self, pointer, shape, acl_dtype, strides=None, offset=0, cacheable=True):
        """An ND ``aclTensor`` viewing device memory at ``pointer`` (element strides/offset)."""
        if not self._open:
            self._check_open()
        shape = tuple(shape)
        strides = strides if strides is None else tuple(strides)
        key = (pointer, shape, strides, offset, acl_dtype)
        cache = self._cache if cacheable else None
        if cache is not None:
            handle = cache.get(key)
            if handle is not None:
                return handle
        dims, ndim, element_strides, storage, storage_ndim = _shape_arguments(
            shape, strides, offset)
        handle = self._checked(self._meta.aclCreateTensor(
            dims, ndim, acl_dtype, element_strides, offset, ACL_FORMAT_ND, storage, storage_ndim,
            pointer), "aclCreateTensor")
        if cache is not None:
            cache.put(key, handle)
        else:
            self._tensors.append(handle)
        return handle

    def int_array(self, values):
        if not self._open:
            self._check_open()
        values = [int(v) for v in values]
        array = (c_int64 * max(len(values), 1))(*values)
        handle = self._checked(self._meta.aclCreateIntArray(array, len(values)),
                               "aclCreateIntArray")
        self._int_arrays.append(handle)
        return handle

    def tensor_list(self, tensors):
        """A tensor list that takes ownership of ``tensors``.

        They must come from ``tensor(..., cacheable=False)`` of this scope.
        """
        if not self._open:
            self._check_open()
        array = (TensorRef * len(tensors))(*tensors)
        handle = self._checked(self._meta.aclCreateTensorList(array, len(tensors)),
                               "aclCreateTensorList")
        owned = {id(t) for t in tensors}
        self._tensors = [t for t in self._tensors if id(t) not in owned]
        self._tensor_lists.append(handle)
        return handle
