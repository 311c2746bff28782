"""SORSA (Cao 2024): principal singular factors U_p (out×r), S_p (r), Vt_p (r×in) plus their init.

ΔW against the ORIGINAL base = s·(U_p·diag(S_p)·Vt_p − U_p0·diag(S_p0)·Vt_p0), s = 1 when the
official ``alpha`` is None, else alpha/r. The residual's rounding E (full rank) is recorded only
as ``max_abs_residual_error``; see spec/methods-principal.md.
"""
from __future__ import annotations

import math

import torch

from ..errors import ManifestError
from ..format.manifest import ModuleEntry
from ..lowrank import orthonormality_error
from ._principal import tensor_refs
from .base import AdapterMethod, expect_shape, register_method, take_rows
from .lora import lora_params

TRAINED = ("U_p", "S_p", "Vt_p")
INIT = ("U_p0", "S_p0", "Vt_p0")


def sorsa_scale(rank: int, alpha: float | None) -> float:
    """The official rule: 1 when alpha is None, else alpha/r.

    Example:
        >>> sorsa_scale(4, None), sorsa_scale(4, 8)
        (1.0, 2.0)
    """
    return 1.0 if alpha is None else float(alpha) / rank


def sorsa_params(rank: int, alpha: float | None, *, residual_dtype: str | None = None,
                 max_abs_residual_error: float | None = None, init_source: str = "recomputed") -> dict:
    """Params of a SORSA module entry.

    Example:
        >>> sorsa_params(4, None)["scale"]
        1.0
    """
    return {"rank": int(rank), "alpha": None if alpha is None else float(alpha),
            "scale": sorsa_scale(rank, alpha), "residual_dtype": residual_dtype,
            "max_abs_residual_error": max_abs_residual_error, "init_source": init_source}


def _product(u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    # (B * S) @ A, the official operation order, in fp32.
    return (u.float() * s.float()) @ vt.float()


class SORSA(AdapterMethod):
    name = "sorsa"
    roles = TRAINED + INIT
    summary = "orthonormal-regularised singular-vector adaptation (Cao 2024), stored against the original base"

    def check_entry(self, target: str, entry: ModuleEntry, path: str | None = None) -> None:
        super().check_entry(target, entry, path)
        out_f, in_f = entry.shape
        rank = int(entry.params["rank"])
        for suffix in ("", "0"):
            expect_shape(target, "U_p" + suffix, entry.tensors["U_p" + suffix].shape, [out_f, rank], path)
            expect_shape(target, "S_p" + suffix, entry.tensors["S_p" + suffix].shape, [rank], path)
            expect_shape(target, "Vt_p" + suffix, entry.tensors["Vt_p" + suffix].shape, [rank, in_f], path)
        scale = sorsa_scale(rank, entry.params["alpha"])
        if not math.isclose(scale, entry.params["scale"], rel_tol=1e-12):
            raise ManifestError(f"module {target!r}: scale {entry.params['scale']} disagrees with rank/alpha "
                                f"(= {scale})", path=path, hint="the manifest is inconsistent; re-export it")

    row_separable = True

    def delta(self, entry, tensors, base=None, rows=None):
        trained = _product(take_rows(tensors["U_p"], rows), tensors["S_p"], tensors["Vt_p"])
        init = _product(take_rows(tensors["U_p0"], rows), tensors["S_p0"], tensors["Vt_p0"])
        return (trained - init) * float(entry.params["scale"])

    converts_to = ("lora",)

    def convert_module(self, target, entry, tensors, to, options):
        """Rank-2r plain LoRA: B' = [U·diag(S), −U0·diag(S0)], A' = [Vt; Vt0], α' = s·2r."""
        if to != "lora":
            return super().convert_module(target, entry, tensors, to, options)
        dtype = tensors["U_p"].dtype if tensors["U_p"].dtype == torch.float64 else torch.float32
        b = torch.cat([tensors["U_p"].to(dtype) * tensors["S_p"].to(dtype),
                       -(tensors["U_p0"].to(dtype) * tensors["S_p0"].to(dtype))], 1)
        a = torch.cat([tensors["Vt_p"].to(dtype), tensors["Vt_p0"].to(dtype)], 0)
        rank = 2 * int(entry.params["rank"])
        new = {"lora_A": a.contiguous(), "lora_B": b.contiguous()}
        entry2 = ModuleEntry(method="lora", base_weight=entry.base_weight, shape=list(entry.shape),
                             params=lora_params(rank, entry.params["scale"] * rank, False),
                             tensors=tensor_refs(target, new), fan_in_fan_out=entry.fan_in_fan_out,
                             layer=entry.layer)
        note = f"rank {entry.params['rank']} -> {rank}, S folded into B"
        if entry.params.get("max_abs_residual_error"):
            note += f"; residual rounding max|E|={entry.params['max_abs_residual_error']:.3g} not representable"
        return entry2, new, "exact", note

    def parameter_count(self, entry):
        return sum(math.prod(entry.tensors[r].shape) for r in TRAINED)

    def validate_module(self, target, entry, tensors, base):
        measures = {
            "U_p_orthonormality_error": orthonormality_error(tensors["U_p"], rows=False),
            "Vt_p_orthonormality_error": orthonormality_error(tensors["Vt_p"], rows=True),
            "U_p0_orthonormality_error": orthonormality_error(tensors["U_p0"], rows=False),
            "Vt_p0_orthonormality_error": orthonormality_error(tensors["Vt_p0"], rows=True),
        }
        if entry.params.get("max_abs_residual_error") is not None:
            measures["max_abs_residual_error"] = float(entry.params["max_abs_residual_error"])
        problems = []
        if bool((tensors["S_p0"].float()[:-1] < tensors["S_p0"].float()[1:]).any()):
            problems.append("S_p0 is not in descending order; the init factors are not an SVD's")
        return problems, measures


register_method(SORSA())
