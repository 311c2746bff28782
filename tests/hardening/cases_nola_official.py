"""Corpus rows for the official NOLA readers (ViT safetensors, GPT-2 pickle, LLaMA directory)."""
from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

from .cases_peft import MARKER, _Plant, no_marker
from .corpus import Case, Env, run_subprocess

DIM, HIDDEN, RANK, KA, KB = 8, 32, 2, 4, 3
GPU = ["--cuda-sm-count", "1", "--cuda-threads-per-sm", "256"]


# ---------------------------------------------------------------- ViT (safetensors)
def vit_state(checksum_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """One block as vit/NOLA.py saves it; the fc{1,2}_A checksum is the official A[0, :10, 0]."""
    gen = torch.Generator().manual_seed(5)
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fc1 = torch.zeros(KA, DIM, RANK)
        torch.nn.init.kaiming_uniform_(fc1, a=math.sqrt(5))
    for fc in ("fc1", "fc2"):
        state[f"{fc}_alpha_000"] = torch.randn(KA, generator=gen)
        state[f"{fc}_beta_000"] = torch.randn(KB, generator=gen)
    state["fc1_A_000"] = fc1[0, :10, 0].clone() + checksum_offset
    state[f"fc_{DIM}in_10out"] = torch.randn(10, DIM, generator=gen)
    return state


def vit(state_edit=None, rank: str | None = str(RANK)):
    def build(env: Env):
        state = vit_state(1e-3 if state_edit == "checksum" else 0.0)
        if callable(state_edit):
            state_edit(state)
        path = env.tmp / "vit.safetensors"
        save_file(state, str(path))
        return ["convert", path, env.tmp / "out.safetensors"] + (["--nola-rank", rank] if rank else [])
    return build


# ---------------------------------------------------------------- GPT-2 (torch pickle)
def gpt2_state(seed_a: int = 11) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    p = "module.transformer.h.0.attn.nola_query"
    return {f"{p}.lora_A.weight": torch.randn(4, 16, generator=gen) * 0.02,
            f"{p}.lora_A.seed": torch.tensor([seed_a]), f"{p}.lora_A.coefficients": torch.randn(6, generator=gen),
            f"{p}.lora_B.weight": torch.randn(16, 4, generator=gen) * 0.02,
            f"{p}.lora_B.seed": torch.tensor([12]), f"{p}.lora_B.coefficients": torch.randn(5, generator=gen)}


def gpt2(*flags: str, seed_a: int = 11):
    def build(env: Env):
        path = env.tmp / "model.100.pt"
        torch.save({"model_state_dict": gpt2_state(seed_a)}, path)
        return ["convert", path, env.tmp / "out.safetensors", *flags]
    return build


def gpt2_malicious(env: Env):
    path = env.tmp / "model.100.pt"
    torch.save({"h.0.attn.nola_query.lora_A.weight": _Plant(str(env.tmp / MARKER))}, path)
    return ["convert", path, env.tmp / "out.safetensors", "--allow-pickle", "--nola-alpha", "8", *GPU]


# ---------------------------------------------------------------- LLaMA (PEFT-like directory)
def llama(config_edit=None, state_edit=None):
    def build(env: Env):
        path = env.tmp / "nola-llama"
        path.mkdir()
        config = {"use_nola": True, "r": 4, "lora_alpha": 8, "nola_num_basis": 6,
                  "base_model_name_or_path": "tiny", "target_modules": ["q_proj"]}
        (config_edit or (lambda c: None))(config)
        (path / "adapter_config.json").write_text(json.dumps(config))
        old, new = "module.transformer.h.0.attn.nola_query", "base_model.model.model.layers.0.self_attn.q_proj"
        state = {k.replace(old, new): v for k, v in gpt2_state().items()}
        (state_edit or (lambda s: None))(state)
        save_file(state, str(path / "adapter_model.safetensors"))
        return ["convert", path, env.tmp / "out.safetensors", *GPU]
    return build


def pop_suffix(suffix):
    return lambda s: s.pop(next(k for k in s if k.endswith(suffix)))


CASES = [
    Case("nola vit without --nola-rank", vit(rank=None), 2,
         r"vit\.safetensors: official NOLA ViT checkpoints do not store the rank; pass --nola-rank R"),
    Case("nola vit checksum mismatch", vit("checksum"), 1,
         r"vit\.safetensors: blocks\.0\.mlp\.fc1: the regenerated basis does not match the stored checksum"),
    Case("nola vit layer without beta", vit(lambda s: s.pop("fc2_beta_000")), 1,
         r"vit\.safetensors: fc2 of block 0 lacks alpha or beta; the checkpoint is incomplete"),
    Case("nola gpt2 pickle without --allow-pickle", gpt2("--nola-alpha", "8", *GPU), 2,
         r"model\.100\.pt: an official NOLA GPT-2 checkpoint is a pickle; .*pass --allow-pickle"),
    Case("nola gpt2 malicious pickle with --allow-pickle", gpt2_malicious, 1,
         r"model\.100\.pt: refused by the safe unpickler \(UnpicklingError\)", check=no_marker,
         runner=run_subprocess),
    Case("nola gpt2 without --nola-alpha", gpt2("--allow-pickle", *GPU), 2,
         r"model\.100\.pt: official NOLA GPT-2 checkpoints store no alpha; pass --nola-alpha"),
    Case("nola gpt2 without CUDA geometry", gpt2("--allow-pickle", "--nola-alpha", "8"), 2,
         r"model\.100\.pt: the official NOLA bases were drawn by torch's CUDA generator.*; pass --cuda-sm-count"),
    Case("nola gpt2 --nola-rank disagrees", gpt2("--allow-pickle", "--nola-alpha", "8", "--nola-rank", "2", *GPU), 2,
         r"model\.100\.pt: --nola-rank 2 but the checkpoint has rank 4"),
    Case("nola gpt2 negative seed", gpt2("--allow-pickle", "--nola-alpha", "8", *GPU, seed_a=-3), 1,
         r"model\.100\.pt: transformer\.h\.0\.attn\.c_attn\.q: negative seed -3; the checkpoint is damaged"),
    Case("nola llama config without r", llama(config_edit=lambda c: c.pop("r")), 1,
         r"adapter_config\.json: config field r must be a positive integer, got None; the config is damaged"),
    Case("nola llama config lora_alpha is a string", llama(config_edit=lambda c: c.update(lora_alpha="8")), 1,
         r"adapter_config\.json: config field lora_alpha must be a number, got '8'; the config is damaged"),
    Case("nola llama missing lora_B.weight", llama(state_edit=pop_suffix("lora_B.weight")), 1,
         r"nola-llama: model\.layers\.0\.self_attn\.q_proj: lora_B has \['coefficients', 'seed'\], needs weight"),
    Case("nola llama nola_num_basis disagrees", llama(config_edit=lambda c: c.update(nola_num_basis=7)), 1,
         r"nola-llama: .*q_proj: 6 coefficients but nola_num_basis is 7; the config does not match the weights"),
]
