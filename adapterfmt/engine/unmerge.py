"""Streaming unmerge: W = round(fp32(W') − Σ wᵢ·ΔWᵢ), one rounding, with an optional check against the base.

PEFT unmerges with ``W -= ΔW.to(W.dtype)``, rounding ΔW first and the difference again;
subtracting the fp32 ΔW and rounding once restores more elements bit-exactly, and no
element can end further from the original than one ulp of the merged value
(|round(W'−ΔW) − W| ≤ 2·|W' − (W+ΔW)| ≤ ulp(W')). Exact restoration in general needs
the pristine bytes (methods.md §11), which is what ``--base`` verification measures.

Methods whose ΔW depends on the base (DoRA) cannot be inverted from the merged weight
alone: DoRA's W' = (m/n)·(W + sBA) with n = ‖W + sBA‖_row, and for every per-row c > 0
the base c·W' − sBA merges to the same W' (its row norm is c·|m|, so the factor m/n
undoes c). The merged file does not determine n, so a fixed-point iteration has nothing
to converge to. Those methods are therefore refused unless ``--base`` is given, in which
case ΔW is computed against that base (as the merge did).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import check_output_path
from ..errors import InputIOError, UsageError
from ..methods import get_method
from .devices import exact_math, resolve_device
from .merge import MathContext, _fan, adapter_paths, check_weights, delta_sum, load_adapters
from .base import component_view
from .plan import StreamingCheckpoint, TensorJob, check_adapters, make_jobs, open_streaming, shard_jobs
from .stream import StreamStats, execute, peak_rss_bytes
from ..format.tensorio import mapped_tensor

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared float) dtype lie between ``a`` and ``b`` (int64).

    Example:
        >>> x = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
        >>> ulp_distance(x, torch.nextafter(x.float(), torch.tensor(2.0)).bfloat16()).tolist()
        [1, 1]
    """
    bits = _INT_OF_SIZE[a.element_size()]
    mask = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(t: torch.Tensor) -> torch.Tensor:
        raw = t.contiguous().view(bits).to(torch.int64)
        mag = raw & mask
        return torch.where(raw < 0, -mag, mag)  # sign-magnitude to a monotonic integer line

    return (ordered(a) - ordered(b)).abs()


@dataclass
class Verification:
    """Restored vs original base over the changed tensors."""

    elements: int = 0
    exact: int = 0
    max_ulps: int = 0
    max_merged_ulps: float = 0.0

    def add(self, restored: torch.Tensor, original: torch.Tensor, merged: torch.Tensor | None = None) -> None:
        dist = ulp_distance(restored.cpu(), original)
        self.elements += dist.numel()
        self.exact += int((dist == 0).sum())
        self.max_ulps = max(self.max_ulps, int(dist.max()) if dist.numel() else 0)
        if merged is not None and dist.numel():
            # Where |ΔW| >> |W| the merged value's rounding is many ulps of W; measured in ulps of
            # the merged value, a single-rounding unmerge stays within about one.
            error = (restored.cpu().double() - original.double()).abs()
            self.max_merged_ulps = max(self.max_merged_ulps, float((error / ulp_of(merged.cpu())).max()))

    def to_dict(self) -> dict:
        frac = self.exact / self.elements if self.elements else 1.0
        return {"elements_compared": self.elements, "elements_exact": self.exact, "fraction_exact": frac,
                "max_error_ulps": self.max_ulps, "max_error_merged_ulps": self.max_merged_ulps}


_PRECISION = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}


def ulp_of(values: torch.Tensor) -> torch.Tensor:
    """The spacing of ``values``' dtype at each value (float64), e.g. 2**-7 for bf16 1.0."""
    _, exponent = torch.frexp(values.double())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - _PRECISION[values.dtype])


def _base_tensor(base: StreamingCheckpoint | None, job: TensorJob, why: str):
    if base is None:
        raise UsageError(f"cannot unmerge {job.span.name!r} without the original base: {why}",
                         hint="pass --base BASE (the model the adapter was merged into)")
    return mapped_tensor(base.spans[job.span.name])


