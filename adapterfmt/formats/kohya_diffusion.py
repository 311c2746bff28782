"""kohya names of diffusion pipelines (SD 1.x, SDXL) <-> diffusers module paths, by diffusers' own code.

sd-scripts names a module ``<prefix>_<path with '.' -> '_'>``; for SDXL the UNet path is on the original
SGM block layout (``input_blocks_4_1_…``). Rather than tables of our own, the mapping runs the real
consumer's conversion (diffusers ``lora_state_dict`` with the base UNet's config, then the PEFT key
conversion ``load_lora_weights`` applies) on a probe: one 1x1 tensor per name whose value is the
name's index, so where each value lands says which module diffusers puts that name on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ForeignFormatError, UsageError
from .diffusers_probe import index_probe, quiet_diffusers

#: kohya prefix -> diffusers pipeline component.
DIFFUSION_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                      "lora_te2": "text_encoder_2"}
#: The naming families this reader tries, for refusals.
FAMILIES = ("kohya SD 1.x (lora_unet_ on diffusers blocks, lora_te_)",
            "kohya SDXL (lora_unet_ on SGM blocks, lora_te1_/lora_te2_)")
SGM_MARKERS = ("_input_blocks_", "_middle_block_", "_output_blocks_")
#: Families named in refusals of files that are not SD 1.x/SDXL pipeline files (pipeline files read them all:
#: kohya_modules.py), and the Flux names this reader does not map.
NOT_SUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LyCORIS LoCon (conv, Tucker)",
                 "dora_scale": "kohya/LyCORIS DoRA (dora_scale)", "oft_": "OFT", ".diff": "LyCORIS full diff",
                 "double_blocks": "kohya Flux", "single_blocks": "kohya Flux"}


def kohya_prefix(name: str) -> str:
    """``lora_te1`` of ``lora_te1_text_model_…`` (the part before the second underscore).

    Example:
        >>> kohya_prefix("lora_unet_down_blocks_0_attentions_0_proj_in")
        'lora_unet'
    """
    head, _, rest = name.partition("_")
    return f"{head}_{rest.partition('_')[0]}"


def is_diffusion_file(names: list[str]) -> bool:
    """Every name has a diffusion pipeline prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)."""
    return bool(names) and all(kohya_prefix(n) in DIFFUSION_PREFIXES for n in names)


def unsupported_family(key: str) -> str | None:
    """The named family of a key this build refuses (LoHa, LoKr, conv LoCon, DoRA, Flux), if any."""
    return next((family for marker, family in NOT_SUPPORTED.items() if marker in key), None)


def _peft_names(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """diffusers' second step (inside ``load_lora_weights``): its keys -> PEFT ``<module>.lora_A.weight``."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType
    inner = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(component + ".")}
    if not inner:
        return {}
    if component == "unet":
        return convert_unet_state_dict_to_peft(inner)
    # The type is given, not inferred: diffusers' inference fails on files without an out_proj or MLP LoRA.
    new = convert_state_dict_to_diffusers(inner, original_type=StateDictType.DIFFUSERS_OLD)
    return convert_state_dict_to_peft(new, original_type=StateDictType.DIFFUSERS)


def diffusers_modules(names: list[str], base, path: Path) -> dict[str, tuple[str, str]]:
    """{kohya name: (component, module path in that component)} as diffusers maps them.

    ``base`` (a pipeline, a component, or None) gives the UNet config SGM names need and each text
    encoder's spelling (transformers 5's CLIPTextModel has no ``text_model.``); both spellings are read.

    Example:
        >>> diffusers_modules(["lora_te_text_model_encoder_layers_0_self_attn_q_proj"], None, Path("x"))
        {'lora_te_text_model_encoder_layers_0_self_attn_q_proj': ('text_encoder', 'text_model.encoder.layers.0.self_attn.q_proj')}
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    sgm = any(marker in f"_{n}_" for n in names for marker in SGM_MARKERS if n.startswith("lora_unet_"))
    unet_config = _unet_config(base)
    if sgm and unet_config is None:
        raise UsageError("the UNet names are on the original SGM block layout (SDXL); mapping them needs the UNet's "
                         "config", path=path, hint="pass --base (the diffusers pipeline the LoRA was trained for)")
    probe = index_probe(names)
    try:
        with quiet_diffusers():
            state, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
                probe, unet_config=unet_config if sgm else None)
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ForeignFormatError(f"diffusers cannot map these kohya names ({str(exc).splitlines()[0][:200]})",
                                 path=path, hint=f"families tried: {'; '.join(FAMILIES)}") from None
    found: dict[str, tuple[str, str]] = {}
    for component in dict.fromkeys(DIFFUSION_PREFIXES.values()):
        for key, value in _peft_names(state, component).items():
            if key.endswith(".lora_A.weight"):
                found[names[int(value.reshape(-1)[0])]] = (component, key[: -len(".lora_A.weight")])
    return found


def _unet_config(base):
    config = None
    if base is not None and hasattr(base, "components") and "unet" in base.components:
        config = base.components["unet"].config
    elif base is not None and getattr(base, "architecture", None) == "UNet2DConditionModel":
        config = base.config
    if config is None:
        return None
    from diffusers.configuration_utils import FrozenDict
    return FrozenDict(config)


def resolve_in_base(component: str, module: str, base) -> str | None:
    """The module's path in the base component, accepting both CLIP spellings (with and without
    ``text_model.``); None when the base has no such Linear weight. Without a base: ``module``."""
    checkpoint = _component_checkpoint(base, component)
    if checkpoint is None:
        return module
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        if f"{candidate}.weight" in checkpoint:
            return candidate
    return None


def _component_checkpoint(base, component: str):
    if base is None:
        return None
    if hasattr(base, "components"):
        return base.components.get(component)
    return base
