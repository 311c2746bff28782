"""The diffusion demo's inputs, made locally: a tiny SD 1.x pipeline, an sd-scripts-style kohya LoRA for it,
and the same pipeline as one single-file checkpoint in the original LDM key layout.

Nothing is downloaded: the UNet and the CLIP text encoder are built from configs with diffusers and
transformers (core dependencies), the LoRA file is written with safetensors the way kohya's sd-scripts
lays it out (``lora_unet_*`` / ``lora_te_*`` names, ``lora_down``/``lora_up``/``alpha``, fp16, ``ss_*``
metadata), so the demo needs neither sd-scripts nor PEFT.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

#: UNet module paths the demo's kohya file adapts with LoCon (3x3 convolutions inside ResnetBlock2D).
LOCON_CONVS = ("down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv2")
#: Text-encoder layers sd-scripts targets (CLIPAttention and CLIPMLP Linear layers).
TE_LEAVES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def tiny_sd15(path: Path) -> dict[str, torch.nn.Module]:
    """Build and save a tiny SD 1.x pipeline (UNet + CLIP text encoder, ``model_index.json``); returns the models.

    Example:
        >>> models = tiny_sd15(Path("pipe"))  # doctest: +SKIP
        >>> sorted(models)  # doctest: +SKIP
        ['text_encoder', 'unet']
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    models = {"unet": unet.eval(), "text_encoder": text.eval()}
    with torch.no_grad():  # zero-initialised layers (proj_out, conv_out) get values too
        for model in models.values():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    path.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        model.save_pretrained(str(path / name), safe_serialization=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "scheduler": [None, None], "tokenizer": [None, None], "vae": [None, None]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return models


def kohya_targets(models: dict) -> dict[str, str]:
    """{kohya name: "component.module path"} of what sd-scripts' LoRA (``conv_dim`` set) adapts here:
    the UNet's transformer blocks (Linear, and the 1x1 ``proj_in``/``proj_out``), the LoCon 3x3 convs, and
    the text encoder's attention and MLP. Text-encoder names carry ``text_model_`` as sd-scripts writes them.
    """
    unet, text = models["unet"], models["text_encoder"]
    paths = [n for n, m in unet.named_modules() if ".attentions." in n and isinstance(m, (torch.nn.Linear,
                                                                                         torch.nn.Conv2d))]
    targets = {"lora_unet_" + p.replace(".", "_"): f"unet.{p}" for p in paths + list(LOCON_CONVS)}
    for path, module in text.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(TE_LEAVES):
            flat = path.removeprefix("text_model.")
            targets["lora_te_text_model_" + flat.replace(".", "_")] = f"text_encoder.{path}"
    return targets


def _rank_alpha(path: str, layer: torch.nn.Module) -> tuple[int, float]:
    """Block-wise dims as sd-scripts' ``network_args`` allow: rank 4 / alpha 2, cross-attention (``attn2``)
    rank 2 / alpha 1, LoCon 3x3 convs (``conv_dim``/``conv_alpha``) rank 2 / alpha 1."""
    small = ".attn2." in path or (isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1))
    return (2, 1.0) if small else (4, 2.0)


def write_kohya_lora(models: dict, out: Path, *, seed: int = 7) -> dict[str, str]:
    """An sd-scripts-style LoRA/LoCon file (fp16; rank and alpha per block: :func:`_rank_alpha`).

    LoCon: ``lora_down`` is the layer's own kernel (r, in, kh, kw), ``lora_up`` a 1x1 conv (out, r, 1, 1).
    Returns {kohya name: "component.module path"}.
    """
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    state = {}
    targets = kohya_targets(models)
    for name, target in targets.items():
        component, path = target.split(".", 1)
        layer = models[component].get_submodule(path)
        conv = isinstance(layer, torch.nn.Conv2d)
        rank, alpha = _rank_alpha(path, layer)
        weight = layer.weight
        down_shape = (rank, *weight.shape[1:]) if conv else (rank, weight.shape[1])
        up_shape = (weight.shape[0], rank, 1, 1) if conv else (weight.shape[0], rank)
        state[f"{name}.lora_down.weight"] = (torch.randn(down_shape, generator=gen) * 0.2).half()
        state[f"{name}.lora_up.weight"] = (torch.randn(up_shape, generator=gen) * 0.2).half()
        state[f"{name}.alpha"] = torch.tensor(alpha).half()
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"}),
                "ss_output_name": "tiny-sd15-locon", "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "adapterfmt demo"}
    save_file(state, str(out), metadata=metadata)
    return targets


def kohya_delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of one kohya LoRA/LoCon module in float64, from its own definition: alpha/r · up @ down."""
    down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (state[f"{name}.alpha"].double() / rank * delta).reshape(up.shape[0], *down.shape[1:])


# --- the LDM single-file layout (``model.diffusion_model.*``, ``cond_stage_model.transformer.*``) ---------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _ldm_rules(per: int, up_with_attention: set[int]):
    """(pattern, LDM block prefix maker, is a ResnetBlock) for the diffusers UNet block paths."""
    return (
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, i: f"input_blocks.{1 + b * per + i}.0.", True),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, i: f"input_blocks.{1 + b * per + i}.1.", False),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda b: f"input_blocks.{(b + 1) * per}.0.op.", False),
        (r"^mid_block\.resnets\.(\d+)\.", lambda i: f"middle_block.{2 * i}.", True),
        (r"^mid_block\.attentions\.0\.", lambda: "middle_block.1.", False),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, i: f"output_blocks.{b * per + i}.0.", True),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, i: f"output_blocks.{b * per + i}.1.", False),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda b: f"output_blocks.{b * per + per - 1}.{2 if b in up_with_attention else 1}.", False))


def ldm_unet_name(name: str, unet_config) -> str:
    """The original LDM name of a diffusers UNet parameter (SD 1.x layout).

    Example:
        >>> ldm_unet_name("down_blocks.0.resnets.0.conv1.weight", unet.config)  # doctest: +SKIP
        'input_blocks.1.0.in_layers.2.weight'
    """
    for new, old in _TOP.items():
        if name.startswith(new + "."):
            return old + name[len(new):]
    up_with_attention = {i for i, t in enumerate(unet_config.up_block_types) if "CrossAttn" in t}
    for pattern, make, resnet in _ldm_rules(unet_config.layers_per_block + 1, up_with_attention):
        match = re.match(pattern, name)
        if match:
            rest = name[match.end():]
            if resnet:
                head, _, tail = rest.partition(".")
                rest = f"{_RESNET[head]}.{tail}"
            return make(*map(int, match.groups())) + rest
    raise KeyError(name)


def save_single_file(models: dict, out: Path) -> Path:
    """The pipeline as one SD 1.x checkpoint file in the LDM layout (as published ``.safetensors`` are)."""
    from safetensors.torch import save_file
    unet = models["unet"]
    state = {"model.diffusion_model." + ldm_unet_name(k, unet.config): v for k, v in unet.state_dict().items()}
    for key, value in models["text_encoder"].state_dict().items():
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={"modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "adapterfmt demo"})
    return out


def diffusers_view_of_single_file(path: Path, unet_config) -> dict[str, dict[str, torch.Tensor]]:
    """A single-file checkpoint as diffusers reads it (its own conversion functions), per component."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint
    from safetensors.torch import load_file
    state = load_file(str(path))
    text = convert_ldm_clip_checkpoint(state)
    return {"unet": convert_ldm_unet_checkpoint(state, {"layers_per_block": unet_config.layers_per_block}),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in text.items()}}
