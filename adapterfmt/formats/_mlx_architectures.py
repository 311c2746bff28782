"""Which layers mlx-lm's model for each architecture has, under which names (data, checked before writing).

Read from mlx-lm 0.32 (``mlx_lm/models/<model_type>.py``, ``mlx_lm/tuner/utils.py``):

* ``load_adapters`` -> ``linear_to_lora_layers`` wraps, in each of the last ``num_layers`` blocks
  (``Model.layers``), the modules whose block-relative name is in ``lora_parameters.keys``, and
  anywhere in the model the modules whose full name is in ``keys`` (top-level targeting: mlx-examples
  PR 914, 2024). Only ``nn.Linear``/``nn.Embedding`` (and switch layers) can be wrapped.
* Weights in ``adapters.safetensors`` are named by mlx-lm's own module paths, which differ from the
  Hugging Face ones for GPT-2/GPT-J (``transformer.h`` -> ``model.h``) and GPT-NeoX
  (``gpt_neox.layers`` -> ``model.h``, ``embed_out`` -> ``model.embed_out``).
* GPT-2's ``Conv1D`` weights are transposed into ``nn.Linear`` by mlx-lm's ``sanitize``; the LoRA
  factors are the same as for a Linear layer.
* Tied output: where mlx-lm computes the logits with ``embed_tokens.as_linear`` there is no
  ``lm_head`` module, and a ``LoRAEmbedding`` adds its low-rank term to the output projection too;
  PEFT changes only the input embedding. So on a tied model an embedding LoRA and an ``lm_head``
  LoRA cannot be expressed. ``tie`` says when mlx-lm ties: ``always``, ``never`` or per the
  config's ``tie_word_embeddings``.

Every entry is verified by tests/consumers/test_mlx_lm.py against the installed mlx-lm (logits of the
real loader against transformers+PEFT). Architectures mlx-lm has no model for (OPT, Falcon, ...) are
absent and refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"


@dataclass(frozen=True)
class MlxArchitecture:
    """mlx-lm's view of one Hugging Face architecture."""

    model_type: str  # mlx_lm.models.<model_type> (after mlx-lm's MODEL_REMAPPING)
    hf_blocks: str  # Hugging Face prefix of the block list
    mlx_blocks: str  # mlx-lm's prefix of the same list
    block_modules: dict[str, str]  # block-relative name (same in both) -> layer kind
    token_embedding: tuple[str, str] | None  # (HF name, mlx name) of the input token embedding
    other_embeddings: dict[str, str] = field(default_factory=dict)  # HF -> mlx, never tied (positions)
    head: tuple[str, str] = ("lm_head", "lm_head")  # (HF, mlx) output projection; in mlx-lm only when untied
    tie: str = "config"  # "always" | "never" | "config" (tie_word_embeddings)
    head_aliases: tuple[str, ...] = ()  # other Hugging Face names of the head (transformers 5 renames)

    def tied(self, config: dict[str, Any]) -> bool | None:
        """Whether mlx-lm ties the output projection to the token embedding; None when unknown."""
        if self.tie != "config":
            return self.tie == "always"
        value = config.get("tie_word_embeddings")
        return bool(value) if value is not None else None


def _linears(*names: str) -> dict[str, str]:
    return {name: LINEAR for name in names}


