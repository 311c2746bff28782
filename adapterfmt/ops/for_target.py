"""``convert --to peft --for TARGET``: rewrite an adapter so that TARGET computes exactly our ΔW.

Each target's scale rule (read from its source, see ``docs/consumers.md``) decides the layout:

- vLLM / TGI: one scale from the config's global ``r`` and ``lora_alpha``; patterns are ignored.
- SGLang: ``lora_alpha / r`` from the config, rsLoRA not read, pattern entries refused: one rank, one alpha.
- TGI also pads ranks for its kernels and writes the padded rank back into the config; we pad first.
- llama.cpp (``convert_lora_to_gguf.py`` on the PEFT export): one scalar alpha over each tensor's rank.

A module whose own scale differs from what the target will apply has the ratio folded into B:
computed in fp64, stored in B's dtype when that is exact, else in fp32; the ΔW error is measured per
module in the report. What no adapter file can express there (DoRA in vLLM, modules_to_save, ...)
is refused by name. The written file stays a valid PEFT adapter computing the same ΔW in PEFT.
"""
from __future__ import annotations

import copy
import re

import torch

from ..errors import UsageError
from ..format import Adapter, TensorRef
from ..format.dtypes import dtype_name
from ..methods.lora import lora_params
from ..conversion_report import EXACT_MATH, LOSSLESS, SCALE_FOLDED, ConversionReport
from .adapter_facts import BLOCK_RE, AdapterFacts, adapter_facts
from .check import OK, check_adapter
from .method_conversion import convert_methods
from .check_rules import TARGET_ALIASES, TGI_LAYER_TYPES, tgi_padded_rank


def prepare_for_target(adapter: Adapter, target: str, report: ConversionReport) -> Adapter:
    """A copy of ``adapter`` laid out so that ``target`` computes our ΔW; refuses what it cannot hold.

    Example:
        >>> from adapterfmt.format import read_adapter
        >>> from adapterfmt.conversion_report import ConversionReport
        >>> report = ConversionReport()
        >>> ready = prepare_for_target(read_adapter("a.safetensors"), "vllm", report)  # doctest: +SKIP
    """
    name = TARGET_ALIASES.get(target.lower(), target.lower())
    if name not in LAYOUTS:
        raise UsageError(f"unknown --for target {target!r}", hint=f"choose from {', '.join(sorted(LAYOUTS))}")
    adapter = _as_lora(adapter, report)
    _refuse_what_cannot_be_exact(adapter, name)
    facts = adapter_facts(adapter.manifest)
    layout = LAYOUTS[name](facts)
    if layout is None:
        report.notes.append(f"{name}: the adapter already computes our ΔW there; tensors unchanged")
        return adapter
    return _apply_layout(adapter, name, layout, report)


def _as_lora(adapter: Adapter, report: ConversionReport) -> Adapter:
    """Non-LoRA methods (NOLA, OLoRA, PiSSA, SORSA) materialised as LoRA, as every PEFT export does."""
    if set(adapter.manifest.methods()) <= {"lora", "dora"}:
        return adapter
    return convert_methods(Adapter(copy.deepcopy(adapter.manifest), dict(adapter.tensors), adapter.version),
                           "lora", {}, report)


def _refuse_what_cannot_be_exact(adapter: Adapter, target: str) -> None:
    """The check's findings without an exact fix become one-line refusals."""
    verdict = check_adapter(adapter, [target]).targets[0]
    blocking = [f for f in verdict.findings if f.severity != OK and not f.exact_fix]
    if blocking:
        first = blocking[0]
        more = f" (and {len(blocking) - 1} more: {', '.join(f.rule for f in blocking[1:])})" if blocking[1:] else ""
        raise UsageError(f"--for {target}: {first.message}{more}",
                         hint="no adapter file computes this ΔW there; merge it into the base instead "
                              "(adapterfmt merge), or export for another target")


