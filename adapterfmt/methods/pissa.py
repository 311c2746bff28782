"""PiSSA (PEFT ``init_lora_weights="pissa"``): A0, B0 = √(S_r/s)-scaled principal singular factors.

ΔW against the original base = s·(B·A − B0·A0) (+ the residual's rounding E, recorded only).
"""
from __future__ import annotations

from ._principal import InitRelativeLoRA, _unit_columns
from .base import register_method


class PiSSA(InitRelativeLoRA):
    name = "pissa"
    summary = "principal-SVD-initialised LoRA (Meng et al. 2024); stored against the original base with B0, A0"

    def _init_columns(self, tensors):
        # B0 = U_r·diag(√(S_r/s)): orthogonal, not orthonormal, columns; normalise them first.
        return _unit_columns(tensors["lora_B0"])


register_method(PiSSA())
