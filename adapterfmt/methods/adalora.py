"""AdaLoRA (Zhang et al. 2023): SVD-shaped update B·diag(E)·A with PEFT's ranknum scale.

PEFT: ΔW = (B @ (A * E)) * scaling / (ranknum + 1e-5), scaling = lora_alpha (or init_r when
lora_alpha ≤ 0) and ranknum = init_r even after pruning (PEFT copies it back). A module pruned to
rank 0 has ΔW = 0 and is not stored.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..conversion_report import EXACT_MATH
from .descriptor import Finding, Method, Params, Role, refuse_conversion, take_rows, tensor_refs
from .lora import lora_params


class AdaloraParams(Params):
    rank: int = Field(ge=1)
    #: The numerator: PEFT's lora_alpha, or init_r when lora_alpha ≤ 0.
    scaling: float
    #: PEFT's ranknum: the initial rank (init_r), not the pruned one.
    ranknum: float = Field(gt=0)
    #: Effective scale scaling / fp32(ranknum + 1e-5), for inspection and conversion.
    scale: float


def ranknum_denominator(ranknum: float) -> torch.Tensor:
    """fp32(ranknum) + 1e-5 in fp32, as PEFT adds it to its fp32 ranknum parameter.

    Example:
        >>> float(ranknum_denominator(6.0))
        6.000010013580322
    """
    return torch.tensor([float(ranknum)], dtype=torch.float32) + 1e-5


def adalora_params(rank: int, lora_alpha: float, init_r: int | float) -> dict:
    """The params dict of an AdaLoRA module entry.

    Example:
        >>> adalora_params(2, 16, 6)["ranknum"]
        6.0
    """
    scaling = float(lora_alpha) if lora_alpha > 0 else float(init_r)
    return {"rank": int(rank), "scaling": scaling, "ranknum": float(init_r),
            "scale": scaling / float(ranknum_denominator(init_r))}


class AdaLoRA(Method):
    name = "adalora"
    summary = "SVD-shaped low-rank update with pruned singular values (AdaLoRA, Zhang et al. 2023)"
    params_model = AdaloraParams
    roles = (Role("lora_A", ("r", "in")), Role("lora_E", ("r",)), Role("lora_B", ("out", "r")))
    row_separable = True
    layers = ("linear", "conv1d")
    formula = "ΔW = (B·(A ⊙ E))·scaling / fp32(ranknum + 1e-5)"
    spec_file = "methods-tuners.md"

    def expected_scale(self, params):
        return params.scaling / float(ranknum_denominator(params.ranknum))

    def delta(self, entry, tensors, base=None, rows=None):
        # PEFT's operation order: A*E, matmul, *scaling, /(ranknum + 1e-5) (bit-identical merges).
        a_e = tensors["lora_A"].float() * tensors["lora_E"].float().view(-1, 1)
        product = take_rows(tensors["lora_B"], rows).float() @ a_e
        return product.mul_(float(entry.params["scaling"])).div_(ranknum_denominator(entry.params["ranknum"]))

    def invariants(self, entry, tensors):
        """E and ranknum consistent: rank ≤ ranknum (error), ranknum an integer, no zero singular value stored."""
        rank, ranknum = int(entry.params["rank"]), float(entry.params["ranknum"])
        zeros = int((tensors["lora_E"] == 0).sum())
        measured = {"rank": float(rank), "ranknum": ranknum, "zero_singular_values": float(zeros)}
        findings = [Finding("info", "adalora_rank", f"rank {rank} of ranknum (initial rank) {ranknum:g}", measured)]
        if rank > ranknum:
            findings.append(Finding("error", "adalora_rank_above_ranknum",
                                    f"rank {rank} (length of E) exceeds ranknum {ranknum:g}, the initial rank "
                                    "AdaLoRA prunes from", measured))
        if not ranknum.is_integer():
            findings.append(Finding("warning", "adalora_ranknum_fraction",
                                    f"ranknum {ranknum!r} is not an integer; PEFT's ranknum is the initial rank init_r",
                                    measured))
        if zeros:
            findings.append(Finding("warning", "adalora_zero_singular_value",
                                    f"{zeros} of {rank} entries of E are zero: pruned triplets still stored "
                                    f"(ΔW is exact at rank {rank - zeros})", measured))
        return findings

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Exact LoRA at the current (pruned) rank: A' = A ⊙ E, B' = B, same effective scale."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        new = {"lora_A": (tensors["lora_A"].float() * tensors["lora_E"].float().view(-1, 1)).contiguous(),
               "lora_B": tensors["lora_B"].float().contiguous()}
        rank, scale = int(entry.params["rank"]), float(entry.params["scale"])
        entry2 = entry.replace(method="lora", params=lora_params(rank, scale * rank, False),
                               tensors=tensor_refs(target, new))
        return entry2, new, EXACT_MATH, f"E folded into A; scale {entry.params['scaling']}/(ranknum+1e-5) kept"


ADALORA_METHOD = AdaLoRA()
