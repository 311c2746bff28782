"""Tiny models and real PEFT adapters built on the spot (no network)."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """A 2-layer Llama with hidden 64 (q/k/v/o/gate/up/down), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


def tiny_llama_sized(path: Path, hidden: int, intermediate: int, layers: int = 2, vocab: int = 256,
                     seed: int = 0) -> Path:
    """A small Llama of a chosen width (llama.cpp's K-quants need rows of 256), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                         vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_gpt2(path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32)
    model = GPT2LMHeadModel(config).to(dtype)
    model.save_pretrained(path)
    return path


def tiny_resnet(path: Path, seed: int = 0) -> Path:
    """A bottleneck ResNet with Conv2d layers of 1×1, 3×3 and 7×7 kernels (weights ~N(0, 0.05)), eval mode."""
    import warnings

    from transformers import ResNetConfig, ResNetModel
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 24], depths=[1, 1],
                          layer_type="bottleneck")
    model = ResNetModel(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval().save_pretrained(path)
    return path


def load_model(path: Path, dtype=None):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")


def make_peft_adapter(base: Path, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Train-free PEFT adapter with random non-zero A and B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    model = load_model(base)
    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    config = LoraConfig(**lora_kwargs)
    peft_model = get_peft_model(model, config)
    if config.use_dora:
        # Move the magnitudes off their init value so DoRA is not a no-op.
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                with torch.no_grad():
                    param.mul_(1 + 0.1 * torch.rand_like(param))
    peft_model.save_pretrained(out)
    return out


def peft_merged_state(base: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_model(base), adapter_dir)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def logits(model, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_logits(base: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_model(base), adapter_dir)
    model.eval()
    return logits(model)
