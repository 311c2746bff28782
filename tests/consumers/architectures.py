"""Tiny transformers models, one per architecture, for the llama.cpp consumer tests.

Each entry: transformers model_type, config fields (small; head counts chosen so RoPE permutations and GQA are
exercised), the tokenizer route convert_hf_to_gguf takes for it, and the LoRA targets a user would pick.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .llamacpp_env import VOCAB, write_bpe_tokenizer, write_spm_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: name -> (model_type, config overrides, tokenizer route, PEFT target_modules)
ARCHS: dict[str, tuple[str, dict, str, list[str]]] = {
    "llama": ("llama", {}, "spm", ATTN_MLP),
    "mistral": ("mistral", {"sliding_window": None}, "spm", ATTN_MLP),
    "qwen2": ("qwen2", {}, "spm", ATTN_MLP),
    "qwen3": ("qwen3", {"head_dim": 16}, "spm", ATTN_MLP),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "spm", ATTN),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 48}, "bpe",
                  ATTN + ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"]),  # shared expert
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "head_dim": 16, "norm_topk_prob": True}, "bpe", ATTN),
    # llama.cpp's Gemma graphs scale attention by 1/sqrt(head_dim), as the real checkpoints' query_pre_attn_scalar
    "gemma2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}, "spm",
               ATTN_MLP),
    "gemma3": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}, "spm",
               ATTN_MLP),
    "phi3": ("phi3", {"num_key_value_heads": 4, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}, "spm",
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.5}, "bpe",
                 ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True,
                          "bias": False}, "bpe", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "stablelm": ("stablelm", {"partial_rotary_factor": 0.5}, "bpe", ATTN_MLP),
    "granitemoe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 2.0,
                                  "logits_scaling": 4.0}, "spm", ATTN),
    "gemma": ("gemma", {"head_dim": 16, "tie_word_embeddings": True}, "spm", ATTN_MLP),
    "granite": ("granite", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                            "logits_scaling": 4.0}, "spm", ATTN_MLP),
}


def build(name: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Save the tiny model ``name`` (random weights, fp32) with its tokenizer under ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, fields, tokenizer, _ = ARCHS[name]
    config = AutoConfig.for_model(model_type, **(COMMON | fields | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms/biases start at 1/0; make them count
        for pname, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    _add_legacy_fields(path, config)
    (write_spm_tokenizer if tokenizer == "spm" else write_bpe_tokenizer)(path)
    return path


def _add_legacy_fields(path: Path, config) -> None:
    """convert_hf_to_gguf still reads pre-transformers-5 config fields (GPT-NeoX ``rotary_pct``)."""
    import json
    file = path / "config.json"
    data = json.loads(file.read_text())
    rope = data.get("rope_parameters") or {}
    if data.get("model_type") == "gpt_neox" and "rotary_pct" not in data:
        data["rotary_pct"] = rope.get("partial_rotary_factor", 1.0)
    file.write_text(json.dumps(data, indent=1))
