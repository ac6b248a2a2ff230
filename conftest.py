"""Make the test suite import the installed fastattn, not the uncompiled source tree.

`python -m pytest` puts the working directory first on sys.path, so from the
repository root `import fastattn` would find ./fastattn, whose kernels are only
built by `pip install`. Unless the kernels were built in place (a developer's
`python setup.py build_ext --inplace`), drop the root so the install is used.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _built_in_place():
    return any((ROOT / "fastattn" / "_kernels").glob("dense*.so")) or \
        any((ROOT / "fastattn" / "_kernels").glob("dense*.pyd"))


if not _built_in_place():
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
