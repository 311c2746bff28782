"""A tiny SD 1.x pipeline saved as one file in the original LDM key layout (as published checkpoints are).

Written from the LDM layout itself (input/middle/output blocks, in_layers/out_layers ResBlocks); the
test checks diffusers' own ``convert_ldm_unet_checkpoint`` maps it back to the diffusers model exactly.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
       "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_name(name: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    """The LDM name of a diffusers UNet parameter."""
    per = layers_per_block + 1
    for new, old in TOP.items():
        if name.startswith(new + "."):
            return old + name[len(new):]
    rules = (
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, l: f"input_blocks.{1 + b * per + l}.0.", True),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, l: f"input_blocks.{1 + b * per + l}.1.", False),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda b: f"input_blocks.{(b + 1) * per}.0.op.", False),
        (r"^mid_block\.resnets\.(\d+)\.", lambda i: f"middle_block.{2 * i}.", True),
        (r"^mid_block\.attentions\.0\.", lambda: "middle_block.1.", False),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, l: f"output_blocks.{b * per + l}.0.", True),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, l: f"output_blocks.{b * per + l}.1.", False),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda b: f"output_blocks.{b * per + per - 1}."
                                                          f"{2 if b in up_with_attention else 1}.", False),
    )
    for pattern, make, resnet in rules:
        match = re.match(pattern, name)
        if match:
            rest = name[match.end():]
            if resnet:
                head, _, tail = rest.partition(".")
                rest = f"{RESNET[head]}.{tail}"
            return make(*map(int, match.groups())) + rest
    raise AssertionError(f"no LDM name for {name}")


def save_sd15_single_file(models: dict, out: Path) -> Path:
    """unet -> ``model.diffusion_model.*``, text encoder -> ``cond_stage_model.transformer.text_model.*``."""
    return _save(models, out, "cond_stage_model.transformer.text_model.")


def save_sdxl_single_file(models: dict, out: Path) -> Path:
    """SGM layout: text encoder 1 under ``conditioner.embedders.0.transformer.``; the second (OpenCLIP)
    encoder under ``conditioner.embedders.1.model.`` with q/k/v fused into ``in_proj_weight`` and a
    transposed ``text_projection``, as open_clip stores them."""
    out = _save(models, out, "conditioner.embedders.0.transformer.text_model.")
    state = load_file(str(out))
    state.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip_state(models["text_encoder_2"]).items()})
    save_file(state, str(out))
    return out


OPEN_CLIP_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}


def open_clip_state(model) -> dict:
    """open_clip's names for a CLIP text model (written from open_clip's layout); a CLIPTextModelWithProjection's
    projection becomes ``text_projection`` (transposed), a plain CLIPTextModel (SD 2.x) has none."""
    sd = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
          for k, v in model.state_dict().items()}
    state = {old: sd[new] for new, old in OPEN_CLIP_TOP.items()}
    if "text_projection.weight" in sd:
        state["text_projection"] = sd["text_projection.weight"].T.contiguous()
    layers = {int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        inner, outer = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{outer}attn.in_proj_{kind}"] = torch.cat([sd[f"{inner}self_attn.{p}_proj.{kind}"]
                                                               for p in "qkv"])
            for new, old in OPEN_CLIP_PARTS.items():
                state[f"{outer}{old}.{kind}"] = sd[f"{inner}{new}.{kind}"]
    return state


def _save(models: dict, out: Path, text_prefix: str) -> Path:
    unet = models["unet"]
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    state = {"model.diffusion_model." + ldm_unet_name(k, unet.config.layers_per_block, with_attention): v
             for k, v in unet.state_dict().items()}
    for key, value in models["text_encoder"].state_dict().items():
        state[text_prefix + key.removeprefix("text_model.")] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
