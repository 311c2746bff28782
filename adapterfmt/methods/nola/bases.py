"""NOLA basis generators by (id, version), and the chunked reconstruction of a NOLA factor.

A generator turns (seed, side description) into the basis ``(k, rows, cols)`` in canonical
orientation (A: r x in, B: out x r), fp32, chunk by chunk over basis indices:

* ``philox4x32-10`` v1: adapterfmt's portable generator (``spec/nola-generator.md``),
  uniform [-1, 1); counter based, so any chunk is generated independently.
* ``torch-cpu-kaiming-uniform`` v1 (legacy import provenance, :mod:`.kaiming`): the official
  NOLA ViT basis. Sequential, so generated whole.
* ``torch-cuda-philox-grid`` v1 (legacy import provenance, :mod:`.cuda_emulation`): a CPU
  emulation of torch's CUDA ``uniform_(-1, 1)``, parameterised by the GPU's geometry.

Example:
    >>> gen = {"id": "philox4x32-10", "version": 1}
    >>> side = {"seed": "7", "num_basis": 2}
    >>> basis_chunk(gen, side, (3, 4), 0, 2).shape
    torch.Size([2, 3, 4])
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import torch

from ...errors import UnknownMethodError
from . import generator as philox
from .cuda_emulation import cuda_uniform_range
from .kaiming import kaiming_basis

#: Basis elements generated per chunk when reconstructing (16 MiB of fp32).
CHUNK_ELEMENTS = 1 << 22

GeneratorFn = Callable[[dict, dict, tuple[int, int], int, int], torch.Tensor]


def _philox(generator, side, dims, start, stop, device=None):
    per = dims[0] * dims[1]
    flat = philox._basis_range(int(side["seed"]), start * per, stop * per, device=device)
    return flat.view(stop - start, dims[0], dims[1])


def _cuda_grid(generator, side, dims, start, stop):
    per = dims[0] * dims[1]
    flat = cuda_uniform_range(int(side["seed"]), start * per, stop * per, int(side["num_basis"]) * per,
                              int(generator["sm_count"]), int(generator["threads_per_sm"]))
    return flat.view(stop - start, dims[0], dims[1])


#: (id, version) -> (generator function, whether any chunk can be drawn independently). Explicit: a
#: generator is never added at run time.
GENERATORS: dict[tuple[str, int], tuple[GeneratorFn, bool]] = {
    (philox.GENERATOR_ID, philox.GENERATOR_VERSION): (_philox, True),
    ("torch-cpu-kaiming-uniform", 1): (kaiming_basis, False),
    ("torch-cuda-philox-grid", 1): (_cuda_grid, True),
}


def known_generators() -> list[str]:
    """``id/vN`` of every generator this version can regenerate.

    Example:
        >>> known_generators()[0]
        'philox4x32-10/v1'
    """
    return sorted(f"{i}/v{v}" for i, v in GENERATORS)


def _lookup(generator: dict, draw: GeneratorFn | None = None) -> tuple[GeneratorFn, bool]:
    if draw is not None:  # a caller-supplied source (drawing on this CUDA device), generated whole
        return draw, False
    key = (generator.get("id"), generator.get("version"))
    if key not in GENERATORS:
        raise UnknownMethodError(f"unknown NOLA basis generator {key[0]}/v{key[1]} "
                                 f"(this version regenerates {', '.join(known_generators())})",
                                 hint="upgrade adapterfmt; the basis cannot be regenerated")
    return GENERATORS[key]


def basis_chunk(generator: dict, side: dict, dims: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Basis matrices ``start..stop-1`` of one side, fp32, shape (stop-start, rows, cols), unscaled."""
    fn, chunkable = _lookup(generator)
    if chunkable:
        return fn(generator, side, dims, start, stop)
    return fn(generator, side, dims, 0, int(side["num_basis"]))[start:stop]


def basis_chunks(generator: dict, side: dict, dims: tuple[int, int], device=None,
                 draw: GeneratorFn | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, chunk) over the whole basis with bounded memory (one chunk for sequential ones).

    ``device``: where the chunks should live; only the Philox generator draws there directly.
    ``draw`` replaces the manifest's generator (an import drawing on the training device).
    """
    fn, chunkable = _lookup(generator, draw)
    k = int(side["num_basis"])
    if not chunkable:
        yield 0, fn(generator, side, dims, 0, k).to(device)
        return
    step = max(1, CHUNK_ELEMENTS // max(1, dims[0] * dims[1]))
    on_device = fn is _philox and device is not None
    for start in range(0, k, step):
        stop = min(k, start + step)
        yield start, (_philox(generator, side, dims, start, stop, device) if on_device
                      else fn(generator, side, dims, start, stop).to(device))


def combine(generator: dict, side: dict, dims: tuple[int, int], coef: torch.Tensor,
            offset: torch.Tensor | None = None, draw: GeneratorFn | None = None) -> torch.Tensor:
    """One NOLA factor: ``offset + basis_scale * sum_i coef[i] * basis[i]``, fp32 (rows, cols).

    Summation (reference order): fp32 accumulator ``acc`` of rows*cols zeros; for each chunk
    of basis indices ``acc += coef[chunk] @ basis[chunk].reshape(c, -1)`` (one fp32 matmul per
    chunk); then ``acc * fl32(basis_scale)`` (a separate fp32 multiply); then ``+ offset``.
    """
    rows, cols = dims
    coef = coef.float().reshape(-1)
    acc = torch.zeros(rows * cols, dtype=torch.float32, device=coef.device)
    for start, chunk in basis_chunks(generator, side, dims, coef.device, draw):
        acc += coef[start:start + chunk.shape[0]] @ chunk.reshape(chunk.shape[0], -1)
    out = (acc * torch.tensor(float(side["basis_scale"]), dtype=torch.float32, device=acc.device)).reshape(rows, cols)
    return out + offset.float().to(out.device) if offset is not None else out


def fingerprint(generator: dict, side: dict, dims: tuple[int, int]) -> str:
    """``sha256:`` + SHA-256 of the little-endian fp32 bytes of the first min(numel, 4096) basis elements.

    Canonical orientation, C-order over (k, rows, cols), unscaled. For ``philox4x32-10`` v1 the
    digest equals :func:`.generator.basis_fingerprint`.
    """
    rows, cols = dims
    per = rows * cols
    n = min(int(side["num_basis"]) * per, philox.FINGERPRINT_ELEMENTS)
    basis = basis_chunk(generator, side, dims, 0, max(1, -(-n // per)) if per else 0)
    flat = basis.reshape(-1)[:n].contiguous().numpy().astype("<f4", copy=False)
    return "sha256:" + hashlib.sha256(flat.tobytes()).hexdigest()
