"""Building blocks of the v1.3 conformance vectors: the v1.3 base model and one builder per method/feature.

numpy only, written from spec/ (README §3/§4/§6, methods-tuners.md §2 `trainable_tokens` and §6,
methods-full.md): each builder stores a module's tensors and records its expected value in float64 on the
stored (decoded) values: ΔW for additive methods, the merged weight W' (before the merge's rounding to the
base dtype) for `trainable_tokens` and `dora`. Container bytes, Philox values and Tensor come from
vectors_v11_build; the module/manifest bookkeeping from vectors_v12_build. Used by
tools/make_conformance_vectors_v13.py.
"""
from __future__ import annotations

import numpy as np

from vectors_v11_build import Tensor, lora_params, rand
from vectors_v12_build import Builder12

# ------------------------------------------------------------------ the v1.3 base model
BASE13 = {
    "model.embed_tokens.weight": Tensor("F32", rand("v13 base embed", (10, 6))),   # (vocab, dim): fifo
    "model.lm_head.weight": Tensor("BF16", rand("v13 base head", (10, 6))),        # (vocab, dim): linear
    "model.q_proj.weight": Tensor("F32", rand("v13 base q", (8, 6))),
    "model.q_proj.bias": Tensor("F32", rand("v13 base q bias", (8,))),
    # DoRA with norm_eps: norms of about 1e-6, where eps = 2^-23 changes W' by several percent
    "model.small_proj.weight": Tensor("F32", rand("v13 base small", (6, 8), 1e-6)),
    "model.conv1.weight": Tensor("F32", rand("v13 base conv1", (6, 4, 1, 1))),
    "model.conv3.weight": Tensor("F32", rand("v13 base conv3", (5, 3, 3, 3))),
    "model.conv3.bias": Tensor("F32", rand("v13 base conv3 bias", (5,))),
    "model.conv4.weight": Tensor("F32", rand("v13 base conv4", (4, 2, 3, 3))),
    "model.conv_small.weight": Tensor("F32", rand("v13 base conv small", (6, 4, 1, 1), 1e-6)),
}
LYCORIS_EPS = 2.0**-23


def canonical13(name: str, fifo: bool) -> np.ndarray:
    w = BASE13[name].f64()
    return w.T if fifo else w


def int64(values) -> Tensor:
    values = np.asarray(values, dtype=np.int64)
    return Tensor("I64", values, raw=values.astype("<i8").tobytes())


class Builder13(Builder12):
    """One v1.3 adapter: like the v1.2 Builder, against BASE13 (the base.weights entries list BASE13's)."""

    BASE = BASE13

    def __init__(self):
        super().__init__()
        self.manifest["created_by"] = "adapterfmt conformance generator (spec 1.3)"


# ------------------------------------------------------------------ trainable_tokens (merged weight)
def trainable_tokens_module(b: Builder13, target, base_weight, indices, *, embedding, dtype="F32", index=None):
    """Rows ``indices`` of the stored weight replaced by ``values`` (methods-tuners.md §2 trainable_tokens)."""
    stored = BASE13[base_weight]
    tokens, width = stored.shape
    shape = [width, tokens] if embedding else [tokens, width]
    roles = {"indices": index or int64(indices),
             "values": Tensor(dtype, rand(f"{target} tokens", (len(indices), width)))}
    v = b.module(target, "trainable_tokens", base_weight, shape, {"count": len(indices)}, roles,
                 fifo=embedding, layer="embedding" if embedding else "linear")
    if not all(0 <= i < tokens for i in indices):
        return  # a must-refuse vector: no expected value
    merged = stored.f64().copy()
    merged[list(indices), :] = v["values"]
    b.expected[target] = merged.T if embedding else merged


# ------------------------------------------------------------------ convolutions (methods-tuners.md §6)
def flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def tucker(core: np.ndarray, out_factor: np.ndarray, in_factor: np.ndarray) -> np.ndarray:
    """T[p, q, y, x] = Σᵢ Σⱼ C[i, j, y, x]·U[i, p]·V[j, q] (§6.2), float64."""
    return np.einsum("ijyx,ip,jq->pqyx", core, out_factor, in_factor)


def loha_conv2d_module(b: Builder13, target, shape, rank, alpha, *, tucker_form: bool):
    out, inn, kh, kw = shape
    if tucker_form:
        dims = {"w1_a": (rank, out), "w1_b": (rank, inn), "w2_a": (rank, out), "w2_b": (rank, inn),
                "t1": (rank, rank, kh, kw), "t2": (rank, rank, kh, kw)}
    else:
        dims = {"w1_a": (out, rank), "w1_b": (rank, inn, kh, kw), "w2_a": (out, rank), "w2_b": (rank, inn, kh, kw)}
    roles = {role: Tensor("F32", rand(f"{target} {role}", d)) for role, d in dims.items()}
    params = {"rank": rank, "alpha": float(alpha), "scale": alpha / rank}
    v = b.module(target, "loha", f"{target}.weight", shape, params, roles, layer="conv2d")
    if tucker_form:
        halves = [tucker(v[f"t{k}"], v[f"w{k}_a"], v[f"w{k}_b"]) for k in (1, 2)]
    else:
        halves = [(v[f"w{k}_a"] @ flat(v[f"w{k}_b"])).reshape(shape) for k in (1, 2)]
    b.expected[target] = halves[0] * halves[1] * params["scale"]


