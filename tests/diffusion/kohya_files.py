"""LoRA files laid out the way kohya's sd-scripts writes them, for the tiny pipelines of models.py.

sd-scripts targets the Linear layers of the UNet's transformer blocks and of the CLIP text encoders'
attention and MLP, names them ``<prefix>_<module path with '.' -> '_'>`` and saves lora_down,
lora_up and a 0-d alpha per module in the save precision, with ``ss_*``/``sshs_*``/``modelspec.*``
metadata. SD 1.x UNet paths are diffusers'; SDXL's are on the original SGM block layout
(``input_blocks.<i>.1``, ``middle_block.1``, ``output_blocks.<i>.1``); text encoder paths start
with ``text_model.`` (older transformers), or not (``te_spelling="flat"``, transformers 5).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

TE_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def unet_linear_targets(unet) -> list[str]:
    """Linear modules inside the UNet's Transformer2DModel blocks (sd-scripts' UNet targets, Linear only)."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n]


def te_targets(text_encoder) -> list[str]:
    return [n for n, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(TE_TARGETS)]


def sgm_path(path: str, layers_per_block: int) -> str:
    """An SDXL diffusers attention path on SGM blocks (sd-scripts' sdxl_original_unet names)."""
    per = layers_per_block + 1
    rules = ((r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, l: f"input_blocks.{1 + b * per + l}.1."),
             (r"^mid_block\.attentions\.0\.", lambda: "middle_block.1."),
             (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, l: f"output_blocks.{b * per + l}.1."))
    for pattern, make in rules:
        match = re.match(pattern, path)
        if match:
            return make(*map(int, match.groups())) + path[match.end():]
    raise AssertionError(f"no SGM block for {path}")


def _te_path(path: str, spelling: str) -> str:
    flat = path.removeprefix("text_model.")
    return flat if spelling == "flat" else f"text_model.{flat}"


def sd_scripts_lora(kind: str, models: dict, out: Path, *, te_spelling: str = "text_model",
                    dtype: torch.dtype = torch.float16, seed: int = 0, alphas: str = "varied") -> dict[str, str]:
    """Write an sd-scripts-style LoRA for a tiny ``sd15``/``sdxl`` pipeline; returns {kohya name: module}.

    Ranks vary per module (block-wise dims, as ``network_args`` allow); alphas too unless
    ``alphas="uniform"`` (one ``network_alpha`` for the whole file, sd-scripts' default).
    """
    gen = torch.Generator().manual_seed(seed)
    modules: list[tuple[str, str]] = []  # (kohya name, "component.path")
    unet = models["unet"]
    for path in unet_linear_targets(unet):
        named = sgm_path(path, unet.config.layers_per_block) if kind == "sdxl" else path
        modules.append(("lora_unet_" + named.replace(".", "_"), f"unet.{path}"))
    encoders = {"sd15": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
    for component, prefix in encoders[kind].items():
        for path in te_targets(models[component]):
            modules.append((f"{prefix}_" + _te_path(path, te_spelling).replace(".", "_"), f"{component}.{path}"))
    state = {}
    for i, (name, target) in enumerate(modules):
        component, path = target.split(".", 1)
        layer = models[component].get_submodule(path)
        rank, alpha = (2, 1.0) if i % 3 else (4, 3.0)
        alpha = 3.0 if alphas == "uniform" else alpha
        state[f"{name}.lora_down.weight"] = (torch.randn(rank, layer.in_features, generator=gen) * 0.3).to(dtype)
        state[f"{name}.lora_up.weight"] = (torch.randn(layer.out_features, rank, generator=gen) * 0.3).to(dtype)
        state[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    arch = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[kind]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1.0",
                "ss_output_name": f"tiny-{kind}", "ss_tag_frequency": '{"img": {"cat": 3}}',
                "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "deadbeef",
                "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.title": f"tiny {kind}"}
    save_file(state, str(out), metadata=metadata)
    return dict(modules)