# ------------------------------------------------------------------ layouts: per module (rank, alpha)
class Layout:
    """Per module the rank (zero-padded when larger) and alpha to write, all with use_rslora false;
    ``applied(facts, module)`` is the scale the target computes from the written config."""

    def __init__(self, ranks: dict[str, int], alphas: dict[str, float], applied,
                 zero_modules: dict[str, str] | None = None):
        self.ranks, self.alphas, self.applied = ranks, alphas, applied
        self.zero_modules = zero_modules or {}  # new module -> module it copies shapes from


def _common_scale(facts: AdapterFacts) -> float:
    """The most common per-module scale: modules already at it keep their B bit for bit."""
    from collections import Counter
    return Counter(m["scale"] for m in facts.lora_modules.values()).most_common(1)[0][0]


def _vllm_layout(facts: AdapterFacts) -> Layout:
    from .check_rules import global_scale
    s = _common_scale(facts)
    return Layout({k: m["rank"] for k, m in facts.lora_modules.items()},
                  {k: s * m["rank"] for k, m in facts.lora_modules.items()}, global_scale)


def _sglang_layout(facts: AdapterFacts) -> Layout:
    from .check_rules import global_scale_no_rslora
    s, rank = _common_scale(facts), facts.max_rank
    return Layout({k: rank for k in facts.lora_modules}, {k: s * rank for k in facts.lora_modules},
                  global_scale_no_rslora)


def _tgi_layout(facts: AdapterFacts) -> Layout:
    from .check_rules import global_scale
    s, rank = _common_scale(facts), tgi_padded_rank(facts.max_rank)
    zeros = _tgi_missing_layers(facts)
    names = list(facts.lora_modules) + list(zeros)
    return Layout({k: rank for k in names}, {k: s * rank for k in names}, global_scale, zeros)


def _tgi_missing_layers(facts: AdapterFacts) -> dict[str, str]:
    """Zero LoRA for the blocks that lack a TGI layer type the adapter uses elsewhere."""
    by_type: dict[str, dict[int, str]] = {}
    for name in facts.lora_modules:
        match = BLOCK_RE.match(name)
        if match and match["path"] in TGI_LAYER_TYPES:
            by_type.setdefault(match["path"], {})[int(match["index"])] = name
    n_layers = facts.base_config.get("num_hidden_layers")
    missing = {}
    for path, layers in by_type.items():
        wanted = range(int(n_layers)) if n_layers else range(max(layers) + 1)
        if set(wanted) == set(layers):
            continue
        if not n_layers:
            raise UsageError(f"--for tgi: {path} is missing in some layers and the base's layer count is unknown",
                             hint="pass --base so that zero LoRA can be added to every missing layer")
        template = layers[min(layers)]
        for i in set(wanted) - set(layers):
            missing[re.sub(r"layers\.\d+\.", f"layers.{i}.", template, count=1)] = template
    return missing


def _llamacpp_layout(facts: AdapterFacts) -> Layout:
    from collections import Counter
    from .check_rules import llamacpp_scale
    s = _common_scale(facts)
    rank = Counter(m["rank"] for m in facts.lora_modules.values() if m["scale"] == s).most_common(1)[0][0]
    return Layout({k: m["rank"] for k, m in facts.lora_modules.items()},
                  {k: s * rank for k in facts.lora_modules}, llamacpp_scale)


#: Targets whose loader already computes our ΔW from a plain export map to ``lambda f: None``.
LAYOUTS = {"peft": lambda f: None, "mlx": lambda f: None, "diffusers": lambda f: None,
           "comfyui": lambda f: None, "vllm": _vllm_layout, "sglang": _sglang_layout, "tgi": _tgi_layout,
           "llama.cpp": _llamacpp_layout}


# ------------------------------------------------------------------ applying a layout
LORA_KEYS = ("rank", "alpha", "use_rslora", "scale")


