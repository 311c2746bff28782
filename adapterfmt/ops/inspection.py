"""``inspect``: what an adapter is, for people (text) and programs (--json)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..format.versions import version_string
from ..methods import get_method
from .hub import resolve_path
from .load import load_any_adapter


def inspect_adapter(path: Path | str) -> dict[str, Any]:
    """Summarise an adapterfmt file. The keys are documented in README.md (``inspect --json``).

    Example:
        >>> info = inspect_adapter("adapter.safetensors")  # doctest: +SKIP
        >>> info["parameter_count"]  # doctest: +SKIP
        12288
    """
    path = resolve_path(path)
    adapter, fmt = load_any_adapter(path)
    manifest = adapter.manifest
    modules = []
    total_params = rank1_params = 0
    by_method: dict[str, dict[str, Any]] = {}
    for target, entry in manifest.modules.items():
        count = get_method(entry.method).parameter_count(entry)
        rank1 = rank1_lora_parameters(entry.layer, entry.shape)
        total_params += count
        rank1_params += rank1
        group = by_method.setdefault(entry.method, {"modules": 0, "parameter_count": 0,
                                                    "rank1_lora_parameter_count": 0})
        group["modules"] += 1
        group["parameter_count"] += count
        group["rank1_lora_parameter_count"] += rank1
        modules.append({"name": target, "method": entry.method, "shape": entry.shape,
                        "rank": entry.params.get("rank"), "layer": entry.layer,
                        "fan_in_fan_out": entry.fan_in_fan_out, "scale": entry.params.get("scale"),
                        "parameter_count": count, "rank1_lora_parameter_count": rank1,
                        "params": {k: v for k, v in entry.params.items() if k not in ("rank", "scale")}})
    for group in by_method.values():
        group["compression_vs_rank1_lora"] = _ratio(group["rank1_lora_parameter_count"], group["parameter_count"])
    payload_params = sum(t.numel() for n, t in adapter.tensors.items() if n.startswith("payload."))
    ranks = Counter(m["rank"] for m in modules if m["rank"] is not None)
    info = {
        "path": str(path),
        "format": fmt,
        "format_version": version_string(adapter.version) if fmt == "adapterfmt" else None,
        "methods": manifest.methods(),
        "base": {"name_or_path": manifest.base.name_or_path, "revision": manifest.base.revision,
                 "architecture": manifest.base.architecture,
                 "fingerprinted_weights": sum(1 for identity in [manifest.base, *manifest.components.values()]
                                              for w in identity.weights.values() if w.fingerprint)},
        **({"components": {name: {"architecture": c.architecture, "name_or_path": c.name_or_path,
                                  "modules": sum(1 for e in manifest.modules.values() if e.component == name)}
                           for name, c in manifest.components.items()}} if manifest.components else {}),
        "module_count": len(modules),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "parameter_count": total_params,
        "payload_parameter_count": payload_params,
        "bytes_on_disk": _size_on_disk(path),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in adapter.tensors.values()),
        "rank1_lora_parameter_count": rank1_params,
        "compression_vs_rank1_lora": _ratio(rank1_params, total_params),
        "by_method": by_method,
        "payloads": [{"target": p.target, "kind": p.kind, "shape": p.tensor.shape}
                     for p in manifest.payloads.values()],
        "source_format": manifest.source.get("format"),
        "created_by": manifest.created_by,
        "modules": modules,
    }
    if manifest.base.quantization is not None:  # the base form it was trained against (QLoRA)
        info["base"]["quantization"] = {k: v for k, v in vars(manifest.base.quantization).items() if v is not None}
    return info


#: Parameters of a rank-1 LoRA on one module, per layer kind (shape as the manifest stores it):
#: stacked experts (E, out, in) get one pair per expert; a Conv2d (out, in, kh, kw) LoRA has
#: A (1, in, kh, kw) and B (out, 1, 1, 1); every other layer A (1, in) and B (out, 1).
RANK1_LORA = {"experts": lambda s: s[0] * (s[1] + s[2]), "conv2d": lambda s: s[0] + s[1] * s[2] * s[3]}


def rank1_lora_parameters(layer: str, shape: list[int]) -> int:
    """Parameters a rank-1 LoRA on a module of this layer kind and shape has.

    Example:
        >>> rank1_lora_parameters("linear", [64, 32]), rank1_lora_parameters("conv2d", [16, 8, 3, 3])
        (96, 88)
    """
    return RANK1_LORA.get(layer, lambda s: s[-2] + s[-1])(shape)


def _ratio(rank1: int, params: int) -> float | None:
    """rank-1 LoRA parameters per parameter (> 1: smaller than a rank-1 LoRA); None for no parameters."""
    return rank1 / params if params else None


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)


def format_inspection(info: dict[str, Any], limit: int = 20) -> list[str]:
    """Human-readable lines for :func:`inspect_adapter`'s result."""
    base = info["base"]
    lines = [
        f"{info['path']}  ({info['format']} {info['format_version'] or ''}".rstrip()
        + f", created by {info['created_by'] or '?'})",
        f"  methods: {', '.join(info['methods'])}   modules: {info['module_count']}   "
        f"ranks: {', '.join(f'r={k}x{v}' for k, v in info['ranks'].items()) or '-'}",
        f"  base: {base['name_or_path'] or '?'}"
        + (f"@{base['revision']}" if base["revision"] else "")
        + (f" ({base['architecture']})" if base["architecture"] else "")
        + f", {base['fingerprinted_weights']} weight fingerprint(s)"
        + (f", trained on {base['quantization']['scheme']} (compute {base['quantization'].get('compute_dtype', '?')})"
           if "quantization" in base else ""),
        f"  parameters: {info['parameter_count']:,} adapter + {info['payload_parameter_count']:,} payload; "
        f"{info['bytes_on_disk']:,} bytes on disk",
    ]
    if info["compression_vs_rank1_lora"] is not None:
        lines.append(f"  vs rank-1 LoRA on the same modules ({info['rank1_lora_parameter_count']:,} params): "
                     f"{info['compression_vs_rank1_lora']:.3g}x")
    for method, group in info.get("by_method", {}).items():
        ratio = group["compression_vs_rank1_lora"]
        lines.append(f"    {method}: {group['modules']} module(s), {group['parameter_count']:,} params; rank-1 LoRA "
                     f"{group['rank1_lora_parameter_count']:,}"
                     + (f" ({ratio:.3g}x)" if ratio is not None else ""))
    for p in info["payloads"]:
        lines.append(f"  payload {p['target']} ({p['kind']}) {p['shape']}")
    for m in info["modules"][:limit]:
        extra = " fan_in_fan_out" if m["fan_in_fan_out"] else ""
        if m["method"] == "nola":
            extra += f" k={m['params']['A']['num_basis']} l={m['params']['B']['num_basis']}"
        lines.append(f"    {m['name']}: {m['method']} {'x'.join(map(str, m['shape']))} "
                     f"r={m['rank']} scale={m['scale']:.6g} params={m['parameter_count']:,}{extra}"
                     if m["scale"] is not None else
                     f"    {m['name']}: {m['method']} {'x'.join(map(str, m['shape']))} params={m['parameter_count']:,}")
    if len(info["modules"]) > limit:
        lines.append(f"    ... {len(info['modules']) - limit} more (use --json)")
    return lines
