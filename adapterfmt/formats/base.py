"""The foreign-format protocol and registry.

A format reads a path into an :class:`~adapterfmt.format.Adapter` and writes one back,
recording in a :class:`~adapterfmt.report.ConversionReport` what was exact and what was not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..engine.checkpoint import BaseCheckpoint
from ..errors import UsageError
from ..format import Adapter
from ..report import ConversionReport

_REGISTRY: dict[str, "AdapterFormat"] = {}


@dataclass
class ReadOptions:
    """Options shared by readers. ``base`` fills the base identity (shapes, dtypes, fingerprints)."""

    base: BaseCheckpoint | None = None
    allow_pickle: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class AdapterFormat:
    """Base class of a foreign format: ``detect``, ``read`` and ``write``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Detection order; lower runs first (more specific formats first).
    priority: ClassVar[int] = 50
    #: Methods the writer can store natively; others are converted to LoRA first (if exact).
    writes_methods: ClassVar[tuple[str, ...] | None] = ("lora",)

    def detect(self, path: Path) -> bool:
        return False

    def read(self, path: Path, options: ReadOptions, report: ConversionReport) -> Adapter:
        """The adapter at ``path``; ``convert`` then checks it against ``options.base`` and records
        the base's dtypes and fingerprints, so readers need not."""
        raise UsageError(f"reading {self.name} is not supported", path=path)

    def write(self, adapter: Adapter, path: Path, report: ConversionReport, **options: Any) -> Path:
        raise UsageError(f"writing {self.name} is not supported", path=path)


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Register a format instance under its unique lowercase name."""
    if not re.match(r"^[a-z][a-z0-9_]*$", fmt.name or ""):
        raise ValueError(f"format name {fmt.name!r} must be lowercase snake_case")
    if fmt.name in _REGISTRY and type(_REGISTRY[fmt.name]) is not type(fmt):
        raise ValueError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> AdapterFormat:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def all_formats() -> dict[str, AdapterFormat]:
    return dict(_REGISTRY)


def detect_format(path: Path) -> AdapterFormat:
    """The first registered format (by priority) that recognises ``path``."""
    for fmt in sorted(_REGISTRY.values(), key=lambda f: (f.priority, f.name)):
        if fmt.detect(path):
            return fmt
    raise UsageError(f"cannot tell which adapter format this is (known: {', '.join(sorted(_REGISTRY))})",
                     path=path, hint="pass --from FORMAT")
