"""NOLA module data: typed params, basis sides, seeds, the entry builder and the factor maths.

NOLA (Koohpayegani et al., ICLR 2024) writes LoRA factors as combinations of seeded random bases.

ΔW = s · B · A with
    A = offset_A + basis_scale_A · Σ_i coef_A[i] · A_i   (A_i: r x in)
    B = offset_B + basis_scale_B · Σ_j coef_B[j] · B_j   (B_j: out x r)
where the bases are regenerated from per-side uint64 seeds by a generator of :mod:`.bases`; the
file holds coefficients, optional offsets and seeds only. Storage, summation order and
fingerprints: ``spec/nola.md``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ...format.manifest import ModuleEntry
from ..descriptor import Params, tensor_refs
from .bases import GeneratorFn, combine, fingerprint
from .generator import GENERATOR_ID, GENERATOR_VERSION

SIDES = ("A", "B")


class NolaGenerator(Params):
    """Which generator regenerates the bases, plus its options (legacy CUDA grid: the GPU geometry)."""

    id: str = Field(min_length=1)
    version: int = Field(ge=1)
    sm_count: int | None = Field(default=None, ge=1)
    threads_per_sm: int | None = Field(default=None, ge=256)
    verified: bool | None = None


class NolaSide(Params):
    seed: str = Field(pattern=r"^(0|[1-9][0-9]{0,19})$")
    num_basis: int = Field(ge=1)
    basis_scale: float = Field(gt=0)
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    draw_shape: list[int] | None = None
    draw_after: list[list[int]] | None = None
    transpose: bool | None = None


class NolaParams(Params):
    rank: int = Field(ge=1)
    scale: float
    generator: NolaGenerator
    A: NolaSide
    B: NolaSide
    rows: list[int] | None = Field(default=None, min_length=2, max_length=2)
    provenance: dict[str, Any] | None = None


def side_dims(entry: ModuleEntry, side: str) -> tuple[int, int]:
    """(rows, cols) of one basis matrix: A is (r, in), B is (rows_out, r)."""
    rank = int(entry.params["rank"])
    rows = entry.params.get("rows") or [0, entry.shape[0]]
    return (rank, entry.shape[1]) if side == "A" else (rows[1] - rows[0], rank)


def fl32(value: float) -> float:
    """``value`` rounded to float32, as a Python float. Example: ``fl32(0.1) == 0.10000000149011612``."""
    return float(np.float32(value))


def derive_seed(master: int, target: str, side: str) -> int:
    """Per-module seed: first 8 bytes (little endian) of SHA-256(f"{master}:{target}:{side}").

    Example:
        >>> derive_seed(0, "model.layers.0.self_attn.q_proj", "A") < 2**64
        True
    """
    digest = hashlib.sha256(f"{int(master)}:{target}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def nola_module(target: str, base_weight: str, shape: list[int], rank: int, scale: float,
                sides: dict[str, dict], tensors: dict[str, torch.Tensor], generator: dict | None = None,
                **extra) -> tuple[ModuleEntry, dict[str, torch.Tensor]]:
    """Build a NOLA module entry; fills basis_scale (fl32(1/sqrt(k))) and fingerprints when absent.

    ``sides`` maps "A"/"B" to at least ``{"seed": int, "num_basis": k}``; ``tensors`` holds
    ``coef_A``, ``coef_B`` and optionally ``offset_A``/``offset_B``; ``extra`` goes into params
    (``rows``, ``provenance``, ``layer``/``fan_in_fan_out`` go to the entry).

    Example:
        >>> e, t = nola_module("m", "m.weight", [4, 3], 2, 1.0, {"A": {"seed": 1, "num_basis": 2},
        ...     "B": {"seed": 2, "num_basis": 2}}, {"coef_A": torch.zeros(2), "coef_B": torch.zeros(2)})
        >>> e.params["A"]["seed"]
        '1'
    """
    layer = extra.pop("layer", "linear")
    fifo = extra.pop("fan_in_fan_out", False)
    params = {"rank": int(rank), "scale": float(scale),
              "generator": dict(generator or {"id": GENERATOR_ID, "version": GENERATOR_VERSION})}
    params.update(extra)
    entry = ModuleEntry(method="nola", base_weight=base_weight, shape=list(shape), params=params,
                        tensors=tensor_refs(target, tensors), fan_in_fan_out=fifo, layer=layer)
    for side in SIDES:
        info = dict(sides[side])
        info["seed"] = str(int(info["seed"]))
        info.setdefault("basis_scale", fl32(1.0 / math.sqrt(int(info["num_basis"]))))
        params[side] = info
        info.setdefault("fingerprint", fingerprint(params["generator"], info, side_dims(entry, side)))
    return entry, dict(tensors)


def nola_factors(entry: ModuleEntry, tensors: dict[str, torch.Tensor], draw: GeneratorFn | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The materialised (B, A) in fp32 (B covers ``rows`` only); ``draw`` overrides the generator.

    Example:
        >>> b, a = nola_factors(entry, tensors)  # doctest: +SKIP
    """
    gen = entry.params["generator"]
    a, b = (combine(gen, entry.params[s], side_dims(entry, s), tensors[f"coef_{s}"],
                    tensors.get(f"offset_{s}"), draw) for s in SIDES)
    return b, a


def nola_delta(entry: ModuleEntry, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW = scale·B·A in fp32, zero outside ``rows``.

    Example:
        >>> nola_delta(entry, tensors).shape  # doctest: +SKIP
        torch.Size([64, 64])
    """
    b, a = nola_factors(entry, tensors)
    part = (b @ a) * float(entry.params["scale"])
    rows = entry.params.get("rows")
    if not rows or rows == [0, entry.shape[0]]:
        return part
    full = torch.zeros(entry.shape, dtype=torch.float32, device=part.device)
    full[rows[0]:rows[1]] = part
    return full
