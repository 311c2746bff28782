"""PEFT AdaLoRA <-> adapterfmt ``adalora``: pruned ranks from ``rank_pattern``, ranknum = init_r."""
from __future__ import annotations

import math
from collections import Counter

import torch

from ....conversion_report import LOSSLESS, SCALE_FOLDED
from ....methods.adalora import adalora_params
from ..config import PREFIX
from ._common import Tuner, common_export_fields, payload_state, require
from ..shared import one_fan_in_fan_out

TRAINING = frozenset({"r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                      "total_step", "lora_dropout", "bias", "init_lora_weights", "use_rslora", "loftq_config",
                      "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
                      "ensure_weight_tying", "qalora_group_size"})
NEUTRAL = {"use_dora": (False,), "lora_bias": (False,), "trainable_token_indices": (None, {}, []),
           "use_qalora": (False,), "target_parameters": (None, []), "alora_invocation_tokens": (None,),
           "arrow_config": (None,), "kasa_config": (None,), "velora_config": (None,), "monteclora_config": (None,),
           "use_bdlora": (None, False), "layer_replication": (None,), "alpha_pattern": (None, {})}


def build(config, module, parts, path, base):
    a, b, e = parts["lora_A"], parts["lora_B"], parts["lora_E"]
    rank = a.shape[0]
    require(a.dim() == 2 and b.dim() == 2 and tuple(e.shape) == (rank, 1) and b.shape[1] == rank,
            f"module {module!r}: lora_A {list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)} are not "
            "an AdaLoRA triple", path)
    init_r = config.get("init_r", 12)
    kept = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
    expected = sum(bool(x) for x in kept) if kept is not None else init_r
    require(rank == expected, f"module {module!r} has rank {rank}, rank_pattern/init_r say {expected}", path)
    if rank == 0:
        return None
    ranknum = float(parts["ranknum"].reshape(-1)[0]) if "ranknum" in parts else float(init_r)
    params = adalora_params(rank, config.get("lora_alpha", 8), ranknum)
    fan = bool(config.get("fan_in_fan_out", False))
    roles = {"lora_A": a, "lora_E": e.reshape(rank), "lora_B": b}
    return params, roles, "conv1d" if fan else "linear", fan, (b.shape[0], a.shape[1])


def export(adapter, report):
    entries = adapter.manifest.modules
    fan = one_fan_in_fan_out(list(entries.values()))
    # One init_r (= every module's ranknum) and one lora_alpha: the most common, at least every rank.
    init_r = max(int(math.ceil(max(e.params["ranknum"] for e in entries.values()))),
                 max(int(e.params["rank"]) for e in entries.values()))
    scaling = Counter(e.params["scaling"] for e in entries.values()).most_common(1)[0][0]
    target = adalora_params(1, scaling, init_r)["scale"]
    config = {"peft_type": "ADALORA", **common_export_fields(adapter), "init_r": init_r, "r": 8,
              "target_r": min(e.params["rank"] for e in entries.values()),
              "lora_alpha": int(scaling) if float(scaling).is_integer() else scaling,
              "fan_in_fan_out": fan, "total_step": 1, "tinit": 0, "tfinal": 0, "init_lora_weights": True,
              "rank_pattern": {f"{t}.lora_E": [True] * int(e.params["rank"]) + [False] * (init_r - int(e.params["rank"]))
                               for t, e in entries.items()}}
    state = payload_state(adapter)
    for name, entry in entries.items():
        tensors = adapter.module_tensors(name)
        b = tensors["lora_B"]
        if entry.params["scale"] != target:
            # PEFT applies one lora_alpha / (init_r + 1e-5): fold this module's own scale into B.
            b = (b.float() * (entry.params["scale"] / target)).to(b.dtype if b.dtype == torch.float64 else torch.float32)
            report.add(name, SCALE_FOLDED, f"scale {entry.params['scale']:.6g} folded into lora_B "
                                           f"(PEFT applies {target:.6g})")
        else:
            report.add(name, LOSSLESS)
        state[f"{PREFIX}{name}.lora_A"] = tensors["lora_A"]
        state[f"{PREFIX}{name}.lora_E"] = tensors["lora_E"].reshape(-1, 1)
        state[f"{PREFIX}{name}.lora_B"] = b
    return config, state


ADALORA_TUNER = Tuner(peft_type="ADALORA", method="adalora",
                      leaves={"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E", "ranknum": "ranknum"},
                      refused_leaves={"lora_embedding_A": "AdaLoRA embeddings are not supported yet",
                                      "lora_embedding_B": "AdaLoRA embeddings are not supported yet"},
                      handled=frozenset({"init_r", "lora_alpha", "rank_pattern", "fan_in_fan_out"}),
                      training_only=TRAINING, neutral=NEUTRAL, build=build, export=export)
