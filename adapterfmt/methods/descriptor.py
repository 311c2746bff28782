"""The method descriptor: what a method stores, how its tensors relate, and what ΔW is.

A method is one declarative class: its roles with symbolic shapes (``lora_A: ("r", "in")``),
the allowed dtypes per role, a typed params model, its scale rule, whether it needs the base,
and ``delta``/``merged``. Shape, dtype and scale checks, the manifest schema's per-method part,
the spec's method table and the tests' example builders are all derived from these fields.

Methods work on tensors in canonical orientation, ``(out, in)`` like ``nn.Linear.weight``, in
fp32; orientation, rounding, devices and streaming are the engine's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ManifestError, TensorError, UsageError
from ..format.dtypes import FLOAT_DTYPES
from ..format.manifest import ModuleEntry, TensorRef

#: The one tolerance of every scale rule: |stored − rule(params)| ≤ SCALE_RTOL·|rule(params)|.
SCALE_RTOL = 1e-12

Dim = str | int
#: The layer kind of a stacked 3-D parameter (MoE experts, PEFT ``target_parameters``): shape (experts, out, in).
STACKED_LAYER = "experts"
#: A 2-D convolution (nn.Conv2d): the module shape is the weight as stored, (out, in, kh, kw).
CONV2D_LAYER = "conv2d"
#: Number of axes of a module's ``shape`` per layer kind; every other layer is (out, in).
LAYER_SHAPES = {STACKED_LAYER: ("experts, out, in", 3), CONV2D_LAYER: ("out, in, kh, kw", 4)}


@dataclass(frozen=True)
class Finding:
    """One result of a method's own invariant check (``Method.invariants``), reported by ``validate``.

    ``severity`` is ``error`` (the file is invalid), ``warning`` (valid, but an operation will refuse or
    the values are suspicious) or ``info`` (a measurement only); ``measured`` holds the numbers.

    Example:
        >>> Finding("warning", "ia3_zero_scale", "2 zero scale(s)", {"zero_scales": 2.0}).severity
        'warning'
    """

    severity: str
    code: str
    message: str
    measured: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Role:
    """One tensor a method stores: its role name, symbolic shape and allowed dtypes.

    Symbols are resolved per module by :meth:`Method.dims` (``out``, ``in``, ``r`` and any
    method-specific ones); integers are literal sizes.

    Example:
        >>> Role("lora_A", ("r", "in")).shape
        ('r', 'in')
    """

    name: str
    shape: tuple[Dim, ...]
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    required: bool = True
    #: Counted by ``parameter_count`` (trained or stored-by-the-method scalars); frozen init state is not.
    trained: bool = True


class Params(BaseModel):
    """Base of every method's typed params: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Method:
    """Base class of a method descriptor. Subclasses set the class fields and implement ``delta``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params_model: ClassVar[type[Params]] = Params
    roles: ClassVar[tuple[Role, ...]] = ()
    #: ΔW depends on the base weight itself (DoRA, multiplicative methods): merging needs the base.
    needs_base: ClassVar[bool] = False
    #: ``delta``/``merged`` accept ``rows`` (a slice of output rows), so large tensors merge in blocks.
    row_separable: ClassVar[bool] = False
    #: Layer kinds the method is defined for.
    layers: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "embedding")
    #: ΔW formula as the spec's method table shows it, and the spec file that defines the method.
    formula: ClassVar[str] = ""
    spec_file: ClassVar[str] = "this file"

    # ---------------------------------------------------------------- declarative hooks
    def dims(self, entry: ModuleEntry, params: Params) -> dict[str, int]:
        """Values of the roles' shape symbols for one module. Default: out, in and r = params.rank."""
        dims = {"out": entry.shape[0], "in": entry.shape[1]}
        rank = getattr(params, "rank", None)
        if rank is not None:
            dims["r"] = rank
        return dims

    def roles_for(self, entry: ModuleEntry) -> tuple[Role, ...]:
        """The roles (with shapes) of one module; default ``roles``. Stacked layers (experts) override it."""
        return self.roles

    def separable_rows(self, entry: ModuleEntry) -> bool:
        """Whether this module merges in row blocks; default ``row_separable`` (DoRA's input axis: no)."""
        return self.row_separable

    def expected_scale(self, params: Params) -> float | None:
        """The scale the params imply (checked against ``params.scale``), or None for no rule."""
        return None

    def delta(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor],
              base: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
        """ΔW in canonical (out, in) orientation, fp32; ``base`` is the canonical fp32 base weight.

        With ``rows`` (only when ``row_separable``) just those rows, and ``base`` holds just those rows.
        The default, for methods defined by their merged weight (``needs_base``), is merged − base.
        """
        if not self.needs_base:
            raise NotImplementedError
        if base is None:
            raise UsageError(f"{self.name}'s ΔW depends on the base weight", hint="pass the base model (--base)")
        return self.merged(entry, tensors, base, rows) - base

    def merged(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor], base: torch.Tensor,
               rows: slice | None = None) -> torch.Tensor:
        """The merged weight in fp32, canonical orientation. Default: base + ΔW."""
        return base + self.delta(entry, tensors, base, rows)

    #: A method that needs the base to merge but can undo its own merge from the merged weight alone
    #: (multiplicative methods: IA³ divides, OFT/BOFT rotate back) implements ``unmerged``.
    unmerges_without_base: ClassVar[bool] = False

    def unmerged(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor], merged: torch.Tensor,
                 target: str = "") -> torch.Tensor:
        """The base weight recovered from the merged one (fp32, canonical), for ``unmerges_without_base``."""
        raise NotImplementedError

    #: The method changes the stored parameter itself, so every tied use of it sees the change (PEFT ties
    #: trainable tokens of the input embedding to the output head); the merge then keeps the tie.
    changes_tied_uses: ClassVar[bool] = False

    #: A method that needs the base to merge and whose merge the base restores exactly (replaced rows)
    #: implements ``unmerged_with_base``; the unmerge engine uses it when ``--base`` is given.
    restores_from_base: ClassVar[bool] = False

    def unmerged_with_base(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor], merged: torch.Tensor,
                           base: torch.Tensor) -> torch.Tensor:
        """The base weight recovered from the merged one and the original (fp32, canonical)."""
        raise NotImplementedError

    def validate_module(self, target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor],
                        base: torch.Tensor | None) -> tuple[list[str], dict[str, float]]:
        """Method-specific checks against the base: (problems, measurements). Default: none."""
        return [], {}

    def invariants(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor]) -> list[Finding]:
        """The method's own invariants on the stored values (no base needed), as findings for ``validate``.

        Example:
            >>> IA3_METHOD.invariants(entry, {"scale": torch.zeros(4)})[0].code  # doctest: +SKIP
            'ia3_zero_scale'
        """
        return []

    #: Typed options of the conversions into this method (the CLI generates their flags), or None.
    convert_options: ClassVar[type[Params] | None] = None
    #: Methods this one converts to (``convert_to``), and from (``convert_from``).
    converts_to: ClassVar[tuple[str, ...]] = ()
    converts_from: ClassVar[tuple[str, ...]] = ()

    def convert_to(self, target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor], to: str,
                   options: dict) -> tuple[ModuleEntry, dict[str, torch.Tensor], str, str]:
        """Convert one module to method ``to``: (entry, tensors by role, report status, note)."""
        raise NotImplementedError

    def convert_from(self, target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor],
                     options: dict) -> tuple[ModuleEntry, dict[str, torch.Tensor], str, str]:
        """Build this method's module from another method's (see ``converts_from``)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- derived behaviour
    def params(self, entry: ModuleEntry, *, path: str | None = None, target: str = "",
               lenient: bool = False) -> Params:
        """The entry's params as the typed model; a clear ManifestError when they do not fit.

        ``lenient`` (a file of a newer minor version): unknown optional fields are ignored (spec §3).

        Example:
            >>> LORA.params(entry).rank  # doctest: +SKIP
            16
        """
        given = entry.params
        if lenient and isinstance(given, dict):
            given = {k: v for k, v in given.items() if k in self.params_model.model_fields}
        try:
            return self.params_model.model_validate(given)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "params"
            raise ManifestError(f"module {target!r} ({self.name}): params.{where}: {first['msg']}", path=path,
                                hint="the manifest is damaged or hand-edited; re-export the adapter") from None

    def check_entry(self, target: str, entry: ModuleEntry, path: str | None = None, *,
                    lenient: bool = False) -> Params:
        """Check params, roles, dtypes, shapes and the scale rule of one module (no tensor data read)."""
        params = self.params(entry, path=path, target=target, lenient=lenient)
        if entry.layer not in self.layers:
            raise ManifestError(f"module {target!r}: {self.name} is not defined for {entry.layer} layers",
                                path=path, hint="the manifest is inconsistent; re-export the adapter")
        axes, ndim = LAYER_SHAPES.get(entry.layer, ("out, in", 2))
        if len(entry.shape) != ndim:
            raise ManifestError(f"module {target!r}: {entry.layer} layer with shape {entry.shape} (the shape of "
                                f"{entry.layer} layers is ({axes}))", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        self._check_roles(target, entry, path)
        dims = self.dims(entry, params)
        for role in self.roles_for(entry):
            ref = entry.tensors.get(role.name)
            if ref is not None:
                self._check_ref(target, role, ref, dims, path)
        self._check_scale(target, params, path)
        return params

    def _check_roles(self, target: str, entry: ModuleEntry, path: str | None) -> None:
        known = {r.name for r in self.roles}
        missing = [r.name for r in self.roles if r.required and r.name not in entry.tensors]
        unknown = sorted(set(entry.tensors) - known)
        if missing or unknown:
            what = f"lacks tensor role(s) {missing}" if missing else f"has unknown tensor role(s) {unknown}"
            raise ManifestError(f"module {target!r} ({self.name}) {what}", path=path,
                                hint="the manifest is damaged; re-export the adapter")

    @staticmethod
    def _check_ref(target: str, role: Role, ref: TensorRef, dims: dict[str, int], path: str | None) -> None:
        if ref.dtype not in role.dtypes:
            raise TensorError(f"module {target!r}: {role.name} is {ref.dtype}; allowed: {', '.join(role.dtypes)}",
                              path=path, hint="re-export the adapter with floating-point factors")
        expected = [dims[d] if isinstance(d, str) else d for d in role.shape]
        if list(ref.shape) != expected:
            raise TensorError(f"module {target!r}: {role.name} has shape {list(ref.shape)}, expected {expected}",
                              path=path, hint="the adapter does not match its declared base shape; re-export it")

    def _check_scale(self, target: str, params: Params, path: str | None) -> None:
        expected = self.expected_scale(params)
        if expected is None:
            return
        stored = params.scale  # type: ignore[attr-defined]
        if not math.isfinite(stored) or abs(stored - expected) > SCALE_RTOL * abs(expected):
            raise ManifestError(f"module {target!r}: scale {stored!r} disagrees with the params (= {expected!r})",
                                path=path, hint="the manifest is inconsistent; re-export the adapter")

    def parameter_count(self, entry: ModuleEntry) -> int:
        """Scalars the method stores for this module (trained roles only)."""
        return sum(math.prod(entry.tensors[r.name].shape) for r in self.roles
                   if r.trained and r.name in entry.tensors)

    def example_tensors(self, entry: ModuleEntry, generator: torch.Generator,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Random tensors of the right shapes for every role (test builders and the demo).

        Example:
            >>> LORA.example_tensors(entry, torch.Generator().manual_seed(0))  # doctest: +SKIP
        """
        dims = self.dims(entry, self.params(entry))
        return {role.name: torch.randn([dims[d] if isinstance(d, str) else d for d in role.shape],
                                       generator=generator).to(dtype)
                for role in self.roles_for(entry) if role.required}


def take_rows(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """``tensor[rows]`` (all rows when ``rows`` is None).

    Example:
        >>> take_rows(torch.zeros(4, 2), slice(1, 3)).shape
        torch.Size([2, 2])
    """
    return tensor if rows is None else tensor[rows]


def tensor_refs(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    """TensorRefs for role -> tensor, named ``prefix.role`` in the container.

    Example:
        >>> tensor_refs("m", {"lora_A": torch.zeros(2, 3)})["lora_A"].name
        'm.lora_A'
    """
    from ..format.dtypes import dtype_name
    return {role: TensorRef(f"{prefix}.{role}", dtype_name(t.dtype), list(t.shape)) for role, t in tensors.items()}


def refuse_conversion(method: Method, target: str, to: str) -> UsageError:
    """The error for a conversion the method does not offer."""
    return UsageError(f"module {target!r}: no conversion from {method.name} to {to}",
                      hint=f"supported targets from {method.name}: {', '.join(method.converts_to) or 'none'}")


def dump(params: Params) -> dict[str, Any]:
    """Params as the manifest stores them (JSON-ready dict, fields in declaration order)."""
    return params.model_dump()
