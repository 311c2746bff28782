"""The keys of a diffusion LoRA file (kohya, LyCORIS, diffusers/PEFT, ComfyUI-LDM) grouped into modules.

``adapterfmt check --target diffusers|comfyui`` judges these files by their keys, as the loaders do:
which keys each loader applies, which it ignores and which make it refuse the file. This module only
reads the file's header (names) and its scalar ``.alpha`` tensors; the loaders' own rules live in
diffusers_keys.py (diffusers, run for real) and comfy_keys.py (ComfyUI, reimplemented).
"""
from __future__ import annotations

import json
import re

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

#: Per-module key suffixes of every family the two loaders know, longest first when matched.
SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".reshape_weight",
    "_lora.down.weight", "_lora.up.weight", ".lora.down.weight", ".lora.up.weight",
    ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
    ".lora_A.default.weight", ".lora_B.default.weight", ".lora_A.weight", ".lora_B.weight", ".lora_A", ".lora_B",
    ".lora_magnitude_vector.weight", ".lora_magnitude_vector",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".w_norm", ".b_norm", ".diff_b", ".diff",
    ".set_weight",
)
#: A Flux (BFL) block or top-level module in any spelling (kohya underscores, ComfyUI dots).
_FLUX_NAME = re.compile(r"(^|[._])(double_blocks|single_blocks)[._]\d|^(lora_unet_|diffusion_model\.)"
                        r"(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)")
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
#: Module-name prefixes of diffusion pipelines (SD 1.x / SDXL / Flux), in every family we know.
DIFFUSION_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_", "unet.",
                      "text_encoder.", "text_encoder_2.", "transformer.", "lora_transformer_", "diffusion_model.",
                      "text_encoders.")
#: Flux's original (BFL) top-level module roots: BFL's own files use them bare (no ``diffusion_model.``).
BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.")


def split_key(key: str) -> tuple[str, str]:
    """(module, suffix) of one key; an unknown suffix leaves the whole key as the module and '' as suffix.

    Example:
        >>> split_key("lora_unet_conv_in.lora_down.weight")
        ('lora_unet_conv_in', '.lora_down.weight')
    """
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


@dataclass
class DiffusionKeys:
    """A diffusion LoRA file as its keys: {module: {suffix: key}}, scalar alphas and the file metadata."""

    path: str
    keys: list[str]
    alphas: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base: str | None = None  # a base path the loaders' names are checked against, when given
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @cached_property
    def modules(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for key in self.keys:
            module, suffix = split_key(key)
            out.setdefault(module, {})[suffix] = key
        return out

    @property
    def kind(self) -> str:
        """``sdxl`` when the names say two text encoders (``lora_te1_``/``lora_te2_``, ``text_encoder_2.``),
        ``flux`` for transformer names (checked first: kohya-Flux files carry CLIP-L as ``lora_te1_``), else ``sd15``."""
        names = list(self.modules)
        if any(n.startswith(("transformer.", "lora_transformer_") + BFL_ROOTS) or _FLUX_NAME.search(n) for n in names):
            return "flux"
        if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names):
            return "sdxl"
        return "sd15"


def is_diffusion_key_file(keys: list[str]) -> bool:
    """Every module name has a diffusion pipeline prefix or is a bare BFL Flux name (and the file is not an
    adapterfmt file)."""
    modules = {split_key(k)[0] for k in keys}
    return bool(modules) and all(m.startswith(DIFFUSION_PREFIXES + BFL_ROOTS) for m in modules)


def read_diffusion_keys(path: Path | str, base: str | None = None) -> DiffusionKeys | None:
    """The file's keys, alphas and metadata, or None when it is not a diffusion LoRA file
    (the caller leaves adapterfmt files out: their manifest says more than their keys).

    Example:
        >>> facts = read_diffusion_keys("sdxl_lora.safetensors")  # doctest: +SKIP
        >>> facts.kind  # doctest: +SKIP
        'sdxl'
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            keys, metadata = list(handle.keys()), dict(handle.metadata() or {})
            if not is_diffusion_key_file(keys):
                return None
            alphas = {split_key(k)[0]: float(handle.get_tensor(k).float().reshape(-1)[0])
                      for k in keys if k.endswith(".alpha")}
            shapes = {k: list(handle.get_slice(k).get_shape()) for k in keys}
    except (SafetensorError, OSError, ValueError):
        return None
    return DiffusionKeys(str(path), keys, alphas, metadata, base, shapes)


def peft_scales(facts: DiffusionKeys) -> dict[str, float]:
    """{module: the scale diffusers gives it} for PEFT-format modules (``.lora_A.weight``, no ``.alpha``),
    from the file's ``lora_adapter_metadata`` (per component ``r``, ``lora_alpha``, patterns, rsLoRA) as
    PEFT applies it; empty without that metadata (diffusers then uses alpha = rank, scale 1).

    Example:
        >>> peft_scales(read_diffusion_keys("diffusers_lora.safetensors"))  # doctest: +SKIP
        {'unet.down_blocks.0.attentions.0.proj_in': 2.0}
    """
    import math

    from ..formats.peft.config import pattern_key  # PEFT's get_pattern_key, ours (PEFT is not a core dependency)
    try:
        config = json.loads(facts.metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    out = {}
    for module, keys in facts.modules.items():
        if ".lora_A.weight" not in keys or ".alpha" in keys:
            continue
        component, _, inner = module.partition(".")
        rank = facts.shapes[keys[".lora_A.weight"]][0]
        alpha = config.get(f"{component}.lora_alpha")
        if alpha is None:
            continue
        patterns = config.get(f"{component}.alpha_pattern") or {}
        key = pattern_key(patterns, inner)
        alpha = patterns[key] if key is not None else alpha
        root = math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank
        out[module] = float(alpha) / root
    return out
