"""PEFT BOFT <-> adapterfmt ``boft`` (Linear layers).

The butterfly factor is read from the tensors: PEFT without its CUDA extension (every CPU-only
machine) silently builds factor 1 whatever the config says. A factor-1 file whose config asks for
more is that fallback and is read as what it is; any other contradiction is refused.
"""
from __future__ import annotations

from ....errors import UsageError
from ..config import PREFIX
from ._common import Tuner, common_export_fields, payload_state, require


def build(config, module, parts, path, base):
    rotations, scale = parts["boft_R"], parts["boft_s"]
    require(rotations.dim() == 4 and rotations.shape[2] == rotations.shape[3], f"module {module!r}: boft_R has "
            f"shape {list(rotations.shape)}, expected (factors, blocks, size, size)", path)
    require(scale.dim() == 2 and scale.shape[1] == 1, f"module {module!r}: boft_s has shape {list(scale.shape)}; "
            "only Linear layers (out, 1) are supported", path, hint="BOFT on convolutions is not supported yet")
    factors, count, size, _ = rotations.shape
    configured = int(config.get("boft_n_butterfly_factor", 1))
    require(factors == configured or factors == 1, f"module {module!r}: boft_R holds {factors} butterfly "
            f"factor(s) but boft_n_butterfly_factor is {configured}", path)
    require(not config.get("fan_in_fan_out", False), "BOFT with fan_in_fan_out is not supported", path,
            hint="PEFT's BOFT does not support Conv1D layers either")
    params = {"butterfly_factors": factors, "block_size": size}
    return params, {"rotations": rotations, "scale": scale.reshape(-1)}, "linear", False, (scale.shape[0],
                                                                                          count * size)


def notes(config, adapter, report) -> None:
    """Say when the tensors hold fewer butterfly factors than the config asks for (PEFT's CPU fallback)."""
    configured = int(config.get("boft_n_butterfly_factor", 1))
    if configured > 1 and any(e.params["butterfly_factors"] == 1 for e in adapter.manifest.modules.values()):
        report.notes.append(f"boft_n_butterfly_factor is {configured} but the tensors hold 1 factor: PEFT built "
                            "them without its CUDA extension; read as factor 1")


def export(adapter, report):
    entries = adapter.manifest.modules
    settings = {(e.params["butterfly_factors"], e.params["block_size"]) for e in entries.values()}
    if len(settings) > 1:
        raise UsageError("PEFT BOFT has one butterfly factor and block size for all modules, but the adapter's "
                         "modules differ", hint="export the modules as separate adapters")
    factors, size = settings.pop()
    config = {"peft_type": "BOFT", **common_export_fields(adapter), "boft_block_size": size, "boft_block_num": 0,
              "boft_n_butterfly_factor": factors, "fan_in_fan_out": False, "boft_dropout": 0.0, "init_weights": True,
              "bias": "none"}
    if factors > 1:
        report.notes.append(f"{factors} butterfly factors: PEFT loads this only where its CUDA extension builds")
    state = payload_state(adapter)
    for target in entries:
        tensors = adapter.module_tensors(target)
        state[f"{PREFIX}{target}.boft_R"] = tensors["rotations"]
        state[f"{PREFIX}{target}.boft_s"] = tensors["scale"].reshape(-1, 1)
        report.add(target, "lossless")
    return config, state


BOFT_TUNER = Tuner(peft_type="BOFT", method="boft", leaves={"boft_R": "rotations", "boft_s": "scale"},
                   handled=frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                                      "fan_in_fan_out"}),
                   training_only=frozenset({"boft_dropout", "init_weights", "bias"}), build=build, export=export,
                   notes=notes)