def unmerge_tensor(job: TensorJob, stored: torch.Tensor, ctx: MathContext, base: StreamingCheckpoint | None,
                   check: Verification | None) -> torch.Tensor:
    """The restored tensor for one job (CPU, stored dtype and layout)."""
    stored = ctx.on_device(stored)
    if job.replacement is not None and job.replacement.payload.kind != "bias_delta":
        with _base_tensor(base, job, "the adapter replaced the whole tensor") as original:
            result = ctx.to_output(original, job.out.dtype, False).clone()
    elif job.replacement is not None:
        rep = job.replacement
        tensor = rep.adapter.tensors[rep.payload.tensor.name].to(ctx.device).float()
        result = ctx.to_output(ctx.canonical32(stored, False).sub_(tensor, alpha=rep.weight), job.out.dtype, False)
    else:
        fan = _fan(job)
        first = job.updates[0]
        own = get_method(first.entry.method)
        if base is None and len(job.updates) == 1 and first.weight == 1.0 and own.unmerges_without_base:
            # A multiplicative method undoes its own merge (IA³ divides, OFT/BOFT rotate back).
            restored = own.unmerged(first.entry, ctx.module_tensors(first), ctx.canonical32(stored, fan),
                                    first.target)
            return ctx.to_output(restored, job.out.dtype, fan)
        if base is not None and len(job.updates) == 1 and first.weight == 1.0 and own.restores_from_base:
            # Replaced rows come back from the original base itself (trainable tokens): bit-exact.
            with _base_tensor(base, job, "") as orig:
                original = ctx.on_device(orig).float()
                restored = own.unmerged_with_base(first.entry, ctx.module_tensors(first), ctx.canonical32(stored, fan),
                                                  original.transpose(-2, -1) if fan else original)
            result = ctx.to_output(restored, job.out.dtype, fan)
        else:
            # Δ first (a base-dependent ΔW uses the fp32 buffer), then fp32(W') − Δ in it; one rounding.
            total = _total_delta(job, stored, ctx, base, fan)
            result = ctx.to_output(ctx.canonical32(stored, fan).sub_(total), job.out.dtype, fan)
    if check is not None and base is not None and job.changed:
        with mapped_tensor(base.spans[job.span.name]) as original:
            if original.shape == result.shape:
                # A merge --dtype bf16 output is compared with the base rounded to bf16: the best any
                # unmerge into that dtype can restore.
                check.add(result, original.to(result.dtype), stored if job.replacement is None else None)
    return result


def _total_delta(job: TensorJob, stored: torch.Tensor, ctx: MathContext, base: StreamingCheckpoint | None,
                 fan: bool) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ of a job: against the original base when a method's ΔW depends on it (then required)."""
    if any(get_method(u.entry.method).needs_base for u in job.updates):
        names = sorted({u.entry.method for u in job.updates if get_method(u.entry.method).needs_base})
        with _base_tensor(base, job, f"{', '.join(names)} is not invertible from the merged weight") as orig:
            return delta_sum(job.updates, ctx.on_device(orig), ctx, fan)
    return delta_sum(job.updates, stored, ctx, fan)


def unmerge(merged_dir: Path | str, adapters, out_dir: Path | str, *, base: Path | str | None = None,
            force: bool = False, overwrite: bool = False, progress: bool = False, device: str = "auto",
            shard_size: int | None = None) -> StreamStats:
    """Subtract adapters (each with its merge weight) from a merged model; verify against ``base`` if given.

    Example:
        >>> s = unmerge("merged", [("a.safetensors", 1.0)], "restored", base="tiny-llama")  # doctest: +SKIP
        >>> s.verification["fraction_exact"]  # doctest: +SKIP
        0.987
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_weights(adapters)
    inputs = [Path(merged_dir)] + ([Path(base)] if base else [])
    check_output_path(out_dir, inputs + [Path(a) for a, _ in adapters if isinstance(a, (str, Path))])
    torch_device = resolve_device(device)
    if not Path(merged_dir).exists():
        raise InputIOError("merged model not found", path=merged_dir, hint="check the --merged path")
    merged = open_streaming(merged_dir)
    original = open_streaming(base) if base else None
    loaded = [(component_view(a, merged, p), w) for (a, w), p in zip(load_adapters(adapters), adapter_paths(adapters))]
    if original is None:
        _require_invertible(loaded, adapter_paths(adapters))
    paths = adapter_paths(adapters)
    check_adapters(loaded, merged, True, paths)  # fingerprints describe the base, not the merged model
    if original is not None:
        check_adapters(loaded, original, force, paths)
        _check_same_layout(merged, original)
    plan = shard_jobs(make_jobs(merged, loaded, "keep"), shard_size, merged.weights_stem)
    ctx = MathContext(torch_device)
    ctx.reserve(plan.jobs)
    check = Verification() if original is not None else None
    stats = StreamStats(device=str(torch_device))
    with exact_math(torch_device), torch.no_grad():
        execute(plan, merged, out_dir, lambda job, stored: unmerge_tensor(job, stored, ctx, original, check),
                stats, overwrite=overwrite, progress=progress, desc="unmerge")
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    if check is not None:
        stats.verification = check.to_dict()
    return stats


def _require_invertible(loaded, paths) -> None:
    """Refuse, before anything is read or written, adapters whose ΔW needs the original base (DoRA)."""
    for (adapter, _), path in zip(loaded, paths):
        names = sorted({e.method for e in adapter.manifest.modules.values()
                        if get_method(e.method).needs_base and not get_method(e.method).unmerges_without_base})
        if names:
            raise UsageError(f"{', '.join(names)} is not invertible from the merged weight", path=path,
                             hint="pass --base BASE (the model the adapter was merged into)")


def _check_same_layout(merged: StreamingCheckpoint, original: StreamingCheckpoint) -> None:
    from ..errors import BaseMismatchError
    for name, span in merged.spans.items():
        other = original.spans.get(name)
        if other is None or other.shape != span.shape:
            raise BaseMismatchError(f"merged tensor {name!r} ({span.dtype}{list(span.shape)}) has no match in "
                                    "the base", path=original.path,
                                    hint="pass the base the model was merged from")
