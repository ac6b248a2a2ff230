"""Run the docstring examples of every ``ascend`` module against the C test double.

The examples are plain (no ``if ascend.is_available()`` fallbacks), so they fail
when ascend misbehaves. They need the simulator: without a C compiler to build
it they are skipped, with the reason.
"""
import doctest
import gc
import importlib
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import load_ascend_harness

import ascend

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _modules():
    return ["ascend"] + [info.name for info in pkgutil.walk_packages(ascend.__path__, "ascend.")]


MODULE_TESTS = [
    t for name in _modules()
    for t in doctest.DocTestFinder().find(importlib.import_module(name), name, globs={})
    if t.examples
]


@pytest.fixture
def simulated(request, tmp_path_factory):
    """The simulator's runtime, or a skip when the simulator cannot be built (no C compiler)."""
    try:
        harness.build_sim(harness.sim_build_dir(tmp_path_factory))
    except FileNotFoundError as exc:
        pytest.skip(f"no C compiler to build the CANN simulator (tests/ascend_sim): {exc}")
    return request.getfixturevalue("runtime")


@pytest.mark.parametrize("test", MODULE_TESTS, ids=lambda t: t.name)
def test_ascend_docstring_examples(simulated, test):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test)  # clears the example's globals afterwards: what it left open is collected
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {test.name}"
    gc.collect()
    harness.assert_no_leak(simulated)


def test_public_names_have_examples():
    names = {t.name for t in MODULE_TESTS}
    for name in ascend.__all__:
        obj = getattr(ascend, name)
        if callable(obj) and not isinstance(obj, type) or obj is ascend.DeviceArray:
            assert any(n.endswith("." + name) for n in names), f"{name} has no doctest example"


def test_examples_are_skipped_with_a_reason_without_a_compiler(tmp_path):
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PYTHONPATH=str(harness.REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'base'}",
         f"{__file__}::test_ascend_docstring_examples"],
        cwd=harness.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(MODULE_TESTS)} skipped" in result.stdout, result.stdout
    assert "no C compiler to build the CANN simulator" in result.stdout, result.stdout
    assert " passed" not in result.stdout and " failed" not in result.stdout
