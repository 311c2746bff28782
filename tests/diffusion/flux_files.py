"""Flux LoRA files laid out the way sd-scripts, ai-toolkit/ComfyUI and BFL write them, for the tiny Flux
transformer of models.py (plus a tiny CLIP-L text encoder).

The layout is written from Flux's original (BFL) module structure, independently of adapterfmt:
each BFL Linear and the diffusers modules whose weights are its rows (fused q/k/v and a single
block's linear1 = q, k, v, MLP-in; the final layer's adaLN output is (shift, scale) where
diffusers' norm_out is (scale, shift)). ``reference_delta`` computes each diffusers module's ΔW
in float64 from a file's own tensors with this table: the independent reference where diffusers
itself cannot load a file.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

#: BFL module (per block, {i}) -> diffusers modules whose weights stack to it, in row order.
DOUBLE = {"img_mod.lin": ["norm1.linear"], "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
          "img_attn.proj": ["attn.to_out.0"], "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
          "txt_mod.lin": ["norm1_context.linear"],
          "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "txt_attn.proj": ["attn.to_add_out"], "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"]}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
          "modulation.lin": ["norm.linear"]}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out",
       "final_layer.adaLN_modulation.1": "norm_out.linear"}
SWAPPED = {"final_layer.adaLN_modulation.1"}  # (shift, scale) in BFL, (scale, shift) in diffusers
TE_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def bfl_modules(transformer, *, blocks=True, single=True, top=False) -> dict[str, list[str]]:
    """{BFL module: [diffusers modules]} of the tiny transformer (sd-scripts trains the blocks; ``top`` adds
    img_in/txt_in/time_in/vector_in/final_layer, as its ``train_t5xxl``-free full-model options do)."""
    out = {}
    if blocks:
        for i in range(len(transformer.transformer_blocks)):
            out |= {f"double_blocks.{i}.{k}": [f"transformer_blocks.{i}.{m}" for m in v] for k, v in DOUBLE.items()}
    if single:
        for i in range(len(transformer.single_transformer_blocks)):
            out |= {f"single_blocks.{i}.{k}": [f"single_transformer_blocks.{i}.{m}" for m in v] for k, v in SINGLE.items()}
    if top:
        out |= {k: [v] for k, v in TOP.items()}
    return out


def _shape(transformer, modules: list[str]) -> tuple[int, int]:
    layers = [transformer.get_submodule(m) for m in modules]
    return sum(layer.out_features for layer in layers), layers[0].in_features


def te_modules(text_encoder) -> list[str]:
    return [n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TE_TARGETS)]


def flux_lora_file(out, transformer, text_encoder=None, *, style: str = "kohya", dtype=torch.bfloat16,
                   seed: int = 0, alpha: bool = True, **which) -> dict[str, tuple[list[str], str | None]]:
    """Write a Flux LoRA; returns {file name: ([diffusers modules], component)}.

    ``style``: ``kohya`` (sd-scripts: lora_unet_<underscored>, lora_down/lora_up, 0-d alpha, ss_* header),
    ``comfyui`` (diffusion_model.<dotted>, lora_down/lora_up, alpha), ``ai-toolkit`` (diffusion_model.<dotted>,
    lora_A/lora_B, no alpha), ``bfl`` (bare dotted names, lora_A/lora_B, no alpha).
    """
    gen = torch.Generator().manual_seed(seed)
    prefix = {"kohya": "lora_unet_", "comfyui": "diffusion_model.", "ai-toolkit": "diffusion_model.", "bfl": ""}[style]
    down, up = ("lora_down", "lora_up") if style in ("kohya", "comfyui") else ("lora_A", "lora_B")
    names = {}
    for bfl, modules in bfl_modules(transformer, **which).items():
        name = prefix + (bfl.replace(".", "_") if style == "kohya" else bfl)
        names[name] = (modules, "transformer")
    if text_encoder is not None:
        te_prefix = {"kohya": "lora_te1_", "comfyui": "text_encoders.clip_l.transformer."}.get(style)
        for path in te_modules(text_encoder):
            full = f"text_model.{path.removeprefix('text_model.')}"
            names[te_prefix + (full.replace(".", "_") if style == "kohya" else full)] = ([path], "text_encoder")
    state = {}
    for i, (name, (modules, component)) in enumerate(names.items()):
        model = transformer if component == "transformer" else text_encoder
        rows, cols = _shape(model, modules)
        rank = (4, 2, 3)[i % 3]
        state[f"{name}.{down}.weight"] = (torch.randn(rank, cols, generator=gen) * 0.2).to(dtype)
        state[f"{name}.{up}.weight"] = (torch.randn(rows, rank, generator=gen) * 0.2).to(dtype)
        if alpha:
            state[f"{name}.alpha"] = torch.tensor(float((8, 1, 3)[i % 3])).to(dtype)
    metadata = {"kohya": {"ss_network_module": "networks.lora_flux", "ss_network_dim": "4", "ss_network_alpha": "8",
                          "modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "flux1",
                          "sshs_model_hash": "0" * 64, "training_comment": "tiny"},
                "ai-toolkit": {"format": "pt", "software": '{"name": "ai-toolkit", "version": "0.1.0"}',
                               "name": "tiny_flux_lora"}}.get(style, {})
    save_file(state, str(out), metadata=metadata)
    return names


def reference_delta(path, names: dict) -> dict[str, torch.Tensor]:
    """{component.module: float64 ΔW} from the file's own tensors and this file's BFL table."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    out = {}
    for name, (modules, component) in names.items():
        a = (state.get(f"{name}.lora_down.weight", state.get(f"{name}.lora_A.weight"))).double()
        b = (state.get(f"{name}.lora_up.weight", state.get(f"{name}.lora_B.weight"))).double()
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else a.shape[0]
        delta = b @ a * (alpha / a.shape[0])
        if any(name.endswith(s) or name.endswith(s.replace(".", "_")) for s in SWAPPED):
            shift, scale = delta.chunk(2)
            delta = torch.cat([scale, shift])
        start = 0
        for module in modules:
            rows = delta.shape[0] // len(modules) if len(modules) == 3 else None
            if len(modules) == 4:  # q, k, v: inner dim each; the rest is the MLP input
                rows = [delta.shape[1]] * 3 + [delta.shape[0] - 3 * delta.shape[1]]
                rows = rows[modules.index(module)]
            rows = rows or delta.shape[0]
            out[f"{component}.{module}"] = delta[start:start + rows]
            start += rows
    return out
