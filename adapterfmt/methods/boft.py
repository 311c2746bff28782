"""BOFT (Liu et al. 2024): W' = (W·Mᵀ)·diag(s), M a product of permuted block-diagonal rotations.

M = M_{N−1}···M_1·M_0 with M_i = P_i·blockdiag(Q_i)·P_iᵀ, Q = exact Cayley of the skew part of each
stored H×H block, and P_i PEFT's butterfly permutations (identity when N = 1). Computed with PEFT's
own dense products so merges are bit-identical. Multiplicative: merging needs the base.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..errors import ManifestError, UsageError
from .descriptor import Finding, Method, Params, Role
from .oft import orthogonality_finding


class BoftParams(Params):
    #: N, the butterfly factors the tensors hold (PEFT without its CUDA extension always builds 1).
    butterfly_factors: int = Field(ge=1)
    #: H, the block size; the block count is in / H.
    block_size: int = Field(ge=1)


def butterfly_permutation(n: int, blocks: int, half: int, factors_minus_one: int) -> torch.Tensor:
    """PEFT's block butterfly permutation of ``n`` indices (identity when there is one factor).

    Within each of ``blocks`` groups, chunks of ``half`` indices are reordered: even chunks first,
    then odd ones.

    Example:
        >>> butterfly_permutation(8, 1, 2, 1).tolist()
        [0, 1, 4, 5, 2, 3, 6, 7]
    """
    if factors_minus_one == 0:
        return torch.arange(n)
    group = n // blocks
    chunks = group // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    return torch.cat([start + within for start in range(0, n, group)])


def permutation_matrix(index: torch.Tensor) -> torch.Tensor:
    """P with P[i, index[i]] = 1 (PEFT's perm2mat)."""
    n = len(index)
    matrix = torch.zeros(n, n)
    matrix[torch.arange(n), index] = 1.0
    return matrix


def boft_matrix(rotations: torch.Tensor) -> torch.Tensor:
    """M (n×n, fp32) from the stored (N, D, H, H) blocks, in PEFT's operation order."""
    factors, count, size, _ = rotations.shape
    n = count * size
    x = rotations.float().reshape(factors * count, size, size)
    skew = 0.5 * (x - x.transpose(1, 2))
    eye = torch.eye(size).unsqueeze(0).expand(factors * count, size, size)
    q = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(factors, count, size, size)
    blocks = torch.stack([torch.block_diag(*q[i]) for i in range(factors)])
    perms = torch.stack([permutation_matrix(butterfly_permutation(n, count // 2 ** i, size // 2, factors - 1))
                         for i in range(factors)])
    batch = torch.bmm(perms, torch.bmm(blocks, perms.permute(0, 2, 1)))
    matrix = batch[0]
    for i in range(1, factors):
        matrix = batch[i] @ matrix
    return matrix


class BOFT(Method):
    name = "boft"
    summary = "butterfly orthogonal fine-tuning (BOFT, Liu et al. 2024): rotation of the inputs, row scales"
    params_model = BoftParams
    roles = (Role("rotations", ("f", "d", "h", "h")), Role("scale", ("out",)))
    needs_base = True
    layers = ("linear",)
    formula = "W' = (W·Mᵀ)·diag(s), M = Π P_i·blockdiag(Cayley(skew(R_i)))·P_iᵀ"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        dims = super().dims(entry, params)
        dims["f"], dims["h"] = params.butterfly_factors, params.block_size
        dims["d"] = dims["in"] // params.block_size
        return dims

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        size, factors, inputs = params.block_size, params.butterfly_factors, entry.shape[1]
        # spec methods-tuners.md §2 (PEFT's own constraints): H divides in; with N > 1, H is even and
        # D = in/H is a multiple of 2^(N−1), so that every butterfly permutation is defined.
        if inputs % size or (factors > 1 and (size % 2 or (inputs // size) % 2 ** (factors - 1))):
            raise ManifestError(f"module {target!r} (boft): block_size {size} with {factors} butterfly factor(s) "
                                f"does not tile in = {inputs}", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        return params

    def merged(self, entry, tensors, base, rows=None):
        # PEFT: mm(M, Wᵀ)ᵀ * s in fp32, rounded once by the engine.
        matrix = boft_matrix(tensors["rotations"])
        return torch.mm(matrix, base.t()).t() * tensors["scale"].float().view(-1, 1)

    unmerges_without_base = True

    def unmerged(self, entry, tensors, merged, target=""):
        # The inverse of what the merge applied: W = (M⁻¹·(W' ⊘ s)ᵀ)ᵀ (PEFT uses Mᵀ, equal up to rounding).
        scale = tensors["scale"].float()
        if bool((scale == 0).any()):
            raise UsageError(f"module {target!r}: BOFT scale has zero entries; the merge cannot be undone",
                             hint="pass --base BASE instead")
        unscaled = merged / scale.view(-1, 1)
        return torch.mm(torch.linalg.inv(boft_matrix(tensors["rotations"])), unscaled.t()).t()

    def invariants(self, entry, tensors):
        """max |M·Mᵀ − I| of the butterfly product (an error above the OFT limit) and zero scales (warning)."""
        matrix = boft_matrix(tensors["rotations"])
        findings = [orthogonality_finding(matrix @ matrix.t() - torch.eye(matrix.shape[0]))]
        zeros = int((tensors["scale"] == 0).sum())
        if zeros:
            findings.append(Finding("warning", "boft_zero_scale",
                                    f"{zeros} zero scale(s): unmerge cannot divide them out and refuses this module "
                                    "unless --base is given", {"zero_scales": float(zeros)}))
        return findings


BOFT_METHOD = BOFT()
