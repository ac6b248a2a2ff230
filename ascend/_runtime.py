"""The process-wide AscendCL runtime: init, devices, streams and device memory.

One :class:`Runtime` is created on first use (never at import). It owns

* ``aclInit`` (a ``REPEAT_INITIALIZE`` answer means another component of the
  process initialised ACL; we then leave ``aclFinalize`` to it, as torch_npu does),
* one stream per device, made current per thread with ``aclrtSetDevice``,
* every device allocation, through a small pool keyed by (device, rounded
  size) so that repeated calls with the same shapes reuse buffers and
  workspaces instead of calling ``aclrtMalloc``/``aclrtFree`` each time,
* teardown at interpreter exit in the documented order: streams, memory,
  ``aclrtResetDevice`` per device, ``aclFinalize``.
"""

import atexit
import threading
from ctypes import byref, c_uint32, c_void_p

from . import _library
from ._meta import DescriptorCache
from ._owner import Owner

__all__ = ["Buffer", "Runtime", "get_runtime", "is_available", "device_count", "devices",
           "parse_device", "device_index", "empty_cache"]

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_MEMCPY_DEVICE_TO_DEVICE = 3
ACL_ERROR_REPEAT_INITIALIZE = 100002
ACL_ERROR_RT_MEMORY_ALLOCATION = 207001
ACL_ERROR_RT_DEVICE_OOM = 207018

POOL_GRANULE = 512            # bytes; pooled sizes are rounded up to this
POOL_LIMIT_BYTES = 256 << 20  # idle bytes kept per device; the rest is freed at once


class Buffer:
    """One ``aclrtMalloc`` allocation. ``ptr`` is None once freed."""

    __slots__ = ("ptr", "nbytes", "capacity", "device")

    def __init__(self, ptr, nbytes, capacity, device):
        self.ptr, self.nbytes, self.capacity, self.device = ptr, nbytes, capacity, device


