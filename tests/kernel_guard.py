"""What reaches the compiled kernels: a guard that records every array handed to them.

``watch_kernels(monkeypatch)`` wraps every callable of the ``fastattn._kernels``
modules (and the names the Python modules imported from them) so that each call
records the arrays among its arguments, looking into tuples, lists, dicts and the
plain objects the Python side passes (``PreparedMask``). A test then checks a
property of all of them, e.g. that none is misaligned (issue 14, defect 2): the
kernels read their operands through typed pointers, so a misaligned array is
undefined behaviour in C even where x86 tolerates it.
"""
import importlib
import pkgutil
import sys

import numpy as np

import fastattn
import fastattn._kernels


def _arrays(value, seen, depth=0):
    if depth > 4 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays(v, seen, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v, seen, depth + 1)
    elif type(value).__module__.startswith("fastattn") and not callable(value):
        slots = getattr(type(value), "__slots__", ())
        attrs = list(getattr(value, "__dict__", {}).values())
        attrs += [getattr(value, s) for s in slots if hasattr(value, s)]
        for v in attrs:
            yield from _arrays(v, seen, depth + 1)


class KernelCalls:
    """The arrays of every kernel call since the guard was installed."""

    def __init__(self):
        self.calls = []          # (kernel name, [arrays])

    def arrays(self):
        return [(name, a) for name, arrays in self.calls for a in arrays]

    def misaligned(self):
        return [(name, a.dtype, a.shape) for name, a in self.arrays() if not a.flags.aligned]


def _kernel_modules():
    for info in pkgutil.iter_modules(fastattn._kernels.__path__):
        yield importlib.import_module(f"fastattn._kernels.{info.name}")


def _is_kernel_callable(obj):
    module = getattr(obj, "__module__", None) or ""
    return callable(obj) and module.startswith("fastattn._kernels")


def watch_kernels(monkeypatch):
    """Wrap every kernel entry point; returns the :class:`KernelCalls` record."""
    record = KernelCalls()
    wrappers = {}

    def wrap(name, fn):
        if id(fn) not in wrappers:
            def call(*args, **kwargs):
                record.calls.append((name, list(_arrays((args, kwargs), set()))))
                return fn(*args, **kwargs)
            wrappers[id(fn)] = call
        return wrappers[id(fn)]

    for module in _kernel_modules():
        for attr, obj in list(vars(module).items()):
            if not attr.startswith("__") and _is_kernel_callable(obj) and not isinstance(obj, type(sys)):
                if isinstance(obj, type) and not attr.endswith("Plan"):
                    continue
                monkeypatch.setattr(module, attr, wrap(f"{module.__name__}.{attr}", obj))
    # names bound by `from fastattn._kernels.x import Y` in the Python modules
    for modname, module in list(sys.modules.items()):
        if not modname.startswith("fastattn") or modname.startswith("fastattn._kernels"):
            continue
        for attr, obj in list(vars(module).items()):
            if _is_kernel_callable(obj) and (not isinstance(obj, type) or attr.endswith("Plan")):
                monkeypatch.setattr(module, attr, wrap(f"{modname}.{attr}", obj))
    return record
