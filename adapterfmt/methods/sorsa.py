"""SORSA (Cao 2024): principal singular factors U_p (out×r), S_p (r), Vt_p (r×in) plus their init.

ΔW against the ORIGINAL base = s·(U_p·diag(S_p)·Vt_p − U_p0·diag(S_p0)·Vt_p0), s = 1 when the
official ``alpha`` is None, else alpha/r. The residual's rounding E (full rank) is recorded only
as ``max_abs_residual_error``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..conversion_report import EXACT_MATH
from .descriptor import Method, Params, Role, refuse_conversion, take_rows, tensor_refs
from .linalg import orthonormality_error
from .lora import lora_params

TRAINED = ("U_p", "S_p", "Vt_p")
INIT = ("U_p0", "S_p0", "Vt_p0")


class SorsaParams(Params):
    rank: int = Field(ge=1)
    alpha: float | None
    scale: float
    init_source: Literal["recomputed", "snapshot"] | None = None
    residual_dtype: Literal["F64", "F32", "F16", "BF16"] | None = None
    max_abs_residual_error: float | None = Field(default=None, ge=0)


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


class SORSA(Method):
    name = "sorsa"
    summary = "orthonormal-regularised singular-vector adaptation (Cao 2024), stored against the original base"
    params_model = SorsaParams
    roles = (Role("U_p", ("out", "r")), Role("S_p", ("r",)), Role("Vt_p", ("r", "in")),
             Role("U_p0", ("out", "r"), trained=False), Role("S_p0", ("r",), trained=False),
             Role("Vt_p0", ("r", "in"), trained=False))
    formula = "ΔW = scale·(U_p·diag(S_p)·Vt_p − U_p0·diag(S_p0)·Vt_p0)"
    spec_file = "methods-principal.md"

    def expected_scale(self, params):
        return sorsa_scale(params.rank, params.alpha)

    row_separable = True

    def delta(self, entry, tensors, base=None, rows=None):
        trained = _product(take_rows(tensors["U_p"], rows), tensors["S_p"], tensors["Vt_p"])
        init = _product(take_rows(tensors["U_p0"], rows), tensors["S_p0"], tensors["Vt_p0"])
        return (trained - init) * float(entry.params["scale"])

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Rank-2r plain LoRA: B' = [U·diag(S), −U0·diag(S0)], A' = [Vt; Vt0], α' = s·2r."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        dtype = tensors["U_p"].dtype if tensors["U_p"].dtype == torch.float64 else torch.float32
        b = torch.cat([tensors["U_p"].to(dtype) * tensors["S_p"].to(dtype),
                       -(tensors["U_p0"].to(dtype) * tensors["S_p0"].to(dtype))], 1)
        a = torch.cat([tensors["Vt_p"].to(dtype), tensors["Vt_p0"].to(dtype)], 0)
        rank = 2 * int(entry.params["rank"])
        new = {"lora_A": a.contiguous(), "lora_B": b.contiguous()}
        entry2 = entry.replace(method="lora", params=lora_params(rank, entry.params["scale"] * rank, False),
                               tensors=tensor_refs(target, new))
        note = f"rank {entry.params['rank']} -> {rank}, S folded into B"
        if entry.params.get("max_abs_residual_error"):
            note += f"; residual rounding max|E|={entry.params['max_abs_residual_error']:.3g} not representable"
        return entry2, new, EXACT_MATH, note

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


SORSA_METHOD = SORSA()
