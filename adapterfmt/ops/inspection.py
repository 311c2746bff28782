"""``inspect``: what an adapter is, for people (text) and programs (--json)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..format.versions import version_string
from ..methods import get_method
from .hub import resolve_path
from .load import load_adapter


def inspect_adapter(path: Path | str) -> dict[str, Any]:
    """Summarise an adapterfmt file. The keys are documented in README.md (``inspect --json``).

    Example:
        >>> info = inspect_adapter("adapter.safetensors")  # doctest: +SKIP
        >>> info["parameter_count"]  # doctest: +SKIP
        12288
    """
    path = resolve_path(path)
    adapter = load_adapter(path)
    manifest = adapter.manifest
    modules = []
    total_params = rank1_params = 0
    for target, entry in manifest.modules.items():
        count = get_method(entry.method).parameter_count(entry)
        rank1 = entry.shape[0] + entry.shape[1]
        total_params += count
        rank1_params += rank1
        modules.append({"name": target, "method": entry.method, "shape": entry.shape,
                        "rank": entry.params.get("rank"), "layer": entry.layer,
                        "fan_in_fan_out": entry.fan_in_fan_out, "scale": entry.params.get("scale"),
                        "parameter_count": count,
                        "params": {k: v for k, v in entry.params.items() if k not in ("rank", "scale")}})
    payload_params = sum(t.numel() for n, t in adapter.tensors.items() if n.startswith("payload."))
    ranks = Counter(m["rank"] for m in modules if m["rank"] is not None)
    return {
        "path": str(path),
        "format_version": version_string(adapter.version),
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
        "bytes_on_disk": os.path.getsize(path),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in adapter.tensors.values()),
        "rank1_lora_parameter_count": rank1_params,
        "compression_vs_rank1_lora": (rank1_params / total_params) if total_params else None,
        "payloads": [{"target": p.target, "kind": p.kind, "shape": p.tensor.shape}
                     for p in manifest.payloads.values()],
        "source_format": manifest.source.get("format"),
        "created_by": manifest.created_by,
        "modules": modules,
    }


def format_inspection(info: dict[str, Any], limit: int = 20) -> list[str]:
    """Human-readable lines for :func:`inspect_adapter`'s result."""
    base = info["base"]
    lines = [
        f"{info['path']}  (adapterfmt {info['format_version']}, created by {info['created_by'] or '?'})",
        f"  methods: {', '.join(info['methods'])}   modules: {info['module_count']}   "
        f"ranks: {', '.join(f'r={k}x{v}' for k, v in info['ranks'].items()) or '-'}",
        f"  base: {base['name_or_path'] or '?'}"
        + (f"@{base['revision']}" if base["revision"] else "")
        + (f" ({base['architecture']})" if base["architecture"] else "")
        + f", {base['fingerprinted_weights']} weight fingerprint(s)",
        f"  parameters: {info['parameter_count']:,} adapter + {info['payload_parameter_count']:,} payload; "
        f"{info['bytes_on_disk']:,} bytes on disk",
    ]
    if info["compression_vs_rank1_lora"] is not None:
        lines.append(f"  vs rank-1 LoRA on the same modules ({info['rank1_lora_parameter_count']:,} params): "
                     f"{info['compression_vs_rank1_lora']:.3g}x")
    for p in info["payloads"]:
        lines.append(f"  payload {p['target']} ({p['kind']}) {p['shape']}")
    for m in info["modules"][:limit]:
        extra = " fan_in_fan_out" if m["fan_in_fan_out"] else ""
        if m["method"] == "nola":
            extra += f" k={m['params']['A']['num_basis']} l={m['params']['B']['num_basis']}"
        lines.append(f"    {m['name']}: {m['method']} {m['shape'][0]}x{m['shape'][1]} "
                     f"r={m['rank']} scale={m['scale']:.6g} params={m['parameter_count']:,}{extra}"
                     if m["scale"] is not None else
                     f"    {m['name']}: {m['method']} {m['shape'][0]}x{m['shape'][1]} params={m['parameter_count']:,}")
    if len(info["modules"]) > limit:
        lines.append(f"    ... {len(info['modules']) - limit} more (use --json)")
    return lines
