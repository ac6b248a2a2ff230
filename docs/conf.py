"""Sphinx configuration of fastattn's documentation site.

Build (from the repository root, after ``python -m pip install ".[docs]"`` or the
development setup in README.md):

    python -m sphinx -W --keep-going -b html docs build/html

Warnings are errors: a broken cross-reference, a public docstring without an
Examples section, a gallery script that raises, or a public name without an API
page fails the build, and the message names the page or object.
"""
import logging
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))            # gen_api

import fastattn  # noqa: E402
import gen_api  # noqa: E402

project = "fastattn"
author = "the fastattn developers"
copyright = "the fastattn developers"
release = version = fastattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build", "perf/**", "examples/**", "api/README.md",
    "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip",
    "auto_examples/*.md5", "auto_examples/*.codeobj.json",
]
templates_path = ["_templates"]

# A reference to anything that does not exist is an error (with -W).
nitpicky = True
nitpick_ignore_regex = [
    # numpydoc type descriptions: NumPy/Python vocabulary with no page of its own here
    # (intersphinx would need the network)
    ("py:class", r"(numpy\.|np\.|ml_dtypes\.|threadpoolctl\.|matplotlib\.).*"),
    # base classes in private modules (show-inheritance); private names have no page
    ("py:class", r"(fastattn|ascend)(\.\w+)*\._\w+\.\w+"),
    ("py:class", r"array_like|array-like|ndarray|scalar|dtype|dtype-like|path-like"
                 r"|callable|sequence|iterable|mapping|generator|Generator|file-like"
                 r"|optional|default|shape|of|or|and|int64|int32|float32|float64|float16"
                 r"|bfloat16|bool_?|DeviceArray or ndarray|RuntimeError|ctypes\..*"),
]

# --- autodoc / autosummary / numpydoc ------------------------------------------------
# One page per public name is generated into docs/api/ at every build; start from an
# empty folder so that the page of a removed name does not linger.
shutil.rmtree(DOCS / "api", ignore_errors=True)
autosummary_generate = True
autosummary_imported_members = True
add_module_names = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Parameter types stay text: linking them would need intersphinx (the network) for
# NumPy's and Python's own names, and shapes like "(..., L, E)" are not references.
numpydoc_xref_param_type = False
# A public docstring without an Examples section (EX01) or without a docstring
# (GL08) fails the build, naming the object. Members of classes (methods,
# properties) are documented on their class's page and may rely on its examples.
numpydoc_validation_checks = {"EX01", "GL08"}
numpydoc_validation_exclude = {
    r"\.[A-Z]\w*\.\w+$",            # Class.member
    r"\.__init__$",
}

# --- MyST (the guides are Markdown, their examples doctests in fences) ---------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3


# --- sphinx-gallery: every script in docs/examples runs during the build -------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py$",          # run every example, not only plot_*
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": False,         # run them all, then fail naming each
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "write_computation_times": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
}

# --- HTML ------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"fastattn {release}"
html_static_path = ["_static"]
html_css_files = ["fastattn.css"]
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"index": [], "install": [], "changelog": []}
html_context = {"default_mode": "auto"}      # light or dark as the reader's system says
html_show_sourcelink = False
html_copy_source = False


# --- checks that run with the build --------------------------------------------------
def _check_api_pages(app, exception):
    """Every public name must have its generated page (or, for a re-exported dtype,
    its entry on the API page): a new public function without one fails the build."""
    if exception is not None or app.builder.name != "html" or not (DOCS / "api.md").exists():
        return
    modules = gen_api.modules()
    documented = gen_api.documented_pages((DOCS / "api.md").read_text())
    missing = []
    for module in modules:
        names = list(module.__all__) if module.__name__ == "fastattn.reference" \
            else gen_api.own_names(module)
        for name in names:
            page = Path(app.outdir) / "api" / f"{module.__name__}.{name}.html"
            if name not in documented.get(module.__name__, []) or not page.exists():
                missing.append(f"{module.__name__}.{name}")
    if missing:
        from sphinx.errors import SphinxError
        raise SphinxError("public names without an API page (run python docs/gen_api.py): "
                          + ", ".join(missing))


class _GuideGlobFilter(logging.Filter):
    """guides.md lists the guides in reading order, then ``guide/*`` for the ones added
    later: that glob matching nothing new is expected, not a warning. (Sphinx gives
    this warning no type, so ``suppress_warnings`` cannot name it.)"""

    def filter(self, record):
        return not (str(record.msg).startswith("toctree glob pattern")
                    and record.args and record.args[0] == "guide/*")


def setup(app):
    logging.getLogger("sphinx.sphinx.directives.other").addFilter(_GuideGlobFilter())
    app.connect("build-finished", _check_api_pages)
