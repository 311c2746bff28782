"""Legacy NOLA basis ``torch-cpu-kaiming-uniform`` v1 (import provenance of the official ViT code).

torch's CPU MT19937 after ``manual_seed(seed)``, ``kaiming_uniform_(a=sqrt(5))`` into
``zeros(draw_shape)`` after drawing every shape in ``draw_after`` first (the official B basis
follows A in the same stream); canonical = transpose of the last two axes. Sequential, so it is
generated whole. It depends on torch's CPU generator, which is why new files use Philox.
"""
from __future__ import annotations

import functools
import math

import torch

from ...errors import ManifestError


@functools.lru_cache(maxsize=4)
def _kaiming_draw(seed: int, after: tuple, shape: tuple) -> torch.Tensor:
    # Cached: the official ViT reuses one basis pair for every fc1 (and one for every fc2).
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    for prior in after:
        torch.nn.init.kaiming_uniform_(torch.zeros(prior), a=math.sqrt(5), generator=gen)
    drawn = torch.zeros(shape)
    torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=gen)
    return drawn


def kaiming_basis(generator: dict, side: dict, dims: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Basis matrices ``start..stop-1`` (canonical orientation, fp32) of one side.

    Example:
        >>> side = {"seed": "0", "num_basis": 2, "draw_shape": [2, 3, 4]}
        >>> kaiming_basis({}, side, (4, 3), 0, 2).shape
        torch.Size([2, 4, 3])
    """
    drawn = _kaiming_draw(int(side["seed"]), tuple(tuple(s) for s in side.get("draw_after", [])),
                          tuple(side["draw_shape"]))
    canon = drawn.transpose(1, 2) if side.get("transpose", True) else drawn
    if list(canon.shape[1:]) != list(dims) or canon.shape[0] != int(side["num_basis"]):
        raise ManifestError(f"draw_shape {side['draw_shape']} does not give {side['num_basis']} "
                            f"({dims[0]}, {dims[1]}) basis matrices", hint="the manifest is damaged; re-import it")
    return canon[start:stop].clone(memory_format=torch.contiguous_format)
