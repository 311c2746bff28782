"""ΔW / merged weight of the methods of spec/methods-tuners.md and of LoRA on conv2d, for the second reader.

fp32 in the spec's reference operation order, from the spec text alone. Additive methods give ΔW
(``DELTAS``); multiplicative ones give the merged weight W' from the canonical fp32 base (``MERGED``).

Example:
    >>> adapter = read("spec/vectors/v1.2/loha.safetensors")  # doctest: +SKIP
    >>> DELTAS["loha"](adapter, "model.q_proj", adapter.manifest["modules"]["model.q_proj"]).shape  # doctest: +SKIP
    (8, 6)
"""
from __future__ import annotations

import numpy as np

from spec_torch_rng import fourierft_positions, vera_projections

F32 = np.float32


def fl32(x: float) -> np.float32:
    return np.float32(x)


# ------------------------------------------------------------------ additive (ΔW)
def lora_conv2d(adapter, module, entry):
    """README §4: ΔW[o, i, y, x] = (Σ_k B[o, k, 0, 0]·A[k, i, y, x]) × fl32(scale)."""
    a, b = adapter.role(module, "lora_A"), adapter.role(module, "lora_B")[:, :, 0, 0]
    if a.shape[2:] == (1, 1):
        product = (b @ a[:, :, 0, 0])[:, :, None, None]
    else:
        product = np.einsum("ok,kiyx->oiyx", b, a).astype(F32)
    return product * fl32(entry["params"]["scale"])


def loha(adapter, module, entry):
    role = lambda n: adapter.role(module, n)  # noqa: E731
    return ((role("w1_a") @ role("w1_b")) * (role("w2_a") @ role("w2_b"))) * fl32(entry["params"]["scale"])


def lokr(adapter, module, entry):
    def half(name):
        if name in entry["tensors"]:
            return adapter.role(module, name)
        return adapter.role(module, f"{name}_a") @ adapter.role(module, f"{name}_b")
    return np.kron(half("w1"), half("w2")).astype(F32) * fl32(entry["params"]["scale"])


def adalora(adapter, module, entry):
    p = entry["params"]
    a_e = adapter.role(module, "lora_A") * adapter.role(module, "lora_E")[:, None]
    product = (adapter.role(module, "lora_B") @ a_e) * fl32(p["scaling"])
    return product / (fl32(p["ranknum"]) + fl32(1e-5))


def vera(adapter, module, entry):
    p = entry["params"]
    out, inn = entry["shape"]
    if "proj_A" in entry["tensors"]:
        proj_a, proj_b = adapter.role(module, "proj_A"), adapter.role(module, "proj_B")
    else:
        a, b = vera_projections(int(p["seed"]), p["rank"], p["max_in"], p["max_out"], p["float_affine"])
        proj_a, proj_b = a[:, :inn], b[:out, :]
    left = adapter.role(module, "lambda_b")[:, None] * proj_b
    right = adapter.role(module, "lambda_d")[:, None] * proj_a
    return left @ right


def fourierft(adapter, module, entry):
    p = entry["params"]
    out, inn = entry["shape"]
    rows, cols = fourierft_positions(int(p["seed"]), out, inn, p["n_frequency"])
    dense = np.zeros((out, inn), dtype=F32)
    dense[rows, cols] = adapter.role(module, "spectrum")
    delta = (np.fft.ifft2(dense).real.astype(F32) * fl32(p["scaling"])).astype(F32)
    return to_dtype(delta, adapter.manifest["modules"][module]["tensors"]["spectrum"]["dtype"])


def to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values rounded to a stored dtype (nearest, ties to even) and back to fp32."""
    if dtype == "F16":
        return values.astype(np.float16).astype(F32)
    if dtype == "BF16":
        bits = values.view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.astype(np.uint32).view(F32)
    return values


# ------------------------------------------------------------------ multiplicative (merged W')
def ia3(adapter, module, entry, base):
    scale = adapter.role(module, "scale")
    return base * (scale[:, None] if entry["params"]["axis"] == "out" else scale[None, :])


def skew(vector: np.ndarray, size: int) -> np.ndarray:
    """Q = U − Uᵀ, U's strict upper triangle read row by row from ``vector``."""
    u = np.zeros((size, size), dtype=F32)
    u[np.triu_indices(size, 1)] = vector
    return u - u.T


def cayley(q: np.ndarray) -> np.ndarray:
    """X with X·(I + Q) = I − Q, fp32."""
    eye = np.eye(q.shape[0], dtype=F32)
    return np.linalg.solve((eye + q).T, (eye - q).T).T.astype(F32)


def neumann(q: np.ndarray, terms: int) -> np.ndarray:
    """I for t ≤ 1, I + 2Q for t = 2, else I + 2Q + … + 2Q^{p−1} + Q^p with p = max(3, t − 1)."""
    r = np.eye(q.shape[0], dtype=F32)
    if terms <= 1:
        return r
    top = 1 if terms == 2 else max(3, terms - 1)
    power = None
    for k in range(1, top + 1):
        power = q if k == 1 else power @ q
        r = r + (fl32(2.0) if k < top or terms == 2 else fl32(1.0)) * power
    return r


def oft(adapter, module, entry, base):
    p = entry["params"]
    blocks, size, inn = adapter.role(module, "blocks"), p["block_size"], entry["shape"][1]
    qs = [skew(row, size) for row in blocks]
    if p["coft"]:
        limit = fl32(p["eps"]) / np.sqrt(fl32(len(qs)))
        qs = [q if np.linalg.norm(q) <= limit else limit * (q / np.linalg.norm(q)) for q in qs]
    rotate = cayley if p["cayley"] == "exact" else lambda q: neumann(q, p["neumann_terms"])
    rots = [rotate(q) for q in qs] * (inn // size if p["block_share"] else 1)
    dense = np.zeros((inn, inn), dtype=F32)
    for k, r in enumerate(rots):
        dense[k * size:(k + 1) * size, k * size:(k + 1) * size] = r
    return (dense @ base.T).T


def butterfly(n: int, groups: int, half: int) -> np.ndarray:
    """π: within each of ``groups`` groups of consecutive indices, chunks of ``half`` even chunks first."""
    size = n // groups
    order = list(range(0, size // half, 2)) + list(range(1, size // half, 2))
    within = np.concatenate([np.arange(c * half, (c + 1) * half) for c in order])
    return np.concatenate([g * size + within for g in range(groups)])


def boft(adapter, module, entry, base):
    rotations = adapter.role(module, "rotations")
    factors, count, size, _ = rotations.shape
    n = count * size
    matrix = None
    for i in range(factors):
        block = np.zeros((n, n), dtype=F32)
        for d in range(count):
            x = rotations[i, d]
            block[d * size:(d + 1) * size, d * size:(d + 1) * size] = cayley(fl32(0.5) * (x - x.T))
        perm = np.eye(n, dtype=F32)
        if factors > 1:
            perm = np.zeros((n, n), dtype=F32)
            perm[np.arange(n), butterfly(n, count // 2**i, size // 2)] = 1
        m_i = perm @ (block @ perm.T)
        matrix = m_i if matrix is None else m_i @ matrix
    return (matrix @ base.T).T * adapter.role(module, "scale")[:, None]


DELTAS = {"loha": loha, "lokr": lokr, "adalora": adalora, "vera": vera, "fourierft": fourierft}
MERGED = {"ia3": ia3, "oft": oft, "boft": boft}
