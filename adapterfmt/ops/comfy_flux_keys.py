"""Which Flux LoRA names ComfyUI maps onto a Flux model: OUR REIMPLEMENTATION of ComfyUI's rules, not ComfyUI.

Read from ComfyUI's source and written again (ComfyUI cannot be installed here):

- ``comfy/lora.py`` ``model_lora_keys_unet`` @41444b5: every ``diffusion_model.<BFL name>.weight`` of the
  model is reachable as ``lora_unet_<BFL name, dots as underscores>`` (and ``lora_prior_unet_``) and as
  ``diffusion_model.<BFL name>``; for a Flux model ``comfy.utils.flux_to_diffusers`` adds
  ``transformer.<diffusers name>``, ``lycoris_<…>`` and ``lora_transformer_<…>`` (diffusers' q/k/v map to
  row slices of the fused qkv/linear1, sized by the model's hidden size: any width works);
- ``model_lora_keys_clip``: CLIP-L as ``text_encoders.clip_l.transformer.<any weight>``,
  ``lora_te_``/``lora_te1_`` and ``text_encoder.`` for ``text_model.encoder.layers.N`` q/k/v/out_proj and
  fc1/fc2; T5-XXL (CLIP-L present, no CLIP-G) as ``lora_te2_<T5 name>`` (OneTrainer) and ``lora_te3_<T5 name>``
  (sd-scripts), and ``text_encoders.t5xxl.transformer.<any weight>``;
- ``comfy/lora_convert.py`` ``convert_lora`` @02b5222: bare BFL names (``double_blocks.0…`` without
  ``diffusion_model.``) are prefixed only for BFL control LoRAs (``img_in.lora_A.weight`` together with
  ``single_blocks.0.norm.key_norm.scale``); in any other file they are 'lora key not loaded'.

Without a model the BFL and diffusers module names are those of FLUX.1 as diffusers' converters know
them (formats/flux_names.py), guidance_in included.
"""
from __future__ import annotations

import re
from functools import lru_cache

from .comfy_keys import CLIP_LAYERS, CLIP_MODULES

COMFY_FLUX_SOURCE = ("ComfyUI comfy/lora.py @41444b5 (model_lora_keys_unet Flux branch, model_lora_keys_clip t5xxl), "
                     "comfy/lora_convert.py @02b5222 (convert_lora_bfl_control)")
_CLIP = "|".join(c.replace(".", "_") for c in CLIP_MODULES)
_CLIP_DOTTED = "|".join(re.escape(c) for c in CLIP_MODULES)
TEXT_NAMES = (
    re.compile(rf"^lora_te1?_text_model_encoder_layers_(\d+)_({_CLIP})$"),
    re.compile(rf"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.({_CLIP_DOTTED})$"),
    re.compile(r"^text_encoders\.(clip_l|t5xxl)\.transformer\..+$"),
    re.compile(r"^lora_te[23]_(encoder|shared)"),  # T5-XXL: the third text encoder slot (2 when no CLIP-G)
)


@lru_cache(maxsize=1)
def _names() -> tuple[frozenset, frozenset, frozenset]:
    """(BFL names, their kohya spellings, diffusers module names) of FLUX.1."""
    from ..formats.flux_names import flux_table
    table = flux_table()
    bfl = frozenset(table.parts)
    return bfl, frozenset(b.replace(".", "_") for b in bfl), frozenset(table.by_module)


def is_bfl_control(keys: list[str]) -> bool:
    """ComfyUI's test for a BFL control LoRA, whose bare names it prefixes with ``diffusion_model.``."""
    return "img_in.lora_A.weight" in keys and "single_blocks.0.norm.key_norm.scale" in keys


def flux_mapped(module: str, control: bool = False) -> str | None:
    """None when ComfyUI's key map for a Flux model has this module name, else why not.

    Example:
        >>> flux_mapped("lora_unet_double_blocks_0_img_attn_qkv") is None
        True
    """
    bfl, kohya, diffusers = _names()
    if module.startswith(("lora_te", "text_encoder", "text_encoders.")):
        for pattern in TEXT_NAMES:
            match = pattern.match(module)
            if match and (pattern.groups < 2 or int(match[1]) < CLIP_LAYERS):
                return None
        return "not a CLIP-L (q/k/v/out_proj, fc1/fc2) or T5-XXL name of ComfyUI's Flux text encoders"
    for prefix, known in (("lora_unet_", kohya), ("lora_prior_unet_", kohya), ("diffusion_model.", bfl),
                          ("transformer.", diffusers)):
        if module.startswith(prefix):
            return None if module[len(prefix):] in known else f"no FLUX.1 module is called {module[len(prefix):]!r}"
    for prefix in ("lycoris_", "lora_transformer_"):
        if module.startswith(prefix):
            name = module[len(prefix):]
            return None if name in {d.replace(".", "_") for d in diffusers} else f"no FLUX.1 module is called {name!r}"
    if module in bfl:
        return None if control else ("bare BFL names are prefixed with 'diffusion_model.' only in BFL control "
                                     "LoRAs (lora_convert.convert_lora); here they are not in the key map")
    return "no ComfyUI Flux name family has this prefix"


def flux_name_rule(keys: list[str]):
    """The ``name_rule`` for comfy_keys.run_comfy on a Flux file with these keys.

    Example:
        >>> flux_name_rule(["double_blocks.0.img_attn.qkv.lora_A.weight"])("double_blocks.0.img_attn.qkv") is None
        False
    """
    control = is_bfl_control(keys)
    return lambda module: flux_mapped(module, control)
