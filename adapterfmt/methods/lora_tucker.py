"""LoRA with a Tucker core on a convolution (LyCORIS LoCon ``use_tucker``): ΔW = s·(mid ×₁ Bᵀ ×₂ Aᵀ).

A separate method rather than an optional role of ``lora``: every LoRA consumer (PEFT, kohya, diffusers,
GGUF, MLX writers; resize; extract) reads ΔW as B·A, and one that did not know an optional ``lora_mid``
would drop it silently. Under its own name each of them refuses it by name until it supports it, and
``convert --method lora`` folds the core into A exactly (rank r kept).

Roles: ``lora_A`` (r, in, 1, 1) (LyCORIS ``lora_down``), ``lora_mid`` (r, r, kh, kw), ``lora_B`` (out, r, 1, 1)
(``lora_up``); kernels larger than 1×1 only (LyCORIS stores 1×1 convolutions as plain LoRA).
"""
from __future__ import annotations

import torch

from ..conversion_report import EXACT_MATH
from .descriptor import CONV2D_LAYER, Method, Role, refuse_conversion, tensor_refs
from .lora import LoraParams, lora_scale
from .tucker import LOKR_EINSUM, check_tucker, conv_dims, tucker


class LoraTucker(Method):
    name = "lora_tucker"
    summary = "LoRA with a Tucker core on a convolution (LyCORIS LoCon use_tucker)"
    params_model = LoraParams
    roles = (Role("lora_A", ("r", "in", 1, 1)), Role("lora_mid", ("r", "r", "kh", "kw")),
             Role("lora_B", ("out", "r", 1, 1)))
    #: Not row-separable: einsum over a block of rows may take another contraction path (other roundings).
    row_separable = False
    layers = (CONV2D_LAYER,)
    formula = "ΔW[o,c] = Σᵢⱼ (s·B)[o,i]·mid[i,j]·A[j,c] (kernels of mid; LyCORIS's order: B scaled first)"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        return conv_dims(entry, super().dims(entry, params))

    def check_entry(self, target, entry, path=None, *, lenient=False):
        if entry.layer == CONV2D_LAYER:
            check_tucker(self.name, target, entry, ("lora_mid",), path)
        return super().check_entry(target, entry, path, lenient=lenient)

    def expected_scale(self, params):
        return lora_scale(params.rank, params.alpha, params.use_rslora)

    def delta(self, entry, tensors, base=None, rows=None):
        # lycoris.functional.locon: up·γ first, then the Tucker product with down (same einsum order).
        up = tensors["lora_B"].float().mul(float(entry.params["scale"]))
        up = up.reshape(up.shape[0], -1).t()
        down = tensors["lora_A"].float().reshape(tensors["lora_A"].shape[0], -1)
        return tucker(tensors["lora_mid"].float(), up, down, LOKR_EINSUM)

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Plain conv LoRA of the same rank: the core folded into A (A′ = mid ×₂ Aᵀ, a k×k conv), B kept."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        down = tensors["lora_A"].double().reshape(tensors["lora_A"].shape[0], -1)
        folded = torch.einsum("ijyx,jc->icyx", tensors["lora_mid"].double(), down)
        # fp64 product, one rounding to fp32 (a half-precision A would add a coarse second rounding).
        new = {"lora_A": folded.to(torch.float32).contiguous(), "lora_B": tensors["lora_B"]}
        new_entry = entry.replace(method="lora", tensors=tensor_refs(target, new))
        return new_entry, new, EXACT_MATH, "Tucker core folded into lora_A (rank kept)"


LORA_TUCKER = LoraTucker()
