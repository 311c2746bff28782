"""Raw safetensors reading for the engine: byte spans from the header, one memory map per tensor.

``safe_open`` maps whole shards and keeps every touched page resident until the handle
closes, so peak RSS would grow with the shard. Mapping one tensor at a time (and closing
the map right after use) bounds it by the largest tensor; unchanged tensors are never
mapped at all (they are copied by byte range, see writer.py).
"""
from __future__ import annotations

import contextlib
import mmap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .dtypes import DTYPE_FROM_NAME
from .header import read_checked_header
from .fingerprint import tensor_fingerprint



@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie: absolute byte offsets ``[start, end)`` in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_spans(path: Path | str) -> tuple[dict[str, TensorSpan], dict[str, str]]:
    """Parse and check a safetensors header (spec §1, :mod:`.header`): ({name: TensorSpan} in file order,
    metadata).

    Example:
        >>> spans, meta = read_spans("model.safetensors")  # doctest: +SKIP
    """
    header = read_checked_header(path)
    spans = sorted((TensorSpan(name, e.dtype, tuple(e.shape), Path(path), header.data_start + e.begin,
                               header.data_start + e.end) for name, e in header.entries.items()),
                   key=lambda s: (s.start, s.end))
    return {s.name: s for s in spans}, dict(header.metadata)


@contextlib.contextmanager
def mapped_tensor(span: TensorSpan, readahead: bool = True) -> Iterator[torch.Tensor]:
    """Yield the tensor as a zero-copy view of a private map of just its bytes.

    The view must not escape the ``with`` block: the map is closed on exit.

    Example:
        >>> with mapped_tensor(span) as w:  # doctest: +SKIP
        ...     buf.copy_(w)
    """
    dtype = DTYPE_FROM_NAME[span.dtype]
    if span.nbytes == 0:
        yield torch.empty(span.shape, dtype=dtype)
        return
    aligned = span.start - span.start % mmap.ALLOCATIONGRANULARITY
    with open(span.path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), span.end - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    try:
        if readahead and hasattr(mm, "madvise"):
            # Start readahead of the whole tensor now; cold reads then overlap the page faults.
            mm.madvise(mmap.MADV_WILLNEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=span.nbytes, offset=span.start - aligned)
        tensor = raw.view(dtype).reshape(span.shape)
        try:
            yield tensor
        finally:
            del tensor, raw
    finally:
        mm.close()


def span_fingerprint(span: TensorSpan) -> str:
    """The fingerprint of a tensor on disk (same value as ``tensor_fingerprint``), mapping only it."""
    # No readahead: the fingerprint samples 1024 elements, not the whole tensor.
    with mapped_tensor(span, readahead=False) as tensor:
        return tensor_fingerprint(tensor)
