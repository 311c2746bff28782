"""``convert``: read any registered format, optionally change method, write any registered format."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import check_output_path
from .engine.checkpoint import BaseCheckpoint
from .errors import LossyConversionError
from .format import Adapter
from .formats._shared import base_config_summary
from .hub import is_hub, resolve_path
from .format.container import require_finite
from .formats import ReadOptions, detect_format, get_format
from .methods import get_method
from .validation import bind_base
from .report import LOSSLESS, LOSSY, ConversionReport, progress


def convert_methods(adapter: Adapter, to: str, options: dict[str, Any], report: ConversionReport) -> Adapter:
    """Convert every module whose method differs from ``to``; statuses go into ``report``.

    Example:
        >>> lora = convert_methods(nola_adapter, "lora", {}, ConversionReport())  # doctest: +SKIP
    """
    manifest = adapter.manifest
    tensors = dict(adapter.tensors)
    for target, entry in progress(list(manifest.modules.items()), f"convert to {to}"):
        if entry.method == to:
            continue
        method = get_method(entry.method)
        old_tensors = adapter.module_tensors(target)
        new_entry, new_tensors, status, note = method.convert_module(target, entry, old_tensors, to, options)
        for ref in entry.tensors.values():
            tensors.pop(ref.name, None)
        for role, ref in new_entry.tensors.items():
            tensors[ref.name] = new_tensors[role]
        manifest.modules[target] = new_entry
        reference = result = None
        if not method.needs_base and not get_method(to).needs_base:
            # Measure what the conversion did to ΔW (fp64 comparison in the report).
            reference = method.delta(entry, old_tensors)
            result = get_method(to).delta(new_entry, new_tensors)
        report.add(target, status, f"{entry.method} -> {to}" + (f": {note}" if note else ""),
                   reference=reference, result=result)
    return Adapter(manifest=manifest, tensors=tensors, version=adapter.version)


def convert(src: Path | str, dst: Path | str, *, to: str = "adapterfmt", source_format: str | None = None,
            base: Path | str | None = None, method: str | None = None, allow_pickle: bool = False,
            overwrite: bool = False, strict: bool = False, method_options: dict[str, Any] | None = None,
            write_options: dict[str, Any] | None = None, resize: dict[str, Any] | None = None) -> ConversionReport:
    """Convert an adapter between formats (and methods); returns the per-module report.

    Example:
        >>> report = convert("peft-dir", "adapter.safetensors", to="adapterfmt")  # doctest: +SKIP
        >>> report.worst  # doctest: +SKIP
        'lossless'
    """
    src, dst = resolve_path(src), Path(dst)
    check_output_path(dst, [src] + ([Path(base)] if base and not is_hub(base) else []))
    reader = get_format(source_format) if source_format else detect_format(src)
    writer = get_format(to)
    report = ConversionReport(source_format=reader.name, target_format=writer.name)
    read_report = ConversionReport()
    checkpoint = BaseCheckpoint(base) if base else None
    options = ReadOptions(base=checkpoint, allow_pickle=allow_pickle, extra=dict(method_options or {}))
    adapter = reader.read(src, options, read_report)
    if checkpoint is not None and checkpoint.config:
        # Head counts, layer count etc. travel with the adapter (GGUF/MLX export need them later).
        adapter.manifest.source.setdefault("base_config", base_config_summary(checkpoint.config))
    require_finite(adapter, src)
    if checkpoint is not None:
        bind_base(adapter, checkpoint, str(src))
    report.notes += read_report.notes
    statuses = {m.module: m for m in read_report.modules}
    method_report = ConversionReport()
    wanted = method
    if wanted is None and writer.writes_methods is not None:
        foreign = [m for m in adapter.manifest.methods() if m not in writer.writes_methods]
        if foreign:
            wanted = "lora"
            report.notes.append(f"{writer.name} cannot hold {', '.join(foreign)}: materialised as LoRA")
    if wanted is None and resize is not None and set(adapter.manifest.methods()) - {"lora", "dora"}:
        wanted = "lora"  # rank changes work on LoRA factors
    if wanted is not None:
        adapter = convert_methods(adapter, wanted, dict(method_options or {}), method_report)
    if resize is not None:  # {} = exact compaction; {"rank": N} or {"energy": F} truncate
        from .rank import resize_adapter
        adapter = resize_adapter(adapter, method_report, **resize)
    if strict and method_report.worst == LOSSY:
        lossy = [m.module for m in method_report.modules if m.status == LOSSY]
        raise LossyConversionError(f"conversion is lossy for {len(lossy)} module(s) (first: {lossy[0]}) "
                                   "and --strict was given; nothing was written", path=src,
                                   hint="drop --strict to accept the measured loss")
    write_report = ConversionReport()
    # strict travels to the writer: a scale fold that is not exact must be refused before writing.
    writer.write(adapter, dst, write_report, overwrite=overwrite, base=checkpoint, strict=strict,
                 **(write_options or {}))
    order = [LOSSLESS, "exact", "scale_folded", LOSSY]
    for stage in (method_report, write_report):
        for m in stage.modules:
            prev = statuses.get(m.module)
            if prev is None or order.index(m.status) >= order.index(prev.status):
                if prev is not None and prev.note and not m.note:
                    m.note = prev.note
                statuses[m.module] = m
    report.modules = [statuses[k] for k in sorted(statuses)]
    report.notes += write_report.notes
    return report
