"""OFT (Qiu et al. 2023; PEFT ≥ 0.18 parametrisation): W' = W·R_bdᵀ, R_bd block-diagonal rotations.

Each block R comes from a skew-symmetric Q (upper triangle stored row-major) by PEFT's truncated
Cayley–Neumann series (default) or the exact Cayley transform. The two are transposes of each other
(the series approximates (I−Q)⁻¹(I+Q), the exact branch computes (I−Q)(I+Q)⁻¹), so the choice is
stored. Multiplicative: merging needs the base; unmerging applies the inverse of R, not Rᵀ (the
series is not exactly orthogonal).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import ManifestError
from .descriptor import Finding, Method, Params, Role


#: Largest max |R·Rᵀ − I| validate accepts (spec/methods-tuners.md §7). PEFT's default 5-term Neumann
#: series measures ~5e-4 on trained adapters and 9e-3 for blocks of 8 with entries N(0, 0.05) (the test
#: suite's); above 5e-2 the applied matrix changes lengths by several percent: the series is far outside the
#: range where it approximates a rotation.
ORTHOGONALITY_LIMIT = 5e-2


class OftParams(Params):
    block_size: int = Field(ge=2)
    block_share: bool
    cayley: Literal["neumann", "exact"]
    neumann_terms: int = Field(ge=1)
    coft: bool
    eps: float = Field(gt=0)


def skew(vectors: torch.Tensor, block: int) -> torch.Tensor:
    """(n, b(b−1)/2) upper-triangle vectors (row-major) -> (n, b, b) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(block, block, 1)
    q = torch.zeros(vectors.shape[0], block, block, dtype=vectors.dtype)
    q[:, rows, cols] = vectors
    return q - q.transpose(-2, -1)


def neumann_terms(n: int) -> list[tuple[int, float]]:
    """PEFT 0.21's series as (power, coefficient): I + Σ c·Q^k.

    Example:
        >>> neumann_terms(5)
        [(1, 2.0), (2, 2.0), (3, 2.0), (4, 1.0)]
    """
    if n <= 1:
        return []
    if n == 2:
        return [(1, 2.0)]
    top = max(3, n - 1)
    return [(k, 2.0) for k in range(1, top)] + [(top, 1.0)]


def coft_project(vectors: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection: blocks with ‖Q‖_F > eps/√n are rescaled to that norm."""
    q = skew(vectors, block)
    limit = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    q = torch.where(norm <= limit, q, limit * (q / norm))
    rows, cols = torch.triu_indices(block, block, 1)
    return q[:, rows, cols]


def rotations(vectors: torch.Tensor, params) -> torch.Tensor:
    """The (n, b, b) block rotations, fp32, in PEFT's operation order."""
    block = params.block_size
    vectors = vectors.float()
    if params.coft:
        vectors = coft_project(vectors, block, params.eps)
    q = skew(vectors, block)
    eye = torch.eye(block).repeat(q.shape[0], 1, 1)
    if params.cayley == "exact":
        return torch.linalg.solve(eye + q, eye - q, left=False)
    result, power = eye, None
    for k, coef in neumann_terms(params.neumann_terms):
        power = q if k == 1 else torch.bmm(power, q)
        result.add_(power, alpha=coef)
    return result


class OFT(Method):
    name = "oft"
    summary = "orthogonal fine-tuning: block-diagonal rotation of the input side (OFT, PEFT ≥ 0.18)"
    params_model = OftParams
    roles = (Role("blocks", ("n", "e")),)
    needs_base = True
    row_separable = False
    layers = ("linear",)
    formula = "W' = W·R_bdᵀ, R = Cayley–Neumann(skew(blocks)) or exact Cayley"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        dims = super().dims(entry, params)
        b = params.block_size
        dims["e"] = b * (b - 1) // 2
        dims["n"] = 1 if params.block_share else dims["in"] // b
        return dims

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        if entry.shape[1] % params.block_size:  # spec methods-tuners.md §2: the blocks tile the input axis
            raise ManifestError(f"module {target!r} (oft): block_size {params.block_size} does not divide in = "
                                f"{entry.shape[1]}", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        return params

    def merged(self, entry, tensors, base, rows=None):
        # PEFT's own product, mm(R_bd, Wᵀ)ᵀ with the dense in×in block diagonal: the same fp32
        # summation as PEFT's merge, hence bit-identical (a per-block product differs by a few ulp
        # where rows cancel). O(in²·out) like PEFT's merge.
        params = self.params(entry)
        rot = rotations(tensors["blocks"], params)
        count = base.shape[1] // params.block_size
        if rot.shape[0] == 1:
            rot = rot.expand(count, -1, -1)
        dense = torch.block_diag(*rot)
        return torch.mm(dense, base.t()).t()

    unmerges_without_base = True

    def unmerged(self, entry, tensors, merged, target=""):
        # PEFT's unmerge: the inverse of the matrix actually applied (the series is not orthogonal),
        # inv(R_bd)·W'ᵀ with the dense in×in inverse, in fp32.
        params = self.params(entry)
        rot = rotations(tensors["blocks"], params)
        count = merged.shape[1] // params.block_size
        if rot.shape[0] == 1:
            rot = rot.expand(count, -1, -1)
        return torch.mm(torch.linalg.inv(torch.block_diag(*rot)), merged.t()).t()

    def invariants(self, entry, tensors):
        """The measured max |R·Rᵀ − I| of the rotation actually applied (an error above ORTHOGONALITY_LIMIT)."""
        rot = rotations(tensors["blocks"], self.params(entry))
        return [orthogonality_finding(rot @ rot.transpose(-2, -1) - torch.eye(rot.shape[-1]))]


def orthogonality_finding(gram_minus_eye: torch.Tensor) -> Finding:
    """The finding for a measured R·Rᵀ − I: info within ORTHOGONALITY_LIMIT, else an error.

    Example:
        >>> orthogonality_finding(torch.zeros(2, 2)).severity
        'info'
    """
    err = float(gram_minus_eye.abs().max()) if gram_minus_eye.numel() else 0.0
    measured = {"orthogonality_error": err}
    if err > ORTHOGONALITY_LIMIT:
        return Finding("error", "not_orthogonal", f"the applied rotation is not orthogonal: max |R·Rᵀ − I| = "
                       f"{err:.3g} > {ORTHOGONALITY_LIMIT:g} (spec/methods-tuners.md §7)", measured)
    return Finding("info", "orthogonality", f"max |R·Rᵀ − I| = {err:.3g}", measured)


OFT_METHOD = OFT()