def _apply_layout(adapter: Adapter, target: str, layout: Layout, report: ConversionReport) -> Adapter:
    manifest = copy.deepcopy(adapter.manifest)
    tensors = dict(adapter.tensors)
    for name, template in layout.zero_modules.items():
        _add_zero_module(manifest, tensors, name, template)
        report.notes.append(f"{target}: added zero LoRA {name} (the target drops a layer type missing in any layer)")
    before = {}
    for name, rank in layout.ranks.items():
        entry = manifest.modules[name]
        a, b = tensors[entry.tensors["lora_A"].name], tensors[entry.tensors["lora_B"].name]
        before[name] = (a, b, float(entry.params["scale"]))
        extra = {k: v for k, v in entry.params.items() if k not in LORA_KEYS}
        entry.params = lora_params(rank, layout.alphas[name], False) | extra
        _store(manifest, tensors, name, "lora_A", _pad_rows(a, rank))
        _store(manifest, tensors, name, "lora_B", _pad_cols(b, rank))
    facts = adapter_facts(manifest)  # what the written config will say: the target's scale comes from it
    for name, (a, b, own) in before.items():
        given = float(layout.applied(facts, facts.modules[name]))
        entry = manifest.modules[name]
        folded, how = _fold(tensors[entry.tensors["lora_B"].name], own / given)
        _store(manifest, tensors, name, "lora_B", folded)
        _report_module(report, target, name, how, own, given, float(entry.params["scale"]),
                       reference=_delta(a, b, own),
                       result=_delta(tensors[entry.tensors["lora_A"].name], folded, given))
    return Adapter(manifest=manifest, tensors=tensors, version=adapter.version)


def _fold(b: torch.Tensor, factor: float) -> tuple[torch.Tensor, str]:
    """B·factor computed in fp64; kept in B's dtype when that rounding is exact, else stored in fp32."""
    if factor == 1.0:
        return b, "unchanged"
    product = b.double() * factor
    same_dtype = product.to(b.dtype)
    if torch.equal(same_dtype.double(), product):
        return same_dtype, "exact"
    wider = torch.float64 if b.dtype == torch.float64 else torch.float32
    return product.to(wider), "folded"


def _report_module(report: ConversionReport, target: str, name: str, how: str, own: float, given: float,
                   peft_scale: float, *, reference: torch.Tensor, result: torch.Tensor) -> None:
    notes = {"unchanged": "", "exact": f"scale {own:.6g} folded into B exactly (target applies {given:.6g})",
             "folded": f"scale {own:.6g} folded into B in fp64, stored fp32 (target applies {given:.6g})"}
    note = notes[how]
    if peft_scale != given:
        note = "; ".join(filter(None, [note, f"PEFT applies {peft_scale!r}, {target} {given!r} (fp rounding)"]))
    if how == "unchanged" and own == given and peft_scale == given:
        status = LOSSLESS
    elif how in ("unchanged", "exact"):
        status = EXACT_MATH
    else:
        status = SCALE_FOLDED
    report.add(name, status, note, reference=reference, result=result)


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (b.double() @ a.double()) * scale


def _pad_rows(a: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero rows appended to A up to ``rank``: B·A is unchanged exactly."""
    if a.shape[0] == rank:
        return a
    return torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)


def _pad_cols(b: torch.Tensor, rank: int) -> torch.Tensor:
    if b.shape[1] == rank:
        return b
    return torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)


def _store(manifest, tensors: dict[str, torch.Tensor], module: str, role: str, tensor: torch.Tensor) -> None:
    ref = manifest.modules[module].tensors[role]
    tensors[ref.name] = tensor.contiguous()
    manifest.modules[module].tensors[role] = TensorRef(ref.name, dtype_name(tensor.dtype), list(tensor.shape))


def _add_zero_module(manifest, tensors: dict[str, torch.Tensor], name: str, template: str) -> None:
    """A LoRA module with zero factors (ΔW = 0) shaped like ``template``, in another layer."""
    entry = copy.deepcopy(manifest.modules[template])
    entry.base_weight = f"{name}.weight"
    for role, ref in entry.tensors.items():
        new_name = f"{name}.{role}"
        tensors[new_name] = torch.zeros(ref.shape, dtype=tensors[ref.name].dtype)
        entry.tensors[role] = TensorRef(new_name, ref.dtype, list(ref.shape))
    manifest.modules[name] = entry
    template_weight = manifest.base.weights.get(f"{template}.weight")
    if template_weight is not None:
        manifest.base.weights[entry.base_weight] = copy.deepcopy(template_weight)
        manifest.base.weights[entry.base_weight].fingerprint = None
