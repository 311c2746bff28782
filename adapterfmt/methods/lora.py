"""LoRA and rsLoRA: ΔW = s·B·A with s = alpha/r (alpha/√r for rsLoRA), per module."""
from __future__ import annotations

import math

import torch
from pydantic import Field

from .descriptor import CONV2D_LAYER, STACKED_LAYER, Method, Params, Role, take_rows


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: alpha/rank, or alpha/sqrt(rank) for rsLoRA.

    Example:
        >>> lora_scale(4, 8, False), lora_scale(4, 8, True)
        (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraParams(Params):
    rank: int = Field(ge=1)
    alpha: float
    use_rslora: bool
    scale: float


def lora_params(rank: int, alpha: float, use_rslora: bool) -> dict:
    """The params dict of a LoRA module entry.

    Example:
        >>> lora_params(4, 8, False)
        {'rank': 4, 'alpha': 8.0, 'use_rslora': False, 'scale': 2.0}
    """
    return {"rank": int(rank), "alpha": float(alpha), "use_rslora": bool(use_rslora),
            "scale": lora_scale(int(rank), float(alpha), bool(use_rslora))}


class LoRA(Method):
    name = "lora"
    summary = "low-rank update s·B·A (Hu et al. 2021); rsLoRA when use_rslora"
    params_model = LoraParams
    roles = (Role("lora_A", ("r", "in")), Role("lora_B", ("out", "r")))
    #: Stacked experts (PEFT ``target_parameters`` on a 3-D parameter): one (A, B) pair per expert,
    #: ΔW[e] = s·B[e]·A[e]. PEFT keeps them as one (E·r, in) A and one (out, r·E) B; the reader reorders.
    expert_roles = (Role("lora_A", ("experts", "r", "in")), Role("lora_B", ("experts", "out", "r")))
    #: Conv2d (PEFT's layout): A is a (r, in, kh, kw) convolution, B a 1×1 convolution (out, r, 1, 1).
    conv2d_roles = (Role("lora_A", ("r", "in", "kh", "kw")), Role("lora_B", ("out", "r", 1, 1)))
    layers = Method.layers + (STACKED_LAYER, CONV2D_LAYER)
    row_separable = True
    formula = "ΔW = (B·A)·scale (per expert for stacked experts; conv2d: B applied as a 1×1 conv to A)"

    def roles_for(self, entry):
        return {STACKED_LAYER: self.expert_roles, CONV2D_LAYER: self.conv2d_roles}.get(entry.layer, self.roles)

    def dims(self, entry, params):
        if entry.layer == CONV2D_LAYER:
            out_f, in_f, kh, kw = entry.shape
            return {"out": out_f, "in": in_f, "kh": kh, "kw": kw, "r": params.rank}
        if entry.layer != STACKED_LAYER:
            return super().dims(entry, params)
        experts, out_f, in_f = entry.shape
        return {"experts": experts, "out": out_f, "in": in_f, "r": params.rank}

    def expected_scale(self, params):
        return lora_scale(params.rank, params.alpha, params.use_rslora)

    def delta(self, entry, tensors, base=None, rows=None):
        # (B @ A) * s in fp32, the same operation order as PEFT's get_delta_weight, so that
        # merging is bit-identical to PEFT's merge_and_unload.
        # mul_ on the fresh product is the same rounding as `* s` without a second full-size buffer.
        # For experts (3-D factors) `@` is the batched product per expert, as PEFT's einsum.
        b = take_rows(tensors["lora_B"], rows).float()
        if entry.layer == CONV2D_LAYER:
            return conv2d_delta(tensors["lora_A"].float(), b, float(entry.params["scale"]))
        return (b @ tensors["lora_A"].float()).mul_(float(entry.params["scale"]))


def conv2d_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW (out, in, kh, kw) of a Conv2d LoRA, with PEFT's operations (so merges are bit-identical).

    1×1 kernels: the matrix product of the squeezed factors. k×k kernels: A's input channels are taken
    as a batch and B is applied to them as a 1×1 convolution (the order PEFT uses), then swapped back.
    Groups are not part of the format (PEFT's grouped-conv LoRA has other shapes, refused on import).

    Example:
        >>> conv2d_delta(torch.ones(2, 3, 1, 1), torch.ones(4, 2, 1, 1), 0.5).shape
        torch.Size([4, 3, 1, 1])
    """
    if a.shape[2:] == (1, 1):
        return (b[:, :, 0, 0] @ a[:, :, 0, 0])[:, :, None, None].mul_(scale)
    return torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1).mul_(scale)


LORA = LoRA()
