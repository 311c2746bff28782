"""adapterfmt: one exact, versioned file format and toolchain for fine-tuning adapters.

The Python API mirrors the CLI::

    import adapterfmt
    report = adapterfmt.convert("peft-adapter", "adapter.safetensors", base="base-model")
    assert adapterfmt.validate("adapter.safetensors", base="base-model").valid
    info = adapterfmt.inspect_adapter("adapter.safetensors")
    adapterfmt.merge("base-model", [("adapter.safetensors", 1.0)], "merged")
    basis = adapterfmt.nola_basis(seed=7, shape=(16, 8, 64))  # NOLA's portable basis
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use, so that `import adapterfmt` (and `adapterfmt --help`) stays fast.
# No name here is also a submodule name: importing a submodule would replace the function.
_API = {
    "convert": "adapterfmt.conversion",
    "validate": "adapterfmt.validation",
    "inspect_adapter": "adapterfmt.inspection",
    "merge": "adapterfmt.engine.merge",
    "unmerge": "adapterfmt.engine.unmerge",
    "extract": "adapterfmt.rank",
    "read_adapter": "adapterfmt.format",
    "write_adapter": "adapterfmt.format",
    "nola_basis": "adapterfmt.nola_generator",
    "run_demo": "adapterfmt.demo",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterfmt' has no attribute {name!r}")
