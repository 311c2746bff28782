"""Refusing a merged (or unmerged) tensor that gained inf/NaN values.

W + ΔW can exceed the output dtype's range (fp16's max is 65504): the rounded tensor then holds inf,
which every consumer loads without complaint and which ruins every image or token it touches. A
tensor is refused when its result has more non-finite values than the stored input had (a base
that already holds inf is the base's business, not the merge's); the whole output is then not
written (the writers are atomic).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..errors import TensorError


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many inf/NaN values ``tensor`` holds (0 for integer tensors).

    Example:
        >>> nonfinite_count(torch.tensor([1.0, float("inf")]))
        1
    """
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


#: what to do, for a directory merge (which has --dtype) and a single-file one (which keeps the file's dtypes)
HINT = "merge with --dtype fp32 or bf16, or with a smaller adapter weight (--adapter FILE:WEIGHT)"
SINGLE_FILE_HINT = ("a single-file merge keeps the file's dtypes: merge with a smaller adapter weight "
                    "(--adapter FILE:WEIGHT), or into an fp32 checkpoint")


def refuse_overflow(name: str, stored: torch.Tensor, bad: int, dtype: torch.dtype, path=None,
                    hint: str = HINT) -> None:
    """Raise when the result's ``bad`` non-finite count exceeds the stored tensor's."""
    gained = bad - nonfinite_count(stored)
    if gained > 0:
        limit = torch.finfo(dtype).max if dtype.is_floating_point else None
        raise TensorError(f"merged tensor {name!r} has {gained} inf/NaN value(s) after rounding to "
                          f"{str(dtype).removeprefix('torch.')} (|W + ΔW| beyond {limit:.6g}); nothing was written",
                          path=path, hint=hint)


def check_result(name: str, stored: torch.Tensor, result: torch.Tensor, path=None, hint: str = HINT
                 ) -> torch.Tensor:
    """``result`` unchanged, after refusing it if it gained non-finite values over ``stored``.

    Example:
        >>> check_result("w", torch.ones(2), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    refuse_overflow(name, stored, nonfinite_count(result), result.dtype, path, hint)
    return result


def checked_blocks(name: str, stored: torch.Tensor, blocks: Iterable[torch.Tensor], path=None,
                   hint: str = HINT) -> Iterator[torch.Tensor]:
    """The row blocks of one result, refusing after the last one if together they gained inf/NaN."""
    bad, dtype = 0, stored.dtype
    for block in blocks:
        bad += nonfinite_count(block)
        dtype = block.dtype
        yield block
    refuse_overflow(name, stored, bad, dtype, path, hint)
