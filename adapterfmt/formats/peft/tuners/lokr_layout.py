"""PEFT's LoKr layout rules: how it splits out/in into Kronecker factors and which halves it factorises.

PEFT rebuilds the tensor shapes from the config at load time, so an export must pick a
``decompose_factor`` and ``decompose_both`` under which PEFT recreates every module's layout.
"""
from __future__ import annotations

from ....errors import UsageError


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dim`` into (m, n), m ≤ n (except an exact ``factor``, returned as given).

    Walk the divisors of ``dim`` upwards while the pair has not crossed √dim and the divisor does
    not exceed ``factor`` (−1: no limit).

    Example:
        >>> factorization(96), factorization(64), factorization(128, 4), factorization(127)
        ((8, 12), (8, 8), (4, 32), (1, 127))
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = 1
    for cand in range(2, dim + 1):
        if m >= dim // m or cand > limit:
            break
        if dim % cand == 0:
            m = cand
    n = dim // m
    return min(m, n), max(m, n)


def peft_layout(out_f: int, in_f: int, rank: int, factor: int, decompose_both: bool) -> tuple:
    """((a, b), (c, d), w1 full?, w2 full?) as PEFT's LoKr Linear layer builds it.

    Example:
        >>> peft_layout(64, 96, 2, -1, False)
        ((8, 8), (8, 12), True, False)
    """
    a, b = factorization(out_f, factor)
    c, d = factorization(in_f, factor)
    w1_full = not (decompose_both and rank < max(a, c) / 2)
    w2_full = not (rank < max(b, d) / 2)
    return (a, b), (c, d), w1_full, w2_full


def _fits(entries, factor: int, decompose_both: bool) -> str | None:
    """The first module whose layout PEFT would not recreate, or None."""
    for target, entry in entries.items():
        out_f, in_f = entry.shape[:2]  # conv2d: PEFT splits the channels the same way
        layout = peft_layout(out_f, in_f, int(entry.params["rank"]), factor, decompose_both)
        (a, c), (b, d) = entry.params["w1_shape"], entry.params["w2_shape"]
        ours = ((a, b), (c, d),
                "w1" in entry.tensors, "w2" in entry.tensors)
        if layout != ours:
            return target
    return None


def peft_layout_factor(entries) -> tuple[int, bool]:
    """(decompose_factor, decompose_both) under which PEFT recreates every module's tensor layout.

    Example:
        >>> peft_layout_factor(entries)  # doctest: +SKIP
        (-1, False)
    """
    candidates = [-1] + sorted({f for e in entries.values() for f in (*e.params["w1_shape"],
                                                                      *e.params["w2_shape"])})
    first_bad = None
    for factor in candidates:
        for decompose_both in (False, True):
            bad = _fits(entries, factor, decompose_both)
            if bad is None:
                return factor, decompose_both
            first_bad = first_bad or bad
    raise UsageError(f"module {first_bad!r}: no PEFT decompose_factor/decompose_both recreates its LoKr layout",
                     hint="convert to LoRA (--method lora) or keep the adapterfmt file")
