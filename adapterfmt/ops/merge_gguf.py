"""Merge adapters into a llama.cpp GGUF model: dequantize with ``gguf``'s quants, add ΔW, write F16/F32 or requantize.

Each targeted tensor is dequantized to fp32 (``gguf.quants.dequantize``), gets Σ w·ΔW in llama.cpp's
row order (q/k RoPE-permuted as convert_hf_to_gguf does), and is written once: in a float type, or
requantized to the base tensor's own type by ``gguf.quants.quantize``. Every other tensor and every
metadata key is copied as is. Tensors are read and written one at a time (the header first). A split
model (``x-00001-of-00003.gguf``, given by its first file) is read as one and written as one file.

The requantization error ‖requant(W+ΔW) − (W+ΔW)‖ is reported per layer against ‖ΔW‖; at 1 or more
the adapter would be lost in the rounding, and that is refused (naming the layers) unless ``force``.
"""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file, check_output_path
from ..engine.merge import MathContext, check_weights, delta_sum, load_adapters
from ..engine.plan import Update
from ..engine.stream import StreamStats, peak_rss_bytes
from ..errors import BaseMismatchError, InputIOError, TensorError, UsageError
from ..formats.gguf_arch import ARCHITECTURES, default_hf_arch, row_layout, row_permutation
from ..formats.gguf_lora import hf_to_gguf
FLOAT_TYPES = ("F32", "F16")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("merging into a GGUF model needs the 'gguf' package", hint="pip install gguf") from None
    return gguf


def quantizable_types() -> list[str]:
    """GGUF types ``gguf``'s quants can write (tried on one block each).

    Example:
        >>> "Q8_0" in quantizable_types()
        True
    """
    gguf = _gguf()
    names = []
    for qtype in gguf.GGMLQuantizationType:
        block, _ = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not block:
            continue
        try:
            gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
            names.append(qtype.name)
        except (NotImplementedError, ValueError, AssertionError):
            continue
    return names


SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFModel:
    """A GGUF model, one file or llama.cpp split files (``x-00001-of-00003.gguf``), as one tensor list.

    Example:
        >>> GGUFModel(Path("model-00001-of-00002.gguf")).field("general.architecture")  # doctest: +SKIP
        'llama'
    """

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = path
        self.readers = [self._open(gguf, shard) for shard in self._shards(path)]
        self.tensors = [t for reader in self.readers for t in reader.tensors]
        self._file = {t.name: Path(reader.data.filename) for reader in self.readers for t in reader.tensors}
        # The first split holds the metadata; every split adds its own split.* keys.
        self.fields = {k: f for k, f in self.readers[0].fields.items() if not k.startswith("split.")}

    @staticmethod
    def _open(gguf, shard: Path):
        try:
            return gguf.GGUFReader(shard)
        except (ValueError, OSError) as exc:
            raise InputIOError(f"not a readable GGUF file ({exc})", path=shard, hint="check --base") from None

    @staticmethod
    def _shards(path: Path) -> list[Path]:
        match = SPLIT_RE.match(path.name)
        if not match:
            return [path]
        count = int(match["count"])
        shards = [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise InputIOError(f"split GGUF is missing {', '.join(missing)}", path=path,
                               hint="download every split of the model next to the first")
        return shards

    def field(self, key: str):
        field = self.fields.get(key) or self.readers[0].get_field(key)
        return None if field is None else field.contents()

    def data(self, tensor) -> np.ndarray:
        """One tensor's stored data, read into its own buffer.

        Not through the reader's map of the whole file: pages touched there stay resident, so peak
        RSS would grow with the model instead of the largest tensor.
        """
        path = self._file[tensor.name]
        with open(path, "rb") as handle:
            raw = os.pread(handle.fileno(), int(tensor.n_bytes), int(tensor.data_offset))
        if len(raw) != tensor.n_bytes:
            raise InputIOError(f"tensor {tensor.name!r} is cut short", path=path,
                               hint="the GGUF file is truncated; re-download it")
        return np.frombuffer(raw, dtype=tensor.data.dtype).reshape(tensor.data.shape)


def _hf_architecture(reader, adapters) -> str:
    """The transformers architecture whose per-architecture table names and orders the GGUF's tensors."""
    gguf_arch = reader.field("general.architecture")
    recorded = {a.manifest.base.architecture for a, _ in adapters} - {None}
    hf_arch = next(iter(recorded)) if len(recorded) == 1 else default_hf_arch(gguf_arch)
    if hf_arch not in ARCHITECTURES:
        raise UsageError(f"GGUF architecture {gguf_arch!r} is not covered", hint=f"covered: {', '.join(ARCHITECTURES)}")
    return hf_arch


def _gguf_config(reader) -> dict:
    """Head counts from the GGUF's own metadata, under transformers' config names (for the row layouts)."""
    arch = reader.field("general.architecture")
    kv = reader.field(f"{arch}.attention.head_count_kv")
    return {"num_attention_heads": reader.field(f"{arch}.attention.head_count"), "num_key_value_heads": kv,
            "num_kv_heads": kv}


def _targets(reader, adapters, hf_arch: str) -> dict[str, list[Update]]:
    """GGUF tensor name -> the adapter updates it gets; shapes checked against the base."""
    shapes = {t.name: tuple(reversed([int(d) for d in t.shape])) for t in reader.tensors}
    blocks = int(reader.field(f"{reader.field('general.architecture')}.block_count") or 0) or None
    targets: dict[str, list[Update]] = {}
    for adapter, weight in adapters:
        if adapter.manifest.payloads:
            raise UsageError("adapters with payloads (modules_to_save, bias) cannot be merged into a GGUF model yet",
                             hint="merge into the safetensors base instead")
        for target, entry in adapter.manifest.modules.items():
            name = hf_to_gguf(target, hf_arch, blocks)
            if name not in shapes:
                raise BaseMismatchError(f"module {target!r}: the GGUF model has no tensor {name!r}",
                                        hint="this adapter is for a different model")
            if entry.fan_in_fan_out or shapes[name] != tuple(entry.shape):
                raise BaseMismatchError(f"module {target!r}: GGUF tensor {name!r} has shape {list(shapes[name])}, "
                                        f"the adapter expects {entry.shape}", hint="this adapter is for a different model")
            targets.setdefault(name, []).append(Update(adapter, float(weight), target))
    return targets


def _permutation(reader, updates: list[Update], hf_arch: str, rows: int) -> torch.Tensor | None:
    """llama.cpp's row order of the tensor (``gguf_rows = hf_rows[perm]``), or None when it keeps HF's."""
    target = updates[0].target
    layout = row_layout(hf_arch, target)
    if layout is None:
        return None
    return row_permutation(layout, rows, _gguf_config(reader), "GGUF base", target)


def merged_tensor(reader, tensor, updates: list[Update], ctx: MathContext, hf_arch: str) -> tuple[np.ndarray, float]:
    """(W + Σ w·ΔW in fp32 in the GGUF row order, ‖ΔW‖) for one targeted tensor."""
    gguf = _gguf()
    stored = reader.data(tensor)
    weight = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(stored, tensor.tensor_type),
                                                   dtype=np.float32))
    weight = weight.reshape(tuple(reversed([int(d) for d in tensor.shape])))
    perm = _permutation(reader, updates, hf_arch, weight.shape[0])
    canonical = weight if perm is None else weight[torch.argsort(perm)]
    delta = delta_sum(updates, canonical, ctx, False)
    delta = delta if perm is None else delta[perm]
    return (weight + delta).numpy(), float(torch.linalg.vector_norm(delta))


def merge_gguf(base: Path | str, adapters, out: Path | str, *, gguf_type: str = "keep", force: bool = False,
               overwrite: bool = False) -> StreamStats:
    """Merge adapters into a GGUF model file; ``gguf_type`` ``keep`` requantizes to each tensor's own type.

    Example:
        >>> merge_gguf("model-Q8_0.gguf", [("a.safetensors", 1.0)], "merged-Q8_0.gguf")  # doctest: +SKIP
    """
    start = time.perf_counter()
    base, out = Path(base), Path(out)
    check_weights(adapters)
    check_output_path(out, [base] + [Path(a) for a, _ in adapters if isinstance(a, (str, Path))])
    reader = GGUFModel(base)
    loaded = load_adapters(adapters)
    hf_arch = _hf_architecture(reader, loaded)
    targets = _targets(reader, loaded, hf_arch)
    writable = quantizable_types()
    stats = StreamStats(device="cpu", out=str(out))
    ctx = MathContext(torch.device("cpu"))
    rows, outputs = [], {}
    for tensor in reader.tensors:
        if tensor.name not in targets:
            continue
        kind = tensor.tensor_type.name if gguf_type == "keep" else gguf_type.upper()
        if kind not in FLOAT_TYPES and kind not in writable:
            raise UsageError(f"gguf cannot quantize to {kind} (tensor {tensor.name!r})",
                             hint=f"use --gguf-type F16 or F32, or one of {', '.join(writable)}")
        outputs[tensor.name] = kind
    written = _write(reader, out, targets, outputs, ctx, rows, overwrite, force, hf_arch)
    stats.tensors_changed, stats.tensors_total = len(targets), len(reader.tensors)
    stats.bytes_read = sum(Path(r.data.filename).stat().st_size for r in reader.readers)
    stats.bytes_written, stats.shards = written, 1
    stats.base_form = {"mode": "gguf", "form": {"scheme": f"gguf:{_file_types(reader, targets)}"}, "layers": rows}
    worst = max(rows, key=lambda r: r["ratio"], default=None)
    if worst is not None and worst["ratio"] > 0:
        stats.notes.append(f"requantization error / ‖ΔW‖ up to {worst['ratio']:.3g} ({worst['tensor']}, "
                           f"{worst['type']})")
    stats.seconds, stats.peak_rss_bytes = time.perf_counter() - start, peak_rss_bytes()
    return stats


