"""Corpus rows for the MLX-LM adapter directory reader (config, transposed shapes, rank)."""
from __future__ import annotations

import json

from safetensors.torch import load_file, save_file

from .corpus import Case, Env

CFG = r"mlx/adapter_config\.json"
W = r"mlx/adapters\.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"


def mlx_dir(env: Env):
    from adapterfmt.ops.convert import convert
    path = env.tmp / "mlx"
    convert(env.shared.adapter, path, to="mlx")
    return path


def config_edit(edit=None, text=None):
    def build(env: Env):
        path = mlx_dir(env)
        cfg = path / "adapter_config.json"
        if text is not None:
            cfg.write_text(text)
        else:
            config = json.loads(cfg.read_text())
            edit(config)
            cfg.write_text(json.dumps(config))
        return ["convert", path, env.tmp / "out.safetensors"]
    return build


def weights_edit(edit):
    def build(env: Env):
        path = mlx_dir(env)
        weights = path / "adapters.safetensors"
        tensors = load_file(str(weights))
        edit(tensors)
        save_file(tensors, str(weights), metadata={"format": "mlx"})
        return ["convert", path, env.tmp / "out.safetensors"]
    return build


def truncated(env: Env):
    path = mlx_dir(env)
    weights = path / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    return ["convert", path, env.tmp / "out.safetensors"]


def peft_orientation(tensors):
    for role in ("lora_a", "lora_b"):
        tensors[f"{Q0}.{role}"] = tensors[f"{Q0}.{role}"].t().contiguous()


def set_params(**values):
    return lambda c: c["lora_parameters"].update(values)


CASES = [
    Case("mlx config not JSON", config_edit(text="{rank: 4"), 1, rf"{CFG}: not valid JSON .*; the config is damaged"),
    Case("mlx config lora_parameters missing", config_edit(lambda c: c.pop("lora_parameters")), 1,
         rf"{CFG}: fine_tune_type 'lora' / lora_parameters / num_layers: not an MLX-LM LoRA"),
    Case("mlx config fine_tune_type full", config_edit(lambda c: c.update(fine_tune_type="full")), 1,
         rf"{CFG}: fine_tune_type 'full' .*; full fine-tunes are models, not adapters"),
    Case("mlx config scale is a string", config_edit(set_params(scale="two")), 1,
         rf"{CFG}: lora_parameters needs numeric rank and scale; the config is damaged"),
    Case("mlx config rank disagrees with weights", config_edit(set_params(rank=8)), 1,
         rf"{W}: module '{Q0}': lora_a \[64, 4\], lora_b \[4, 64\] do not fit rank 8"),
    Case("mlx config adapterfmt field not an object", config_edit(lambda c: c.update(adapterfmt=[1])), 1,
         rf"{CFG}: field adapterfmt must be an object"),
    Case("mlx weights in PEFT orientation", weights_edit(peft_orientation), 1,
         rf"{W}: module '{Q0}': lora_a \[4, 64\], lora_b \[64, 4\] do not fit rank 4 \(in, r\)/\(r, out\)"),
    Case("mlx weights missing lora_b", weights_edit(lambda t: t.pop(f"{Q0}.lora_b")), 1,
         rf"{W}: module '{Q0}' has \['lora_a'\], expected \['lora_a', 'lora_b'\]"),
    Case("mlx weights truncated", truncated, 1, rf"{W}: not a valid safetensors file .*; the file is truncated"),
    Case("mlx config model is a number", config_edit(lambda c: c.update(model=7)), 1,
         rf"{CFG}: field model must be a string, got 7; the config is damaged"),
]
