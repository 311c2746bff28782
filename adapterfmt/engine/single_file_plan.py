"""Planning a merge into (or unmerge from) a single-file checkpoint: which stored rows each module changes.

Each adapter module names a diffusers weight (``<component>.<parameter>``); the single-file base says,
from diffusers' own conversion (checkpoint/single_file_map.py), which rows of which stored tensor that
weight is. A stored tensor may hold several diffusers weights (OpenCLIP's fused ``in_proj_weight`` is
q, k and v): each gets its own :class:`SliceJob`. Nothing here reads tensor data except fingerprints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.single_file import SingleFilePipeline
from ..checkpoint.single_file_map import Source
from ..errors import BaseMismatchError, UsageError
from ..format import Adapter
from ..format.components import split_components
from .base import bind_base
from .plan import Update


@dataclass
class SliceJob:
    """Every update of one diffusers weight, and where that weight is stored."""

    name: str  # <component>.<parameter>, for messages
    source: Source
    updates: list[Update] = field(default_factory=list)


def component_views(adapter: Adapter, pipeline: SingleFilePipeline, path: str | None) -> dict[str, Adapter]:
    """{component: single-model view} of an adapter against the single-file pipeline.

    A multi-component adapter splits by its components; a single-model adapter goes to the one
    component whose architecture it records.

    Example:
        >>> component_views(sd_lora, SingleFilePipeline("sd15.safetensors"), None)  # doctest: +SKIP
    """
    if adapter.manifest.payloads:
        raise UsageError(f"the adapter has tensor payloads ({', '.join(sorted(adapter.manifest.payloads))}); "
                         "merging them into a single-file checkpoint is not supported", path=path,
                         hint="merge into a diffusers component directory instead")
    if adapter.manifest.components:
        views = split_components(adapter)
        for component in views:
            pipeline.component(component)  # refuses a component the file does not hold, by name
        return views
    arch = adapter.manifest.base.architecture
    chosen = [c for c, ckpt in pipeline.components.items() if arch and ckpt.architecture == arch]
    if len(chosen) != 1:
        raise BaseMismatchError(f"cannot tell which component of the single-file checkpoint the adapter is for "
                                f"(it records architecture {arch or 'none'}; the file has "
                                f"{', '.join(sorted(pipeline.components))})", path=path,
                                hint="convert the adapter with --base pointing at the single file, which records "
                                     "its components")
    return {chosen[0]: adapter}


def slice_jobs(adapters: list[tuple[Adapter, float]], pipeline: SingleFilePipeline, paths: list[str | None],
               force: bool) -> dict[str, list[SliceJob]]:
    """{stored key: [SliceJob]} for every stored tensor the adapters change; refusals name the module."""
    by_weight: dict[tuple, SliceJob] = {}
    for (adapter, weight), path in zip(adapters, paths):
        for component, view in component_views(adapter, pipeline, path).items():
            checkpoint = pipeline.component(component)
            mine: dict[tuple, str] = {}
            for target, entry in view.manifest.modules.items():
                source = _placed(checkpoint, component, target, entry, path)
                # Two modules of one adapter on one weight ('text_model.encoder…' and 'encoder…' both resolve
                # in a single file) would both be added: the adapter is ambiguous, not a sum.
                other = mine.setdefault(_rows_key(source), target)
                if other != target:
                    raise UsageError(f"modules {component}.{other} and {component}.{target} both target "
                                     f"{component}.{entry.base_weight}", path=path,
                                     hint="the adapter is ambiguous (one weight, two modules); nothing was written")
                job = by_weight.setdefault(_rows_key(source), SliceJob(f"{component}.{entry.base_weight}", source))
                job.updates.append(Update(view, weight, target))
            if not force:
                bind_base(view, checkpoint, path, check_only=True,
                          force_hint="use the base the adapter was made for, or pass --force")
    jobs: dict[str, list[SliceJob]] = {}
    for job in by_weight.values():
        jobs.setdefault(job.source.stored, []).append(job)
    for stored, parts in jobs.items():
        _refuse_overlaps(stored, parts, pipeline)
    return jobs


def _rows_key(source: Source) -> tuple:
    rows = source.rows
    return (source.stored, (rows.start, rows.stop) if isinstance(rows, slice) else
            None if rows is None else tuple(rows.tolist()))


def _placed(checkpoint, component: str, target: str, entry, path: str | None) -> Source:
    if entry.fan_in_fan_out:
        raise UsageError(f"module {component}.{target} is stored (in, out); diffusion weights are (out, in)",
                         path=path, hint="this adapter is not for this checkpoint")
    if entry.base_weight not in checkpoint:
        why = checkpoint.unplaced.get(entry.base_weight) or checkpoint.unplaced.get(f"text_model.{entry.base_weight}")
        raise BaseMismatchError(f"module {component}.{target} targets {component}.{entry.base_weight}, which the "
                                "single-file checkpoint does not hold" + (f" exactly ({why})" if why else ""),
                                path=path, hint="the adapter was made for another model; merge into the diffusers "
                                                "pipeline it was made for")
    source = checkpoint.source(entry.base_weight)
    want = entry.stored_shape()
    if list(source.shape) != list(want):
        raise BaseMismatchError(f"module {component}.{target}: {component}.{entry.base_weight} has shape "
                                f"{list(source.shape)} in the single file, the adapter expects {want}", path=path,
                                hint="this adapter is for a different model")
    return source


def _refuse_overlaps(stored: str, parts: list[SliceJob], pipeline: SingleFilePipeline) -> None:
    """Two different diffusers weights on the same stored rows would be merged twice: refuse."""
    if len(parts) < 2:
        return
    rows = pipeline.stored.shape(stored)[0]
    seen = torch.zeros(rows, dtype=torch.bool)
    for part in parts:
        index = part.source.row_index(rows)
        if bool(seen[index].any()):
            raise UsageError(f"{part.name} shares rows of the stored tensor {stored!r} with another adapted "
                             "weight", path=pipeline.path, hint="merge the adapters one at a time")
        seen[index] = True


def stored_paths(adapters) -> list[Path]:
    return [Path(a) for a, _ in adapters if not isinstance(a, Adapter)]
