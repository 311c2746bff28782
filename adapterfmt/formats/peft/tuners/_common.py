"""Shared parts of the non-LoRA PEFT tuners: config checks, key grouping, entries, payloads, export."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ....conversion_report import LOSSLESS
from ....errors import ForeignFormatError, UsageError
from ....format import Adapter, BaseWeight, Manifest, ModuleEntry, Payload, TensorRef
from ....format.dtypes import dtype_name
from ..config import MODULE_NAME_RE, PREFIX
from ..shared import keep_payload

#: Fields of every PEFT config that only steer training, module selection or bookkeeping.
COMMON_TRAINING_ONLY = frozenset({"task_type", "auto_mapping", "peft_version", "inference_mode", "exclude_modules",
                                  "layers_to_transform", "layers_pattern", "revision", "base_model_name_or_path",
                                  "target_modules", "modules_to_save", "peft_type"})


@dataclass(frozen=True)
class Tuner:
    """How one PEFT tuner maps to an adapterfmt method.

    ``leaves`` maps the state-dict leaf after the module path to our role; ``handled`` are the config
    fields the builder reads; ``training_only`` are ignored; ``neutral`` must hold a neutral value.
    ``build(config, module, parts, path, base)`` (base: the BaseCheckpoint or None) returns (params, role tensors,
    layer, fan_in_fan_out, (out, in) or (out, in, kh, kw) for conv2d)
    or None for a module that adapts nothing (AdaLoRA rank 0); ``export(adapter, report)`` returns
    (config, state dict).
    """

    peft_type: str
    method: str
    leaves: dict[str, str]
    handled: frozenset[str]
    training_only: frozenset[str]
    build: Callable
    export: Callable
    neutral: dict[str, tuple] = field(default_factory=dict)
    #: Leaves PEFT may save that this version cannot represent (e.g. conv Tucker cores), with the reason.
    refused_leaves: dict[str, str] = field(default_factory=dict)
    #: ``bias_deltas(module, entry params, role tensors, base) -> {bias name: fp32 delta}`` for tuners that
    #: also change the layer's bias (IA³ output axis); stored as ``bias_delta`` payloads.
    bias_deltas: Callable | None = None
    #: ``notes(config, adapter, report)``: tuner-wide remarks once every module is read.
    notes: Callable | None = None
    #: ``shared(config, state, path, base, report) -> (state, build)`` for tuners with model-wide tensors
    #: outside ``base_model.model.`` (VeRA's projections): takes them out and returns the per-module builder.
    shared: Callable | None = None


def check_fields(tuner: Tuner, config: dict[str, Any], cfg_path: Path) -> None:
    """Refuse config fields we do not understand and non-neutral values of neutral fields, by name."""
    known = tuner.handled | tuner.training_only | COMMON_TRAINING_ONLY | set(tuner.neutral)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ForeignFormatError(f"{tuner.peft_type} config field(s) not understood: {', '.join(unknown)}",
                                 path=cfg_path, hint="they may change what the adapter means; upgrade adapterfmt")
    for key, neutral in tuner.neutral.items():
        if key in config and config[key] not in neutral:
            raise ForeignFormatError(f"{tuner.peft_type} config field {key}={config[key]!r} is not supported",
                                     path=cfg_path, hint="this PEFT feature has no adapterfmt representation yet")


def group_keys(tuner: Tuner, state: dict[str, torch.Tensor], path: Path
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module: {PEFT leaf: tensor}}, {other key without prefix: tensor}); refuses foreign keys."""
    leaves = sorted(list(tuner.leaves) + list(tuner.refused_leaves), key=len, reverse=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise ForeignFormatError(f"key {key!r} does not start with {PREFIX!r}", path=path,
                                     hint="not a PEFT state dict, or saved by an incompatible tool")
        rest = key[len(PREFIX):]
        leaf = next((lf for lf in leaves if rest.endswith("." + lf)), None)
        if leaf in tuner.refused_leaves:
            raise ForeignFormatError(f"{rest!r}: {tuner.refused_leaves[leaf]}", path=path,
                                     hint="keep the PEFT adapter, or merge it with PEFT")
        module = rest[: -len(leaf) - 1] if leaf else rest
        if not MODULE_NAME_RE.match(module):
            raise ForeignFormatError(f"module name {module!r} is not a dotted parameter name", path=path,
                                     hint="the state dict is damaged or hostile")
        if leaf:
            grouped.setdefault(module, {})[leaf] = tensor
        else:
            others[rest] = tensor
    return grouped, others


def build_adapter(tuner: Tuner, config: dict[str, Any], state: dict[str, torch.Tensor], path: Path,
                  base, report) -> Adapter:
    """The Adapter for a PEFT state dict of ``tuner``'s type (modules_to_save kept as payloads)."""
    build = tuner.build
    if tuner.shared is not None:
        state, build = tuner.shared(config, state, path, base, report)
    grouped, others = group_keys(tuner, state, path)
    manifest, tensors = Manifest(), {}
    for module in sorted(grouped):
        built = build(config, module, grouped[module], path, base)
        if built is None:
            report.notes.append(f"module {module} has rank 0 (pruned): ΔW = 0, not stored")
            continue
        params, roles, layer, fan, shape = built  # shape: (out, in), or (out, in, kh, kw) for conv2d
        out_f, in_f = shape[0], shape[1]
        refs = {}
        for role, tensor in roles.items():
            name = f"{module}.{role}"
            tensors[name] = tensor.contiguous()
            refs[role] = TensorRef(name, dtype_name(tensor.dtype), list(tensor.shape))
        base_weight = f"{module}.weight"
        manifest.modules[module] = ModuleEntry(method=tuner.method, base_weight=base_weight, shape=list(shape),
                                               params=params, tensors=refs, fan_in_fan_out=fan, layer=layer)
        manifest.base.weights[base_weight] = BaseWeight(shape=[in_f, out_f] if fan else list(shape))
        report.add(module, LOSSLESS)
        for target, delta in (tuner.bias_deltas(module, params, roles, base) if tuner.bias_deltas else {}).items():
            name = f"payload.{target}"
            tensors[name] = delta
            manifest.payloads[target] = Payload(kind="bias_delta", target=target,
                                                tensor=TensorRef(name, dtype_name(delta.dtype), list(delta.shape)))
            report.notes.append(f"{target}: PEFT also scales this bias; kept as a bias delta against the given base")
    for key, tensor in sorted(others.items()):
        kind = "full_weight" if ".base_layer." in key else "modules_to_save"
        keep_payload(manifest, tensors, key, kind, tensor, report)
    if not manifest.modules:
        raise ForeignFormatError(f"no {tuner.peft_type} tensors found", path=path, hint="the adapter is empty")
    manifest.base.name_or_path = config.get("base_model_name_or_path")
    manifest.base.revision = config.get("revision")
    manifest.source = {"format": "peft", "config": config}
    adapter = Adapter(manifest=manifest, tensors=tensors)
    if tuner.notes is not None:
        tuner.notes(config, adapter, report)
    return adapter


def require(condition: bool, message: str, path: Path, hint: str = "the config does not match the weights") -> None:
    """Raise a ForeignFormatError with ``message`` unless ``condition``."""
    if not condition:
        raise ForeignFormatError(message, path=path, hint=hint)


def common_export_fields(adapter: Adapter) -> dict[str, Any]:
    """Config fields every exported PEFT tuner config shares."""
    manifest = adapter.manifest
    return {"task_type": None, "target_modules": sorted(manifest.modules), "inference_mode": True,
            "base_model_name_or_path": manifest.base.name_or_path, "revision": manifest.base.revision,
            "modules_to_save": sorted({p.target.rsplit(".", 1)[0] for p in manifest.payloads.values()
                                       if p.kind == "modules_to_save"}) or None}


def payload_state(adapter: Adapter, implied_biases: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """PEFT keys of the adapter's payloads (modules_to_save, full weights).

    ``implied_biases`` are bias deltas PEFT recomputes itself (IA³), so they are not written.
    """
    out = {}
    for payload in adapter.manifest.payloads.values():
        if payload.kind == "bias_delta" and payload.target in implied_biases:
            continue
        if payload.kind == "bias_delta":
            raise UsageError(f"payload {payload.target!r} (bias delta) has no PEFT representation here",
                             hint="merge the adapter instead, or keep the adapterfmt file")
        target = payload.target
        if payload.kind == "full_weight":
            head, _, leaf = target.rpartition(".")
            target = f"{head}.base_layer.{leaf}"
        out[f"{PREFIX}{target}"] = adapter.tensors[payload.tensor.name]
    return out


def base_shape(base, module: str, fan: bool, method: str, path: Path) -> tuple[int, int]:
    """Canonical (out, in) of ``module``'s base weight; methods whose tensors give one side only need it."""
    if base is None:
        raise ForeignFormatError(f"{method}: the saved tensors give only one dimension of {module!r}", path=path,
                                 hint="pass --base BASE (the model the adapter was trained on); "
                                      f"{method} also needs the base to merge")
    name = f"{module}.weight"
    if name not in base:
        raise ForeignFormatError(f"the base has no {name!r}", path=path, hint="pass the base this adapter belongs to")
    shape = base.shape(name)
    if len(shape) != 2:
        raise ForeignFormatError(f"{name!r} has shape {shape}; only Linear/Conv1D layers are supported", path=path,
                                 hint="convolution layers are not supported for this method yet")
    return (shape[1], shape[0]) if fan else (shape[0], shape[1])
