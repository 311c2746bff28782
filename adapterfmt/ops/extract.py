"""``extract``: a LoRA from a full fine-tune (tuned − base) by truncated SVD, like ``mergekit-extract-lora``."""
from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import check_output_path
from ..checkpoint import BaseCheckpoint
from ..conversion_report import EXACT_MATH, LOSSY, ConversionReport
from ..engine.devices import resolve_device
from ..errors import BaseMismatchError, TensorError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry
from ..methods import write_checked_adapter
from ..methods.descriptor import tensor_refs
from ..methods.linalg import truncated_svd
from ..methods.lora import lora_params
from ..progress import progress
from .hub import resolve_path


def _default_targets(base: BaseCheckpoint, tuned: BaseCheckpoint) -> list[str]:
    skip = ("embed", "wte", "wpe", "lm_head", "shared")
    return [n for n in base.names() if n.endswith(".weight") and len(base.shape(n)) == 2 and n in tuned.names()
            and not any(s in n for s in skip)]


def extract(base_dir: Path | str, tuned_dir: Path | str, out: Path | str, *, rank: int, device: str = "auto",
            overwrite: bool = False) -> ConversionReport:
    """Extract a rank-``rank`` LoRA from a full fine-tune (tuned − base) into an adapterfmt file.

    Linear-like 2-D ``.weight`` tensors that changed are extracted (embeddings and heads are
    skipped); each module's error is reported. Other changed tensors are listed in the notes.

    Example:
        >>> report = extract("base", "tuned", "lora.safetensors", rank=16)  # doctest: +SKIP
    """
    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}", hint="give the LoRA rank to extract, e.g. 16")
    out = Path(out)
    check_output_path(out, [Path(base_dir), Path(tuned_dir)])
    if out.exists() and not overwrite:
        raise UsageError("output exists", path=out, hint="pass --overwrite to replace it")
    base, tuned = BaseCheckpoint(resolve_path(base_dir)), BaseCheckpoint(resolve_path(tuned_dir))
    svd_device = resolve_device(device)
    report = ConversionReport(source_format="full fine-tune", target_format="adapterfmt")
    manifest, tensors = Manifest(), {}
    _check_same_model(base, tuned, Path(tuned_dir))
    targets = set(_default_targets(base, tuned))
    skipped = []
    for name in progress(base.names(), "extract"):
        if name not in tuned.names() or base.shape(name) != tuned.shape(name):
            continue
        w0, w1 = base.get(name), tuned.get(name)
        if torch.equal(w0, w1):
            continue
        if name not in targets:
            skipped.append(name)
            continue
        delta = w1.float() - w0.float()
        bad = int((~torch.isfinite(delta)).sum())
        if bad:  # the SVD would fail (or return garbage) on NaN/Inf
            raise TensorError(f"tensor {name!r} has {bad} NaN/Inf value(s) in tuned − base", path=tuned_dir,
                              hint="the fine-tune is corrupt or training diverged; nothing was written")
        a, b, sigma = truncated_svd(delta, rank, svd_device)
        target = name[: -len(".weight")]
        new = {"lora_A": a, "lora_B": b}
        entry = ModuleEntry(method="lora", base_weight=name, shape=list(delta.shape),
                            params=lora_params(a.shape[0], float(a.shape[0]), False), tensors=tensor_refs(target, new))
        manifest.modules[target] = entry
        manifest.base.weights[name] = BaseWeight(shape=list(w0.shape), dtype=base.dtype_name(name),
                                                 fingerprint=base.fingerprint(name))
        tensors.update({ref.name: new[role] for role, ref in entry.tensors.items()})
        kept = float((sigma[: a.shape[0]] ** 2).sum() / (sigma ** 2).sum())
        report.add(target, EXACT_MATH if a.shape[0] >= int((sigma > sigma[0] * max(delta.shape) * 1.2e-7).sum())
                   else LOSSY, f"rank {a.shape[0]}, energy kept {kept:.4f}", reference=delta, result=b @ a)
    if not manifest.modules:
        raise UsageError("no linear weight differs between base and tuned", path=tuned_dir,
                         hint="check that --tuned is a fine-tune of --base")
    if skipped:
        report.notes.append(f"{len(skipped)} changed tensor(s) not extracted (not 2-D linear weights): "
                            + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    manifest.base.name_or_path = base.name_or_path
    manifest.base.architecture = base.architecture
    manifest.source = {"format": "extract", "tuned": str(tuned_dir), "rank": rank}
    write_checked_adapter(Adapter(manifest=manifest, tensors=tensors), out, overwrite=overwrite)
    return report


def _check_same_model(base: BaseCheckpoint, tuned: BaseCheckpoint, where: Path) -> None:
    """A fine-tune has the base's tensor names and shapes; anything else is another model."""
    shared = [n for n in base.names() if n in set(tuned.names())]
    if not shared:
        raise BaseMismatchError(f"shares no weight with --base ({base.architecture} vs {tuned.architecture})",
                                path=where, hint="--tuned must be a fine-tune of --base")
    for name in shared:
        if base.shape(name) != tuned.shape(name):
            raise BaseMismatchError(f"tensor {name!r} has shape {tuned.shape(name)}, --base has {base.shape(name)}",
                                    path=where, hint="--tuned must be a fine-tune of --base")