class Runtime(Owner):
    """AscendCL state of this process. Use :func:`get_runtime`.

    An :class:`~ascend._owner.Owner` closed by :meth:`finalize` (registered
    with ``atexit``); use after that raises ``RuntimeError``.
    """

    _closed_error = RuntimeError

    def __init__(self, libraries):
        self.lib = libraries
        acl = libraries.acl
        status = acl.aclInit(None)
        self._owns_init = status != ACL_ERROR_REPEAT_INITIALIZE
        if self._owns_init:
            libraries.check(status, "aclInit")
        count = c_uint32()
        status = acl.aclrtGetDeviceCount(byref(count))
        if status and self._owns_init:
            acl.aclFinalize()  # no half-initialised runtime left behind
        libraries.check(status, "aclrtGetDeviceCount")
        self.device_count = count.value
        self._local = threading.local()    # .device: the device current on this thread
        self._lock = threading.Lock()      # guards the dicts below, never a device call
        self._streams = {}                 # device -> stream handle
        self._opened_devices = set()
        self._live = {}                    # id(buffer) -> Buffer, everything not yet freed
        self._idle = {}                    # (device, capacity) -> [Buffer]
        self._idle_bytes = {}              # device -> bytes held in _idle
        self._constants = {}               # (device, key) -> Buffer
        self.descriptors = DescriptorCache(libraries)
        Owner.__init__(self)
        atexit.register(self.finalize)

    def _closed_message(self):
        return "the ascend runtime has been finalised (interpreter exit)"

    # -- devices and streams ------------------------------------------------

    def check_device(self, device):
        if not 0 <= device < self.device_count:
            raise ValueError(f"device npu:{device} does not exist; "
                             f"{self.device_count} NPU(s) visible: {devices()}")

    def activate(self, device):
        """Make ``device`` current on this thread; return its stream."""
        if not self._open:
            self._check_open()
        if getattr(self._local, "device", None) != device:
            self.check_device(device)
            self.lib.check(self.lib.acl.aclrtSetDevice(device), "aclrtSetDevice")
            self._local.device = device
            with self._lock:
                self._opened_devices.add(device)
        stream = self._streams.get(device)
        if stream is None:
            handle = c_void_p()
            self.lib.check(self.lib.acl.aclrtCreateStream(byref(handle)), "aclrtCreateStream")
            with self._lock:
                stream = self._streams.setdefault(device, handle.value)
            if stream != handle.value:  # another thread won the race
                self.lib.acl.aclrtDestroyStream(handle.value)
        return stream

    # -- memory -------------------------------------------------------------

    def take_idle(self, device, nbytes):
        """A pooled :class:`Buffer` of at least ``nbytes`` on ``device``, or None if the pool
        has none of that size (no device call: this cannot fail)."""
        capacity = -(-max(int(nbytes), 1) // POOL_GRANULE) * POOL_GRANULE
        with self._lock:
            idle = self._idle.get((device, capacity))
            if not idle:
                return None
            buffer = idle.pop()
            self._idle_bytes[device] -= capacity
        buffer.nbytes = nbytes
        return buffer

    def allocate(self, device, nbytes):
        """A :class:`Buffer` of at least ``nbytes`` on ``device``, from the pool if possible."""
        buffer = self.take_idle(device, nbytes)
        if buffer is not None:
            return buffer
        capacity = -(-max(int(nbytes), 1) // POOL_GRANULE) * POOL_GRANULE
        self.activate(device)
        pointer = c_void_p()
        status = self.lib.acl.aclrtMalloc(byref(pointer), capacity, ACL_MEM_MALLOC_HUGE_FIRST)
        if status in (ACL_ERROR_RT_MEMORY_ALLOCATION, ACL_ERROR_RT_DEVICE_OOM) \
                and self._idle_bytes.get(device):
            try:  # out of memory: give back idle buffers, try once more
                # (memory only: descriptors of the call in progress may be cached ones)
                self.empty_cache(device, descriptors=False)
            except Exception:  # what could not be freed stays pooled; the retry decides
                pass
            status = self.lib.acl.aclrtMalloc(byref(pointer), capacity, ACL_MEM_MALLOC_HUGE_FIRST)
        self.lib.check(status, "aclrtMalloc")
        buffer = Buffer(pointer.value, nbytes, capacity, device)
        with self._lock:
            self._live[id(buffer)] = buffer
        return buffer

    def release(self, buffer):
        """Return ``buffer`` to the pool (or free it if the pool is full)."""
        if buffer.ptr is None or not self._open:
            return
        with self._lock:
            held = self._idle_bytes.get(buffer.device, 0)
            if held + buffer.capacity <= POOL_LIMIT_BYTES:
                self._idle.setdefault((buffer.device, buffer.capacity), []).append(buffer)
                self._idle_bytes[buffer.device] = held + buffer.capacity
                return
        try:
            self._free(buffer)
        except Exception:
            self._keep_idle(buffer)  # still owned by the pool: empty_cache tries again
            raise

    def _free(self, buffer):
        """``aclrtFree`` the buffer. The buffer counts as freed only once that succeeded:
        if it fails, ``buffer`` stays live (and the caller decides where it goes)."""
        with self._lock:
            pointer = buffer.ptr
            if pointer is None:
                return
        self.activate(buffer.device)
        self.lib.check(self.lib.acl.aclrtFree(pointer), "aclrtFree")
        with self._lock:
            buffer.ptr = None
            self._live.pop(id(buffer), None)

    def empty_cache(self, device=None, descriptors=True):
        """Free idle pooled buffers and cached constants (all devices if None).

        Cached tensor descriptors are destroyed too (host objects), unless
        ``descriptors`` is False (a call in progress may be using them). Every
        buffer is tried; buffers whose ``aclrtFree`` failed go back to the pool (a
        later call tries them again, and the runtime's teardown at exit), and the
        first failure is raised once all were tried.
        """
        if descriptors:
            self.descriptors.clear()
        with self._lock:
            keys = [k for k in self._idle if device is None or k[0] == device]
            idle = [b for k in keys for b in self._idle.pop(k)]
            for d in list(self._idle_bytes):
                if device is None or d == device:
                    self._idle_bytes[d] = 0
            constant_keys = [k for k in self._constants if device is None or k[0] == device]
            idle += [self._constants.pop(k) for k in constant_keys]
        failure = None
        for buffer in idle:
            try:
                self._free(buffer)
            except Exception as exc:  # AscendError, or the runtime was finalised meanwhile
                self._keep_idle(buffer)
                failure = failure or exc
        if failure is not None:
            raise failure

    def _keep_idle(self, buffer):
        """Put a buffer that could not be freed back into the pool (over its limit if need be)."""
        with self._lock:
            if buffer.ptr is None:
                return
            self._idle.setdefault((buffer.device, buffer.capacity), []).append(buffer)
            self._idle_bytes[buffer.device] = self._idle_bytes.get(buffer.device, 0) + \
                buffer.capacity

    def constant(self, device, key, make_host_array):
        """A device copy of ``make_host_array()``, uploaded once per device and kept."""
        buffer = self._constants.get((device, key))
        if buffer is None:
            host = make_host_array()
            buffer = self.allocate(device, host.nbytes)
            try:
                self.upload(buffer, host)
            except BaseException:  # a failed upload must not strand the buffer
                self.release(buffer)
                raise
            with self._lock:
                kept = self._constants.setdefault((device, key), buffer)
            if kept is not buffer:
                self.release(buffer)
                buffer = kept
        return buffer

    def upload(self, buffer, host):
        """Copy the C-contiguous NumPy array ``host`` into ``buffer``."""
        self.activate(buffer.device)
        self.lib.check(self.lib.acl.aclrtMemcpy(
            buffer.ptr, buffer.capacity, host.__array_interface__["data"][0], host.nbytes,
            ACL_MEMCPY_HOST_TO_DEVICE), "aclrtMemcpy")

    def download(self, buffer, host, offset_bytes=0):
        """Copy ``host.nbytes`` bytes from ``buffer`` (at ``offset_bytes``) into ``host``."""
        self.activate(buffer.device)
        self.lib.check(self.lib.acl.aclrtMemcpy(
            host.__array_interface__["data"][0], host.nbytes, buffer.ptr + offset_bytes,
            host.nbytes, ACL_MEMCPY_DEVICE_TO_HOST), "aclrtMemcpy")

    def write(self, buffer, offset_bytes, host):
        """Copy the contiguous ``host`` array to ``buffer`` at ``offset_bytes``."""
        self.activate(buffer.device)
        self.lib.check(self.lib.acl.aclrtMemcpy(
            buffer.ptr + offset_bytes, buffer.capacity - offset_bytes,
            host.__array_interface__["data"][0], host.nbytes, ACL_MEMCPY_HOST_TO_DEVICE),
            "aclrtMemcpy")

    def write_rows(self, buffer, offset_bytes, pitch, host, rows, width):
        """Copy ``rows`` rows of ``width`` bytes from the contiguous ``host`` array into
        ``buffer`` at ``offset_bytes``, ``pitch`` bytes apart: one ``aclrtMemcpy2d``."""
        self.activate(buffer.device)
        self.lib.check(self.lib.acl.aclrtMemcpy2d(
            buffer.ptr + offset_bytes, pitch, host.__array_interface__["data"][0], width,
            width, rows, ACL_MEMCPY_HOST_TO_DEVICE), "aclrtMemcpy2d")

    def copy(self, destination, destination_offset, source, source_offset, nbytes):
        """Copy ``nbytes`` between two buffers of one device (device to device)."""
        self.activate(destination.device)
        self.lib.check(self.lib.acl.aclrtMemcpy(
            destination.ptr + destination_offset, destination.capacity - destination_offset,
            source.ptr + source_offset, nbytes, ACL_MEMCPY_DEVICE_TO_DEVICE), "aclrtMemcpy")

    def memset(self, buffer, value=0):
        """Set the first ``buffer.nbytes`` bytes of ``buffer`` to the byte ``value``."""
        self.activate(buffer.device)
        self.lib.check(self.lib.acl.aclrtMemset(buffer.ptr, buffer.capacity, value,
                                                buffer.nbytes), "aclrtMemset")

    # -- teardown -------------------------------------------------------------

    def finalize(self):
        """Alias of :meth:`close`: release everything in the documented order;
        idempotent, quiet at exit."""
        self.close()

    def _release(self):
        acl = self.lib.acl
        with self._lock:
            streams, self._streams = dict(self._streams), {}
            buffers, self._live = list(self._live.values()), {}
            self._idle, self._idle_bytes, self._constants = {}, {}, {}
            opened = sorted(self._opened_devices)
        self.descriptors.clear()
        for device, stream in streams.items():
            acl.aclrtSetDevice(device)
            acl.aclrtSynchronizeStream(stream)
            acl.aclrtDestroyStream(stream)
        for buffer in buffers:  # DeviceArrays still alive become "freed"
            acl.aclrtSetDevice(buffer.device)
            pointer, buffer.ptr = buffer.ptr, None
            if pointer is not None:
                acl.aclrtFree(pointer)
        for device in opened:
            acl.aclrtResetDevice(device)
        if self._owns_init:
            acl.aclFinalize()
        self._local = threading.local()


_runtime = None
_runtime_lock = threading.Lock()


def get_runtime():
    """The process-wide :class:`Runtime`, loading CANN on first call.

    Raises
    ------
    ascend.AscendRuntimeNotFound
        If the libraries cannot be found or loaded (not cached: a later call
        searches again).
    ascend.AscendError
        If ``aclInit`` or ``aclrtGetDeviceCount`` fails.
    """
    global _runtime
    runtime = _runtime
    if runtime is not None and not runtime.closed:
        return runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(_library.load())
        elif _runtime.closed:
            raise RuntimeError("the ascend runtime has been finalised (interpreter exit)")
        return _runtime


def device_count():
    """Number of visible NPUs; 0 if CANN is missing or fails to initialise.

    Examples
    --------
    >>> import ascend
    >>> ascend.device_count()
    2
    """
    try:
        return get_runtime().device_count
    except RuntimeError:  # AscendRuntimeNotFound, AscendError from init, or finalised
        return 0


def is_available():
    """True if CANN is installed and at least one NPU is visible.

    Examples
    --------
    >>> import ascend
    >>> ascend.is_available()       # the test double of CANN shows two NPUs
    True
    """
    return device_count() > 0


def devices():
    """Usable devices as strings, e.g. ``['npu:0', 'npu:1']`` (empty without CANN).

    Examples
    --------
    >>> import ascend
    >>> ascend.devices()
    ['npu:0', 'npu:1']
    """
    return [f"npu:{i}" for i in range(device_count())]


def parse_device(device):
    """Device index of a device string.

    Parameters
    ----------
    device : str
        ``"npu"`` (device 0) or ``"npu:N"``.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If ``device`` is not of that form or N is not a visible device.
    AscendRuntimeNotFound
        If CANN cannot be found.

    Examples
    --------
    >>> import ascend
    >>> ascend.parse_device("npu:1")
    1
    >>> ascend.parse_device("npu:7")
    Traceback (most recent call last):
        ...
    ValueError: device npu:7 does not exist; 2 NPU(s) visible: ['npu:0', 'npu:1']
    >>> ascend.parse_device("cuda:0")
    Traceback (most recent call last):
        ...
    ValueError: device must be 'npu' or 'npu:N', got 'cuda:0'
    """
    index = _parse_device_string(device)
    get_runtime().check_device(index)
    return index


def _parse_device_string(device):
    if isinstance(device, str):
        if device == "npu":
            return 0
        prefix, _, number = device.partition(":")
        if prefix == "npu" and number.isdigit():
            return int(number)
    raise ValueError(f"device must be 'npu' or 'npu:N', got {device!r}")


def device_index(device):
    """Validated device index from an int or a device string (internal entry point)."""
    if isinstance(device, (int,)) and not isinstance(device, bool):
        index = int(device)
    else:
        index = _parse_device_string(device)
    get_runtime().check_device(index)
    return index


def empty_cache():
    """Free device memory held by the pool (idle buffers, workspaces, cached masks).

    Memory of live :class:`~ascend.DeviceArray` objects is not touched.
    Does nothing if the runtime was never started.

    Examples
    --------
    >>> import numpy as np, ascend
    >>> ascend.to_device(np.ones(4, np.float32)).close()   # the memory goes to the pool
    >>> ascend.empty_cache()                                # and from there to the device
    """
    if _runtime is not None and not _runtime.closed:
        _runtime.empty_cache()
