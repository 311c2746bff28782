"""The method protocol and registry.

A method only has to say, from its stored tensors, what the delta (or merged weight)
is in canonical orientation: ``(out, in)`` like ``nn.Linear.weight``, computed in fp32.
Everything else (orientation, dtypes, rounding, devices, streaming) is the engine's job.
"""
from __future__ import annotations

import math
import re
from typing import ClassVar

import torch

from ..errors import ManifestError, TensorError, UnknownMethodError
from ..format.manifest import ModuleEntry

_REGISTRY: dict[str, "AdapterMethod"] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class AdapterMethod:
    """Base class of a method. Subclasses set ``name`` and ``roles`` and implement ``delta``."""

    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()
    #: True when ΔW depends on the base weight itself (DoRA), so merging needs the base.
    needs_base: ClassVar[bool] = False
    #: Description for ``inspect``.
    summary: ClassVar[str] = ""

    def check_entry(self, target: str, entry: ModuleEntry, path: str | None = None) -> None:
        """Check shape relations between the entry's tensors and its base shape (no data read)."""
        missing = [r for r in self.roles if r not in entry.tensors]
        if missing:
            raise ManifestError(f"module {target!r} ({self.name}) lacks tensor role(s) {missing}", path=path,
                                hint="the manifest is damaged; re-export the adapter")

    #: ``delta``/``merged`` accept ``rows`` (a slice of output rows; ``base`` is then those rows
    #: only), so the engine can merge a large tensor in row blocks with bounded memory.
    row_separable: ClassVar[bool] = False

    def delta(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor],
              base: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
        """ΔW in canonical (out, in) orientation, fp32. ``base`` is the canonical fp32 base weight.

        With ``rows`` (only when ``row_separable``), just those rows of ΔW, and ``base`` holds
        just those rows of the base.
        """
        raise NotImplementedError

    def merged(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor], base: torch.Tensor,
               rows: slice | None = None) -> torch.Tensor:
        """The merged weight in fp32, canonical orientation (``rows`` as in ``delta``). Default: base + ΔW."""
        return base + self.delta(entry, tensors, base, rows)

    def validate_module(self, target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor],
                        base: torch.Tensor | None) -> tuple[list[str], dict[str, float]]:
        """Method-specific checks beyond shapes: (problems, measurements). Default: none."""
        return [], {}

    def convert_module(self, target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor], to: str,
                       options: dict) -> tuple[ModuleEntry, dict[str, torch.Tensor], str, str]:
        """Convert one module to method ``to``: (entry, tensors by role, report status, note).

        Methods override this for the conversions they support; otherwise the target method's
        ``convert_from`` is used when it lists this method in ``converts_from``; else refused.
        """
        from ..errors import UsageError
        into = _REGISTRY.get(to)
        if into is not None and self.name in into.converts_from:
            return into.convert_from(target, entry, tensors, options)
        raise UsageError(f"module {target!r}: no conversion from {self.name} to {to}",
                         hint=f"supported targets from {self.name}: {', '.join(self.converts_to) or 'none'}")

    #: Methods ``convert_module`` can produce.
    converts_to: ClassVar[tuple[str, ...]] = ()
    #: Methods this one can be made from by ``convert_from`` (e.g. NOLA from LoRA).
    converts_from: ClassVar[tuple[str, ...]] = ()

    def convert_from(self, target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor],
                     options: dict) -> tuple[ModuleEntry, dict[str, torch.Tensor], str, str]:
        """Build this method's module from another method's (see ``converts_from``)."""
        raise NotImplementedError

    def parameter_count(self, entry: ModuleEntry) -> int:
        """Number of stored scalars for this module (what training updates or the file holds)."""
        return sum(math.prod(ref.shape) for ref in entry.tensors.values())


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Register a method instance under its unique lowercase name.

    Example:
        >>> class Mine(AdapterMethod):
        ...     name = "mine"
        >>> register_method(Mine())  # doctest: +SKIP
    """
    if not _NAME_RE.match(method.name or ""):
        raise ValueError(f"method name {method.name!r} must be lowercase snake_case")
    if method.name in _REGISTRY and type(_REGISTRY[method.name]) is not type(method):
        raise ValueError(f"method {method.name!r} is already registered by {type(_REGISTRY[method.name])}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str, *, path: str | None = None, module: str | None = None) -> AdapterMethod:
    """The registered method called ``name``; a clear error when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        where = f" (module {module!r})" if module else ""
        raise UnknownMethodError(
            f"unknown adapter method {name!r}{where}; this version knows {', '.join(sorted(_REGISTRY))}",
            path=path, hint="upgrade adapterfmt or re-export the adapter with a supported method") from None


def all_methods() -> dict[str, AdapterMethod]:
    return dict(_REGISTRY)


def take_rows(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """``tensor[rows]`` (all rows when ``rows`` is None)."""
    return tensor if rows is None else tensor[rows]


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: alpha/rank, or alpha/sqrt(rank) for rsLoRA.

    Example:
        >>> lora_scale(4, 8, False), lora_scale(4, 8, True)
        (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def expect_shape(target: str, role: str, shape: list[int], expected: list[int], path: str | None) -> None:
    if list(shape) != list(expected):
        raise TensorError(f"module {target!r}: {role} has shape {list(shape)}, expected {list(expected)}",
                          path=path, hint="the adapter does not match its declared base shape; re-export it")
