"""Shared builders for the engine tests: adapters from real PEFT, an in-memory reference merge."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterfmt.ops.convert import convert
from adapterfmt.format import Adapter, Manifest, ModuleEntry, TensorRef
from adapterfmt.methods import get_method
from adapterfmt.methods.descriptor import Method
from adapterfmt.methods.lora import lora_params
from tests.helpers import make_peft_adapter

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_to_native(base: Path, tmp: Path, name: str, **lora_kwargs) -> tuple[Path, Path]:
    """A real PEFT adapter for ``base`` and its adapterfmt conversion (with base fingerprints)."""
    peft_dir = make_peft_adapter(base, tmp / f"{name}-peft", **lora_kwargs)
    native = tmp / f"{name}.safetensors"
    convert(peft_dir, native, base=base)
    return peft_dir, native


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def reference_merge(base: Path, adapters: list[tuple[Adapter, float]]) -> dict[str, torch.Tensor]:
    """The simple in-memory merge: whole state dict, W32 + Σ w·ΔW (or method.merged), rounded once."""
    state = load_dir(base)
    touched: dict[str, list] = {}
    for adapter, weight in adapters:
        for target, entry in adapter.manifest.modules.items():
            touched.setdefault(entry.base_weight, []).append((adapter, weight, target, entry))
    for name, updates in touched.items():
        stored = state[name]
        fan = updates[0][3].fan_in_fan_out
        canon = (stored.t() if fan else stored).float()
        adapter, weight, target, entry = updates[0]
        method = get_method(entry.method)
        if len(updates) == 1 and weight == 1.0 and type(method).merged is not Method.merged:
            merged = method.merged(entry, adapter.module_tensors(target), canon.clone())
        else:
            total = sum(w * get_method(e.method).delta(e, a.module_tensors(t), canon.clone())
                        for a, w, t, e in updates)
            merged = canon + total
        state[name] = (merged.t() if fan else merged).to(stored.dtype).contiguous()
    return state


def synthetic_lora(weights: dict[str, torch.Tensor], rank: int, rel_norm: float, seed: int = 0) -> Adapter:
    """A LoRA adapter on every 2-D tensor with ‖ΔW‖/‖W‖ = ``rel_norm`` (fp32 factors)."""
    gen = torch.Generator().manual_seed(seed)
    manifest, tensors = Manifest(), {}
    for name, weight in weights.items():
        out_f, in_f = weight.shape
        a = torch.randn(rank, in_f, generator=gen)
        b = torch.randn(out_f, rank, generator=gen)
        b *= rel_norm * weight.float().norm() / (b @ a).norm()
        module = name.removesuffix(".weight")
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = a, b
        manifest.modules[module] = ModuleEntry(
            method="lora", base_weight=name, shape=[out_f, in_f], params=lora_params(rank, rank, False),
            tensors={"lora_A": TensorRef(f"{module}.lora_A", "F32", [rank, in_f]),
                     "lora_B": TensorRef(f"{module}.lora_B", "F32", [out_f, rank])})
    return Adapter(manifest=manifest, tensors=tensors)


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself)."""
    if Path(path).is_file():
        return {Path(path).name: hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}
