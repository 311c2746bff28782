"""Merging adapters into a base checkpoint: fp32 arithmetic, one rounding, atomic output."""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..atomic import atomic_directory, check_output_path
from ..errors import UsageError
from ..format import Adapter, read_adapter
from ..format.container import require_finite
from ..methods import get_method
from .checkpoint import INDEX_FILE, BaseCheckpoint

OUT_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class MergeSummary:
    tensors_changed: int = 0
    tensors_total: int = 0
    seconds: float = 0.0
    out: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def apply_adapters(name: str, weight: torch.Tensor, updates: list[tuple[Adapter, float, str]],
                   out_dtype: torch.dtype | None) -> torch.Tensor:
    """Merge every (adapter, weight, target) touching base tensor ``name``; round once."""
    base32 = weight.float()
    merged = base32
    for adapter, scale, target in updates:
        entry = adapter.manifest.modules[target]
        method = get_method(entry.method)
        canon = base32.t() if entry.fan_in_fan_out else base32
        tensors = adapter.module_tensors(target)
        if scale == 1.0 and len(updates) == 1:
            new = method.merged(entry, tensors, canon)
            merged = new.t() if entry.fan_in_fan_out else new
        else:
            delta = method.delta(entry, tensors, canon) * scale
            merged = merged + (delta.t() if entry.fan_in_fan_out else delta)
    return merged.to(out_dtype or weight.dtype)


def plan_updates(adapters: list[tuple[Adapter, float]], base: BaseCheckpoint, force: bool,
                 paths: list[str | None] | None = None) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    """Map base tensor names to the module updates and payload replacements that touch them.

    ``paths`` name the adapters in error messages.
    """
    from ..validate import bind_base
    updates: dict[str, list] = {}
    replacements: dict[str, torch.Tensor] = {}
    for (adapter, scale), path in zip(adapters, paths or [None] * len(adapters)):
        if not force:
            bind_base(adapter, base, path, check_only=True)
        for target, entry in adapter.manifest.modules.items():
            updates.setdefault(entry.base_weight, []).append((adapter, scale, target))
        for payload in adapter.manifest.payloads.values():
            tensor = adapter.tensors[payload.tensor.name]
            if payload.kind == "bias_delta":
                replacements[payload.target] = base.get(payload.target).float() + scale * tensor.float()
            else:
                if scale != 1.0:
                    raise UsageError(f"payload {payload.target!r} replaces a whole tensor and cannot be weighted",
                                     hint="merge this adapter with weight 1")
                replacements[payload.target] = tensor
    return updates, replacements


def merge(base_dir: Path | str, adapters: list[tuple[Path | str | Adapter, float]], out_dir: Path | str, *,
          dtype: str = "keep", force: bool = False, overwrite: bool = False, progress: bool = False) -> MergeSummary:
    """Merge adapters into a base model directory and write a new model directory.

    Example:
        >>> merge("tiny-llama", [("adapter.safetensors", 1.0)], "merged")  # doctest: +SKIP
    """
    start = time.perf_counter()
    base = BaseCheckpoint(base_dir)
    out_dir = Path(out_dir)
    for source, weight in adapters:
        if not math.isfinite(float(weight)):
            raise UsageError(f"adapter weight {weight} is not a finite number",
                             path=None if isinstance(source, Adapter) else source,
                             hint="give --adapter FILE:WEIGHT with a finite WEIGHT such as 0.5")
    inputs = [Path(base_dir)] + [Path(a) for a, _ in adapters if not isinstance(a, Adapter)]
    check_output_path(out_dir, inputs)
    loaded = [(a if isinstance(a, Adapter) else read_adapter(a), float(w)) for a, w in adapters]
    paths = [None if isinstance(a, Adapter) else str(a) for a, _ in adapters]
    for (adapter, _), path in zip(loaded, paths):
        require_finite(adapter, path)
    updates, replacements = plan_updates(loaded, base, force, paths)
    out_dtype = OUT_DTYPES[dtype]
    summary = MergeSummary(out=str(out_dir))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        bar = tqdm(total=len(base.names()), unit="tensor", disable=not progress, desc="merge")
        for shard, names in base.iter_shards():
            out_tensors = {}
            for name in names:
                tensor = base.get(name)
                if name in replacements:
                    # A replaced tensor (modules_to_save, saved base_layer) is what adapters apply to.
                    tensor = replacements[name].to(tensor.dtype)
                if name in updates:
                    tensor = apply_adapters(name, tensor, updates[name], out_dtype)
                elif name in replacements and out_dtype is not None:
                    tensor = tensor.to(out_dtype)
                elif out_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(out_dtype)
                summary.tensors_changed += name in replacements or name in updates
                out_tensors[name] = tensor
                bar.update(1)
            save_file(out_tensors, str(tmp / shard.name), metadata={"format": "pt"})
            summary.tensors_total += len(names)
        bar.close()
        for item in base.root.iterdir():
            if item.is_file() and item not in base.shard_files and not item.name.startswith("."):
                if item.suffix in (".bin", ".pt", ".pth", ".safetensors") and item.name != INDEX_FILE:
                    continue
                shutil.copy2(item, tmp / item.name)
        if base.path.is_file():
            summary.notes.append("base was a single file; no config copied")
    summary.seconds = time.perf_counter() - start
    return summary
