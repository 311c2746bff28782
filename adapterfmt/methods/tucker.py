"""Convolution factors shared by LoHa, LoKr and Tucker LoRA on ``conv2d`` layers (weights (out, in, kh, kw)).

Two storage forms exist in the wild (LyCORIS, PEFT ``use_effective_conv2d``), both pinned in
spec/methods-tuners.md §6:

* flattened: the kernel axes travel with the input side, a factor (r, in, kh, kw) read as the matrix
  (r, in·kh·kw); ΔW is the (out, in·kh·kw) matrix reshaped to the kernel;
* Tucker-2: a core C (r, r, kh, kw) between an output factor U (r, out) and an input factor V (r, in):
  T[p, q, y, x] = Σ_i Σ_j C[i, j, y, x]·U[i, p]·V[j, q].

Both ecosystems compute the Tucker product with one ``einsum``; the operand order changes the rounding,
so each method passes the order its reference uses (``LOHA_EINSUM``, ``LOKR_EINSUM``).
"""
from __future__ import annotations

import torch

from ..errors import ManifestError
from ..format.manifest import ModuleEntry
from .descriptor import CONV2D_LAYER

#: (core, V (r, in), U (r, out)): PEFT's and LyCORIS's LoHa order.
LOHA_EINSUM = "i j k l, j r, i p -> p r k l"
#: (core, U (r, out), V (r, in)): PEFT's and LyCORIS's LoKr (and LyCORIS's LoCon) order.
LOKR_EINSUM = "i j k l, i p, j r -> p r k l"


def kernel(entry: ModuleEntry) -> tuple[int, int]:
    """(kh, kw) of a conv2d module, (1, 1) for every other layer.

    Example:
        >>> kernel(ModuleEntry("loha", "w", [4, 2, 3, 3], {}, {}, layer="conv2d"))
        (3, 3)
    """
    return (entry.shape[2], entry.shape[3]) if entry.layer == CONV2D_LAYER else (1, 1)


def is_tucker(entry: ModuleEntry, core: str) -> bool:
    """Whether the entry stores the Tucker form (its ``core`` role is present)."""
    return core in entry.tensors


def conv_dims(entry: ModuleEntry, dims: dict[str, int]) -> dict[str, int]:
    """``dims`` plus kh and kw for a conv2d module."""
    if entry.layer == CONV2D_LAYER:
        dims["kh"], dims["kw"] = kernel(entry)
    return dims


def check_tucker(method: str, target: str, entry: ModuleEntry, cores: tuple[str, ...], path: str | None) -> None:
    """Tucker cores only on conv2d layers with a kernel larger than 1×1, all of ``cores`` or none.

    Both ecosystems store a 1×1 convolution in the flattened form, so a 1×1 core has no reader or writer.
    """
    present = [c for c in cores if c in entry.tensors]
    if not present:
        return
    if len(present) != len(cores):
        raise ManifestError(f"module {target!r} ({method}): Tucker cores {list(cores)} come together, found "
                            f"{present}", path=path, hint="the manifest is damaged; re-export the adapter")
    if entry.layer != CONV2D_LAYER or kernel(entry) == (1, 1):
        raise ManifestError(f"module {target!r} ({method}): Tucker cores need a conv2d layer with a kernel larger "
                            f"than 1x1 ({entry.layer} {entry.shape})", path=path,
                            hint="store 1x1 convolutions in the flattened form; re-export the adapter")


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor, order: str) -> torch.Tensor:
    """T = C ×₁ Uᵀ ×₂ Vᵀ, (out, in, kh, kw), with the operand order of ``order`` (LOHA_EINSUM or LOKR_EINSUM).

    Example:
        >>> tucker(torch.ones(2, 2, 3, 3), torch.ones(2, 5), torch.ones(2, 4), LOKR_EINSUM).shape
        torch.Size([5, 4, 3, 3])
    """
    if order == LOHA_EINSUM:
        return torch.einsum(order, core, in_factor, out_factor)
    return torch.einsum(order, core, out_factor, in_factor)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A factor with kernel axes (r, in, kh, kw) as the matrix (r, in·kh·kw); 2-D factors as they are."""
    return t.reshape(t.shape[0], -1)


def tucker_matrix_factors(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, r), M (r, in·kh·kw)) in fp64 with U·M = the Tucker product as an (out, in·kh·kw) matrix.

    M[i, (q, y, x)] = Σ_j C[i, j, y, x]·V[j, q]: the core is folded into the input side, which keeps rank r.

    Example:
        >>> u, m = tucker_matrix_factors(torch.ones(2, 2, 3, 3), torch.ones(2, 5), torch.ones(2, 4))
        >>> tuple(u.shape), tuple(m.shape)
        ((5, 2), (2, 36))
    """
    c, u, v = core.double(), out_factor.double(), in_factor.double()
    m = torch.einsum("ijyx,jq->iqyx", c, v)
    return dense(u.t()), dense(m.reshape(m.shape[0], -1))


def dense(t: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides on every axis (``contiguous()`` keeps odd strides on size-1 axes, which
    ``torch.kron`` refuses)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)
