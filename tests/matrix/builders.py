"""Adapters of every method built from the method descriptors (roles, dims, example tensors).

One small params builder per variant (valid params for the descriptor's typed model); the
tensors come from ``Method.example_tensors`` (required roles) plus the optional roles at the
shapes the descriptor's ``dims`` give, so a method that gains a role is covered without an edit.

Example:
    >>> adapter = build_adapter("olora", [Target("m", [6, 4])], torch.Generator().manual_seed(0))
    >>> sorted(adapter.manifest.modules["m"].tensors)
    ['lora_A', 'lora_A0', 'lora_B', 'lora_B0']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterfmt.format import Adapter, BaseWeight, Manifest, ModuleEntry
from adapterfmt.methods import METHOD_BY_NAME, get_method
from adapterfmt.methods.descriptor import tensor_refs
from adapterfmt.methods.init_relative import init_relative_params
from adapterfmt.methods.lora import lora_params
from adapterfmt.methods.nola import nola_module
from adapterfmt.methods.sorsa import sorsa_params


@dataclass(frozen=True)
class Target:
    """One adapted base weight: module name, canonical [out, in] shape, layer kind."""

    name: str
    shape: list[int]
    layer: str = "linear"
    base_weight: str = ""

    @property
    def weight(self) -> str:
        return self.base_weight or f"{self.name}.weight"

    @property
    def fan_in_fan_out(self) -> bool:
        # GPT-2 Conv1D and embeddings store the transpose (spec §4).
        return self.layer != "linear"

    @property
    def stored_shape(self) -> list[int]:
        return list(reversed(self.shape)) if self.fan_in_fan_out else list(self.shape)


def _lora(rank, alpha, rows):
    return lora_params(rank, alpha, False)


def _rslora(rank, alpha, rows):
    return lora_params(rank, alpha, True)


def _dora(rank, alpha, rows):
    return {**lora_params(rank, alpha, False), "magnitude_axis": "out"}


def _init_relative(init):
    return lambda rank, alpha, rows: init_relative_params(rank, alpha, False, init)


def _sorsa(rank, alpha, rows):
    return sorsa_params(rank, alpha if rank % 2 else None)  # both scale rules: alpha/r and alpha=None -> 1


#: variant -> (method name, params(rank, alpha, rows)); NOLA is built by nola_module (fingerprints).
VARIANTS = {"lora": ("lora", _lora), "rslora": ("lora", _rslora), "dora": ("dora", _dora),
            "olora": ("olora", _init_relative("olora")), "pissa": ("pissa", _init_relative("pissa")),
            "sorsa": ("sorsa", _sorsa), "nola": ("nola", None)}


def method_of(variant: str) -> str:
    return VARIANTS[variant][0]


def role_tensors(entry: ModuleEntry, gen: torch.Generator, dtype: torch.dtype, optional: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Random non-zero tensors for the method's roles (optional ones too, when ``optional``)."""
    method = get_method(entry.method)
    tensors = method.example_tensors(entry, gen, dtype)
    dims = method.dims(entry, method.params(entry))
    for role in method.roles:
        if optional and role.name not in tensors:
            shape = [dims[d] if isinstance(d, str) else d for d in role.shape]
            tensors[role.name] = torch.randn(shape, generator=gen).to(dtype)
    # A value that rounds to zero in F16/BF16 would make "non-zero" false; keep every entry non-zero.
    return {role: torch.where(t == 0, torch.ones((), dtype=dtype), t) for role, t in tensors.items()}


def _nola(target: Target, rank: int, scale: float, rows, gen, dtype, seeds) -> tuple[ModuleEntry, dict]:
    out, inp = target.shape
    start, stop = rows or (0, out)
    k, l_ = 3 + rank, 2 + rank
    tensors = {"coef_A": torch.randn(k, generator=gen).to(dtype), "coef_B": torch.randn(l_, generator=gen).to(dtype),
               "offset_A": (0.1 * torch.randn(rank, inp, generator=gen)).to(dtype),
               "offset_B": (0.1 * torch.randn(stop - start, rank, generator=gen)).to(dtype)}
    extra = {"rows": [start, stop]} if rows else {}
    return nola_module(target.name, target.weight, list(target.shape), rank, scale,
                       {"A": {"seed": seeds[0], "num_basis": k}, "B": {"seed": seeds[1], "num_basis": l_}},
                       tensors, layer=target.layer, fan_in_fan_out=target.fan_in_fan_out, **extra)


def build_module(variant: str, target: Target, rank: int, alpha: float, gen: torch.Generator,
                 dtype: torch.dtype = torch.float32, *, rows: list[int] | None = None,
                 seeds: tuple[int, int] = (7, 2**64 - 1)) -> tuple[ModuleEntry, dict[str, torch.Tensor]]:
    """One module of ``variant`` on ``target`` with random non-zero tensors (``rows``: NOLA only)."""
    method, make_params = VARIANTS[variant]
    if method == "nola":
        return _nola(target, rank, alpha / rank, rows, gen, dtype, seeds)
    entry = ModuleEntry(method=method, base_weight=target.weight, shape=list(target.shape),
                        params=make_params(rank, alpha, rows), tensors={},
                        fan_in_fan_out=target.fan_in_fan_out, layer=target.layer)
    tensors = role_tensors(entry, gen, dtype)
    entry.tensors = tensor_refs(target.name, tensors)
    return entry, tensors


def build_adapter(variant: str, targets: list[Target], gen: torch.Generator, dtype: torch.dtype = torch.float32,
                  *, ranks: list[int] | None = None, alphas: list[float] | None = None,
                  nola_rows: bool = False) -> Adapter:
    """An adapter of one variant on ``targets`` (own rank and alpha per module; base shapes recorded)."""
    manifest, tensors = Manifest(created_by="tests.matrix"), {}
    for i, target in enumerate(targets):
        rank = (ranks or [2 + i for _ in targets])[i]
        alpha = (alphas or [float(3 + 2 * i) for _ in targets])[i]
        out = target.shape[0]
        rows = [out // 4, out - out // 4] if nola_rows and i == 0 and out >= 4 else None
        entry, module_tensors = build_module(variant, target, rank, alpha, gen, dtype, rows=rows)
        manifest.modules[target.name] = entry
        manifest.base.weights[target.weight] = BaseWeight(shape=target.stored_shape)
        tensors.update({entry.tensors[role].name: t for role, t in module_tensors.items()})
    return Adapter(manifest=manifest, tensors=tensors)


def uncovered_methods() -> list[str]:
    """Registered methods no variant builds (a new method needs a VARIANTS row)."""
    return sorted(set(METHOD_BY_NAME) - {m for m, _ in VARIANTS.values()})
