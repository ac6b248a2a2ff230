"""The peer comparison, ``python benchmarks/compare.py [--quick] [--out DIR]``.

A thin entry point for ``python -m fastattn.bench`` (see there); not an asv module,
so it imports fastattn.bench only when run.
"""
import sys

if __name__ == "__main__":
    from fastattn.bench import main
    sys.exit(main())
