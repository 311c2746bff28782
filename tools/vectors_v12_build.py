"""Building blocks of the v1.2 conformance vectors: the v1.2 base model and one builder per method.

numpy only, written from spec/ (README §4/§6/§8, methods-tuners.md, torch-cpu-generator.md): each
builder stores a module's tensors and records its expected value, evaluated in float64 on the stored
(decoded) values: ΔW for additive methods, the merged weight W' (before the merge's rounding to the base
dtype) for methods that need the base. Container bytes, Philox values and Tensor come from
vectors_v11_build; VeRA/FourierFT draws from the second reader's own torch-cpu-mt19937
(tests/spec/spec_torch_rng.py). Used by tools/make_conformance_vectors_v12.py.
"""
from __future__ import annotations

import math

import numpy as np

from vectors_v11_build import Builder, Tensor, lora_params, rand
import spec_torch_rng  # noqa: E402

# ------------------------------------------------------------------ the v1.2 base model
BASE12 = {
    "model.q_proj.weight": Tensor("F32", rand("v12 base q", (8, 6))),
    "model.q_proj.bias": Tensor("F32", rand("v12 base q bias", (8,))),
    "model.k_proj.weight": Tensor("BF16", rand("v12 base k", (8, 6))),
    "model.v_proj.weight": Tensor("F32", rand("v12 base v", (4, 6))),
    "model.o_proj.weight": Tensor("F32", rand("v12 base o", (6, 8))),
    "model.up_proj.weight": Tensor("F32", rand("v12 base up", (12, 8))),
    "model.gate_proj.weight": Tensor("F32", rand("v12 base gate", (12, 8))),
    "model.down_proj.weight": Tensor("F32", rand("v12 base down", (8, 12))),
    "model.c_attn.weight": Tensor("F32", rand("v12 base c_attn", (6, 12))),   # Conv1D: stored (in, out)
    "model.conv1.weight": Tensor("F32", rand("v12 base conv1", (6, 4, 1, 1))),
    "model.conv3.weight": Tensor("F32", rand("v12 base conv3", (5, 3, 3, 3))),
}


def canonical12(name: str, fifo: bool) -> np.ndarray:
    w = BASE12[name].f64()
    return w.T if fifo else w


class Builder12(Builder):
    """One v1.2 adapter: like the v1.1 Builder, against BASE12 (subclasses give their own ``BASE``)."""

    BASE = BASE12

    def __init__(self):
        super().__init__()
        self.manifest["created_by"] = "adapterfmt conformance generator (spec 1.2)"

    def bias_delta(self, target: str, delta: Tensor):
        """A ``bias_delta`` payload; its expected entry ``payload.<target>`` is the merged bias b + delta."""
        self.payload("bias_delta", target, delta)
        self.expected[f"payload.{target}"] = self.BASE[target].f64() + delta.f64()


def fl32(x: float) -> float:
    return float(np.float32(x))


# ------------------------------------------------------------------ additive methods
def loha_module(b: Builder12, target, shape, rank, alpha, dtype="F32"):
    out, inn = shape
    roles = {"w1_a": Tensor(dtype, rand(f"{target} w1_a", (out, rank))),
             "w1_b": Tensor(dtype, rand(f"{target} w1_b", (rank, inn))),
             "w2_a": Tensor(dtype, rand(f"{target} w2_a", (out, rank))),
             "w2_b": Tensor(dtype, rand(f"{target} w2_b", (rank, inn)))}
    params = {"rank": rank, "alpha": float(alpha), "scale": alpha / rank}
    v = b.module(target, "loha", f"{target}.weight", shape, params, roles)
    b.expected[target] = ((v["w1_a"] @ v["w1_b"]) * (v["w2_a"] @ v["w2_b"])) * params["scale"]


def lokr_module(b: Builder12, target, shape, w1_shape, w2_shape, rank, alpha, convention, *, w1_full, w2_full):
    """LoKr with each half full (``w1``/``w2``) or factored (``w*_a`` (rows, r) · ``w*_b`` (r, cols))."""
    roles = {}
    for which, dims, full in (("w1", w1_shape, w1_full), ("w2", w2_shape, w2_full)):
        if full:
            roles[which] = Tensor("F32", rand(f"{target} {which}", dims))
        else:
            roles[f"{which}_a"] = Tensor("F32", rand(f"{target} {which}_a", (dims[0], rank)))
            roles[f"{which}_b"] = Tensor("F32", rand(f"{target} {which}_b", (rank, dims[1])))
    scale = 1.0 if convention == "lycoris" and w1_full and w2_full else alpha / rank
    params = {"w1_shape": list(w1_shape), "w2_shape": list(w2_shape), "rank": rank, "alpha": float(alpha),
              "convention": convention, "scale": scale}
    v = b.module(target, "lokr", f"{target}.weight", shape, params, roles)
    halves = [v[w] if w in v else v[f"{w}_a"] @ v[f"{w}_b"] for w in ("w1", "w2")]
    b.expected[target] = np.kron(*halves) * scale


