"""llama.cpp GGUF LoRA adapters (``general.type = adapter``), read and written with the ``gguf`` package.

Covered architectures: LlamaForCausalLM and MistralForCausalLM (GGUF ``llama``, q/k RoPE row
permutation), Qwen2ForCausalLM (``qwen2``) and Qwen3ForCausalLM (``qwen3``), no permutation.

GGUF keeps ONE alpha: llama.cpp's scale is ``alpha / rank`` with rank = ``lora_b.ne[0]``. Modules
whose scale differs get the ratio folded into B (reported ``scale_folded``). Tensors are laid out as
llama.cpp's loader expects: ``lora_a`` ne [in, r] (torch (r, in)), ``lora_b`` ne [r, out];
``token_embd.weight.lora_a`` is stored transposed (torch (vocab, r)).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_file
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, Manifest
from ..methods.lora import lora_params
from ..conversion_report import LOSSLESS
from ._lowrank import add_lowrank_module, fold_to_global, known_base_config, most_common, require_linear
from .base import AdapterFormat

#: HF architecture -> (GGUF general.architecture, whether convert_hf_to_gguf RoPE-permutes q/k rows).
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False)}
#: GGUF architecture -> the HF architecture assumed when no base says otherwise.
DEFAULT_HF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
#: transformers module path inside a decoder block -> llama.cpp tensor base name (gguf.TensorNameMap agrees).
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "lm_head": "output"}
BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)$")
# Our own keys, ignored by llama.cpp, that make the file self-describing for the way back.
KEY_N_HEAD, KEY_N_HEAD_KV, KEY_HF_ARCH = "adapterfmt.n_head", "adapterfmt.n_head_kv", "adapterfmt.hf_architecture"
KEY_BASE = "adapterfmt.base_name_or_path"
ROPE_MODULES = ("self_attn.q_proj", "self_attn.k_proj")
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("the GGUF format needs the 'gguf' package", hint="pip install adapterfmt[gguf]") from None
    return gguf


def hf_to_gguf(module: str) -> str:
    """The llama.cpp tensor name of a transformers module.

    Example:
        >>> hf_to_gguf("model.layers.3.self_attn.q_proj")
        'blk.3.attn_q.weight'
    """
    match = BLOCK_RE.match(module)
    name = f"blk.{match[1]}.{BLOCK_NAMES.get(match[2], '')}" if match and match[2] in BLOCK_NAMES \
        else TOP_NAMES.get(module)
    if name is None:
        raise UsageError(f"module {module!r} has no llama.cpp tensor name",
                         hint=f"GGUF export maps {', '.join(sorted(BLOCK_NAMES))} and {', '.join(TOP_NAMES)}")
    return f"{name}.weight"


def gguf_to_hf(name: str) -> str | None:
    """The transformers module of a llama.cpp tensor name (without ``.lora_a``), or None."""
    stem = name.removesuffix(".weight")
    match = GGUF_BLOCK_RE.match(stem)
    if match:
        inverse = {v: k for k, v in BLOCK_NAMES.items()}
        return f"model.layers.{match[1]}.{inverse[match[2]]}" if match[2] in inverse else None
    return {v: k for k, v in TOP_NAMES.items()}.get(stem)


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order convert_hf_to_gguf gives a q/k weight (LlamaModel.permute): ``gguf_rows = rows[perm]``.

    Example:
        >>> rope_permutation(8, 1).tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
    """
    if rows % (2 * n_head):
        raise UsageError(f"{rows} rows cannot be RoPE-permuted over {n_head} heads")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _heads_for(module: str, config: dict[str, Any]) -> int | None:
    """Heads the permutation uses for this module: q uses n_head, k n_head_kv; None = not permuted."""
    if module.endswith("self_attn.q_proj"):
        return config.get("num_attention_heads")
    if module.endswith("self_attn.k_proj"):
        return config.get("num_key_value_heads") or config.get("num_attention_heads")
    return None


def _need_heads(module: str, heads: int | None, where: str) -> int:
    if not heads:
        raise UsageError(f"module {module!r} needs the base's head counts for llama.cpp's RoPE permutation",
                         path=where, hint="pass --base (a model directory with config.json)")
    return int(heads)


def _to_numpy(tensor: torch.Tensor) -> tuple[np.ndarray, Any]:
    gguf = _gguf()
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    if tensor.dtype not in DTYPES:
        raise UsageError(f"GGUF export supports F32/F16/BF16 tensors, not {tensor.dtype}")
    return tensor.numpy(), None


def _from_reader(tensor, where: str) -> torch.Tensor:
    gguf = _gguf()
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


