"""NOLA basis generators by (id, version), and the chunked reconstruction of a NOLA factor.

A generator turns (seed, side description) into the basis ``(k, rows, cols)`` in canonical
orientation (A: r x in, B: out x r), fp32, chunk by chunk over basis indices:

* ``philox4x32-10`` v1: adapterfmt's portable generator (``spec/nola-generator.md``),
  uniform [-1, 1); counter based, so any chunk is generated independently.
* ``torch-cpu-kaiming-uniform`` v1: the official NOLA ViT basis: torch's CPU MT19937 after
  ``manual_seed(seed)``, ``kaiming_uniform_(a=sqrt(5))`` into ``zeros(draw_shape)`` after
  drawing every shape in ``draw_after`` first (the official B basis follows A in the same
  stream); canonical = transpose of the last two axes. Sequential, so generated whole.
* ``torch-cuda-philox-grid`` v1: a CPU emulation of torch's CUDA ``uniform_(-1, 1)``
  (``nola_cuda_emulation.py``); parameterised by the GPU's SM count and threads per SM.

Example:
    >>> gen = {"id": "philox4x32-10", "version": 1}
    >>> side = {"seed": "7", "num_basis": 2}
    >>> basis_chunk(gen, side, (3, 4), 0, 2).shape
    torch.Size([2, 3, 4])
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable

import torch

from . import nola_generator as philox

#: Basis elements generated per chunk when reconstructing (16 MiB of fp32).
CHUNK_ELEMENTS = 1 << 22

GeneratorFn = Callable[[dict, dict, tuple[int, int], int, int], torch.Tensor]
_GENERATORS: dict[tuple[str, int], tuple[GeneratorFn, bool]] = {}


def register_generator(gen_id: str, version: int, fn: GeneratorFn, chunkable: bool) -> None:
    """Register ``fn(generator, side, (rows, cols), start, stop) -> (stop-start, rows, cols)`` fp32."""
    _GENERATORS[(gen_id, int(version))] = (fn, chunkable)


def known_generators() -> list[str]:
    """``id/vN`` of every registered generator."""
    return sorted(f"{i}/v{v}" for i, v in _GENERATORS)


def _lookup(generator: dict) -> tuple[GeneratorFn, bool]:
    key = (generator.get("id"), int(generator.get("version", 0)))
    if key not in _GENERATORS:
        raise ValueError(f"unknown NOLA basis generator {key[0]}/v{key[1]} (known: {', '.join(known_generators())})")
    return _GENERATORS[key]


def basis_chunk(generator: dict, side: dict, dims: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Basis matrices ``start..stop-1`` of one side, fp32, shape (stop-start, rows, cols), unscaled."""
    fn, chunkable = _lookup(generator)
    if chunkable:
        return fn(generator, side, dims, start, stop)
    return fn(generator, side, dims, 0, int(side["num_basis"]))[start:stop]


def basis_chunks(generator: dict, side: dict, dims: tuple[int, int], device=None):
    """Yield (start, chunk) over the whole basis with bounded memory (one chunk for sequential ones).

    ``device``: where the chunks should live; only the Philox generator draws there directly.
    """
    fn, chunkable = _lookup(generator)
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
            offset: torch.Tensor | None = None) -> torch.Tensor:
    """One NOLA factor: ``offset + basis_scale * sum_i coef[i] * basis[i]``, fp32 (rows, cols).

    Summation (reference order): fp32 accumulator ``acc`` of rows*cols zeros; for each chunk
    of basis indices ``acc += coef[chunk] @ basis[chunk].reshape(c, -1)`` (one fp32 matmul per
    chunk); then ``acc * fl32(basis_scale)`` (a separate fp32 multiply); then ``+ offset``.
    """
    rows, cols = dims
    coef = coef.float().reshape(-1)
    acc = torch.zeros(rows * cols, dtype=torch.float32, device=coef.device)
    for start, chunk in basis_chunks(generator, side, dims, coef.device):
        acc += coef[start:start + chunk.shape[0]] @ chunk.reshape(chunk.shape[0], -1)
    out = (acc * torch.tensor(float(side["basis_scale"]), dtype=torch.float32, device=acc.device)).reshape(rows, cols)
    return out + offset.float().to(out.device) if offset is not None else out


def fingerprint(generator: dict, side: dict, dims: tuple[int, int]) -> str:
    """``sha256:`` + SHA-256 of the little-endian fp32 bytes of the first min(numel, 4096) basis elements.

    Canonical orientation, C-order over (k, rows, cols), unscaled. For ``philox4x32-10`` v1 the
    digest equals :func:`adapterfmt.nola_generator.basis_fingerprint`.
    """
    rows, cols = dims
    per = rows * cols
    n = min(int(side["num_basis"]) * per, philox.FINGERPRINT_ELEMENTS)
    basis = basis_chunk(generator, side, dims, 0, max(1, -(-n // per)) if per else 0)
    flat = basis.reshape(-1)[:n].contiguous().numpy().astype("<f4", copy=False)
    return "sha256:" + hashlib.sha256(flat.tobytes()).hexdigest()


# ------------------------------------------------------------------ generators
def _philox(generator, side, dims, start, stop, device=None):
    per = dims[0] * dims[1]
    flat = philox._basis_range(int(side["seed"]), start * per, stop * per, device=device)
    return flat.view(stop - start, dims[0], dims[1])


@functools.lru_cache(maxsize=4)
def _kaiming_draw(seed: int, after: tuple, shape: tuple) -> torch.Tensor:
    # Cached: the official ViT reuses one basis pair for every fc1 (and one for every fc2).
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    for prior in after:
        torch.nn.init.kaiming_uniform_(torch.zeros(prior), a=math.sqrt(5), generator=gen)
    drawn = torch.zeros(shape)
    torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=gen)
    return drawn


def _kaiming_cpu(generator, side, dims, start, stop):
    drawn = _kaiming_draw(int(side["seed"]), tuple(tuple(s) for s in side.get("draw_after", [])),
                          tuple(side["draw_shape"]))
    canon = drawn.transpose(1, 2) if side.get("transpose", True) else drawn
    if list(canon.shape[1:]) != list(dims) or canon.shape[0] != int(side["num_basis"]):
        raise ValueError(f"draw_shape {side['draw_shape']} does not give {side['num_basis']} ({dims[0]}, {dims[1]}) "
                         "basis matrices")
    return canon[start:stop].clone(memory_format=torch.contiguous_format)


def _cuda_grid(generator, side, dims, start, stop):
    from .nola_cuda_emulation import cuda_uniform_range
    per = dims[0] * dims[1]
    flat = cuda_uniform_range(int(side["seed"]), start * per, stop * per, int(side["num_basis"]) * per,
                              int(generator["sm_count"]), int(generator["threads_per_sm"]))
    return flat.view(stop - start, dims[0], dims[1])


register_generator(philox.GENERATOR_ID, philox.GENERATOR_VERSION, _philox, chunkable=True)
register_generator("torch-cpu-kaiming-uniform", 1, _kaiming_cpu, chunkable=False)
register_generator("torch-cuda-philox-grid", 1, _cuda_grid, chunkable=True)
