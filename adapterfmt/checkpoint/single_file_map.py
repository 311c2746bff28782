"""Where each diffusers weight of a single-file checkpoint is stored, learned from diffusers' own conversion.

We do not write key tables. Instead diffusers' conversion functions (``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) run on a *probe*: every stored tensor
is replaced by an int64 tensor of the same shape whose row ``r`` holds a code unique to (tensor, r),
broadcast along the other dimensions (an ``expand``: no memory). Whatever diffusers does with it
(moves it, slices the fused ``in_proj_weight`` of OpenCLIP into q/k/v rows, reorders rows), the codes in
each converted tensor say exactly which rows of which stored tensor it is.

A converted tensor is *placed* (:class:`Source`) when its codes are rows of one stored tensor, constant
along the other dimensions, and its trailing shape is the stored one (possibly with trailing size-1
dimensions dropped, as for 1x1 convolutions read as linear). Anything else (a transpose, a computed
tensor, rows of two tensors) is *unplaced*, with the reason; such a weight is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Converter = Callable[[dict], dict]


@dataclass
class Source:
    """The stored rows one diffusers weight is: ``stored[rows]`` viewed as ``shape``.

    ``rows`` is None for the whole tensor, a slice for consecutive rows, else a LongTensor of row indices.
    """

    stored: str
    rows: slice | torch.Tensor | None
    shape: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return self.rows is None

    def row_index(self, stored_rows: int) -> torch.Tensor:
        """The stored row indices as a LongTensor (for index_add / index_copy)."""
        if self.rows is None:
            return torch.arange(stored_rows)
        if isinstance(self.rows, slice):
            return torch.arange(self.rows.start, self.rows.stop)
        return self.rows

    def take(self, stored: torch.Tensor) -> torch.Tensor:
        """This weight's values from the stored tensor (a view where the rows are a slice)."""
        part = stored if self.rows is None else stored[self.rows]
        return part.reshape(self.shape)


@dataclass
class ProbeMap:
    """{diffusers name: Source} and {diffusers name: why it cannot be placed} for one converter run."""

    placed: dict[str, Source]
    unplaced: dict[str, str]


class Probe:
    """Int64 probes for a checkpoint's stored tensors and the decoder of converted tensors.

    Example:
        >>> probe = Probe({"a.weight": (4, 3)})
        >>> m = probe.run(lambda sd: {"x": sd["a.weight"][2:]})
        >>> m.placed["x"].rows, m.placed["x"].shape
        (slice(2, 4, None), (2, 3))
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.names = list(shapes)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        starts, offset = [], 0
        for name in self.names:
            starts.append(offset)
            offset += self.shapes[name][0] if self.shapes[name] else 1
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.tensors = {name: self._probe(name, start) for name, start in zip(self.names, starts)}

    def _probe(self, name: str, start: int) -> torch.Tensor:
        shape = self.shapes[name]
        if not shape:
            return torch.tensor(start, dtype=torch.int64)
        codes = torch.arange(start, start + shape[0], dtype=torch.int64)
        return codes.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)

    def run(self, convert: Converter, keys: list[str] | None = None) -> ProbeMap:
        """Run ``convert`` on the probes (of ``keys``, default all) and decode what it returns."""
        probes = {k: self.tensors[k] for k in (self.names if keys is None else keys)}
        converted = convert(probes)
        placed, unplaced = {}, {}
        for name, value in converted.items():
            source, why = self.decode(value)
            if source is None:
                unplaced[name] = why
            else:
                placed[name] = source
        return ProbeMap(placed, unplaced)

    def decode(self, value) -> tuple[Source | None, str]:
        """The stored rows a converted probe is, or (None, why not)."""
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
            return None, "diffusers computes it (it is not stored in the file)"
        if value.ndim == 0:
            codes, trailing = value.reshape(1), ()
        else:
            codes = value[(slice(None),) + (0,) * (value.ndim - 1)]
            trailing = tuple(value.shape[1:])
            if not _constant_along_trailing(value, codes):
                return None, "diffusers transposes or rearranges it (not whole rows of a stored tensor)"
        if codes.numel() == 0:
            return None, "it is empty"
        codes = codes.contiguous()
        owners = torch.searchsorted(self.starts, codes, right=True) - 1
        if bool((owners != owners[0]).any()):
            return None, "diffusers builds it from several stored tensors"
        stored = self.names[int(owners[0])]
        shape = self.shapes[stored]
        if not _same_trailing(trailing, shape[1:]):
            return None, f"diffusers reshapes {stored!r} {list(shape)} into {list(value.shape)}"
        rows = codes - self.starts[int(owners[0])]
        if rows.unique().numel() != rows.numel():
            return None, f"diffusers repeats rows of {stored!r}"
        return Source(stored, _compact_rows(rows, shape), tuple(value.shape)), ""

    def placed_rows(self) -> int:
        return int(self.starts[-1]) if self.names else 0


def _constant_along_trailing(value: torch.Tensor, codes: torch.Tensor) -> bool:
    # A still-expanded probe (stride 0 wherever size > 1) is constant by construction: no need to compare.
    if all(stride == 0 or size == 1 for size, stride in zip(value.shape[1:], value.stride()[1:])):
        return True
    return bool((value == codes.reshape((-1,) + (1,) * (value.ndim - 1))).all())


def _same_trailing(converted: tuple[int, ...], stored: tuple[int, ...]) -> bool:
    """Equal, or equal once the stored tensor's trailing size-1 dimensions are dropped (conv 1x1 as linear)."""
    if len(converted) > len(stored):
        return False
    return converted == stored[:len(converted)] and all(d == 1 for d in stored[len(converted):])


def _compact_rows(rows: torch.Tensor, shape: tuple[int, ...]) -> slice | torch.Tensor | None:
    count = shape[0] if shape else 1
    start = int(rows[0])
    if bool((rows == torch.arange(start, start + rows.numel())).all()):
        return None if start == 0 and rows.numel() == count else slice(start, start + rows.numel())
    return rows.clone()