def adalora_scale(scaling: float, ranknum: float) -> float:
    """methods-tuners.md §2: scaling / fl32(fl32(ranknum) + fl32(1e-5)), in binary64."""
    return scaling / fl32(fl32(ranknum) + fl32(1e-5))


def adalora_module(b: Builder12, target, base_weight, shape, rank, lora_alpha, init_r, *, fifo=False,
                   layer="linear"):
    out, inn = shape
    roles = {"lora_A": Tensor("F32", rand(f"{target} ada A", (rank, inn))),
             "lora_E": Tensor("F32", rand(f"{target} ada E", (rank,))),
             "lora_B": Tensor("F32", rand(f"{target} ada B", (out, rank)))}
    scaling = float(lora_alpha) if lora_alpha > 0 else float(init_r)
    params = {"rank": rank, "scaling": scaling, "ranknum": float(init_r), "scale": adalora_scale(scaling, init_r)}
    v = b.module(target, "adalora", base_weight, shape, params, roles, fifo=fifo, layer=layer)
    b.expected[target] = (v["lora_B"] @ (v["lora_A"] * v["lora_E"][:, None])) * params["scale"]


def lora_conv2d_module(b: Builder12, target, shape, rank, alpha):
    """README §4: A (r, in, kh, kw), B (out, r, 1, 1); ΔW[o,i,y,x] = scale·Σ_k B[o,k,0,0]·A[k,i,y,x]."""
    out, inn, kh, kw = shape
    roles = {"lora_A": Tensor("F32", rand(f"{target} conv A", (rank, inn, kh, kw))),
             "lora_B": Tensor("F32", rand(f"{target} conv B", (out, rank, 1, 1)))}
    params = lora_params(rank, alpha)
    v = b.module(target, "lora", f"{target}.weight", shape, params, roles, layer="conv2d")
    b.expected[target] = np.einsum("ok,kiyx->oiyx", v["lora_B"][:, :, 0, 0], v["lora_A"]) * params["scale"]


# ------------------------------------------------------------------ seeded methods (1.2)
def vera_module(b: Builder12, target, base_weight, shape, *, rank, seed, variant, max_in, max_out,
                fifo=False, layer="linear", stored_projections=False):
    """VeRA: λ_d (r), λ_b (out); projections regenerated (or stored as bf16-rounded proj_A/proj_B)."""
    out, inn = shape
    roles = {"lambda_d": Tensor("F32", rand(f"{target} lambda_d", (rank,))),
             "lambda_b": Tensor("F32", rand(f"{target} lambda_b", (out,), 0.5))}
    a, bb = spec_torch_rng.vera_projections(seed, rank, max_in, max_out, variant)
    proj_a, proj_b = a[:, :inn].astype(np.float64), bb[:out, :].astype(np.float64)
    if stored_projections:
        roles["proj_A"] = Tensor("BF16", proj_a)
        roles["proj_B"] = Tensor("BF16", proj_b)
    params = {"generator": "torch-cpu-mt19937", "generator_version": 1, "rank": rank, "seed": str(seed % 2**64),
              "float_affine": variant, "max_in": max_in, "max_out": max_out}
    v = b.module(target, "vera", base_weight, shape, params, roles, fifo=fifo, layer=layer)
    if stored_projections:
        proj_a, proj_b = v["proj_A"], v["proj_B"]
    b.expected[target] = (v["lambda_b"][:, None] * proj_b) @ (v["lambda_d"][:, None] * proj_a)


def fourierft_module(b: Builder12, target, base_weight, shape, *, seed, n, scaling, fifo=False, layer="linear"):
    """FourierFT: spectrum (n) at the first n positions of randperm(out·in); ΔW = Re(ifft2(D))·scaling."""
    out, inn = shape
    roles = {"spectrum": Tensor("F32", rand(f"{target} spectrum", (n,)))}
    params = {"generator": "torch-cpu-mt19937", "generator_version": 1, "seed": str(seed), "n_frequency": n,
              "scaling": float(scaling)}
    v = b.module(target, "fourierft", base_weight, shape, params, roles, fifo=fifo, layer=layer)
    rows, cols = spec_torch_rng.fourierft_positions(seed, out, inn, n)
    dense = np.zeros((out, inn))
    dense[rows, cols] = v["spectrum"]
    b.expected[target] = np.fft.ifft2(dense).real * scaling


# ------------------------------------------------------------------ multiplicative methods (merged weight)
def ia3_module(b: Builder12, target, base_weight, shape, axis, *, fifo=False, layer="linear", bias=None):
    """IA³: W' = diag(l)·W (out) or W·diag(l) (in); with ``bias``, PEFT's scaled bias as a bias_delta."""
    out, inn = shape
    n = out if axis == "out" else inn
    roles = {"scale": Tensor("F32", 1 + 0.5 * rand(f"{target} ia3", (n,)))}
    params = {"axis": axis, "bias_scaled": axis == "out"}
    v = b.module(target, "ia3", base_weight, shape, params, roles, fifo=fifo, layer=layer)
    w = canonical12(base_weight, fifo)
    b.expected[target] = w * (v["scale"][:, None] if axis == "out" else v["scale"][None, :])
    if bias is not None:
        old = BASE12[bias].f64()
        b.bias_delta(bias, Tensor("F32", (np.float32(old) * np.float32(v["scale"])).astype(np.float64) - old))


