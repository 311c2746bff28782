"""The schema's per-method part and the spec's method table are generated from the descriptors, in sync."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schema_equals_generated():
    tool = _tool()
    assert tool.SCHEMA.read_text() == tool.render(), "run: python tools/make_derived.py"


def test_spec_method_table_equals_generated():
    tool = _tool()
    assert tool.SPEC.read_text() == tool.render_spec(), "run: python tools/make_derived.py"


def _tool():
    spec = importlib.util.spec_from_file_location("make_derived", ROOT / "tools" / "make_derived.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_every_method_has_a_schema_rule():
    import json
    from adapterfmt.methods import METHODS
    schema = json.loads((ROOT / "adapterfmt" / "schema" / "manifest.schema.json").read_text())
    ruled = [rule["if"]["properties"]["method"]["const"] for rule in schema["$defs"]["module"]["allOf"]]
    assert ruled == [m.name for m in METHODS]
