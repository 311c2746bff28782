"""A header-first streaming safetensors writer.

A merge knows every output dtype and shape before it touches any data, so the header
(and every offset) is written first and the tensor bytes then follow in order, one tensor
at a time. Unchanged tensors are copied byte for byte from the source file's range
(``copy_file_range``: no decoding, no mapping, no user-space copy where the kernel can).
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputIOError
from ..format.dtypes import dtype_name
from ..format.dtypes import DTYPE_BYTES
from ..format.tensorio import TensorSpan

COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutTensor:
    """One planned output tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def build_header(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus the JSON header (space-padded to 8 bytes, as safetensors does).

    Example:
        >>> build_header([OutTensor("w", "F32", (2,))])[:8]
        b'H\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
    """
    # None: safetensors' default metadata; an empty dict: no __metadata__ (a copy of a file that had none).
    metadata = {"format": "pt"} if metadata is None else metadata
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class StreamingWriter:
    """Writes one safetensors file: the header at once, then each tensor in planned order.

    Example:
        >>> with StreamingWriter(path, plan) as w:  # doctest: +SKIP
        ...     w.write_tensor("a", tensor_a)
        ...     w.copy_span("b", span_b)
    """

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tensors = tensors
        self.bytes_written = 0
        self._next = 0
        self._pool: ThreadPoolExecutor | None = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._write(memoryview(build_header(tensors, metadata)))

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None and self._next != len(self.tensors):
                missing = self.tensors[self._next].name
                raise RuntimeError(f"{self.path}: tensor {missing!r} was planned but never written")
            if exc_type is None:
                # fsync now so writeback of this shard overlaps the work on the next one.
                os.fsync(self._fd)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            os.close(self._fd)

    def _expect(self, name: str, nbytes: int, dtype: str | None = None) -> None:
        # A mismatch here is an engine bug; it would otherwise produce a corrupt file.
        planned = self.tensors[self._next] if self._next < len(self.tensors) else None
        if (planned is None or planned.name != name or planned.nbytes != nbytes
                or (dtype is not None and dtype != planned.dtype)):
            raise RuntimeError(f"{self.path}: writing {name!r} ({dtype}, {nbytes} bytes) out of plan "
                               f"(expected {planned})")
        self._next += 1

    def _write(self, view: memoryview) -> None:
        while len(view):
            done = os.write(self._fd, view[:COPY_CHUNK])
            view = view[done:]
            self.bytes_written += done

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write a CPU tensor's bytes (it must have the planned dtype and shape)."""
        flat = tensor.contiguous().reshape(-1)
        self._expect(name, flat.numel() * flat.element_size(), dtype_name(tensor.dtype))
        if flat.numel():
            self._write(memoryview(flat.view(torch.uint8).numpy()))

    def write_blocks(self, name: str, blocks) -> None:
        """Write a tensor given as consecutive CPU blocks (row blocks of the planned tensor).

        Block i is written on a background thread while the caller computes block i+1
        (``os.write`` releases the GIL), so the producer must not reuse a block's buffer
        until the block after next: alternate two buffers.
        """
        planned = self.tensors[self._next] if self._next < len(self.tensors) else None
        self._expect(name, planned.nbytes if planned and planned.name == name else -1)
        written, pending = 0, None
        try:
            for block in blocks:
                if dtype_name(block.dtype) != planned.dtype or not block.is_contiguous():
                    raise RuntimeError(f"{self.path}: block of {name!r} is {block.dtype}, planned {planned.dtype}")
                if pending is not None:
                    pending.result()
                written += block.numel() * block.element_size()
                if block.numel():
                    view = memoryview(block.reshape(-1).view(torch.uint8).numpy())
                    pending = self._background().submit(self._write, view)
        finally:
            if pending is not None:
                pending.result()
        if written != planned.nbytes:
            raise RuntimeError(f"{self.path}: {name!r} got {written} bytes, planned {planned.nbytes}")

    def _background(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterfmt-write")
        return self._pool

    def copy_span(self, name: str, span: TensorSpan, buffer: bytearray | None = None) -> None:
        """Copy a source tensor's raw bytes without decoding them."""
        self._expect(name, span.nbytes)
        with open(span.path, "rb") as src:
            fd_in = src.fileno()
            offset, left = span.start, span.nbytes
            try:
                while left:
                    done = os.copy_file_range(fd_in, self._fd, min(left, 1 << 30), offset)
                    if done <= 0:
                        raise InputIOError("source file ended early", path=span.path,
                                           hint="the checkpoint is truncated; re-download it")
                    offset, left = offset + done, left - done
                    self.bytes_written += done
            except (AttributeError, OSError) as exc:
                if isinstance(exc, InputIOError):
                    raise
                # No copy_file_range here (other OS, or across filesystems on old kernels).
                self._copy_by_reading(fd_in, offset, left, buffer)

    def _copy_by_reading(self, fd_in: int, offset: int, left: int, buffer: bytearray | None) -> None:
        buf = memoryview(buffer if buffer is not None else bytearray(min(left, COPY_CHUNK)))
        while left:
            got = os.preadv(fd_in, [buf[:min(left, len(buf))]], offset)
            if got <= 0:
                raise InputIOError("source file ended early", hint="the checkpoint is truncated")
            self._write(buf[:got])
            offset, left = offset + got, left - got