def skew_from_upper(vector: np.ndarray, size: int) -> np.ndarray:
    """methods-tuners.md §2 `oft`: Q = U − Uᵀ, U's strict upper triangle read row by row from ``vector``."""
    u = np.zeros((size, size))
    u[np.triu_indices(size, 1)] = vector
    return u - u.T


def oft_rotation(vector: np.ndarray, size: int, count: int, params: dict) -> np.ndarray:
    """One block's R in float64 (coft projection, then the Neumann series or the exact Cayley transform)."""
    q = skew_from_upper(vector, size)
    if params["coft"]:
        limit = params["eps"] / math.sqrt(count)
        norm = np.linalg.norm(q)
        assert abs(norm - limit) > 0.1 * limit, "a COFT vector must not sit at the projection threshold"
        if norm > limit:
            q = limit * q / norm
    eye = np.eye(size)
    if params["cayley"] == "exact":
        return np.linalg.solve((eye + q).T, (eye - q).T).T
    terms = params["neumann_terms"]
    if terms <= 1:
        return eye
    if terms == 2:
        return eye + 2 * q
    top = max(3, terms - 1)
    r, power = eye.copy(), eye
    for k in range(1, top + 1):
        power = power @ q
        r = r + (2 if k < top else 1) * power
    return r


def oft_module(b: Builder12, target, shape, *, block, share, cayley, terms=5, coft=False, eps=6e-5,
               magnitudes=(0.05,)):
    """OFT: ``blocks`` (n, b(b−1)/2); each row k scaled by magnitudes[k % len] (to straddle COFT's ε′)."""
    out, inn = shape
    count = 1 if share else inn // block
    width = block * (block - 1) // 2
    values = rand(f"{target} oft", (count, width)) * np.array(
        [magnitudes[k % len(magnitudes)] for k in range(count)])[:, None]
    roles = {"blocks": Tensor("F32", values)}
    params = {"block_size": block, "block_share": share, "cayley": cayley, "neumann_terms": terms, "coft": coft,
              "eps": eps}
    v = b.module(target, "oft", f"{target}.weight", shape, params, roles)
    rots = [oft_rotation(row, block, count, params) for row in v["blocks"]]
    rots = rots * (inn // block) if share else rots
    dense = np.zeros((inn, inn))
    for k, r in enumerate(rots):
        dense[k * block:(k + 1) * block, k * block:(k + 1) * block] = r
    b.expected[target] = (dense @ canonical12(f"{target}.weight", False).T).T


def butterfly_index(n: int, groups: int, half: int) -> np.ndarray:
    """π: within each of ``groups`` groups, chunks of ``half`` indices reordered even chunks first."""
    size = n // groups
    chunks = size // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    within = np.concatenate([np.arange(c * half, (c + 1) * half) for c in order])
    return np.concatenate([g * size + within for g in range(groups)])


def boft_matrix(rotations: np.ndarray) -> np.ndarray:
    """M = M_{N−1}···M_0, M_i = P_i·B_i·P_iᵀ (methods-tuners.md §2 `boft`), float64."""
    factors, count, size, _ = rotations.shape
    n = count * size
    matrix = np.eye(n)
    for i in range(factors):
        block = np.zeros((n, n))
        for d in range(count):
            s = 0.5 * (rotations[i, d] - rotations[i, d].T)
            eye = np.eye(size)
            block[d * size:(d + 1) * size, d * size:(d + 1) * size] = np.linalg.solve((eye + s).T, (eye - s).T).T
        perm = np.eye(n)
        if factors > 1:
            perm = np.zeros((n, n))
            perm[np.arange(n), butterfly_index(n, count // 2**i, size // 2)] = 1.0
        matrix = (perm @ block @ perm.T) @ matrix
    return matrix


def boft_module(b: Builder12, target, shape, *, factors, block):
    out, inn = shape
    roles = {"rotations": Tensor("F32", rand(f"{target} boft R", (factors, inn // block, block, block), 0.1)),
             "scale": Tensor("F32", 1 + 0.2 * rand(f"{target} boft s", (out,)))}
    params = {"butterfly_factors": factors, "block_size": block}
    v = b.module(target, "boft", f"{target}.weight", shape, params, roles)
    w = canonical12(f"{target}.weight", False)
    b.expected[target] = (boft_matrix(v["rotations"]) @ w.T).T * v["scale"][:, None]


def entry_of(b: Builder12, target: str) -> dict:
    return b.manifest["modules"][target]


def set_role(b: Builder12, target: str, role: str, tensor: Tensor | None) -> None:
    """Replace (or with None drop) a role's tensor, keeping header and manifest consistent."""
    name, refs = f"{target}.{role}", entry_of(b, target)["tensors"]
    if tensor is None:
        del b.tensors[name], refs[role]
        return
    b.tensors[name] = tensor
    refs[role] = {"name": name, "dtype": tensor.dtype, "shape": tensor.shape}
