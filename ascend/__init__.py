"""Run fastattn's attention on Huawei Ascend NPUs through AscendCL (ctypes).

Architecture::

    ascend.flash_attention / paged_attention      _ops.py     validate, convert conventions,
    ascend.flash_attention_backward               _grad.py    two-phase aclnn call
    ascend.flash_attention_varlen                 _varlen.py  (windows, ALiBi: _bands.py)
                 |
                 v
    DescriptorScope (aclTensor, aclIntArray,      _meta.py    libnnopbase.so
                     aclTensorList)
    DeviceArray, to_device, zeros                 _array.py   resident data, dtype table
                 |
                 v
    Runtime (init, devices, streams, pool)        _runtime.py libascendcl.so
    Libraries (discovery, ctypes signatures)      _library.py libascendcl / libnnopbase / libopapi*
    AscendError, AscendRuntimeNotFound            _errors.py

Nothing is loaded at import: the CANN libraries are searched for and
initialised on first use, so ``import ascend`` works on any machine and
:func:`is_available` simply returns False without CANN.
"""

from ._array import DeviceArray, to_device, zeros
from ._errors import AscendError, AscendRuntimeNotFound
from ._grad import flash_attention_backward
from ._ops import check_paged_cache, flash_attention, paged_attention
from ._varlen import flash_attention_varlen
from ._runtime import device_count, devices, empty_cache, is_available, parse_device

__all__ = [
    "AscendError",
    "AscendRuntimeNotFound",
    "DeviceArray",
    "check_paged_cache",
    "device_count",
    "devices",
    "empty_cache",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_varlen",
    "is_available",
    "paged_attention",
    "parse_device",
    "to_device",
    "zeros",
]
