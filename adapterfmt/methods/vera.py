"""VeRA (Kopiczko et al. 2024): two trained vectors scale shared random projections.

ΔW = (λ_b[:, None]·B_m) @ (λ_d[:, None]·A_m), with A_m = A[:, :in] and B_m = B[:out, :] slices of
one model-wide pair A (r × max_in), B (max_out × r). The pair is not stored: it is regenerated from
the seed by the torch CPU generator (spec/torch-cpu-generator.md), so a VeRA file holds only the
vectors. Where an imported pair matches no variant of that generator, the module's slices are kept
as the optional roles ``proj_A``/``proj_B`` and used instead.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..conversion_report import EXACT_MATH
from ..errors import ManifestError
from .descriptor import Method, Params, Role, refuse_conversion, tensor_refs
from .lora import lora_params
from .torch_cpu_rng_peft import FLOAT_AFFINE, vera_projections


#: The generator keys of spec/torch-cpu-generator.md §8.
GENERATOR = {"generator": "torch-cpu-mt19937", "generator_version": 1}


class VeraParams(Params):
    #: The generator that regenerates what is not stored (spec/torch-cpu-generator.md §8).
    generator: Literal["torch-cpu-mt19937"]
    generator_version: Literal[1]
    rank: int = Field(ge=1)
    #: PEFT's ``projection_prng_key`` as a decimal string (seeds are written as strings, like NOLA's).
    seed: str = Field(pattern=r"^(0|[1-9][0-9]{0,19})$")
    #: The generator's uniform_ variant (spec/torch-cpu-generator.md §3) that reproduces the projections.
    float_affine: Literal["fused", "unfused"]
    #: Width of the shared A and height of the shared B: the largest in/out over the whole model.
    max_in: int = Field(ge=1)
    max_out: int = Field(ge=1)


def vera_params(rank: int, seed: int, float_affine: str, max_in: int, max_out: int) -> dict:
    """The params dict of a VeRA module entry.

    Example:
        >>> vera_params(4, 0, "fused", 64, 96)["seed"]
        '0'
    """
    return {**GENERATOR, "rank": int(rank), "seed": str(int(seed)), "float_affine": float_affine,
            "max_in": int(max_in), "max_out": int(max_out)}


@lru_cache(maxsize=8)
def shared_projections(seed: int, rank: int, max_in: int, max_out: int, float_affine: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-wide (A, B), fp32, regenerated once per distinct parameter set (cached).

    Example:
        >>> a, b = shared_projections(0, 2, 8, 6, "fused")
        >>> tuple(a.shape), tuple(b.shape)
        ((2, 8), (6, 2))
    """
    a, b = vera_projections(seed, rank, max_in, max_out, fma=FLOAT_AFFINE[float_affine])
    return torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))


def module_projections(entry, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_m, B_m) of one module, canonical: stored slices if present, else regenerated and sliced."""
    out_f, in_f = entry.shape
    if "proj_A" in tensors and "proj_B" in tensors:
        return tensors["proj_A"].float(), tensors["proj_B"].float()
    p = entry.params
    a, b = shared_projections(int(p["seed"]), p["rank"], p["max_in"], p["max_out"], p["float_affine"])
    return a[:, :in_f], b[:out_f, :]


class Vera(Method):
    name = "vera"
    summary = "trained vectors scaling seeded shared random projections (VeRA, Kopiczko et al. 2024)"
    params_model = VeraParams
    roles = (Role("lambda_d", ("r",)), Role("lambda_b", ("out",)),
             Role("proj_A", ("r", "in"), required=False, trained=False),
             Role("proj_B", ("out", "r"), required=False, trained=False))
    # Not row-separable: a row block of the product (λ_b ⊙ B_m)·(λ_d ⊙ A_m) may take another BLAS path than
    # the whole product and differ in the last bit, and PEFT computes the whole product.
    row_separable = False
    layers = ("linear", "conv1d")
    formula = "ΔW = (λ_b·B[:out, :]) @ (λ_d·A[:, :in]); A, B regenerated from seed"
    spec_file = "methods-tuners.md"

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        out_f, in_f = entry.shape
        if in_f > params.max_in or out_f > params.max_out:
            raise ManifestError(f"module {target!r}: shape {entry.shape} exceeds the shared projections "
                                f"(max_out {params.max_out}, max_in {params.max_in})", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        if int(params.seed) >= 2**64:  # spec torch-cpu-generator.md §1: the stored seed is a u64
            raise ManifestError(f"module {target!r}: seed {params.seed} is not below 2^64", path=path,
                                hint="the manifest is damaged; re-export the adapter")
        if ("proj_A" in entry.tensors) != ("proj_B" in entry.tensors):
            raise ManifestError(f"module {target!r}: proj_A and proj_B must be stored together", path=path,
                                hint="the manifest is damaged; re-export the adapter")
        return params

    def delta(self, entry, tensors, base=None, rows=None):
        # PEFT's order: (λ_b ⊙ B_m) @ (λ_d ⊙ A_m), fp32, no scale factor.
        proj_a, proj_b = module_projections(entry, tensors)
        left = tensors["lambda_b"].float().unsqueeze(-1) * proj_b
        right = tensors["lambda_d"].float().unsqueeze(-1) * proj_a
        return left @ right

    converts_to = ("lora",)

    def convert_to(self, target, entry, tensors, to, options):
        """Exact rank-r LoRA: B' = λ_b·B_m, A' = λ_d·A_m, scale 1 (the same fp32 products as PEFT's ΔW)."""
        if to != "lora":
            raise refuse_conversion(self, target, to)
        proj_a, proj_b = module_projections(entry, tensors)
        new = {"lora_A": (tensors["lambda_d"].float().unsqueeze(-1) * proj_a).contiguous(),
               "lora_B": (tensors["lambda_b"].float().unsqueeze(-1) * proj_b).contiguous()}
        rank = entry.params["rank"]
        entry2 = entry.replace(method="lora", params=lora_params(rank, float(rank), False),
                               tensors=tensor_refs(target, new))
        return entry2, new, EXACT_MATH, f"vera -> rank-{rank} LoRA (projections folded into the factors)"

    def example_tensors(self, entry, generator, dtype=torch.float32):
        dims = self.dims(entry, self.params(entry))
        return {"lambda_d": torch.randn(dims["r"], generator=generator).to(dtype),
                "lambda_b": torch.randn(dims["out"], generator=generator).to(dtype)}


VERA_METHOD = Vera()
