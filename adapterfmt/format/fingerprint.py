"""A cheap, exact content fingerprint for base weights.

Hashing a 7B model would cost as much as reading it; a strided sample of 1024 elements
plus dtype and shape catches wrong models, wrong revisions and modified weights
(PiSSA/OLoRA residuals) at the cost of a few page reads per tensor.
"""
from __future__ import annotations

import hashlib

import torch

from .dtypes import dtype_name

FINGERPRINT_SCHEME = "sample1024-sha256"
SAMPLE_COUNT = 1024

def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """Fingerprint a tensor exactly as stored (no dtype conversion).

    sha256 over ``"<DTYPE>:<d0>x<d1>...:"`` followed by the little-endian bytes of the
    elements at flat indices ``(i * N) // K`` for ``i in range(K)``, ``K = min(N, 1024)``.

    Example:
        >>> tensor_fingerprint(torch.zeros(2, 2))[:18]
        'sample1024-sha256:'
    """
    flat = tensor.detach().reshape(-1)
    count = flat.numel()
    k = min(count, SAMPLE_COUNT)
    idx = (torch.arange(k, dtype=torch.int64) * count) // max(k, 1)
    sample = flat.cpu()[idx].contiguous()
    digest = hashlib.sha256()
    digest.update(f"{dtype_name(tensor.dtype)}:{'x'.join(map(str, tensor.shape))}:".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes() if k else b"")
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"
