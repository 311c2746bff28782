"""llama.cpp GGUF LoRA adapters (``general.type = adapter``), read and written with the ``gguf`` package.

Covered architectures, their llama.cpp names and row layouts: the table in :mod:`.gguf_arch`.

GGUF keeps ONE alpha: llama.cpp's scale is ``alpha / rank`` with rank = ``lora_b.ne[0]``. Modules
whose scale differs get the ratio folded into B (reported ``scale_folded``). Tensors are laid out as
llama.cpp's loader expects: ``lora_a`` ne [in, r] (torch (r, in)), ``lora_b`` ne [r, out];
``token_embd.weight.lora_a`` is stored transposed (torch (vocab, r)).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..atomic import atomic_file
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, Manifest
from ..methods.lora import lora_params
from ..conversion_report import LOSSLESS
from .gguf_arch import (ARCHITECTURES, default_hf_arch, gguf_arch_name, load_gguf, name_table, row_layout,
                        row_permutation)
from ._lowrank import add_lowrank_module, drop_base_copies, fold_to_global, known_base_config, most_common, require_linear
from pydantic import Field

from .base import AdapterFormat, FormatOptions

GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
HF_BLOCK_RE = re.compile(r"\.(\d+)\.")
# Our own keys, ignored by llama.cpp, that make the file self-describing for the way back.
KEY_N_HEAD, KEY_N_HEAD_KV, KEY_HF_ARCH = "adapterfmt.n_head", "adapterfmt.n_head_kv", "adapterfmt.hf_architecture"
KEY_BASE = "adapterfmt.base_name_or_path"
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
#: --dtype choices of the writer: the factors' storage dtype (llama.cpp computes the LoRA in that precision).
WRITE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "keep": None,
                "fp32": torch.float32, "fp16": torch.float16}  # merge --dtype spells them fp32/fp16


def hf_to_gguf(module: str, hf_arch: str = "LlamaForCausalLM", n_blocks: int | None = None) -> str:
    """The llama.cpp tensor name of a transformers module.

    Example:
        >>> hf_to_gguf("model.layers.3.self_attn.q_proj")
        'blk.3.attn_q.weight'
    """
    blocks = n_blocks or max([int(m) + 1 for m in HF_BLOCK_RE.findall(module)] or [1])
    name = name_table(hf_arch, blocks).get(module)
    if name is None:
        adaptable = sorted({t.replace("{bid}", "N") for t in ARCHITECTURES[hf_arch].modules
                            if t.format(bid=0) in name_table(hf_arch, 1)})
        why = ARCHITECTURES[hf_arch].experts if ".experts." in module else ""
        raise UsageError(f"module {module!r} has no llama.cpp LoRA tensor in {hf_arch}" + (f": {why}" if why else ""),
                         hint=f"llama.cpp can adapt {', '.join(adaptable)}")
    return f"{name}.weight"


def gguf_to_hf(name: str, hf_arch: str = "LlamaForCausalLM", n_blocks: int = 1) -> str | None:
    """The transformers module of a llama.cpp tensor name (without ``.lora_a``), or None."""
    inverse = {v: k for k, v in name_table(hf_arch, n_blocks).items()}
    return inverse.get(name.removesuffix(".weight"))


def _to_numpy(tensor: torch.Tensor) -> tuple[np.ndarray, Any]:
    gguf = load_gguf()
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    if tensor.dtype not in DTYPES:
        raise UsageError(f"GGUF export supports F32/F16/BF16 tensors, not {tensor.dtype}")
    return tensor.numpy(), None


def _from_reader(tensor, where: str) -> torch.Tensor:
    gguf = load_gguf()
    kind = tensor.tensor_type
    data = np.array(tensor.data)
    if kind == gguf.GGMLQuantizationType.BF16:
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        return torch.from_numpy(data.view(np.int16).reshape(shape).copy()).view(torch.bfloat16)
    if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        raise ForeignFormatError(f"tensor {tensor.name!r} is {kind.name}; quantised LoRA tensors are not supported",
                                 path=where, hint="re-export the adapter with --outtype f32/f16/bf16")
    return torch.from_numpy(data.copy())


def _field(reader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value.item() if hasattr(value, "item") else value


class GgufWriteOptions(FormatOptions):
    dtype: Literal["f32", "f16", "bf16", "keep"] | None = Field(
        default=None, description="Stored dtype of the LoRA factors (f32|f16|bf16|keep; default keep).")


class GgufLoraFormat(AdapterFormat):
    write_options = GgufWriteOptions
    suffixes = (".gguf",)
    name = "gguf"
    summary = "llama.cpp GGUF LoRA adapter (one .gguf; one global alpha)"
    priority = 25
    writes_methods = ("lora",)

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            with open(path, "rb") as handle:
                return handle.read(4) == b"GGUF"
        except OSError:
            return False

    # ---------------------------------------------------------------- reading
    def read(self, path: Path, options, report) -> Adapter:
        gguf = load_gguf()
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises many types (struct, numpy, enum) on damaged files
            raise ForeignFormatError(f"not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})", path=path,
                                     hint="the file is truncated or corrupt") from None
        check_header(reader, str(path))
        arch = _field(reader, "general.architecture")
        alpha = float(_field(reader, gguf.Keys.Adapter.LORA_ALPHA) or 0.0)
        if not math.isfinite(alpha):  # a NaN/Inf alpha would poison every scale
            raise ForeignFormatError(f"adapter.lora.alpha is {alpha}, not a finite number", path=path,
                                     hint="the file is damaged; re-export the adapter")
        config = _config_with_file_heads(known_base_config(None, options.base), reader)
        hf_arch = (config.get("architectures") or [None])[0] or _field(reader, KEY_HF_ARCH) or default_hf_arch(arch)
        if hf_arch not in ARCHITECTURES or gguf_arch_name(hf_arch) != arch:
            raise ForeignFormatError(f"GGUF architecture {arch!r} does not match the base's {hf_arch}", path=path,
                                     hint="model arch and LoRA arch mismatch (llama.cpp refuses it too)")
        pairs = _pairs(reader, str(path), report)
        blocks = int(config.get("num_hidden_layers") or 0) or max(
            [int(m[1]) + 1 for m in map(GGUF_BLOCK_RE.match, pairs) if m] or [1])
        manifest, tensors = Manifest(), {}
        for stem, (a, b) in sorted(pairs.items()):
            module = gguf_to_hf(stem, hf_arch, blocks)
            if module is None:
                raise ForeignFormatError(f"tensor {stem!r} has no transformers name for {arch} ({hf_arch})",
                                         path=path, hint=f"adapterfmt maps {', '.join(_gguf_names(hf_arch))}")
            embedding = stem.startswith("token_embd.")
            if embedding:
                a = a.t()  # stored (vocab, r) for ggml_get_rows; canonical A is (r, vocab)
            layout = row_layout(hf_arch, module)
            if layout:
                b = b[torch.argsort(row_permutation(layout, b.shape[0], config, str(path), module))]
            # llama.cpp: scale = alpha / rank, or 1 when alpha is 0.
            params = lora_params(b.shape[1], alpha if alpha else b.shape[1], False)
            add_lowrank_module(manifest, tensors, module, a, b, params, layer="embedding" if embedding else "linear")
            report.add(module, LOSSLESS)
        if not manifest.modules:
            raise ForeignFormatError("no LoRA tensors found", path=path, hint="the adapter is empty")
        manifest.base.architecture = hf_arch
        manifest.base.name_or_path = _field(reader, KEY_BASE) or None
        manifest.source = {"format": "gguf", "architecture": arch, "alpha": alpha,
                           "base_config": {k: v for k, v in config.items() if v is not None}}
        return Adapter(manifest=manifest, tensors=tensors)

    # ---------------------------------------------------------------- writing
    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        gguf = load_gguf()
        require_linear(adapter, "GGUF", report, options.base, ("linear", "embedding"), payloads=False)
        config = known_base_config(adapter, options.base)
        hf_arch = adapter.manifest.base.architecture or (config.get("architectures") or [None])[0]
        if hf_arch not in ARCHITECTURES:
            how = "" if hf_arch else "; the adapter does not name its architecture: pass --base"
            raise UsageError(f"GGUF export does not cover architecture {hf_arch!r}{how}",
                             hint=f"covered: {', '.join(ARCHITECTURES)}")
        check_tied_embeddings(adapter, config)
        drop_base_copies(adapter, "GGUF", report, options.base)  # after: a tied head's copy is not the problem
        blocks = int(config.get("num_hidden_layers") or 0) or None
        names = {t: hf_to_gguf(t, hf_arch, blocks) for t in adapter.manifest.modules}
        dtype = _write_dtype(options.format.dtype)
        # Cast before folding, so a scale folded into B is rounded once, in the dtype that is written.
        adapter = Adapter(manifest=adapter.manifest, version=adapter.version, tensors={
            name: _cast(t, dtype, name) for name, t in adapter.tensors.items()})
        # One global alpha: the most common alpha that reproduces a module's scale as alpha/rank.
        eff = {t: np.float32(e.params["scale"] * e.params["rank"]).item() for t, e in adapter.manifest.modules.items()}
        alpha = most_common(list(eff.values()))
        factors = fold_to_global(adapter, report, lambda e: alpha / e.params["rank"],
                                 lambda e: "rsLoRA stored as alpha = scale*rank" if e.params["use_rslora"] else "",
                                 strict=options.strict)
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            writer = gguf.GGUFWriter(tmp, gguf_arch_name(hf_arch))
            _write_header(writer, adapter, config, hf_arch, alpha)
            for target, (a, b) in sorted(factors.items(), key=lambda kv: names[kv[0]]):
                layout = row_layout(hf_arch, target)
                if layout:
                    b = b[row_permutation(layout, b.shape[0], config, str(path), target)]
                if adapter.manifest.modules[target].layer == "embedding":
                    a = a.t()
                for suffix, tensor in (("lora_a", a), ("lora_b", b)):
                    data, raw = _to_numpy(tensor)
                    writer.add_tensor(f"{names[target]}.{suffix}", data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            check_header(gguf.GGUFReader(tmp), str(path))
        report.notes.append(f"GGUF {gguf_arch_name(hf_arch)}: global adapter.lora.alpha = {alpha}")
        return path


def _gguf_names(hf_arch: str) -> list[str]:
    """The GGUF tensor names (blocks shown as N) adapterfmt maps for an architecture, for messages."""
    return sorted({GGUF_BLOCK_RE.sub("blk.N.", name) for name in name_table(hf_arch, 1).values()})


def _write_header(writer, adapter: Adapter, config: dict[str, Any], hf_arch: str, alpha: float) -> None:
    gguf = load_gguf()
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(KEY_HF_ARCH, hf_arch)
    kv_heads = config.get("num_key_value_heads") or config.get("num_kv_heads")
    for key, value in ((KEY_N_HEAD, config.get("num_attention_heads")), (KEY_N_HEAD_KV, kv_heads)):
        if value:
            writer.add_uint32(key, int(value))
    if adapter.manifest.base.name_or_path:
        writer.add_string(KEY_BASE, adapter.manifest.base.name_or_path)


def _config_with_file_heads(config: dict[str, Any], reader) -> dict[str, Any]:
    """The base config, completed with the head counts our writer stores in the file."""
    kv_heads = _field(reader, KEY_N_HEAD_KV)
    config.setdefault("num_attention_heads", _field(reader, KEY_N_HEAD))
    config.setdefault("num_key_value_heads", kv_heads)
    config.setdefault("num_kv_heads", kv_heads)  # Falcon's name
    return config


def check_tied_embeddings(adapter: Adapter, config: dict[str, Any]) -> None:
    """Refuse what llama.cpp cannot compute on a tied-embedding model.

    A tied model's GGUF has no ``output`` tensor: the output projection reuses ``token_embd``, so a
    ``token_embd`` LoRA is applied to the lookup AND to the output matmul (where its transposed layout makes
    llama.cpp abort), and an ``lm_head`` LoRA has no tensor to attach to.
    """
    if not config.get("tie_word_embeddings"):
        return
    for target, entry in adapter.manifest.modules.items():
        if entry.layer == "embedding" or target.endswith("lm_head") or target == "embed_out":
            raise UsageError(f"module {target!r}: the base ties its input and output embeddings, and llama.cpp "
                             "then has one token_embd tensor for both, so this LoRA cannot be expressed (llama.cpp "
                             "would apply it to both ends, or abort)",
                             hint="merge the adapter into the base (adapterfmt merge, which unties) and convert "
                                  "the merged model, or drop that module")


def _write_dtype(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    if str(name).lower() not in WRITE_DTYPES:
        raise UsageError(f"GGUF --dtype {name!r} is not one of {', '.join(WRITE_DTYPES)}")
    return WRITE_DTYPES[str(name).lower()]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, target: str) -> torch.Tensor:
    """The factor in the requested storage dtype; a rounding cast is refused (exact or refuse)."""
    if dtype is None or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if not torch.equal(cast.to(tensor.dtype), tensor):
        raise UsageError(f"tensor {target!r}: its {DTYPES.get(tensor.dtype, tensor.dtype)} values are not exactly "
                         f"representable in {DTYPES[dtype]}", hint="write --dtype f32 or --dtype keep")
    return cast


def check_header(reader, where: str) -> None:
    """llama.cpp's loader checks on the KV header: general.type, adapter.type, a covered architecture."""
    kind, adapter_type = _field(reader, "general.type"), _field(reader, "adapter.type")
    if kind != "adapter" or adapter_type != "lora":
        raise ForeignFormatError(f"general.type={kind!r}, adapter.type={adapter_type!r}: not a GGUF LoRA adapter",
                                 path=where, hint="a full model GGUF is not an adapter")
    arch = _field(reader, "general.architecture")
    if default_hf_arch(arch) is None:
        covered = sorted({gguf_arch_name(hf) for hf in ARCHITECTURES})
        raise ForeignFormatError(f"GGUF architecture {arch!r} is not covered", path=where,
                                 hint=f"covered: {', '.join(covered)}")


