"""PEFT trainable tokens (LoRA ``trainable_token_indices`` and the ``TRAINABLE_TOKENS`` tuner) against PEFT itself.

Real PEFT adapters on tiny random Llama (tied and untied embeddings) and GPT-2 (tied ``wte``), trained
rows moved off their init: our merge equals ``merge_and_unload`` bit for bit (fp32 and bf16), PEFT ->
adapterfmt -> PEFT loads with equal logits, unmerge restores the rows from the base, and the refusals
name what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterfmt
from adapterfmt.errors import AdapterFmtError, ForeignFormatError, UsageError
from adapterfmt.format import read_adapter, write_adapter
from tests.helpers import load_model, peft_logits, peft_merged_state, tiny_gpt2

#: (PEFT config factory, architecture). Indices include 0 and the last token.
KINDS = {
    "lora_list": lambda arch: _lora(arch, [0, 5, 7, 127 if arch != "gpt2" else 95]),
    "lora_dict": lambda arch: _lora(arch, {"embed_tokens": [1, 5], "lm_head": [3, 4, 9]}),
    "tuner": lambda arch: _tuner([2, 9, 100 if arch != "gpt2" else 90]),
}
CASES = [("llama_tied", "lora_list"), ("llama_tied", "tuner"), ("llama", "lora_list"), ("llama", "lora_dict"),
         ("llama", "tuner"), ("gpt2", "lora_list"), ("gpt2", "tuner")]


def _lora(arch, indices):
    from peft import LoraConfig
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    return LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                      fan_in_fan_out=arch == "gpt2", trainable_token_indices=indices)


def _tuner(indices):
    from peft import TrainableTokensConfig
    return TrainableTokensConfig(token_indices=indices)


def tiny_llama_tied(path: Path, dtype, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    made = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in made:
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            path = tmp_path_factory.mktemp(f"{arch}-{dtype}") / "base"
            made[arch, dtype] = tiny_gpt2(path, torch_dtype) if arch == "gpt2" else \
                tiny_llama_tied(path, torch_dtype, arch == "llama_tied")
        return made[arch, dtype]
    return get


def make_adapter(base: Path, out: Path, config) -> Path:
    """A PEFT adapter whose trained rows (and LoRA factors) are moved off their init."""
    from peft import get_peft_model
    torch.manual_seed(1)
    model = get_peft_model(load_model(base), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def tensor_bytes(path: Path) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() * t.element_size() for t in load_file(path).values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch,kind", CASES)
def test_merge_equals_peft_and_round_trip_logits(arch, kind, dtype, bases, tmp_path):
    base = bases(arch, dtype)
    peft_dir = make_adapter(base, tmp_path / "peft", KINDS[kind](arch))
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=base)
    adapter = read_adapter(native)
    assert adapter.version == (1, 3) and "trainable_tokens" in adapter.manifest.methods()
    summary = adapterfmt.merge(base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    want = peft_merged_state(base, peft_dir)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    embedding = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    assert not torch.equal(want[embedding], load_model(base).state_dict()[embedding])
    tied = arch != "llama"
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config.get("tie_word_embeddings", True) is tied and not any("untied" in n for n in summary.notes)
    if dtype == "fp32":
        back = tmp_path / "back"
        adapterfmt.convert(native, back, to="peft")
        torch.testing.assert_close(peft_logits(base, back), peft_logits(base, peft_dir), rtol=0, atol=1e-5)
        # Tensor bytes: PEFT's rows (the tied head's copy not stored twice) plus 8 bytes per index.
        rows = sum(8 * e.params["count"] for e in adapter.manifest.modules.values() if e.method == "trainable_tokens")
        copies = tensor_bytes(peft_dir / "adapter_model.safetensors") - tensor_bytes(back / "adapter_model.safetensors")
        assert sum(t.numel() * t.element_size() for t in adapter.tensors.values()) == \
            tensor_bytes(peft_dir / "adapter_model.safetensors") - copies + rows


def test_unmerge_needs_the_base_and_restores_the_rows_exactly(bases, tmp_path):
    base = bases("llama_tied", "bf16")
    peft_dir = make_adapter(base, tmp_path / "peft", KINDS["lora_list"]("llama"))
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=base)
    adapterfmt.merge(base, [(native, 1.0)], tmp_path / "merged")
    with pytest.raises(UsageError, match="trainable_tokens.*--base"):
        adapterfmt.unmerge(tmp_path / "merged", [(native, 1.0)], tmp_path / "restored")
    adapterfmt.unmerge(tmp_path / "merged", [(native, 1.0)], tmp_path / "restored", base=base)
    name = "model.embed_tokens.weight"
    assert torch.equal(load_model(tmp_path / "restored").state_dict()[name], load_model(base).state_dict()[name])


def test_import_without_base_is_refused_by_name(bases, tmp_path):
    base = bases("llama", "fp32")
    peft_dir = make_adapter(base, tmp_path / "peft", KINDS["tuner"]("llama"))
    with pytest.raises(ForeignFormatError, match="vocabulary size") as exc:
        adapterfmt.convert(peft_dir, tmp_path / "a.safetensors")
    assert "--base" in exc.value.hint


def test_other_writers_refuse_by_name(bases, tmp_path):
    base = bases("llama", "fp32")
    peft_dir = make_adapter(base, tmp_path / "peft", KINDS["tuner"]("llama"))
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=base)
    for writer, out in (("gguf", "a.gguf"), ("mlx", "mlx"), ("kohya", "k.safetensors")):
        with pytest.raises(AdapterFmtError, match="trainable_tokens"):
            adapterfmt.convert(native, tmp_path / out, to=writer, base=base)


@pytest.mark.parametrize("indices,code", [([3, 3, 5], "listed twice"), ([3, 128, 5], "outside")])
def test_validate_reports_bad_indices_and_merge_refuses_them(indices, code, bases, tmp_path):
    base = bases("llama", "fp32")
    peft_dir = make_adapter(base, tmp_path / "peft", KINDS["tuner"]("llama"))
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=base)
    good = adapterfmt.validate(native, base=base)
    assert good.valid and not good.warnings
    adapter = read_adapter(native)
    ref = adapter.manifest.modules["model.embed_tokens"].tensors["indices"]
    adapter.tensors[ref.name] = torch.tensor(indices, dtype=torch.int64)
    bad = write_adapter(adapter, tmp_path / "bad.safetensors")
    result = adapterfmt.validate(bad)
    assert not result.valid and any(code in p and "model.embed_tokens" in p for p in result.problems)
    with pytest.raises(AdapterFmtError, match=code):
        adapterfmt.merge(base, [(bad, 1.0)], tmp_path / "merged")
