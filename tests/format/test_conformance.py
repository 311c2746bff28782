"""The checked-in spec vectors (kept forever: later versions must read them)."""
from pathlib import Path

from adapterfmt.ops.conformance import run

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"


def test_conformance_vectors(capsys):
    assert run(VECTORS) == 0, capsys.readouterr().out
