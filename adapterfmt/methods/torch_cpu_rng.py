"""torch's CPU random stream, reimplemented in numpy (no torch import): MT19937, ``uniform_``, ``randperm``.

VeRA, RandLoRA and FourierFT in PEFT regenerate their frozen projections or spectral positions from a
seed with ``torch.Generator(device="cpu").manual_seed(seed)``. This module reproduces those draws bit
for bit so that an adapter file can hold the seed instead of the tensors, and be read without torch.
The normative text is ``spec/torch-cpu-generator.md``; the PEFT recipes are in
:mod:`adapterfmt.methods.torch_cpu_rng_peft`.

One measured trap (torch 2.13, x86-64): ``uniform_`` computes ``x * (to - from) + from`` in float32 and
the compiler contracts it into a fused multiply-add in the AVX2/AVX512 kernels but not in the
``ATEN_CPU_CAPABILITY=default`` kernel. About half of the float32 outputs differ by one ulp between the
two. ``fma=True`` (the default) is what torch produces on any x86-64 CPU with AVX2.

>>> gen = TorchCpuGenerator(0)
>>> [int(w) for w in gen.random(2)]
[2357136044, 2546248239]
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError

STATE_WORDS = 624  # MT19937 n
SHIFT_WORDS = 397  # MT19937 m
MATRIX_A = np.uint32(0x9908B0DF)
UPPER_BIT = np.uint32(0x80000000)
LOWER_BITS = np.uint32(0x7FFFFFFF)
#: ``randperm`` switches from the swap shuffle on 32-bit draws to the inside-out shuffle on 64-bit
#: draws at this ``n`` (torch: ``n < UINT32_MAX / 20``, integer division).
RANDPERM_INSIDE_OUT_FROM = 0xFFFFFFFF // 20
#: Draws at least this long go through numpy's own MT19937 (same algorithm, C speed) after our seeding.
BULK_WORDS = 1 << 16
#: Largest randperm prefix computed in the inside-out path (its first phase is a Python loop).
MAX_INSIDE_OUT_PREFIX = 1 << 20
_U32 = 0xFFFFFFFF


def seed_word(seed: int) -> int:
    """The uint64 seed torch stores for ``manual_seed(seed)``: negatives wrap modulo 2**64.

    >>> seed_word(-1) == 2**64 - 1
    True
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise UsageError(f"generator seed must be an integer, got {seed!r}",
                         hint="use an integer in [-2**63, 2**64)")
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise UsageError(f"generator seed {seed} is out of range",
                         hint="torch accepts seeds in [-2**63, 2**64)")
    return seed % (1 << 64)


def initial_state(seed: int) -> np.ndarray:
    """The 624 MT19937 state words after ``manual_seed(seed)``: Knuth's init on the low 32 bits.

    >>> int(initial_state(5489)[1])
    1301868182
    """
    word = seed_word(seed) & _U32
    state = np.empty(STATE_WORDS, dtype=np.uint32)
    state[0] = word
    for j in range(1, STATE_WORDS):
        word = (1812433253 * (word ^ (word >> 30)) + j) & _U32
        state[j] = word
    return state


def _mix(upper: np.ndarray, lower: np.ndarray, far: np.ndarray) -> np.ndarray:
    """One MT19937 recurrence step for whole slices: far ^ twist(upper, lower)."""
    y = (upper & UPPER_BIT) | (lower & LOWER_BITS)
    return far ^ (y >> np.uint32(1)) ^ np.where(lower & np.uint32(1), MATRIX_A, np.uint32(0))


def twist(state: np.ndarray) -> None:
    """Regenerate all 624 words in place, in the four slices whose inputs are already final."""
    n, m, s = STATE_WORDS, SHIFT_WORDS, state
    k = n - m  # 227: words [0, k) read only old words
    s[:k] = _mix(s[:k], s[1:k + 1], s[m:n])
    s[k:2 * k] = _mix(s[k:2 * k], s[k + 1:2 * k + 1], s[:k])
    s[2 * k:n - 1] = _mix(s[2 * k:n - 1], s[2 * k + 1:n], s[k:n - 1 - k])
    s[n - 1:] = _mix(s[n - 1:], s[:1], s[m - 1:m])


