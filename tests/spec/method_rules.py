"""The manifest rules of spec/methods-tuners.md (and README §4 layer shapes), for the second reader.

Shapes each role must have (README §9 step 9, TensorError) and the params that must agree (step 8,
ManifestError), from the spec text alone.

Example:
    >>> tuner_role_shapes({"method": "ia3", "shape": [8, 6], "layer": "linear",
    ...                    "params": {"axis": "in", "bias_scaled": False}})
    {'scale': [6]}
"""
from __future__ import annotations

import struct

TUNER_METHODS = ("ia3", "loha", "lokr", "adalora", "oft", "boft", "vera", "fourierft")
#: README §4: the number of axes of a module's shape per layer kind.
LAYER_AXES = {"linear": 2, "conv1d": 2, "embedding": 2, "experts": 3, "conv2d": 4}
SCALE_RTOL = 1e-12


def fl32(x: float) -> float:
    """x rounded to the nearest binary32, as a Python float (struct keeps this module numpy-free)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def adalora_scale(scaling: float, ranknum: float) -> float:
    """methods-tuners.md §2: scaling / fl32(fl32(ranknum) + fl32(1e-5))."""
    return scaling / fl32(fl32(ranknum) + fl32(1e-5))


def layer_rules(module: str, entry: dict, error: type[Exception]) -> None:
    """README §4: the shape has the layer's number of axes; a conv2d layer has fan_in_fan_out false."""
    if len(entry["shape"]) != LAYER_AXES[entry["layer"]]:
        raise error(f"{module}: a {entry['layer']} layer with shape {entry['shape']}")
    if entry["layer"] == "conv2d" and entry["fan_in_fan_out"]:
        raise error(f"{module}: a conv2d layer with fan_in_fan_out")


def _scale_rule(module: str, stored: float, rule: float, error) -> None:
    if not abs(stored - rule) <= SCALE_RTOL * abs(rule):
        raise error(f"{module}: scale {stored} is not the rule's {rule}")


def _seed_rule(module: str, params: dict, error) -> None:
    if int(params["seed"]) >= 2**64:
        raise error(f"{module}: seed {params['seed']} is not a u64")


def tuner_rules(module: str, entry: dict, error: type[Exception]) -> None:
    """methods-tuners.md §2 and §5: the params that must agree with each other and with the shape."""
    method, p = entry["method"], entry["params"]
    if method not in TUNER_METHODS:
        return
    out, inn = entry["shape"][-2:]
    if method == "ia3" and p["bias_scaled"] != (p["axis"] == "out"):
        raise error(f"{module}: bias_scaled {p['bias_scaled']} on axis {p['axis']}")
    if method == "loha":
        _scale_rule(module, p["scale"], p["alpha"] / p["rank"], error)
    if method == "lokr":
        _lokr_rules(module, entry, error)
    if method == "adalora":
        _scale_rule(module, p["scale"], adalora_scale(p["scaling"], p["ranknum"]), error)
    if method == "oft" and inn % p["block_size"]:
        raise error(f"{module}: block_size {p['block_size']} does not divide in = {inn}")
    if method == "boft":
        size, factors = p["block_size"], p["butterfly_factors"]
        if inn % size or (factors > 1 and (size % 2 or (inn // size) % 2 ** (factors - 1))):
            raise error(f"{module}: block_size {size} with {factors} butterfly factors does not tile in = {inn}")
    if method == "vera":
        _seed_rule(module, p, error)
        if inn > p["max_in"] or out > p["max_out"]:
            raise error(f"{module}: {out}x{inn} exceeds max_out {p['max_out']} / max_in {p['max_in']}")
        if ("proj_A" in entry["tensors"]) != ("proj_B" in entry["tensors"]):
            raise error(f"{module}: proj_A and proj_B are stored together")
    if method == "fourierft":
        _seed_rule(module, p, error)
        if p["n_frequency"] > out * inn:
            raise error(f"{module}: n_frequency {p['n_frequency']} > out·in = {out * inn}")


def _lokr_rules(module: str, entry: dict, error) -> None:
    p, roles = entry["params"], entry["tensors"]
    for half in ("w1", "w2"):
        factored = [r for r in (f"{half}_a", f"{half}_b") if r in roles]
        if (half in roles) == bool(factored) or len(factored) == 1:
            raise error(f"{module}: needs exactly one of {half} or ({half}_a, {half}_b)")
    (a, c), (b, d) = p["w1_shape"], p["w2_shape"]
    if a * b != entry["shape"][0] or c * d != entry["shape"][1]:
        raise error(f"{module}: w1_shape {p['w1_shape']} and w2_shape {p['w2_shape']} do not give {entry['shape']}")
    both_full = "w1" in roles and "w2" in roles
    rule = 1.0 if p["convention"] == "lycoris" and both_full else p["alpha"] / p["rank"]
    _scale_rule(module, p["scale"], rule, error)


def tuner_role_shapes(entry: dict) -> dict[str, list[int]]:
    """methods-tuners.md §1 and §5: the shape of every role, from ``shape`` and the params."""
    method, p = entry["method"], entry["params"]
    out, inn = entry["shape"][-2:]
    if method == "ia3":
        return {"scale": [out if p["axis"] == "out" else inn]}
    if method == "loha":
        r = p["rank"]
        return {"w1_a": [out, r], "w1_b": [r, inn], "w2_a": [out, r], "w2_b": [r, inn]}
    if method == "lokr":
        (a, c), (b, d), r = p["w1_shape"], p["w2_shape"], p["rank"]
        return {"w1": [a, c], "w1_a": [a, r], "w1_b": [r, c], "w2": [b, d], "w2_a": [b, r], "w2_b": [r, d]}
    if method == "adalora":
        r = p["rank"]
        return {"lora_A": [r, inn], "lora_E": [r], "lora_B": [out, r]}
    if method == "oft":
        b = p["block_size"]
        return {"blocks": [1 if p["block_share"] else inn // b, b * (b - 1) // 2]}
    if method == "boft":
        h = p["block_size"]
        return {"rotations": [p["butterfly_factors"], inn // h, h, h], "scale": [out]}
    if method == "vera":
        r = p["rank"]
        return {"lambda_d": [r], "lambda_b": [out], "proj_A": [r, inn], "proj_B": [out, r]}
    return {"spectrum": [p["n_frequency"]]}

