"""Restore an imported PEFT config's own fields on export, where they still describe what is written.

A PEFT adapter imported by adapterfmt keeps its original ``adapter_config.json`` in
``manifest.source["config"]``. On export we start from a config computed from the modules (always
correct) and put back the original's fields that are still consistent with them: ``task_type`` (so
``PeftModel.from_pretrained`` gives a ``PeftModelForCausalLM`` again), ``bias``, the selection fields
(``target_modules`` as written, ``layers_to_transform``, ``layers_pattern``, ``exclude_modules``), the
rank/alpha rule (``r``, ``lora_alpha``, patterns) and the training-only fields. A field we do not know
is refused by name, never dropped.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ...errors import UsageError
from ...format import Manifest
from .config import HANDLED, NEUTRAL, PLAIN_INITS, TRAINING_ONLY, resolve_rank_alpha
from .selection import SELECTION_FIELDS, saved_by, selects_exactly

#: Fields the writer computes itself from the modules (never copied).
COMPUTED = {"peft_type", "use_dora", "fan_in_fan_out", "modules_to_save", "base_model_name_or_path", "revision",
            "target_parameters", "trainable_token_indices"}
#: Architecture class suffix -> PEFT task_type, for adapters that did not come from PEFT.
TASK_BY_ARCHITECTURE_SUFFIX = {"ForCausalLM": "CAUSAL_LM"}
#: The rank/alpha rule, restored together when it gives every module its rank and scale.
SCALE_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def bias_targets(manifest: Manifest) -> list[str]:
    """Targets of full-replacement bias payloads (what PEFT saves for ``bias="all"``/``"lora_only"``).

    Example:
        >>> bias_targets(Manifest())
        []
    """
    return sorted(p.target for p in manifest.payloads.values()
                  if p.kind == "full_weight" and p.target.endswith(".bias"))


def bias_mode(manifest: Manifest, original: str | None) -> tuple[str, str]:
    """The ``bias`` value to write: the original when consistent with the bias payloads, else derived.

    "none" needs no bias payload; "lora_only" needs every bias on a LoRA module; "all" is always
    consistent (PEFT loads saved biases whatever the value; "all" on a bias-free model saves none).

    Example:
        >>> bias_mode(Manifest(), "none")
        ('none', '')
    """
    biases = bias_targets(manifest)
    on_lora = all(t.rsplit(".", 1)[0] in manifest.modules for t in biases)
    derived = "none" if not biases else ("lora_only" if on_lora else "all")
    consistent = {"none": not biases, "lora_only": on_lora, "all": True}
    if original in consistent and consistent[original]:
        return original, ""
    if original is None:
        return derived, ""
    return derived, f"bias {original!r} does not fit the saved biases; wrote {derived!r}"


def task_type_for(architecture: str | None) -> str | None:
    """PEFT's task_type for a base architecture, where it only picks the wrapper class (else None).

    Other task types (SEQ_CLS, ...) make PEFT add classifier heads to ``modules_to_save``, which
    would change what loads, so only causal LMs are inferred.

    Example:
        >>> task_type_for("LlamaForCausalLM"), task_type_for("BertModel")
        ('CAUSAL_LM', None)
    """
    for suffix, task in TASK_BY_ARCHITECTURE_SUFFIX.items():
        if architecture and architecture.endswith(suffix):
            return task
    return None


def _scales_fit(candidate: dict[str, Any], manifest: Manifest) -> bool:
    try:
        for target, entry in manifest.modules.items():
            rank, alpha = resolve_rank_alpha(candidate, target)
            rule = alpha / math.sqrt(rank) if candidate.get("use_rslora", False) else alpha / rank
            if rank != entry.params["rank"] or rule != entry.params["scale"]:
                return False
    except (TypeError, ValueError, ZeroDivisionError, KeyError):
        return False
    return True


def _same_modules_to_save(saved: Any, manifest: Manifest) -> bool:
    """The original ``modules_to_save`` covers exactly the modules_to_save payloads (each entry used)."""
    targets = [p.target for p in manifest.payloads.values() if p.kind == "modules_to_save"]
    if not isinstance(saved, list) or not targets:
        return False
    try:
        return all(any(saved_by(m, t) for m in saved) for t in targets) and \
            all(any(saved_by(m, t) for t in targets) for m in saved)
    except re.error:
        return False


def restore_original(config: dict[str, Any], manifest: Manifest, report) -> dict[str, Any]:
    """``config`` (computed from the modules) with the imported PEFT config's fields put back.

    Example:
        >>> restore_original({"bias": "none"}, Manifest(), report)  # doctest: +SKIP
    """
    source = manifest.source or {}
    original = source.get("config") if source.get("format") == "peft" else None
    if isinstance(original, dict) and original.get("peft_type", "LORA") != "LORA":
        original = None  # another tuner (LoHa, AdaLoRA, ...) converted to LoRA: its fields do not apply
    if not isinstance(original, dict):
        config["bias"], _ = bias_mode(manifest, None)
        config["task_type"] = task_type_for(manifest.base.architecture)
        return config
    unknown = sorted(set(original) - HANDLED - TRAINING_ONLY - set(NEUTRAL))
    if unknown:
        raise UsageError(f"the imported PEFT config has field(s) adapterfmt cannot carry over: {', '.join(unknown)}",
                         hint="re-import the adapter with this adapterfmt version, or remove those fields")
    out = dict(config)
    for key in sorted((TRAINING_ONLY | set(NEUTRAL)) - set(SELECTION_FIELDS) - COMPUTED - {"bias"}):
        if key in original:
            out[key] = original[key]
    out["inference_mode"] = True
    if original.get("init_lora_weights", True) in PLAIN_INITS:
        out["init_lora_weights"] = original.get("init_lora_weights", True)
    saved = original.get("modules_to_save")
    if _same_modules_to_save(saved, manifest):
        out["modules_to_save"] = saved
    out["bias"], note = bias_mode(manifest, original.get("bias", "none"))
    if note:
        report.notes.append(note)
    selection = {key: original.get(key) for key in SELECTION_FIELDS + ("target_parameters",)}
    if selects_exactly({**selection, "modules_to_save": out.get("modules_to_save")}, config["target_modules"],
                       config.get("target_parameters") or [], source.get("modules")):
        out.update(selection)
    elif selection["target_modules"] is not None:
        report.notes.append("target_modules written as the explicit module list (the original selection "
                            "does not describe exactly the modules written)")
    candidate = {key: original.get(key, config.get(key)) for key in SCALE_FIELDS}
    if _scales_fit(candidate, manifest):
        out.update(candidate)
    return out
