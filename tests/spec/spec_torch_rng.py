"""The generator `torch-cpu-mt19937` v1, written from spec/torch-cpu-generator.md §§1–7 alone.

Plain Python integers for the engine (small draws only: conformance vectors and known answers), numpy
for the binary32 arithmetic. It imports nothing from adapterfmt or torch: the second reader regenerates
VeRA's projections and FourierFT's positions with it.

Example:
    >>> gen = Mt19937(5489)
    >>> gen.random(), gen.random()
    (3499211612, 581869302)
    >>> randperm_prefix(Mt19937(5), 10, 10)
    [1, 4, 9, 6, 3, 5, 0, 2, 8, 7]
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MASK32 = 0xFFFFFFFF
#: §6: randperm switches to the inside-out algorithm at floor((2^32 - 1) / 20).
RANDPERM_SWITCH = 214748364


class Mt19937:
    """§2: 624 u32 words, Knuth seeding from the seed's low 32 bits (§1), in-place twist, tempering."""

    def __init__(self, seed: int):
        if not -2**63 <= seed < 2**64:
            raise ValueError(f"seed {seed} outside [-2^63, 2^64)")
        mt = [(seed % 2**64) % 2**32]
        for j in range(1, 624):
            prev = mt[j - 1]
            mt.append((1812433253 * (prev ^ (prev >> 30)) + j) & MASK32)
        self.mt, self.next = mt, 624

    def _twist(self):
        mt = self.mt
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        self.next = 0

    def random(self) -> int:
        """One 32-bit draw."""
        if self.next == 624:
            self._twist()
        y = self.mt[self.next]
        self.next += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & MASK32

    def random64(self) -> int:
        """One 64-bit draw: (a << 32) | b of two 32-bit draws a then b."""
        a = self.random()
        return (a << 32) | self.random()


def _fused(f: float, width: np.float32, lo: np.float32) -> np.float32:
    """RN32(f·width + lo) with one rounding: the exact value as a fraction, rounded once (§3 `fused`)."""
    return _round_to_f32(Fraction(f) * Fraction(float(width)) + Fraction(float(lo)))


def _round_to_f32(value: Fraction) -> np.float32:
    """The binary32 nearest to the exact rational ``value``, ties to even."""
    near = np.float32(float(value))  # may be off by double rounding: check both neighbours
    best = near
    for candidate in (np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))):
        d_best, d_cand = abs(Fraction(float(best)) - value), abs(Fraction(float(candidate)) - value)
        even = int(np.array(candidate).view(np.uint32)) % 2 == 0
        if d_cand < d_best or (d_cand == d_best and even):
            best = candidate
    return np.float32(best)


def uniform_f32(gen: Mt19937, count: int, low: float, high: float, variant: str) -> np.ndarray:
    """§3: ``count`` binary32 values of uniform_(low, high), C order, variant `fused` or `unfused`."""
    lo, hi = np.float32(low), np.float32(high)
    width = np.float32(hi - lo)
    out = np.empty(count, dtype=np.float32)
    for k in range(count):
        f = (gen.random() & 0xFFFFFF) * 2.0**-24
        if variant == "fused":
            v = _fused(f, width, lo)
        else:
            v = np.float32(np.float32(np.float32(f) * width) + lo)
        out[k] = lo if v == hi else v
    return out


def kaiming_bound(shape: tuple[int, ...], a: float = 0.0) -> float:
    """§5: the binary64 bound of kaiming_uniform_ (mode fan_in, leaky_relu)."""
    fan = math.prod(shape[1:])
    gain = math.sqrt(2.0 / (1 + a * a))
    return math.sqrt(3.0) * (gain / math.sqrt(fan))


def kaiming_uniform(gen: Mt19937, shape: tuple[int, ...], variant: str) -> np.ndarray:
    """§5 on float32: uniform_(-bound, bound) of the given shape."""
    bound = kaiming_bound(shape)
    return uniform_f32(gen, math.prod(shape), -bound, bound, variant).reshape(shape)


def randperm_prefix(gen: Mt19937, n: int, k: int) -> list[int]:
    """§6: the first ``k`` entries of randperm(n) (forward Fisher–Yates; n < 214748364 only)."""
    if n >= RANDPERM_SWITCH:
        raise NotImplementedError("the inside-out algorithm is not needed by the vectors")
    moved: dict[int, int] = {}
    prefix = []
    for i in range(min(k, n)):
        if i < n - 1:
            z = i + gen.random() % (n - i)
            moved[i], moved[z] = moved.get(z, z), moved.get(i, i)
        prefix.append(moved.get(i, i))
    return prefix


def vera_projections(seed: int, rank: int, max_in: int, max_out: int, variant: str):
    """§7 VeRA: A (rank, max_in) then B (max_out, rank), float32, one generator."""
    gen = Mt19937(seed)
    a = kaiming_uniform(gen, (rank, max_in), variant)
    return a, kaiming_uniform(gen, (max_out, rank), variant)


def fourierft_positions(seed: int, out: int, inn: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """§7 FourierFT: (rows, cols) of the first n entries of randperm(out·in) under a fresh generator."""
    flat = np.array(randperm_prefix(Mt19937(seed), out * inn, n), dtype=np.int64)
    return flat // inn, flat % inn
