"""The documentation: the API page is current and lists every public name, every
documented docstring has an example, guide examples sit in code fences, the README's
example runs, and a docs build fails, naming the page, on a broken cross-reference,
a docstring without an example, or a gallery script that raises."""
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ascend
import fastattn
import fastattn.bench

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    return gen_api


gen_api = _gen_api()


def test_api_reference_is_current():
    pytest.importorskip("dask", reason="the API page documents fastattn.dask (docs extra)")
    expected = gen_api.render(*gen_api.modules())
    assert (DOCS / "api.md").read_text() == expected, "run: python docs/gen_api.py"


def _optional_modules():
    """The optional modules importable here (the docs extra installs them all)."""
    found = []
    for name, *_ in gen_api.OPTIONAL:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            pass
    return found


def _public_objects():
    """(qualified name, object) of every public function and class the site documents."""
    for module in (fastattn, fastattn.bench, ascend, *_optional_modules()):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not getattr(obj, "__module__", "").startswith(
                    module.__name__.split(".")[0]):
                continue
            yield f"{module.__name__}.{name}", obj
    for name in fastattn.reference.__all__:
        yield f"fastattn.reference.{name}", getattr(fastattn.reference, name)


def test_every_public_name_has_an_api_page():
    # Compared with the names themselves, not with gen_api's selection of them: a
    # public name added to fastattn.__all__ (or ascend's, or fastattn.reference's)
    # without an entry on docs/api.md fails here, before any docs build.
    documented = gen_api.documented_pages((DOCS / "api.md").read_text())
    missing = []
    for module in (fastattn, fastattn.bench, ascend, *_optional_modules()):
        for name in module.__all__:
            obj = getattr(module, name)
            if obj is fastattn.reference:
                missing += [f"fastattn.reference.{n}" for n in fastattn.reference.__all__
                            if n not in documented.get("fastattn.reference", [])]
            elif inspect.ismodule(obj):
                missing.append(f"{module.__name__}.{name} (a module)")
            elif getattr(obj, "__module__", "").split(".")[0] == module.__name__.split(".")[0]:
                if name not in documented.get(module.__name__, []):
                    missing.append(f"{module.__name__}.{name}")
            elif (f".. data:: {name}" not in (DOCS / "api.md").read_text()
                  and f".. data:: {module.__name__}.{name}" not in (DOCS / "api.md").read_text()):
                missing.append(f"{module.__name__}.{name} (re-exported)")
    assert missing == [], f"no API page for {missing}: run python docs/gen_api.py"


@pytest.mark.parametrize("name, obj", list(_public_objects()), ids=lambda x: str(x)[:60])
def test_documented_docstrings_have_examples(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert re.search(r"^Examples\n-{8}", doc, re.M), f"{name}: no Examples section"
    assert ">>>" in doc, f"{name}: an Examples section without an example"


def test_guide_examples_are_in_code_fences():
    # A `>>>` line outside a fence renders as a nested quote with the code run together.
    problems = []
    for page in sorted(DOCS.rglob("*.md")):
        fence = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = not fence
            elif line.startswith(">>>") and not fence:
                problems.append(f"{page.relative_to(ROOT)}:{number}")
    assert problems == [], f">>> outside a code fence: {problems}"


def test_guides_do_not_load_files_from_the_repository():
    # Guide examples run from an installed package, where docs/ does not exist.
    for page in sorted((DOCS / "guide").glob("*.md")):
        examples = "\n".join(line for line in page.read_text().splitlines()
                             if line.startswith((">>>", "...")))
        assert "__file__" not in examples and "runpy" not in examples, page.name


def test_readme_quick_example_runs():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quick-example-start -->")[1].split("<!-- quick-example-end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (1, 8, 2048, 64)


def test_scope_statement_is_in_the_readme_and_on_the_landing_page():
    readme = (ROOT / "README.md").read_text()
    scope = readme.split("<!-- scope-start -->")[1].split("<!-- scope-end -->")[0]
    assert "What fastattn is not" in scope and len(scope.split()) > 5
    assert "<!-- scope-start -->" in (DOCS / "index.md").read_text()       # included from README


# --- a docs build fails on bad input, naming what is wrong -------------------------------

BAD_PAGE = """# Bad page

A link to {func}`fastattn.no_such_function`.

```{eval-rst}
.. currentmodule:: undocumented_module

.. autosummary::
   :toctree: generated/

   function_without_example
```
"""

BAD_MODULE = '''"""A module whose function has no Examples section."""


def function_without_example(x):
    """Return x.

    Parameters
    ----------
    x : int

    Returns
    -------
    int
    """
    return x
'''


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    """Build a small site with the real conf.py: a page with a broken cross-reference,
    a documented function without an example, and a gallery script that raises."""
    for module in ("sphinx", "numpydoc", "myst_parser", "sphinx_gallery",
                   "pydata_sphinx_theme", "matplotlib"):
        pytest.importorskip(module)
    src = tmp_path_factory.mktemp("docs")
    for name in ("conf.py", "gen_api.py"):
        shutil.copy(DOCS / name, src / name)
    for folder in ("_static", "_templates"):
        shutil.copytree(DOCS / folder, src / folder)
    (src / "index.md").write_text("# Test site\n\n```{toctree}\nbad\nauto_examples/index\n```\n")
    (src / "bad.md").write_text(BAD_PAGE)
    (src / "undocumented_module.py").write_text(BAD_MODULE)
    examples = src / "examples"
    examples.mkdir()
    (examples / "GALLERY_HEADER.rst").write_text("Gallery\n=======\n")
    (examples / "plot_raises.py").write_text(
        '"""\nA failing example\n=================\n"""\nraise ValueError("this example fails")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         str(src), str(src / "_build")], capture_output=True, text=True, env=env, timeout=600)
    return result


def test_docs_build_fails_on_a_broken_cross_reference(bad_build):
    assert bad_build.returncode != 0
    assert re.search(r"bad\.md:\d+: (WARNING|ERROR): py:func reference target not found: "
                     r"fastattn\.no_such_function", bad_build.stderr), bad_build.stderr


def test_docs_build_fails_on_a_docstring_without_an_example(bad_build):
    assert bad_build.returncode != 0
    assert "undocumented_module.function_without_example" in bad_build.stderr
    assert "EX01" in bad_build.stderr, bad_build.stderr


def test_docs_build_fails_on_a_gallery_script_that_raises(bad_build):
    assert bad_build.returncode != 0
    assert "plot_raises.py" in bad_build.stderr and "ValueError: this example fails" in \
        bad_build.stderr, bad_build.stderr
