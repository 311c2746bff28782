"""Flux LoRA module names (kohya sd-scripts, BFL / ComfyUI / ai-toolkit) <-> diffusers modules, by diffusers' code.

Flux's original (BFL) layout fuses q, k and v in one Linear (``double_blocks.N.img_attn.qkv``; a
single block's ``linear1`` is q, k, v and the MLP input) where diffusers has one module per part.
A fused LoRA is one low-rank pair whose A every part shares and whose B rows are split among the
parts. Which rows go where is not tabled here: it is read off diffusers' own converters, run once
on probes whose B rows carry their row numbers:

- ``_convert_bfl_flux_control_lora_to_diffusers`` (BFL's dotted names) is run on a dict that
  answers every key it asks for, so the keys it asks for are the BFL LoRA modules it knows;
- ``_convert_kohya_flux_lora_to_diffusers`` (what ``FluxLoraLoaderMixin.load_lora_weights`` runs on
  kohya and ComfyUI files) is run on each such module's kohya name, obtained by diffusers' own
  ComfyUI rule (``diffusion_model.`` -> ``lora_unet_``, dots -> underscores).

diffusers' converters are written for FLUX.1's sizes (inner dim 3072, 19 double and 38 single
blocks), so the probe has :data:`REFERENCE_ROWS` rows and a part's rows are scaled to the file's
row count (exact integers or refused); a base checks the resulting sizes module by module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch

#: Rows of a probe's B: the largest fused Linear of FLUX.1 (single blocks' linear1, 3·3072 + 12288).
REFERENCE_ROWS = 21504
KOHYA_UNET = "lora_unet_"
COMFY_UNET = "diffusion_model."


@dataclass(frozen=True)
class Part:
    """One diffusers module fed by a fused LoRA: its B rows are ``runs`` ((start, length), in order)
    of the fused B at :data:`REFERENCE_ROWS` rows."""

    module: str
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class FluxTable:
    """{BFL dotted module: parts}, and the kohya name of each BFL module."""

    parts: dict[str, tuple[Part, ...]]
    kohya: dict[str, str]

    @property
    def by_kohya(self) -> dict[str, str]:
        return {name: bfl for bfl, name in self.kohya.items()}

    @property
    def by_module(self) -> dict[str, str]:
        """{diffusers module: the BFL module it is part of}."""
        return {part.module: bfl for bfl, parts in self.parts.items() for part in parts}


def kohya_name(bfl: str) -> str:
    """diffusers' ComfyUI rule: ``diffusion_model.`` becomes ``lora_unet_`` and the other dots underscores.

    Example:
        >>> kohya_name("double_blocks.0.img_attn.qkv")
        'lora_unet_double_blocks_0_img_attn_qkv'
    """
    from diffusers.loaders.lora_conversion_utils import _custom_replace
    key = f"{COMFY_UNET}{bfl}.lora_down.weight".replace(COMFY_UNET, KOHYA_UNET)
    return _custom_replace(key, ["lora_down"]).removesuffix(".lora_down.weight")


def _runs(rows: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Contiguous increasing runs of a row-number vector, as (start, length)."""
    values = rows.reshape(-1).to(torch.int64)
    starts = torch.cat([torch.tensor([0]), torch.nonzero(values[1:] - values[:-1] != 1).reshape(-1) + 1])
    ends = torch.cat([starts[1:], torch.tensor([len(values)])])
    return tuple((int(values[s]), int(e - s)) for s, e in zip(starts, ends))


class _AskedKeys(dict):
    """Answers every key the BFL converter pops: lora_B with numbered rows, anything else two rows
    (the final layer's A goes through diffusers' scale/shift swap too)."""

    def __init__(self):
        super().__init__()
        self.asked: list[str] = []

    def __iter__(self):  # the converter looks for 'guidance' among the keys to include guidance_in
        return iter(["guidance_in"])

    def pop(self, key, *default):
        self.asked.append(key)
        index = len(self.asked) - 1
        if key.endswith(".lora_B.weight"):
            return (torch.arange(REFERENCE_ROWS, dtype=torch.int64) + index * REFERENCE_ROWS).reshape(-1, 1)
        return torch.full((2, 1), index, dtype=torch.int64)


