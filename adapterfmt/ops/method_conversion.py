"""Converting every module of an adapter to one method, with the per-module status and measured error."""
from __future__ import annotations

from typing import Any

from ..conversion_report import LOSSY, ConversionReport
from ..errors import UsageError
from ..format import Adapter
from ..methods import convert_module, get_method
from ..methods.descriptor import tensor_refs
from ..methods.linalg import energy_rank, truncated_svd
from ..methods.lora import lora_params
from ..progress import progress


def dense_to_lora(target: str, entry, tensors, base, rank: int | None, energy: float | None):
    """A LoRA for a method with no exact LoRA form (IA³, OFT, BOFT, FourierFT): the truncated SVD of its
    ΔW (against the base when the method needs it), at ``rank`` or the rank keeping ``energy``. Lossy:
    the caller reports the measured error.

    Example:
        >>> dense_to_lora("m", ia3_entry, ia3_tensors, base, 8, None)  # doctest: +SKIP
    """
    method = get_method(entry.method)
    weight = None
    if method.needs_base:
        if base is None:
            raise UsageError(f"module {target!r}: {entry.method}'s ΔW depends on the base weight",
                             hint="pass --base to convert it to a LoRA of --rank N / --energy F")
        weight = entry.canonical(base.get(entry.base_weight).float())
    if entry.layer not in ("linear", "conv1d", "embedding"):
        raise UsageError(f"module {target!r}: a {entry.layer} layer has no dense LoRA form",
                         hint="keep the method, or drop that module")
    delta = method.delta(entry, tensors, weight).float()
    a, b, sigma = truncated_svd(delta, min(delta.shape))
    keep = max(1, min(rank if rank is not None else energy_rank(sigma, energy), a.shape[0]))
    new = {"lora_A": a[:keep].contiguous(), "lora_B": b[:, :keep].contiguous()}
    new_entry = entry.replace(method="lora", params=lora_params(keep, float(keep), False),
                              tensors=tensor_refs(target, new))
    return new_entry, new, delta


def convert_methods(adapter: Adapter, to: str, options: dict[str, Any], report: ConversionReport, *,
                    base=None, dense: dict[str, Any] | None = None) -> Adapter:
    """Convert every module whose method differs from ``to``; statuses go into ``report``.

    ``dense`` (``{"rank": N}`` or ``{"energy": F}``, from ``--rank``/``--energy``): a module that has no
    exact conversion to LoRA gets the truncated SVD of its ΔW instead (``base`` for base-dependent
    methods), reported lossy with the measured error; without it such a module is refused.

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
        exact = to in method.converts_to or entry.method in get_method(to).converts_from
        if not exact and to == "lora" and dense and (dense.get("rank") or dense.get("energy")):
            new_entry, new_tensors, delta = dense_to_lora(target, entry, old_tensors, base, dense.get("rank"),
                                                          dense.get("energy"))
            _replace(manifest, tensors, target, entry, new_entry, new_tensors)
            report.add(target, LOSSY, f"{entry.method} -> lora: truncated SVD of ΔW at rank "
                                      f"{new_entry.params['rank']}", reference=delta,
                       result=new_tensors["lora_B"].double() @ new_tensors["lora_A"].double())
            continue
        new_entry, new_tensors, status, note = convert_module(target, entry, old_tensors, to, options)
        _replace(manifest, tensors, target, entry, new_entry, new_tensors)
        reference = result = None
        if not method.needs_base and not into.needs_base:
            # Measure what the conversion did to ΔW (fp64 comparison in the report).
            reference = method.delta(entry, old_tensors)
            result = into.delta(new_entry, new_tensors)
        report.add(target, status, f"{entry.method} -> {to}" + (f": {note}" if note else ""),
                   reference=reference, result=result)
    return Adapter(manifest=manifest, tensors=tensors, version=adapter.version)


def _replace(manifest, tensors: dict, target: str, entry, new_entry, new_tensors: dict) -> None:
    for ref in entry.tensors.values():
        tensors.pop(ref.name, None)
    for role, ref in new_entry.tensors.items():
        tensors[ref.name] = new_tensors[role]
    manifest.modules[target] = new_entry
