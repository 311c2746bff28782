"""kohya sd-scripts Flux LoRA files (``lora_unet_double_blocks_…``, ``lora_unet_single_blocks_…``, ``lora_te1_``).

Hooks of the kohya format: a file whose names diffusers' Flux loader places is read by
flux_lora.py into a multi-component adapter on diffusers' Flux modules; an adapter with a
``transformer`` component is written in kohya's Flux spelling (fused qkv / linear1 restored).
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_file
from ..format import Adapter
from .flux_keys import split_key, targets
from .flux_lora import flux_state, read_flux_state


def is_kohya_flux(keys: list[str]) -> bool:
    """True when some ``lora_unet_`` name is a Flux module diffusers knows (then the whole file is read as Flux).

    Example:
        >>> is_kohya_flux(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
        True
    """
    names = {split[0] for key in keys if (split := split_key(key)) and split[0].startswith("lora_unet_")}
    return bool(names) and any(t.component == "transformer" for t in targets(sorted(names)).values())


def is_flux_adapter(adapter: Adapter) -> bool:
    """A multi-component adapter with a ``transformer`` (Flux) component."""
    return "transformer" in (adapter.manifest.components or {})


def read_kohya_flux(state: dict, metadata: dict, path: Path, options, report) -> Adapter:
    """Read a kohya-Flux file's tensors (see flux_lora.read_flux_state)."""
    return read_flux_state(state, metadata, options.base, path, report, "kohya")


def write_kohya_flux(adapter: Adapter, path: Path, report, options) -> Path:
    """Write a Flux adapter in kohya's spelling: fused qkv/linear1 as read, or rank-Σr block-diagonal."""
    state, metadata = flux_state(adapter, report, "kohya")
    with atomic_file(path, overwrite=options.overwrite) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path

