"""The demo's LLM half: PEFT LoRA/rsLoRA/DoRA, LoHa and IA³ files, NOLA; convert, check, merge, validate."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .demo_llm_files import make_nola, peft_delta, peft_ia3, peft_loha, peft_lora, tiny_base
from .demo_measure import (Steps, describe_error, max_error, max_rel_error, merge_error, verdicts,
                           worst_merge_error)


def llm_steps(work: Path, step: Steps) -> Iterator[str]:
    """Yield the LLM half's lines (files go under ``work``)."""
    base = tiny_base(work / "base-model")
    yield step("built a tiny random Llama", f"2 layers, hidden 64 -> {base.name}/")
    adapters = yield from _lora_family(work, base, step)
    yield from _nola(work, base, adapters["lora"], step)
    yield from _loha_ia3(work, base, step)


def _lora_family(work: Path, base: Path, step: Steps) -> Iterator[str]:
    from .check import check_adapter
    from .convert import convert
    from .inspection import inspect_adapter
    from .validate import validate
    adapters = {}
    for label, dora, rslora in (("lora", False, False), ("rslora", False, True), ("dora", True, False)):
        peft_dir = peft_lora(base, work / f"peft-{label}", use_dora=dora, use_rslora=rslora, seed=len(adapters) + 1)
        dst = work / f"{label}.safetensors"
        report = convert(peft_dir, dst, base=base, overwrite=True)
        adapters[label] = dst
        valid = validate(dst, base=base).valid
        yield step(f"PEFT {label} dir -> {dst.name}", f"{report.worst}, {len(report.modules)} modules, "
                                                       f"{'valid against the base' if valid else 'INVALID'}")
    info = inspect_adapter(adapters["lora"])
    yield step("inspect lora.safetensors", f"{info['module_count']} modules, {info['parameter_count']:,} params, "
                                           f"{info['compression_vs_rank1_lora']:.3g}x a rank-1 LoRA")
    back = convert(adapters["rslora"], work / "peft-roundtrip", to="peft", overwrite=True)
    yield step("rslora.safetensors -> PEFT dir", back.worst)
    for fmt, dst in (("gguf", work / "lora.gguf"), ("mlx", work / "mlx-adapter")):
        there = convert(adapters["lora"], dst, to=fmt, base=base, overwrite=True)
        again = convert(dst, work / f"lora-from-{fmt}.safetensors", base=base, overwrite=True)
        yield step(f"lora.safetensors -> {fmt} -> adapterfmt", f"{there.worst} / {again.worst}, "
                                                               f"max ΔW error {describe_error(max_error(there, again))}")
    check = check_adapter(adapters["rslora"], ["vllm", "llama.cpp"], out="OUT", base=str(base))
    fixes = sum(t.fix is not None for t in check.targets)
    yield step("check rslora.safetensors -t vllm -t llama.cpp",
               f"as is {verdicts(check)}; {fixes} exact fix command(s) (adapterfmt check prints them)")
    return adapters


def _nola(work: Path, base: Path, lora: Path, step: Steps) -> Iterator[str]:
    from .convert import convert
    from .inspection import inspect_adapter
    from .merge import merge
    from .validate import validate
    nola = make_nola(work / "nola.safetensors", base)
    info = inspect_adapter(nola)
    valid = validate(nola, base=base).valid
    yield step("NOLA on q/v (seeds + coefficients)",
               f"{info['parameter_count']} stored numbers ({info['compression_vs_rank1_lora']:.2g}x fewer than a rank-1 "
               f"LoRA), {'valid, bases regenerated bit-exactly' if valid else 'INVALID'}")
    report = convert(nola, work / "nola-as-lora.safetensors", method="lora", overwrite=True)
    yield step("NOLA -> LoRA", f"{report.worst}, max ΔW error {describe_error(max_error(report))}")
    report = convert(lora, work / "lora-compact.safetensors", resize={}, overwrite=True)
    yield step("LoRA --compact", f"{report.worst}, max ΔW error {describe_error(max_error(report))}")
    merged = work / "merged"
    summary = merge(base, [(lora, 1.0), (nola, 0.5)], merged, overwrite=True)
    yield step("merge lora (x1) + nola (x0.5) into the base", f"{summary.tensors_changed} tensors changed -> {merged.name}/")


def _loha_ia3(work: Path, base: Path, step: Steps) -> Iterator[str]:
    from .convert import convert
    from .load import load_adapter as read_adapter
    from .merge import merge
    from .validate import validate
    converted = {}
    for label, write in (("loha", peft_loha), ("ia3", peft_ia3)):
        peft_dir = write(base, work / f"peft-{label}")
        dst = work / f"{label}.safetensors"
        report = convert(peft_dir, dst, base=base, overwrite=True)
        converted[label] = (peft_dir, dst)
        valid = validate(dst, base=base).valid
        yield step(f"PEFT {label} dir (no PEFT installed) -> {dst.name}",
                   f"{report.worst}, {len(report.modules)} modules, {'valid' if valid else 'INVALID'}")
    as_lora = work / "loha-as-lora.safetensors"
    report = convert(converted["loha"][1], as_lora, method="lora", overwrite=True)
    ranks = sorted({e.params["rank"] for e in read_adapter(as_lora).manifest.modules.values()})
    yield step("LoHa -> LoRA", f"{report.worst} at rank {'/'.join(map(str, ranks))} (LoHa rank 4: ≤ 4²), "
                               f"max ΔW error {describe_error(max_error(report))}")
    for rank in (2, 16):
        report = convert(converted["ia3"][1], work / f"ia3-as-lora-r{rank}.safetensors", method="lora", base=base,
                         resize={"rank": rank}, overwrite=True)
        yield step(f"IA³ -> LoRA --rank {rank}", f"{report.worst}, max ΔW error {describe_error(max_error(report))}, "
                                                 f"relative {max_rel_error(report):.2g}")
    merged = work / "merged-loha-ia3"
    summary = merge(base, [(converted["loha"][1], 1.0), (converted["ia3"][1], 1.0)], merged, overwrite=True)
    error = _merge_errors(base, merged, [converted["loha"][0], converted["ia3"][0]])
    yield step("merge loha + ia3 into the base", f"{summary.tensors_changed} tensors changed, {error} "
                                                 "from PEFT's formulas in float64")
    yield from _logits(merged, step)


def _merge_errors(base: Path, merged: Path, peft_dirs: list[Path]) -> str:
    """How far the merged weights are from the base + each PEFT file's ΔW computed in float64."""
    import json
    from ..checkpoint import BaseCheckpoint
    before, after = BaseCheckpoint(base), BaseCheckpoint(merged)
    errors = []
    for peft_dir in peft_dirs:
        targets = json.loads((peft_dir / "adapter_config.json").read_text())["target_modules"]
        for name in before.names():
            module = name.removesuffix(".weight")
            if any(module.endswith("." + t) for t in targets):
                weight = before.get(name)
                errors.append(merge_error(after.get(name), weight.double() + peft_delta(peft_dir, module, weight)))
    return worst_merge_error(errors)


def _logits(merged: Path, step: Steps) -> Iterator[str]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        out = model(input_ids=torch.arange(8).view(1, 8)).logits
    yield step("transformers loads merged-loha-ia3/", f"logits finite: {bool(torch.isfinite(out).all())}")
