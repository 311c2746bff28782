"""Per-architecture facts llama.cpp GGUF LoRA files depend on (data, read by :mod:`.gguf_lora`).

For each transformers architecture: the GGUF ``general.architecture``, the modules llama.cpp can adapt
(templates, ``{bid}`` = block index) and the row reorderings ``convert_hf_to_gguf.py`` applies to the base
weights of some of them (a LoRA's B must follow its base weight's rows). GGUF tensor names come from the
``gguf`` package's own ``TensorNameMap`` (what llama.cpp's converters use), never from renames written here.
Sources: llama.cpp ``conversion/{llama,qwen,gemma,phi,gptneox,falcon,stablelm,granite}.py``,
``src/llama-adapter.cpp``, ``src/llama-graph.cpp``; details and measurements in docs/gguf-architectures.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..errors import UsageError

TOP = ("model.embed_tokens", "lm_head")
ATTN = tuple(f"model.layers.{{bid}}.self_attn.{p}_proj" for p in "qkvo")
MLP = tuple(f"model.layers.{{bid}}.mlp.{p}_proj" for p in ("gate", "up", "down"))
SHARED_EXPERT = tuple(f"model.layers.{{bid}}.mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")) + (
    "model.layers.{bid}.mlp.shared_expert_gate",)  # Linear(hidden, 1): ffn_gate_inp_shexp, a 1-D base tensor
PHI3 = ("model.layers.{bid}.self_attn.qkv_proj", "model.layers.{bid}.self_attn.o_proj",
        "model.layers.{bid}.mlp.gate_up_proj", "model.layers.{bid}.mlp.down_proj")
NEOX = ("gpt_neox.embed_in", "embed_out") + tuple(
    f"gpt_neox.layers.{{bid}}.{m}" for m in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                              "mlp.dense_4h_to_h"))
FALCON = ("transformer.word_embeddings", "lm_head") + tuple(
    f"transformer.h.{{bid}}.{m}" for m in ("self_attention.query_key_value", "self_attention.dense",
                                            "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
#: convert_hf_to_gguf's LlamaModel.permute on q (over n_head) and k (over n_head_kv).
ROPE = (("self_attn.q_proj", "rope_q"), ("self_attn.k_proj", "rope_k"))


@dataclass(frozen=True)
class GgufArch:
    """What llama.cpp makes of one transformers architecture."""

    gguf_arch: str  #: member of gguf.MODEL_ARCH
    modules: tuple[str, ...]  #: HF modules (templates) a llama.cpp LoRA can adapt
    rows: tuple[tuple[str, str], ...] = ()  #: (module suffix, row layout) reordered by the base converter
    experts: str = ""  #: why expert LoRA cannot be written for this architecture ("" = no experts)


_NO_EXPERT_LORA = ("llama.cpp adapts experts only as stacked 3-D tensors (ffn_*_exps, via build_lora_mm_id); "
                   "adapterfmt does not write expert LoRA to GGUF yet")
ARCHITECTURES: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch("LLAMA", TOP + ATTN + MLP, ROPE),
    "MistralForCausalLM": GgufArch("LLAMA", TOP + ATTN + MLP, ROPE),
    "MixtralForCausalLM": GgufArch("LLAMA", TOP + ATTN, ROPE, experts=_NO_EXPERT_LORA),
    "GraniteForCausalLM": GgufArch("GRANITE", TOP + ATTN + MLP, ROPE),
    "GraniteMoeForCausalLM": GgufArch("GRANITE_MOE", TOP + ATTN, ROPE, experts=_NO_EXPERT_LORA),
    "Qwen2ForCausalLM": GgufArch("QWEN2", TOP + ATTN + MLP),
    "Qwen3ForCausalLM": GgufArch("QWEN3", TOP + ATTN + MLP),
    "Qwen2MoeForCausalLM": GgufArch("QWEN2MOE", TOP + ATTN + SHARED_EXPERT, experts=_NO_EXPERT_LORA),
    "Qwen3MoeForCausalLM": GgufArch("QWEN3MOE", TOP + ATTN, experts=_NO_EXPERT_LORA),
    "GemmaForCausalLM": GgufArch("GEMMA", TOP + ATTN + MLP),
    "Gemma2ForCausalLM": GgufArch("GEMMA2", TOP + ATTN + MLP),
    "Gemma3ForCausalLM": GgufArch("GEMMA3", TOP + ATTN + MLP),
    "Phi3ForCausalLM": GgufArch("PHI3", TOP + PHI3),
    "StableLmForCausalLM": GgufArch("STABLELM", TOP + ATTN + MLP),
    "GPTNeoXForCausalLM": GgufArch("GPTNEOX", NEOX, (("attention.query_key_value", "neox_qkv"),)),
    "FalconForCausalLM": GgufArch("FALCON", FALCON, (("self_attention.query_key_value", "falcon_qkv"),)),
}


def load_gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("the GGUF format needs the 'gguf' package", hint="pip install adapterfmt[gguf]") from None
    return gguf


def gguf_arch_name(hf_arch: str) -> str:
    """The GGUF ``general.architecture`` string of a transformers architecture.

    Example:
        >>> gguf_arch_name("MistralForCausalLM")
        'llama'
    """
    gguf = load_gguf()
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[hf_arch].gguf_arch)]


def default_hf_arch(gguf_arch: str) -> str | None:
    """The transformers architecture assumed for a GGUF architecture when nothing says otherwise."""
    return next((hf for hf in ARCHITECTURES if gguf_arch_name(hf) == gguf_arch), None)


@lru_cache(maxsize=64)
def name_table(hf_arch: str, n_blocks: int) -> dict[str, str]:
    """``{HF module: GGUF tensor base name}`` for the modules llama.cpp can adapt (TensorNameMap's names).

    Example:
        >>> name_table("Phi3ForCausalLM", 1)["model.layers.0.mlp.gate_up_proj"]
        'blk.0.ffn_up'
    """
    gguf = load_gguf()
    spec = ARCHITECTURES[hf_arch]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.gguf_arch), n_blocks)
    table = {}
    for template in spec.modules:
        for bid in range(n_blocks) if "{bid}" in template else [None]:
            module = template.format(bid=bid)
            name = names.get_name(module)
            if name is not None:  # e.g. Gemma 2 has no separate output tensor: lm_head is absent
                table[module] = name
    return table


def row_layout(hf_arch: str, module: str) -> str | None:
    """The row reordering the base converter applies to ``module``'s weight, or None."""
    return next((layout for suffix, layout in ARCHITECTURES[hf_arch].rows if module.endswith(suffix)), None)


def _heads(config: dict[str, Any], key: str, where: str, module: str) -> int:
    value = config.get(key)
    if not value:
        raise UsageError(f"module {module!r} needs the base's {key} for llama.cpp's row layout", path=where,
                         hint="pass --base (a model directory with config.json)")
    return int(value)


def _rope(rows: int, heads: int) -> torch.Tensor:
    if rows % (2 * heads):
        raise UsageError(f"{rows} rows cannot be RoPE-permuted over {heads} heads")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _neox_qkv(rows: int, heads: int) -> torch.Tensor:
    """GPT-NeoX stores q/k/v interleaved per head (head, 3, dim); llama.cpp wants [q; k; v]."""
    if rows % (3 * heads):
        raise UsageError(f"{rows} query_key_value rows do not split into 3 x {heads} heads")
    return torch.arange(rows).reshape(heads, 3, -1).transpose(0, 1).reshape(-1)


def _falcon_qkv(rows: int, heads: int, groups: int) -> torch.Tensor:
    """Falcon stores kv groups (group, q heads..., k, v); llama.cpp wants all q, then all k, then all v."""
    per_group = heads // groups
    if heads % groups or rows % (heads + 2 * groups):
        raise UsageError(f"{rows} query_key_value rows do not match llama.cpp's Falcon layout "
                         f"({heads} heads in {groups} kv groups)", hint="only Falcon checkpoints with "
                         "new_decoder_architecture or one kv head are laid out this way")
    idx = torch.arange(rows).reshape(groups, per_group + 2, rows // (heads + 2 * groups))
    return torch.cat([idx[:, :per_group].reshape(-1), idx[:, per_group].reshape(-1), idx[:, -1].reshape(-1)])


def row_permutation(layout: str, rows: int, config: dict[str, Any], where: str, module: str) -> torch.Tensor:
    """Row order of the GGUF tensor: ``gguf_rows = hf_rows[perm]``.

    Example:
        >>> row_permutation("rope_q", 8, {"num_attention_heads": 1}, "x", "q").tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
    """
    heads = lambda key: _heads(config, key, where, module)  # noqa: E731
    kv_heads = lambda: int(config.get("num_key_value_heads") or heads("num_attention_heads"))  # noqa: E731
    builders = {
        "rope_q": lambda: _rope(rows, heads("num_attention_heads")),
        "rope_k": lambda: _rope(rows, kv_heads()),
        "neox_qkv": lambda: _neox_qkv(rows, heads("num_attention_heads")),
        # the converter reads num_kv_heads (n_head_kv), defaulting to 1 kv group
        "falcon_qkv": lambda: _falcon_qkv(rows, heads("num_attention_heads"),
                                          int(config.get("num_kv_heads") or config.get("num_key_value_heads") or 1)),
    }
    return builders[layout]()
