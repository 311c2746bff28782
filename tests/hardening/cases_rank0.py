"""Corpus rows: empty (rank 0) and malformed factors in the LLM readers (PEFT, kohya, LyCORIS).

Each was an internal error (alpha / 0, or unpacking a 1-D shape) before it was refused by name.
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .corpus import Case, Env

Q0 = "model_layers_0_self_attn_q_proj"


def peft_rank0(env: Env):
    src = env.copy(env.shared.peft, "peft")
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    a = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[a], tensors[a.replace("lora_A", "lora_B")] = torch.zeros(0, 64), torch.zeros(64, 0)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads((src / "adapter_config.json").read_text())
    config["r"] = 0
    (src / "adapter_config.json").write_text(json.dumps(config))
    return ["convert", src, env.tmp / "out.safetensors"]


def rewrite(path, edit):
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_rank0(env: Env):
    from tests.formats.kohya_files import write_kohya_file
    path = env.tmp / "k.safetensors"
    write_kohya_file(env.shared.adapter, path, prefix="lora_transformer")
    name = f"lora_transformer_{Q0}"
    rewrite(path, lambda t: t.update({f"{name}.lora_down.weight": torch.zeros(0, 64),
                                      f"{name}.lora_up.weight": torch.zeros(64, 0)}))
    return ["convert", path, env.tmp / "out.safetensors"]


def lycoris_edit(leaves):
    def build(env: Env):
        import adapterfmt
        path = env.tmp / "l.safetensors"
        adapterfmt.convert(env.shared.adapter, path, to="lycoris")
        name = f"lycoris_{Q0}"

        def edit(t):
            for key in [k for k in t if k.startswith(name + ".") and not k.endswith(".alpha")]:
                t.pop(key)
            t.update({f"{name}.{leaf}": value for leaf, value in leaves.items()})
        rewrite(path, edit)
        return ["convert", path, env.tmp / "out.safetensors", "--from", "lycoris"]
    return build


CASES = [
    Case("peft LoRA of rank 0", peft_rank0, 1,
         r"peft: module 'model\.layers\.0\.self_attn\.q_proj': lora_A \[0, 64\] and lora_B \[64, 0\] have an empty "
         r"dimension \(rank 0\); the adapter is damaged"),
    Case("kohya LLM LoRA of rank 0", kohya_rank0, 1,
         rf"k\.safetensors: 'lora_transformer_{Q0}': lora_down \[0, 64\] / lora_up \[64, 0\] are not a linear low-rank "
         "pair"),
    Case("lycoris LoRA of rank 0", lycoris_edit({"lora_down.weight": torch.zeros(0, 64),
                                                 "lora_up.weight": torch.zeros(64, 0)}), 1,
         rf"l\.safetensors: 'lycoris_{Q0}': lora_down\.weight float32 \[0, 64\] has an empty dimension \(rank 0\?\)"),
    Case("lycoris LoKr half that is 1-D", lycoris_edit({"lokr_w1": torch.ones(8), "lokr_w2": torch.ones(8, 8)}), 1,
         rf"l\.safetensors: 'lycoris_{Q0}': lokr_w1 float32 \[8\] is neither 2-D \(Linear\) nor 4-D \(Conv2d\)"),
]
