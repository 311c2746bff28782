"""Shared code of the methods that mutate the base at init (OLoRA, PiSSA): ΔW = s·(B·A − B0·A0).

They are stored relative to the ORIGINAL base (spec/methods-principal.md): the trained factors
plus the exact init factors. The residual's rounding error E is not representable and is only
recorded (``max_abs_residual_error``). Not a method itself, so it registers nothing.
"""
from __future__ import annotations

import math

import torch

from ..errors import ManifestError
from ..format.fingerprint import dtype_name
from ..format.manifest import ModuleEntry, TensorRef
from ..lowrank import orthonormality_error
from .base import AdapterMethod, expect_shape, lora_scale, take_rows
from .lora import lora_params

MUTATING_ROLES = ("lora_A", "lora_B", "lora_A0", "lora_B0")


def init_relative_params(rank: int, alpha: float, use_rslora: bool, init: str, *,
                         residual_dtype: str | None = None, max_abs_residual_error: float | None = None,
                         init_source: str = "recomputed") -> dict:
    """Params of an OLoRA/PiSSA module entry.

    Example:
        >>> init_relative_params(4, 8, False, "olora")["scale"]
        2.0
    """
    params = lora_params(rank, alpha, use_rslora)
    params.update(init=init, init_source=init_source, residual_dtype=residual_dtype,
                  max_abs_residual_error=max_abs_residual_error)
    return params


def tensor_refs(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    """TensorRefs for role->tensor, named ``prefix.role`` in the container."""
    return {role: TensorRef(f"{prefix}.{role}", dtype_name(t.dtype), list(t.shape)) for role, t in tensors.items()}


class InitRelativeLoRA(AdapterMethod):
    """LoRA whose base was replaced by W − s·B0·A0 at init; stored against the original W."""

    roles = MUTATING_ROLES

    def check_entry(self, target: str, entry: ModuleEntry, path: str | None = None) -> None:
        super().check_entry(target, entry, path)
        out_f, in_f = entry.shape
        rank = int(entry.params["rank"])
        for role, shape in (("lora_A", [rank, in_f]), ("lora_B", [out_f, rank]),
                            ("lora_A0", [rank, in_f]), ("lora_B0", [out_f, rank])):
            expect_shape(target, role, entry.tensors[role].shape, shape, path)
        scale = lora_scale(rank, entry.params["alpha"], entry.params["use_rslora"])
        if not math.isclose(scale, entry.params["scale"], rel_tol=1e-12):
            raise ManifestError(f"module {target!r}: scale {entry.params['scale']} disagrees with rank/alpha "
                                f"(= {scale})", path=path, hint="the manifest is inconsistent; re-export it")

    row_separable = True

    def delta(self, entry, tensors, base=None, rows=None):
        trained = take_rows(tensors["lora_B"], rows).float() @ tensors["lora_A"].float()
        init = take_rows(tensors["lora_B0"], rows).float() @ tensors["lora_A0"].float()
        return (trained - init) * float(entry.params["scale"])

    converts_to = ("lora",)

    def convert_module(self, target, entry, tensors, to, options):
        """Rank-2r plain LoRA: A' = [A; A0], B' = [B, −B0]; α' = 2α (rsLoRA: √2·α)."""
        if to != "lora":
            return super().convert_module(target, entry, tensors, to, options)
        p = entry.params
        a = torch.cat([tensors["lora_A"], tensors["lora_A0"].to(tensors["lora_A"].dtype)], 0)
        b = torch.cat([tensors["lora_B"], -tensors["lora_B0"].to(tensors["lora_B"].dtype)], 1)
        rank = 2 * int(p["rank"])
        alpha = p["alpha"] * (math.sqrt(2) if p["use_rslora"] else 2)
        new = {"lora_A": a.contiguous(), "lora_B": b.contiguous()}
        entry2 = ModuleEntry(method="lora", base_weight=entry.base_weight, shape=list(entry.shape),
                             params=lora_params(rank, alpha, p["use_rslora"]), tensors=tensor_refs(target, new),
                             fan_in_fan_out=entry.fan_in_fan_out, layer=entry.layer)
        note = f"rank {p['rank']} -> {rank}, B0·A0 kept as negative half"
        if p.get("max_abs_residual_error"):
            note += f"; residual rounding max|E|={p['max_abs_residual_error']:.3g} not representable"
        return entry2, new, "exact", note

    def parameter_count(self, entry):
        # Only A and B are trained; A0/B0 are frozen init state.
        return sum(math.prod(entry.tensors[r].shape) for r in ("lora_A", "lora_B"))

    def validate_module(self, target, entry, tensors, base):
        measures = {"trained_B_orthonormality_error": orthonormality_error(_unit_columns(tensors["lora_B"]), False),
                    "init_B0_orthonormality_error": orthonormality_error(self._init_columns(tensors), False)}
        if entry.params.get("max_abs_residual_error") is not None:
            measures["max_abs_residual_error"] = float(entry.params["max_abs_residual_error"])
        return [], measures

    def _init_columns(self, tensors):
        return tensors["lora_B0"]


def _unit_columns(m: torch.Tensor) -> torch.Tensor:
    m = m.double()
    norms = torch.linalg.norm(m, dim=0).clamp_min(1e-300)
    return m / norms
