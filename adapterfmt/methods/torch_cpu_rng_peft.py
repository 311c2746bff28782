"""PEFT's seeded projections, regenerated without torch: VeRA's shared A/B, FourierFT's positions.

Each function repeats the torch calls PEFT 0.21 makes (read from its source), on
:class:`~adapterfmt.methods.torch_cpu_rng.TorchCpuGenerator`:

- VeRA (``VeraModel._init_vera_A_vera_B``): one generator seeded with ``projection_prng_key``; first
  ``vera_A`` of shape (r, max in_features), then ``vera_B`` of shape (max out_features, r), both float32
  with PEFT's own kaiming uniform (ReLU gain sqrt(2), fan_in = shape[1]). A layer uses
  ``vera_A[:, :in_features]`` and ``vera_B[:out_features, :]``.
- FourierFT (``FourierFTLayer.update_layer``): per layer, a fresh generator seeded with
  ``random_loc_seed``; ``randperm(out * in)[:n_frequency]`` gives flat positions, split into
  rows ``p // in`` and columns ``p % in``.

Normative text: ``spec/torch-cpu-generator.md``.
"""
from __future__ import annotations

import numpy as np

from .torch_cpu_rng import TorchCpuGenerator, kaiming_uniform, randperm


def vera_projections(seed: int, rank: int, in_features: int, out_features: int, *,
                     fma: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(vera_A, vera_B) as PEFT builds them: float32 (rank, in_features) and (out_features, rank).

    ``in_features``/``out_features`` are the largest over the targeted layers, as PEFT's ``_find_dim``.

    Example:
        >>> a, b = vera_projections(0, 4, 16, 8)
        >>> a.shape, b.shape
        ((4, 16), (8, 4))
    """
    gen = TorchCpuGenerator(seed)
    vera_a = kaiming_uniform(gen, (rank, in_features), fma=fma)
    vera_b = kaiming_uniform(gen, (out_features, rank), fma=fma)
    return vera_a, vera_b


def fourierft_indices(seed: int, out_features: int, in_features: int, n_frequency: int) -> np.ndarray:
    """int64 (2, n_frequency): the (row, column) spectral positions PEFT's FourierFT layer derives.

    Example:
        >>> fourierft_indices(777, 4, 4, 3).shape
        (2, 3)
    """
    flat = randperm(TorchCpuGenerator(seed), out_features * in_features, prefix=n_frequency)
    return np.stack([flat // in_features, flat % in_features])


#: ``float_affine`` names (spec §3) -> the ``fma`` flag of the numpy reference. Fused first: it is
#: what torch computes on any x86-64 CPU with AVX2.
FLOAT_AFFINE = {"fused": True, "unfused": False}


def vera_variant(seed: int, vera_a: np.ndarray, vera_b: np.ndarray) -> str | None:
    """The ``float_affine`` variant that regenerates PEFT's saved ``vera_A``/``vera_B`` bit for bit, or None.

    None means the saved projections must be kept: no variant of this generator reproduces them.

    Example:
        >>> a, b = vera_projections(3, 2, 5, 4, fma=False)
        >>> vera_variant(3, a, b)
        'unfused'
    """
    rank, in_features = vera_a.shape
    out_features = vera_b.shape[0]
    if vera_b.shape[1] != rank:
        return None
    for name, fma in FLOAT_AFFINE.items():
        regen_a, regen_b = vera_projections(seed, rank, in_features, out_features, fma=fma)
        same_a = regen_a.tobytes() == np.ascontiguousarray(vera_a, dtype=np.float32).tobytes()
        if same_a and regen_b.tobytes() == np.ascontiguousarray(vera_b, dtype=np.float32).tobytes():
            return name
    return None
