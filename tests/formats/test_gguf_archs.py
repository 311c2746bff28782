"""GGUF export per architecture, checked without llama.cpp: ΔW from the file, following llama.cpp's formula, equals
PEFT's merged ΔW after the row transform convert_hf_to_gguf applies to that base weight (written out here
independently). The same exports are run in real llama.cpp by scripts/test-consumers.sh."""
from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch

from adapterfmt import convert
from adapterfmt.errors import UsageError
from tests.helpers import make_peft_adapter, peft_merged_state

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
             max_position_embeddings=32, tie_word_embeddings=False)


def neox_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf GPTNeoXModel: per-head (q, k, v) blocks regrouped as all q, all k, all v."""
    per_head = w.reshape(n_head, 3, -1, w.shape[-1])
    return np.concatenate([per_head[:, i].reshape(-1, w.shape[-1]) for i in range(3)])


def falcon_rows(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """convert_hf_to_gguf FalconModel: kv groups (q..., k, v) regrouped as all q, all k, all v."""
    groups = w.reshape(n_kv, n_head // n_kv + 2, -1, w.shape[-1])
    q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
    return np.concatenate([q.reshape(-1, w.shape[-1]), k.reshape(-1, w.shape[-1]), v.reshape(-1, w.shape[-1])])


CASES = {  # model_type, extra config, targets, (module suffix, row transform of the base converter)
    "gpt_neox": ("gpt_neox", {}, ["query_key_value", "dense_4h_to_h"],
                 ("attention.query_key_value", lambda w: neox_rows(w, 4))),
    "falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "bias": False},
               ["query_key_value", "dense"], ("self_attention.query_key_value", lambda w: falcon_rows(w, 4, 2))),
    "phi3": ("phi3", {"pad_token_id": None}, ["qkv_proj", "gate_up_proj"], ("qkv_proj", lambda w: w)),
    "gemma2": ("gemma2", {"head_dim": 8}, ["q_proj", "up_proj"], ("q_proj", lambda w: w)),
}


def tiny(model_type: str, extra: dict, path):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(SMALL | extra))).save_pretrained(path)
    return path


def gguf_deltas(path) -> dict[str, np.ndarray]:
    """ΔW per GGUF tensor the way llama.cpp computes it: (alpha / rank) · B·A (ne reversed = torch shapes)."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.get_field("adapter.lora.alpha").contents())
    parts = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    out = {}
    for name in parts:
        if name.endswith(".lora_a"):
            a, b = parts[name], parts[name[:-1] + "b"]
            out[name.removesuffix(".lora_a")] = (alpha / b.shape[1]) * (b @ a)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_follows_the_base_converter_rows(case, tmp_path):
    model_type, extra, targets, (suffix, rows) = CASES[case]
    base = tiny(model_type, extra, tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=6, target_modules=targets,
                                 alpha_pattern={targets[1]: 3})
    convert(peft, tmp_path / "a.gguf", to="gguf", base=base)
    ours = gguf_deltas(tmp_path / "a.gguf")
    from safetensors.torch import load_file
    base_w = load_file(str(base / "model.safetensors"))
    merged = peft_merged_state(base, peft)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch_of(model_type)), 1)
    checked = 0
    for key, weight in base_w.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or not module.endswith(tuple(targets)):
            continue
        delta = merged[key].double().numpy() - weight.double().numpy()
        want = rows(delta) if module.endswith(suffix) else delta
        got = ours[f"{name_map.get_name(module)}.weight"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 2 and len(ours) == 2


def gguf_arch_of(model_type: str) -> str:
    return {"gpt_neox": "GPTNEOX", "falcon": "FALCON", "phi3": "PHI3", "gemma2": "GEMMA2"}[model_type]


@pytest.mark.parametrize("module", ["embed_tokens", "lm_head"])
def test_gguf_tied_embedding_lora_is_refused(module, tmp_path):
    """issue 11: an embed_tokens LoRA on a tied model exported with exit 0 and llama.cpp aborted on it."""
    base = tiny("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}, tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=4, target_modules=[module, "q_proj"])
    if module == "lm_head":  # PEFT's file is read without --base (base binding of a tied lm_head: separate defect)
        convert(peft, tmp_path / "a.safetensors")
        from adapterfmt.format import read_adapter, write_adapter
        adapter = read_adapter(tmp_path / "a.safetensors")
        adapter.manifest.source["base_config"] = {"tie_word_embeddings": True, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2}
        adapter.manifest.base.architecture = "Qwen2ForCausalLM"
        peft = write_adapter(adapter, tmp_path / "b.safetensors")
        kwargs = {}
    else:
        kwargs = {"base": base}
    with pytest.raises(UsageError, match="ties its input and output embeddings"):
        convert(peft, tmp_path / "a.gguf", to="gguf", **kwargs)
    assert not (tmp_path / "a.gguf").exists()
