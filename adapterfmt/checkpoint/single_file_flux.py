"""Single-file Flux transformer checkpoints (BFL layout: ``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1``,
optionally under ``model.diffusion_model.``) read with diffusers' names.

The map is diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` run on a probe
(single_file_map.py): q, k and v are row slices of the fused ``qkv``; ``linear1`` is q, k, v and the MLP
input; the final layer's adaLN rows are swapped (shift, scale) -> (scale, shift). That converter is
written for FLUX.1: it splits ``linear1`` at fixed rows (3072, 3072, 3072, 12288). So the probe is
FLUX.1-sized: every stored tensor whose rows are a multiple of the file's inner dimension (``img_in``'s
rows) gets those rows scaled to inner 3072, the converter runs, and each diffusers weight's rows are
scaled back. A row run that does not scale back to whole rows, or a file the converter refuses (an MLP
ratio other than 4), is refused by name: the map is exact or absent.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from ..errors import InputIOError
from .single_file_map import Probe, ProbeMap, Source

#: FLUX.1's inner dimension, which diffusers' converter hard-codes.
REFERENCE_INNER = 3072
PREFIX = "model.diffusion_model."
ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
         "final_layer.")
ARCHITECTURE = "FluxTransformer2DModel"


def flux_keys(names: list[str]) -> list[str]:
    """The stored keys of a BFL-layout Flux transformer (bare or under ``model.diffusion_model.``)."""
    return [n for n in names if n.removeprefix(PREFIX).startswith(ROOTS)]


def flux_transformer_map(shapes: dict[str, tuple[int, ...]], path) -> tuple[ProbeMap, str, dict]:
    """(probe map, architecture, config) of the Flux transformer in a single file.

    Example:
        >>> flux_transformer_map({"img_in.weight": (16, 4), ...}, "flux.safetensors")  # doctest: +SKIP
    """
    keys = flux_keys(list(shapes))
    inner = next((shapes[k][0] for k in keys if k.removeprefix(PREFIX) == "img_in.weight"), None)
    if inner is None:
        raise InputIOError("a Flux (BFL layout) file without img_in.weight: its inner dimension is unknown",
                           path=path, hint="pass the diffusers Flux pipeline directory as --base")
    factor = Fraction(REFERENCE_INNER, inner)
    scaled = {k: _scaled(shapes[k], inner, factor) for k in keys}
    probe = Probe({k: shape for k, (shape, _) in scaled.items()})
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    try:
        reference = probe.run(lambda sd: convert_flux_transformer_checkpoint_to_diffusers(dict(sd)))
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise InputIOError(f"diffusers' Flux converter refuses this file even scaled to FLUX.1's inner dimension "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", path=path,
                           hint="it expects FLUX.1's structure (MLP ratio 4); pass a diffusers pipeline as --base")
    placed, unplaced = {}, dict(reference.unplaced)
    for name, source in reference.placed.items():
        back = _scale_back(source, shapes[source.stored], scaled[source.stored][1])
        if back is None:
            unplaced[name] = (f"its rows of {source.stored!r} do not scale from FLUX.1's inner dimension "
                              f"{REFERENCE_INNER} to this file's {inner} exactly")
        else:
            placed[name] = back
    config = {"inner_dim": inner, "num_layers": _count(keys, "double_blocks."),
              "num_single_layers": _count(keys, "single_blocks.")}
    return ProbeMap(placed, unplaced), ARCHITECTURE, config


def _scaled(shape, inner: int, factor: Fraction) -> tuple[tuple[int, ...], Fraction]:
    """(the probe's shape, its row factor): rows that are a multiple of ``inner`` are scaled to FLUX.1's."""
    if not shape or shape[0] % inner:
        return tuple(shape), Fraction(1)
    rows = shape[0] * factor
    return (int(rows),) + tuple(shape[1:]), factor


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    values = rows.reshape(-1).tolist()
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return [(start, length) for start, length in runs]


def _scale_back(source: Source, stored_shape, factor: Fraction) -> Source | None:
    """The Source at the file's own rows, or None when a row run is not whole there."""
    rows_ref = source.shape[0] if source.shape else 1
    if factor == 1:
        return source
    if source.rows is None:
        return Source(source.stored, None, (stored_shape[0],) + tuple(source.shape[1:]))
    index = source.row_index(int(stored_shape[0] * factor))
    pieces = []
    for start, length in _runs(index):
        begin, size = start / factor, length / factor
        if begin.denominator != 1 or size.denominator != 1:
            return None
        pieces.append(torch.arange(int(begin), int(begin + size)))
    rows = torch.cat(pieces)
    shape = (int(rows_ref / factor),) + tuple(source.shape[1:])
    if bool((rows == torch.arange(int(rows[0]), int(rows[0]) + rows.numel())).all()):
        return Source(source.stored, slice(int(rows[0]), int(rows[0]) + rows.numel()), shape)
    return Source(source.stored, rows, shape)


def _count(keys: list[str], root: str) -> int:
    blocks = {k.removeprefix(PREFIX).split(".")[1] for k in keys if k.removeprefix(PREFIX).startswith(root)}
    return len(blocks)
