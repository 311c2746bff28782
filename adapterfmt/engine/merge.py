"""Streaming merge: W' = round(fp32(W) + Σ wᵢ·ΔWᵢ(W)), one tensor at a time, one rounding.

Every ΔWᵢ is computed by its method from the ORIGINAL base weight (canonical fp32
orientation), so a mix of methods and weights does not depend on their order. With one
adapter at weight 1 the method's own ``merged`` is used (DoRA's normalisation); for LoRA
this is fp32(W) + (B@A)·s rounded once, bit-identical to PEFT's ``merge_and_unload``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator

import torch

from ..atomic import check_output_path
from ..errors import UsageError
from ..format import Adapter
from ..methods import read_checked_adapter
from ..format.container import require_finite
from ..methods import get_method
from ..methods.descriptor import Method, take_rows
from .base_form import FormReport, plan_base_form, trained_weight
from .devices import exact_math, resolve_device
from .base import component_view
from .plan import (OUT_DTYPES, TensorJob, Update, check_adapters, make_jobs, open_streaming, shard_jobs,
                   touches_one_use, untied_aliases)
from .stream import BufferPool, StreamStats, execute, peak_rss_bytes
from ..format.dtypes import DTYPE_FROM_NAME

MergeSummary = StreamStats
#: fp32 bytes of one row block (128 rows of a 7B layer): small enough to stay in cache between the
#: upcast, GEMM, add and downcast passes; measured fastest of 1, 2, 4 and 16 MiB on 2 cores.
ROW_BLOCK_BYTES = 2 << 20


class MathContext:
    """Device, reused buffers and adapter tensors already moved to the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = BufferPool()
        self.form_report: FormReport | None = None
        self.measured: set[str] = set()  # quantized weights whose ‖W − dequant(quant(W))‖ / ‖ΔW‖ is reported
        self._tensors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def reserve(self, jobs: list[TensorJob]) -> None:
        """Allocate the reused buffers at their final size up front (no regrowth, no fragmentation).

        A tensor merged in row blocks needs buffers of one block only.
        """
        work = [(job, _block_fraction(job)) for job in jobs if not job.raw_copy]
        if work:
            largest = max(math.ceil(math.prod(job.span.shape) * f) for job, f in work)
            self.pool.get("base32", torch.float32, (largest,), self.device)
            out_bytes = max(math.ceil(job.out.nbytes * f) for job, f in work)
            for key in ("out0", "out1"):
                self.pool.get(key, torch.uint8, (out_bytes,))

    def module_tensors(self, update: Update) -> dict[str, torch.Tensor]:
        key = (id(update.adapter), update.target)
        if key not in self._tensors:
            self._tensors[key] = {role: t.to(self.device) for role, t in
                                  update.adapter.module_tensors(update.target).items()}
        return self._tensors[key]

    def on_device(self, stored: torch.Tensor) -> torch.Tensor:
        return stored if stored.device == self.device else stored.to(self.device)

    def canonical32(self, stored: torch.Tensor, fan_in_fan_out: bool, rows: slice | None = None) -> torch.Tensor:
        """The stored weight (or ``rows`` of it) upcast into a reused fp32 buffer, canonical (out, in)."""
        # transpose(-2, -1): the last two dims, so stacked experts (E, in, out) turn per expert.
        canon = take_rows(stored.transpose(-2, -1) if fan_in_fan_out else stored, rows)
        return self.pool.get("base32", torch.float32, canon.shape, self.device).copy_(canon)

    def to_output(self, result: torch.Tensor, dtype: str, fan_in_fan_out: bool, slot: int | None = None
                  ) -> torch.Tensor:
        """Round once into the output dtype, back in the stored orientation, on the CPU.

        With ``slot`` (0 or 1) the result always lands in that slot's own buffer, so a block can
        still be in flight to the disk while the next one is computed.
        """
        result = result.transpose(-2, -1) if fan_in_fan_out else result
        out_dtype = DTYPE_FROM_NAME[dtype]
        if slot is None and result.dtype == out_dtype and result.device.type == "cpu" and result.is_contiguous():
            return result
        key = "out" if slot is None else f"out{slot}"
        return self.pool.get(key, out_dtype, result.shape).copy_(result)


