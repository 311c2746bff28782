"""Pinned, portable NOLA basis generator: counter-based Philox4x32-10 (v1).

Normative spec: ``spec/nola-generator.md``.  Summary:

* key = (seed & 0xffffffff, seed >> 32) for a uint64 ``seed``;
* element ``n`` of a basis (C-order over the full shape) is output word
  ``n % 4`` of ``philox4x32_10(counter=(lo32(n//4), hi32(n//4), 0, 0), key)``;
* uint32 ``u`` -> float32 ``(2*(u >> 8) - 2**24) * 2**-24`` (exact, in [-1, 1)).

Why Philox: it is counter based, so any element range can be generated
independently (chunking, fingerprinting, any device) with identical bits.
torch has no usable uint32 arithmetic, so all words live in int64 tensors
holding values in [0, 2**32); 32x32-bit products are formed from 16-bit
halves so no intermediate ever exceeds 2**49 -- no signed overflow, hence the
same bits on CPU and CUDA.

>>> [f"{w:08x}" for w in philox4x32_10(torch.zeros(4, dtype=torch.int64),
...                                    torch.zeros(2, dtype=torch.int64)).tolist()]
['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']
>>> nola_basis(0, (2, 3)).dtype
torch.float32
"""
from __future__ import annotations

import hashlib
import math

import torch

GENERATOR_ID = "philox4x32-10"
GENERATOR_VERSION = 1

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Random123 PHILOX_M4x32_0/1
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Random123 PHILOX_W32_0/1 (Weyl key bumps)
MASK32 = 0xFFFFFFFF
ROUNDS = 10

#: Counters (4 outputs each) processed per chunk.  Bounds the temporaries
#: (~a dozen int64 tensors of this length) and keeps them cache-resident on
#: CPU; tests shrink it to exercise chunk boundaries.
CHUNK_COUNTERS = 1 << 16
#: Number of leading basis elements hashed by :func:`basis_fingerprint`.
FINGERPRINT_ELEMENTS = 4096


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of constant ``a`` and words ``b``.

    b = bh*2**16 + bl, so a*b = (a*bh)*2**16 + a*bl with both partial products
    < 2**48: exact in int64.  hi = (a*bh + (a*bl >> 16)) >> 16 (nested floor
    division is exact); lo = ((a*bh & 0xffff) << 16) + a*bl, masked.
    """
    pl = b & 0xFFFF
    pl *= a
    ph = b >> 16
    ph *= a
    lo = ph & 0xFFFF
    lo <<= 16
    lo += pl
    lo &= MASK32
    pl >>= 16
    ph += pl
    ph >>= 16
    return ph, lo


def _rounds(x0, x1, x2, x3, k0, k1):
    """Ten Philox rounds; keys may be Python ints or broadcastable tensors."""
    for r in range(ROUNDS):
        if r:  # key bump between rounds: 9 bumps for 10 rounds
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(M0, x0)
        hi1, lo1 = _mulhilo(M1, x2)
        hi1 ^= x1
        hi1 ^= k0
        hi0 ^= x3
        hi0 ^= k1
        x0, x1, x2, x3 = hi1, lo1, hi0, lo0
    return x0, x1, x2, x3


def philox4x32_10(counter_words: torch.Tensor, key_words: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 (Random123) on int64 tensors of 32-bit words.

    ``counter_words``: (..., 4), ``key_words``: (..., 2), broadcastable, values
    in [0, 2**32).  Returns int64 (..., 4) output words.

    >>> c = torch.tensor([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344])
    >>> k = torch.tensor([0xa4093822, 0x299f31d0])
    >>> [f"{w:08x}" for w in philox4x32_10(c, k).tolist()]
    ['d16cfe09', '94fdcceb', '5001e420', '24126ea1']
    """
    c = torch.as_tensor(counter_words, dtype=torch.int64)
    k = torch.as_tensor(key_words, dtype=torch.int64, device=c.device)
    out = _rounds(*c.unbind(-1), *k.unbind(-1))
    return torch.stack(torch.broadcast_tensors(*out), dim=-1)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def _words_to_float(u: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64) -> float32 (2*(u>>8) - 2**24) * 2**-24, exactly.

    The integer is in [-2**24, 2**24 - 2], so the float32 cast is exact, and
    the power-of-two scale is exact too: no rounding, no FMA hazard.
    """
    v = u >> 8
    v *= 2
    v -= 1 << 24
    return v.to(torch.float32).mul_(2.0**-24)


def _basis_range(seed: int, start: int, stop: int, device=None, out=None,
                 chunk_counters: int | None = None) -> torch.Tensor:
    """Flat basis elements [start, stop) as float32 (written into ``out`` if given).

    Shared by :func:`nola_basis` (whole range) and :func:`basis_fingerprint`
    (a prefix).  Works chunk by chunk so peak extra memory is
    O(chunk_counters) regardless of ``stop - start``.
    """
    seed = _check_seed(seed)
    if not 0 <= start <= stop:
        raise ValueError(f"bad element range [{start}, {stop})")
    chunk = int(chunk_counters or CHUNK_COUNTERS)
    if out is None:
        out = torch.empty(stop - start, dtype=torch.float32, device=device)
    k0, k1 = seed & MASK32, seed >> 32
    c_first, c_end = start // 4, -(-stop // 4)  # counters covering the range
    for c_lo in range(c_first, c_end, chunk):
        c_hi = min(c_lo + chunk, c_end)
        ctr = torch.arange(c_lo, c_hi, dtype=torch.int64, device=out.device)
        x0, x1 = ctr & MASK32, ctr >> 32
        zeros = torch.zeros_like(ctr)
        words = torch.stack(_rounds(x0, x1, zeros, zeros, k0, k1), dim=-1).view(-1)
        # words[j] is element 4*c_lo + j; clip to the requested range.
        lo = max(start, 4 * c_lo)
        hi = min(stop, 4 * c_hi)
        out[lo - start:hi - start] = _words_to_float(words[lo - 4 * c_lo:hi - 4 * c_lo])
    return out


def nola_basis(seed: int, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """The NOLA basis tensor for ``seed``: float32, ``shape``, uniform on [-1, 1).

    Element order is C-order over the whole shape, e.g. (basis index, row, col).
    Bit-identical on every device and to ``nola_basis_numpy``.

    >>> b = nola_basis(2**40 + 12345, (4, 8, 16))
    >>> b.shape, bool((b >= -1).all() and (b < 1).all())
    (torch.Size([4, 8, 16]), True)
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return _basis_range(seed, 0, math.prod(shape), device=device).view(shape)


def basis_fingerprint(seed: int, shape: tuple[int, ...]) -> str:
    """SHA-256 hex of the little-endian float32 bytes of the first
    ``min(numel, 4096)`` elements (C-order) of ``nola_basis(seed, shape)``.

    Nothing else is hashed (no header, no shape): the shape only matters
    through numel when numel < 4096.  Only those elements are generated, so it
    is cheap for any basis size.

    >>> len(basis_fingerprint(0, (64, 1024, 8)))
    64
    """
    n = min(math.prod(int(s) for s in shape), FINGERPRINT_ELEMENTS)
    vals = _basis_range(seed, 0, n, device="cpu").numpy()
    return hashlib.sha256(vals.astype("<f4", copy=False).tobytes()).hexdigest()
