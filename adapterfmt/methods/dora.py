"""DoRA: W' = diag(m / ‖W + s·B·A‖_row)·(W + s·B·A); the magnitude m is per output row."""
from __future__ import annotations

from typing import Literal

import torch

from .descriptor import Method, Role, take_rows
from .lora import LoRA, LoraParams


class DoraParams(LoraParams):
    magnitude_axis: Literal["out"]


class DoRA(LoRA):
    name = "dora"
    summary = "weight-decomposed LoRA (Liu et al. 2024); needs the base to merge"
    params_model = DoraParams
    roles = LoRA.roles + (Role("magnitude", ("out",)),)
    needs_base = True
    layers = Method.layers  # PEFT has no DoRA for stacked experts (ParamWrapper refuses use_dora)
    formula = "V = W + (B·A)·scale; W' = diag(m / ‖V‖_row)·V"

    def merged(self, entry, tensors, base, rows=None):
        # Row norms are per output row, so DoRA stays row-separable.
        combined = base + super().delta(entry, tensors, rows=rows)
        norm = torch.linalg.norm(combined, dim=1)
        return (take_rows(tensors["magnitude"], rows).float() / norm).view(-1, 1) * combined

    # ΔW = merged − base (the descriptor's default for base-dependent methods), not LoRA's s·B·A.
    delta = Method.delta


DORA = DoRA()
