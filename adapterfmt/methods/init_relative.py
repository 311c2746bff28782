"""OLoRA and PiSSA: LoRA whose base was replaced by W − s·B0·A0 at init, stored against the ORIGINAL W.

One descriptor, registered twice (``olora``: B0 = Q[:, :r], A0 = R[:r] of the fp32 QR of W;
``pissa``: A0, B0 = √(S_r/s)-scaled principal singular factors). ΔW = s·(B·A − B0·A0); the
residual's rounding error E is not representable and is only recorded (``max_abs_residual_error``).
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field

from ..conversion_report import EXACT_MATH
from ..errors import ManifestError
from .descriptor import Method, Role, refuse_conversion, take_rows, tensor_refs
from .linalg import orthonormality_error, unit_columns
from .lora import LoraParams, lora_params, lora_scale


class InitRelativeParams(LoraParams):
    init: str = Field(pattern=r"^(olora|pissa|pissa_niter_[0-9]+)$")
    init_source: Literal["recomputed", "snapshot"] | None = None
    residual_dtype: Literal["F64", "F32", "F16", "BF16"] | None = None
    max_abs_residual_error: float | None = Field(default=None, ge=0)


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


class InitRelativeLoRA(Method):
    """ΔW = s·(B·A − B0·A0) against the original base; ``init_columns_normalised`` for PiSSA's B0."""

    params_model = InitRelativeParams
    roles = (Role("lora_A", ("r", "in")), Role("lora_B", ("out", "r")),
             Role("lora_A0", ("r", "in"), trained=False), Role("lora_B0", ("out", "r"), trained=False))
    row_separable = True
    converts_to = ("lora",)
    formula = "ΔW = scale·(B·A − B0·A0)"
    spec_file = "methods-principal.md"

    def __init__(self, name: str, summary: str, init_columns_normalised: bool, init_pattern: str):
        self.name = name
        self.summary = summary
        self._normalise_init = init_columns_normalised
        self._init_pattern = re.compile(init_pattern)

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        if not self._init_pattern.fullmatch(params.init):
            raise ManifestError(f"module {target!r}: method {self.name} with init {params.init!r}", path=path,
                                hint="params.init must name this method's initialisation; re-export the adapter")
        return params

    def expected_scale(self, params):
        return lora_scale(params.rank, params.alpha, params.use_rslora)

    def delta(self, entry, tensors, base=None, rows=None):
        trained = take_rows(tensors["lora_B"], rows).float() @ tensors["lora_A"].float()
        init = take_rows(tensors["lora_B0"], rows).float() @ tensors["lora_A0"].float()
        return (trained - init) * float(entry.params["scale"])

    def convert_to(self, target, entry, tensors, to, options):
        """Rank-2r plain LoRA: A' = [A; A0], B' = [B, −B0]; α' = 2α (rsLoRA: √2·α)."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        p = entry.params
        a = torch.cat([tensors["lora_A"], tensors["lora_A0"].to(tensors["lora_A"].dtype)], 0)
        b = torch.cat([tensors["lora_B"], -tensors["lora_B0"].to(tensors["lora_B"].dtype)], 1)
        rank = 2 * int(p["rank"])
        alpha = p["alpha"] * (math.sqrt(2) if p["use_rslora"] else 2)
        new = {"lora_A": a.contiguous(), "lora_B": b.contiguous()}
        entry2 = entry.replace(method="lora", params=lora_params(rank, alpha, p["use_rslora"]),
                               tensors=tensor_refs(target, new))
        note = f"rank {p['rank']} -> {rank}, B0·A0 kept as negative half"
        if p.get("max_abs_residual_error"):
            note += f"; residual rounding max|E|={p['max_abs_residual_error']:.3g} not representable"
        return entry2, new, EXACT_MATH, note

    def validate_module(self, target, entry, tensors, base):
        init_b = tensors["lora_B0"]
        measures = {"trained_B_orthonormality_error": orthonormality_error(unit_columns(tensors["lora_B"]), False),
                    "init_B0_orthonormality_error": orthonormality_error(
                        unit_columns(init_b) if self._normalise_init else init_b, False)}
        if entry.params.get("max_abs_residual_error") is not None:
            measures["max_abs_residual_error"] = float(entry.params["max_abs_residual_error"])
        return [], measures


OLORA = InitRelativeLoRA("olora", "QR-initialised LoRA (Büyükakyüz 2024); stored against the original base "
                         "with init B0, A0", init_columns_normalised=False, init_pattern="olora")
# PiSSA's B0 = U_r·diag(√(S_r/s)) has orthogonal, not orthonormal, columns: normalise before measuring.
PISSA = InitRelativeLoRA("pissa", "principal-SVD-initialised LoRA (Meng et al. 2024); stored against the "
                         "original base with B0, A0", init_columns_normalised=True,
                         init_pattern=r"pissa|pissa_niter_[0-9]+")
