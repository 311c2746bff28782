"""Loading user-given adapter and base paths: ``hf://`` resolution, then the checked readers."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import BaseCheckpoint, open_base
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
    """A base checkpoint from a local path or ``hf://`` spec (None stays None): a transformers model,
    a diffusers component directory or a diffusers pipeline directory.

    Example:
        >>> base = load_base("hf://org/model")  # doctest: +SKIP
    """
    if path is None or isinstance(path, BaseCheckpoint):
        return path
    return open_base(resolve_path(path))
