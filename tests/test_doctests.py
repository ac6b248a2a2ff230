"""Run the docstring examples of the installed package and the guides in docs/."""
import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import fastattn

DOCS = Path(__file__).resolve().parent.parent / "docs"
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
# modules and pages needing an optional dependency: (what needs it, the module it needs)
OPTIONAL = {"fastattn.dask": "dask.array", "guide/dask.md": "dask.array"}


def _available(name):
    needed = OPTIONAL.get(name)
    if needed is None:
        return True
    try:
        importlib.import_module(needed)
    except ImportError:
        return False
    return True


def _public_modules():
    names = ["fastattn"]
    for info in pkgutil.walk_packages(fastattn.__path__, "fastattn."):
        if "._kernels" not in info.name and not info.name.endswith("__main__") \
                and _available(info.name):
            names.append(info.name)
    return names


def _skip_without_extras(text):
    # examples of the optional integrations run where their libraries are installed
    # (CI installs them: the "transformers" extra)
    for library in ("torch", "transformers"):
        if f"import {library}" in text and importlib.util.find_spec(library) is None:
            pytest.skip(f"needs {library}")


def _run(test):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {test.name}"


# Every docstring's examples run in an empty namespace, as in a fresh interpreter:
# they must import what they use (no module globals, no `np` injected).
MODULE_TESTS = [
    t for name in _public_modules()
    for t in doctest.DocTestFinder().find(importlib.import_module(name), name, globs={})
    if t.examples
]


@pytest.mark.parametrize("test", MODULE_TESTS, ids=lambda t: t.name)
def test_docstring_examples(test):
    _skip_without_extras(test.docstring or "")
    _run(test)


def test_docstrings_have_examples():
    # every public function documents itself with at least one runnable example
    names = {t.name for t in MODULE_TESTS}
    for name in fastattn.__all__:
        obj = getattr(fastattn, name)
        # re-exported third-party types (fastattn.bfloat16 is ml_dtypes') document themselves
        if callable(obj) and getattr(obj, "__module__", "").startswith("fastattn"):
            assert any(n.endswith("." + name) for n in names), f"{name} has no doctest example"


# api.md is generated from the docstrings, whose examples run above
DOC_PAGES = sorted(p for p in DOCS.rglob("*.md") if ">>>" in p.read_text() and p.name != "api.md")


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_pages(page):
    if not _available(str(page.relative_to(DOCS))):
        pytest.skip(f"{page.name} needs {OPTIONAL[str(page.relative_to(DOCS))]}")
    text = page.read_text()
    _skip_without_extras(text)
    test = doctest.DocTestParser().get_doctest(text, {}, page.name, str(page), 0)
    _run(test)
