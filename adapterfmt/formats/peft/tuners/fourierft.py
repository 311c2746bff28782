"""PEFT FourierFT <-> adapterfmt ``fourierft``: ``fourierft_spectrum`` (n,) per module; positions are never saved.

n is ``n_frequency`` or the module's ``n_frequency_pattern`` entry; the spectrum's length gives it directly.
"""
from __future__ import annotations

from collections import Counter

from ....errors import UsageError
from ....methods.fourierft import fourierft_params
from ..config import PREFIX
from ._common import Tuner, base_shape, common_export_fields, payload_state, require

#: PEFT's defaults (FourierFTConfig), used when a config omits the field.
DEFAULT_SEED, DEFAULT_SCALING = 777, 150.0


def build(config, module, parts, path, base):
    spectrum = parts["fourierft_spectrum"]
    fan = bool(config.get("fan_in_fan_out", False))
    out_f, in_f = base_shape(base, module, fan, "FourierFT", path)
    n = spectrum.numel()
    require(spectrum.dim() == 1 and 1 <= n <= out_f * in_f, f"module {module!r}: fourierft_spectrum has shape "
            f"{list(spectrum.shape)}; expected (n,) with n ≤ {out_f}·{in_f}", path,
            hint="pass the base this adapter belongs to")
    params = fourierft_params(int(config.get("random_loc_seed", DEFAULT_SEED)), n,
                              float(config.get("scaling", DEFAULT_SCALING)))
    return params, {"spectrum": spectrum}, "conv1d" if fan else "linear", fan, (out_f, in_f)


def export(adapter, report):
    entries = adapter.manifest.modules
    fans = {e.fan_in_fan_out for e in entries.values()}
    shared = {(e.params["seed"], e.params["scaling"]) for e in entries.values()}
    if len(fans) > 1 or len(shared) > 1:
        raise UsageError("PEFT FourierFT has one fan_in_fan_out, random_loc_seed and scaling per adapter, but the "
                         "modules differ", hint="export the groups as separate adapters")
    seed, scaling = shared.pop()
    counts = Counter(e.params["n_frequency"] for e in entries.values())
    common = counts.most_common(1)[0][0]
    # Full module paths as pattern keys: PEFT matches a key against the module name's tail.
    pattern = {t: e.params["n_frequency"] for t, e in sorted(entries.items()) if e.params["n_frequency"] != common}
    config = {"peft_type": "FOURIERFT", **common_export_fields(adapter), "fan_in_fan_out": fans.pop(),
              "n_frequency": common, "n_frequency_pattern": pattern, "scaling": scaling,
              "random_loc_seed": int(seed), "init_weights": False, "bias": "none"}
    state = payload_state(adapter)
    for target in entries:
        state[f"{PREFIX}{target}.fourierft_spectrum"] = adapter.module_tensors(target)["spectrum"]
        report.add(target, "lossless")
    return config, state


FOURIERFT_TUNER = Tuner(peft_type="FOURIERFT", method="fourierft", leaves={"fourierft_spectrum": "spectrum"},
                        handled=frozenset({"n_frequency", "n_frequency_pattern", "scaling", "random_loc_seed",
                                           "fan_in_fan_out"}),
                        training_only=frozenset({"init_weights"}), neutral={"bias": ("none",)},
                        build=build, export=export)
