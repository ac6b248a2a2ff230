"""The number of examples each property test of tests/test_fuzz.py ran (printed at the
end of the session by tests/conftest.py)."""
from collections import Counter

EXAMPLES = Counter()
