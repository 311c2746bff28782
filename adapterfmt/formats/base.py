"""The foreign-format protocol: ``detect``, ``read`` and ``write``, with typed per-format options.

A format reads a path into an :class:`~adapterfmt.format.Adapter` and writes one back, recording
in a :class:`~adapterfmt.conversion_report.ConversionReport` what was exact and what was not.
Its options are pydantic models; the CLI generates its flags from them (one place per option).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from ..checkpoint import BaseCheckpoint
from ..conversion_report import ConversionReport
from ..errors import UsageError
from ..format import Adapter


class FormatOptions(BaseModel):
    """Base of a format's read or write options. Field descriptions are the CLI help texts."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ReadOptions:
    """What every reader gets: the base (identity, shapes, fingerprints), the pickle policy, and
    its own typed options."""

    base: BaseCheckpoint | None = None
    allow_pickle: bool = False
    format: FormatOptions = field(default_factory=FormatOptions)


@dataclass
class WriteOptions:
    """What every writer gets: the base (if given), whether to replace the output, whether to refuse
    anything not exact (``--strict``: inexact scale folds too), and its own options."""

    base: BaseCheckpoint | None = None
    overwrite: bool = False
    strict: bool = False
    format: FormatOptions = field(default_factory=FormatOptions)


class AdapterFormat:
    """Base class of a foreign format."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Detection order; lower runs first (more specific formats first).
    priority: ClassVar[int] = 50
    #: Output suffixes that mean this format when ``--to`` is not given (``.gguf``).
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: Methods the writer can store natively (None: every method); others are converted to LoRA first.
    writes_methods: ClassVar[tuple[str, ...] | None] = ("lora",)
    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = True
    read_options: ClassVar[type[FormatOptions]] = FormatOptions
    write_options: ClassVar[type[FormatOptions]] = FormatOptions

    def detect(self, path: Path) -> bool:
        return False

    def read(self, path: Path, options: ReadOptions, report: ConversionReport) -> Adapter:
        """The adapter at ``path``; ``convert`` then checks it against ``options.base`` and records
        the base's dtypes and fingerprints, so readers need not."""
        raise UsageError(f"reading {self.name} is not supported", path=path)

    def write(self, adapter: Adapter, path: Path, report: ConversionReport, options: WriteOptions) -> Path:
        raise UsageError(f"writing {self.name} is not supported", path=path)
