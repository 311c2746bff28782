"""Pinned, portable NOLA basis generator: counter-based Philox4x32-10 (v1).

Normative spec: ``spec/nola-generator.md``.  Summary:

* key = (seed & 0xffffffff, seed >> 32) for a uint64 ``seed``;
* element ``n`` of a basis (C-order over the full shape) is output word
  ``n % 4`` of ``philox4x32_10(counter=(lo32(n//4), hi32(n//4), 0, 0), key)``;
* uint32 ``u`` -> float32 ``(2*(u >> 8) - 2**24) * 2**-24`` (exact, in [-1, 1)).

Why Philox: it is counter based, so any element range can be generated
independently (chunking, fingerprinting, any device) with identical bits.
torch has no usable uint32 arithmetic, so all words live in int64 tensors
holding values in [0, 2**32); 32x32-bit products use int64 modular
multiplication where a one-time probe confirms it wraps, else 16-bit halves
that never overflow; both are exact, hence the same bits on CPU, CUDA, numpy.

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
#: (7 int64 buffers of this length, ~7 MiB) and keeps them cache-resident on
#: CPU; tests shrink it to exercise chunk boundaries.
CHUNK_COUNTERS = 1 << 17
#: Number of leading basis elements hashed by :func:`basis_fingerprint`.
FINGERPRINT_ELEMENTS = 4096


#: Per-device-type cache: does int64 ``mul_`` wrap modulo 2**64 there?
_WRAPPING_MUL: dict[str, bool] = {}
#: Set False to force the overflow-free 16-bit-split multiply (tests use this).
USE_WRAPPING_MUL = True


def _wrapping_mul_ok(device: torch.device) -> bool:
    """Probe once per device type that int64 products wrap modulo 2**64.

    torch's int64 kernels wrap in practice (vectorised CPU code and CUDA alike),
    but C++ does not promise it, so we check against exact Python integers on
    extreme operands, on a length (67) that hits vector body and scalar tail.
    Where the check fails we use the split path, which never overflows.
    (torch.uint64 would make this well defined, but its CPU mul is not
    vectorised: no faster than the split path.)
    """
    if device.type not in _WRAPPING_MUL:
        vals = [MASK32, MASK32 - 1, 1 << 31, (1 << 31) - 1, 1, 0, 0x12345678] * 10
        vals = vals[:67]
        ok = True
        for a in (M0, M1):
            try:
                p = torch.tensor(vals, dtype=torch.int64, device=device).mul_(a)
                got = p.cpu().tolist()
            except (RuntimeError, NotImplementedError):
                ok = False
                break
            want = [((a * v) + 2**63) % 2**64 - 2**63 for v in vals]
            ok = ok and got == want
        _WRAPPING_MUL[device.type] = ok
    return _WRAPPING_MUL[device.type]


def _mulhilo_(a: int, b: torch.Tensor, lo: torch.Tensor, tmp: torch.Tensor) -> None:
    """In place: ``b`` <- hi32(a*b), ``lo`` <- lo32(a*b); ``tmp`` is scratch.

    Fast path (probed, see :func:`_wrapping_mul_ok`): the int64 product holds
    a*b mod 2**64, so lo = p & 0xffffffff and hi = (p >> 32) & 0xffffffff
    (the mask undoes sign extension).  Split path: b = bh*2**16 + bl, both
    partial products a*bh, a*bl < 2**48 are exact in int64;
    hi = (a*bh + (a*bl >> 16)) >> 16 (nested floor division is exact),
    lo = (((a*bh) & 0xffff) << 16) + a*bl, masked.
    """
    if USE_WRAPPING_MUL and _wrapping_mul_ok(b.device):
        b.mul_(a)
        torch.bitwise_and(b, MASK32, out=lo)
        b.bitwise_right_shift_(32).bitwise_and_(MASK32)
        return
    torch.bitwise_and(b, 0xFFFF, out=tmp).mul_(a)              # pl = a*bl
    b.bitwise_right_shift_(16).mul_(a)                          # ph = a*bh
    torch.bitwise_and(b, 0xFFFF, out=lo).bitwise_left_shift_(16)
    lo.add_(tmp).bitwise_and_(MASK32)
    b.add_(tmp.bitwise_right_shift_(16)).bitwise_right_shift_(16)


def _rounds_(x0, x1, x2, x3, k0, k1):
    """Ten Philox rounds, destroying the (contiguous, same-shape) inputs.

    Works on preallocated buffers only (no per-op allocation: on CPU that
    churn cost ~30%).  Keys may be Python ints or broadcastable tensors.
    Returns the four output word tensors (a permutation of the inputs' storage
    plus two scratch buffers).
    """
    spare0, spare1, tmp = (torch.empty_like(x0) for _ in range(3))
    for r in range(ROUNDS):
        if r:  # key bump between rounds: 9 bumps for 10 rounds
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        _mulhilo_(M0, x0, spare0, tmp)   # x0 <- hi0, spare0 <- lo0
        _mulhilo_(M1, x2, spare1, tmp)   # x2 <- hi1, spare1 <- lo1
        x2.bitwise_xor_(x1).bitwise_xor_(k0)  # hi1 ^ x1 ^ k0 -> new x0
        x0.bitwise_xor_(x3).bitwise_xor_(k1)  # hi0 ^ x3 ^ k1 -> new x2
        # new state (hi1^x1^k0, lo1, hi0^x3^k1, lo0); old x1, x3 become spares.
        x0, x1, x2, x3, spare0, spare1 = x2, spare1, x0, spare0, x1, x3
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
    shape = torch.broadcast_shapes(c.shape[:-1], k.shape[:-1])
    # Private contiguous copies: _rounds_ works in place.
    x = [w.expand(shape).clone(memory_format=torch.contiguous_format) for w in c.unbind(-1)]
    k0, k1 = (w.expand(shape) for w in k.unbind(-1))
    return torch.stack(_rounds_(*x, k0, k1), dim=-1)


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
        x1 = ctr >> 32
        x0 = ctr.bitwise_and_(MASK32)
        words = _rounds_(x0, x1, torch.zeros_like(ctr), torch.zeros_like(ctr), k0, k1)
        words = torch.stack(words, dim=-1).view(-1)
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
