"""What diffusers does with a diffusion LoRA file's keys, found by running diffusers itself.

The file's keys go through the real conversion ``load_lora_weights`` runs (``lora_state_dict``, then
the PEFT key conversion of ``load_lora_into_unet`` / ``load_lora_into_text_encoder``) on a probe: one
1x1 tensor per key whose value is the key's index, so where each value lands says which key diffusers
applied to which module, and which keys it dropped. Offline: no model, no download. With a base
(pipeline directory or single file) the module names are also looked up in the base.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .diffusion_keys import DiffusionKeys, split_key

DIFFUSERS_VERSION_TESTED = "0.42.1"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: SDXL's UNet (the only published SGM-layout UNet LoRAs are SDXL's): what diffusers needs to map SGM names.
SDXL_LAYERS_PER_BLOCK = 2


@dataclass
class DiffusersOutcome:
    """Per file module: applied by diffusers (component, module path), or why not."""

    applied: dict[str, tuple[str, str]] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # module -> suffixes diffusers drops
    missing_in_base: dict[str, str] = field(default_factory=dict)  # module -> component.path not in the base
    refused: str | None = None
    warnings: list[str] = field(default_factory=list)
    assumed: str | None = None  # an assumption the mapping needed (no --base)
    # Flux (diffusers_flux_keys.py): the diffusers layers each module feeds (a fused qkv feeds three),
    # modules converted to a name load_lora_weights skips, and linear1 LoRAs off FLUX.1's fixed rows.
    layers: dict[str, list[str]] = field(default_factory=dict)
    outside: dict[str, str] = field(default_factory=dict)
    fixed_rows: dict[str, int] = field(default_factory=dict)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage().splitlines()[0][:300])


def _probe(facts: DiffusionKeys) -> dict[str, torch.Tensor]:
    # .alpha is read with .item(): a 0-d tensor; every other key a 1x1 matrix.
    return {k: torch.tensor(float(i)) if k.endswith(".alpha") else torch.full((1, 1), float(i))
            for i, k in enumerate(facts.keys)}


def _unet_config(facts: DiffusionKeys, outcome: DiffusersOutcome):
    from ..checkpoint import open_base
    from pathlib import Path
    if facts.base and Path(facts.base).exists():
        base = open_base(Path(facts.base))
        unet = getattr(base, "components", {}).get("unet")
        if unet is not None and unet.config.get("layers_per_block"):
            return SimpleNamespace(layers_per_block=unet.config["layers_per_block"])
    outcome.assumed = (f"SGM block names mapped with SDXL's layers_per_block {SDXL_LAYERS_PER_BLOCK} "
                       "(give --base for the base's own UNet config)")
    return SimpleNamespace(layers_per_block=SDXL_LAYERS_PER_BLOCK)


def _peft_keys(state: dict, component: str) -> dict[str, torch.Tensor]:
    """diffusers' second step: its keys -> PEFT ``<module>.lora_A.weight`` names, as load_lora_weights does."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType
    inner = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(component + ".")}
    if not inner:
        return {}
    if component == "unet":
        return convert_unet_state_dict_to_peft(inner)
    if any(".lora_A." in k or ".lora_B." in k for k in inner):
        return inner  # already PEFT names (a diffusers-format file)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(inner, original_type=StateDictType.DIFFUSERS_OLD),
                                      original_type=StateDictType.DIFFUSERS)


def run_diffusers(facts: DiffusionKeys) -> DiffusersOutcome:
    """diffusers' verdict on every module of the file (SD 1.x / SDXL loaders).

    Example:
        >>> run_diffusers(read_diffusion_keys("kohya_dora.safetensors")).dropped  # doctest: +SKIP
        {'lora_unet_down_blocks_0_attentions_0_proj_in': ['.dora_scale']}
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    outcome = DiffusersOutcome()
    mixin = StableDiffusionXLLoraLoaderMixin if facts.kind == "sdxl" else StableDiffusionLoraLoaderMixin
    sgm = any(m.startswith("lora_unet_") and any(p in m for p in ("_input_blocks_", "_middle_block_", "_output_blocks_"))
              for m in facts.modules)
    kwargs = {"unet_config": _unet_config(facts, outcome)} if sgm else {}
    logger, collect = logging.getLogger("diffusers"), _Collect()
    # diffusers' own handler would print the warnings; they are collected for the report instead.
    handlers, logger.handlers = logger.handlers, [collect]
    try:
        state, alphas = mixin.lora_state_dict(_probe(facts), **kwargs)
    except (ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        outcome.refused = " ".join(str(exc).split())[:300]
        return outcome
    finally:
        logger.handlers = handlers
    outcome.warnings = collect.messages
    landed = _landed(state, alphas)
    for module, keys in facts.modules.items():
        lost = [s for s, k in keys.items() if facts.keys.index(k) not in landed]
        if lost:
            outcome.dropped[module] = lost
    for component in COMPONENTS:
        for key, value in _peft_keys(state, component).items():
            if key.endswith(".lora_A.weight"):
                module = split_key(facts.keys[int(value.reshape(-1)[0])])[0]
                outcome.applied[module] = (component, key[: -len(".lora_A.weight")])
    _check_in_base(facts, outcome)
    return outcome


def _landed(state: dict, alphas) -> set[int]:
    values = {int(v.reshape(-1)[0]) for v in state.values() if isinstance(v, torch.Tensor) and v.numel()}
    return values | {int(a) for a in (alphas or {}).values()}


def _check_in_base(facts: DiffusionKeys, outcome: DiffusersOutcome) -> None:
    """With a base, a module diffusers maps to a name the base lacks is not applied (PEFT finds no layer)."""
    from pathlib import Path

    from ..checkpoint import open_base
    if not facts.base or not Path(facts.base).exists():
        return
    base = open_base(Path(facts.base))
    components = getattr(base, "components", {})
    for module, (component, path) in list(outcome.applied.items()):
        checkpoint = components.get(component)
        spellings = (path, path.removeprefix("text_model."), f"text_model.{path}")
        if checkpoint is None or not any(f"{p}.weight" in checkpoint for p in spellings):
            outcome.missing_in_base[module] = f"{component}.{path}"
            del outcome.applied[module]
