"""Philox4x32-10 and the NOLA basis generator v1, written from spec/nola-generator.md (numpy only).

Example:
    >>> basis_fingerprint(0, 6)[:8]
    '2e00c97a'
"""
from __future__ import annotations

import hashlib

import numpy as np

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Random123 philox4x32_R<10>: counters (n, 4) of uint32 values -> (n, 4) outputs (uint64 holding u32)."""
    x = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = key
    mask = np.uint64(MASK)
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0 = np.uint64(M0) * x[0]
        p1 = np.uint64(M1) * x[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        x = [hi1 ^ x[1] ^ np.uint64(k0), lo1, hi0 ^ x[3] ^ np.uint64(k1), lo0]
    return np.stack(x, axis=1)


def philox_basis(seed: int, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the flat basis of generator philox4x32-10 v1, fp32."""
    if not 0 <= seed < 2**64:
        raise ValueError("seed is not a uint64")
    n = np.arange(start, stop, dtype=np.uint64)
    c = n // np.uint64(4)
    counters = np.stack([c & np.uint64(MASK), c >> np.uint64(32), np.zeros_like(c), np.zeros_like(c)], axis=1)
    words = philox4x32_10(counters, (seed & MASK, seed >> 32))
    u = words[np.arange(len(n)), (n % np.uint64(4)).astype(np.int64)]
    integer = (np.uint64(2) * (u >> np.uint64(8))).astype(np.int64) - (1 << 24)
    return integer.astype(np.float32) * np.float32(2.0**-24)


def basis_fingerprint(seed: int, numel: int) -> str:
    """nola-generator.md §4: hex SHA-256 of the first min(numel, 4096) fp32 LE elements."""
    return hashlib.sha256(philox_basis(seed, 0, min(numel, 4096)).astype("<f4").tobytes()).hexdigest()


