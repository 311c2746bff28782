"""LoHa (Hyeon-Woo et al. 2022, LyCORIS): ΔW = ((W1a·W1b) ⊙ (W2a·W2b))·scale, scale = alpha/r.

PEFT and LyCORIS agree on the maths and the scale. Converting to LoRA is exact at rank r²
(face-splitting product), then compacted to the numerical rank.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..conversion_report import EXACT_MATH
from .descriptor import Method, Params, Role, refuse_conversion, take_rows, tensor_refs
from .linalg import factor_core, numerical_rank_threshold, rebuild
from .lora import lora_params


class LohaParams(Params):
    rank: int = Field(ge=1)
    alpha: float
    scale: float


def loha_params(rank: int, alpha: float) -> dict:
    """The params dict of a LoHa module entry.

    Example:
        >>> loha_params(4, 2)
        {'rank': 4, 'alpha': 2.0, 'scale': 0.5}
    """
    return {"rank": int(rank), "alpha": float(alpha), "scale": float(alpha) / int(rank)}


def face_split(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A: r1r2×in, B: out×r1r2) with B·A = (w1a·w1b) ⊙ (w2a·w2b) exactly.

    Example:
        >>> a, b = face_split(torch.ones(3, 2), torch.ones(2, 4), torch.ones(3, 2), torch.ones(2, 4))
        >>> tuple(a.shape), tuple(b.shape)
        ((4, 4), (3, 4))
    """
    out_f, in_f = w1a.shape[0], w1b.shape[1]
    b = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_f, -1)
    a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, in_f)
    return a, b


class LoHa(Method):
    name = "loha"
    summary = "Hadamard product of two low-rank products (LoHa, LyCORIS)"
    params_model = LohaParams
    roles = (Role("w1_a", ("out", "r")), Role("w1_b", ("r", "in")),
             Role("w2_a", ("out", "r")), Role("w2_b", ("r", "in")))
    row_separable = True
    layers = ("linear",)
    formula = "ΔW = ((W1a·W1b) ⊙ (W2a·W2b))·scale"
    spec_file = "methods-tuners.md"

    def expected_scale(self, params):
        return params.alpha / params.rank

    def delta(self, entry, tensors, base=None, rows=None):
        # PEFT's order: both products, Hadamard, then the fp32 scale (bit-identical merges).
        h1 = take_rows(tensors["w1_a"], rows).float() @ tensors["w1_b"].float()
        h2 = take_rows(tensors["w2_a"], rows).float() @ tensors["w2_b"].float()
        return h1.mul_(h2).mul_(float(entry.params["scale"]))

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Exact LoRA at the numerical rank of the face-splitting factors (≤ r²)."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        a, b = face_split(*(tensors[k].double() for k in ("w1_a", "w1_b", "w2_a", "w2_b")))
        return exact_lora(self, target, entry, a, b, float(entry.params["scale"]))


def exact_lora(method: Method, target: str, entry, a: torch.Tensor, b: torch.Tensor, scale: float):
    """A LoRA entry for scale·B·A, compacted to its numerical rank in fp64 (no truncation)."""
    qb, u, s, vt, qa = factor_core(a, b)
    tau = numerical_rank_threshold(float(s[0]) if s.numel() else 0.0, tuple(entry.shape), a.shape[0],
                                   torch.float32)
    keep = max(1, int((s > tau).sum()))
    new_a, new_b = rebuild(qb, u, s, vt, qa, keep, torch.float32)
    new = {"lora_A": new_a, "lora_B": new_b}
    entry2 = entry.replace(method="lora", params=lora_params(keep, scale * keep, False),
                           tensors=tensor_refs(target, new))
    return entry2, new, EXACT_MATH, f"{method.name} -> rank-{keep} LoRA (numerical rank of {a.shape[0]} factors)"


LOHA_METHOD = LoHa()
