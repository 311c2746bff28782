"""``convert``: read any format, optionally change method or rank, write any format, report every module."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import check_output_path
from ..conversion_report import EXACT_MATH, LOSSLESS, LOSSY, SCALE_FOLDED, ConversionReport
from ..engine.base import bind_base
from ..errors import LossyConversionError, UsageError
from ..format.container import require_finite
from ..formats import (FORMATS, AdapterFormat, ReadOptions, WriteOptions, detect_format,
                       format_for_output, get_format)
from ..formats._lowrank import base_config_summary
from ..methods import METHODS, get_method
from .hub import is_hub, resolve_path
from .load import load_base
from .method_conversion import convert_methods

STATUS_ORDER = [LOSSLESS, EXACT_MATH, SCALE_FOLDED, LOSSY]


def option_models() -> list[tuple[type, str]]:
    """Every typed option model with the flag that selects it (``--from x``, ``--to y``, ``--method m``)."""
    models = [(fmt.read_options, f"--from {fmt.name}") for fmt in FORMATS]
    models += [(fmt.write_options, f"--to {fmt.name}") for fmt in FORMATS]
    models += [(m.convert_options, f"--method {m.name}") for m in METHODS if m.convert_options is not None]
    return models


def option_fields() -> dict[str, list[str]]:
    """Every option name -> the selections (``--from x`` / ``--to y`` / ``--method m``) that take it."""
    fields: dict[str, list[str]] = {}
    for model, selector in option_models():
        for name in model.model_fields:
            fields.setdefault(name, []).append(selector)
    return fields


def _typed_options(model, given: dict[str, Any], where: str):
    from pydantic import ValidationError
    try:
        return model.model_validate({k: v for k, v in given.items() if k in model.model_fields and v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise UsageError(f"{flag}: {first['msg']}", hint=f"see adapterfmt convert --help ({where})") from None


def _check_unused(given: dict[str, Any], reader: AdapterFormat, writer: AdapterFormat, method: str | None) -> None:
    used = set(reader.read_options.model_fields) | set(writer.write_options.model_fields)
    into = get_method(method).convert_options if method else None
    used |= set(into.model_fields) if into is not None else set()
    fields = option_fields()
    for name, value in given.items():
        if value not in (None, False) and name not in used:
            flag = "--" + name.replace("_", "-")
            chosen = f"--from {reader.name} --to {writer.name}" + (f" --method {method}" if method else "")
            raise UsageError(f"{flag} does not apply to {chosen}",
                             hint=f"{flag} is for {', '.join(fields.get(name, ['nothing']))}")


def choose_writer(dst: Path, to: str | None) -> AdapterFormat:
    """The output format: ``--to``, else the one the destination's suffix names, else adapterfmt.

    A ``--to`` that contradicts the suffix (``--to peft out.gguf``) is refused.

    Example:
        >>> choose_writer(Path("adapter.gguf"), None).name
        'gguf'
    """
    by_suffix = format_for_output(dst)
    claimed = [f.name for f in FORMATS if f.can_write and dst.suffix.lower() in f.suffixes] if dst.suffix else []
    if to is None:
        return by_suffix or get_format("adapterfmt", writing=True)
    writer = get_format(to, writing=True)
    if claimed and writer.name not in claimed:
        raise UsageError(f"--to {writer.name} but the output name ends in {dst.suffix!r} (a {claimed[0]} file)",
                         path=dst, hint=f"name the output for {writer.name}, or use --to {claimed[0]}")
    return writer


def _merge_statuses(read_report: ConversionReport, *later: ConversionReport) -> list:
    statuses = {m.module: m for m in read_report.modules}
    for stage in later:
        for m in stage.modules:
            prev = statuses.get(m.module)
            if prev is None or STATUS_ORDER.index(m.status) >= STATUS_ORDER.index(prev.status):
                if prev is not None and prev.note and not m.note:
                    m.note = prev.note
                statuses[m.module] = m
    return [statuses[k] for k in sorted(statuses)]


def record_base_form(adapter, checkpoint, trained_on: str | None, options: dict[str, Any],
                     report: ConversionReport) -> None:
    """Fill ``base.quantization`` from ``--trained-on`` or the base's ``quantization_config``."""
    from ..engine.base_form import bnb_form, form_from_quantization_config
    if trained_on is None:
        if any(v not in (None, False) for v in options.values()):
            raise UsageError("--compute-dtype, --block-size, --double-quant and --load-dtype describe --trained-on",
                             hint="add --trained-on nf4 (or fp4, int8)")
        config = (checkpoint.config if checkpoint is not None else {}).get("quantization_config")
        form = form_from_quantization_config(config) if config else None
    else:
        form = bnb_form(trained_on, options.get("compute_dtype"), block_size=options.get("block_size"),
                        double_quant=bool(options.get("double_quant")), load_dtype=options.get("load_dtype"))
    if form is not None:
        adapter.manifest.base.quantization = form
        report.notes.append(f"recorded base form {form.scheme} (compute {form.compute_dtype}): merge reproduces it "
                            "by default (merge --base-form)")


