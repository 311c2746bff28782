"""Conversion reports: per module, was it lossless, scale-folded or lossy, and by how much."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

LOSSLESS = "lossless"  # bit-exact tensors, same scale
EXACT_MATH = "exact"  # exact in real arithmetic; fp32 rounding only (e.g. alpha rewritten)
SCALE_FOLDED = "scale_folded"  # per-module scale folded into B to fit the target's scale model
LOSSY = "lossy"  # information lost; errors measured


@dataclass
class ModuleReport:
    module: str
    status: str
    note: str = ""
    max_abs_error: float | None = None
    rel_error: float | None = None


@dataclass
class ConversionReport:
    """What a conversion did. ``lossless`` is true only when every module is bit-exact."""

    source_format: str = ""
    target_format: str = ""
    modules: list[ModuleReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, module: str, status: str, note: str = "", *, reference: torch.Tensor | None = None,
            result: torch.Tensor | None = None) -> ModuleReport:
        """Record one module; with ``reference``/``result`` ΔWs the error is measured in fp64."""
        entry = ModuleReport(module, status, note)
        if reference is not None and result is not None:
            ref, res = reference.double(), result.double()
            diff = (res - ref).abs()
            entry.max_abs_error = float(diff.max()) if diff.numel() else 0.0
            norm = float(torch.linalg.norm(ref))
            entry.rel_error = float(torch.linalg.norm(res - ref)) / norm if norm else 0.0
        self.modules.append(entry)
        return entry

    @property
    def worst(self) -> str:
        order = [LOSSLESS, EXACT_MATH, SCALE_FOLDED, LOSSY]
        return max((m.status for m in self.modules), key=order.index, default=LOSSLESS)

    @property
    def lossless(self) -> bool:
        return self.worst == LOSSLESS

    def to_dict(self) -> dict:
        data = asdict(self)
        data["overall"] = self.worst
        return data

    def lines(self, limit: int = 12) -> list[str]:
        """Human summary: overall verdict, notes, then per-module rows (grouped when uniform)."""
        out = [f"{self.source_format} -> {self.target_format}: {len(self.modules)} module(s), "
               f"overall {self.worst}"]
        out += [f"  note: {n}" for n in self.notes]
        shown = self.modules if len(self.modules) <= limit else \
            [m for m in self.modules if m.status != LOSSLESS][:limit]
        for m in shown:
            err = ""
            if m.max_abs_error is not None:
                err = f" max|err|={m.max_abs_error:.3g} rel={m.rel_error:.3g}"
            out.append(f"  {m.module}: {m.status}{err}{(' - ' + m.note) if m.note else ''}")
        hidden = len(self.modules) - len(shown)
        if hidden:
            out.append(f"  ... {hidden} more module(s) lossless (use --json for all)")
        return out
