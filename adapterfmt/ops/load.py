"""Loading user-given adapter and base paths: ``hf://`` resolution, then the checked readers."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import BaseCheckpoint
from ..checkpoint.bnb_checkpoint import BnbCheckpoint, is_bnb_quantized, refuse_foreign_quantization
from ..errors import InputIOError
from ..format import Adapter
from ..methods import read_checked_adapter
from .hub import resolve_path


def load_adapter(path: Path | str) -> Adapter:
    """Read an adapterfmt file (local or ``hf://``) and check every module against its method.

    Example:
        >>> adapter = load_adapter("adapter.safetensors")  # doctest: +SKIP
    """
    local = resolve_path(path)
    if local.is_dir():
        raise InputIOError("is a directory, not an adapterfmt file", path=local,
                           hint="convert it first: adapterfmt convert DIR adapter.safetensors")
    return read_checked_adapter(local)


def load_base(path: Path | str | BaseCheckpoint | None) -> BaseCheckpoint | None:
    """A base checkpoint from a local path or ``hf://`` spec (None stays None).

    Example:
        >>> base = load_base("hf://org/model")  # doctest: +SKIP
    """
    if path is None or isinstance(path, BaseCheckpoint):
        return path
    base = BaseCheckpoint(resolve_path(path))
    refuse_foreign_quantization(base)
    # A bitsandbytes-quantized base reads as its dequantized weights (their form is recorded on convert).
    return BnbCheckpoint(base.path) if is_bnb_quantized(base.config) else base
