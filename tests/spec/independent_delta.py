"""ΔW per module and the validator's extra checks, as spec/ defines them, for the second reader.

fp32 in the spec's reference operation order (README §6, methods-principal.md, nola.md §3).

Example:
    >>> adapter = read("spec/vectors/v1.1/lora_patterns.safetensors")  # doctest: +SKIP
    >>> delta(adapter, "model.q_proj").shape  # doctest: +SKIP
    (8, 6)
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

import independent_tuners as tuners
import independent_v13 as v13
from independent_reader import DTYPE_BYTES, FACTOR_DTYPES, Adapter, to_array, to_array64
from spec_philox import basis_fingerprint, philox_basis


def fl32(x: float) -> np.float32:
    return np.float32(x)


def delta(adapter: Adapter, module: str, base: np.ndarray | None = None) -> np.ndarray:
    """ΔW of one module, fp32, canonical (out, in), in the spec's reference operation order.

    ``base`` is the canonical fp32 base weight (needed by DoRA and the multiplicative methods only).
    """
    entry = adapter.manifest["modules"][module]
    if entry["method"] in tuners.MERGED or entry["method"] in v13.MERGED or entry["method"] == "dora":
        return merged(adapter, module, base) - base
    if entry["layer"] == "conv2d" and entry["method"] in v13.CONV_DELTAS:
        return v13.CONV_DELTAS[entry["method"]](adapter, module, entry)
    if entry["method"] in v13.DELTAS:
        return v13.DELTAS[entry["method"]](adapter, module, entry)
    if entry["method"] in tuners.DELTAS:
        return tuners.DELTAS[entry["method"]](adapter, module, entry)
    if entry["layer"] == "conv2d":
        return tuners.lora_conv2d(adapter, module, entry)
    return METHODS_KNOWN[entry["method"]](adapter, module, entry, base)


def merged(adapter: Adapter, module: str, base: np.ndarray) -> np.ndarray:
    """The merged weight W' (fp32, canonical, before the merge's rounding to the base dtype).

    Multiplicative methods define W' directly (methods-tuners.md); every other method gives base + ΔW.
    """
    entry = adapter.manifest["modules"][module]
    multiplicative = tuners.MERGED | v13.MERGED | {"dora": v13.dora}
    if entry["method"] in multiplicative:
        if base is None:
            raise ValueError(f"{entry['method']} needs the base weight")
        return multiplicative[entry["method"]](adapter, module, entry, base)
    return base + delta(adapter, module, base)


def _lora(adapter, module, entry, base):
    product = adapter.role(module, "lora_B") @ adapter.role(module, "lora_A")
    return product * fl32(entry["params"]["scale"])


def _init_relative(adapter, module, entry, base):
    trained = adapter.role(module, "lora_B") @ adapter.role(module, "lora_A")
    init = adapter.role(module, "lora_B0") @ adapter.role(module, "lora_A0")
    return (trained - init) * fl32(entry["params"]["scale"])


def _sorsa(adapter, module, entry, base):
    def product(suffix):
        u, s, vt = (adapter.role(module, n + suffix) for n in ("U_p", "S_p", "Vt_p"))
        return (u * s[None, :]) @ vt
    return (product("") - product("0")) * fl32(entry["params"]["scale"])


def _nola(adapter, module, entry, base):
    p = entry["params"]
    out, inn = entry["shape"]
    rows = p.get("rows", [0, out])
    factors = {}
    for side, dims in (("A", (p["rank"], inn)), ("B", (rows[1] - rows[0], p["rank"]))):
        coef = adapter.role(module, f"coef_{side}")
        offset = (adapter.role(module, f"offset_{side}") if f"offset_{side}" in entry["tensors"] else None)
        factors[side] = nola_factor(int(p[side]["seed"]), dims, coef, p[side]["basis_scale"], offset)
    full = np.zeros((out, inn), dtype=np.float32)
    full[rows[0]:rows[1]] = (factors["B"] @ factors["A"]) * fl32(p["scale"])
    return full


METHODS_KNOWN = {"lora": _lora, "olora": _init_relative, "pissa": _init_relative,
                 "sorsa": _sorsa, "nola": _nola}


def nola_factor(seed: int, dims: tuple[int, int], coef: np.ndarray, basis_scale: float,
                offset: np.ndarray | None) -> np.ndarray:
    """spec/nola.md §3 steps 1–4, fp32."""
    rows, cols = dims
    per = rows * cols
    step = max(1, (1 << 22) // per)
    acc = np.zeros(per, dtype=np.float32)
    for c0 in range(0, len(coef), step):
        c1 = min(len(coef), c0 + step)
        acc += coef[c0:c1] @ philox_basis(seed, c0 * per, c1 * per).reshape(c1 - c0, per)
    acc = acc * fl32(basis_scale)
    factor = acc.reshape(rows, cols)
    return factor + offset if offset is not None else factor


def bias_deltas(adapter: Adapter) -> dict[str, np.ndarray]:
    """{bias parameter: Δbias} of the modules that change their layer's bias (methods-full.md `diff_b`)."""
    return v13.bias_deltas(adapter)


def weight_fingerprint(dtype: str, shape: list[int], raw: bytes) -> str:
    """README §7 on a stored tensor."""
    width = DTYPE_BYTES[dtype]
    count = math.prod(shape)
    k = min(count, 1024)
    sample = b"".join(raw[(i * count // k) * width:(i * count // k + 1) * width] for i in range(k))
    prefix = f"{dtype}:{'x'.join(str(d) for d in shape)}:".encode()
    return "sample1024-sha256:" + hashlib.sha256(prefix + sample).hexdigest()


def validate(adapter: Adapter, base_tensors: dict | None = None) -> list[str]:
    """Validator rules: NaN/Inf, NOLA basis fingerprints, and with a base the checks of README §7."""
    problems = []
    for name, (dtype, shape, raw) in adapter.tensors.items():
        if dtype in FACTOR_DTYPES and not np.isfinite(to_array64(dtype, shape, raw)).all():
            problems.append(f"{name}: NaN/Inf")
    for module, entry in adapter.manifest["modules"].items():
        if entry["method"] == "trainable_tokens":
            problems += v13.token_problems(adapter, module, entry)
        if entry["method"] != "nola":
            continue
        p = entry["params"]
        rows = p.get("rows", [0, entry["shape"][0]])
        for side, per in (("A", p["rank"] * entry["shape"][1]), ("B", (rows[1] - rows[0]) * p["rank"])):
            got = basis_fingerprint(int(p[side]["seed"]), p[side]["num_basis"] * per)
            if "sha256:" + got != p[side]["fingerprint"]:
                problems.append(f"{module}: basis {side} fingerprint differs")
    for name, want in adapter.manifest["base"]["weights"].items():
        if base_tensors is None:
            break
        if name not in base_tensors:
            problems.append(f"base lacks {name}")
            continue
        dtype, shape, raw = base_tensors[name]
        if shape != want["shape"] or want.get("dtype") not in (None, dtype):
            problems.append(f"base {name} is {dtype}{shape}")
        elif want.get("fingerprint") not in (None, weight_fingerprint(dtype, shape, raw)):
            problems.append(f"base {name} fingerprint differs")
    return problems


def canonical_base(adapter: Adapter, module: str, base_tensors: dict) -> np.ndarray:
    """The module's base weight from a parsed base file, fp32, canonical orientation."""
    entry = adapter.manifest["modules"][module]
    weight = to_array(*base_tensors[entry["base_weight"]])
    return weight.T.copy() if entry["fan_in_fan_out"] else weight
