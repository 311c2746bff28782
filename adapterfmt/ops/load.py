"""Loading user-given adapter and base paths: ``hf://`` resolution, then the checked readers."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import BaseCheckpoint, open_base
from ..checkpoint.bnb_checkpoint import BnbCheckpoint, is_bnb_quantized, refuse_foreign_quantization
from ..errors import InputIOError, UsageError
from ..format import Adapter
from ..methods import read_checked_adapter
from .hub import resolve_path


def load_adapter(path: Path | str) -> Adapter:
    """Read an adapterfmt file (local or ``hf://``) and check every module against its method.

    Example:
        >>> adapter = load_adapter("adapter.safetensors")  # doctest: +SKIP
    """
    local = resolve_path(path)
    foreign = foreign_format(local)
    if foreign is not None:
        raise UsageError(f"is a {foreign} adapter, not an adapterfmt file", path=local,
                         hint=f"convert it first: adapterfmt convert {local} adapter.safetensors")
    if local.is_dir():
        raise InputIOError("is a directory, not an adapterfmt file", path=local,
                           hint="convert it first: adapterfmt convert DIR adapter.safetensors")
    return read_checked_adapter(local)


def foreign_format(path: Path) -> str | None:
    """The name of the foreign format ``path`` is in (a GGUF, PEFT, MLX, kohya adapter), or None for an
    adapterfmt file or something no reader recognises.

    Example:
        >>> foreign_format(Path("adapter.gguf"))  # doctest: +SKIP
        'gguf'
    """
    from ..formats import FORMATS
    for fmt in sorted(FORMATS, key=lambda f: (f.priority, f.name)):
        if fmt.can_read and fmt.detect(path):
            return None if fmt.name == "adapterfmt" else fmt.name
    return None


def load_any_adapter(path: Path | str) -> tuple[Adapter, str]:
    """An adapter in any format we read, as ``convert`` reads it (no base): (adapter, format name).

    Example:
        >>> adapter, fmt = load_any_adapter("adapter.gguf")  # doctest: +SKIP
    """
    from ..conversion_report import ConversionReport
    from ..formats import ReadOptions, get_format
    local = resolve_path(path)
    foreign = foreign_format(local)
    if foreign is None:
        return load_adapter(local), "adapterfmt"
    return get_format(foreign).read(local, ReadOptions(), ConversionReport()), foreign


def load_base(path: Path | str | BaseCheckpoint | None) -> BaseCheckpoint | None:
    """A base checkpoint from a local path or ``hf://`` spec (None stays None): a transformers model,
    a diffusers component directory or a diffusers pipeline directory.

    Example:
        >>> base = load_base("hf://org/model")  # doctest: +SKIP
    """
    if path is None or isinstance(path, BaseCheckpoint):
        return path
    base = open_base(resolve_path(path))
    if type(base) is not BaseCheckpoint:  # a diffusers pipeline or component
        return base
    refuse_foreign_quantization(base)
    # A bitsandbytes-quantized base reads as its dequantized weights (their form is recorded on convert).
    return BnbCheckpoint(base.path) if is_bnb_quantized(base.config) else base