def _owned(delta: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``delta`` as fp32 that may be modified in place (a method may return one of its inputs)."""
    delta = delta.float()
    ptr = delta.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in inputs):
        delta = delta.clone()
    return delta


def delta_sum(updates: list[Update], base_weight: torch.Tensor, ctx: MathContext, fan: bool,
              rows: slice | None = None) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ in fp32, canonical orientation; each ΔWᵢ from ``base_weight`` (the original, stored layout).

    With ``rows``, only those rows of the sum (every method is then row-separable).
    """
    total = None
    for update in updates:
        method = get_method(update.entry.method)
        tensors = ctx.module_tensors(update)
        base32 = ctx.canonical32(base_weight, fan, rows) if method.needs_base else None
        delta = _owned(method.delta(update.entry, tensors, base32, rows),
                       list(tensors.values()) + ([base32] if base32 is not None else []))
        if update.weight != 1.0:
            delta.mul_(update.weight)
        total = delta if total is None else total.add_(delta)
    return total


def _fan(job: TensorJob) -> bool:
    fans = {u.entry.fan_in_fan_out for u in job.updates}
    if len(fans) > 1:
        raise UsageError(f"adapters disagree on the orientation of {job.span.name!r} (fan_in_fan_out)")
    return fans.pop() if fans else False


def row_blocks(job: TensorJob, fan: bool) -> list[slice | None]:
    """Row slices to merge one at a time, or ``[None]`` for the whole tensor at once.

    Blocks keep the fp32 working set at ``ROW_BLOCK_BYTES`` whatever the tensor size; the
    per-element arithmetic is the same as for the whole tensor. Stacked experts (3-D) merge whole.
    """
    methods = [get_method(u.entry.method) for u in job.updates]
    shape = job.span.shape
    if fan or len(shape) != 2 or job.replacement is not None or not methods \
            or not all(m.separable_rows(u.entry) for m, u in zip(methods, job.updates)):
        return [None]
    out_rows, in_cols = shape
    step = max(1, ROW_BLOCK_BYTES // max(1, in_cols * 4))
    if step >= out_rows:
        return [None]
    return [slice(start, min(out_rows, start + step)) for start in range(0, out_rows, step)]


def _block_fraction(job: TensorJob) -> float:
    """The share of a tensor's rows that one block holds (1.0 when merged whole)."""
    first = row_blocks(job, _fan(job))[0] if job.updates else None
    return 1.0 if first is None else (first.stop - first.start) / job.span.shape[0]


def base_for_merge(job: TensorJob, stored: torch.Tensor, ctx: MathContext) -> torch.Tensor:
    """The weight the updates are added to: the stored W, or dequant(quant(W)) for the trained base form.

    For an adapted quantized weight it also records ‖W − dequant(quant(W))‖ and ‖ΔW‖ in the report.
    """
    measure = bool(job.updates) and job.out.name in ctx.measured
    if job.form is None and not measure:
        return stored
    form = job.form or ctx.form_report.form
    quantizer_view = stored.t() if job.form_transposed else stored
    trained = trained_weight(quantizer_view.cpu(), form)
    trained = ctx.on_device(trained.t() if job.form_transposed else trained)
    merged_into = trained if job.form is not None else stored
    if measure:
        error = torch.linalg.vector_norm(stored.float() - trained.float())
        delta = torch.linalg.vector_norm(delta_sum(job.updates, merged_into, ctx, _fan(job)))
        ctx.form_report.add(job.out.name, float(error), float(delta))
    return merged_into


def merge_tensor(job: TensorJob, stored: torch.Tensor, ctx: MathContext) -> Iterator[torch.Tensor]:
    """The output tensor for one job as consecutive row blocks (CPU, output dtype, stored layout).

    Each block lives in a reused buffer: the caller must consume it before asking for the next.
    """
    stored = ctx.on_device(stored)
    if job.replacement is not None:
        rep = job.replacement
        tensor = rep.adapter.tensors[rep.payload.tensor.name].to(ctx.device)
        if rep.payload.kind == "bias_delta":
            tensor = ctx.canonical32(stored, False).add_(tensor.float(), alpha=rep.weight)
        if not job.updates:
            yield ctx.to_output(tensor, job.out.dtype, False, slot=0)
            return
        # A saved full tensor (PEFT's base_layer of a targeted embedding) is what modules adapt.
        stored = tensor.to(stored.dtype)
    else:
        stored = base_for_merge(job, stored, ctx)
    if not job.updates:
        yield ctx.to_output(stored, job.out.dtype, False, slot=0)
        return
    fan = _fan(job)
    first = job.updates[0]
    method = get_method(first.entry.method)
    own_merge = len(job.updates) == 1 and first.weight == 1.0 and type(method).merged is not Method.merged
    for index, rows in enumerate(row_blocks(job, fan)):
        if own_merge:
            result = method.merged(first.entry, ctx.module_tensors(first), ctx.canonical32(stored, fan, rows), rows)
        else:
            # fp32(W) + Δ in a reused fp32 buffer: the same sum as PEFT's in-place `weight += delta`.
            # Δ first: a method needing the base uses the same buffer while computing it.
            total = delta_sum(job.updates, stored, ctx, fan, rows)
            result = ctx.canonical32(stored, fan, rows).add_(total)
        yield ctx.to_output(result, job.out.dtype, fan, slot=index % 2)


def adapter_paths(adapters) -> list[str | None]:
    return [None if isinstance(a, Adapter) else str(a) for a, _ in adapters]


def check_weights(adapters) -> None:
    """Refuse NaN/Inf merge weights before anything is read."""
    for source, weight in adapters:
        if not math.isfinite(float(weight)):
            raise UsageError(f"adapter weight {weight} is not a finite number",
                             path=None if isinstance(source, Adapter) else source,
                             hint="give --adapter FILE:WEIGHT with a finite WEIGHT such as 0.5")


def load_adapters(adapters) -> list[tuple[Adapter, float]]:
    """Read the adapters, refusing NaN/Inf tensors (they would poison the merged model)."""
    loaded = [(a if isinstance(a, Adapter) else read_checked_adapter(a), float(w)) for a, w in adapters]
    for (adapter, _), path in zip(loaded, adapter_paths(adapters)):
        require_finite(adapter, path)
    return loaded


def merge(base_dir: Path | str, adapters: list[tuple[Path | str | Adapter, float]], out_dir: Path | str, *,
          dtype: str = "keep", force: bool = False, overwrite: bool = False, progress: bool = False,
          device: str = "auto", shard_size: int | None = None, base_form: str | None = None) -> StreamStats:
    """Merge adapters (each with a weight) into a base model directory, streaming, into a new directory.

    ``base_form``: ``trained`` merges into dequant(quant(W)) as the adapter was trained (QLoRA),
    ``original`` into the stored W; None: ``trained`` when the adapters record their base form.

    Example:
        >>> merge("tiny-llama", [("a.safetensors", 0.7), ("b.safetensors", 0.3)], "merged")  # doctest: +SKIP
    """
    start = time.perf_counter()
    if dtype not in OUT_DTYPES:
        from ..errors import UsageError
        raise UsageError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(OUT_DTYPES)}")
    out_dir = Path(out_dir)
    check_weights(adapters)
    check_output_path(out_dir, [Path(base_dir)] + [Path(a) for a, _ in adapters if not isinstance(a, Adapter)])
    torch_device = resolve_device(device)
    base = open_streaming(base_dir)
    loaded = [(component_view(a, base, p), w) for (a, w), p in zip(load_adapters(adapters), adapter_paths(adapters))]
    check_adapters(loaded, base, force, adapter_paths(adapters))
    jobs = make_jobs(base, loaded, dtype)
    ctx = MathContext(torch_device)
    stats = StreamStats(device=str(torch_device))
    plan_base_form(jobs, base, loaded, base_form, ctx, stats)
    plan = shard_jobs(jobs, shard_size, base.weights_stem)
    untied = untied_aliases(base, {job.out.name for job in plan.jobs if job.replacement
                                   or job.updates and touches_one_use(base, job.out.name, job.updates)})
    ctx.reserve(plan.jobs)
    for alias in untied:
        stats.notes.append(f"untied {alias} from {base.tied_weights[alias]}: the adapter changes only one of the "
                           "two uses, so both are written and config.json says tie_word_embeddings: false")
    with exact_math(torch_device), torch.no_grad():
        execute(plan, base, out_dir, lambda job, stored: merge_tensor(job, stored, ctx), stats,
                overwrite=overwrite, progress=progress, out_dtype=OUT_DTYPES[dtype], desc="merge",
                untie=bool(untied))
    if base.path.is_file():
        stats.notes.append("base was a single file; no config copied")
    if ctx.form_report is not None:
        stats.base_form = ctx.form_report.to_dict()
        stats.notes += ctx.form_report.notes()
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    return stats
