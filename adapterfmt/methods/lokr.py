"""LoKr (Yeh et al. 2023, LyCORIS): ΔW = scale·(W1 ⊗ W2), each half full or a low-rank product.

W1 is (a×c), W2 is (b×d) with out = a·b, in = c·d. The scale is stored explicitly because the two
ecosystems disagree when both halves are full: PEFT applies alpha/r, LyCORIS applies 1
(``convention`` records which rule produced ``scale``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..errors import ManifestError
from .descriptor import SCALE_RTOL, Method, Params, Role, refuse_conversion
from .loha import exact_lora

HALVES = {"w1": ("w1_a", "w1_b"), "w2": ("w2_a", "w2_b")}


class LokrParams(Params):
    #: (a, c): W1's shape; (b, d): W2's shape; out = a·b, in = c·d.
    w1_shape: list[int] = Field(min_length=2, max_length=2)
    w2_shape: list[int] = Field(min_length=2, max_length=2)
    rank: int = Field(ge=1)
    alpha: float
    convention: Literal["peft", "lycoris"]
    scale: float


def lokr_scale(convention: str, rank: int, alpha: float, both_full: bool) -> float:
    """PEFT: alpha/r always; LyCORIS: 1 when both halves are full, else alpha/r.

    Example:
        >>> lokr_scale("peft", 4, 8, True), lokr_scale("lycoris", 4, 8, True)
        (2.0, 1.0)
    """
    return 1.0 if convention == "lycoris" and both_full else alpha / rank


def _half(tensors: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    if which in tensors:
        return tensors[which].float()
    low, high = HALVES[which]
    return tensors[low].float() @ tensors[high].float()


class LoKr(Method):
    name = "lokr"
    summary = "Kronecker product of two (optionally low-rank) factors (LoKr, LyCORIS)"
    params_model = LokrParams
    roles = (Role("w1", ("a", "c"), required=False), Role("w1_a", ("a", "r"), required=False),
             Role("w1_b", ("r", "c"), required=False), Role("w2", ("b", "d"), required=False),
             Role("w2_a", ("b", "r"), required=False), Role("w2_b", ("r", "d"), required=False))
    row_separable = True
    layers = ("linear",)
    formula = "ΔW = scale·(W1 ⊗ W2), W1 = w1 or w1_a·w1_b, W2 = w2 or w2_a·w2_b"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        dims = super().dims(entry, params)
        (dims["a"], dims["c"]), (dims["b"], dims["d"]) = params.w1_shape, params.w2_shape
        return dims

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        for which, (low, high) in HALVES.items():
            full, parts = which in entry.tensors, [k for k in (low, high) if k in entry.tensors]
            if full == bool(parts) or (parts and len(parts) != 2):
                raise ManifestError(f"module {target!r} (lokr): needs either {which} or both {low} and {high}",
                                    path=path, hint="the manifest is damaged; re-export the adapter")
        a, c = params.w1_shape
        b, d = params.w2_shape
        if a * b != entry.shape[0] or c * d != entry.shape[1]:
            raise ManifestError(f"module {target!r} (lokr): factors {a}x{b}, {c}x{d} do not give {entry.shape}",
                                path=path, hint="the manifest is inconsistent; re-export the adapter")
        both_full = "w1" in entry.tensors and "w2" in entry.tensors
        expected = lokr_scale(params.convention, params.rank, params.alpha, both_full)
        if not math.isfinite(params.scale) or abs(params.scale - expected) > SCALE_RTOL * abs(expected):
            raise ManifestError(f"module {target!r} (lokr): scale {params.scale!r} disagrees with the "
                                f"{params.convention} rule (= {expected!r})", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        return params

    def delta(self, entry, tensors, base=None, rows=None):
        w1, w2 = _half(tensors, "w1"), _half(tensors, "w2").contiguous()
        scale = float(entry.params["scale"])
        if rows is None:
            return torch.kron(w1, w2).mul_(scale)
        b = w2.shape[0]
        first, last = rows.start // b, math.ceil(rows.stop / b)
        block = torch.kron(w1[first:last], w2).mul_(scale)
        return block[rows.start - first * b: rows.stop - first * b]

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Exact LoRA: kron(U1,U2)·kron(V1,V2), rank(W1)·rank(W2), compacted to the numerical rank."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        u1, v1 = _factors(tensors, "w1")
        u2, v2 = _factors(tensors, "w2")
        b = torch.kron(u1, u2)
        a = torch.kron(v1, v2)
        return exact_lora(self, target, entry, a, b, float(entry.params["scale"]))


def _factors(tensors: dict[str, torch.Tensor], which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) in fp64 with U·V the half; a full half is split as (W, I) or (I, W), whichever is thinner."""
    if which not in tensors:
        low, high = HALVES[which]
        return tensors[low].double().contiguous(), tensors[high].double().contiguous()
    w = tensors[which].double()
    rows, cols = w.shape
    if cols <= rows:
        return w.contiguous(), torch.eye(cols, dtype=torch.float64)
    return torch.eye(rows, dtype=torch.float64), w.contiguous()


LOKR_METHOD = LoKr()