def _pairs(reader, where: str, report) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group ``X.lora_a``/``X.lora_b`` and apply llama.cpp's shape relations (ne = reversed torch shape)."""
    parts: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        if tensor.name.endswith("_norm.weight"):
            report.notes.append(f"ignored {tensor.name} (llama.cpp ignores norm tensors too)")
            continue
        if suffix not in ("lora_a", "lora_b"):
            raise ForeignFormatError(f"tensor {tensor.name!r} has an unexpected suffix", path=where,
                                     hint="GGUF LoRA tensors end in .lora_a or .lora_b")
        parts.setdefault(stem, {})[suffix] = tensor
    pairs = {}
    for stem, pair in parts.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise ForeignFormatError(f"tensor {stem!r} is missing one component", path=where,
                                     hint="the adapter is incomplete")
        a_ne, b_ne = [int(d) for d in pair["lora_a"].shape], [int(d) for d in pair["lora_b"].shape]
        ok = len(a_ne) == len(b_ne) == 2 and (a_ne[0] == b_ne[0] if stem.startswith("token_embd.")
                                              else a_ne[1] == b_ne[0])
        if not ok:
            raise ForeignFormatError(f"tensor {stem!r}: lora_a ne {a_ne} and lora_b ne {b_ne} do not form a "
                                     "low-rank pair (lora_a tensor is not transposed?)", path=where,
                                     hint="the file was written by an incompatible tool")
        pairs[stem] = (_from_reader(pair["lora_a"], where), _from_reader(pair["lora_b"], where))
    return pairs


