"""fastattn.show_config(): how the kernels were built and what they use on this machine."""
import os
import platform
import sys
from importlib import metadata

__all__ = ["show_config"]

_VECTOR_LEVELS = {2: "AVX-512 (64-byte vectors)", 1: "AVX2 + FMA (32-byte vectors)",
                  0: "baseline (16-byte vectors)"}


def _version(distribution):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _blas_libraries():
    """NumPy's BLAS and SciPy's (which the kernels call), from threadpoolctl."""
    import scipy.linalg.cython_blas  # noqa: F401  (the kernels' BLAS: make sure it is loaded)
    from threadpoolctl import threadpool_info
    found = {}
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        # by the folder the library was loaded from (both wheels ship "scipy_openblas")
        folder = os.path.basename(os.path.dirname(info.get("filepath") or ""))
        owner = next((name for name in ("scipy", "numpy") if folder.startswith(name)), "other")
        found.setdefault(owner, []).append({
            key: info.get(key) for key in ("internal_api", "version", "threading_layer",
                                           "architecture", "num_threads", "filepath")})
    return found


def _config():
    import fastattn
    from fastattn import _threads
    from fastattn._kernels import buildinfo

    build = buildinfo.build_info()
    fallback_env = os.environ.get("FASTATTN_HALF_FALLBACK", "").strip()
    forced_fallback = bool(fallback_env) and fallback_env != "0"
    if build["bf16_dot"]:
        bf16 = "AVX512_BF16 (vdpbf16ps on bfloat16 pairs)"
    elif build["half_avx512_f16c"] and forced_fallback:
        bf16 = "widened to float32 (FASTATTN_HALF_FALLBACK is set)"
    else:
        bf16 = "widened to float32 (this CPU has no AVX512_BF16)"
    omp = os.environ.get("OMP_NUM_THREADS")
    blas = _blas_libraries()
    return {
        "fastattn": {"version": fastattn.__version__,
                     "path": os.path.dirname(os.path.abspath(fastattn.__file__)),
                     "kernels": os.path.dirname(os.path.abspath(buildinfo.__file__))},
        "build": {
            "compiler": build["compiler"],
            "optimized": build["optimized"],
            "baseline ISA": build["baseline_isa"],
            "run-time dispatch": ("one version of the vector code per ISA, the best "
                                  "chosen on first use" if build["runtime_dispatch"]
                                  else "none: the build's own ISA only"),
        },
        "threading": {
            "backend": ("fastattn's own thread pool (POSIX threads, threadpool.h; "
                        "not OpenMP)" if build["thread_pool"]
                        else "none: built with FASTATTN_NO_THREADS=1 (calling thread only)"),
            "default threads": fastattn.get_num_threads(),
            "usable CPUs": _threads._CPUS,
            "OMP_NUM_THREADS": omp if omp is not None else "unset",
            "pool workers started": _threads.pool_workers(),
        },
        "SIMD on this CPU": {
            "CPU": _cpu_model(),
            "vector rows (exp, max, sum)": _VECTOR_LEVELS[build["vector_level"]],
            "float32 tile products": ("AVX-512 micro-kernels (value width a multiple of "
                                      "16; BLAS otherwise)" if build["tile_kernels"]
                                      else "BLAS"),
            "float16/bfloat16 reading": ("AVX-512 with F16C" if build["half_avx512_f16c"]
                                         else "scalar conversion"),
            "bfloat16 products": bf16,
        },
        "BLAS": {
            "kernels (SciPy's; 1 thread while they run)": blas.get("scipy", []),
            "NumPy's": blas.get("numpy", []),
            **({"other": blas["other"]} if "other" in blas else {}),
        },
        "dependencies": {
            "python": f"{platform.python_version()} ({sys.executable})",
            **{name: _version(name) for name in ("numpy", "scipy", "ml_dtypes",
                                                 "threadpoolctl")},
        },
        "devices": fastattn.devices(),
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _format_blas(libraries):
    if not libraries:
        return "not found"
    return "; ".join(f"{lib['internal_api']} {lib['version']} ({lib['threading_layer']} "
                     f"threading, {lib['num_threads']} threads, {lib['architecture']})"
                     for lib in libraries)


def show_config(mode="stdout"):
    """Print how fastattn's kernels were built and what they use on this machine.

    Like ``numpy.show_config()``: the compiler that built the kernels, their thread
    pool and default thread count, the SIMD code chosen at run time on this CPU
    (AVX-512 vector rows and tile micro-kernels, F16C half-precision reading,
    AVX512_BF16 products), the BLAS libraries (through threadpoolctl), the versions
    of the dependencies and the devices. Include its output in bug reports.

    Parameters
    ----------
    mode : {"stdout", "dicts"}, default="stdout"
        Print the report, or return it as nested dicts.

    Returns
    -------
    dict or None
        The report when ``mode="dicts"``.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.show_config()                      # doctest: +ELLIPSIS
    fastattn ...
    Build:
      compiler: ...
    Threading:
      backend: ...
    ...
    >>> config = fastattn.show_config(mode="dicts")
    >>> config["threading"]["default threads"] == fastattn.get_num_threads()
    True
    """
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    config = _config()
    if mode == "dicts":
        return config
    lines = [f"fastattn {config['fastattn']['version']} ({config['fastattn']['path']}; "
             f"kernels in {config['fastattn']['kernels']})"]
    for section in ("build", "threading", "SIMD on this CPU"):
        lines.append(section[0].upper() + section[1:] + ":")
        for key, value in config[section].items():
            if isinstance(value, bool):
                value = "yes" if value else "no (FASTATTN_DEBUG=1 build)"
            lines.append(f"  {key}: {value}")
    lines.append("BLAS:")
    for key, libraries in config["BLAS"].items():
        lines.append(f"  {key}: {_format_blas(libraries)}")
    lines.append("Dependencies:")
    lines += [f"  {key}: {value or 'not installed'}"
              for key, value in config["dependencies"].items()]
    lines.append(f"Devices: {', '.join(config['devices'])}")
    print("\n".join(lines))
    return None
