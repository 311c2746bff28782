"""IA³ (Liu et al. 2022): a learned vector rescales the base weight's output rows or input columns.

Multiplicative: the merged weight is round(fp32(W)·l), PEFT's own single rounding, so merging needs
the base. Output-axis vectors also rescale the layer's bias in PEFT (``bias_scaled``).
"""
from __future__ import annotations

from typing import Literal


from ..errors import ManifestError, UsageError
from .descriptor import Finding, Method, Params, Role, take_rows


class IA3Params(Params):
    #: "out": W' = diag(l)·W (PEFT's default); "in": W' = W·diag(l) (PEFT ``feedforward_modules``).
    axis: Literal["out", "in"]
    #: PEFT also multiplies the bias by l on the output axis (never on the input axis).
    bias_scaled: bool


def ia3_params(axis: str, bias_scaled: bool) -> dict:
    """The params dict of an IA³ module entry.

    Example:
        >>> ia3_params("in", False)
        {'axis': 'in', 'bias_scaled': False}
    """
    return {"axis": axis, "bias_scaled": bool(bias_scaled)}


class IA3(Method):
    name = "ia3"
    summary = "learned rescaling of output rows or input columns (IA³, Liu et al. 2022); needs the base"
    params_model = IA3Params
    roles = (Role("scale", ("n",)),)
    needs_base = True
    row_separable = True
    layers = ("linear", "conv1d")
    formula = "axis out: W' = diag(l)·W; axis in: W' = W·diag(l)"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        dims = super().dims(entry, params)
        dims["n"] = dims["out"] if params.axis == "out" else dims["in"]
        return dims

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        if params.bias_scaled != (params.axis == "out"):  # spec methods-tuners.md §2
            raise ManifestError(f"module {target!r} (ia3): bias_scaled must be {params.axis == 'out'} on axis "
                                f"{params.axis!r}", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        return params

    def merged(self, entry, tensors, base, rows=None):
        # fp32(W) * l, rounded once by the engine: PEFT's torch.mul(W, l).to(dtype).
        scale = tensors["scale"].float()
        if entry.params["axis"] == "out":
            return base * take_rows(scale, rows).view(-1, 1)
        return base * scale.view(1, -1)

    unmerges_without_base = True

    def unmerged(self, entry, tensors, merged, target=""):
        # W = W' / l, refused where l has zeros (PEFT adds 1e-8 and silently returns garbage there).
        scale = tensors["scale"].float()
        zeros = int((scale == 0).sum())
        if zeros:
            raise UsageError(f"module {target!r}: IA³ scale has {zeros} zero entr{'y' if zeros == 1 else 'ies'}; "
                             "the merge cannot be undone by division", hint="pass --base BASE instead")
        return merged / (scale.view(-1, 1) if entry.params["axis"] == "out" else scale.view(1, -1))

    def invariants(self, entry, tensors):
        """Zero scales (warning: unmerge without --base refuses them) and the range of |l| (info)."""
        scale = tensors["scale"].float()
        zeros = int((scale == 0).sum())
        measured = {"min_abs_scale": float(scale.abs().min()), "max_abs_scale": float(scale.abs().max())}
        findings = [Finding("info", "ia3_scale_range", f"|scale| in [{measured['min_abs_scale']:.3g}, "
                            f"{measured['max_abs_scale']:.3g}]", measured)]
        if zeros:
            findings.append(Finding("warning", "ia3_zero_scale",
                                    f"{zeros} zero scale(s): unmerge cannot divide them out and refuses this module "
                                    "unless --base is given", {"zero_scales": float(zeros)}))
        return findings


IA3_METHOD = IA3()
