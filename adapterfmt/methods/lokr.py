"""LoKr (Yeh et al. 2023, LyCORIS): ΔW = scale·(W1 ⊗ W2), each half full or a low-rank product.

W1 is (a×c), W2 is (b×d) with out = a·b, in = c·d. The scale is stored explicitly because the two
ecosystems disagree when both halves are full: PEFT applies alpha/r, LyCORIS applies 1
(``convention`` records which rule produced ``scale``).

On ``conv2d`` layers W1 stays (a, c) and W2 carries the kernel (b, d, kh, kw): stored full, flattened
(``w2_a`` (b, r), ``w2_b`` (r, d, kh, kw)) or Tucker (``t2`` (r, r, kh, kw), ``w2_a`` (r, b), ``w2_b`` (r, d));
W1 ⊗ W2 is the Kronecker product over all four axes (spec/methods-tuners.md §6).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..errors import ManifestError
from .descriptor import CONV2D_LAYER, SCALE_RTOL, Method, Params, Role, refuse_conversion
from .loha import exact_lora
from .tucker import LOKR_EINSUM, check_tucker, conv_dims, dense, flat, tucker, tucker_matrix_factors

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
    """W1 or W2 in fp32, PEFT's way: the full half, the Tucker product, or the (flattened) factor product."""
    if which in tensors:
        return tensors[which].float()
    low, high = HALVES[which]
    if which == "w2" and "t2" in tensors:
        return tucker(tensors["t2"].float(), tensors[low].float(), tensors[high].float(), LOKR_EINSUM)
    return tensors[low].float() @ flat(tensors[high]).float()


class LoKr(Method):
    name = "lokr"
    summary = "Kronecker product of two (optionally low-rank) factors (LoKr, LyCORIS)"
    params_model = LokrParams
    roles = (Role("w1", ("a", "c"), required=False), Role("w1_a", ("a", "r"), required=False),
             Role("w1_b", ("r", "c"), required=False), Role("w2", ("b", "d"), required=False),
             Role("w2_a", ("b", "r"), required=False), Role("w2_b", ("r", "d"), required=False),
             Role("t2", ("r", "r", "kh", "kw"), required=False))
    #: conv2d: W2 carries the kernel (full or flattened factor); Tucker: core t2, w2_a (r, b), w2_b (r, d).
    conv2d_roles = roles[:3] + (Role("w2", ("b", "d", "kh", "kw"), required=False),
                                Role("w2_a", ("b", "r"), required=False),
                                Role("w2_b", ("r", "d", "kh", "kw"), required=False))
    tucker_roles = roles[:3] + (Role("t2", ("r", "r", "kh", "kw")), Role("w2_a", ("r", "b")),
                                Role("w2_b", ("r", "d")))
    row_separable = True
    layers = ("linear", CONV2D_LAYER)
    formula = ("ΔW = scale·(W1 ⊗ W2), W1 = w1 or w1_a·w1_b, W2 = w2 or w2_a·w2_b; conv2d: W2 carries the "
               "kernel (flattened, or Tucker W2 = t2 ×₁ w2_aᵀ ×₂ w2_bᵀ)")
    spec_file = "methods-tuners.md"

    def roles_for(self, entry):
        if entry.layer != CONV2D_LAYER:
            return self.roles[:6]
        return self.tucker_roles if "t2" in entry.tensors else self.conv2d_roles

    def dims(self, entry, params):
        dims = conv_dims(entry, super().dims(entry, params))
        (dims["a"], dims["c"]), (dims["b"], dims["d"]) = params.w1_shape, params.w2_shape
        return dims

    def check_entry(self, target, entry, path=None, *, lenient=False):
        check_tucker(self.name, target, entry, ("t2",), path)
        if "t2" in entry.tensors and "w2" in entry.tensors:
            raise ManifestError(f"module {target!r} (lokr): a Tucker core t2 belongs to a factored w2, not a full one",
                                path=path, hint="the manifest is damaged; re-export the adapter")
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
        # PEFT's make_kron: W1 gains W2's extra axes, kron, then the scale (kron is elementwise products, so the
        # flattened (b, d·kh·kw) W2 of a conv gives the same bits as the 4-D one).
        # dense(): torch.kron refuses "contiguous" tensors with odd strides on size-1 axes (b, d or r = 1).
        w1, w2 = _half(tensors, "w1"), dense(_half(tensors, "w2"))
        w1 = dense(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)))
        scale = float(entry.params["scale"])
        if rows is None:
            return _as_kernel(torch.kron(w1, w2).mul_(scale), entry)
        b = w2.shape[0]
        first, last = rows.start // b, math.ceil(rows.stop / b)
        block = torch.kron(dense(w1[first:last]), w2).mul_(scale)
        return _as_kernel(block[rows.start - first * b: rows.stop - first * b], entry)

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Exact LoRA: kron(U1,U2)·kron(V1,V2), rank(W1)·rank(W2), compacted to the numerical rank."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        u1, v1 = _factors(tensors, "w1")
        u2, v2 = _factors(tensors, "w2")
        b = torch.kron(dense(u1), dense(u2))
        a = torch.kron(dense(v1), dense(v2))
        return exact_lora(self, target, entry, a, b, float(entry.params["scale"]))


def _as_kernel(delta: torch.Tensor, entry) -> torch.Tensor:
    """A conv2d ΔW built from a flattened W2, (rows, in·kh·kw), as (rows, in, kh, kw)."""
    return delta.reshape(delta.shape[0], *entry.shape[1:]) if entry.layer == CONV2D_LAYER else delta


def _factors(tensors: dict[str, torch.Tensor], which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) in fp64 with U·V the half as a matrix (conv2d: (b, d·kh·kw)); a full half is split as
    (W, I) or (I, W), whichever is thinner."""
    low, high = HALVES[which]
    if which == "w2" and "t2" in tensors:
        return tucker_matrix_factors(tensors["t2"], tensors[low], tensors[high])
    if which not in tensors:
        return tensors[low].double().contiguous(), flat(tensors[high]).double().contiguous()
    w = flat(tensors[which]).double()
    rows, cols = w.shape
    if cols <= rows:
        return w.contiguous(), torch.eye(cols, dtype=torch.float64)
    return torch.eye(rows, dtype=torch.float64), w.contiguous()


LOKR_METHOD = LoKr()
