"""Obviously-correct numpy reference for the NOLA basis generator (philox4x32-10/v1).

Kept deliberately plain: every 32x32-bit product is formed exactly in uint64
(max (2**32-1)**2 < 2**64), so mul-hi/lo are just a shift and a mask.  It is
the oracle the torch implementation (``adapterfmt.nola_generator``) is tested
against, so it must not import torch.  The normative text is
``spec/nola-generator.md``.

>>> [f"{w:08x}" for w in philox4x32_10_numpy([0, 0, 0, 0], [0, 0])]
['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']
"""
from __future__ import annotations

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Random123 PHILOX_M4x32_0/1
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Random123 PHILOX_W32_0/1 (Weyl key bumps)
MASK32 = 0xFFFFFFFF


def philox4x32_10_numpy(counter_words, key_words) -> np.ndarray:
    """Philox4x32-10 on arrays of shape (..., 4) counters and (..., 2) keys.

    Returns uint64 array (..., 4) holding the 32-bit output words.
    """
    c = np.asarray(counter_words, dtype=np.uint64)
    k = np.asarray(key_words, dtype=np.uint64)
    x0, x1, x2, x3 = (c[..., i] for i in range(4))
    k0, k1 = k[..., 0], k[..., 1]
    m32 = np.uint64(MASK32)
    for r in range(10):
        if r:  # key bump between rounds (9 bumps for 10 rounds)
            k0 = (k0 + np.uint64(W0)) & m32
            k1 = (k1 + np.uint64(W1)) & m32
        p0 = np.uint64(M0) * x0
        p1 = np.uint64(M1) * x2
        hi0, lo0 = p0 >> np.uint64(32), p0 & m32
        hi1, lo1 = p1 >> np.uint64(32), p1 & m32
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return np.stack(np.broadcast_arrays(x0, x1, x2, x3), axis=-1)


def nola_basis_numpy(seed: int, shape) -> np.ndarray:
    """Reference NOLA basis: float32 array of ``shape``, uniform on [-1, 1).

    >>> nola_basis_numpy(0, (2, 3)).dtype
    dtype('float32')
    """
    if (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
            or not 0 <= int(seed) < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    n_ctr = -(-numel // 4)
    ctr = np.arange(n_ctr, dtype=np.uint64)
    counters = np.stack(
        [ctr & np.uint64(MASK32), ctr >> np.uint64(32),
         np.zeros_like(ctr), np.zeros_like(ctr)], axis=-1)
    key = [seed & MASK32, seed >> 32]
    u = philox4x32_10_numpy(counters, key).reshape(-1)[:numel]
    # Exact: 2*(u>>8) - 2**24 is an integer in [-2**24, 2**24) (fits fp32);
    # scaling by 2**-24 is a power of two, so no rounding anywhere.
    v = (2 * (u >> np.uint64(8)).astype(np.int64) - 2**24).astype(np.float32)
    return (v * np.float32(2.0**-24)).reshape(shape)
