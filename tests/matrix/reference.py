"""Independent float64 ΔW of every method, written from the spec, never from the package's maths.

Sources: ``spec/README.md`` §6 (lora, rsLoRA, dora), ``spec/methods-principal.md`` §1 (olora, pissa,
sorsa), ``spec/nola.md`` §§2-3 and ``spec/nola-generator.md`` (nola). Only numpy; the one thing
taken from the package is the NOLA basis of ``adapterfmt.methods.nola.reference_numpy``, the
numpy oracle of the generator (itself pinned to the spec's known-answer vectors), because a
basis is a bit pattern, not a formula.

Every function takes the module's params (the manifest dict), its canonical ``[out, in]`` shape
and its tensors by role as float64 numpy arrays (stored values converted exactly), and returns ΔW
in canonical orientation. The scale is re-derived from the params by the spec's rule (not read from
``params["scale"]``), except for NOLA whose only scale is ``scale``.

Orientation (spec §4): with ``fan_in_fan_out`` the base stores Wᵀ; ΔW is defined on the canonical
W and transposed when applied, see :func:`applied`.

Tolerance table (``u = 2**-24``, fp32's unit roundoff; the package computes in fp32 from inputs that
are exact in fp32, the reference in float64). |X| is the elementwise absolute value.

| method | quantity | bound |
|---|---|---|
| lora, rslora | each ΔW_ij | ``(r + 2)·u·|s|·(|B|·|A|)_ij`` (r-term dot product, one scale rounding) |
| olora, pissa | each ΔW_ij | ``(r + 3)·u·|s|·(|B|·|A| + |B0|·|A0|)_ij`` (two products, a difference, the scale) |
| sorsa | each ΔW_ij | ``(r + 4)·u·|s|·(|U|·|S|·|Vt| + |U0|·|S0|·|Vt0|)_ij`` (as olora, plus U·diag(S)) |
| dora | max |ΔW − ΔW64| | ``4·(in + r + 8)·u·(max|W'| + max|W|)`` (row norm over ``in``, division, W' − W) |
| nola | |ΔW − ΔW64| | max(``1e-5·max|ΔW64|`` (spec/nola.md §3), ``(k+l+r+6)·u32·s·(|B|·|A|)`` over absolute terms) |
"""
from __future__ import annotations

import math

import numpy as np

from adapterfmt.methods.nola.reference_numpy import nola_basis_numpy

U32 = 2.0 ** -24
#: ``spec/nola.md`` §3: conformance of a NOLA ΔW, relative to max|ΔW_ref|.
NOLA_RTOL = 1e-5


# ---------------------------------------------------------------------------- scale rules
def lora_rule(params: dict) -> float:
    """spec §6: alpha/rank, or alpha/sqrt(rank) with use_rslora."""
    rank, alpha = params["rank"], params["alpha"]
    return alpha / math.sqrt(rank) if params["use_rslora"] else alpha / rank


def sorsa_rule(params: dict) -> float:
    """methods-principal §1: alpha null means s = 1, else alpha/rank."""
    return 1.0 if params["alpha"] is None else params["alpha"] / params["rank"]


# ---------------------------------------------------------------------------- ΔW per method
def lora_delta(params, shape, t, base=None):
    return lora_rule(params) * (t["lora_B"] @ t["lora_A"])


def dora_merged(params, shape, t, base):
    """W' = diag(m / ‖V‖_row)·V with V = W + s·B·A, the row norm over ``in`` (canonical rows)."""
    v = base + lora_rule(params) * (t["lora_B"] @ t["lora_A"])
    return (t["magnitude"] / np.linalg.norm(v, axis=1))[:, None] * v


def dora_delta(params, shape, t, base):
    return dora_merged(params, shape, t, base) - base


def init_relative_delta(params, shape, t, base=None):
    """olora/pissa: s·(B·A − B0·A0) against the original base."""
    return lora_rule(params) * (t["lora_B"] @ t["lora_A"] - t["lora_B0"] @ t["lora_A0"])


def sorsa_delta(params, shape, t, base=None):
    trained = (t["U_p"] * t["S_p"]) @ t["Vt_p"]
    init = (t["U_p0"] * t["S_p0"]) @ t["Vt_p0"]
    return sorsa_rule(params) * (trained - init)


def nola_factor(params: dict, side: str, dims: tuple[int, int], t: dict, magnitude: bool = False) -> np.ndarray:
    """offset + basis_scale·Σ coef_i·X_i with the fp32 basis values of the seed (spec/nola.md §3).

    ``magnitude``: the same sum over absolute values (what fp32 summation error is relative to).
    """
    info = params[side]
    if (params["generator"]["id"], params["generator"]["version"]) != ("philox4x32-10", 1):
        raise NotImplementedError(f"reference covers philox4x32-10/v1 only, not {params['generator']}")
    k = int(info["num_basis"])
    basis = nola_basis_numpy(int(info["seed"]), (k, *dims)).astype(np.float64)
    coef, offset = t[f"coef_{side}"], t.get(f"offset_{side}")
    if magnitude:
        basis, coef, offset = np.abs(basis), np.abs(coef), None if offset is None else np.abs(offset)
    factor = float(info["basis_scale"]) * np.tensordot(coef, basis, axes=1)
    return factor if offset is None else factor + offset