class GgufLoraFormat(AdapterFormat):
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
        gguf = _gguf()
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
        config = known_base_config(None, options.base)
        config.setdefault("num_attention_heads", _field(reader, KEY_N_HEAD))
        config.setdefault("num_key_value_heads", _field(reader, KEY_N_HEAD_KV))
        hf_arch = (config.get("architectures") or [None])[0] or _field(reader, KEY_HF_ARCH) or DEFAULT_HF[arch]
        if ARCHITECTURES.get(hf_arch, (None,))[0] != arch:
            raise ForeignFormatError(f"GGUF architecture {arch!r} does not match the base's {hf_arch}", path=path,
                                     hint="model arch and LoRA arch mismatch (llama.cpp refuses it too)")
        permute = ARCHITECTURES[hf_arch][1]
        pairs = _pairs(reader, str(path), report)
        manifest, tensors = Manifest(), {}
        for stem, (a, b) in sorted(pairs.items()):
            module = gguf_to_hf(stem)
            if module is None:
                raise ForeignFormatError(f"tensor {stem!r} has no transformers name for {arch}", path=path,
                                         hint=f"adapterfmt maps {', '.join(sorted(BLOCK_NAMES.values()))}, "
                                              f"{', '.join(TOP_NAMES.values())}")
            embedding = module == "model.embed_tokens"
            if embedding:
                a = a.t()  # stored (vocab, r) for ggml_get_rows; canonical A is (r, vocab)
            rank = b.shape[1]
            if permute and module.endswith(ROPE_MODULES):
                perm = rope_permutation(b.shape[0], _need_heads(module, _heads_for(module, config), str(path)))
                b = b[torch.argsort(perm)]
            # llama.cpp: scale = alpha / rank, or 1 when alpha is 0.
            params = lora_params(rank, alpha if alpha else rank, False)
            add_lowrank_module(manifest, tensors, module, a, b, params,
                               layer="embedding" if embedding else "linear")
            report.add(module, LOSSLESS)
        if not manifest.modules:
            raise ForeignFormatError("no LoRA tensors found", path=path, hint="the adapter is empty")
        manifest.base.architecture = hf_arch
        manifest.base.name_or_path = _field(reader, KEY_BASE) or None
        manifest.source = {"format": "gguf", "architecture": arch, "alpha": alpha,
                           "base_config": {k: v for k, v in config.items() if v is not None}}
        adapter = Adapter(manifest=manifest, tensors=tensors)
        return adapter

    # ---------------------------------------------------------------- writing
    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        gguf = _gguf()
        require_linear(adapter, "GGUF", report, options.base, ("linear", "embedding"))
        config = known_base_config(adapter, options.base)
        hf_arch = adapter.manifest.base.architecture or (config.get("architectures") or [None])[0]
        if hf_arch not in ARCHITECTURES:
            raise UsageError(f"GGUF export does not cover architecture {hf_arch!r}",
                             hint=f"covered: {', '.join(ARCHITECTURES)}; pass --base if the adapter lacks it")
        arch, permute = ARCHITECTURES[hf_arch]
        if "lm_head" in adapter.manifest.modules and config.get("tie_word_embeddings"):
            raise UsageError("lm_head is tied to the embeddings in this base; llama.cpp has no separate output "
                             "tensor to adapt", hint="drop the lm_head module")
        names = {t: hf_to_gguf(t) for t in adapter.manifest.modules}
        # One global alpha: the most common alpha that reproduces a module's scale as alpha/rank.
        eff = {t: np.float32(e.params["scale"] * e.params["rank"]).item() for t, e in adapter.manifest.modules.items()}
        alpha = most_common(list(eff.values()))
        factors = fold_to_global(adapter, report, lambda e: alpha / e.params["rank"],
                                 lambda e: "rsLoRA stored as alpha = scale*rank" if e.params["use_rslora"] else "",
                                 strict=options.strict)
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_string(KEY_HF_ARCH, hf_arch)
            for key, field in ((KEY_N_HEAD, "num_attention_heads"), (KEY_N_HEAD_KV, "num_key_value_heads")):
                if config.get(field):
                    writer.add_uint32(key, int(config[field]))
            if adapter.manifest.base.name_or_path:
                writer.add_string(KEY_BASE, adapter.manifest.base.name_or_path)
            for target, (a, b) in sorted(factors.items(), key=lambda kv: names[kv[0]]):
                if permute and target.endswith(ROPE_MODULES):
                    b = b[rope_permutation(b.shape[0], _need_heads(target, _heads_for(target, config), str(path)))]
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
        report.notes.append(f"GGUF {arch}: global adapter.lora.alpha = {alpha}")
        return path


def check_header(reader, where: str) -> None:
    """llama.cpp's loader checks on the KV header: general.type, adapter.type, a covered architecture."""
    kind, adapter_type = _field(reader, "general.type"), _field(reader, "adapter.type")
    if kind != "adapter" or adapter_type != "lora":
        raise ForeignFormatError(f"general.type={kind!r}, adapter.type={adapter_type!r}: not a GGUF LoRA adapter",
                                 path=where, hint="a full model GGUF is not an adapter")
    arch = _field(reader, "general.architecture")
    if arch not in DEFAULT_HF:
        raise ForeignFormatError(f"GGUF architecture {arch!r} is not covered", path=where,
                                 hint=f"covered: {', '.join(sorted(DEFAULT_HF))}")


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


