"""DoRA: W' = diag(m / ||W + s·B·A||_row) (W + s·B·A); the magnitude m is per output row."""
from __future__ import annotations

import torch

from .base import expect_shape, register_method, take_rows
from .lora import LoRA


class DoRA(LoRA):
    name = "dora"
    roles = ("lora_A", "lora_B", "magnitude")
    needs_base = True
    summary = "weight-decomposed LoRA (Liu et al. 2024); needs the base to merge"

    def check_entry(self, target, entry, path=None):
        super().check_entry(target, entry, path)
        expect_shape(target, "magnitude", entry.tensors["magnitude"].shape, [entry.shape[0]], path)

    def merged(self, entry, tensors, base, rows=None):
        # Row norms are per output row, so DoRA stays row-separable.
        combined = base + super().delta(entry, tensors, rows=rows)
        norm = torch.linalg.norm(combined, dim=1)
        return (take_rows(tensors["magnitude"], rows).float() / norm).view(-1, 1) * combined

    def delta(self, entry, tensors, base=None, rows=None):
        if base is None:
            raise ValueError("DoRA's ΔW depends on the base weight; pass base")
        return self.merged(entry, tensors, base, rows) - base


register_method(DoRA())
