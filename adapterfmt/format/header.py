"""The safetensors container rules of spec/README.md §1, checked in Python on the raw header.

The Rust reader checks lengths and offsets but lets duplicate JSON members through (the last one
wins), so two readers could see two different files. This module checks every §1 rule itself, so
any reader of ours (the adapter reader, the engine's span reader) can refuse alike.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import HeaderError, InputIOError
from .dtypes import DTYPE_BYTES

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
ENTRY_MEMBERS = {"dtype", "shape", "data_offsets"}
_HINT = "the file is truncated or corrupt; re-download or re-export it"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of the header: dtype, shape and ``[begin, end)`` relative to the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked header: metadata, entries by name, where the data buffer starts, the file size."""

    metadata: dict[str, str]
    entries: dict[str, HeaderEntry]
    data_start: int
    file_size: int


def _fail(detail: str, path: Path) -> HeaderError:
    return HeaderError(f"not a valid safetensors file ({detail})", path=path, hint=_HINT)


def _no_duplicates(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"member {duplicate!r} appears twice")
    return dict(pairs)


def read_checked_header(path: Path | str) -> Header:
    """Read and check a safetensors header (spec/README.md §1); HeaderError names the broken rule.

    Example:
        >>> header = read_checked_header("adapter.safetensors")  # doctest: +SKIP
        >>> header.entries["model.q_proj.lora_A"].dtype  # doctest: +SKIP
        'F32'
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or not 2 <= length <= MAX_HEADER_BYTES or 8 + length > size:
                raise _fail("safetensors header length is invalid", path)
            raw = handle.read(length)
    except OSError as exc:
        raise InputIOError(f"cannot read: {exc.strerror or exc}", path=path, hint="check permissions") from None
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text.rstrip(" "), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"safetensors header is not valid ({exc})", path) from None
    if not isinstance(header, dict):
        raise _fail("safetensors header is not a JSON object", path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail("safetensors __metadata__ is not a string-to-string map", path)
    entries = {name: _entry(name, value, path) for name, value in header.items()}
    _check_tiling(entries, size - 8 - length, path)
    return Header(metadata, entries, 8 + length, size)


def _entry(name: str, value, path: Path) -> HeaderEntry:
    if not isinstance(value, dict) or set(value) != ENTRY_MEMBERS:
        raise _fail(f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets", path)
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    ok = (dtype in DTYPE_BYTES and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
          and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
          and 0 <= offsets[0] <= offsets[1])
    if not ok:
        raise _fail(f"tensor {name!r}: malformed header entry {value!r:.120}", path)
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise _fail(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype}{shape}", path)
    return HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(entries: dict[str, HeaderEntry], data_bytes: int, path: Path) -> None:
    """Sorted by begin, the byte ranges cover [0, data_bytes) exactly: no overlap, gap or tail."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise _fail(f"tensor {name!r} begins at byte {entry.begin}, expected {position} "
                              "(overlapping or non-contiguous offsets)", path)
        position = entry.end
    if position != data_bytes:
        raise _fail(f"the data buffer has {data_bytes} bytes but the tensors cover {position}", path)
