"""Write docs/api.md, the API reference, from the docstrings of fastattn's public names.

Run after changing a public signature or docstring:  python docs/gen_api.py
(tests/test_docs.py fails while the page is out of date).
"""
import inspect
import sys
from pathlib import Path

HEADER = """# API reference

Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.
Guides with worked examples are in `docs/guide/`.

"""


def render(module):
    parts = [HEADER, "| name | summary |\n|---|---|\n"]
    names = [n for n in module.__all__ if not inspect.ismodule(getattr(module, n))]
    for name in names:
        doc = inspect.getdoc(getattr(module, name)) or ""
        summary = doc.splitlines()[0] if doc else ""
        parts.append(f"| [`{name}`](#{name.lower()}) | {summary} |\n")
    for name in names:
        obj = getattr(module, name)
        try:
            signature = f"{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            signature = name
        kind = "class" if inspect.isclass(obj) else "function"
        parts.append(f"\n## {name}\n\n*{kind}* `{module.__name__}.{signature}`\n\n")
        parts.append("```text\n" + (inspect.getdoc(obj) or "") + "\n```\n")
    return "".join(parts)


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastattn
    (Path(__file__).resolve().parent / "api.md").write_text(render(fastattn))


if __name__ == "__main__":
    main()
