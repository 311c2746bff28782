"""The foreign formats this version reads and writes: an explicit list (nothing registers itself)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ._files import safetensors_keys
from .base import AdapterFormat
from .bfl_flux import BflFluxFormat
from .comfyui import ComfyUiFormat
from .diffusers_lora import DiffusersLoraFormat
from .gguf_lora import GgufLoraFormat
from .kohya import KohyaFormat
from .lycoris import LycorisFormat
from .mlx import MlxFormat
from .native import NativeFormat
from .nola_official import NolaOfficialFormat
from .peft import PeftFormat
from .sorsa_official import SorsaOfficialFormat

FORMATS: tuple[AdapterFormat, ...] = (NativeFormat(), PeftFormat(), GgufLoraFormat(), KohyaFormat(), LycorisFormat(),
                                      MlxFormat(), NolaOfficialFormat(), SorsaOfficialFormat(), DiffusersLoraFormat(),
                                      BflFluxFormat(), ComfyUiFormat())
FORMAT_BY_NAME: dict[str, AdapterFormat] = {f.name: f for f in FORMATS}
assert len(FORMAT_BY_NAME) == len(FORMATS), "two formats share a name"


def get_format(name: str, *, writing: bool = False) -> AdapterFormat:
    """The format called ``name`` (case-insensitive); a clear error when unknown or read-only.

    Example:
        >>> get_format("GGUF").name
        'gguf'
    """
    fmt = FORMAT_BY_NAME.get(name.lower())
    usable = [f.name for f in FORMATS if f.can_write or not writing]
    if fmt is None or (writing and not fmt.can_write):
        what = "is read-only" if fmt is not None else "is not a known format"
        raise UsageError(f"{name!r} {what}", hint=f"{'--to' if writing else '--from'} takes one of: "
                                                   f"{', '.join(usable)}")
    return fmt


def format_for_output(path: Path) -> AdapterFormat | None:
    """The writable format an output path's suffix names (``a.gguf`` -> gguf), or None.

    Example:
        >>> format_for_output(Path("adapter.gguf")).name
        'gguf'
    """
    suffix = path.suffix.lower()
    return next((f for f in FORMATS if f.can_write and suffix in f.suffixes), None)


def detect_format(path: Path) -> AdapterFormat:
    """The first format (by priority) that recognises ``path``.

    Example:
        >>> detect_format(Path("peft-adapter-dir")).name  # doctest: +SKIP
        'peft'
    """
    for fmt in sorted(FORMATS, key=lambda f: (f.priority, f.name)):
        if fmt.can_read and fmt.detect(path):
            return fmt
    keys = (safetensors_keys(path) or ([], {}))[0] if path.is_file() else []
    named = f"; its keys ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''}) match no family" if keys else ""
    raise UsageError(f"cannot tell which adapter format this is{named} (tried: {', '.join(FORMAT_BY_NAME)})",
                     path=path, hint="pass --from FORMAT")
