"""Which modules a PEFT config selects: PEFT's target selection rules, written again for checking.

The writer restores the original ``target_modules`` / ``layers_to_transform`` / ``layers_pattern`` /
``exclude_modules`` only if they select every module being written (and the module set is the one
PEFT selected at import); these functions say whether a config selects a module name.
Rules follow PEFT 0.21's ``check_target_module_exists`` (peft/tuners/tuners_utils.py).
"""
from __future__ import annotations

import re
from typing import Any

#: Config fields that steer which modules PEFT adapts (restored together or not at all).
SELECTION_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")


def _excluded(config: dict[str, Any], name: str) -> bool:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return True
    elif exclude and (name in exclude or any(name.endswith(f".{key}") for key in exclude)):
        return True
    # PEFT never puts an adapter on a module that is (inside) a modules_to_save module.
    return any(saved_by(m, name) for m in config.get("modules_to_save") or ())


def saved_by(module: str, key: str) -> bool:
    """Whether tensor ``key`` lies in a module matched by the ``modules_to_save`` entry ``module`` (PEFT's rule).

    Example:
        >>> saved_by("score", "score.dense.weight"), saved_by("head", "lm_head.weight")
        (True, False)
    """
    return re.match(rf"(^|.*\.){module}($|\..*)", key) is not None


def _layer_index(config: dict[str, Any], name: str) -> int | None:
    """The layer number PEFT reads from a module name (first numbered segment, or after layers_pattern)."""
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def selects(config: dict[str, Any], name: str) -> bool:
    """Whether PEFT would put a LoRA layer on module ``name`` under ``config``.

    Example:
        >>> selects({"target_modules": ["q_proj"], "layers_to_transform": [1]}, "model.layers.1.self_attn.q_proj")
        True
        >>> selects({"target_modules": ".*\\\\.0\\\\..*v_proj"}, "model.layers.1.self_attn.v_proj")
        False
    """
    if _excluded(config, name):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{key}") for key in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or isinstance(layers, list) and not layers:
        return True
    index = _layer_index(config, name)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def selects_parameter(config: dict[str, Any], name: str) -> bool:
    """Whether PEFT's ``target_parameters`` selects parameter ``name`` (exact, or a ``.``-suffix).

    Example:
        >>> selects_parameter({"target_parameters": ["mlp.experts.down_proj"]}, "model.layers.0.mlp.experts.down_proj")
        True
    """
    targets = config.get("target_parameters") or []
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def selects_exactly(config: dict[str, Any], modules: list[str], params: list[str], known: list[str] | None) -> bool:
    """True when ``config`` selects every module and parameter written, and they are the set selected at import.

    ``known`` is that import-time set (None when unknown: then the original selection is not trusted,
    since it might select modules that are no longer written).

    Example:
        >>> selects_exactly({"target_modules": ["q_proj"]}, ["a.q_proj"], [], ["a.q_proj"])
        True
    """
    if known is None or sorted(known) != sorted(modules + params):
        return False
    try:
        return all(selects(config, name) for name in modules) and \
            all(selects_parameter(config, name) for name in params)
    except (re.error, TypeError):
        return False
