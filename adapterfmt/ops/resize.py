"""Rank changes of LoRA/DoRA modules: exact compaction, or lossy truncation with the error measured.

``convert --compact`` keeps the numerical rank (status exact); ``--rank N`` / ``--energy F``
truncate (status lossy unless nothing above the numerical-rank threshold was dropped).
"""
from __future__ import annotations


from ..conversion_report import EXACT_MATH, LOSSY, ConversionReport
from ..engine.devices import resolve_device
from ..errors import UsageError
from ..format import Adapter
from ..methods.descriptor import tensor_refs
from ..methods.linalg import compact, plain_alpha
from ..methods.lora import lora_params
from ..progress import progress

RESIZABLE = ("lora", "dora")


def resize_adapter(adapter: Adapter, report: ConversionReport, *, rank: int | None = None,
                   energy: float | None = None, device: str = "auto") -> Adapter:
    """Re-factor every LoRA/DoRA module: exact compaction by default, else truncate to rank/energy.

    Example:
        >>> small = resize_adapter(adapter, ConversionReport())  # doctest: +SKIP
    """
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    tensors = dict(adapter.tensors)
    device = resolve_device(device)
    for target, entry in progress(list(adapter.manifest.modules.items()), "resize"):
        if entry.method not in RESIZABLE:
            raise UsageError(f"module {target!r} is {entry.method}; only LoRA/DoRA ranks can be changed",
                             hint="convert it to LoRA first (--method lora)")
        if len(entry.shape) != 2 and entry.layer != "conv2d":
            raise UsageError(f"module {target!r} is a {entry.layer} layer ({len(entry.shape)}-D factors); resize "
                             "handles one (out, in) matrix per module",
                             hint="resize an adapter without stacked experts")
        module = adapter.module_tensors(target)
        # conv2d: ΔW is B (out, r, 1, 1) applied to A (r, in, kh, kw), i.e. the matrices (out, r)·(r, in·kh·kw).
        a4, b4 = module["lora_A"], module["lora_B"]
        a, b = a4.reshape(a4.shape[0], -1), b4.reshape(b4.shape[0], -1)
        a2, b2, keep, exact = compact(a.float(), b.float(), rank=rank, energy=energy, device=device)
        a2, b2 = a2.to(a.dtype).reshape(keep, *a4.shape[1:]), b2.to(b.dtype).reshape(b4.shape[0], keep, *b4.shape[2:])
        p = entry.params
        params = dict(p, **lora_params(keep, plain_alpha(p["scale"], keep, p["use_rslora"]), p["use_rslora"]))
        new = dict(module, lora_A=a2, lora_B=b2)
        refs = tensor_refs(target, {"lora_A": a2, "lora_B": b2})
        new_entry = entry.replace(params=params, tensors=dict(entry.tensors, **refs))
        for role in ("lora_A", "lora_B"):
            tensors.pop(entry.tensors[role].name, None)
            tensors[refs[role].name] = new[role]
        # ΔW of LoRA-style factors alone (DoRA's magnitude is untouched by a re-factoring).
        ref = (b.float() @ a.float()) * p["scale"]
        res = (b2.reshape(b.shape[0], keep).float() @ a2.reshape(keep, -1).float()) * params["scale"]
        report.add(target, EXACT_MATH if exact else LOSSY, f"rank {p['rank']} -> {keep}",
                   reference=ref, result=res)
        adapter.manifest.modules[target] = new_entry
    adapter.tensors = tensors
    return adapter
