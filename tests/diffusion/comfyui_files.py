"""SD 1.x / SDXL LoRA files as ComfyUI saves them: UNet names on the original LDM/SGM blocks under
``diffusion_model.``, CLIP-L / CLIP-G under ``text_encoders.clip_l|clip_g.transformer.text_model.``.

The LDM names come from ldm_files.ldm_unet_name (the test's own LDM table, checked against diffusers'
convert_ldm_unet_checkpoint in test_single_file.py), not from adapterfmt.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from .kohya_files import te_targets, unet_linear_targets
from .ldm_files import ldm_unet_name

ENCODERS = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer."}


def ldm_module(unet, path: str) -> str:
    """The LDM path of a diffusers UNet module."""
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    return ldm_unet_name(f"{path}.weight", unet.config.layers_per_block, with_attention).removesuffix(".weight")


def comfyui_lora(models: dict, out, *, dtype=torch.float16, roles=("lora_down", "lora_up"), seed: int = 0,
                 kohya_twin=None, uniform_alpha: bool = False) -> dict[str, str]:
    """Write a ComfyUI-style LoRA; returns {file name: component.module}. ``kohya_twin``: also write the same
    tensors under sd-scripts' names on the original blocks (``lora_unet_input_blocks_…``, ``lora_te1_``/``lora_te2_``),
    which diffusers loads. ``uniform_alpha``: one alpha for the file (diffusers 0.42.1 ignores per-module
    alphas of kohya attention/CLIP names, see test_diffusers_consumer.py)."""
    gen = torch.Generator().manual_seed(seed)
    unet = models["unet"]
    modules = [(f"diffusion_model.{ldm_module(unet, p)}", f"unet.{p}") for p in unet_linear_targets(unet)]
    for component, prefix in ENCODERS.items():
        if component in models:
            modules += [(f"{prefix}text_model.{p.removeprefix('text_model.')}", f"{component}.{p}")
                        for p in te_targets(models[component])]
    state, twin = {}, {}
    two = "text_encoder_2" in models
    for i, (name, target) in enumerate(modules):
        component, path = target.split(".", 1)
        layer = models[component].get_submodule(path)
        rank = (4, 2)[i % 2]
        tensors = {roles[0]: (torch.randn(rank, layer.in_features, generator=gen) * 0.3).to(dtype),
                   roles[1]: (torch.randn(layer.out_features, rank, generator=gen) * 0.3).to(dtype)}
        for role, tensor in tensors.items():
            state[f"{name}.{role}.weight"] = tensor
        state[f"{name}.alpha"] = torch.tensor(3.0 if uniform_alpha else float((3, 1)[i % 2])).to(dtype)
        kohya = name.replace("diffusion_model.", "lora_unet_").replace(ENCODERS["text_encoder"], "lora_te1_" if two
                                                                       else "lora_te_")
        kohya = kohya.replace(ENCODERS["text_encoder_2"], "lora_te2_").replace(".", "_")
        twin[f"{kohya}.lora_down.weight"], twin[f"{kohya}.lora_up.weight"] = tensors[roles[0]], tensors[roles[1]]
        twin[f"{kohya}.alpha"] = state[f"{name}.alpha"]
    save_file(state, str(out), metadata={"software": "ComfyUI"})
    if kohya_twin is not None:
        save_file(twin, str(kohya_twin))
    return dict(modules)