LLAMA_BLOCK = _linears("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION_ONLY = _linears("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
EMBED = ("model.embed_tokens", "model.embed_tokens")
HEAD = ("lm_head", "lm_head")


def _llama_like(model_type: str, block: dict[str, str] = LLAMA_BLOCK, tie: str = "config") -> MlxArchitecture:
    return MlxArchitecture(model_type, "model.layers", "model.layers", block, EMBED, head=HEAD, tie=tie)


#: Hugging Face architecture (config ``architectures[0]``) -> mlx-lm's model.
MLX_ARCHITECTURES: dict[str, MlxArchitecture] = {
    "LlamaForCausalLM": _llama_like("llama"),
    "MistralForCausalLM": _llama_like("llama"),  # mlx-lm remaps mistral -> llama
    "Qwen2ForCausalLM": _llama_like("qwen2"),
    "Qwen3ForCausalLM": _llama_like("qwen3"),
    "GraniteForCausalLM": _llama_like("granite"),
    "Olmo2ForCausalLM": _llama_like("olmo2"),
    "StableLmForCausalLM": _llama_like("stablelm", tie="never"),
    "CohereForCausalLM": _llama_like("cohere", tie="always"),
    "GemmaForCausalLM": _llama_like("gemma", tie="always"),
    "Gemma2ForCausalLM": _llama_like("gemma2", tie="always"),
    # gemma3_text ties when the checkpoint has no lm_head.weight, i.e. per tie_word_embeddings.
    "Gemma3ForCausalLM": _llama_like("gemma3_text"),
    # Mixtral's experts are mlx-lm SwitchLinear layers and transformers-5 fused parameters: not mapped.
    "MixtralForCausalLM": _llama_like("mixtral", ATTENTION_ONLY),
    "Qwen2MoeForCausalLM": _llama_like("qwen2_moe", ATTENTION_ONLY),
    "Qwen3MoeForCausalLM": _llama_like("qwen3_moe", ATTENTION_ONLY),
    "Phi3ForCausalLM": _llama_like("phi3", _linears("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                    "mlp.down_proj")),
    "PhiForCausalLM": _llama_like("phi", _linears("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.dense", "mlp.fc1", "mlp.fc2"), tie="never"),
    "Starcoder2ForCausalLM": _llama_like("starcoder2", _linears("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc",
                                                                "mlp.c_proj")),
    "GPT2LMHeadModel": MlxArchitecture(
        "gpt2", "transformer.h", "model.h",
        {name: CONV1D for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
        ("transformer.wte", "model.wte"), {"transformer.wpe": "model.wpe"}, tie="always"),
    "GPTJForCausalLM": MlxArchitecture(
        "gptj", "transformer.h", "model.h",
        _linears("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
        ("transformer.wte", "model.wte"), tie="never"),
    "GPTNeoXForCausalLM": MlxArchitecture(
        "gpt_neox", "gpt_neox.layers", "model.h",
        _linears("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        ("gpt_neox.embed_in", "model.embed_in"), head=("embed_out", "model.embed_out"), tie="never",
        head_aliases=("lm_head",)),  # transformers 5 calls the module lm_head; checkpoints say embed_out
}


def layer_count(config: dict[str, Any]) -> int | None:
    """The base's number of transformer blocks from its config (GPT-2 spells it ``n_layer``)."""
    value = config.get("num_hidden_layers") or config.get("n_layer")
    return int(value) if value else None


#: Architectures people export whose absence from mlx-lm is worth saying by name.
NO_MLX_MODEL = {
    "OPTForCausalLM": "mlx-lm has no OPT model",
    "FalconForCausalLM": "mlx-lm has no Falcon model (only Falcon-H1)",
    "BloomForCausalLM": "mlx-lm has no BLOOM model",
    "GPTBigCodeForCausalLM": "mlx-lm's gpt_bigcode model cannot be built (fails on init in mlx-lm 0.32)",
}


@dataclass(frozen=True)
class MlxPlace:
    """Where one adapter module lives in mlx-lm's model."""

    name: str  # mlx-lm module path; the weights are ``<name>.lora_a`` / ``.lora_b`` / ``.m``
    key: str  # its entry in ``lora_parameters.keys`` (block-relative inside blocks, else the full path)
    block: int | None  # block index, None for a top-level module


def find_architecture(name: str | None) -> MlxArchitecture:
    """The table entry for a Hugging Face architecture, or a refusal naming why there is none.

    Example:
        >>> find_architecture("LlamaForCausalLM").model_type
        'llama'
    """
    if name in MLX_ARCHITECTURES:
        return MLX_ARCHITECTURES[name]
    covered = ", ".join(sorted(MLX_ARCHITECTURES))
    if name is None:
        raise UsageError("the base architecture is unknown, so the module names cannot be checked against "
                         "mlx-lm's model", hint="pass --base (the base model directory)")
    reason = NO_MLX_MODEL.get(name, "not mapped to an mlx-lm model here")
    raise UsageError(f"MLX export does not cover architecture {name!r}: {reason}", hint=f"covered: {covered}")


def place_in_mlx(target: str, layer: str, arch: MlxArchitecture, config: dict[str, Any]) -> MlxPlace:
    """The mlx-lm module an adapter module (Hugging Face name, layer kind) maps to, or a refusal."""
    prefix = arch.hf_blocks + "."
    if target.startswith(prefix):
        index, _, rel = target[len(prefix):].partition(".")
        if not index.isdigit() or rel not in arch.block_modules:
            raise UsageError(f"module {target!r}: mlx-lm's {arch.model_type} model has no LoRA-capable layer "
                             f"{rel or index!r} in its blocks",
                             hint=f"it adapts {', '.join(sorted(arch.block_modules))}; drop that module first")
        _require_kind(target, layer, arch.block_modules[rel], arch)
        return MlxPlace(f"{arch.mlx_blocks}.{index}.{rel}", rel, int(index))
    tied = arch.tied(config)
    if arch.token_embedding and target == arch.token_embedding[0]:
        _require_kind(target, layer, EMBEDDING, arch)
        _require_untied(target, tied, arch, "computes the logits with this embedding too (tied), so its LoRA would "
                                            "also change the output; PEFT changes only the input")
        return MlxPlace(arch.token_embedding[1], arch.token_embedding[1], None)
    if target in arch.other_embeddings:
        _require_kind(target, layer, EMBEDDING, arch)
        return MlxPlace(arch.other_embeddings[target], arch.other_embeddings[target], None)
    if target == arch.head[0] or target in arch.head_aliases:
        _require_kind(target, layer, LINEAR, arch)
        _require_untied(target, tied, arch, "has no separate output layer when the embeddings are tied")
        return MlxPlace(arch.head[1], arch.head[1], None)
    raise UsageError(f"module {target!r} is not a layer mlx-lm's {arch.model_type} model can adapt",
                     hint="drop that module first")


def hf_module_of(name: str, arch: MlxArchitecture) -> tuple[str, str] | None:
    """The (Hugging Face name, layer kind) of an mlx-lm module path, or None if mlx-lm has no such layer."""
    prefix = arch.mlx_blocks + "."
    if name.startswith(prefix):
        index, _, rel = name[len(prefix):].partition(".")
        if index.isdigit() and rel in arch.block_modules:
            return f"{arch.hf_blocks}.{index}.{rel}", arch.block_modules[rel]
        return None
    tops = {mlx: (hf, EMBEDDING) for hf, mlx in arch.other_embeddings.items()}
    if arch.token_embedding:
        tops[arch.token_embedding[1]] = (arch.token_embedding[0], EMBEDDING)
    tops[arch.head[1]] = (arch.head[0], LINEAR)
    return tops.get(name)


def _require_kind(target: str, layer: str, expected: str, arch: MlxArchitecture) -> None:
    if layer != expected:
        raise UsageError(f"module {target!r} is a {layer} layer in the adapter, but mlx-lm's {arch.model_type} "
                         f"model has a {expected} layer there", hint="the adapter was made for another model")


def _require_untied(target: str, tied: bool | None, arch: MlxArchitecture, why: str) -> None:
    if tied is None:
        raise UsageError(f"module {target!r}: whether the base ties lm_head to the embeddings is unknown",
                         hint="pass --base (the base model directory)")
    if tied:
        raise UsageError(f"module {target!r} cannot be exported to MLX: mlx-lm's {arch.model_type} model {why}",
                         hint="drop that module, or export to peft (which keeps the two apart)")
