"""Raw PEFT OLoRA/PiSSA adapters (saved WITHOUT ``path_initial_model_for_weight_conversion``).

Their A, B are relative to a residual base PEFT made at init, so we need the ORIGINAL base
(``--base``) and recompute the init exactly as PEFT 0.21.2's ``olora_init``/``pissa_init`` do
(fp32, same operation order), or read it from the saved untrained adapter (``--init-snapshot``).
The result is stored against the original base as method ``olora``/``pissa``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...errors import ForeignFormatError
from ...format import Adapter
from ...format.dtypes import dtype_name
from ...methods.descriptor import tensor_refs
from ...methods.init_relative import init_relative_params
from .config import read_config
from .state import peft_to_adapter, read_weights

NITER_RE = re.compile(r"^pissa_niter_(\d+)$")


def init_kind(init: Any) -> str | None:
    """``olora``, ``pissa`` or ``pissa_niter`` for the inits we can handle; None otherwise.

    Example:
        >>> init_kind("pissa_niter_4"), init_kind("OLoRA"), init_kind("corda")
        ('pissa_niter', 'olora', None)
    """
    if not isinstance(init, str):
        return None
    if init.lower() == "olora":
        return "olora"
    if init == "pissa":
        return "pissa"
    return "pissa_niter" if NITER_RE.match(init) else None


def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``olora_init``: fp32 reduced QR of W (out×in); (A0 = R[:r], B0 = Q[:, :r]).

    Example:
        >>> a0, b0 = olora_factors(torch.randn(6, 5), 2)
        >>> a0.shape, b0.shape
        (torch.Size([2, 5]), torch.Size([6, 2]))
    """
    q, r = torch.linalg.qr(weight.to(torch.float32))
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``pissa_init`` (full SVD): A0 = diag(√(S_r/s))·Vh_r, B0 = U_r·diag(√(S_r/s)).

    Example:
        >>> a0, b0 = pissa_factors(torch.randn(6, 5), 2, 1.0)
        >>> a0.shape, b0.shape
        (torch.Size([2, 5]), torch.Size([6, 2]))
    """
    v, s, uh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    vr, sr, uhr = v[:, :rank], s[:rank], uh[:rank]
    sr /= scale
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def residual_error(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scale: float,
                   dtype: torch.dtype) -> float:
    """max|E|, E = cast(W − (s·B0)·A0) − (W − (s·B0)·A0): the residual's rounding (PEFT's order).

    Example:
        >>> residual_error(torch.randn(4, 3), torch.randn(1, 3), torch.randn(4, 1), 1.0, torch.float32)
        0.0
    """
    exact = weight.to(torch.float32) - scale * b0.float() @ a0.float()
    return float((exact.to(dtype).float() - exact).abs().max())


def _snapshot_state(snapshot: Path) -> dict[str, torch.Tensor]:
    read_config(snapshot)
    return read_weights(snapshot, allow_pickle=False)


def read_mutating(config: dict[str, Any], state: dict[str, torch.Tensor], path: Path, options,
                  report) -> Adapter:
    """Import a raw OLoRA/PiSSA PEFT adapter against the original base (``options.base``)."""
    init = config.get("init_lora_weights")
    kind = init_kind(init)
    if kind is None:
        raise ForeignFormatError(
            f"init_lora_weights={init!r}: the adapter is relative to a base that PEFT modified at init",
            path=path, hint="adapterfmt can reconstruct olora, pissa and pissa_niter_N only; save it with "
                            "PEFT's path_initial_model_for_weight_conversion")
    snapshot = options.format.init_snapshot
    if options.base is None:
        raise ForeignFormatError(f"init_lora_weights={init!r}: the adapter is relative to a residual base PEFT "
                                 "made at init", path=path,
                                 hint="convert with --base pointing at the ORIGINAL (unmodified) base model")
    if kind == "pissa_niter" and snapshot is None:
        raise ForeignFormatError(f"init_lora_weights={init!r} used a randomised SVD whose seed PEFT does not "
                                 "store, so the init cannot be recomputed", path=path,
                                 hint="pass --init-snapshot DIR (the untrained PEFT adapter saved before "
                                      "training), or save with path_initial_model_for_weight_conversion")
    if config.get("target_parameters"):
        raise ForeignFormatError(f"init_lora_weights={init!r} with target_parameters is not supported", path=path,
                                 hint="save it with PEFT's path_initial_model_for_weight_conversion")
    if config.get("use_dora"):
        raise ForeignFormatError(f"init_lora_weights={init!r} with use_dora is not supported", path=path,
                                 hint="save it with PEFT's path_initial_model_for_weight_conversion")
    adapter = peft_to_adapter({**config, "init_lora_weights": True}, state, path, options, report)
    snap = _snapshot_state(Path(snapshot)) if snapshot is not None else None
    method = "olora" if kind == "olora" else "pissa"
    tensors = dict(adapter.tensors)
    for target, entry in adapter.manifest.modules.items():
        if entry.layer == "embedding":
            continue  # PEFT's Embedding layer never runs the OLoRA/PiSSA init: plain LoRA.
        p = entry.params
        raw = options.base.get(entry.base_weight)
        weight = entry.canonical(raw.float())
        if snap is not None:
            a0, b0 = _from_snapshot(snap, target, Path(snapshot))
        elif kind == "olora":
            a0, b0 = olora_factors(weight, p["rank"])
        else:
            a0, b0 = pissa_factors(weight, p["rank"], p["scale"])
        err = residual_error(weight, a0, b0, p["scale"], raw.dtype)
        module = adapter.module_tensors(target)
        new = {"lora_A": module["lora_A"], "lora_B": module["lora_B"], "lora_A0": a0, "lora_B0": b0}
        if list(a0.shape) != list(module["lora_A"].shape) or list(b0.shape) != list(module["lora_B"].shape):
            raise ForeignFormatError(f"module {target!r}: init factors {list(a0.shape)}/{list(b0.shape)} do not "
                                     "match the trained ones", path=path, hint="wrong --init-snapshot?")
        for ref in entry.tensors.values():
            tensors.pop(ref.name, None)
        entry.method = method
        entry.params = init_relative_params(p["rank"], p["alpha"], p["use_rslora"], init,
                                            residual_dtype=dtype_name(raw.dtype), max_abs_residual_error=err,
                                            init_source="snapshot" if snap is not None else "recomputed")
        entry.tensors = tensor_refs(target, new)
        tensors.update({ref.name: new[role] for role, ref in entry.tensors.items()})
    adapter.tensors = tensors
    adapter.manifest.source = {"format": "peft", "config": config}
    report.notes.append(f"{method}: init {'read from ' + str(snapshot) if snap is not None else 'recomputed'} "
                        "against the original base; stored relative to it")
    return adapter


def _from_snapshot(snap: dict[str, torch.Tensor], target: str, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    keys = (f"base_model.model.{target}.lora_A.weight", f"base_model.model.{target}.lora_B.weight")
    missing = [k for k in keys if k not in snap]
    if missing:
        raise ForeignFormatError(f"init snapshot lacks {missing[0]!r}", path=where,
                                 hint="pass the untrained adapter saved from the same get_peft_model call")
    return snap[keys[0]].float().contiguous(), snap[keys[1]].float().contiguous()
