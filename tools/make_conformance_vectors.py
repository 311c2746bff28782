"""Regenerate spec/vectors/v1.0 (run once per format version; the files are then frozen forever).

Frozen: running it now would rewrite v1.0 with the current (1.1) writer. v1.1 vectors come from
tools/make_conformance_vectors_v11.py.

Expected ΔW values are computed in float64 from the stored tensors, independently of adapterfmt's
method code, then rounded to fp32.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapterfmt.format import Adapter, BaseWeight, Manifest, ModuleEntry, Payload, TensorRef, write_adapter  # noqa: E402
from adapterfmt.format.dtypes import dtype_name
from adapterfmt.format.fingerprint import tensor_fingerprint  # noqa: E402
from adapterfmt.methods.lora import lora_params  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "v1.0"
gen = torch.Generator().manual_seed(20261121)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


BASE = {
    "model.q_proj.weight": rnd(8, 6),
    "model.v_proj.weight": rnd(4, 6),
    "model.c_attn.weight": rnd(6, 12),  # Conv1D: stored (in, out)
    "model.embed_tokens.weight": rnd(10, 6),  # embedding: (vocab, dim)
    "model.norm.weight": rnd(6),
}


def module(adapter, target, method, shape, params, roles, layer="linear", fifo=False):
    refs = {}
    for role, tensor in roles.items():
        name = f"{target}.{role}"
        adapter.tensors[name] = tensor
        refs[role] = TensorRef(name, dtype_name(tensor.dtype), list(tensor.shape))
    base_name = f"{target}.weight"
    adapter.manifest.modules[target] = ModuleEntry(method, base_name, list(shape), params, refs, fifo, layer)
    weight = BASE[base_name]
    adapter.manifest.base.weights[base_name] = BaseWeight(list(weight.shape), dtype_name(weight.dtype),
                                                          tensor_fingerprint(weight))


def lora_delta64(a, b, scale):
    return (b.double() @ a.double()) * scale


def write(name, adapter, expected):
    adapter.manifest.created_by = "adapterfmt conformance generator"
    adapter.manifest.base.name_or_path = "adapterfmt/conformance-base"
    write_adapter(adapter, OUT / f"{name}.safetensors", overwrite=True)
    save_file({k: v.float().contiguous() for k, v in expected.items()}, str(OUT / f"{name}.expected.safetensors"))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(BASE, str(OUT / "base.safetensors"))

    # 1. LoRA with per-module rank/alpha and one rsLoRA module, F32.
    a = Adapter(Manifest())
    exp = {}
    qa, qb = rnd(3, 6), rnd(8, 3)
    module(a, "model.q_proj", "lora", (8, 6), lora_params(3, 6, False), {"lora_A": qa, "lora_B": qb})
    exp["model.q_proj"] = lora_delta64(qa, qb, 6 / 3)
    va, vb = rnd(2, 6), rnd(4, 2)
    module(a, "model.v_proj", "lora", (4, 6), lora_params(2, 5, True), {"lora_A": va, "lora_B": vb})
    exp["model.v_proj"] = lora_delta64(va, vb, 5 / math.sqrt(2))
    write("lora_rank_alpha_rslora", a, exp)

    # 2. BF16 tensors, a Conv1D (fan_in_fan_out) target and an embedding, plus a modules_to_save payload.
    a = Adapter(Manifest())
    exp = {}
    ca, cb = rnd(2, 6, dtype=torch.bfloat16), rnd(12, 2, dtype=torch.bfloat16)
    module(a, "model.c_attn", "lora", (12, 6), lora_params(2, 4, False), {"lora_A": ca, "lora_B": cb},
           layer="conv1d", fifo=True)
    exp["model.c_attn"] = lora_delta64(ca, cb, 2.0)
    ea, eb = rnd(2, 10, dtype=torch.bfloat16), rnd(6, 2, dtype=torch.bfloat16)
    module(a, "model.embed_tokens", "lora", (6, 10), lora_params(2, 2, False), {"lora_A": ea, "lora_B": eb},
           layer="embedding", fifo=True)
    exp["model.embed_tokens"] = lora_delta64(ea, eb, 1.0)
    norm = rnd(6)
    a.tensors["payload.model.norm.weight"] = norm
    a.manifest.payloads["model.norm.weight"] = Payload("modules_to_save", "model.norm.weight",
                                                       TensorRef("payload.model.norm.weight", "F32", [6]))
    write("lora_bf16_conv1d_embedding_payload", a, exp)

    # 3. DoRA: ΔW = diag(m/||V||) V - W with V = W + s·B·A (needs base.safetensors).
    a = Adapter(Manifest())
    exp = {}
    da, db = rnd(2, 6), rnd(8, 2) * 0.1
    w = BASE["model.q_proj.weight"].double()
    v = w + lora_delta64(da, db, 2.0)
    mag = (v.norm(dim=1) * (1 + 0.1 * torch.rand(8, generator=gen, dtype=torch.float64))).float()
    params = dict(lora_params(2, 4, False), magnitude_axis="out")
    module(a, "model.q_proj", "dora", (8, 6), params, {"lora_A": da, "lora_B": db, "magnitude": mag})
    exp["model.q_proj"] = (mag.double() / v.norm(dim=1)).view(-1, 1) * v - w
    write("dora", a, exp)
    print(f"wrote vectors to {OUT}")


if __name__ == "__main__":
    main()