def lokr_conv2d_module(b: Builder13, target, shape, w1_shape, w2_shape, rank, alpha, *, w1_full, w2_form):
    """LoKr on conv2d: W1 full or factored; W2 ``full`` (b, d, kh, kw), ``factored`` or ``tucker`` (§6)."""
    out, inn, kh, kw = shape
    (a, c), (bb, d) = w1_shape, w2_shape
    dims = {"w1": (a, c)} if w1_full else {"w1_a": (a, rank), "w1_b": (rank, c)}
    dims |= {"full": {"w2": (bb, d, kh, kw)}, "factored": {"w2_a": (bb, rank), "w2_b": (rank, d, kh, kw)},
             "tucker": {"t2": (rank, rank, kh, kw), "w2_a": (rank, bb), "w2_b": (rank, d)}}[w2_form]
    roles = {role: Tensor("F32", rand(f"{target} {role}", dd)) for role, dd in dims.items()}
    scale = 1.0 if w1_full and w2_form == "full" else alpha / rank
    params = {"w1_shape": list(w1_shape), "w2_shape": list(w2_shape), "rank": rank, "alpha": float(alpha),
              "convention": "lycoris", "scale": scale}
    v = b.module(target, "lokr", f"{target}.weight", shape, params, roles, layer="conv2d")
    w1 = v["w1"] if w1_full else v["w1_a"] @ v["w1_b"]
    w2 = {"full": lambda: v["w2"], "factored": lambda: (v["w2_a"] @ flat(v["w2_b"])).reshape(bb, d, kh, kw),
          "tucker": lambda: tucker(v["t2"], v["w2_a"], v["w2_b"])}[w2_form]()
    b.expected[target] = np.einsum("ik,jlyx->ijklyx", w1, w2).reshape(shape) * scale


def lora_tucker_module(b: Builder13, target, shape, rank, alpha, rslora=False):
    out, inn, kh, kw = shape
    roles = {"lora_A": Tensor("F32", rand(f"{target} tucker A", (rank, inn, 1, 1))),
             "lora_mid": Tensor("F32", rand(f"{target} tucker mid", (rank, rank, kh, kw))),
             "lora_B": Tensor("F32", rand(f"{target} tucker B", (out, rank, 1, 1)))}
    params = lora_params(rank, alpha, rslora)
    v = b.module(target, "lora_tucker", f"{target}.weight", shape, params, roles, layer="conv2d")
    b.expected[target] = params["scale"] * np.einsum("oi,ijyx,jc->ocyx", v["lora_B"][:, :, 0, 0], v["lora_mid"],
                                                     v["lora_A"][:, :, 0, 0])


# ------------------------------------------------------------------ full (methods-full.md)
def full_module(b: Builder13, target, shape, *, layer="linear", with_bias=False, dtype="F32"):
    roles = {"diff": Tensor(dtype, rand(f"{target} diff", tuple(shape), 0.1))}
    if with_bias:
        roles["diff_b"] = Tensor("F32", rand(f"{target} diff_b", (shape[0],), 0.1))
    v = b.module(target, "full", f"{target}.weight", shape, {}, roles, layer=layer)
    b.expected[target] = v["diff"]
    if with_bias:
        bias = f"{target}.bias"
        b.expected[f"bias.{bias}"] = BASE13[bias].f64() + v["diff_b"]


# ------------------------------------------------------------------ DoRA (README §6; merged weight)
def dora13_module(b: Builder13, target, shape, rank, alpha, *, axis, eps=None, layer="linear", b_scale=0.1):
    """DoRA, magnitude on ``axis``; with ``eps`` the params record ``norm_eps``. Conv2d: A (r, in, kh, kw)."""
    out, inn = shape[:2]
    kernel = tuple(shape[2:])
    a = Tensor("F32", rand(f"{target} dora13 A", (rank, inn) + kernel))
    bb = Tensor("F32", rand(f"{target} dora13 B", (out, rank) + (1, 1) * bool(kernel), b_scale))
    params = dict(lora_params(rank, alpha), magnitude_axis=axis)
    if eps is not None:
        params["norm_eps"] = eps
    w = canonical13(f"{target}.weight", False)
    delta = np.einsum("ok,ki...->oi...", bb.f64().reshape(out, rank), a.f64()) * params["scale"]
    v = w + delta
    keep = 0 if axis == "out" else 1
    others = tuple(i for i in range(v.ndim) if i != keep)
    norm = np.sqrt((v * v).sum(axis=others))
    magnitude = Tensor("F32", norm * (1 + 0.1 * rand(f"{target} dora13 m", norm.shape)) + (eps or 0.0))
    got = b.module(target, "dora", f"{target}.weight", shape, params,
                   {"lora_A": a, "lora_B": bb, "magnitude": magnitude}, layer=layer)
    factor = got["magnitude"] / (norm + (eps or 0.0))
    view = [1] * v.ndim
    view[keep] = -1
    b.expected[target] = factor.reshape(view) * v
