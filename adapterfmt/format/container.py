"""Read and write adapterfmt files (safetensors + manifest in the metadata)."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..atomic import atomic_file
from ..jsonio import MANIFEST_INT_LIMIT, strict_json_loads
from ..errors import HeaderError, InputIOError, ManifestError, TensorError
from .dtypes import dtype_name
from .header import read_checked_header
from .manifest import Manifest
from .schema import validate_manifest_dict
from .versions import (FORMAT_NAME, FORMAT_VERSION, KEY_FORMAT, KEY_MANIFEST, KEY_VERSION,
                       parse_version, refuse_features_newer_than, refuse_methods_newer_than,
                       version_for_manifest, version_string)

MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass
class Adapter:
    """An adapter in memory: the manifest and its tensors keyed by container name."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    version: tuple[int, int] = FORMAT_VERSION

    def module_tensors(self, target: str) -> dict[str, torch.Tensor]:
        """The tensors of one module keyed by role (``lora_A``, ``lora_B``, ...)."""
        entry = self.manifest.modules[target]
        return {role: self.tensors[ref.name] for role, ref in entry.tensors.items()}


def read_header(path: Path | str) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """Open a safetensors file and return (metadata, {tensor: (dtype, shape)}) without loading data.

    The Rust reader checks the header length, JSON, offsets, overlaps and byte lengths.

    Example:
        >>> meta, tensors = read_header("adapter.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputIOError("no such file" if not path.exists() else "not a regular file", path=path,
                           hint="check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            info = {}
            for name in handle.keys():
                sl = handle.get_slice(name)
                info[name] = (sl.get_dtype(), list(sl.get_shape()))
    except SafetensorError as exc:
        raise HeaderError(f"not a valid safetensors file ({exc})", path=path,
                          hint="the file is truncated or corrupt; re-download or re-export it") from None
    except OSError as exc:
        raise InputIOError(f"cannot read: {exc.strerror or exc}", path=path, hint="check permissions") from None
    read_checked_header(path)  # spec §1 rules the Rust reader lets through (duplicate members, entry members)
    return metadata, info


def parse_manifest(metadata: dict[str, str], path: str | None = None) -> tuple[Manifest, tuple[int, int]]:
    """Check the format keys and version, parse and schema-check the manifest."""
    if metadata.get(KEY_FORMAT) != FORMAT_NAME:
        raise ManifestError("not an adapterfmt file (no adapterfmt.format in the safetensors metadata)",
                            path=path, hint="convert it first: adapterfmt convert SRC DST --to adapterfmt")
    version = parse_version(metadata.get(KEY_VERSION, ""), path)
    text = metadata.get(KEY_MANIFEST)
    if text is None:
        raise ManifestError("the adapterfmt.manifest metadata key is missing", path=path,
                            hint="the file was damaged; re-export it")
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(text)} bytes, over the {MAX_MANIFEST_BYTES} limit", path=path,
                            hint="the file is malformed or hostile")
    try:
        data = strict_json_loads(text, int_limit=MANIFEST_INT_LIMIT)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest is not valid JSON ({exc})", path=path,
                            hint="the file was damaged; re-export it") from None
    refuse_methods_newer_than(data, version, path)
    refuse_features_newer_than(data, version, path)
    validate_manifest_dict(data, path, lenient=version[1] > FORMAT_VERSION[1])
    return Manifest.from_dict(data, path), version


def check_tensors_against_manifest(manifest: Manifest, info: dict[str, tuple[str, list[int]]],
                                   path: str | None = None) -> None:
    """Every claimed tensor exists with the claimed dtype/shape, and no tensor is unclaimed."""
    named = [ref.name for m in manifest.modules.values() for ref in m.tensors.values()]
    named += [p.tensor.name for p in manifest.payloads.values()]
    if len(set(named)) != len(named):
        twice = next(name for name in named if named.count(name) > 1)
        raise ManifestError(f"tensor {twice!r} is named by two roles or payloads", path=path,
                            hint="each role needs its own tensor; re-export the file")
    refs = manifest.tensor_refs()
    missing = sorted(set(refs) - set(info))
    if missing:
        raise TensorError(f"tensor {missing[0]!r} named in the manifest is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                          path=path, hint="the file is incomplete; re-export it")
    extra = sorted(set(info) - set(refs))
    if extra:
        raise TensorError(f"tensor {extra[0]!r} is not described by the manifest"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                          path=path, hint="the file was altered after writing; re-export it")
    for name, ref in refs.items():
        dtype, shape = info[name]
        if dtype != ref.dtype or list(shape) != list(ref.shape):
            raise ManifestError(f"tensor {name!r} is {dtype}{shape} but the manifest says "
                                f"{ref.dtype}{ref.shape}", path=path,
                                hint="the manifest disagrees with the tensors; re-export the file")


#: Allowed dtypes of every method role (spec/README.md §6); descriptors may narrow them per role.
FACTOR_DTYPES = ("F32", "F16", "BF16", "F64")
#: The integer roles of spec/README.md §6 (1.3): (method, role) -> allowed dtypes.
INTEGER_ROLES = {("trainable_tokens", "indices"): ("I64",)}


def check_manifest_rules(manifest: Manifest, path: str | None = None) -> None:
    """Method-independent rules of spec/README.md §6–§8: role dtypes, base.weights shapes, payload keys."""
    for target, entry in manifest.modules.items():
        for role, ref in entry.tensors.items():
            allowed = INTEGER_ROLES.get((entry.method, role), FACTOR_DTYPES)
            if ref.dtype not in allowed:
                raise TensorError(f"module {target!r}: role {role} is {ref.dtype}; allowed: "
                                  f"{', '.join(allowed)}", path=path,
                                  hint="the file was written by a broken tool; re-export it")
        if entry.layer == "conv2d" and entry.fan_in_fan_out:
            raise ManifestError(f"module {target!r}: a conv2d layer never has fan_in_fan_out (spec §4)", path=path,
                                hint="the manifest contradicts itself; re-export the file")
        listed = manifest.expected_weight(entry)
        want = entry.stored_shape()
        if listed is not None and list(listed.shape) != want:
            raise ManifestError(f"module {target!r}: base.weights lists {entry.base_weight!r} as {listed.shape}, "
                                f"but the module's shape means {want}", path=path,
                                hint="the manifest contradicts itself; re-export the file")
    for key, payload in manifest.payloads.items():
        if payload.target != key:
            raise ManifestError(f"payload {key!r} has target {payload.target!r}", path=path,
                                hint="a payload is keyed by its target; re-export the file")
        if payload.kind == "bias_delta" and payload.tensor.dtype not in FACTOR_DTYPES:
            raise TensorError(f"payload {key!r}: a bias_delta is {', '.join(FACTOR_DTYPES)}, not "
                              f"{payload.tensor.dtype} (spec §8)", path=path,
                              hint="the file was written by a broken tool; re-export it")


def read_adapter(path: Path | str) -> Adapter:
    """Read and structurally check an adapterfmt file (a local path; methods are checked a layer up).

    Example:
        >>> adapter = read_adapter("adapter.safetensors")  # doctest: +SKIP
        >>> list(adapter.manifest.modules)[:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """
    path = Path(path)
    metadata, info = read_header(path)
    manifest, version = parse_manifest(metadata, str(path))
    check_tensors_against_manifest(manifest, info, str(path))
    check_manifest_rules(manifest, str(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise HeaderError(f"cannot read tensor data ({exc})", path=path,
                          hint="the file is truncated or corrupt; re-export it") from None
    return Adapter(manifest=manifest, tensors=tensors, version=version)


def nonfinite_tensors(adapter: Adapter) -> dict[str, int]:
    """{tensor name: count of NaN/Inf values} for every floating tensor that has any."""
    counts = {}
    for name, tensor in adapter.tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                counts[name] = bad
    return counts


def require_finite(adapter: Adapter, path: Path | str | None = None) -> None:
    """Refuse NaN/Inf tensors before they are converted or merged into a model.

    Example:
        >>> require_finite(read_adapter("adapter.safetensors"), "adapter.safetensors")  # doctest: +SKIP
    """
    bad = nonfinite_tensors(adapter)
    if bad:
        name = next(iter(bad))
        raise TensorError(f"tensor {name!r} has {bad[name]} NaN/Inf value(s)"
                          + (f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""), path=path,
                          hint="the adapter is corrupt or training diverged; nothing was written")


def refs_for(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {name: (dtype_name(t.dtype), list(t.shape)) for name, t in tensors.items()}


def write_adapter(adapter: Adapter, path: Path | str, *, overwrite: bool = False) -> Path:
    """Write atomically: schema-check the manifest, save, reopen to verify, rename into place.

    Example:
        >>> write_adapter(adapter, "out.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    manifest = adapter.manifest
    manifest.created_by = manifest.created_by or f"adapterfmt {__version__}"
    data = json.loads(manifest.to_json())
    validate_manifest_dict(data, str(path))
    check_tensors_against_manifest(manifest, refs_for(adapter.tensors), str(path))
    check_manifest_rules(manifest, str(path))
    metadata = {KEY_FORMAT: FORMAT_NAME, KEY_VERSION: version_string(version_for_manifest(data)),
                KEY_MANIFEST: manifest.to_json(),
                "format": "pt"}
    tensors = {name: t.detach().contiguous().cpu() for name, t in adapter.tensors.items()}
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta, info = read_header(tmp)
            parse_manifest(meta, str(path))
    return path
