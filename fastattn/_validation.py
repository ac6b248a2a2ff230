"""Input checks shared by the public functions: dtypes, devices, shapes.

Everything here raises before any kernel runs: ``TypeError`` for a wrong kind of
data, ``ValueError`` for wrong shapes or values, with the offending shapes named.
"""
import numpy as np

__all__ = ["result_dtypes", "check_device", "check_choice"]

# dtypes computed natively; float16 is computed in float32 and converted back.
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
CPU_DEVICES = ("cpu",)


def result_dtypes(*arrays, names=None):
    """Return ``(compute_dtype, result_dtype)`` for floating inputs, NumPy-style.

    float32 stays float32, float64 stays float64, mixed float32/float64 gives float64,
    float16 is computed in float32 and returned as float16, and integers promote to
    float64 (the ``np.mean`` rule). bool, complex, object and string data raise
    ``TypeError``.
    """
    names = names or [f"argument {i}" for i in range(len(arrays))]
    for name, a in zip(names, arrays):
        kind = a.dtype.kind
        if kind not in "fiu":
            raise TypeError(
                f"{name} must hold real numbers (float16/32/64 or integers), "
                f"got dtype {a.dtype}")
        if a.dtype == np.longdouble and a.dtype not in _NATIVE:
            raise TypeError(f"{name} has dtype {a.dtype}, which is not supported; "
                            f"convert it to float64")
    result = np.result_type(*arrays, 1.0)
    if result == np.float16:
        return np.dtype(np.float32), result
    if result not in _NATIVE:
        raise TypeError(f"unsupported dtype combination {[str(a.dtype) for a in arrays]}")
    return result, result


def check_device(device, available=CPU_DEVICES):
    """Return the device kind ("cpu" or "npu") or raise ``ValueError`` listing the choices."""
    if isinstance(device, str):
        kind = device.split(":", 1)[0]
        if device in available or (kind == "npu" and "npu" in available):
            return kind
    raise ValueError(f"device must be one of {list(available)}, got {device!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_scale(scale, e):
    """The softmax scale: ``1/sqrt(E)`` by default, else a finite real number."""
    if scale is None:
        return 1.0 / np.sqrt(e)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}") from None
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale
