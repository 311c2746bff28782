"""ΔW / merged weight of the format 1.3 methods and features, for the second reader, from the spec text alone.

fp32 in the spec's reference operation order: methods-tuners.md §2 `trainable_tokens` and §6
(convolutions), methods-full.md, README §6 DoRA (both axes, norm_eps, conv2d).

Example:
    >>> adapter = read("spec/vectors/v1.3/lora_tucker.safetensors")  # doctest: +SKIP
    >>> lora_tucker(adapter, "model.conv3", adapter.manifest["modules"]["model.conv3"]).shape  # doctest: +SKIP
    (5, 3, 3, 3)
"""
from __future__ import annotations

import numpy as np

from independent_reader import TensorError
from independent_tuners import lora_conv2d
from rules_v13 import is_tucker, token_axes

F32 = np.float32
LOHA_EINSUM = "ijkl,jr,ip->prkl"     # (core, in factor, out factor), §6.2 loha
LOKR_EINSUM = "ijkl,ip,jr->prkl"     # (core, out factor, in factor), §6.2 lokr and lora_tucker


def fl32(x: float) -> np.float32:
    return np.float32(x)


def _flat_product(out_factor: np.ndarray, in_factor: np.ndarray) -> np.ndarray:
    """§6.1: the (r, in, kh, kw) factor read as (r, in·kh·kw); the product read back with its kernel axes."""
    return (out_factor @ in_factor.reshape(in_factor.shape[0], -1)).reshape(
        (out_factor.shape[0],) + in_factor.shape[1:])


def loha_conv2d(adapter, module, entry):
    role = lambda n: adapter.role(module, n)  # noqa: E731
    if is_tucker(entry):
        halves = [np.einsum(LOHA_EINSUM, role(f"t{k}"), role(f"w{k}_b"), role(f"w{k}_a")).astype(F32) for k in (1, 2)]
    else:
        halves = [_flat_product(role(f"w{k}_a"), role(f"w{k}_b")) for k in (1, 2)]
    return (halves[0] * halves[1]) * fl32(entry["params"]["scale"])


def lokr_conv2d(adapter, module, entry):
    """ΔW[i·b + j, k·d + l, y, x] = W1[i, k]·W2[j, l, y, x] × fl32(s) (§6.1; Tucker W2 §6.2)."""
    role = lambda n: adapter.role(module, n)  # noqa: E731
    tensors = entry["tensors"]
    w1 = role("w1") if "w1" in tensors else role("w1_a") @ role("w1_b")
    if is_tucker(entry):
        w2 = np.einsum(LOKR_EINSUM, role("t2"), role("w2_a"), role("w2_b")).astype(F32)
    else:
        w2 = role("w2") if "w2" in tensors else _flat_product(role("w2_a"), role("w2_b"))
    return np.kron(w1[:, :, None, None], w2).astype(F32) * fl32(entry["params"]["scale"])


def lora_tucker(adapter, module, entry):
    """B′ = fl32(B·s) first, then einsum(mid, B′ᵀ, A) (§6.2, LyCORIS's order)."""
    b = adapter.role(module, "lora_B")[:, :, 0, 0] * fl32(entry["params"]["scale"])
    a = adapter.role(module, "lora_A")[:, :, 0, 0]
    return np.einsum(LOKR_EINSUM, adapter.role(module, "lora_mid"), b.T, a).astype(F32)


def full(adapter, module, entry):
    return adapter.role(module, "diff")


def bias_parameter(entry: dict) -> str:
    """methods-full.md: the layer's bias is `base_weight` without a final `.weight`, then `.bias`."""
    name = entry["base_weight"]
    return (name[:-len(".weight")] if name.endswith(".weight") else name) + ".bias"


def bias_deltas(adapter) -> dict[str, np.ndarray]:
    """{bias parameter: diff_b} of every `full` module with `diff_b`, float64 (exact)."""
    return {bias_parameter(entry): adapter.role64(module, "diff_b")
            for module, entry in adapter.manifest["modules"].items() if "diff_b" in entry["tensors"]}


def token_problems(adapter, module, entry) -> list[str]:
    """methods-tuners.md §2: indices distinct and inside [0, tokens)."""
    indices, tokens = adapter.indices(module), token_axes(entry)[0]
    problems = []
    if ((indices < 0) | (indices >= tokens)).any():
        problems.append(f"{module}: a token index is outside [0, {tokens})")
    if len(set(indices.tolist())) != len(indices):
        problems.append(f"{module}: a token index appears twice")
    return problems


def trainable_tokens(adapter, module, entry, base):
    """The canonical base with stored rows indices[j] replaced by fp32(values[j])."""
    problems = token_problems(adapter, module, entry)
    if problems:
        raise TensorError(problems[0] + " (methods-tuners.md §2: refused when merged)")
    stored = (base.T if entry["fan_in_fan_out"] else base).copy()
    stored[adapter.indices(module), :] = adapter.role(module, "values")
    return stored.T if entry["fan_in_fan_out"] else stored


def dora(adapter, module, entry, base):
    """V = W + ΔW_lora; n = 2-norm over every axis but the magnitude's; W' = (m / (n + eps))·V."""
    p = entry["params"]
    if entry["layer"] == "conv2d":
        lora = lora_conv2d(adapter, module, entry)
    else:
        lora = (adapter.role(module, "lora_B") @ adapter.role(module, "lora_A")) * fl32(p["scale"])
    v = base + lora
    keep = 0 if p["magnitude_axis"] == "out" else 1
    norm = np.sqrt((v * v).sum(axis=tuple(i for i in range(v.ndim) if i != keep), dtype=F32))
    eps = p.get("norm_eps", 0.0)
    factor = adapter.role(module, "magnitude") / (norm + fl32(eps) if eps else norm)
    shape = [1] * v.ndim
    shape[keep] = -1
    return factor.reshape(shape) * v


CONV_DELTAS = {"loha": loha_conv2d, "lokr": lokr_conv2d}
DELTAS = {"lora_tucker": lora_tucker, "full": full}
MERGED = {"trainable_tokens": trainable_tokens}
