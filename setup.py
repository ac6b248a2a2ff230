"""Build the Cython kernels in fastattn/_kernels/.

Environment switches:
  FASTATTN_NATIVE=1     compile for this CPU (-march=native); off by default so
                        wheels run anywhere (the SIMD helpers dispatch at run time).
  FASTATTN_NO_THREADS=1 build the thread pool out (kernels run on the calling thread).
  FASTATTN_DEBUG=1      bounds-checked Cython and -O0 -g, for tracking down bugs.
  FASTATTN_KERNELS=a,b  build only these kernel modules (development: rebuild one family);
                        FASTATTN_KERNELS=none builds none: the editable install of the
                        development setup (README), whose kernels are built in place.
  FASTATTN_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer (-O1 -g), for
                        tools/sanitize.sh; the modules then need libasan preloaded.
"""
import os
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = Path("fastattn") / "_kernels"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def thread_flags():
    """Compile and link flags for the kernels' thread pool (threadpool.h: POSIX threads;
    no OpenMP, whose spinning waits misbehave on a shared machine)."""
    if _flag("FASTATTN_NO_THREADS"):
        return ["-DFASTATTN_NO_THREADS"], []
    if sys.platform == "win32":
        return [], []
    return ["-pthread"], ["-pthread"]


def extensions():
    debug = _flag("FASTATTN_DEBUG")
    thr_compile, thr_link = thread_flags()
    # No fast-math flags of any kind: masking relies on -inf and the kernels test for it.
    compile_args = ["-O0", "-g"] if debug else ["-O3"]
    link_args = []
    if sys.platform != "win32":
        compile_args += ["-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]
    if _flag("FASTATTN_NATIVE"):
        compile_args.append("-march=native")
    if _flag("FASTATTN_SANITIZE"):
        # every report is an error (tools/sanitize.sh also sets halt_on_error)
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        compile_args += sanitize + ["-O1", "-g", "-fno-omit-frame-pointer"]
        link_args += sanitize
    only = {n.strip() for n in os.environ.get("FASTATTN_KERNELS", "").split(",") if n.strip()}
    exts = []
    for pyx in sorted(KERNELS.glob("*.pyx")):
        if only and pyx.stem not in only:
            continue
        exts.append(Extension(
            f"fastattn._kernels.{pyx.stem}",
            [str(pyx)],
            include_dirs=[str(KERNELS), numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION")],
            extra_compile_args=compile_args + thr_compile,
            extra_link_args=thr_link + link_args,
        ))
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": False,
        "initializedcheck": debug,
        "nonecheck": False,
        "cdivision": True,
        "embedsignature": True,
    }
    return cythonize(exts, compiler_directives=directives, nthreads=os.cpu_count() or 1)


setup(ext_modules=extensions())
