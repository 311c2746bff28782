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
from .dtypes import DTYPE_BYTES, DTYPE_FROM_NAME
from .fingerprint import tensor_fingerprint

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _span(name: str, info: object, path: Path, data_start: int) -> TensorSpan:
    """One header entry, checked as the safetensors reader checks it: known dtype, integer shape,
    and a byte length equal to dtype size × element count."""
    bad = HeaderError(f"tensor {name!r} has a malformed header entry", path=path,
                      hint="the file is corrupt; re-download it")
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
        raise bad
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad
    count = 1
    for dim in shape:
        count *= dim
    if offsets[1] - offsets[0] != count * DTYPE_BYTES[info["dtype"]]:
        raise HeaderError(f"tensor {name!r}: byte length disagrees with its dtype and shape", path=path,
                          hint="the file is corrupt; re-download it")
    return TensorSpan(name, info["dtype"], tuple(shape), path, data_start + offsets[0], data_start + offsets[1])


def read_spans(path: Path | str) -> tuple[dict[str, TensorSpan], dict[str, str]]:
    """Parse and check a safetensors header: ({name: TensorSpan} in file order, metadata).

    The checks are the container's (spec §1): valid JSON without duplicate keys, known dtypes,
    byte lengths matching dtype × shape, and tensor data that covers the data section exactly,
    without overlaps or holes.

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
            header = json.loads(fh.read(length), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise HeaderError(f"safetensors header is not valid JSON ({exc})", path=path,
                          hint="the file is corrupt; re-download it") from None
    if not isinstance(header, dict):
        raise HeaderError("safetensors header is not a JSON object", path=path, hint="the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    spans = sorted((_span(name, info, path, data_start) for name, info in header.items()),
                   key=lambda s: (s.start, s.end))
    position = data_start
    for span in spans:
        if span.start != position:
            raise HeaderError(f"tensor {span.name!r}: data offsets overlap or leave a hole", path=path,
                              hint="the file is corrupt; re-download it")
        position = span.end
    if position != size:
        raise HeaderError("tensor data does not end at the end of the file", path=path,
                          hint="the file is truncated or has trailing bytes; re-download it")
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
