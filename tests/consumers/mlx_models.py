"""Tiny random transformers models per architecture, their real PEFT adapters, and the same models in mlx-lm.

The reference is transformers+PEFT (fp32 logits); the consumer is mlx-lm's own loader
(``mlx_lm.utils.load_model`` of the base directory, ``mlx_lm.tuner.utils.load_adapters`` of our export).
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
GPT = dict(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=64)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOP = ["embed_tokens", "lm_head"]


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers model_type
    fields: dict  # config fields on top of COMMON (or instead of it for GPT-style configs)
    targets: list[str]  # PEFT target_modules a user would pick (incl. embeddings/heads where mlx-lm can hold them)
    patterns: dict = field(default_factory=dict)  # rank_pattern / alpha_pattern keys
    common: bool = True


#: name -> architecture; every entry of adapterfmt's MLX table has one here.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", {}, ATTN_MLP + TOP),
    "mistral": Arch("mistral", {"sliding_window": None}, ATTN_MLP + TOP),
    "qwen2": Arch("qwen2", {}, ATTN_MLP + TOP),
    "qwen3": Arch("qwen3", {"head_dim": 16}, ATTN_MLP + TOP),
    "granite": Arch("granite", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                "attention_multiplier": 0.2, "logits_scaling": 4.0}, ATTN_MLP + TOP),
    "olmo2": Arch("olmo2", {}, ATTN_MLP + TOP),
    "stablelm": Arch("stablelm", {"partial_rotary_factor": 0.5}, ATTN_MLP + TOP),
    "cohere": Arch("cohere", {"tie_word_embeddings": True}, ATTN_MLP),
    "gemma": Arch("gemma", {"head_dim": 16, "tie_word_embeddings": True}, ATTN_MLP),
    "gemma2": Arch("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}, ATTN_MLP),
    "gemma3": Arch("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "num_hidden_layers": 6,
                                   "tie_word_embeddings": False}, ATTN_MLP + TOP),
    "mixtral": Arch("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 2},
                    ["q_proj", "k_proj", "v_proj", "o_proj"] + TOP),
    "qwen2_moe": Arch("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "shared_expert_intermediate_size": 48}, ["q_proj", "k_proj", "v_proj", "o_proj"] + TOP),
    "qwen3_moe": Arch("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "head_dim": 16, "norm_topk_prob": True}, ["q_proj", "k_proj", "v_proj", "o_proj"] + TOP),
    "phi3": Arch("phi3", {"pad_token_id": 0}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] + TOP,
                 {"qkv_proj": 2, "gate_up_proj": 3}),
    "phi": Arch("phi", {"partial_rotary_factor": 0.5}, ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"] + TOP,
                {"dense": 2, "fc1": 3}),
    "starcoder2": Arch("starcoder2", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"] + TOP,
                       {"c_fc": 2, "o_proj": 3}),
    "gpt2": Arch("gpt2", GPT, ["c_attn", "c_proj", "c_fc", "wpe"], {"c_attn": 2, "c_fc": 3}, common=False),
    "gptj": Arch("gptj", dict(GPT, rotary_dim=8, tie_word_embeddings=False),
                 ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte", "lm_head"],
                 {"out_proj": 2, "fc_in": 3}, common=False),
    "gpt_neox": Arch("gpt_neox", {"partial_rotary_factor": 0.5, "intermediate_size": 256},
                     # not the head: transformers 5 names it lm_head, its checkpoint embed_out (no --base binding yet)
                     ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_in"],
                     {"query_key_value": 2, "dense_h_to_4h": 3}),
}


def build_base(name: str, path: Path, seed: int = 0) -> Path:
    """Save the tiny fp32 model ``name`` (norms and biases moved off 1/0 so that they count)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    arch = ARCHS[name]
    config = AutoConfig.for_model(arch.model_type, **((COMMON | arch.fields) if arch.common else arch.fields))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def make_adapter(name: str, base: Path, out: Path, *, dora: bool = False, targets: list[str] | None = None,
                 dtype: torch.dtype | None = None, seed: int = 1) -> Path:
    """A real PEFT LoRA (random non-zero A and B): r=4, alpha=8, rsLoRA, a rank and an alpha pattern."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    arch = ARCHS[name]
    ranks = arch.patterns or {"v_proj": 2, "o_proj": 3}
    rank_key, alpha_key = list(ranks)
    kwargs = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=targets or arch.targets,
                  rank_pattern={rank_key: ranks[rank_key]}, alpha_pattern={alpha_key: ranks[alpha_key]},
                  init_lora_weights=False, use_dora=dora, fan_in_fan_out=name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(**kwargs))
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in pname:  # move DoRA's magnitude off its init value
                    param.mul_(1 + 0.1 * torch.rand_like(param))
                elif dtype is not None and "lora_" in pname:  # the adapter alone in dtype (a bf16 run)
                    param.data = param.data.to(dtype)
        peft_model.save_pretrained(out)
    return out


def input_ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))


def peft_logits(base: Path, adapter: Path | None) -> np.ndarray:
    """transformers(+PEFT) logits in fp32 (the adapter's factors upcast as PEFT does)."""
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids()).logits.float().numpy()


def mlx_base(base: Path, out: Path) -> Path:
    """The base as a user of mlx-lm has it: config fields that transformers 5 moved into ``rope_parameters``
    (or renamed: Qwen3-MoE's num_experts) written as before (mlx-lm 0.32 still reads them so), GPT-2's weights without the
    ``transformer.`` prefix (the Hub layout; mlx-lm's gpt2 sanitize expects it). Weights are not changed."""
    from safetensors.torch import load_file, save_file
    if out.exists():
        return out
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    legacy = {"rope_theta": rope.get("rope_theta"), "rotary_emb_base": rope.get("rope_theta"),
              "partial_rotary_factor": rope.get("partial_rotary_factor"),
              "rotary_pct": rope.get("partial_rotary_factor"), "n_ctx": config.get("n_positions"),
              "num_experts": config.get("num_local_experts")}
    if "full_attention" in rope:  # Gemma 3: one RoPE base per attention kind
        legacy |= {"rope_theta": rope["full_attention"].get("rope_theta"),
                   "rope_local_base_freq": rope.get("sliding_attention", {}).get("rope_theta")}
    config.update({k: v for k, v in legacy.items() if v is not None and k not in config})
    (out / "config.json").write_text(json.dumps(config))
    if config["model_type"] == "gpt2":
        weights = load_file(str(out / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    return out


def mlx_logits(base: Path, adapter: Path | None) -> np.ndarray:
    """mlx-lm's logits (fp32) for the base directory and our exported adapter directory."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model
    model, _ = load_model(base)
    if adapter is not None:
        model = load_adapters(model, str(adapter))
    model.eval()
    out = model(mx.array(input_ids().numpy()))
    return np.array(out.astype(mx.float32))


def mlx_trained_adapter(base: Path, out: Path, keys: list[str], *, num_layers: int, rank: int = 4,
                        scale: float = 2.0, seed: int = 3) -> Path:
    """An adapter written the way mlx-lm's trainer writes one: ``linear_to_lora_layers`` on mlx-lm's model,
    random non-zero factors, the trainable parameters saved to ``adapters.safetensors``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    model, _ = load_model(base)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    trained = {name: mx.random.normal(value.shape) * 0.1 for name, value in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": num_layers,
                                                         "lora_parameters": params}))
    return out
