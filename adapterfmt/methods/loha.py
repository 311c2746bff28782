"""LoHa (Hyeon-Woo et al. 2022, LyCORIS): ΔW = ((W1a·W1b) ⊙ (W2a·W2b))·scale, scale = alpha/r.

PEFT and LyCORIS agree on the maths and the scale. Converting to LoRA is exact at rank r²
(face-splitting product), then compacted to the numerical rank.

On ``conv2d`` layers two forms (spec/methods-tuners.md §6): flattened (``w1_b``/``w2_b`` carry the
kernel, (r, in, kh, kw)) and Tucker (cores ``t1``/``t2`` (r, r, kh, kw), ``w1_a``/``w2_a`` (r, out),
``w1_b``/``w2_b`` (r, in): LyCORIS ``use_tucker``, PEFT ``use_effective_conv2d``).
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..conversion_report import EXACT_MATH
from .descriptor import CONV2D_LAYER, Method, Params, Role, refuse_conversion, take_rows, tensor_refs
from .linalg import factor_core, numerical_rank_threshold, rebuild
from .lora import lora_params
from .tucker import LOHA_EINSUM, check_tucker, conv_dims, flat, tucker, tucker_matrix_factors

CORES = ("t1", "t2")


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
             Role("w2_a", ("out", "r")), Role("w2_b", ("r", "in")),
             Role("t1", ("r", "r", "kh", "kw"), required=False), Role("t2", ("r", "r", "kh", "kw"), required=False))
    #: conv2d, flattened: the input factors carry the kernel axes.
    conv2d_roles = (Role("w1_a", ("out", "r")), Role("w1_b", ("r", "in", "kh", "kw")),
                    Role("w2_a", ("out", "r")), Role("w2_b", ("r", "in", "kh", "kw")))
    #: conv2d, Tucker: a core per half between an output factor (r, out) and an input factor (r, in).
    tucker_roles = (Role("t1", ("r", "r", "kh", "kw")), Role("w1_a", ("r", "out")), Role("w1_b", ("r", "in")),
                    Role("t2", ("r", "r", "kh", "kw")), Role("w2_a", ("r", "out")), Role("w2_b", ("r", "in")))
    row_separable = True
    layers = ("linear", CONV2D_LAYER)
    formula = ("ΔW = ((W1a·W1b) ⊙ (W2a·W2b))·scale; conv2d: flattened kernel, or Tucker "
               "Wk = tk ×₁ wk_aᵀ ×₂ wk_bᵀ")
    spec_file = "methods-tuners.md"

    def roles_for(self, entry):
        if entry.layer != CONV2D_LAYER:
            return self.roles[:4]
        return self.tucker_roles if "t1" in entry.tensors else self.conv2d_roles

    def dims(self, entry, params):
        return conv_dims(entry, super().dims(entry, params))

    def check_entry(self, target, entry, path=None, *, lenient=False):
        check_tucker(self.name, target, entry, CORES, path)
        return super().check_entry(target, entry, path, lenient=lenient)

    def expected_scale(self, params):
        return params.alpha / params.rank

    def delta(self, entry, tensors, base=None, rows=None):
        scale = float(entry.params["scale"])
        if "t1" in tensors:
            # PEFT's make_weight_cp: both Tucker products, Hadamard, then the scale. Built whole and then sliced:
            # an einsum over fewer rows may take another contraction path (other roundings).
            h1 = tucker(tensors["t1"].float(), tensors["w1_a"].float(), tensors["w1_b"].float(), LOHA_EINSUM)
            h2 = tucker(tensors["t2"].float(), tensors["w2_a"].float(), tensors["w2_b"].float(), LOHA_EINSUM)
            return take_rows(h1.mul_(h2).mul_(scale), rows)
        # PEFT's order: both products, Hadamard, then the fp32 scale (bit-identical merges).
        h1 = take_rows(tensors["w1_a"], rows).float() @ flat(tensors["w1_b"]).float()
        h2 = take_rows(tensors["w2_a"], rows).float() @ flat(tensors["w2_b"]).float()
        delta = h1.mul_(h2).mul_(scale)
        return delta.reshape(delta.shape[0], *entry.shape[1:]) if entry.layer == CONV2D_LAYER else delta

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Exact LoRA at the numerical rank of the face-splitting factors (≤ r²)."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        a, b = face_split(*matrix_halves(tensors))
        return exact_lora(self, target, entry, a, b, float(entry.params["scale"]))


def matrix_halves(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(U1, V1, U2, V2) in fp64 with Uk·Vk the k-th Hadamard half as an (out, in·kh·kw) matrix."""
    if "t1" not in tensors:
        return tuple(flat(tensors[k]).double() for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
    u1, v1 = tucker_matrix_factors(tensors["t1"], tensors["w1_a"], tensors["w1_b"])
    u2, v2 = tucker_matrix_factors(tensors["t2"], tensors["w2_a"], tensors["w2_b"])
    return u1, v1, u2, v2


def exact_lora(method: Method, target: str, entry, a: torch.Tensor, b: torch.Tensor, scale: float):
    """A LoRA entry for scale·B·A, compacted to its numerical rank in fp64 (no truncation).

    conv2d: B·A is the (out, in·kh·kw) matrix; A is reshaped to the kernel (r, in, kh, kw), B to (out, r, 1, 1).
    """
    qb, u, s, vt, qa = factor_core(a, b)
    tau = numerical_rank_threshold(float(s[0]) if s.numel() else 0.0, (b.shape[0], a.shape[1]), a.shape[0],
                                   torch.float32)
    keep = max(1, int((s > tau).sum()))
    new_a, new_b = rebuild(qb, u, s, vt, qa, keep, torch.float32)
    if entry.layer == CONV2D_LAYER:
        new_a, new_b = new_a.reshape(keep, *entry.shape[1:]), new_b.reshape(*new_b.shape, 1, 1)
    new = {"lora_A": new_a, "lora_B": new_b}
    entry2 = entry.replace(method="lora", params=lora_params(keep, scale * keep, False),
                           tensors=tensor_refs(target, new))
    return entry2, new, EXACT_MATH, f"{method.name} -> rank-{keep} LoRA (numerical rank of {a.shape[0]} factors)"


LOHA_METHOD = LoHa()
