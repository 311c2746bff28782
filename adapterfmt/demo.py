"""``adapterfmt demo``: the whole job on a tiny random model, offline, in a few seconds."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import torch


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
    from .engine.checkpoint import BaseCheckpoint
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


def run_demo(out_dir: Path | str | None = None) -> Iterator[str]:
    """Build a tiny model, make adapters of several methods, convert, merge, validate; yield log lines.

    Example:
        >>> for line in run_demo():  # doctest: +SKIP
        ...     print(line)
    """
    from .convert import convert
    from .engine.merge import merge
    from .inspect import format_inspection, inspect_adapter
    from .validate import validate

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="adapterfmt-demo-"))
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
    extra = list(_extra_method_steps(work, base, adapters))
    for line in extra:
        yield line
    merged = work / "merged"
    summary = merge(base, [(adapters["lora"], 1.0)], merged, overwrite=True)
    yield f"5. merged lora.safetensors into the base: {summary.tensors_changed} tensors changed -> {merged}"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    yield f"6. transformers loads the merged model; logits finite: {bool(torch.isfinite(out).all())}"
    yield "done: every step ran offline on CPU"


def _extra_method_steps(work: Path, base: Path, adapters: dict[str, Path]) -> Iterator[str]:
    """Method conversions that exist in this build (NOLA, compaction, ...)."""
    from .methods import all_methods
    if "nola" in all_methods():
        from .convert import convert
        dst = work / "nola.safetensors"
        try:
            report = convert(adapters["lora"], dst, method="nola", overwrite=True,
                             method_options={"nola_basis": (64, 64), "seed": 7})
        except Exception as exc:  # the demo keeps going; the tests cover this path
            yield f"   (nola step skipped: {exc})"
            return
        worst = max((m.rel_error or 0.0) for m in report.modules)
        yield f"4b. projected lora.safetensors onto a NOLA basis (k=l=64): {report.worst}, worst rel err {worst:.3g}"
