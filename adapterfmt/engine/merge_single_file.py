"""Merging adapters into (and unmerging them from) a single-file SD checkpoint, in its own layout.

The output has exactly the input's tensors (names, dtypes, shapes, file order) and ``__metadata__``.
A stored tensor no module touches is copied byte for byte; a touched one is upcast to fp32 once, each
adapted diffusers weight's rows get Σ wᵢ·ΔWᵢ (or the method's own merge), and the tensor is rounded
once back to its dtype. One stored tensor is in memory at a time; the file is written to a temporary
name, fsynced and renamed.

A stored tensor that is exactly one adapted weight (every UNet and CLIP Linear/1x1-conv) goes through the
directory merge's row-block path (engine/merge.py ``merge_tensor``): a few MiB of fp32 at a time, each
block written while the next is computed. Only fused tensors (OpenCLIP's ``in_proj_weight``) are
merged whole.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_file, check_output_path
from ..checkpoint.single_file import SingleFilePipeline
from ..errors import UsageError
from ..format.tensorio import TensorSpan, mapped_tensor, read_spans
from ..methods import get_method
from ..methods.descriptor import Method
from .devices import exact_math, resolve_device
from .finite import SINGLE_FILE_HINT, check_result, checked_blocks
from .merge import MathContext, adapter_paths, check_weights, delta_sum, load_adapters, merge_tensor
from .plan import TensorJob
from .single_file_plan import SliceJob, slice_jobs, stored_paths
from .stream import StreamStats, peak_rss_bytes
from .writer import OutTensor, StreamingWriter

#: (stored fp32 tensor, its slice jobs, context) -> the fp32 result, changed in place.
Apply = Callable[[torch.Tensor, list[SliceJob], MathContext], torch.Tensor]


def _rows_view(full: torch.Tensor, job: SliceJob) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the rows of ``full`` this weight is, index) — a view for whole/slice rows, a copy + index otherwise."""
    rows = job.source.rows
    if rows is None or isinstance(rows, slice):
        return (full if rows is None else full[rows]), None
    rows = rows.to(full.device)
    return full.index_select(0, rows), rows


def _put(full: torch.Tensor, job: SliceJob, value: torch.Tensor, add: bool) -> None:
    """Write (or add) ``value`` (diffusers shape) into this weight's rows of ``full``."""
    part, index = _rows_view(full, job)
    value = value.reshape(part.shape)
    if index is None:
        part.add_(value) if add else part.copy_(value)
    elif add:
        full.index_add_(0, index, value)
    else:
        full.index_copy_(0, index, value)


def apply_merge(full: torch.Tensor, jobs: list[SliceJob], ctx: MathContext) -> torch.Tensor:
    """fp32(W) with every job's rows merged; ΔW is computed from the original rows (order-independent)."""
    original = full.clone() if len(jobs) > 1 else full
    for job in jobs:
        base = _rows_view(original, job)[0].reshape(job.source.shape)
        first = job.updates[0]
        method = get_method(first.entry.method)
        if len(job.updates) == 1 and first.weight == 1.0 and type(method).merged is not Method.merged:
            # The method's own merge (DoRA's normalisation), as the directory merge does.
            _put(full, job, method.merged(first.entry, ctx.module_tensors(first), ctx.canonical32(base, False)), False)
        else:
            _put(full, job, delta_sum(job.updates, base, ctx, False), True)
    return full


def apply_unmerge(full: torch.Tensor, jobs: list[SliceJob], ctx: MathContext) -> torch.Tensor:
    """fp32(W') with every job's rows restored; refuses methods not invertible from the merged weight."""
    merged = full.clone() if len(jobs) > 1 else full
    for job in jobs:
        rows = _rows_view(merged, job)[0].reshape(job.source.shape)
        first = job.updates[0]
        method = get_method(first.entry.method)
        if len(job.updates) == 1 and first.weight == 1.0 and method.unmerges_without_base:
            _put(full, job, method.unmerged(first.entry, ctx.module_tensors(first), ctx.canonical32(rows, False),
                                            first.target), False)
            continue
        blocked = sorted({u.entry.method for u in job.updates if get_method(u.entry.method).needs_base})
        if blocked:
            raise UsageError(f"cannot unmerge {job.name}: {', '.join(blocked)} is not invertible from the merged "
                             "weight", hint="merge the adapters again into the original checkpoint instead")
        _put(full, job, -delta_sum(job.updates, rows, ctx, False), True)
    return full


