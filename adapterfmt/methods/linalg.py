"""Low-rank linear algebra shared by methods, ``convert --compact/--rank/--energy`` and ``extract``.

Device-free: callers pass a resolved ``torch.device`` (the ops layer picks CPU or GPU).

Everything takes canonical factors (A: r×in, B: out×r, ΔW ∝ B·A), computes in fp64 (or fp32
for dense SVDs on large matrices) and casts once at the end (methods.md §10).
"""
from __future__ import annotations

import math

import torch



def numerical_rank_threshold(sigma_max: float, shape: tuple[int, int], q: int, dtype: torch.dtype) -> float:
    """τ = σ_max·max(out, in, q)·eps(dtype), the usual numerical-rank threshold.

    Example:
        >>> numerical_rank_threshold(1.0, (4, 3), 2, torch.float64) < 1e-14
        True
    """
    return sigma_max * max(shape[0], shape[1], q) * torch.finfo(dtype).eps


def factor_core(a: torch.Tensor, b: torch.Tensor, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B·A without forming it: (Q_B, U, σ, Vᵀ, Q_A) with B·A = Q_B·U·diag(σ)·Vᵀ·Q_Aᵀ (fp64).

    Example:
        >>> qb, u, s, vt, qa = factor_core(torch.randn(2, 5), torch.randn(4, 2))
        >>> s.shape
        torch.Size([2])
    """
    dev = torch.device(device)
    a64, b64 = a.to(dev, torch.float64), b.to(dev, torch.float64)
    qb, rb = torch.linalg.qr(b64)  # out×q, q×q
    qa, ra = torch.linalg.qr(a64.t())  # in×q, q×q
    u, s, vt = torch.linalg.svd(rb @ ra.t())
    return qb, u, s, vt, qa


def rebuild(qb, u, s, vt, qa, keep: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (A'', B'') of the top ``keep`` directions; √σ goes to both sides."""
    keep = max(int(keep), 1)
    root = s[:keep].clamp_min(0).sqrt()
    b_new = (qb @ u[:, :keep]) * root
    a_new = root.view(-1, 1) * (vt[:keep] @ qa.t())
    return a_new.to("cpu", dtype).contiguous(), b_new.to("cpu", dtype).contiguous()


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σσ²_{1..k} ≥ energy·Σσ² (at least 1).

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.8)
        1
    """
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return int(min(int((cumulative < energy - 1e-12).sum()) + 1, s.numel()))


def compact(a: torch.Tensor, b: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Re-factor B·A at its numerical rank (exact), or at ``rank``/``energy`` (maybe lossy).

    Returns (A'', B'', kept rank, exact) where ``exact`` is true when every dropped singular
    value is below the numerical-rank threshold τ.

    Example:
        >>> a, b = torch.randn(2, 6), torch.randn(5, 2)
        >>> a2, b2, k, exact = compact(torch.cat([a, a]), torch.cat([b, b], 1) / 2)
        >>> k, exact
        (2, True)
    """
    dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    qb, u, s, vt, qa = factor_core(a, b, device)
    sigma_max = float(s[0]) if s.numel() else 0.0
    tau = numerical_rank_threshold(sigma_max, (b.shape[0], a.shape[1]), a.shape[0], torch.float32)
    numerical = int((s > tau).sum())
    if rank is not None:
        keep = min(int(rank), s.numel())
    elif energy is not None:
        keep = energy_rank(s, float(energy))
    else:
        keep = numerical
    keep = max(keep, 1)
    exact = keep >= numerical
    a_new, b_new = rebuild(qb, u, s, vt, qa, keep, dtype)
    return a_new, b_new, keep, exact


def truncated_svd(delta: torch.Tensor, rank: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of a dense (out, in) matrix: (A, B, all singular values).

    fp32 SVD on ``device`` (the GPU when present); B·A = U_r·diag(σ_r)·Vh_r with √σ split.

    Example:
        >>> a, b, s = truncated_svd(torch.randn(6, 5), 2, "cpu")
        >>> a.shape, b.shape
        (torch.Size([2, 5]), torch.Size([6, 2]))
    """
    dev = torch.device(device)
    u, s, vh = torch.linalg.svd(delta.to(dev, torch.float32), full_matrices=False)
    rank = max(1, min(int(rank), s.numel()))
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).cpu().contiguous()
    a = (root.view(-1, 1) * vh[:rank]).cpu().contiguous()
    return a, b, s.cpu()


def orthonormality_error(m: torch.Tensor, rows: bool) -> float:
    """max |M·Mᵀ − I| (``rows``) or max |Mᵀ·M − I|: how far factors are from orthonormal.

    Example:
        >>> orthonormality_error(torch.eye(3), rows=True)
        0.0
    """
    m = m.double()
    gram = m @ m.t() if rows else m.t() @ m
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return float((gram - eye).abs().max()) if gram.numel() else 0.0


def plain_alpha(scale: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank`` (α = s·r, or s·√r under rsLoRA).

    Example:
        >>> plain_alpha(2.0, 8, False), plain_alpha(1.0, 4, True)
        (16.0, 2.0)
    """
    return float(scale * (math.sqrt(rank) if use_rslora else rank))


def unit_columns(m: torch.Tensor) -> torch.Tensor:
    """``m`` (fp64) with every column scaled to unit 2-norm (zero columns stay zero).

    Example:
        >>> unit_columns(torch.tensor([[3.0], [4.0]])).flatten().tolist()
        [0.6, 0.8]
    """
    m = m.double()
    return m / torch.linalg.norm(m, dim=0).clamp_min(1e-300)
