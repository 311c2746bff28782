"""PEFT OFT (≥ 0.18 parametrisation) <-> adapterfmt ``oft`` (Linear layers)."""
from __future__ import annotations

import math

from packaging.version import InvalidVersion, Version

from ....errors import UsageError
from ..config import PREFIX
from ._common import Tuner, base_shape, common_export_fields, payload_state, require

SETTINGS = ("block_share", "cayley", "neumann_terms", "coft", "eps")
#: The PEFT version whose Cayley–Neumann series this reader reproduces (0.18 changed it).
NEUMANN_SINCE = Version("0.18.0")


def _block_size(elements: int, module: str, path) -> int:
    size = (1 + math.isqrt(1 + 8 * elements)) // 2
    require(size * (size - 1) // 2 == elements and size >= 2, f"module {module!r}: oft_R rows have {elements} "
            "entries, not b(b−1)/2 for any block size b", path)
    return size


def _check_version(config, path) -> None:
    if not config.get("use_cayley_neumann", False):
        return
    try:
        version = Version(str(config.get("peft_version", "0")).partition("@")[0])
    except InvalidVersion:
        version = Version("0")
    require(version >= NEUMANN_SINCE, f"use_cayley_neumann with peft_version {config.get('peft_version')!r}: "
            "PEFT before 0.18.0 used another Cayley–Neumann series", path,
            hint="re-save the adapter with PEFT ≥ 0.18, or merge it with the PEFT version that trained it")


def build(config, module, parts, path, base):
    blocks = parts["oft_R.weight"]
    require("use_cayley_neumann" in config, "adapter_config.json has no use_cayley_neumann: it predates PEFT 0.18 "
            "and its rotation parametrisation is ambiguous", path, hint="re-save the adapter with PEFT ≥ 0.18")
    _check_version(config, path)
    require(not config.get("fan_in_fan_out", False), "OFT with fan_in_fan_out is not supported", path,
            hint="PEFT's OFT does not support Conv1D layers either")
    out_f, in_f = base_shape(base, module, False, "OFT", path)
    size = _block_size(blocks.shape[1], module, path)
    share = bool(config.get("block_share", False))
    rows = 1 if share else in_f // size
    require(in_f % size == 0 and blocks.shape[0] == rows, f"module {module!r}: oft_R {list(blocks.shape)} does "
            f"not tile {in_f} inputs with blocks of {size}", path, hint="pass the base this adapter belongs to")
    params = {"block_size": size, "block_share": share,
              "cayley": "neumann" if config["use_cayley_neumann"] else "exact",
              "neumann_terms": int(config.get("num_cayley_neumann_terms", 5)), "coft": bool(config.get("coft", False)),
              "eps": float(config.get("eps", 6e-5))}
    return params, {"blocks": blocks}, "linear", False, (out_f, in_f)


def export(adapter, report):
    entries = adapter.manifest.modules
    first = next(iter(entries.values())).params
    for target, entry in entries.items():
        differs = [k for k in ("block_size",) + SETTINGS if entry.params[k] != first[k]]
        if differs:
            raise UsageError(f"module {target!r}: {', '.join(differs)} differ from other modules; one PEFT OFT "
                             "config holds one value", hint="export the modules as separate adapters")
    config = {"peft_type": "OFT", **common_export_fields(adapter), "r": 0, "oft_block_size": first["block_size"],
              "block_share": first["block_share"], "coft": first["coft"], "eps": first["eps"],
              "use_cayley_neumann": first["cayley"] == "neumann",
              "num_cayley_neumann_terms": first["neumann_terms"], "fan_in_fan_out": False,
              "init_weights": True, "module_dropout": 0.0, "peft_version": str(NEUMANN_SINCE)}
    state = payload_state(adapter)
    for target in entries:
        state[f"{PREFIX}{target}.oft_R.weight"] = adapter.module_tensors(target)["blocks"]
        report.add(target, "lossless")
    return config, state


OFT_TUNER = Tuner(peft_type="OFT", method="oft", leaves={"oft_R.weight": "blocks"},
                  refused_leaves={"oft_embedding_R.weight": "OFT on embeddings is not supported yet"},
                  handled=frozenset({"r", "oft_block_size", "block_share", "coft", "eps", "use_cayley_neumann",
                                     "num_cayley_neumann_terms", "fan_in_fan_out"}),
                  training_only=frozenset({"module_dropout", "init_weights", "bias"}), build=build, export=export)
