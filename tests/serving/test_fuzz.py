"""A small schemathesis run over /openapi.json (the full one is serving/fuzz.py): no 5xx, every status and
content type as the spec says, schema-invalid bodies refused."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None,
                                reason="schemathesis is not installed (pip install -e '.[dev]')")


def test_small_fuzz_finds_nothing(server):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "serving"))
    try:
        from fuzz import fuzz
    finally:
        sys.path.pop(0)
    results = fuzz(server[0], examples=4, headers={})
    assert results["cases"] >= 7 * 2 * 2  # every operation, both modes
    assert results["server_errors"] == 0 and results["failures"] == [], results["failures"][:5]
