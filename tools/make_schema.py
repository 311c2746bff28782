"""Regenerate the per-method part of adapterfmt/schema/manifest.schema.json from the method descriptors.

Usage: ``python tools/make_schema.py`` (tests/format/test_schema_generated.py fails when it is stale).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterfmt.methods.schema import build_schema  # noqa: E402

SCHEMA = ROOT / "adapterfmt" / "schema" / "manifest.schema.json"


def render() -> str:
    return json.dumps(build_schema(json.loads(SCHEMA.read_text())), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(render())
    print(f"wrote {SCHEMA}")
