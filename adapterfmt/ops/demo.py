"""``adapterfmt demo``: the whole job on a tiny random model, offline, in a few seconds."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UsageError


def _tiny_base(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _peft_style_adapter(base: Path, out: Path, *, use_dora: bool, use_rslora: bool, seed: int) -> Path:
    """Write a PEFT LoRA/DoRA directory without needing PEFT installed (same files PEFT writes)."""
    import json
    from safetensors.torch import save_file
    from ..checkpoint import BaseCheckpoint
    ckpt = BaseCheckpoint(base)
    gen = torch.Generator().manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    tensors = {}
    for name in ckpt.names():
        module = name.removesuffix(".weight")
        if not any(module.endswith("." + t) for t in targets):
            continue
        out_f, in_f = ckpt.shape(name)
        rank = 2 if module.endswith("down_proj") else 4
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
        if use_dora:
            row = ckpt.get(name).float().norm(dim=1)
            tensors[f"{prefix}.lora_magnitude_vector"] = row * (1 + 0.05 * torch.rand(out_f, generator=gen))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": use_rslora, "use_dora": use_dora,
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 4}, "target_modules": targets,
              "base_model_name_or_path": str(base), "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def run_demo(out_dir: Path | str | None = None, *, overwrite: bool = False) -> Iterator[str]:
    """Build a tiny model, make adapters of several methods, convert, merge, validate; yield log lines.

    A non-empty ``out_dir`` is refused unless ``overwrite`` (then the demo's files are replaced).

    Example:
        >>> for line in run_demo():  # doctest: +SKIP
        ...     print(line)
    """
    from .check import check_adapter
    from .convert import convert
    from .inspection import format_inspection, inspect_adapter
    from .merge import merge
    from .validate import validate

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="adapterfmt-demo-"))
    if work.is_dir() and any(work.iterdir()) and not overwrite:
        raise UsageError("demo directory is not empty", path=work,
                         hint="pass --overwrite to replace the demo's files, or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    yield f"demo directory: {work}"
    base = _tiny_base(work / "base-model")
    yield f"1. built a tiny random Llama (2 layers, hidden 64) at {base}"
    adapters = {}
    for label, dora, rslora in (("lora", False, False), ("rslora", False, True), ("dora", True, False)):
        peft_dir = _peft_style_adapter(base, work / f"peft-{label}", use_dora=dora, use_rslora=rslora,
                                       seed=len(adapters) + 1)
        dst = work / f"{label}.safetensors"
        report = convert(peft_dir, dst, base=base, overwrite=True)
        adapters[label] = dst
        yield f"2. converted PEFT {label} adapter -> {dst.name}: {report.worst} ({len(report.modules)} modules)"
    for line in format_inspection(inspect_adapter(adapters["lora"]), limit=3):
        yield "   " + line
    for label, path in adapters.items():
        result = validate(path, base=base)
        yield f"3. validate {path.name} against the base: {'valid' if result.valid else result.problems}"
    back = work / "peft-roundtrip"
    report = convert(adapters["rslora"], back, to="peft", overwrite=True)
    yield f"4. exported rslora.safetensors back to PEFT ({back.name}): {report.worst}"
    for fmt, dst in (("gguf", work / "lora.gguf"), ("mlx", work / "mlx-adapter")):
        there = convert(adapters["lora"], dst, to=fmt, base=base, overwrite=True)
        again = convert(dst, work / f"lora-from-{fmt}.safetensors", base=base, overwrite=True)
        yield (f"   lora.safetensors -> {fmt} ({there.worst}) -> adapterfmt ({again.worst}); "
               f"max ΔW error {_max_error(there, again):.2g}")
    check = check_adapter(adapters["rslora"], ["vllm", "llama.cpp"], out="OUT", base=str(base))
    yield "   where rslora.safetensors works as is: " + "; ".join(t.verdict() for t in check.targets)
    nola = _make_nola(work / "nola.safetensors", base)
    info = inspect_adapter(nola)
    result = validate(nola, base=base)
    yield (f"5. NOLA adapter on q/v ({info['parameter_count']} stored numbers: seeds + coefficients; "
           f"{info['compression_vs_rank1_lora']:.2g}x fewer than a rank-1 LoRA): "
           f"{'valid, basis fingerprints regenerated bit-exactly' if result.valid else result.problems}")
    report = convert(nola, work / "nola-as-lora.safetensors", method="lora", overwrite=True)
    yield f"   NOLA -> LoRA (materialised): {report.worst}, max ΔW error {_max_error(report):.2g}"
    report = convert(adapters["lora"], work / "lora-compact.safetensors", resize={}, overwrite=True)
    yield f"   LoRA rank compaction: {report.worst}, max ΔW error {_max_error(report):.2g}"
    merged = work / "merged"
    summary = merge(base, [(adapters["lora"], 1.0), (nola, 0.5)], merged, overwrite=True)
    yield (f"6. merged lora.safetensors (weight 1) + nola.safetensors (weight 0.5) into the base: "
           f"{summary.tensors_changed} tensors changed -> {merged}")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    yield f"7. transformers loads the merged model; logits finite: {bool(torch.isfinite(out).all())}"
    yield "done: every step ran offline on CPU"


def _max_error(*reports) -> float:
    errors = [m.max_abs_error for r in reports for m in r.modules if m.max_abs_error is not None]
    return max(errors, default=0.0)


def _make_nola(path: Path, base: Path) -> Path:
    """A NOLA adapter on q/v: per side a seed and 32 coefficients (what NOLA trains)."""
    from ..checkpoint import BaseCheckpoint
    from ..engine.base import bind_base
    from ..format import Adapter, BaseWeight, Manifest
    from ..methods import write_checked_adapter
    from ..methods.nola import derive_seed, nola_module
    ckpt = BaseCheckpoint(base)
    gen = torch.Generator().manual_seed(3)
    manifest, tensors = Manifest(), {}
    for name in ckpt.names():
        target = name.removesuffix(".weight")
        if not target.endswith(("q_proj", "v_proj")):
            continue
        out_f, in_f = ckpt.shape(name)
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
