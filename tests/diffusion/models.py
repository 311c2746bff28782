"""Tiny diffusion models built from configs (no downloads): SD 1.x, SDXL-shaped and Flux-shaped.

Each builder returns the torch modules, seeded so two calls give the same weights; the ``save_*``
helpers write them the way diffusers and transformers do (``save_pretrained``), as single
component directories and as pipeline directories (``model_index.json`` + one folder per component).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)


def _clip_config(hidden: int, projection: int = 8):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():  # zero-initialised layers (e.g. proj_out, conv_out) get values too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def sd15_unet():
    """A tiny UNet2DConditionModel with SD 1.x's layout (conv proj_in/proj_out, cross-attention 16)."""
    from diffusers import UNet2DConditionModel
    return _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4), 1)


def clip_text(hidden: int = 16, seed: int = 2):
    """A tiny transformers CLIPTextModel."""
    from transformers import CLIPTextModel
    return _seeded(lambda: CLIPTextModel(_clip_config(hidden)), seed)


def clip_text_with_projection(hidden: int = 8, seed: int = 3):
    """A tiny CLIPTextModelWithProjection (SDXL's second text encoder)."""
    from transformers import CLIPTextModelWithProjection
    return _seeded(lambda: CLIPTextModelWithProjection(_clip_config(hidden)), seed)


def sdxl_unet():
    """A tiny UNet2DConditionModel with SDXL's layout (linear proj_in, text_time add-embedding,
    layers_per_block 2, so the original SGM block numbering differs from diffusers')."""
    from diffusers import UNet2DConditionModel
    return _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4), 4)


def flux_transformer():
    """A tiny FluxTransformer2DModel (one double and one single block)."""
    from diffusers import FluxTransformer2DModel
    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4)), 5)


#: pipeline kind -> (pipeline class name, {component: (library, class, builder)})
PIPELINES = {
    "sd15": ("StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", sd15_unet),
        "text_encoder": ("transformers", "CLIPTextModel", lambda: clip_text(16, 2))}),
    "sdxl": ("StableDiffusionXLPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", sdxl_unet),
        "text_encoder": ("transformers", "CLIPTextModel", lambda: clip_text(8, 6)),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", lambda: clip_text_with_projection(8, 7))}),
    "flux": ("FluxPipeline", {
        "transformer": ("diffusers", "FluxTransformer2DModel", flux_transformer)}),
}


def build_components(kind: str) -> dict:
    """{component name: model} for a pipeline kind (``sd15``, ``sdxl``, ``flux``).

    Example:
        >>> sorted(build_components("sdxl"))
        ['text_encoder', 'text_encoder_2', 'unet']
    """
    return {name: build() for name, (_, _, build) in PIPELINES[kind][1].items()}


def save_component(model, path: Path, max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` as safetensors (sharded when ``max_shard_size`` is given)."""
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


def save_pipeline(kind: str, path: Path, components: dict | None = None) -> Path:
    """A diffusers pipeline directory: ``model_index.json`` plus one saved folder per component.

    Example:
        >>> save_pipeline("sd15", tmp_path / "pipe")  # doctest: +SKIP
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipeline_class, spec = PIPELINES[kind]
    components = components or build_components(kind)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    for name, (library, cls, _) in spec.items():
        save_component(components[name], path / name)
        index[name] = [library, cls]
    for absent in ("scheduler", "tokenizer", "vae"):
        index[absent] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
