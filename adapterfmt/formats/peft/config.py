"""PEFT ``adapter_config.json``: the fields we understand, their types, and PEFT's rank/alpha patterns.

PEFT loads with ``strict=False`` and silently drops keys it does not expect; this reader refuses
any config field it does not understand, naming it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...errors import ForeignFormatError
from ...jsonio import read_json_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

# Fields whose value we read and honour.
HANDLED = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
           "modules_to_save", "use_dora", "init_lora_weights", "base_model_name_or_path", "revision",
           "target_modules", "target_parameters", "lora_bias", "trainable_token_indices"}
# Fields that only steer training or module selection; a saved adapter is the same without them.
TRAINING_ONLY = {"task_type", "auto_mapping", "peft_version", "inference_mode", "exclude_modules",
                 "lora_dropout", "bias", "layers_to_transform", "layers_pattern", "megatron_config",
                 "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                 "runtime_config", "qalora_group_size", "ensure_weight_tying"}
# Fields that change what the saved tensors mean; allowed only at their neutral value.
NEUTRAL = {"alora_invocation_tokens": (None,), "use_qalora": (False,),
           "use_bdlora": (None, False),
           "arrow_config": (None,), "kasa_config": (None,), "velora_config": (None,),
           "monteclora_config": (None,),
           # layer_replication duplicates base layers: the adapted model is another model.
           "layer_replication": (None, [])}
# init_lora_weights values after which the base is untouched (the rest mutate it: PiSSA, OLoRA, ...).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "loftq")

# Types of the fields we honour; a wrong type would silently change the meaning (bool("false")).
FIELD_TYPES = {"r": ((int, float), "a number"), "lora_alpha": ((int, float), "a number"),
               "use_rslora": ((bool,), "true or false"), "use_dora": ((bool,), "true or false"),
               "fan_in_fan_out": ((bool,), "true or false"), "lora_bias": ((bool,), "true or false"),
               "rank_pattern": ((dict, type(None)), "an object or null"),
               "alpha_pattern": ((dict, type(None)), "an object or null"),
               "base_model_name_or_path": ((str, type(None)), "a string or null"),
               "trainable_token_indices": ((list, dict, type(None)), "a list, an object or null"),
               "revision": ((str, type(None)), "a string or null")}
BIAS_MODES = ("none", "all", "lora_only")
# A module name must be a dotted parameter path (what the manifest schema allows, no '/' or '..').
MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                    r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
ROLE_OF = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A",
           "lora_embedding_B": "lora_B", "lora_magnitude_vector": "magnitude",
           "lora_magnitude_vector.weight": "magnitude"}


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching ``(.*\\.)?(key)$``, else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def resolve_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The (rank, alpha) PEFT would give ``module`` under ``config``.

    Example:
        >>> resolve_rank_alpha({"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}}, "m.v_proj")
        (2, 8)
    """
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rkey, akey = pattern_key(ranks, module), pattern_key(alphas, module)
    rank = ranks[rkey] if rkey is not None else config.get("r", 8)
    alpha = alphas[akey] if akey is not None else config.get("lora_alpha", 8)
    return rank, alpha


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    config = read_json_file(cfg_path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        from .tuners import TUNERS, check_fields
        if peft_type not in TUNERS:
            raise ForeignFormatError(f"peft_type {peft_type!r} is not supported", path=cfg_path,
                                     hint=f"adapterfmt reads PEFT LORA, {', '.join(sorted(TUNERS))}")
        check_fields(TUNERS[peft_type], config, cfg_path)
        return config
    unknown = sorted(set(config) - HANDLED - TRAINING_ONLY - set(NEUTRAL))
    if unknown:
        raise ForeignFormatError(f"config field(s) not understood: {', '.join(unknown)}", path=cfg_path,
                                 hint="they may change what the adapter means; upgrade adapterfmt or "
                                      "remove them if you know they are irrelevant")
    for key, neutral in NEUTRAL.items():
        if key in config and config[key] not in neutral:
            raise ForeignFormatError(f"config field {key}={config[key]!r} is not supported", path=cfg_path,
                                     hint="this PEFT feature changes the adapter's meaning and has no "
                                          "adapterfmt representation yet")
    for key, (types, wanted) in FIELD_TYPES.items():
        value = config.get(key)
        if key in config and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise ForeignFormatError(f"config field {key} must be {wanted}, got {value!r}", path=cfg_path,
                                     hint="the config is damaged")
    targets = config.get("target_parameters")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise ForeignFormatError(f"config field target_parameters must be a list of names, got {targets!r}",
                                 path=cfg_path, hint="the config is damaged")
    if config.get("bias", "none") not in BIAS_MODES:
        raise ForeignFormatError(f"config field bias={config['bias']!r} is not one of {', '.join(BIAS_MODES)}",
                                 path=cfg_path, hint="the config is damaged")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (config.get(key) or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ForeignFormatError(f"{key}[{pattern!r}] must be a number, got {value!r}", path=cfg_path,
                                         hint="the config is damaged")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ForeignFormatError(f"{key} key {pattern!r} is not a valid regular expression ({exc})",
                                         path=cfg_path, hint="the config is damaged") from None
    return config


