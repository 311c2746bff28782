"""What the demo prints: numbered one-line steps, and the numbers each step measured."""
from __future__ import annotations

import torch

from .check_model import IGNORED, MISSCALED, OK, REFUSE

#: A check verdict in the demo's words (what the consumer does with the file as is).
AS_IS = {OK: "our ΔW", MISSCALED: "mis-scaled", IGNORED: "ignores part", REFUSE: "refuses it"}


class Steps:
    """Numbers the demo's lines: ``steps("what", "result")`` -> `` 3. what: result``.

    Example:
        >>> steps = Steps()
        >>> steps("validate a.safetensors", "valid")
        ' 1. validate a.safetensors: valid'
    """

    def __init__(self):
        self.count = 0

    def __call__(self, what: str, result: str) -> str:
        self.count += 1
        return f"{self.count:>2}. {what}: {result}"


def max_error(*reports) -> float:
    """The largest per-module max |ΔW error| the conversion reports measured (0 when none was measured).

    Example:
        >>> max_error()
        0.0
    """
    errors = [m.max_abs_error for r in reports for m in r.modules if m.max_abs_error is not None]
    return max(errors, default=0.0)


def max_rel_error(*reports) -> float:
    """The largest per-module relative ΔW error (Frobenius norm) the reports measured."""
    errors = [m.rel_error for r in reports for m in r.modules if m.rel_error is not None]
    return max(errors, default=0.0)


def merge_error(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(max |got - exact|, the same in ulps of ``got``'s dtype at the tensor's largest |exact|).

    ``exact`` is the merged weight computed in float64. The unit is the spacing at the tensor's largest
    element because a merge in fp32 rounds ΔW's own sums and products at the size of their terms: an
    element where they cancel is off by more than its own ulp however carefully the merge rounds.

    Example:
        >>> merge_error(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5], dtype=torch.float64))
        (0.0, 0.0)
    """
    if not got.numel():
        return 0.0, 0.0
    largest = exact.abs().max().to(got.dtype)
    spacing = float(torch.nextafter(largest, torch.tensor(float("inf"), dtype=got.dtype)) - largest)
    worst = float((got.double() - exact).abs().max())
    return worst, worst / spacing


def worst_merge_error(errors: list[tuple[float, float]]) -> str:
    """``max |Δ| 3.7e-09 = 0.5 ulp``: the worst of several :func:`merge_error` results, short."""
    absolute = max((a for a, _ in errors), default=0.0)
    relative = max((u for _, u in errors), default=0.0)
    return f"max |Δ| {describe_error(absolute)} = {relative:.2g} ulp"


def describe_error(value: float) -> str:
    """``0`` or ``1.2e-08``: a measured error, short."""
    return "0" if value == 0 else f"{value:.2g}"


def verdicts(report) -> str:
    """``vllm mis-scaled, llama.cpp our ΔW``: what each target of a check report does with the file as is."""
    return ", ".join(f"{t.target} {AS_IS[t.severity]}" for t in report.targets)
