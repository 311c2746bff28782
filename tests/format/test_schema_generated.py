"""The manifest schema's per-method part is generated from the method descriptors and kept in sync."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schema_equals_generated():
    spec = importlib.util.spec_from_file_location("make_schema", ROOT / "tools" / "make_schema.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.SCHEMA.read_text() == tool.render(), "run: python tools/make_schema.py"


def test_every_method_has_a_schema_rule():
    import json
    from adapterfmt.methods import METHODS
    schema = json.loads((ROOT / "adapterfmt" / "schema" / "manifest.schema.json").read_text())
    ruled = [rule["if"]["properties"]["method"]["const"] for rule in schema["$defs"]["module"]["allOf"]]
    assert ruled == [m.name for m in METHODS]
