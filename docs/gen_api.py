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


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastattn
    (Path(__file__).resolve().parent / "api.md").write_text(render(fastattn))


if __name__ == "__main__":
    main()