def whole_weight_job(span: TensorSpan, jobs: list[SliceJob]) -> TensorJob | None:
    """The directory engine's job for a stored tensor that is one whole adapted weight, viewed in the
    weight's own shape (a 1x1 conv as (out, in)); None when the tensor holds several weights or part of one.

    Example:
        >>> whole_weight_job(span, jobs).span.shape  # doctest: +SKIP
        (1280, 1280)
    """
    if len(jobs) != 1 or not jobs[0].source.whole or math.prod(jobs[0].source.shape) != math.prod(span.shape):
        return None
    shape = tuple(jobs[0].source.shape)
    return TensorJob(dataclasses.replace(span, shape=shape), OutTensor(span.name, span.dtype, shape),
                     list(jobs[0].updates))


def _stream(pipeline: SingleFilePipeline, jobs: dict[str, list[SliceJob]], out: Path, apply: Apply,
            ctx: MathContext, stats: StreamStats, overwrite: bool) -> None:
    spans, metadata = read_spans(pipeline.path)
    order = list(spans.values())
    planned = [OutTensor(s.name, s.dtype, tuple(s.shape)) for s in order]
    with atomic_file(out, overwrite=overwrite) as tmp:
        with StreamingWriter(tmp, planned, metadata) as writer:
            for span in order:
                job = whole_weight_job(span, jobs[span.name]) if apply is apply_merge and span.name in jobs else None
                if span.name not in jobs:
                    writer.copy_span(span.name, span)
                elif job is not None:
                    with mapped_tensor(span) as stored:
                        blocks = merge_tensor(job, stored.reshape(job.span.shape), ctx)
                        writer.write_blocks(span.name, checked_blocks(span.name, stored, blocks, pipeline.path,
                                                                      SINGLE_FILE_HINT))
                    stats.tensors_changed += 1
                else:
                    with mapped_tensor(span) as stored:
                        full = ctx.on_device(stored).float()  # a fresh fp32 copy: the one working tensor
                        result = apply(full, jobs[span.name], ctx)
                        rounded = check_result(span.name, stored, result.to(stored.dtype).cpu(), pipeline.path,
                                               SINGLE_FILE_HINT)
                        writer.write_tensor(span.name, rounded)
                    stats.tensors_changed += 1
                stats.bytes_read += span.nbytes
                stats.tensors_total += 1
        stats.bytes_written = writer.bytes_written
    stats.shards, stats.out = 1, str(out)


def _run(base: Path | str, adapters, out: Path | str, apply: Apply, *, force: bool, overwrite: bool,
         device: str, what: str) -> StreamStats:
    start = time.perf_counter()
    out = Path(out)
    check_weights(adapters)
    check_output_path(out, [Path(base)] + stored_paths(adapters))
    pipeline = SingleFilePipeline(base)
    loaded = load_adapters(adapters)
    jobs = slice_jobs(loaded, pipeline, adapter_paths(adapters), force)
    torch_device = resolve_device(device)
    ctx = MathContext(torch_device)
    stats = StreamStats(device=str(torch_device))
    with exact_math(torch_device), torch.no_grad():
        _stream(pipeline, jobs, out, apply, ctx, stats, overwrite)
    weights = sum(len(j) for j in jobs.values())
    stats.notes.append(f"single-file checkpoint: {what} {weights} adapted weight(s) in {len(jobs)} stored tensor(s); "
                       "every other tensor copied byte for byte; names, dtypes and metadata kept")
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    return stats


def merge_single_file(base: Path | str, adapters, out: Path | str, *, force: bool = False, overwrite: bool = False,
                      device: str = "auto") -> StreamStats:
    """Merge weighted adapters into a single-file SD 1.x/2.x/SDXL checkpoint, written in the same layout.

    Example:
        >>> merge_single_file("sd15.safetensors", [("a.safetensors", 1.0), ("b.safetensors", 0.5)],
        ...                   "merged.safetensors")  # doctest: +SKIP
    """
    return _run(base, adapters, out, apply_merge, force=force, overwrite=overwrite, device=device, what="merged")


def unmerge_single_file(merged: Path | str, adapters, out: Path | str, *, overwrite: bool = False,
                        device: str = "auto") -> StreamStats:
    """Subtract weighted adapters from a merged single-file checkpoint (additive methods, IA³/OFT/BOFT).

    Fingerprints are not checked: they describe the base, not the merged file.

    Example:
        >>> unmerge_single_file("merged.safetensors", ["a.safetensors"], "restored.safetensors")  # doctest: +SKIP
    """
    return _run(merged, adapters, out, apply_unmerge, force=True, overwrite=overwrite, device=device,
                what="unmerged")
