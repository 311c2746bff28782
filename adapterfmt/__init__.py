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
    "convert": "adapterfmt.ops.convert",
    "validate": "adapterfmt.ops.validate",
    "inspect_adapter": "adapterfmt.ops.inspection",
    "check_adapter": "adapterfmt.ops.check",
    "merge": "adapterfmt.ops.merge",
    "unmerge": "adapterfmt.ops.merge",
    "extract": "adapterfmt.ops.extract",
    "read_adapter": "adapterfmt.ops.load",
    "write_adapter": "adapterfmt.methods",
    "nola_basis": "adapterfmt.methods.nola",
    "run_demo": "adapterfmt.ops.demo",
}

__all__ = ["__version__", *_API]


#: API name -> the attribute's name in its module, where the two differ.
_RENAMED = {"read_adapter": "load_adapter", "write_adapter": "write_checked_adapter"}


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterfmt' has no attribute {name!r}")
