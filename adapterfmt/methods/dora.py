"""DoRA: V = W + s·B·A, W' = V rescaled so that its norms along one axis equal the magnitude m.

``magnitude_axis`` says which axis m lives on, and the two are different adapters, never converted
into each other (the conversion is semantic and needs the base):

- ``out`` (PEFT, diffusers, MLX-LM, LyCORIS ``wd_on_out=True``): m ∈ ℝ^out, the norm of each output
  row (each output channel over (in, kh, kw) for a conv2d layer); W' = diag(m / ‖V‖_row)·V.
- ``in`` (kohya/LyCORIS ``dora_scale`` with ``wd_on_out=False``, what ComfyUI assumes): m ∈ ℝ^in, the
  norm of each input column (each input channel over (out, kh, kw) for a conv2d layer);
  W' = V·diag(m / ‖V‖_col).

``norm_eps`` is added to every norm before the division: 0 for PEFT (the default, and the value of
files without the field); LyCORIS adds fp32's machine epsilon (2⁻²³).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import UsageError
from .descriptor import CONV2D_LAYER, Method, Role, take_rows
from .lora import LoRA, LoraParams

#: magnitude axis -> (the magnitude role, the axis of V the norm keeps)
AXES = {"out": (Role("magnitude", ("out",)), 0), "in": (Role("magnitude", ("in",)), 1)}


class DoraParams(LoraParams):
    magnitude_axis: Literal["out", "in"]
    norm_eps: float = Field(default=0.0, ge=0.0)


class DoRA(LoRA):
    name = "dora"
    summary = "weight-decomposed LoRA (Liu et al. 2024); needs the base to merge"
    params_model = DoraParams
    roles = LoRA.roles + (Role("magnitude", ("out",)),)
    needs_base = True
    # PEFT has no DoRA for stacked experts (ParamWrapper refuses use_dora); Conv2d it has.
    layers = Method.layers + (CONV2D_LAYER,)
    formula = ("V = W + (B·A)·scale; axis out: W' = diag(m / (‖V‖_row + eps))·V; "
               "axis in: W' = V·diag(m / (‖V‖_col + eps)) (conv2d: norms over the other axes and the kernel)")

    def roles_for(self, entry):
        magnitude = AXES.get(str(entry.params.get("magnitude_axis")), AXES["out"])[0]
        return tuple(r for r in super().roles_for(entry) if r.name != "magnitude") + (magnitude,)

    def separable_rows(self, entry):
        # Column norms (axis in) need every row of V at once.
        return entry.params.get("magnitude_axis") != "in"

    def merged(self, entry, tensors, base, rows=None):
        axis = entry.params["magnitude_axis"]
        if axis == "in" and rows is not None:
            raise UsageError("an input-axis DoRA module merges whole tensors, not row blocks",
                             hint="this is a bug in the caller: ask separable_rows() first")
        combined = base + super().delta(entry, tensors, rows=rows)
        return dora_rescale(combined, take_rows(tensors["magnitude"], rows if axis == "out" else None),
                            axis, float(entry.params.get("norm_eps", 0.0)))

    # ΔW = merged − base (the descriptor's default for base-dependent methods), not LoRA's s·B·A.
    delta = Method.delta


def require_peft_axis(target: str, entry, consumer: str) -> None:
    """Refuse a DoRA module that is not PEFT's (magnitude per output row, no eps) for ``consumer``.

    Example:
        >>> require_peft_axis("m", entry, "PEFT")  # doctest: +SKIP
    """
    if entry.method != "dora":
        return
    axis, eps = entry.params.get("magnitude_axis"), float(entry.params.get("norm_eps", 0.0))
    if axis != "out" or eps:
        raise UsageError(f"module {target!r}: DoRA with magnitude_axis {axis!r} and norm_eps {eps!r} (kohya/LyCORIS "
                         f"dora_scale) is not {consumer}'s DoRA (magnitude per output row, no eps); converting it "
                         "is not exact", hint="merge it (adapterfmt merge), or keep the adapterfmt or kohya file")


def dora_rescale(combined: torch.Tensor, magnitude: torch.Tensor, axis: str, eps: float = 0.0) -> torch.Tensor:
    """V rescaled to the magnitude along ``axis`` (fp32; PEFT's order: m / n first, then times V).

    Example:
        >>> dora_rescale(torch.tensor([[3.0, 4.0]]), torch.tensor([10.0]), "out")
        tensor([[6., 8.]])
    """
    keep = AXES[axis][1]
    if keep == 0:
        norm = torch.linalg.vector_norm(combined, dim=tuple(range(1, combined.dim())))
    else:  # LyCORIS's order: each input channel's (out, kh, kw) values as one contiguous row
        norm = torch.linalg.vector_norm(combined.transpose(0, 1).reshape(combined.shape[1], -1), dim=1)
    if eps:
        norm = norm + eps
    shape = [1] * combined.dim()
    shape[keep] = -1
    return (magnitude.float() / norm).view(shape) * combined


DORA = DoRA()
