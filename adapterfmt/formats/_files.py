"""Loading foreign weight files: safetensors, and pickles only behind ``allow_pickle``.

One place decides how strangers' files are opened, so every reader refuses the same things
with the same one-line errors.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ForeignFormatError, PickleRefusedError


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; a damaged file is a ForeignFormatError.

    Example:
        >>> tensors, metadata = load_safetensors(Path("adapter_model.safetensors"))  # doctest: +SKIP
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ForeignFormatError(f"not a valid safetensors file ({exc})", path=path,
                                 hint="the file is truncated or corrupt; re-download it") from None


def safetensors_keys(path: Path) -> tuple[list[str], dict[str, str]] | None:
    """For format detection: (tensor names, metadata), or None if ``path`` is no safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), handle.metadata() or {}
    except (SafetensorError, OSError):
        return None


def load_pickled_tensors(path: Path, allow_pickle: bool, what: str, unwrap: str | None = None
                         ) -> dict[str, torch.Tensor]:
    """A pickled dict of tensors, read with ``torch.load(weights_only=True)`` and only if allowed.

    ``unwrap`` names a key whose dict holds the tensors (e.g. ``model_state_dict``).

    Example:
        >>> load_pickled_tensors(Path("adapter_model.bin"), True, "a PEFT adapter")  # doctest: +SKIP
    """
    if not allow_pickle:
        raise PickleRefusedError(f"{what} is a pickle", path=path,
                                 hint="pickle can execute code; pass --allow-pickle if you trust it "
                                      "(loaded with torch.load(weights_only=True))")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for hostile or broken pickles
        raise ForeignFormatError(f"refused by the safe unpickler ({type(exc).__name__})", path=path,
                                 hint="the file is not a plain tensor dict") from None
    if unwrap and isinstance(data, dict) and isinstance(data.get(unwrap), dict):
        data = data[unwrap]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ForeignFormatError("pickle does not hold a dict of tensors", path=path, hint="the file is not a plain dict of tensors")
    return data