def nola_delta(params, shape, t, base=None):
    """ΔW[rows] = s·B·A, zero outside ``rows``; A is (r, in), B is (rows, r)."""
    out, inp = shape
    start, stop = params.get("rows") or (0, out)
    rank = int(params["rank"])
    a = nola_factor(params, "A", (rank, inp), t)
    b = nola_factor(params, "B", (stop - start, rank), t)
    delta = np.zeros((out, inp))
    delta[start:stop] = params["scale"] * (b @ a)
    return delta


#: method name -> ΔW(params, shape, tensors64, base64 or None), canonical orientation, float64.
DELTA = {"lora": lora_delta, "dora": dora_delta, "olora": init_relative_delta, "pissa": init_relative_delta,
         "sorsa": sorsa_delta, "nola": nola_delta}
#: Methods whose ΔW depends on the base weight.
NEEDS_BASE = {"dora"}


def as_float64(tensors) -> dict[str, np.ndarray]:
    """Stored tensors (torch of any float dtype, or numpy) as float64 numpy arrays (an exact conversion)."""
    return {role: t if isinstance(t, np.ndarray) and t.dtype == np.float64 else
            (t.astype(np.float64) if isinstance(t, np.ndarray) else t.double().numpy())
            for role, t in tensors.items()}


def reference_delta(method: str, params: dict, shape, tensors, base: np.ndarray | None = None) -> np.ndarray:
    """ΔW of one module in canonical orientation, float64; ``base`` is the canonical float64 W.

    Example:
        >>> reference_delta("lora", {"rank": 1, "alpha": 2.0, "use_rslora": False}, [2, 1],
        ...                 {"lora_A": np.ones((1, 1)), "lora_B": np.ones((2, 1))}).tolist()
        [[2.0], [2.0]]
    """
    if method in NEEDS_BASE and base is None:
        raise ValueError(f"{method} needs the base weight")
    return DELTA[method](params, list(shape), as_float64(tensors), base)


def reference_merged(method: str, params: dict, shape, tensors, base: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """W + weight·ΔW in float64, canonical orientation (DoRA at weight 1 is exactly its W')."""
    return base + weight * reference_delta(method, params, shape, tensors, base)


def applied(canonical: np.ndarray, fan_in_fan_out: bool) -> np.ndarray:
    """A canonical (out, in) matrix in the base's stored orientation (spec §4)."""
    return canonical.T if fan_in_fan_out else canonical


# ---------------------------------------------------------------------------- tolerance table
def delta_bound(method: str, params: dict, tensors64: dict, reference: np.ndarray,
                base: np.ndarray | None = None) -> np.ndarray | float:
    """The tolerance table above: an elementwise bound (array) or a max-norm bound (float)."""
    absb = {k: np.abs(v) for k, v in tensors64.items()}
    rank = int(params["rank"])
    if method == "lora":
        return (rank + 2) * U32 * abs(lora_rule(params)) * (absb["lora_B"] @ absb["lora_A"])
    if method in ("olora", "pissa"):
        products = absb["lora_B"] @ absb["lora_A"] + absb["lora_B0"] @ absb["lora_A0"]
        return (rank + 3) * U32 * abs(lora_rule(params)) * products
    if method == "sorsa":
        products = (absb["U_p"] * absb["S_p"]) @ absb["Vt_p"] + (absb["U_p0"] * absb["S_p0"]) @ absb["Vt_p0"]
        return (rank + 4) * U32 * abs(sorsa_rule(params)) * products
    if method == "dora":
        inp = reference.shape[1]
        return 4 * (inp + rank + 8) * U32 * (float(np.abs(reference + base).max()) + float(np.abs(base).max()))
    if method == "nola":
        # fp32 sums over k (and l) basis terms, then B·A: relative to the terms' magnitudes, not to a ΔW
        # that may cancel to almost nothing (a 1x3 module with rank 1 did).
        out, inp = reference.shape
        start, stop = params.get("rows") or (0, out)
        a = nola_factor(params, "A", (rank, inp), tensors64, magnitude=True)
        b = nola_factor(params, "B", (stop - start, rank), tensors64, magnitude=True)
        terms = np.zeros_like(reference)
        terms[start:stop] = abs(params["scale"]) * (b @ a)
        k, l = int(params["A"]["num_basis"]), int(params["B"]["num_basis"])
        return np.maximum(NOLA_RTOL * float(np.abs(reference).max()), (k + l + rank + 6) * U32 * terms)
    raise KeyError(f"no tolerance row for {method}")


def within(got: np.ndarray, want: np.ndarray, bound) -> tuple[bool, float]:
    """(|got − want| ≤ bound everywhere, the worst excess over the bound)."""
    err = np.abs(got - want)
    excess = err - bound
    return bool((excess <= 0).all()), float(excess.max()) if excess.size else 0.0
