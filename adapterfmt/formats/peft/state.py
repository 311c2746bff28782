"""PEFT LoRA/rsLoRA/DoRA state dicts <-> adapterfmt adapters (plain, non-mutating inits)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ...conversion_report import EXACT_MATH, LOSSLESS
from ...errors import ForeignFormatError, InputIOError, UsageError
from ...format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ...format.dtypes import dtype_name
from ...methods.dora import require_peft_axis
from ...methods.lora import lora_params
from .._files import load_pickled_tensors, load_safetensors
from .._lowrank import most_common
from ..base import ReadOptions
from .lora_bias import add_bias_deltas, bias_state, split_lora_biases
from .config import (KEY_RE, MODULE_NAME_RE, PICKLE_FILE, PREFIX, ROLE_OF, WEIGHTS_FILE, resolve_rank_alpha)
from .params import is_param_module, read_target_params, write_target_params
from .restore import restore_original
from .selection import saved_by, selects
from .shared import keep_payload, one_fan_in_fan_out
from .tokens import LORA_LEAF, METHOD as TOKENS, add_token_modules, lora_token_indices, split_token_rows, token_state


def read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_path = path / WEIGHTS_FILE
    if st_path.is_file():
        return load_safetensors(st_path)[0]
    if (path / PICKLE_FILE).is_file():
        return load_pickled_tensors(path / PICKLE_FILE, allow_pickle, "the only weights file, adapter_model.bin,")
    raise InputIOError(f"no {WEIGHTS_FILE} (or {PICKLE_FILE})", path=path, hint="the adapter directory is incomplete")


def peft_to_adapter(config: dict[str, Any], state: dict[str, torch.Tensor], path: Path,
                    options: ReadOptions, report) -> Adapter:
    """Turn a PEFT config and state dict into an adapterfmt :class:`Adapter`."""
    manifest = Manifest()
    tensors: dict[str, torch.Tensor] = {}
    if config.get("target_parameters"):
        state = dict(state)  # the targeted parameters' factors are taken out of it
        read_target_params(config, state, path, options.base, manifest, tensors, report)
    state, lora_biases = split_lora_biases(state, PREFIX)
    state, token_rows = split_token_rows(state, LORA_LEAF)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    payload_keys: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise ForeignFormatError(f"key {key!r} does not start with {PREFIX!r}", path=path,
                                     hint="not a PEFT state dict, or saved by an incompatible tool")
        match = KEY_RE.match(key[len(PREFIX):])
        name = match["module"] if match else key[len(PREFIX):]
        if not MODULE_NAME_RE.match(name):
            raise ForeignFormatError(f"module name {name!r} is not a dotted parameter name", path=path,
                                     hint="the state dict is damaged or hostile")
        if match:
            grouped.setdefault(match["module"], {})[match.group("role")] = tensor
        else:
            payload_keys[key[len(PREFIX):]] = tensor
    use_dora = bool(config.get("use_dora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for module in sorted(grouped):
        parts = grouped[module]
        roles = {ROLE_OF[k]: v for k, v in parts.items()}
        embedding = "lora_embedding_A" in parts
        if set(roles) - {"magnitude"} != {"lora_A", "lora_B"}:
            raise ForeignFormatError(f"module {module!r} has {sorted(parts)}, needs both A and B",
                                     path=path, hint="the adapter is incomplete")
        if ("magnitude" in roles) != use_dora:
            raise ForeignFormatError(f"module {module!r}: lora_magnitude_vector "
                                     f"{'present' if 'magnitude' in roles else 'missing'} but use_dora="
                                     f"{use_dora}", path=path, hint="the config does not match the weights")
        a, b = roles["lora_A"], roles["lora_B"]
        conv2d = is_conv2d_pair(module, a, b, use_dora, path)
        if not conv2d and (a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]):
            raise ForeignFormatError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                     "are not a low-rank pair (of Conv layers only Conv2d is supported)", path=path,
                                     hint="only Linear, Conv1D, Conv2d and Embedding LoRA are supported")
        rank = a.shape[0]
        if rank == 0 or a.numel() == 0 or b.numel() == 0:  # scale = alpha / 0
            raise ForeignFormatError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} have an "
                                     "empty dimension (rank 0)", path=path, hint="the adapter is damaged")
        cfg_rank, alpha = resolve_rank_alpha(config, module)
        if cfg_rank != rank:
            raise ForeignFormatError(f"module {module!r} has rank {rank} but the config resolves to {cfg_rank}",
                                     path=path, hint="r/rank_pattern do not match the weights")
        out_f, in_f = b.shape[0], a.shape[1]
        transposed = (embedding or fan_in_fan_out) and not conv2d
        layer = "conv2d" if conv2d else "embedding" if embedding else ("conv1d" if fan_in_fan_out else "linear")
        params = lora_params(rank, alpha, bool(config.get("use_rslora", False)))
        method = "dora"
        if use_dora:
            params["magnitude_axis"] = "out"
            if conv2d:  # PEFT keeps a conv magnitude as (1, out, 1, 1)
                roles["magnitude"] = roles["magnitude"].reshape(-1)
        else:
            method = "lora"
        entry_tensors = {}
        for role, tensor in roles.items():
            name = f"{module}.{role}"
            tensors[name] = tensor
            entry_tensors[role] = TensorRef(name, dtype_name(tensor.dtype), list(tensor.shape))
        base_weight = f"{module}.weight"
        shape = [out_f, in_f, *a.shape[2:]] if conv2d else [out_f, in_f]
        manifest.modules[module] = ModuleEntry(method=method, base_weight=base_weight, shape=shape,
                                               params=params, tensors=entry_tensors,
                                               fan_in_fan_out=transposed, layer=layer)
        stored = [in_f, out_f] if transposed else shape
        manifest.base.weights[base_weight] = BaseWeight(shape=stored)
        report.add(module, LOSSLESS)
    for key, tensor in sorted(payload_keys.items()):
        keep_payload(manifest, tensors, key, payload_kind(key, config, path), tensor, report)
    add_token_modules(manifest, tensors, token_rows, lora_token_indices(config, sorted(token_rows), path),
                      options.base, path, report)
    if not manifest.modules:
        raise ForeignFormatError("no LoRA tensors found", path=path, hint="the adapter is empty or not LoRA")
    add_bias_deltas(config, lora_biases, manifest, tensors, path, report)
    refuse_unselected(config, sorted(grouped), path)
    manifest.base.name_or_path = config.get("base_model_name_or_path")
    manifest.base.revision = config.get("revision")
    # The modules PEFT's selection picked: the writer restores the original selection only for this set.
    lora_modules = sorted(t for t, e in manifest.modules.items() if e.method != TOKENS)
    manifest.source.update({"format": "peft", "config": config, "modules": lora_modules})
    adapter = Adapter(manifest=manifest, tensors=tensors)
    return adapter


def is_conv2d_pair(module: str, a: torch.Tensor, b: torch.Tensor, use_dora: bool, path: Path) -> bool:
    """Whether lora_A/lora_B are PEFT's Conv2d pair: A (r, in, kh, kw) and B (out, r, 1, 1).

    Refuses by name the conv shapes the format does not hold: B kernels that are not 1×1 (PEFT's
    grouped or other conv variants). DoRA on a Conv2d is held (its magnitude (1, out, 1, 1) is stored as (out,)).

    Example:
        >>> is_conv2d_pair("m.conv", torch.zeros(2, 3, 3, 3), torch.zeros(4, 2, 1, 1), False, Path("."))
        True
    """
    if a.dim() != 4 or b.dim() != 4:
        return False
    if b.shape[2:] != (1, 1) or a.shape[0] != b.shape[1]:
        raise ForeignFormatError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                                 "a Conv2d low-rank pair (A (r, in, kh, kw), B (out, r, 1, 1))", path=path,
                                 hint="grouped-conv LoRA is not supported")
    return True


def refuse_unselected(config: dict[str, Any], modules: list[str], path: Path) -> None:
    """Refuse LoRA weights of modules the config does not select: PEFT would silently not load them.

    With ``ensure_weight_tying`` PEFT adds tied modules beyond the selection, so nothing is checked.

    Example:
        >>> refuse_unselected({"target_modules": ["q_proj"]}, ["m.q_proj"], Path("."))
    """
    if config.get("ensure_weight_tying") or config.get("target_modules") is None:
        return
    try:
        unselected = [m for m in modules if not selects(config, m)]
    except (re.error, TypeError):
        return  # a selection we cannot evaluate; PEFT's own loader is the judge
    if unselected:
        raise ForeignFormatError(f"module {unselected[0]!r} has LoRA weights but the config's target_modules/"
                                 f"layers_to_transform/exclude_modules do not select it ({len(unselected)} such "
                                 "module(s)); PEFT would ignore their weights", path=path,
                                 hint="fix target_modules in adapter_config.json to name the trained modules")


def payload_kind(key: str, config: dict[str, Any], path: Path) -> str:
    """What a non-LoRA tensor of a PEFT state dict is: ``modules_to_save`` or ``full_weight`` (a full replacement).

    PEFT saves ``base_layer.*`` of LoRA modules (biases for ``bias="all"``/``"lora_only"``, embedding
    weights), whole ``modules_to_save`` modules, and for ``bias="all"`` every other bias, as values
    (not deltas): loading them replaces the base tensor.

    Example:
        >>> payload_kind("m.k_proj.bias", {"bias": "all"}, Path("."))
        'full_weight'
    """
    if ".base_layer." in key:
        return "full_weight"
    if any(saved_by(m, key) for m in config.get("modules_to_save") or ()):
        return "modules_to_save"
    if key.endswith(".bias") and config.get("bias") == "all":
        return "full_weight"
    raise ForeignFormatError(f"tensor {key!r} is neither a LoRA factor, part of a modules_to_save module, nor a bias "
                             f"saved by bias='all' (bias={config.get('bias', 'none')!r})", path=path,
                             hint="the adapter was saved by an incompatible tool or its config does not match")


# ------------------------------------------------------------------------ export
def adapter_to_peft(adapter: Adapter, report, base=None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Build a PEFT config and state dict; refuses what one PEFT config cannot express.

    ``base`` (optional) tells how PEFT nests several targeted parameters of one module when the
    adapter does not record it.
    """
    manifest = adapter.manifest
    methods = set(manifest.methods()) - {TOKENS}
    if not methods <= {"lora", "dora"} or len(methods) != 1:
        raise UsageError(f"PEFT export needs all modules to be LoRA or all DoRA (plus trainable tokens), got "
                         f"{sorted(manifest.methods())}",
                         hint="convert other methods to LoRA first (adapterfmt convert ... --method lora)")
    entries = {t: e for t, e in manifest.modules.items() if e.method != TOKENS}
    for target, e in entries.items():
        require_peft_axis(target, e, "PEFT")
        if e.base_weight != f"{target}.weight" and not is_param_module(target, e):
            # e.g. NOLA GPT-2 imports: q and v blocks of the fused c_attn are separate modules.
            raise UsageError(f"module {target!r} adapts {e.base_weight!r} under another name (a block of a fused "
                             "weight); PEFT keys adapters by module name and cannot express it",
                             hint="merge it with adapterfmt merge, or keep the adapterfmt file")
    params = sorted(t for t, e in entries.items() if is_param_module(t, e))
    modules = sorted(set(entries) - set(params))
    # A targeted parameter's fan_in_fan_out is its owner's is_transposed, not PEFT's flag.
    fifo = one_fan_in_fan_out([entries[t] for t in modules if entries[t].layer != "embedding"])
    use_rslora = most_common([bool(e.params["use_rslora"]) for e in entries.values()])
    ranks, alphas = {}, {}
    for target, e in entries.items():
        alpha = e.params["alpha"]
        if bool(e.params["use_rslora"]) != use_rslora:
            # Express this module in the other scale rule with the same scale.
            alpha = e.params["scale"] * (math.sqrt(e.params["rank"]) if use_rslora else e.params["rank"])
        ranks[target], alphas[target] = int(e.params["rank"]), _plain_number(alpha)
    r, lora_alpha = most_common(list(ranks.values())), most_common(list(alphas.values()))
    modules_to_save = sorted({p.target.rsplit(".", 1)[0] for p in manifest.payloads.values()
                              if p.kind == "modules_to_save"}) or None
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
        "use_dora": methods == {"dora"}, "fan_in_fan_out": fifo,
        "target_modules": modules, "target_parameters": params or None,
        "rank_pattern": {t: v for t, v in ranks.items() if v != r},
        "alpha_pattern": {t: v for t, v in alphas.items() if v != lora_alpha},
        "base_model_name_or_path": manifest.base.name_or_path, "revision": manifest.base.revision,
        "init_lora_weights": True, "lora_dropout": 0.0, "bias": "none", "inference_mode": True,
        "modules_to_save": modules_to_save,
    }
    config = restore_original(config, manifest, report)
    use_rslora = config["use_rslora"]
    tensors: dict[str, torch.Tensor] = {}
    if params:
        tensors.update(write_target_params(adapter, params, config, base))
    for target, e in entries.items():
        rank, alpha = resolve_rank_alpha(config, target)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if rank != e.params["rank"] or not math.isclose(scale, e.params["scale"], rel_tol=1e-12):
            raise UsageError(f"module {target!r}: PEFT's pattern matching would give rank {rank}, scale {scale} "
                             f"instead of {e.params['rank']}, {e.params['scale']}",
                             hint="the module names collide under PEFT's suffix matching; export fewer modules")
        status = LOSSLESS if scale == e.params["scale"] else EXACT_MATH
        note = "" if status == LOSSLESS else f"alpha rewritten, scale {scale!r} vs {e.params['scale']!r}"
        if bool(e.params["use_rslora"]) != use_rslora:
            note = "rsLoRA rule rewritten as alpha; " + note
        report.add(target, status, note.strip("; "))
        if target in params:
            continue
        names = ("lora_embedding_A", "lora_embedding_B") if e.layer == "embedding" else \
            ("lora_A.weight", "lora_B.weight")
        module_tensors = adapter.module_tensors(target)
        tensors[f"{PREFIX}{target}.{names[0]}"] = module_tensors["lora_A"]
        tensors[f"{PREFIX}{target}.{names[1]}"] = module_tensors["lora_B"]
        if "magnitude" in module_tensors:
            magnitude = module_tensors["magnitude"]
            tensors[f"{PREFIX}{target}.lora_magnitude_vector"] = \
                magnitude.reshape(1, -1, 1, 1) if e.layer == "conv2d" else magnitude
    biases, replaced = bias_state(adapter, PREFIX)
    if biases:
        if config["use_dora"]:
            raise UsageError("bias deltas on DoRA modules have no PEFT representation (lora_bias is LoRA only)",
                             hint="merge it with adapterfmt merge, or keep the adapterfmt file")
        config["lora_bias"] = True
        tensors.update(biases)
        report.notes.append("bias deltas written as lora_B.bias (lora_bias=true): delta / scale")
    for payload in manifest.payloads.values():
        if payload.target in replaced:
            continue
        tensors[f"{PREFIX}{payload_key(payload, manifest)}"] = adapter.tensors[payload.tensor.name]
    token_indices, token_tensors = token_state(adapter, LORA_LEAF)
    if token_indices:
        # The dict form, keyed by full module names (PEFT matches keys as name suffixes).
        config["trainable_token_indices"] = token_indices
        tensors.update(token_tensors)
        for target in token_indices:
            report.add(target, LOSSLESS)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return config, tensors


def payload_key(payload, manifest) -> str:
    """The PEFT state-dict key (without prefix) of a payload; refuses what PEFT cannot load as such.

    A full replacement of a LoRA module's tensor lives under its ``base_layer``; a bias of another
    module is saved as is (``bias="all"``); ``modules_to_save`` tensors keep the base name.

    Example:
        >>> payload_key(Payload("full_weight", "m.q.bias", ref), manifest_with_module_m_q)  # doctest: +SKIP
        'm.q.base_layer.bias'
    """
    target = payload.target
    head, _, leaf = target.rpartition(".")
    if payload.kind == "modules_to_save":
        return target
    if payload.kind == "full_weight" and head in manifest.modules:
        return f"{head}.base_layer.{leaf}"
    if payload.kind == "full_weight" and leaf == "bias":
        return target
    what = "a bias delta" if payload.kind == "bias_delta" else "a full replacement of a module PEFT does not adapt"
    raise UsageError(f"payload {target!r} is {what}; PEFT LoRA has no representation for it",
                     hint="merge it with adapterfmt merge, or keep the adapterfmt file")


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


