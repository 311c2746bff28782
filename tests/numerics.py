"""Float comparison helpers for tests."""
import torch

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype tensors."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ia, ib = a.contiguous().view(_INT[a.dtype]).long(), b.contiguous().view(_INT[b.dtype]).long()
    # Map sign-magnitude bit patterns onto a monotonic integer line.
    bits = {torch.int32: 31, torch.int16: 15}[_INT[a.dtype]]
    ia = torch.where(ia < 0, -(ia & ((1 << bits) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << bits) - 1)), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0
