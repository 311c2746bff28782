"""Raw safetensors reading for the engine: byte spans from the header, one memory map per tensor.

``safe_open`` maps whole shards and keeps every touched page resident until the handle
closes, so peak RSS would grow with the shard. Mapping one tensor at a time (and closing
the map right after use) bounds it by the largest tensor; unchanged tensors are never
mapped at all (they are copied by byte range, see writer.py).
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import HeaderError
from ..format.fingerprint import DTYPE_FROM_NAME, tensor_fingerprint

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


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
    """Parse a safetensors header: ({name: TensorSpan} in file order, metadata).

    Example:
        >>> spans, meta = read_spans("model.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if length is None or length > MAX_HEADER_BYTES or 8 + length > size:
                raise HeaderError("safetensors header length is invalid", path=path,
                                  hint="the file is truncated or corrupt; re-download it")
            header = json.loads(fh.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderError(f"safetensors header is not valid JSON ({exc})", path=path,
                          hint="the file is corrupt; re-download it") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    spans = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        spans.append(TensorSpan(name, info["dtype"], tuple(info["shape"]), path,
                                data_start + begin, data_start + end))
    spans.sort(key=lambda s: s.start)
    if spans and spans[-1].end > size:
        raise HeaderError("tensor data runs past the end of the file", path=path,
                          hint="the file is truncated; re-download it")
    return {s.name: s for s in spans}, metadata


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