def _bfl_parts() -> dict[str, tuple[Part, ...]]:
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers
    asked = _AskedKeys()
    converted = _convert_bfl_flux_control_lora_to_diffusers(asked)
    parts: dict[str, list[Part]] = {}
    for key, value in converted.items():
        if not key.endswith(".lora_B.weight"):
            continue
        source = asked.asked[int(value.reshape(-1)[0]) // REFERENCE_ROWS].removesuffix(".lora_B.weight")
        module = key.removeprefix("transformer.").removesuffix(".lora_B.weight")
        parts.setdefault(source, []).append(Part(module, _runs(value % REFERENCE_ROWS)))
    return {name: tuple(p) for name, p in parts.items()}


def _kohya_parts(names: list[str]) -> dict[str, tuple[Part, ...]]:
    """diffusers' kohya-Flux conversion of ``names``: {kohya name: parts}."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    probe = {}
    rows = torch.arange(REFERENCE_ROWS, dtype=torch.float32).reshape(-1, 1)
    for index, name in enumerate(names):
        probe[f"{name}.lora_down.weight"] = torch.full((1, 1), float(index))
        probe[f"{name}.lora_up.weight"] = rows
    quiet = logging.getLogger("diffusers")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        converted = _convert_kohya_flux_lora_to_diffusers(probe)
    finally:
        quiet.setLevel(level)
    downs = {key.removesuffix(".lora_A.weight"): int(v.reshape(-1)[0]) for key, v in converted.items()
             if key.endswith(".lora_A.weight")}
    parts: dict[str, list[Part]] = {}
    for module, index in downs.items():
        up = converted[f"{module}.lora_B.weight"]
        parts.setdefault(names[index], []).append(Part(module.removeprefix("transformer."), _runs(up)))
    return {name: tuple(p) for name, p in parts.items()}


@lru_cache(maxsize=1)
def flux_table() -> FluxTable:
    """The Flux LoRA modules diffusers knows, with their parts as diffusers' kohya loader splits them.

    Example:
        >>> [p.module for p in flux_table().parts["double_blocks.0.img_attn.qkv"]]
        ['transformer_blocks.0.attn.to_q', 'transformer_blocks.0.attn.to_k', 'transformer_blocks.0.attn.to_v']
    """
    bfl = _bfl_parts()
    kohya = {name: kohya_name(name) for name in bfl}
    parts = _kohya_parts(list(kohya.values()))
    return FluxTable(parts={name: parts[kohya[name]] for name in bfl if kohya[name] in parts},
                     kohya={name: kohya[name] for name in bfl if kohya[name] in parts})


@lru_cache(maxsize=1)
def bfl_parts() -> dict[str, tuple[Part, ...]]:
    """The parts as diffusers' BFL converter splits them (tests check both converters agree)."""
    return _bfl_parts()


def scaled_rows(parts: tuple[Part, ...], rows: int) -> list[torch.Tensor] | None:
    """Each part's row indices in a fused B of ``rows`` rows, or None when the reference runs do
    not scale to whole rows.

    Example:
        >>> [r.tolist() for r in scaled_rows(flux_table().parts["double_blocks.0.img_attn.qkv"], 6)]
        [[0, 1], [2, 3], [4, 5]]
    """
    out = []
    for part in parts:
        indices = []
        for start, length in part.runs:
            if (start * rows) % REFERENCE_ROWS or (length * rows) % REFERENCE_ROWS:
                return None
            begin = start * rows // REFERENCE_ROWS
            indices.append(torch.arange(begin, begin + length * rows // REFERENCE_ROWS))
        out.append(torch.cat(indices))
    return out