def convert(src: Path | str, dst: Path | str, *, to: str | None = None, source_format: str | None = None,
            base: Path | str | None = None, method: str | None = None, allow_pickle: bool = False,
            overwrite: bool = False, strict: bool = False, method_options: dict[str, Any] | None = None,
            format_options: dict[str, Any] | None = None, resize: dict[str, Any] | None = None,
            for_target: str | None = None, trained_on: str | None = None,
            trained_options: dict[str, Any] | None = None) -> ConversionReport:
    """Convert an adapter between formats (and methods); returns the per-module report.

    ``format_options`` (and ``method_options``) hold the readers', writers' and method conversions'
    own options by field name (e.g. ``{"cuda_sm_count": 108}``, ``{"nola_basis": "64,32"}``); each
    takes the fields of its typed options model. ``for_target``
    (``vllm``, ``sglang``, ...) lays the adapter out so that consumer computes exactly our ΔW, or refuses.
    ``trained_on`` (``nf4``, ``fp4``, ``int8``, ``none``) records the base form the adapter was trained
    against, with ``trained_options`` {compute_dtype, block_size, double_quant, load_dtype}; without it
    a base whose config has a ``quantization_config`` records that.

    Example:
        >>> report = convert("peft-dir", "adapter.safetensors")  # doctest: +SKIP
        >>> report.worst  # doctest: +SKIP
        'lossless'
    """
    src, dst = resolve_path(src), Path(dst)
    check_output_path(dst, [src] + ([Path(base)] if base and not is_hub(base) else []))
    reader = get_format(source_format) if source_format else detect_format(src)
    writer = choose_writer(dst, to)
    given = {**(method_options or {}), **(format_options or {})}
    _check_unused(given, reader, writer, method)
    report = ConversionReport(source_format=reader.name, target_format=writer.name)
    read_report = ConversionReport()
    checkpoint = load_base(base)
    adapter = reader.read(src, ReadOptions(base=checkpoint, allow_pickle=allow_pickle,
                                           format=_typed_options(reader.read_options, given, f"--from {reader.name}")),
                          read_report)
    if checkpoint is not None and checkpoint.config:
        # Head counts, layer count etc. travel with the adapter (GGUF/MLX export need them later).
        adapter.manifest.source.setdefault("base_config", base_config_summary(checkpoint.config))
    require_finite(adapter, src)
    record_base_form(adapter, checkpoint, trained_on, trained_options or {}, report)
    if checkpoint is not None:
        claimed = adapter.manifest.base.name_or_path
        bind_base(adapter, checkpoint, str(src))
        if claimed and claimed != checkpoint.name_or_path:
            # The file names the model it claims; the fingerprints are of the base actually given.
            adapter.manifest.source["bound_base"] = checkpoint.name_or_path
            report.notes.append(f"the adapter names base {claimed!r}; fingerprints were taken from "
                                f"{checkpoint.name_or_path!r} (recorded as source.bound_base)")
    report.notes += read_report.notes
    method_report = ConversionReport()
    wanted = method
    if wanted is None and writer.writes_methods is not None:
        foreign = [m for m in adapter.manifest.methods() if m not in writer.writes_methods]
        if foreign:
            wanted = "lora"
            report.notes.append(f"{writer.name} cannot hold {', '.join(foreign)}: materialised as LoRA")
    if wanted is None and resize is not None and set(adapter.manifest.methods()) - {"lora", "dora"}:
        wanted = "lora"  # rank changes work on LoRA factors
    if wanted is not None:
        model = get_method(wanted).convert_options
        typed = _typed_options(model, given, f"--method {wanted}").model_dump() if model is not None else {}
        adapter = convert_methods(adapter, wanted, typed, method_report, base=checkpoint,
                                  dense={k: v for k, v in (resize or {}).items() if k in ("rank", "energy")})
    if resize is not None:  # {} = exact compaction; {"rank": N} or {"energy": F} truncate
        from .resize import resize_adapter
        adapter = resize_adapter(adapter, method_report, **resize)
    if for_target is not None:
        from .for_target import prepare_for_target
        adapter = prepare_for_target(adapter, for_target, method_report)
    if strict and method_report.worst == LOSSY:
        lossy = [m.module for m in method_report.modules if m.status == LOSSY]
        raise LossyConversionError(f"conversion is lossy for {len(lossy)} module(s) (first: {lossy[0]}) "
                                   "and --strict was given; nothing was written", path=src,
                                   hint="drop --strict to accept the measured loss")
    write_report = ConversionReport()
    writer.write(adapter, dst, write_report, WriteOptions(
        base=checkpoint, overwrite=overwrite, strict=strict,
        format=_typed_options(writer.write_options, given, f"--to {writer.name}")))
    report.modules = _merge_statuses(read_report, method_report, write_report)
    report.notes += write_report.notes
    return report
