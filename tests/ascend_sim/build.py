"""Build the AscendCL test double.

Usage::

    python tests/ascend_sim/build.py OUTDIR [--opapi-name libopapi_transformer.so]

produces ``OUTDIR/lib64/libascendcl.so``, ``libnnopbase.so`` and ``libopapi.so``
(the operators' library name can be changed to exercise the ``libopapi_*.so``
lookup). Point ``ASCEND_HOME_PATH=OUTDIR`` at it and ``ascend`` finds it the
way it finds a real CANN install.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent

# No -ffast-math: the operators rely on inf and NaN (masked rows, poisoned memory).
CFLAGS = ["-std=gnu11", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
          "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]


def build(outdir, opapi_name="libopapi.so", compiler=None):
    """Compile the three libraries into ``outdir/lib64`` and return that path.

    Libraries are rebuilt only when a source is newer than the output, so a
    session fixture can call this cheaply.
    """
    compiler = compiler or os.environ.get("CC") or shutil.which("gcc") or "cc"
    lib_dir = Path(outdir).resolve() / "lib64"
    lib_dir.mkdir(parents=True, exist_ok=True)
    # (output, source, libraries it links against); order matters for -l.
    targets = [
        ("libascendcl.so", "ascendcl.c", ["-lpthread"]),
        ("libnnopbase.so", "nnopbase.c", ["-lascendcl", "-lpthread"]),
        (opapi_name, "opapi.c", ["-lnnopbase", "-lascendcl", "-lm"]),
    ]
    for output, source, libs in targets:
        output_path, source_path = lib_dir / output, SOURCE_DIR / source
        # every source and header of the directory: opapi.c includes opapi_varlen.c
        newest_input = max(path.stat().st_mtime for path in SOURCE_DIR.glob("*.[ch]"))
        if output_path.exists() and output_path.stat().st_mtime >= newest_input:
            continue
        command = [compiler, *CFLAGS, "-o", str(output_path), str(source_path),
                   f"-L{lib_dir}", "-Wl,-rpath,$ORIGIN", *libs]
        subprocess.run(command, check=True)
    return lib_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--opapi-name", default="libopapi.so",
                        help="file name of the operator library (default: libopapi.so)")
    args = parser.parse_args(argv)
    print(build(args.outdir, args.opapi_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
