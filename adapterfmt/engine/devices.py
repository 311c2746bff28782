"""Where the merge maths runs: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

Merging is I/O-bound (a rank-16 ΔW of a 4096² weight is ~10 ms on 2 CPU cores), so the
device mainly matters for high ranks and dense methods. Results on CUDA can differ from
CPU by an ulp where the matmul reduces in another order; TF32 is always off so that
fp32 really means fp32.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``--device``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}", hint=f"use one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise UsageError("--device cuda was given but no CUDA device is available",
                         hint="use --device cpu (or auto)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and available) else "cpu")


@contextlib.contextmanager
def exact_math(device: torch.device) -> Iterator[None]:
    """Disable TF32 (and reduced-precision reductions) for the duration of a merge on CUDA."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction) = saved