def temper(words: np.ndarray) -> np.ndarray:
    """MT19937 output tempering of state words (uint32 in, uint32 out)."""
    y = words ^ (words >> np.uint32(11))
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    return y ^ (y >> np.uint32(18))


class TorchCpuGenerator:
    """The stream of ``torch.Generator(device="cpu").manual_seed(seed)``.

    Example:
        >>> gen = TorchCpuGenerator(2**32 + 5)   # only the low 32 bits seed the engine
        >>> int(gen.random(1)[0]) == int(TorchCpuGenerator(5).random(1)[0])
        True
    """

    def __init__(self, seed: int):
        self.seed = seed_word(seed)
        self._state = initial_state(self.seed)
        self._pos = STATE_WORDS  # torch starts with left_=1: the first draw twists first

    def state(self) -> tuple[np.ndarray, int]:
        """(copy of the 624 state words, index of the next word to temper): torch's ``state_``/``next_``."""
        return self._state.copy(), self._pos

    def random(self, count: int) -> np.ndarray:
        """``count`` 32-bit draws (torch ``CPUGeneratorImpl::random``) as uint32."""
        count = int(count)
        if count >= BULK_WORDS:
            return self._random_bulk(count)
        out = np.empty(count, dtype=np.uint32)
        done = 0
        while done < count:
            if self._pos == STATE_WORDS:
                twist(self._state)
                self._pos = 0
            take = min(STATE_WORDS - self._pos, count - done)
            out[done:done + take] = temper(self._state[self._pos:self._pos + take])
            self._pos += take
            done += take
        return out

    def _random_bulk(self, count: int) -> np.ndarray:
        """Same words as :meth:`random`, produced by numpy's MT19937 from our state and position."""
        engine = np.random.MT19937(0)
        engine.state = {"bit_generator": "MT19937",
                        "state": {"key": self._state.copy(), "pos": self._pos}}
        out = engine.random_raw(count).astype(np.uint32)
        after = engine.state["state"]
        self._state = np.asarray(after["key"], dtype=np.uint32).copy()
        self._pos = int(after["pos"])
        return out

    def random64(self, count: int) -> np.ndarray:
        """``count`` 64-bit draws (torch ``random64``): two 32-bit draws, the first is the high half."""
        words = self.random(2 * int(count)).astype(np.uint64)
        return (words[0::2] << np.uint64(32)) | words[1::2]

    def skip(self, count: int, chunk: int = 1 << 24) -> None:
        """Consume ``count`` 32-bit draws without keeping them."""
        while count > 0:
            take = min(count, chunk)
            self.random(take)
            count -= take


# ---------------------------------------------------------------- uniform_ / rand


def _round_to_odd_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b in float64 rounded to odd: rounding that to float32 gives the correctly rounded sum."""
    s = a + b
    b_virtual = s - a
    error = (a - (s - b_virtual)) + (b - b_virtual)  # TwoSum: a + b == s + error exactly
    inexact_even = (error != 0) & ((s.view(np.uint64) & np.uint64(1)) == 0)
    toward = np.where(error > 0, np.inf, -np.inf)
    return np.where(inexact_even, np.nextafter(s, toward), s)


def _affine_fp32(x: np.ndarray, low: np.float32, width: np.float32, fma: bool) -> np.ndarray:
    """float32 ``x * width + low``, fused (one rounding) or as two float32 operations."""
    if not fma:
        return x * width + low
    product = x.astype(np.float64) * np.float64(width)  # 24 x 24 bits: exact in float64
    return _round_to_odd_sum(product, np.full_like(product, low)).astype(np.float32)


def _to_bfloat16_values(values: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32 holding the bf16 value."""
    bits = values.astype(np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) & np.uint32(0xFFFF0000)).view(np.float32)


_NARROW = {  # dtype name -> float32 -> that dtype's value (as float32); torch casts with ties to even
    "float32": lambda v: v,
    "bfloat16": _to_bfloat16_values,
    "float16": lambda v: v.astype(np.float16).astype(np.float32),
}


