"""The LLM demo's inputs, made locally: a tiny random Llama and adapters written in PEFT's own file layout
(``adapter_config.json`` + ``adapter_model.safetensors``) without PEFT installed, plus a NOLA adapter
built through our API.

The PEFT-style writers lay the files out as PEFT's ``save_pretrained`` does (``base_model.model.<module>.<leaf>``
keys, the config fields PEFT writes); the tensors are random stand-ins for trained values.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
LOHA_TARGETS = ("q_proj", "o_proj", "up_proj")
#: IA³ on attention outputs (output axis) and on down_proj (a feed-forward module: input axis).
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


def tiny_base(path: Path) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, hidden 64), saved with transformers.

    Example:
        >>> tiny_base(Path("base-model"))  # doctest: +SKIP
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _targets(base: Path, suffixes: tuple[str, ...]):
    """(module path, weight name, (out, in)) of the base's Linear weights whose module ends in a suffix."""
    from ..checkpoint import BaseCheckpoint
    ckpt = BaseCheckpoint(base)
    for name in ckpt.names():
        module = name.removesuffix(".weight")
        if any(module.endswith("." + s) for s in suffixes):
            yield module, name, tuple(ckpt.shape(name))


def _save_peft(out: Path, config: dict, tensors: dict[str, torch.Tensor], base: Path) -> Path:
    config = {**config, "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "inference_mode": True,
              "revision": None, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def peft_lora(base: Path, out: Path, *, use_dora: bool, use_rslora: bool, seed: int) -> Path:
    """A PEFT LoRA/DoRA/rsLoRA directory (rank 4, alpha 8; down_proj rank 2, alpha 4 through the patterns)."""
    from ..checkpoint import BaseCheckpoint
    ckpt = BaseCheckpoint(base)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, name, (out_f, in_f) in _targets(base, LORA_TARGETS):
        rank = 2 if module.endswith("down_proj") else 4
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
        if use_dora:
            row = ckpt.get(name).float().norm(dim=1)
            tensors[f"{prefix}.lora_magnitude_vector"] = row * (1 + 0.05 * torch.rand(out_f, generator=gen))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": use_rslora, "use_dora": use_dora,
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 4}, "target_modules": list(LORA_TARGETS),
              "fan_in_fan_out": False}
    return _save_peft(out, config, tensors, base)


def peft_loha(base: Path, out: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 11) -> Path:
    """A PEFT LoHa directory: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``;
    ΔW = alpha/r · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, _, (out_f, in_f) in _targets(base, LOHA_TARGETS):
        for half in ("w1", "w2"):
            tensors[f"base_model.model.{module}.hada_{half}_a"] = torch.randn(out_f, rank, generator=gen) * 0.1
            tensors[f"base_model.model.{module}.hada_{half}_b"] = torch.randn(rank, in_f, generator=gen) * 0.1
    config = {"peft_type": "LOHA", "r": rank, "alpha": alpha, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": list(LOHA_TARGETS), "use_effective_conv2d": False, "rank_dropout": 0.0,
              "module_dropout": 0.0, "init_weights": True}
    return _save_peft(out, config, tensors, base)


def peft_ia3(base: Path, out: Path, *, seed: int = 12) -> Path:
    """A PEFT IA³ directory: ``ia3_l`` is (out, 1) on attention outputs, (1, in) on feed-forward modules;
    the merged weight is W · l along that axis."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, _, (out_f, in_f) in _targets(base, IA3_TARGETS):
        feedforward = module.endswith(IA3_FEEDFORWARD)
        shape = (1, in_f) if feedforward else (out_f, 1)
        tensors[f"base_model.model.{module}.ia3_l"] = 1 + 0.2 * torch.randn(shape, generator=gen)
    config = {"peft_type": "IA3", "target_modules": list(IA3_TARGETS), "feedforward_modules": list(IA3_FEEDFORWARD),
              "fan_in_fan_out": False, "init_ia3_weights": True}
    return _save_peft(out, config, tensors, base)


def peft_delta(peft_dir: Path, module: str, weight: torch.Tensor) -> torch.Tensor:
    """The merged weight PEFT's definition gives for one module of a LoHa or IA³ directory, in float64
    (written from the method papers' formulas, independent of adapterfmt's method code)."""
    from safetensors.torch import load_file
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    state = {k.removeprefix(f"base_model.model.{module}."): v.double()
             for k, v in load_file(str(peft_dir / "adapter_model.safetensors")).items()
             if k.startswith(f"base_model.model.{module}.")}
    w = weight.double()
    if config["peft_type"] == "IA3":
        return w * state["ia3_l"] - w  # (out, 1) scales rows, (1, in) scales columns
    scale = config["alpha"] / config["r"]
    return scale * (state["hada_w1_a"] @ state["hada_w1_b"]) * (state["hada_w2_a"] @ state["hada_w2_b"])


def make_nola(path: Path, base: Path) -> Path:
    """A NOLA adapter on q/v: per side a seed and 32 coefficients (what NOLA trains)."""
    from ..checkpoint import BaseCheckpoint
    from ..engine.base import bind_base
    from ..format import Adapter, BaseWeight, Manifest
    from ..methods import write_checked_adapter
    from ..methods.nola import derive_seed, nola_module
    ckpt = BaseCheckpoint(base)
    gen = torch.Generator().manual_seed(3)
    manifest, tensors = Manifest(), {}
    for target, name, (out_f, in_f) in _targets(base, ("q_proj", "v_proj")):
        coefs = {"coef_A": torch.randn(32, generator=gen) * 0.5, "coef_B": torch.randn(32, generator=gen) * 0.05}
        sides = {side: {"seed": derive_seed(2026, target, side), "num_basis": 32} for side in ("A", "B")}
        entry, module_tensors = nola_module(target, name, [out_f, in_f], 4, 2.0, sides, coefs)
        manifest.modules[target] = entry
        tensors.update({entry.tensors[role].name: t for role, t in module_tensors.items()})
        manifest.base.weights[name] = BaseWeight(shape=[out_f, in_f])
    adapter = Adapter(manifest, tensors)
    bind_base(adapter, ckpt)
    write_checked_adapter(adapter, path, overwrite=True)
    return path
