"""Meta-only planning of a merge or unmerge: which tensor gets what, which output shard it lands in.

Nothing here reads tensor data (except the fingerprint samples of targeted weights), so
the whole output header is known before the first byte is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BaseMismatchError, UsageError
from ..format import Adapter, Payload
from ..format.dtypes import FLOAT_DTYPES, dtype_name
from ..checkpoint import BaseCheckpoint
from ..checkpoint.bnb_checkpoint import BnbCheckpoint, PackedSpan, is_bnb_quantized, refuse_foreign_quantization
from ..checkpoint.diffusers_checkpoint import (DiffusersComponent, is_component_dir, is_pipeline_dir,
                                              single_file_layout)
from ..format.tensorio import TensorSpan
from .base import bind_base, shape_mismatch
from .writer import OutTensor

OUT_DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}


class StreamingCheckpoint(BaseCheckpoint):
    """A BaseCheckpoint read in file order, for the streaming engine.

    Example:
        >>> ckpt = StreamingCheckpoint("tiny-llama")  # doctest: +SKIP
        >>> ckpt.spans["lm_head.weight"].nbytes  # doctest: +SKIP
        32768
    """

    #: Output weight files are ``<stem>.safetensors`` (or sharded with an index), as the base's library names them.
    weights_stem = "model"

    def ordered(self) -> list[TensorSpan]:
        """Spans in shard order, then file order (sequential reads)."""
        rank = {p: i for i, p in enumerate(self.shard_files)}
        return sorted(self.spans.values(), key=lambda s: (rank[s.path], s.start))


class BnbStreamingCheckpoint(StreamingCheckpoint, BnbCheckpoint):
    """A bitsandbytes-quantized base read in file order; its quantized weights come dequantized."""


class StreamingDiffusersComponent(DiffusersComponent, StreamingCheckpoint):
    """A diffusers component directory (UNet, transformer, VAE) for the streaming engine."""

    weights_stem = "diffusion_pytorch_model"


def open_streaming(path: Path | str) -> StreamingCheckpoint:
    """The streaming reader for a base directory: diffusers component or transformers model.

    Example:
        >>> open_streaming("sd15/unet").weights_stem  # doctest: +SKIP
        'diffusion_pytorch_model'
    """
    path = Path(path)
    if is_pipeline_dir(path):
        raise UsageError("cannot merge into a whole pipeline directory", path=path,
                         hint="merge into one component directory (e.g. PIPELINE/unet); a multi-component adapter "
                              "applies the modules of that component")
    if is_component_dir(path):
        return StreamingDiffusersComponent(path)
    checkpoint = StreamingCheckpoint(path)
    refuse_foreign_quantization(checkpoint)
    if is_bnb_quantized(checkpoint.config):
        return BnbStreamingCheckpoint(path)
    if path.is_file() and single_file_layout(checkpoint):
        raise UsageError(f"a single-file {single_file_layout(checkpoint)} checkpoint is not a model directory",
                         path=path, hint="adapterfmt merge / unmerge write it in its own layout "
                                         "(engine/merge_single_file.py)")
    return checkpoint


def open_streaming_base(path: Path | str) -> StreamingCheckpoint:
    """Alias of :func:`open_streaming` (the name the quantized-base code uses)."""
    return open_streaming(path)


@dataclass
class Update:
    """One adapter module applied to one base tensor with a weight."""

    adapter: Adapter
    weight: float
    target: str

    @property
    def entry(self):
        return self.adapter.manifest.modules[self.target]


@dataclass
class Replacement:
    """A payload applied to one base tensor (bias delta, or a whole new tensor)."""

    adapter: Adapter
    weight: float
    payload: Payload


@dataclass
class TensorJob:
    """What happens to one tensor: copied raw, converted, merged (updates) or replaced."""

    span: TensorSpan
    out: OutTensor
    updates: list[Update] = field(default_factory=list)
    replacement: Replacement | None = None
    #: the base form to merge into (dequant(quant(W)), engine/base_form.py); None: the stored weight
    form: object | None = None
    #: the stored weight is the transpose of what the quantizer sees (GPT-2 Conv1D)
    form_transposed: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.updates) or self.replacement is not None or self.form is not None

    @property
    def raw_copy(self) -> bool:
        return (not self.changed and self.out.dtype == self.span.dtype and self.out.shape == self.span.shape
                and not isinstance(self.span, PackedSpan))


@dataclass
class Plan:
    """Output shards (file name, jobs) in write order."""

    shards: list[tuple[str, list[TensorJob]]]
    stem: str = "model"

    @property
    def index_name(self) -> str:
        """``model.safetensors.index.json`` (transformers) or ``diffusion_pytorch_model.safetensors.index.json``."""
        return f"{self.stem}.safetensors.index.json"

    @property
    def jobs(self) -> list[TensorJob]:
        return [job for _, jobs in self.shards for job in jobs]

    @property
    def total_bytes(self) -> int:
        return sum(job.out.nbytes for job in self.jobs)


def check_adapters(adapters: list[tuple[Adapter, float]], base: StreamingCheckpoint, force: bool,
                   paths: list[str | None] | None = None) -> None:
    """Refuse adapters that do not fit ``base`` (names, shapes; fingerprints unless ``force``).

    ``paths`` name the adapter files in the messages.
    """
    for (adapter, _), path in zip(adapters, paths or [None] * len(adapters)):
        for target, entry in adapter.manifest.modules.items():
            shape = base.shape(entry.base_weight)
            want = stored_shape(entry)
            if list(shape) != want:
                error = shape_mismatch(entry.base_weight, shape, want, path or base.path)
                raise type(error)(f"module {target!r}: {error.message}", path=error.path, hint=error.hint)
        if not force:
            bind_base(adapter, base, path, check_only=True,
                      force_hint="use the base the adapter was made for, or pass --force")


def stored_shape(entry) -> list[int]:
    """The base parameter's shape as stored (see :meth:`ModuleEntry.stored_shape`)."""
    return entry.stored_shape()


