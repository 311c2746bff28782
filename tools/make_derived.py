"""Regenerate what is derived from the method descriptors: the per-method part of
adapterfmt/schema/manifest.schema.json and the method table of spec/README.md (§6).

Usage: ``python tools/make_derived.py`` (tests/format/test_schema_generated.py fails when either is stale).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterfmt.methods.schema import build_schema, spec_method_table  # noqa: E402

SCHEMA = ROOT / "adapterfmt" / "schema" / "manifest.schema.json"
SPEC = ROOT / "spec" / "README.md"
BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def render() -> str:
    return json.dumps(build_schema(json.loads(SCHEMA.read_text())), indent=2, ensure_ascii=False) + "\n"


def render_spec() -> str:
    text = SPEC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{spec_method_table()}\n{END}{tail}"


if __name__ == "__main__":
    SCHEMA.write_text(render())
    SPEC.write_text(render_spec())
    print(f"wrote {SCHEMA} and the method table of {SPEC}")
