"""``merge`` / ``unmerge`` for users: resolve ``hf://`` paths and adapter specs, then run the engine."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..engine.merge import merge as engine_merge
from ..engine.merge_single_file import merge_single_file, unmerge_single_file
from ..engine.stream import StreamStats
from ..engine.unmerge import unmerge as engine_unmerge
from ..errors import UsageError
from ..format import Adapter
from .hub import resolve_path

AdapterSpec = Path | str | Adapter | tuple


def adapter_list(adapters: Sequence[AdapterSpec] | AdapterSpec) -> list[tuple[Path | Adapter, float]]:
    """Normalise ``"a.safetensors"``, ``("a.safetensors", 0.7)`` or an :class:`Adapter` to (source, weight).

    Example:
        >>> adapter_list(["a.safetensors", ("b.safetensors", 0.5)])
        [(PosixPath('a.safetensors'), 1.0), (PosixPath('b.safetensors'), 0.5)]
    """
    if isinstance(adapters, (str, Path, Adapter)):
        adapters = [adapters]
    out = []
    for item in adapters:
        source, weight = (item if isinstance(item, tuple) else (item, 1.0)) if not isinstance(item, Adapter) \
            else (item, 1.0)
        if isinstance(item, tuple) and len(item) != 2:
            raise UsageError(f"adapter {item!r} is not (path, weight)", hint="pass paths or (path, weight) pairs")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UsageError(f"adapter weight {weight!r} is not a number", hint="pass (path, weight) pairs")
        out.append((source if isinstance(source, Adapter) else resolve_path(source), float(weight)))
    if not out:
        raise UsageError("no adapter given", hint="pass at least one adapter file")
    return out


def merge(base: Path | str, adapters: Sequence[AdapterSpec] | AdapterSpec, out: Path | str, **options) -> StreamStats:
    """Merge adapters (each with a weight) into a base model, streaming, into a new directory.

    Example:
        >>> merge("tiny-llama", [("a.safetensors", 0.7), ("b.safetensors", 0.3)], "merged")  # doctest: +SKIP
    """
    base = resolve_path(base)
    if base.is_file() and base.suffix.lower() == ".gguf":
        from .merge_gguf import merge_gguf
        unsupported = sorted(k for k, v in options.items() if v not in (None, False, "keep", "auto")
                             and k not in ("gguf_type", "force", "overwrite", "progress"))
        if unsupported:
            raise UsageError(f"--{unsupported[0].replace('_', '-')} does not apply to a GGUF base",
                             hint="a GGUF merge takes --gguf-type, --force and --overwrite")
        return merge_gguf(base, adapter_list(adapters), out, gguf_type=options.get("gguf_type") or "keep",
                          force=options.get("force", False), overwrite=options.get("overwrite", False))
    options.pop("gguf_type", None)
    if is_single_file_checkpoint(base):
        _refuse_options(options, "a single-file checkpoint base", "--force, --overwrite and --device")
        _require_single_file_out(out)
        return merge_single_file(base, adapter_list(adapters), out, force=options.get("force", False),
                                 overwrite=options.get("overwrite", False), device=options.get("device", "auto"))
    return engine_merge(base, adapter_list(adapters), out, **options)


def is_single_file_checkpoint(path: Path) -> bool:
    """A .safetensors file in an original LDM/SGM/BFL layout (not a diffusers or transformers directory)."""
    from ..checkpoint import BaseCheckpoint
    from ..checkpoint.diffusers_checkpoint import single_file_layout
    return path.is_file() and path.suffix.lower() == ".safetensors" and bool(single_file_layout(BaseCheckpoint(path)))


def _require_single_file_out(out: Path | str) -> None:
    """A single-file result is one .safetensors file: an output without that suffix (often meant as a
    directory, as for the other merges) would become a file of that name, which no loader recognises."""
    if Path(out).suffix.lower() != ".safetensors":
        raise UsageError(f"the output {str(out)!r} is not a .safetensors file name; a merge with a single-file "
                         "base writes one single-file checkpoint", hint="pass --out NAME.safetensors")


def _refuse_options(options: dict, what: str, allowed: str) -> None:
    """Options the single-file path ignores are refused rather than silently dropped."""
    unsupported = sorted(k for k, v in options.items() if v not in (None, False, "keep", "auto")
                         and k not in ("force", "overwrite", "progress", "device"))
    if unsupported:
        raise UsageError(f"--{unsupported[0].replace('_', '-')} does not apply to {what}",
                         hint=f"the output keeps the input's dtypes and layout; it takes {allowed}")


def unmerge(merged: Path | str, adapters: Sequence[AdapterSpec] | AdapterSpec, out: Path | str, *,
            base: Path | str | None = None, **options) -> StreamStats:
    """Subtract adapters from a merged model; with ``base``, report how exactly the original came back.

    Example:
        >>> unmerge("merged", ["a.safetensors"], "restored", base="tiny-llama")  # doctest: +SKIP
    """
    merged = resolve_path(merged)
    if is_single_file_checkpoint(merged):
        if base is not None:
            raise UsageError("--base (verification) is not supported for a single-file unmerge",
                             hint="run without --base; compare the result with the original file yourself")
        _refuse_options(options, "a single-file checkpoint", "--overwrite and --device")
        _require_single_file_out(out)
        return unmerge_single_file(merged, adapter_list(adapters), out, overwrite=options.get("overwrite", False),
                                   device=options.get("device", "auto"))
    return engine_unmerge(merged, adapter_list(adapters), out,
                          base=None if base is None else resolve_path(base), **options)
