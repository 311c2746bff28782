"""Converting every module of an adapter to one method, with the per-module status and measured error."""
from __future__ import annotations

from typing import Any

from ..conversion_report import ConversionReport
from ..format import Adapter
from ..methods import convert_module, get_method
from ..progress import progress


def convert_methods(adapter: Adapter, to: str, options: dict[str, Any], report: ConversionReport) -> Adapter:
    """Convert every module whose method differs from ``to``; statuses go into ``report``.

    Example:
        >>> lora = convert_methods(nola_adapter, "lora", {}, ConversionReport())  # doctest: +SKIP
    """
    manifest = adapter.manifest
    tensors = dict(adapter.tensors)
    into = get_method(to)
    for target, entry in progress(list(manifest.modules.items()), f"convert to {to}"):
        if entry.method == to:
            continue
        method = get_method(entry.method)
        old_tensors = adapter.module_tensors(target)
        new_entry, new_tensors, status, note = convert_module(target, entry, old_tensors, to, options)
        for ref in entry.tensors.values():
            tensors.pop(ref.name, None)
        for role, ref in new_entry.tensors.items():
            tensors[ref.name] = new_tensors[role]
        manifest.modules[target] = new_entry
        reference = result = None
        if not method.needs_base and not into.needs_base:
            # Measure what the conversion did to ΔW (fp64 comparison in the report).
            reference = method.delta(entry, old_tensors)
            result = into.delta(new_entry, new_tensors)
        report.add(target, status, f"{entry.method} -> {to}" + (f": {note}" if note else ""),
                   reference=reference, result=result)
    return Adapter(manifest=manifest, tensors=tensors, version=adapter.version)
