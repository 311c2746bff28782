"""PEFT AdaLoRA <-> adapterfmt ``adalora``: pruned ranks from ``rank_pattern``, ranknum = init_r."""
from __future__ import annotations

from collections import Counter

from ....errors import UsageError
from ....methods.adalora import adalora_params
from ..config import PREFIX
from ._common import Tuner, common_export_fields, payload_state, require

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
    ranknums = Counter(e.params["ranknum"] for e in entries.values())
    scalings = Counter(e.params["scaling"] for e in entries.values())
    fans = {e.fan_in_fan_out for e in entries.values()}
    if len(ranknums) > 1 or len(scalings) > 1 or len(fans) > 1:
        raise UsageError("PEFT AdaLoRA has one init_r, one lora_alpha and one fan_in_fan_out for all modules, "
                         "but the adapter's modules differ", hint="convert to LoRA (--method lora) instead")
    init_r = ranknums.most_common(1)[0][0]
    if not float(init_r).is_integer() or any(e.params["rank"] > init_r for e in entries.values()):
        raise UsageError(f"ranknum {init_r} is not an integer initial rank at least every module's rank",
                         hint="convert to LoRA (--method lora) instead")
    init_r = int(init_r)
    scaling = scalings.most_common(1)[0][0]
    config = {"peft_type": "ADALORA", **common_export_fields(adapter), "init_r": init_r, "r": 8,
              "target_r": min(e.params["rank"] for e in entries.values()),
              "lora_alpha": int(scaling) if float(scaling).is_integer() else scaling,
              "fan_in_fan_out": fans.pop(), "total_step": 1, "tinit": 0, "tfinal": 0, "init_lora_weights": True,
              "rank_pattern": {f"{t}.lora_E": [True] * int(e.params["rank"]) + [False] * (init_r - int(e.params["rank"]))
                               for t, e in entries.items()}}
    state = payload_state(adapter)
    for target in entries:
        tensors = adapter.module_tensors(target)
        state[f"{PREFIX}{target}.lora_A"] = tensors["lora_A"]
        state[f"{PREFIX}{target}.lora_E"] = tensors["lora_E"].reshape(-1, 1)
        state[f"{PREFIX}{target}.lora_B"] = tensors["lora_B"]
        report.add(target, "lossless")
    return config, state


ADALORA_TUNER = Tuner(peft_type="ADALORA", method="adalora",
                      leaves={"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E", "ranknum": "ranknum"},
                      refused_leaves={"lora_embedding_A": "AdaLoRA embeddings are not supported yet",
                                      "lora_embedding_B": "AdaLoRA embeddings are not supported yet"},
                      handled=frozenset({"init_r", "lora_alpha", "rank_pattern", "fan_in_fan_out"}),
                      training_only=TRAINING, neutral=NEUTRAL, build=build, export=export)
