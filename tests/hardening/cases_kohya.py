"""Corpus rows for the kohya / A1111 / ComfyUI LoRA reader (keys, shapes, alpha, name mapping)."""
from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .corpus import Case, Env

F = r"k\.safetensors"
Q0 = "lora_transformer_model_layers_0_self_attn_q_proj"


def kohya_file(env: Env):
    from tests.formats.kohya_files import write_kohya_file
    path = env.tmp / "k.safetensors"
    write_kohya_file(env.shared.adapter, path, prefix="lora_transformer")
    return path


def kohya_edit(edit, *, drop_names=False, base=False):
    """Rewrite the tensors (and optionally drop adapterfmt's name table) of a kohya export."""
    def build(env: Env):
        path = kohya_file(env)
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        if drop_names:
            metadata.pop("adapterfmt.kohya_names")
        tensors = load_file(str(path))
        tensors = edit(tensors, metadata) or tensors
        save_file(tensors, str(path), metadata=metadata)
        return ["convert", path, env.tmp / "out.safetensors"] + (["--base", env.shared.base] if base else [])
    return build


def truncated(env: Env):
    path = kohya_file(env)
    path.write_bytes(path.read_bytes()[:-50])
    return ["convert", path, env.tmp / "out.safetensors", "--from", "kohya"]


def drop(key):
    return lambda t, m: {k: v for k, v in t.items() if k != key}


def put(key, value):
    return lambda t, m: t.update({key: value})


def rename(old, new):
    return lambda t, m: {k.replace(old, new): v for k, v in t.items()}


def names_not_json(t, m):
    m["adapterfmt.kohya_names"] = "{not json"


def tucker_loha_on_linear(t, m):
    """A complete LoHa Tucker module (hada_t1/t2, factors (r, out), (r, in)) in place of a Linear LoRA."""
    for leaf in ("lora_down.weight", "lora_up.weight"):
        t.pop(f"{Q0}.{leaf}")
    for half in ("1", "2"):
        t[f"{Q0}.hada_t{half}"] = torch.ones(4, 4, 3, 3)
        t[f"{Q0}.hada_w{half}_a"] = torch.ones(4, 64)
        t[f"{Q0}.hada_w{half}_b"] = torch.ones(4, 64)


CASES = [
    Case("kohya truncated (--from kohya)", truncated, 1,
         rf"{F}: not a valid safetensors file .*; the file is truncated or corrupt"),
    Case("kohya missing lora_up", kohya_edit(drop(f"{Q0}.lora_up.weight")), 1,
         rf"{F}: '{Q0}' lacks lora_down or lora_up; the file is incomplete"),
    Case("kohya conv-shaped lora_down", kohya_edit(put(f"{Q0}.lora_down.weight", torch.zeros(4, 64, 1, 1))), 1,
         rf"{F}: '{Q0}': lora_down \[4, 64, 1, 1\] / lora_up \[64, 4\] are not a linear low-rank pair"),
    Case("kohya name maps to no base module", kohya_edit(rename("layers_0_self_attn_q", "layers_0_self_attn_x"),
                                                         drop_names=True, base=True), 1,
         rf"{F}: 'lora_transformer_model_layers_0_self_attn_x_proj' matches no module of the base; pass the base"),
    Case("kohya names without --base or name table", kohya_edit(lambda t, m: None, drop_names=True), 2,
         rf"{F}: kohya names replace '\.' by '_', .* without the base model; pass --base"),
    Case("kohya name table not JSON", kohya_edit(names_not_json), 1,
         rf"{F}: header adapterfmt.kohya_names is not valid JSON; the file was damaged"),
    Case("kohya module mixing LyCORIS and LoRA keys", kohya_edit(put(f"{Q0}.hada_w1_a", torch.zeros(4, 4))), 1,
         rf"{F}: '{Q0}' has \['hada_w1_a', 'lora_down.weight', 'lora_up.weight'\]: not one LoHa, LoKr or LoRA "
         "module"),
    Case("LyCORIS Tucker core on a Linear layer", kohya_edit(tucker_loha_on_linear, base=True), 1,
         rf"{F}: '{Q0}': the tensors describe a conv2d weight \[64, 64, 3, 3\], the base weight is \[64, 64\]; "
         "pass the base"),
    Case("kohya alpha NaN", kohya_edit(put(f"{Q0}.alpha", torch.tensor(float("nan")))), 1,
         rf"{F}: '{Q0}': alpha nan is not a finite number"),
    Case("kohya alpha with two values", kohya_edit(put(f"{Q0}.alpha", torch.tensor([8.0, 8.0]))), 1,
         rf"{F}: '{Q0}': alpha has shape \[2\], expected a single number"),
    Case("kohya 1-d alpha reads", kohya_edit(put(f"{Q0}.alpha", torch.tensor([8.0]))), 0, r"overall lossless",
         creates=("out.safetensors",)),
]
