"""FourierFT (Gao et al., ICML 2024): ΔW is the real part of the inverse 2-D DFT of a sparse spectrum.

The file stores the n trained spectral coefficients per module; their (row, column) positions are
regenerated from the seed (PEFT's ``random_loc_seed``) by the torch CPU generator's randperm
(spec/torch-cpu-generator.md), so no index tensor is stored.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field

from ..errors import ManifestError
from .descriptor import Method, Params, Role
from .torch_cpu_rng_peft import fourierft_indices


#: The generator keys of spec/torch-cpu-generator.md §8.
GENERATOR = {"generator": "torch-cpu-mt19937", "generator_version": 1}


class FourierFTParams(Params):
    #: The generator that regenerates what is not stored (spec/torch-cpu-generator.md §8).
    generator: Literal["torch-cpu-mt19937"]
    generator_version: Literal[1]
    #: PEFT's ``random_loc_seed`` as a decimal string (seeds are written as strings, like NOLA's).
    seed: str = Field(pattern=r"^(0|[1-9][0-9]{0,19})$")
    n_frequency: int = Field(ge=1)
    #: PEFT's ``scaling``: multiplies the inverse transform's real part.
    scaling: float


def fourierft_params(seed: int, n_frequency: int, scaling: float) -> dict:
    """The params dict of a FourierFT module entry.

    Example:
        >>> fourierft_params(777, 100, 150.0)["seed"]
        '777'
    """
    return {**GENERATOR, "seed": str(int(seed)), "n_frequency": int(n_frequency), "scaling": float(scaling)}


@lru_cache(maxsize=32)
def spectral_positions(seed: int, out_f: int, in_f: int, n_frequency: int) -> torch.Tensor:
    """int64 (2, n): rows and columns of the coefficients (cached: every module of a shape shares them).

    Example:
        >>> spectral_positions(777, 4, 4, 3).shape
        torch.Size([2, 3])
    """
    return torch.from_numpy(fourierft_indices(seed, out_f, in_f, n_frequency))


class FourierFT(Method):
    name = "fourierft"
    summary = "sparse spectrum at seeded positions, ΔW = Re(ifft2)·scaling (FourierFT, Gao et al. 2024)"
    params_model = FourierFTParams
    roles = (Role("spectrum", ("n",)),)
    layers = ("linear", "conv1d")
    formula = "ΔW = Re(ifft2(dense(spectrum at seeded positions)))·scaling"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        dims = super().dims(entry, params)
        dims["n"] = params.n_frequency
        return dims

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        if int(params.seed) >= 2**64:  # spec torch-cpu-generator.md §1: the stored seed is a u64
            raise ManifestError(f"module {target!r}: seed {params.seed} is not below 2^64", path=path,
                                hint="the manifest is damaged; re-export the adapter")
        if params.n_frequency > entry.shape[0] * entry.shape[1] or not math.isfinite(params.scaling):
            raise ManifestError(f"module {target!r}: n_frequency {params.n_frequency} exceeds out·in of "
                                f"{entry.shape}, or scaling is not finite", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        return params

    def delta(self, entry, tensors, base=None, rows=None):
        # PEFT's order: dense fp32 (out, in) spectrum, ifft2 (backward norm), real part, × scaling,
        # then cast to the spectrum's dtype.
        p, (out_f, in_f) = entry.params, entry.shape
        spectrum = tensors["spectrum"]
        rows_, cols = spectral_positions(int(p["seed"]), out_f, in_f, p["n_frequency"])
        dense = torch.zeros(out_f, in_f)
        dense[rows_, cols] = spectrum.float()
        delta = torch.fft.ifft2(dense).real * p["scaling"]
        return delta.to(spectrum.dtype).float()


FOURIERFT_METHOD = FourierFT()