#: Fraction bits of the legacy narrow path: numeric_limits<T>::digits for bfloat16 and float16.
_LEGACY_DIGITS = {"bfloat16": 8, "float16": 11}


def uniform(gen: TorchCpuGenerator, shape, low: float, high: float, *,
            dtype: str = "float32", fma: bool = True, legacy_narrow: bool = False) -> np.ndarray:
    """``torch.empty(shape, dtype=dtype).uniform_(low, high, generator=gen)`` on CPU.

    Returns float32 values (for bfloat16/float16: the narrow values, exactly, held in float32).
    One 32-bit draw per element, in C order; the low 24 bits make the fraction.
    ``legacy_narrow=True`` reproduces bfloat16/float16 as torch 2.11 and older computed them.

    Example:
        >>> uniform(TorchCpuGenerator(0), (2,), -1.0, 1.0).tolist()
        [-0.007486820220947266, 0.5364435911178589]
    """
    if dtype not in _NARROW:
        raise UsageError(f"uniform_ for dtype {dtype!r} is not reproduced",
                         hint=f"use one of {sorted(_NARROW)}")
    low32, high32 = np.float32(low), np.float32(high)
    if not (np.isfinite(low32) and np.isfinite(high32) and low32 <= high32):
        raise UsageError(f"uniform_ bounds [{low}, {high}) are not finite and ordered",
                         hint="pass finite low <= high")
    words = gen.random(int(np.prod(shape, dtype=np.int64)))
    if legacy_narrow and dtype in _LEGACY_DIGITS:
        return _uniform_legacy_narrow(words, low32, high32, dtype).reshape(tuple(shape))
    narrow = _NARROW[dtype]
    fraction = (words & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    values = narrow(_affine_fp32(fraction, low32, np.float32(high32 - low32), fma))
    top, bottom = narrow(np.array([high32, low32], dtype=np.float32))
    values = np.where(values == top, bottom, values)  # torch: a value rounded up to `high` becomes `low`
    return values.reshape(tuple(shape))


def _uniform_legacy_narrow(words: np.ndarray, low32: np.float32, high32: np.float32,
                           dtype: str) -> np.ndarray:
    """torch <= 2.11 (measured 2.0.1 to 2.11.0): bounds and width in the narrow dtype,
    a ``digits``-bit fraction, no clamp.

    Every product is exact in float32 (at most 11 + 11 bits), so fused and unfused agree.
    """
    narrow, digits = _NARROW[dtype], _LEGACY_DIGITS[dtype]
    low, high = narrow(np.array([low32, high32], dtype=np.float32))
    width = narrow(np.array([high - low], dtype=np.float32))[0]
    fraction = (words & np.uint32((1 << digits) - 1)).astype(np.float32) * np.float32(2.0**-digits)
    return narrow(fraction * width + low)


def rand(gen: TorchCpuGenerator, shape, *, dtype: str = "float32") -> np.ndarray:
    """``torch.rand(shape, generator=gen)``: ``uniform_(0, 1)`` (exact with or without FMA).

    >>> rand(TorchCpuGenerator(0), (1,)).tolist()
    [0.49625658988952637]
    """
    return uniform(gen, shape, 0.0, 1.0, dtype=dtype)


# ---------------------------------------------------------------- kaiming_uniform_


def fan_in(shape) -> int:
    """torch's fan_in: ``shape[1]`` times the product of ``shape[2:]`` (needs 2+ dims)."""
    if len(shape) < 2:
        raise UsageError(f"fan_in needs a tensor with at least 2 dimensions, got shape {tuple(shape)}")
    fan = int(shape[1])
    for size in shape[2:]:
        fan *= int(size)
    return fan


def leaky_relu_gain(negative_slope: float) -> float:
    """``torch.nn.init.calculate_gain("leaky_relu", a)``, in Python float64 as torch computes it."""
    return math.sqrt(2.0 / (1 + negative_slope ** 2))


def kaiming_uniform_bound(fan: int, gain: float) -> float:
    """``sqrt(3) * (gain / sqrt(fan))`` in float64, in this exact order (as torch and PEFT do)."""
    return math.sqrt(3.0) * (gain / math.sqrt(fan))


def kaiming_uniform(gen: TorchCpuGenerator, shape, *, a: float = 0.0, dtype: str = "float32",
                    fma: bool = True, legacy_narrow: bool = False) -> np.ndarray:
    """``torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=a, generator=gen)``
    (mode ``fan_in``, nonlinearity ``leaky_relu``; ``a=0`` gives the ReLU gain sqrt(2), as PEFT's VeRA).

    Example:
        >>> kaiming_uniform(TorchCpuGenerator(0), (1, 3)).shape
        (1, 3)
    """
    if 0 in tuple(shape):  # torch warns and returns without drawing
        return np.empty(tuple(shape), dtype=np.float32)
    bound = kaiming_uniform_bound(fan_in(shape), leaky_relu_gain(a))
    return uniform(gen, shape, -bound, bound, dtype=dtype, fma=fma, legacy_narrow=legacy_narrow)


# ---------------------------------------------------------------- randperm


def randperm(gen: TorchCpuGenerator, n: int, prefix: int | None = None) -> np.ndarray:
    """The first ``prefix`` entries (default all) of ``torch.randperm(n, generator=gen)`` on CPU, int64.

    The generator advances exactly as torch's does (n-1 32-bit draws, or n 64-bit draws for
    ``n >= RANDPERM_INSIDE_OUT_FROM``), whatever the prefix.

    Example:
        >>> randperm(TorchCpuGenerator(5), 10).tolist()
        [1, 4, 9, 6, 3, 5, 0, 2, 8, 7]
    """
    n = int(n)
    prefix = n if prefix is None else int(prefix)
    if n < 0 or not 0 <= prefix <= n:
        raise UsageError(f"randperm({n}) prefix {prefix} is out of range", hint="need 0 <= prefix <= n")
    if n < RANDPERM_INSIDE_OUT_FROM:
        return _randperm_swaps(gen, n, prefix)
    return _randperm_inside_out(gen, n, prefix)


def _randperm_swaps(gen: TorchCpuGenerator, n: int, prefix: int) -> np.ndarray:
    """Forward Fisher-Yates: step i swaps r[i] with r[i + draw % (n - i)]; r[i] is final after step i."""
    steps = max(n - 1, 0)
    kept = min(prefix, steps)
    draws = gen.random(kept).astype(np.int64)
    gen.skip(steps - kept)
    moved: dict[int, int] = {}  # positions whose value is not (yet) their index
    out = np.empty(prefix, dtype=np.int64)
    for i in range(kept):
        j = i + int(draws[i]) % (n - i)
        out[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    if kept < prefix:  # prefix == n: the last position takes what is left there
        out[kept] = moved.get(kept, kept)
    return out


def _randperm_inside_out(gen: TorchCpuGenerator, n: int, prefix: int,
                         chunk: int = 1 << 22) -> np.ndarray:
    """Inside-out Fisher-Yates on 64-bit draws: step i sets r[i] = r[z], r[z] = i with z = draw % (i+1).

    Values only move up to the current step's index, so after step ``prefix`` a position p < prefix
    changes only when a later step i draws z == p, and then it becomes i: the last such i wins.
    """
    if prefix > MAX_INSIDE_OUT_PREFIX:
        raise UsageError(f"randperm({n}) prefix {prefix} is too long to reproduce",
                         hint=f"ask for at most {MAX_INSIDE_OUT_PREFIX} leading entries")
    out = np.empty(prefix, dtype=np.int64)
    head = gen.random64(prefix)
    for i in range(prefix):
        z = int(head[i] % np.uint64(i + 1))
        out[i] = out[z] if z < i else i
        out[z] = i
    last = np.full(prefix, -1, dtype=np.int64)
    for start in range(prefix, n, chunk):
        steps = np.arange(start, min(start + chunk, n), dtype=np.uint64)
        z = gen.random64(len(steps)) % (steps + np.uint64(1))
        hit = z < np.uint64(prefix)
        np.maximum.at(last, z[hit].astype(np.int64), steps[hit].astype(np.int64))
    return np.where(last >= 0, last, out)