def _file_types(reader, targets) -> str:
    return ",".join(sorted({t.tensor_type.name for t in reader.tensors if t.name in targets}))


def _encode(merged: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(the array to write, what it decodes to) for ``kind``."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[kind]
    encoded = gguf.quants.quantize(merged, qtype)
    decoded = gguf.quants.dequantize(encoded, qtype) if kind not in FLOAT_TYPES else encoded.astype(np.float32)
    return encoded, decoded.reshape(merged.shape)


def _write(reader, out: Path, targets, outputs, ctx, rows: list, overwrite: bool, force: bool, hf_arch: str) -> int:
    """Header (every key, every tensor's info) first, then the tensors one at a time; atomically.

    A refusal after the last tensor (ΔW lost in requantization) leaves nothing behind.
    """
    gguf = _gguf()
    writer = gguf.GGUFWriter(path=None, arch=reader.field("general.architecture"))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        if tensor.name in targets:
            writer.add_tensor_info(tensor.name, *_planned(tensor, outputs[tensor.name]))
        else:
            data = np.asarray(tensor.data)
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, int(tensor.n_bytes),
                                   raw_dtype=tensor.tensor_type)
    with atomic_file(out, overwrite=overwrite) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            if tensor.name not in targets:
                writer.write_tensor_data(reader.data(tensor))
                continue
            kind = outputs[tensor.name]
            merged, delta_norm = merged_tensor(reader, tensor, targets[tensor.name], ctx, hf_arch)
            encoded, decoded = _encode(merged, kind)
            _refuse_overflow(tensor.name, merged, decoded, kind, out)
            error = float(np.linalg.norm((decoded - merged).ravel()))
            rows.append({"tensor": tensor.name, "type": kind, "requant_error_norm": error, "delta_norm": delta_norm,
                         "ratio": error / delta_norm if delta_norm else (math.inf if error else 0.0)})
            writer.write_tensor_data(encoded)
        writer.close()
        _refuse_lost(rows, force)
        return tmp.stat().st_size


def _refuse_overflow(name: str, merged: np.ndarray, decoded: np.ndarray, kind: str, out: Path) -> None:
    """W + ΔW beyond the output type's range is written as inf, which llama.cpp loads silently: refuse
    (as the safetensors merges do, engine/finite.py)."""
    gained = int((~np.isfinite(decoded)).sum()) - int((~np.isfinite(merged)).sum())
    if gained > 0:
        raise TensorError(f"merged tensor {name!r} has {gained} inf/NaN value(s) once written as {kind} "
                          "(|W + ΔW| beyond its range); nothing was written", path=out,
                          hint="merge with --gguf-type F32, or with a smaller adapter weight (--adapter FILE:WEIGHT)")


def _planned(tensor, kind: str) -> tuple:
    """(numpy shape, numpy dtype, bytes, GGML type or None) of a merged tensor written as ``kind``."""
    gguf = _gguf()
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    if kind in FLOAT_TYPES:
        dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
        return shape, dtype, math.prod(shape) * dtype.itemsize, None
    qtype = gguf.GGMLQuantizationType[kind]
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape), qtype


def _refuse_lost(rows: list[dict], force: bool) -> None:
    lost = [r for r in rows if r["ratio"] >= 1]
    if lost and not force:
        names = ", ".join(f"{r['tensor']} ({r['ratio']:.2f}x)" for r in lost[:5])
        raise UsageError(f"requantizing would bury ΔW in rounding on {len(lost)} tensor(s): {names} "
                         "(requantization error / ‖ΔW‖)", hint="write a float type (--gguf-type F16), or pass "
                         "--force to accept it")
