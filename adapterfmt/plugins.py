"""Self-registration: importing a package's submodules lets each register itself."""
from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str, skip: tuple[str, ...] = ("base",)) -> None:
    """Import every public submodule of ``package`` (names not starting with ``_``)."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
