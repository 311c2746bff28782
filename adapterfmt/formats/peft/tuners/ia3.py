"""PEFT IA³ <-> adapterfmt ``ia3``: ``ia3_l`` is (out, 1) on the output axis, (1, in) for feed-forward modules."""
from __future__ import annotations

import re
from typing import Any

from ....methods.ia3 import ia3_params
from ..config import PREFIX
from ._common import Tuner, base_shape, common_export_fields, payload_state, require
from ..shared import one_fan_in_fan_out


def is_feedforward(config: dict[str, Any], module: str) -> bool:
    """PEFT's rule: a regex string must fullmatch; list entries match as plain suffixes (no dot boundary).

    Example:
        >>> is_feedforward({"feedforward_modules": ["down_proj"]}, "model.layers.0.mlp.down_proj")
        True
    """
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, module))
    return any(module.endswith(key) for key in ff)


def build(config, module, parts, path, base):
    vector = parts["ia3_l"]
    require(vector.dim() == 2 and 1 in vector.shape, f"module {module!r}: ia3_l has shape {list(vector.shape)}; "
            "only Linear/Conv1D vectors (n, 1) or (1, n) are supported", path,
            hint="IA³ on convolutions is not supported yet")
    axis = "in" if vector.shape[0] == 1 else "out"
    feedforward = is_feedforward(config, module)
    require(feedforward == (axis == "in"), f"module {module!r}: ia3_l shape {list(vector.shape)} says the "
            f"{axis}put axis but feedforward_modules says {'in' if feedforward else 'out'}put", path)
    fan = bool(config.get("fan_in_fan_out", False))
    out_f, in_f = base_shape(base, module, fan, "IA³", path)
    n = vector.numel()
    require(n == (out_f if axis == "out" else in_f), f"module {module!r}: ia3_l has {n} entries but the base's "
            f"{axis}put side has {out_f if axis == 'out' else in_f}", path, hint="pass the base this adapter belongs to")
    return (ia3_params(axis, axis == "out"), {"scale": vector.reshape(n)}, "conv1d" if fan else "linear", fan,
            (out_f, in_f))


def bias_deltas(module, params, roles, base):
    """PEFT multiplies an output-axis layer's bias by l too: b·l − b in fp32 (exact for 0.5 ≤ l ≤ 2)."""
    name = f"{module}.bias"
    if params["axis"] != "out" or base is None or name not in base:
        return {}
    bias = base.get(name).float()
    return {name: bias * roles["scale"].float().reshape(bias.shape) - bias}


def export(adapter, report):
    entries = adapter.manifest.modules
    fan = one_fan_in_fan_out(list(entries.values()))
    config = {"peft_type": "IA3", **common_export_fields(adapter), "fan_in_fan_out": fan,
              "feedforward_modules": sorted(t for t, e in entries.items() if e.params["axis"] == "in"),
              "init_ia3_weights": True}
    implied = frozenset(f"{t}.bias" for t, e in entries.items() if e.params["axis"] == "out")
    state = payload_state(adapter, implied)
    for target, entry in entries.items():
        vector = adapter.module_tensors(target)["scale"]
        state[f"{PREFIX}{target}.ia3_l"] = vector.view(-1, 1) if entry.params["axis"] == "out" else vector.view(1, -1)
        report.add(target, "lossless")
    return config, state


IA3_TUNER = Tuner(peft_type="IA3", method="ia3", leaves={"ia3_l": "scale"},
                  handled=frozenset({"feedforward_modules", "fan_in_fan_out"}),
                  training_only=frozenset({"init_ia3_weights"}), build=build, export=export,
                  bias_deltas=bias_deltas)
