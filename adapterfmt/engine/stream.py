"""Executing a plan: stream every tensor of every output shard into a temporary directory, then rename.

Shared by merge and unmerge; they differ only in the per-tensor ``compute`` function.
"""
from __future__ import annotations

import ctypes
import json
import resource
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..atomic import atomic_directory
from ..format.dtypes import config_dtype_name
from .plan import Plan, StreamingCheckpoint, TensorJob, index_json
from ..format.tensorio import mapped_tensor
from .finite import check_result, checked_blocks
from .writer import StreamingWriter

# Never copied next to the merged weights: other weight files and pickles.
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5",
                   ".msgpack", ".onnx", ".npz", ".npy"}

Compute = Callable[[TensorJob, torch.Tensor], torch.Tensor]


@dataclass
class StreamStats:
    """What a streamed write did (the JSON summary's numbers)."""

    tensors_changed: int = 0
    tensors_total: int = 0
    shards: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    device: str = "cpu"
    out: str = ""
    notes: list[str] = field(default_factory=list)
    verification: dict | None = None  # unmerge --base: restored vs original
    base_form: dict | None = None  # merge: the base form merged into, per-layer quantization error / ‖ΔW‖

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        for key in ("verification", "base_form"):
            if data[key] is None:
                data.pop(key)
        data["write_gb_per_s"] = round(self.bytes_written / 1e9 / self.seconds, 3) if self.seconds else None
        return data


class BufferPool:
    """Reused flat buffers (one per purpose): fresh multi-MB tensors page-fault on every use."""

    def __init__(self):
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        count = 1
        for dim in shape:
            count *= int(dim)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        buf = self._flat.get(key)
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            self._flat.pop(key, None)  # free the old one before allocating the new one
            buf = self._flat[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype).view(tuple(shape))


def keep_freed_memory() -> None:
    """Make glibc reuse freed multi-MB blocks instead of returning them to the kernel.

    By default every allocation above the (at most 32 MiB) mmap threshold is a fresh
    mapping, so each ΔW page-faults again: measured 562 ms vs 114 ms for one 11008x4096
    B@A. Keeping freed blocks in the heap does not raise the peak, which is set by the
    largest tensor's working set anyway. Process-wide and permanent; no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """Peak resident set of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def copy_side_files(base: StreamingCheckpoint, dest: Path, out_dtype: str | None, untie: bool = False) -> int:
    """Copy config, generation config, tokenizer files; never weights or pickles. Returns bytes copied.

    ``untie``: the output stores tied weights separately, so the config says ``tie_word_embeddings: false``.
    """
    if base.path.is_file():
        return 0
    copied = 0
    for item in sorted(base.root.iterdir()):
        if (not item.is_file() or item.name.startswith(".") or item.suffix.lower() in WEIGHT_SUFFIXES
                or item.name.endswith(".index.json") or item in base.shard_files):
            continue
        dequantized = item.name == "config.json" and "quantization_config" in base.config
        if item.name == "config.json" and (out_dtype is not None or untie or dequantized):
            config = json.loads(item.read_text())
            config.pop("quantization_config", None)  # the output holds float weights
            for key in ("dtype", "torch_dtype"):  # transformers 5 / 4 spellings
                if key in config and out_dtype is not None:
                    config[key] = config_dtype_name(out_dtype)
            if untie:
                config["tie_word_embeddings"] = False
            (dest / item.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(item, dest / item.name)
        copied += (dest / item.name).stat().st_size
    return copied


def execute(plan: Plan, base: StreamingCheckpoint, out_dir: Path, compute: Compute, stats: StreamStats, *,
            overwrite: bool = False, progress: bool = False, out_dtype: str | None = None,
            desc: str = "merge", untie: bool = False) -> StreamStats:
    """Write ``plan`` into ``out_dir`` atomically; ``compute(job, stored_tensor)`` makes each changed tensor.

    Example:
        >>> execute(plan, base, Path("merged"), compute, StreamStats())  # doctest: +SKIP
    """
    keep_freed_memory()
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar, atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for name, jobs in plan.shards:
            with StreamingWriter(tmp / name, [job.out for job in jobs]) as writer:
                for job in jobs:
                    if job.raw_copy:
                        writer.copy_span(job.out.name, job.span, None)
                    else:
                        # A packed (quantized) base weight opens dequantized; every other one is mapped.
                        opener = getattr(job.span, "open", None)
                        with (opener() if opener else mapped_tensor(job.span)) as stored:
                            result = compute(job, stored)
                            # W + ΔW beyond the output dtype's range would be written as inf: refuse.
                            if isinstance(result, torch.Tensor):
                                writer.write_tensor(job.out.name, check_result(job.out.name, stored, result))
                            else:
                                writer.write_blocks(job.out.name, checked_blocks(job.out.name, stored, result))
                    stats.bytes_read += job.span.nbytes
                    stats.tensors_changed += job.changed
                    stats.tensors_total += 1
                    bar.update(job.out.nbytes)
            stats.bytes_written += writer.bytes_written
        if len(plan.shards) > 1:
            text = json.dumps(index_json(plan), indent=2) + "\n"
            (tmp / plan.index_name).write_text(text)
            stats.bytes_written += len(text)
        stats.bytes_written += copy_side_files(base, tmp, out_dtype, untie)
    stats.shards = len(plan.shards)
    stats.out = str(out_dir)
    return stats
