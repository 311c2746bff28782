"""A cheap, exact content fingerprint for base weights.

Hashing a 7B model would cost as much as reading it; a strided sample of 1024 elements
plus dtype and shape catches wrong models, wrong revisions and modified weights
(PiSSA/OLoRA residuals) at the cost of a few page reads per tensor.
"""
from __future__ import annotations

import hashlib

import torch

FINGERPRINT_SCHEME = "sample1024-sha256"
SAMPLE_COUNT = 1024

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_NAMES[torch.float8_e4m3fn] = "F8_E4M3"
    _DTYPE_NAMES[torch.float8_e5m2] = "F8_E5M2"
DTYPE_FROM_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype, e.g. ``BF16``."""
    return _DTYPE_NAMES[dtype]


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
