"""Write docs/api.md, the API reference, from the docstrings of fastattn's public names.

Run after changing a public signature or docstring:  python docs/gen_api.py
(tests/test_docs.py fails while the page is out of date).
"""
import importlib
import inspect
import sys
from pathlib import Path

HEADER = """# API reference

Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.
Guides with worked examples are in `docs/guide/`.

"""


# Optional integrations: documented here, imported by name (they import their libraries,
# torch or transformers, only when used, so rendering needs neither).
INTEGRATIONS = ["fastattn.integrations.transformers"]


def render(module):
    parts = [HEADER, "| name | summary |\n|---|---|\n"]
    names = [n for n in module.__all__ if not inspect.ismodule(getattr(module, n))]
    integrations = [importlib.import_module(name) for name in INTEGRATIONS]
    listed = [(module, n) for n in names] + [
        (m, n) for m in integrations for n in m.__all__ if callable(getattr(m, n))]
    for mod, name in listed:
        doc = inspect.getdoc(getattr(mod, name)) or ""
        summary = doc.splitlines()[0] if doc else ""
        label = name if mod is module else f"{mod.__name__}.{name}"
        parts.append(f"| [`{label}`](#{label.lower().replace('.', '')}) | {summary} |\n")
    for mod, name in listed:
        obj = getattr(mod, name)
        try:
            signature = f"{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            signature = name
        kind = "class" if inspect.isclass(obj) else "function"
        label = name if mod is module else f"{mod.__name__}.{name}"
        parts.append(f"\n## {label}\n\n*{kind}* `{mod.__name__}.{signature}`\n\n")
        parts.append("```text\n" + (inspect.getdoc(obj) or "") + "\n```\n")
    return "".join(parts)


# Modules with optional dependencies, appended to the page after fastattn's own names
# (module, the extra that installs what it needs). A section starts with its marker.
EXTRAS = [("fastattn.dask", "dask")]
MARKER = "<!-- module: {} -->"


def render_extra(module, extra):
    """The section of one optional module, its names qualified (``dask.local_attention``)."""
    short = module.__name__.split(".", 1)[1]
    summary = (inspect.getdoc(module) or "").splitlines()[0]
    parts = [f"\n{MARKER.format(module.__name__)}\n# {module.__name__}\n\n{summary} "
             f"Installed with `pip install \"fastattn[{extra}]\"`.\n\n",
             "| name | summary |\n|---|---|\n"]
    for name in module.__all__:
        doc = inspect.getdoc(getattr(module, name)) or ""
        anchor = f"{short}{name}".lower()
        parts.append(f"| [`{short}.{name}`](#{anchor}) | {doc.splitlines()[0] if doc else ''} |\n")
    for name in module.__all__:
        obj = getattr(module, name)
        parts.append(f"\n## {short}.{name}\n\n*function* `{module.__name__}.{name}"
                     f"{inspect.signature(obj)}`\n\n")
        parts.append("```text\n" + (inspect.getdoc(obj) or "") + "\n```\n")
    return "".join(parts)


def render_page(fastattn):
    """``(page, missing)``: api.md with the optional modules importable here, and the
    names of those that are not (their sections are left out)."""
    text, missing = render(fastattn), []
    for name, extra in EXTRAS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            missing.append(name)
            continue
        text += render_extra(module, extra)
    return text, missing


def without_sections(text, names):
    """``text`` without the sections of the optional modules ``names``."""
    for name in names:
        start = text.find("\n" + MARKER.format(name))
        if start >= 0:
            end = text.find("\n<!-- module: ", start + 1)
            text = text[:start] + (text[end:] if end >= 0 else "")
    return text


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastattn
    text, missing = render_page(fastattn)
    if missing:
        sys.exit(f"install the extras of {missing} to render their sections")
    (Path(__file__).resolve().parent / "api.md").write_text(text)


if __name__ == "__main__":
    main()
