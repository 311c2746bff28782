"""PEFT ``target_parameters``: LoRA on bare parameters (MoE experts stored as one 3-D tensor).

PEFT (peft/tuners/lora/layer.py ``ParamWrapper``) wraps the module that OWNS the parameter; several
targeted parameters of one module are nested wrappers, the first registered innermost. So the saved
keys are ``<owner>[.base_layer]*k.lora_A.weight`` with k counted from the outermost (last) parameter.

For a 3-D parameter of shape (E, d1, d2): (in, out) = (d2, d1), or (d1, d2) when the owner says
``is_transposed`` (GPT-OSS: (E, in, out)). PEFT stores ``lora_A`` as (E·r, in) with expert-major rows
and ``lora_B`` as (out, r·E) with expert-MINOR columns, and computes ΔW[e] = s·B[:, :, e]·A[e]
(B viewed as (out, r, E), A as (E, r, in)), transposed per expert when ``is_transposed``.
We store per-expert factors A (E, r, in) and B (E, out, r): an exact reordering, no arithmetic.
A 2-D targeted parameter is plain LoRA on it (ΔW = s·B·A, shape (out, in) = the parameter's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ForeignFormatError, UsageError
from ...methods.descriptor import STACKED_LAYER

BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class TargetParam:
    """One targeted parameter: its owner module, name, nesting depth in the saved keys, orientation."""

    owner: str
    name: str
    depth: int
    transposed: bool

    @property
    def path(self) -> str:
        return f"{self.owner}.{self.name}"

    @property
    def key_prefix(self) -> str:
        return self.owner + BASE_LAYER * self.depth


def _matches(key: str, targets: list[str]) -> bool:
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _skeleton(base) -> Any:
    """The base model built on the meta device from its config.json (no weights read)."""
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(str(base.root))
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            raise ValueError(f"unknown architecture {config.architectures!r}")
        with torch.device("meta"):
            return cls(config)
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise ForeignFormatError(f"cannot build the base model's module tree from its config.json ({exc})",
                                 path=base.root, hint="target_parameters adapters need a transformers base "
                                                      "model directory (config.json) as --base") from None


def parameter_order(base, targets: list[str]) -> dict[str, list[tuple[str, bool]]]:
    """Per owner module, its targeted parameters in registration order with their ``is_transposed``.

    Example:
        >>> parameter_order(BaseCheckpoint("tiny-gpt-oss"), ["mlp.experts.gate_up_proj"])  # doctest: +SKIP
        {'model.layers.0.mlp.experts': [('gate_up_proj', True)], ...}
    """
    order: dict[str, list[tuple[str, bool]]] = {}
    for owner, module in _skeleton(base).named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False) if _matches(f"{owner}.{n}", targets)]
        if names:
            order[owner] = [(n, bool(getattr(module, "is_transposed", False))) for n in names]
    return order


def target_params(order: dict[str, list[tuple[str, bool]]]) -> list[TargetParam]:
    """Every targeted parameter with the nesting depth PEFT gives it (first registered = innermost).

    Example:
        >>> [p.depth for p in target_params({"m": [("a", False), ("b", False)]})]
        [1, 0]
    """
    return [TargetParam(owner, name, len(names) - 1 - i, transposed)
            for owner, names in order.items() for i, (name, transposed) in enumerate(names)]


def from_peft(a: torch.Tensor, b: torch.Tensor, shape: list[int], transposed: bool, where: str
              ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(canonical shape, A, B) of one targeted parameter from PEFT's stored factors (exact reordering).

    Example:
        >>> s, a3, b3 = from_peft(torch.zeros(6, 5), torch.zeros(4, 6), [3, 4, 5], False, "p")
        >>> s, list(a3.shape), list(b3.shape)
        ([3, 4, 5], [3, 2, 5], [3, 4, 2])
    """
    if len(shape) == 2:
        if list(a.shape) != [a.shape[0], shape[1]] or list(b.shape) != [shape[0], a.shape[0]]:
            raise ForeignFormatError(f"parameter {where!r} {shape}: lora_A {list(a.shape)} / lora_B {list(b.shape)} "
                                     "do not fit it", hint="the adapter is for a different model")
        return list(shape), a, b
    experts, d1, d2 = shape
    in_f, out_f = (d1, d2) if transposed else (d2, d1)
    rank = a.shape[0] // experts if a.dim() == 2 else 0
    if a.dim() != 2 or b.dim() != 2 or rank < 1 or list(a.shape) != [rank * experts, in_f] \
            or list(b.shape) != [out_f, rank * experts]:
        raise ForeignFormatError(f"parameter {where!r} {shape}: lora_A {list(a.shape)} / lora_B {list(b.shape)} "
                                 f"are not {experts} experts' factors of an ({out_f}, {in_f}) map",
                                 hint="the adapter is for a different model")
    a3 = a.reshape(experts, rank, in_f).contiguous()
    b3 = b.reshape(out_f, rank, experts).permute(2, 0, 1).contiguous()
    return [experts, out_f, in_f], a3, b3


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A, lora_B) of a targeted parameter from ours (inverse of :func:`from_peft`).

    Example:
        >>> a, b = to_peft(torch.zeros(3, 2, 5), torch.zeros(3, 4, 2))
        >>> list(a.shape), list(b.shape)
        ([6, 5], [4, 6])
    """
    if a.dim() == 2:
        return a, b
    experts, rank, in_f = a.shape
    return a.reshape(experts * rank, in_f).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()


def is_param_module(target: str, entry) -> bool:
    """A module written through target_parameters: stacked experts, or a module named as its parameter."""
    return entry.layer == STACKED_LAYER or entry.base_weight == target


def writer_order(adapter, base, targets: list[str]) -> dict[str, list[tuple[str, bool]]]:
    """Registration order of the parameters being written, per owner: recorded at import, else from ``base``."""
    recorded = (adapter.manifest.source or {}).get("parameter_order")
    written = {t.rsplit(".", 1)[0]: [] for t in targets}
    for t in targets:
        written[t.rsplit(".", 1)[0]].append(t.rsplit(".", 1)[1])
    if isinstance(recorded, dict) and all(o in recorded for o in written):
        full = {o: [(n, bool(tr)) for n, tr in recorded[o]] for o in written}
    elif base is not None:
        full = parameter_order(base, targets)
    else:
        raise UsageError(f"PEFT nests the LoRA of several parameters of one module in their registration order, "
                         f"which the adapter does not record for {sorted(written)[0]!r}",
                         hint="pass --base (the transformers model directory)")
    return {o: [(n, tr) for n, tr in full.get(o, []) if n in names] for o, names in written.items()}


def read_target_params(config: dict[str, Any], state: dict[str, torch.Tensor], path, base, manifest, tensors,
                       report) -> None:
    """Move the ``target_parameters`` LoRA of ``state`` (popped from it) into ``manifest``/``tensors``."""
    from ...conversion_report import LOSSLESS
    from ...format import BaseWeight, ModuleEntry
    from ...methods.descriptor import tensor_refs
    from ...methods.lora import lora_params
    from .config import PREFIX, resolve_rank_alpha
    targets = list(config.get("target_parameters") or [])
    if base is None:
        raise ForeignFormatError(f"target_parameters {targets} adapt bare parameters, whose layout (experts, "
                                 "orientation, nesting) only the base model tells", path=path,
                                 hint="convert with --base (the transformers model directory)")
    if config.get("use_dora"):
        raise ForeignFormatError("use_dora with target_parameters (PEFT itself refuses it)", path=path,
                                 hint="the config is damaged")
    order = parameter_order(base, targets)
    for param in target_params(order):
        keys = [f"{PREFIX}{param.key_prefix}.{role}.weight" for role in ("lora_A", "lora_B")]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ForeignFormatError(f"target parameter {param.path!r} has no {missing[0]!r}", path=path,
                                     hint="the adapter is incomplete or for another model")
        if param.path not in base:
            raise ForeignFormatError(f"target parameter {param.path!r} is not stored under that name in the base "
                                     "checkpoint (transformers rebuilds it from other tensors at load)", path=path,
                                     hint="adapterfmt binds LoRA on parameters only where the checkpoint stores them")
        stored = list(base.shape(param.path))
        transposed = param.transposed and len(stored) == 3
        shape, a, b = from_peft(state.pop(keys[0]), state.pop(keys[1]), stored, transposed, param.path)
        rank = a.shape[-2]
        cfg_rank, alpha = resolve_rank_alpha(config, param.path)
        if cfg_rank != rank:
            raise ForeignFormatError(f"target parameter {param.path!r} has rank {rank} but the config resolves to "
                                     f"{cfg_rank}", path=path, hint="r/rank_pattern do not match the weights")
        refs = tensor_refs(param.path, {"lora_A": a, "lora_B": b})
        tensors.update({refs["lora_A"].name: a, refs["lora_B"].name: b})
        manifest.modules[param.path] = ModuleEntry(
            method="lora", base_weight=param.path, shape=shape, tensors=refs, fan_in_fan_out=transposed,
            params=lora_params(rank, alpha, bool(config.get("use_rslora", False))),
            layer=STACKED_LAYER if len(shape) == 3 else "linear")
        manifest.base.weights[param.path] = BaseWeight(shape=stored)
        report.add(param.path, LOSSLESS, f"target parameter ({'experts' if len(shape) == 3 else '2-D'})")
    manifest.source["parameter_order"] = {o: [[n, t] for n, t in names] for o, names in order.items()}


def write_target_params(adapter, targets: list[str], config: dict[str, Any], base) -> dict[str, torch.Tensor]:
    """PEFT state-dict entries of the targeted parameters ``targets`` (keys nested as PEFT nests them)."""
    from .config import PREFIX
    entries = adapter.manifest.modules
    if config.get("use_dora") or config.get("fan_in_fan_out") or config.get("lora_dropout"):
        raise UsageError(f"target parameter {targets[0]!r}: PEFT's ParamWrapper refuses DoRA, fan_in_fan_out and "
                         "lora_dropout", hint="export the targeted parameters as a separate plain-LoRA adapter")
    order = writer_order(adapter, base, targets)
    out: dict[str, torch.Tensor] = {}
    for param in target_params(order):
        entry = entries[param.path]
        if len(entry.shape) == 3 and entry.fan_in_fan_out != param.transposed:
            layout = "(experts, in, out)" if entry.fan_in_fan_out else "(experts, out, in)"
            raise UsageError(f"target parameter {param.path!r}: stored {layout} but the model's module says "
                             "otherwise (is_transposed)",
                             hint="the adapter is for a different model")
        tensors = adapter.module_tensors(param.path)
        a, b = to_peft(tensors["lora_A"], tensors["lora_B"])
        out[f"{PREFIX}{param.key_prefix}.lora_A.weight"] = a
        out[f"{PREFIX}{param.key_prefix}.lora_B.weight"] = b
    missing = sorted(set(targets) - {p.path for p in target_params(order)})
    if missing:
        raise UsageError(f"target parameter {missing[0]!r} is not a parameter of its module in the base model",
                         hint="the adapter is for a different model")
    return out
