"""Merging a LoRA on a tied embedding or head writes both tensors untied, computing what PEFT computes."""
from __future__ import annotations

import json

import pytest
import torch

import adapterfmt
from tests.helpers import load_model, logits, make_peft_adapter, peft_logits


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tied") / "base"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_merge_into_tied_model_unties_and_matches_peft(tied_llama, tmp_path, target):
    peft_dir = make_peft_adapter(tied_llama, tmp_path / "peft", r=4, lora_alpha=8, target_modules=[target])
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=tied_llama)
    stats = adapterfmt.merge(tied_llama, [native], tmp_path / "merged")
    assert any("untied lm_head.weight" in note for note in stats.notes)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    merged = logits(load_model(tmp_path / "merged"))
    reference = peft_logits(tied_llama, peft_dir)
    # Silently tied, the merge would change both uses (the issue measured logits off by 40-53).
    assert float((merged - reference).abs().max()) < 1e-4


def test_untouched_tied_model_stays_tied(tied_llama, tmp_path):
    peft_dir = make_peft_adapter(tied_llama, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj"])
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=tied_llama)
    stats = adapterfmt.merge(tied_llama, [native], tmp_path / "merged")
    assert not any("untied" in note for note in stats.notes)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is True