def output_dtype(span: TensorSpan, dtype: str) -> str:
    want = OUT_DTYPES[dtype]
    return want if want is not None and span.dtype in FLOAT_DTYPES else span.dtype


def make_jobs(base: StreamingCheckpoint, adapters: list[tuple[Adapter, float]], dtype: str = "keep"
              ) -> list[TensorJob]:
    """One job per base tensor, in read order, with the updates and replacements that touch it."""
    updates: dict[str, list[Update]] = {}
    replacements: dict[str, Replacement] = {}
    for adapter, weight in adapters:
        for target, entry in adapter.manifest.modules.items():
            updates.setdefault(base.stored_key(entry.base_weight), []).append(Update(adapter, float(weight), target))
        for payload in adapter.manifest.payloads.values():
            base._require(payload.target)
            if base.stored_key(payload.target) in replacements:
                raise UsageError(f"two adapters replace {payload.target!r}", hint="merge them one at a time")
            if payload.kind != "bias_delta" and weight != 1.0:
                raise UsageError(f"payload {payload.target!r} replaces a whole tensor and cannot be weighted",
                                 hint="merge this adapter with weight 1")
            replacements[base.stored_key(payload.target)] = Replacement(adapter, float(weight), payload)
    aliases: dict[str, list[str]] = {}
    touched = {name for name, ups in updates.items() if touches_one_use(base, name, ups)}
    for alias in untied_aliases(base, touched | set(replacements)):
        aliases.setdefault(base.tied_weights[alias], []).append(alias)
    jobs = []
    for span in base.ordered():
        # A tied alias the adapters touch (or whose source they touch) becomes its own tensor, written
        # right after its source: the merged model must compute what base + adapter computed.
        for name in [span.name] + aliases.get(span.name, []):
            jobs.append(_job(span, name, updates.get(name, []), replacements.get(name), dtype))
    return jobs


def _job(span: TensorSpan, name: str, updates: list[Update], rep: Replacement | None, dtype: str) -> TensorJob:
    if rep is not None and rep.payload.kind == "bias_delta" and updates:
        raise UsageError(f"{name!r} gets both a bias delta and a module update", hint="merge these adapters one at a time")
    shape = tuple(rep.payload.tensor.shape) if rep and rep.payload.kind != "bias_delta" else span.shape
    return TensorJob(span, OutTensor(name, output_dtype(span, dtype), shape), updates, rep)


def touches_one_use(base: BaseCheckpoint, name: str, updates: list[Update]) -> bool:
    """Whether these updates of ``name`` change one use of a tied weight only (so it must be untied).

    Methods that change the stored parameter itself (``changes_tied_uses``: trainable tokens, as PEFT
    ties them to the output head) change every use when they target the stored source.

    Example:
        >>> touches_one_use(base, "model.embed_tokens.weight", updates)  # doctest: +SKIP
        False
    """
    from ..methods import get_method
    return name in base.tied_weights or not all(get_method(u.entry.method).changes_tied_uses for u in updates)


def untied_aliases(base: BaseCheckpoint, touched: set[str]) -> list[str]:
    """Tied aliases (``lm_head.weight``) that must be written untied because an adapter touches them or
    their source (``embed_tokens``): PEFT applies such an adapter to one of the two uses only.

    Example:
        >>> untied_aliases(base, {"model.embed_tokens.weight"})  # doctest: +SKIP
        ['lm_head.weight']
    """
    return sorted(alias for alias, source in base.tied_weights.items() if alias in touched or source in touched)


def shard_names(count: int, stem: str = "model") -> list[str]:
    """transformers' / diffusers' shard names: ``model.safetensors`` or ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def shard_jobs(jobs: list[TensorJob], shard_size: int | None, stem: str = "model") -> Plan:
    """Group jobs into output shards: like the source when ``shard_size`` is None, else greedily by bytes.

    A tensor larger than ``shard_size`` gets a shard of its own.

    Example:
        >>> shard_jobs(jobs, 5 * 10**9)  # doctest: +SKIP
    """
    groups: list[list[TensorJob]] = []
    if shard_size is None:
        by_file: dict[Path, list[TensorJob]] = {}
        for job in jobs:
            by_file.setdefault(job.span.path, []).append(job)
        groups = list(by_file.values())
    else:
        if shard_size <= 0:
            raise UsageError(f"--shard-size must be positive, got {shard_size}")
        size = 0
        for job in jobs:
            if not groups or size + job.out.nbytes > shard_size and size > 0:
                groups.append([])
                size = 0
            groups[-1].append(job)
            size += job.out.nbytes
    groups = groups or [[]]
    return Plan(list(zip(shard_names(len(groups), stem), groups)), stem)


def index_json(plan: Plan) -> dict:
    """The ``model.safetensors.index.json`` for a multi-shard plan."""
    params = sum(math.prod(job.out.shape) for job in plan.jobs)
    return {"metadata": {"total_size": plan.total_bytes, "total_parameters": params},
            "weight_map": {job.out.name: name for name, jobs in plan.shards for job in jobs}}




__all__ = ["StreamingCheckpoint", "open_streaming", "Update", "Replacement", "TensorJob", "Plan", "check_adapters", "make_jobs",
           "shard_jobs", "index_json", "output_dtype", "dtype_name", "untied_aliases"]
