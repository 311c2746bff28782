"""Shared helpers of the low-rank foreign formats (GGUF, kohya, MLX-LM).

Not a format itself (the leading underscore keeps it out of the self-registration scan).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import torch

from ..errors import UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ..format.fingerprint import dtype_name
from ..report import EXACT_MATH, LOSSLESS, SCALE_FOLDED, ConversionReport

#: Base-config fields a converter may need later (head counts for RoPE permutation, layer count).
BASE_CONFIG_KEYS = ("architectures", "model_type", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                    "num_hidden_layers", "hidden_size", "head_dim", "tie_word_embeddings", "vocab_size")


def base_config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a transformers ``config.json`` worth keeping in ``manifest.source``.

    Example:
        >>> base_config_summary({"num_attention_heads": 4, "rope_theta": 1e4})
        {'num_attention_heads': 4}
    """
    return {k: config[k] for k in BASE_CONFIG_KEYS if config.get(k) is not None}


def known_base_config(adapter: Adapter | None, base: Any = None) -> dict[str, Any]:
    """The base config from ``base`` (a BaseCheckpoint), else the one recorded in the manifest source."""
    if base is not None and getattr(base, "config", None):
        return base_config_summary(base.config)
    if adapter is not None:
        return dict(adapter.manifest.source.get("base_config") or {})
    return {}


def lora_params_exact(rank: int, scale: float, alpha: float | None = None) -> dict[str, Any]:
    """LoRA params keeping a foreign format's *scale* bit-exact (alpha = scale·rank when not given).

    Example:
        >>> lora_params_exact(4, 2.0)
        {'rank': 4, 'alpha': 8.0, 'use_rslora': False, 'scale': 2.0}
    """
    alpha = scale * rank if alpha is None else alpha
    return {"rank": int(rank), "alpha": float(alpha), "use_rslora": False, "scale": float(scale)}


def add_lowrank_module(manifest: Manifest, tensors: dict[str, torch.Tensor], target: str, a: torch.Tensor,
                       b: torch.Tensor, params: dict[str, Any], *, layer: str = "linear",
                       magnitude: torch.Tensor | None = None) -> ModuleEntry:
    """Add a canonical LoRA/DoRA module: A (r, in), B (out, r); embeddings are stored transposed."""
    method = "dora" if magnitude is not None else "lora"
    if magnitude is not None:
        params = dict(params, magnitude_axis="out")
    roles = {"lora_A": a, "lora_B": b} | ({"magnitude": magnitude} if magnitude is not None else {})
    refs = {}
    for role, tensor in roles.items():
        name = f"{target}.{role}"
        tensors[name] = tensor.contiguous()
        refs[role] = TensorRef(name, dtype_name(tensor.dtype), list(tensor.shape))
    out_f, in_f = b.shape[0], a.shape[1]
    transposed = layer != "linear"
    entry = ModuleEntry(method=method, base_weight=f"{target}.weight", shape=[out_f, in_f], params=params,
                        tensors=refs, fan_in_fan_out=transposed, layer=layer)
    manifest.modules[target] = entry
    manifest.base.weights[entry.base_weight] = BaseWeight(shape=[in_f, out_f] if transposed else [out_f, in_f])
    return entry


def most_common(values: list[Any]) -> Any:
    """The most frequent value (ties: first seen), used to pick a format's one global setting."""
    return Counter(values).most_common(1)[0][0]


def fold_to_global(adapter: Adapter, report: ConversionReport, global_scale: Callable[[ModuleEntry], float],
                   note: Callable[[ModuleEntry], str] = lambda e: "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fit each module to a format with one global scale rule; returns ``{target: (A, B)}``.

    ``global_scale(entry)`` is the scale the target format will apply to that module. A module
    whose own scale differs has the ratio folded into B (in fp64, rounded once to B's dtype) and
    is reported ``scale_folded`` with the measured ΔW error; a module whose scale differs only
    by fp32 rounding of the stored global value is reported ``exact``.
    """
    out = {}
    for target, entry in adapter.manifest.modules.items():
        tensors = adapter.module_tensors(target)
        a, b = tensors["lora_A"], tensors["lora_B"]
        own, given = float(entry.params["scale"]), float(global_scale(entry))
        extra = note(entry)
        if own == given:
            report.add(target, LOSSLESS, extra)
        elif math.isclose(own, given, rel_tol=1e-6):
            report.add(target, EXACT_MATH, _join(extra, f"scale {own!r} stored as {given!r} (fp32 rounding)"),
                       reference=_delta(a, b, own), result=_delta(a, b, given))
        else:
            if given == 0.0:
                raise UsageError(f"module {target!r}: cannot fold scale {own} into a global scale of 0")
            folded = (b.double() * (own / given)).to(b.dtype)
            report.add(target, SCALE_FOLDED, _join(extra, f"scale {own:.6g} folded into B (global {given:.6g})"),
                       reference=_delta(a, b, own), result=_delta(a, folded, given))
            b = folded
        out[target] = (a, b)
    return out


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (b.double() @ a.double()) * scale


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def require_linear(adapter: Adapter, fmt: str, report: ConversionReport, base: Any = None,
                   allowed: tuple[str, ...] = ("linear",)) -> None:
    """Refuse modules whose layer kind the format cannot express, and payloads it cannot hold.

    ``full_weight`` payloads (PEFT's saved copy of a targeted base embedding) are dropped with a
    note, as llama.cpp's converter does, unless ``base`` shows they differ from the base weight.
    """
    for target, entry in adapter.manifest.modules.items():
        if entry.layer not in allowed:
            raise UsageError(f"module {target!r} is a {entry.layer} layer, which {fmt} cannot hold",
                             hint=f"{fmt} supports {', '.join(allowed)} targets; drop that module first")
    for payload in adapter.manifest.payloads.values():
        tensor = adapter.tensors[payload.tensor.name]
        same = payload.kind == "full_weight" and (
            base is None or (payload.target in base and torch.equal(base.get(payload.target), tensor)))
        if not same:
            raise UsageError(f"{fmt} has no place for payload {payload.target!r} ({payload.kind})",
                             hint="export to peft or adapterfmt to keep modules_to_save / changed full weights")
        report.notes.append(f"dropped payload {payload.target} (a copy of the base weight"
                            f"{'' if base is not None else ', not checked: no --base'})")
