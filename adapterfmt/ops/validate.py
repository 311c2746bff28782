"""Validation: structure, schema, tensors vs manifest, finite values, ΔW for every module, base match."""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import BaseCheckpoint
from ..engine.base import bind_base, canonical_base, stored_name
from ..errors import AdapterFmtError
from ..format.container import nonfinite_tensors
from ..methods import get_method
from .load import load_adapter, load_base


@dataclass
class ValidationResult:
    """Outcome of :func:`validate`. ``problems`` empty means valid."""

    path: str
    problems: list[str] = field(default_factory=list)
    checked_modules: int = 0
    base_checked: bool = False
    measurements: dict[str, dict[str, float]] = field(default_factory=dict)
    exit_code: int = 0
    #: Findings that do not make the file invalid (e.g. IA³ zero scales: unmerge without --base will refuse).
    warnings: list[str] = field(default_factory=list)
    #: Every method invariant finding: {module, severity, code, message, measured}.
    findings: list[dict] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "valid": self.valid, "problems": self.problems,
                "checked_modules": self.checked_modules, "base_checked": self.base_checked,
                "measurements": self.measurements, "warnings": self.warnings, "findings": self.findings}

    def add_findings(self, path, target: str, findings) -> bool:
        """Record a module's invariant findings; True when one of them is an error."""
        for finding in findings:
            line = f"{path}: module {target!r}: {finding.message}"
            {"error": self.problems, "warning": self.warnings}.get(finding.severity, []).append(line)
            if finding.measured:
                self.measurements.setdefault(target, {}).update(finding.measured)
            self.findings.append({"module": target, "severity": finding.severity, "code": finding.code,
                                  "message": finding.message, "measured": finding.measured})
        return any(f.severity == "error" for f in findings)


def validate(path: Path | str, base: Path | str | BaseCheckpoint | None = None) -> ValidationResult:
    """Validate an adapterfmt file, optionally against a base model directory.

    Example:
        >>> result = validate("adapter.safetensors", base="tiny-llama")  # doctest: +SKIP
        >>> result.valid  # doctest: +SKIP
        True
    """
    result = ValidationResult(str(path))
    try:
        adapter = load_adapter(path)
        checkpoint = load_base(base)
        if checkpoint is not None:
            bind_base(adapter, checkpoint, str(path), check_only=True)
            result.base_checked = True
    except AdapterFmtError as exc:
        result.problems.append(exc.one_line())
        result.exit_code = exc.exit_code
        return result
    bad_tensors = nonfinite_tensors(adapter)
    for name, count in bad_tensors.items():
        result.problems.append(f"{path}: tensor {name!r} has {count} NaN/Inf value(s); the adapter is "
                               "corrupt or training diverged")
    manifest = adapter.manifest
    for target, entry in manifest.modules.items():
        method = get_method(entry.method)
        tensors = adapter.module_tensors(target)
        if result.add_findings(path, target, method.invariants(entry, tensors)):
            result.checked_modules += 1
            continue  # the invariant error is the cause; computing ΔW would only repeat it
        weight = None
        if checkpoint is not None:
            weight = canonical_base(entry, checkpoint.get(stored_name(entry, checkpoint)))
        elif method.needs_base:
            # Without a base, a DoRA ΔW can still be checked for finiteness on a stand-in base
            # (any number of axes: a conv2d weight is the (out, in·kh·kw) identity, reshaped).
            weight = torch.eye(entry.shape[0], math.prod(entry.shape[1:])).reshape(entry.shape)
        try:
            delta = method.delta(entry, tensors, weight)
        except (RuntimeError, ValueError, AdapterFmtError) as exc:
            result.problems.append(f"{path}: module {target!r}: ΔW cannot be computed ({exc}); "
                                   "the adapter is damaged, re-export it")
            continue
        if list(delta.shape) != list(entry.shape):
            result.problems.append(f"{path}: module {target!r}: ΔW has shape {list(delta.shape)}, "
                                   f"manifest says {entry.shape}")
        elif not bool(torch.isfinite(delta).all()) and not any(
                ref.name in bad_tensors for ref in entry.tensors.values()):
            # A NaN/Inf tensor was already reported; one cause, one line.
            result.problems.append(f"{path}: module {target!r}: ΔW has NaN/Inf values; the adapter is "
                                   "corrupt or training diverged")
        problems, measures = method.validate_module(target, entry, tensors, weight)
        result.problems += [f"{path}: module {target!r}: {p}" for p in problems]
        if measures:
            result.measurements[target] = measures
        result.checked_modules += 1
    if result.problems:
        result.exit_code = 1
    return result


def format_validation(result: ValidationResult) -> list[tuple[str, bool]]:
    """(line, to stderr) pairs for people: the verdict or the problems, then warnings and measured invariants.

    Example:
        >>> format_validation(ValidationResult("a.safetensors", checked_modules=2))
        [('a.safetensors: valid (2 module(s))', False)]
    """
    if result.valid:
        lines = [(f"{result.path}: valid ({result.checked_modules} module(s)"
                  f"{', base checked' if result.base_checked else ''})", False)]
    else:
        prefix = "invalid" if result.exit_code == 1 else "error"  # 2: the input could not be read
        lines = [(f"{prefix}: {problem}", True) for problem in result.problems]
    lines += [(f"warning: {w}", True) for w in result.warnings]
    for finding in result.findings:
        if finding["severity"] == "info":
            lines.append((f"  {finding['module']}: {finding['message']}", False))
    return lines
