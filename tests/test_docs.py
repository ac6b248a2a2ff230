"""The API reference page is generated from the docstrings and must be current."""
import importlib.util
from pathlib import Path

import fastattn

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_api_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    expected, missing = gen_api.render_page(fastattn)
    # sections of optional modules whose dependencies are not installed here are skipped
    page = gen_api.without_sections((DOCS / "api.md").read_text(), missing)
    assert page == expected, "run: python docs/gen_api.py"
