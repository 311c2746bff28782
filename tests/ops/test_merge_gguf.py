"""Merging into a Q8_0 GGUF model (quantized with gguf's own quants), to F16 and requantized to Q8_0.

The reference: the base's Q8_0 tensors dequantized by ``gguf``, PEFT's own ΔW (get_delta_weight),
and convert_hf_to_gguf's q/k row permutation written out independently here.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import adapterfmt  # noqa: E402
from adapterfmt.errors import UsageError  # noqa: E402

from ..helpers import load_model, make_peft_adapter  # noqa: E402

BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
Q8 = gguf.GGMLQuantizationType.Q8_0


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (reshape to heads × 2 halves, swap, flatten)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")
    return f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:-1])]}.weight"


def heads_for(hf: str, config) -> int | None:
    return {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(hf.split(".")[-2])


def write_llama_gguf(model, path, qtype=None, split_max_tensors: int = 0) -> None:
    """The model as a llama GGUF with a placeholder vocabulary (enough for llama.cpp's loader),
    q/k permuted as convert_hf_to_gguf does; 2-D weights in ``qtype`` (gguf's quants) or F32."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(config.vocab_size)])
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_token_types([1] * config.vocab_size)
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        heads = heads_for(name, config)
        if heads:
            data = permute(data, heads)
        if data.ndim == 2 and qtype is not None:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def q8_model(llama_base, tmp_path_factory):
    """A tiny Llama as a Q8_0 GGUF (2-D weights Q8_0, norms F32), q/k permuted like convert_hf_to_gguf."""
    path = tmp_path_factory.mktemp("gguf") / "model-Q8_0.gguf"
    write_llama_gguf(load_model(llama_base, torch.float32), path, Q8)
    return path


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory):
    from peft import PeftModel
    tmp = tmp_path_factory.mktemp("gguf-lora")
    make_peft_adapter(llama_base, tmp / "peft", target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    adapterfmt.convert(tmp / "peft", tmp / "a.safetensors", base=llama_base)
    peft_model = PeftModel.from_pretrained(load_model(llama_base, torch.float32), tmp / "peft")
    return tmp / "a.safetensors", peft_model


def expected(q8_model, peft_model) -> dict[str, np.ndarray]:
    """GGUF name -> dequant(W) + ΔW (PEFT's, permuted for q/k) in fp32; W dequantized by gguf."""
    reader = gguf.GGUFReader(q8_model)
    tensors = {t.name: t for t in reader.tensors}
    config = peft_model.base_model.model.config
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        delta = module.get_delta_weight("default").detach().numpy()
        heads = heads_for(f"{name}.weight", config)
        delta = permute(delta, heads) if heads else delta
        tensor = tensors[gguf_name(f"{name}.weight")]
        base = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(delta.shape)
        out[tensor.name] = base + delta
    return out


def read(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_merge_to_f16_equals_dequant_plus_delta(q8_model, lora, tmp_path):
    adapter, peft_model = lora
    summary = adapterfmt.merge(q8_model, [adapter], tmp_path / "m.gguf", gguf_type="F16")
    got, base = read(tmp_path / "m.gguf"), read(q8_model)
    want = expected(q8_model, peft_model)
    assert len(want) == 8
    for name, value in want.items():
        assert got[name].tensor_type == gguf.GGMLQuantizationType.F16
        assert np.array_equal(np.asarray(got[name].data).reshape(value.shape), value.astype(np.float16)), name
    for name, tensor in base.items():  # untouched tensors: the same type and bytes
        if name not in want:
            assert got[name].tensor_type == tensor.tensor_type
            assert np.array_equal(np.asarray(got[name].data), np.asarray(tensor.data)), name
    assert summary.tensors_changed == 8 and len(summary.base_form["layers"]) == 8
    assert all(row["ratio"] < 1e-2 for row in summary.base_form["layers"])  # F16 rounding only
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert int(fields["llama.attention.head_count"].contents()) == peft_model.base_model.model.config.num_attention_heads


def test_requantized_q8_0_output_and_its_error(q8_model, lora, tmp_path):
    adapter, peft_model = lora
    summary = adapterfmt.merge(q8_model, [adapter], tmp_path / "m.gguf")  # keep: each tensor's own type
    got = read(tmp_path / "m.gguf")
    for name, value in expected(q8_model, peft_model).items():
        assert got[name].tensor_type == Q8
        assert np.array_equal(np.asarray(got[name].data), gguf.quants.quantize(value, Q8)), name
        row = next(r for r in summary.base_form["layers"] if r["tensor"] == name)
        decoded = gguf.quants.dequantize(np.asarray(got[name].data), Q8).reshape(value.shape)
        assert row["requant_error_norm"] == pytest.approx(float(np.linalg.norm(decoded - value)), rel=1e-5)
    assert any("requantization error" in note for note in summary.notes)


def test_a_delta_lost_in_requantization_is_refused(q8_model, llama_base, tmp_path):
    from safetensors.torch import load_file, save_file
    make_peft_adapter(llama_base, tmp_path / "peft", target_modules=["v_proj"])
    weights = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    save_file({k: v * 1e-4 if "lora_B" in k else v for k, v in weights.items()},
              str(tmp_path / "peft" / "adapter_model.safetensors"))
    adapterfmt.convert(tmp_path / "peft", tmp_path / "tiny.safetensors", base=llama_base)
    with pytest.raises(UsageError, match=r"bury ΔW.*blk\.\d\.attn_v\.weight") as info:
        adapterfmt.merge(q8_model, [tmp_path / "tiny.safetensors"], tmp_path / "m.gguf", gguf_type="Q8_0")
    assert "--gguf-type F16" in info.value.one_line()
    assert not (tmp_path / "m.gguf").exists()
    adapterfmt.merge(q8_model, [tmp_path / "tiny.safetensors"], tmp_path / "m.gguf", gguf_type="Q8_0", force=True)
    with pytest.raises(UsageError, match="cannot quantize to Q4_K"):
        adapterfmt.merge(q8_model, [tmp_path / "tiny.safetensors"], tmp_path / "k.gguf", gguf_type="Q4_K")


def test_split_model_and_adapters_with_different_tensor_sets(llama_base, lora, tmp_path):
    """llama-export-lora takes neither; here a 3-way split Q8_0 model gets two adapters on different tensors."""
    from peft import PeftModel
    write_llama_gguf(load_model(llama_base, torch.float32), tmp_path / "model.gguf", Q8, split_max_tensors=9)
    shards = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert len(shards) == 3
    adapter, peft_model = lora
    make_peft_adapter(llama_base, tmp_path / "peft2", seed=7, target_modules=["o_proj", "v_proj"])
    adapterfmt.convert(tmp_path / "peft2", tmp_path / "b.safetensors", base=llama_base)
    other = PeftModel.from_pretrained(load_model(llama_base, torch.float32), tmp_path / "peft2")
    adapterfmt.merge(shards[0], [(adapter, 0.5), (tmp_path / "b.safetensors", 2.0)], tmp_path / "m.gguf",
                     gguf_type="F16")
    got, config = read(tmp_path / "m.gguf"), peft_model.base_model.model.config
    assert len(got) == sum(len(gguf.GGUFReader(s).tensors) for s in shards)
    deltas: dict[str, np.ndarray] = {}
    for model, weight in ((peft_model, 0.5), (other, 2.0)):
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A"):
                delta = module.get_delta_weight("default").detach().numpy() * np.float32(weight)
                heads = heads_for(f"{name}.weight", config)
                key = gguf_name(f"{name}.weight")
                delta = permute(delta, heads) if heads else delta
                deltas[key] = deltas[key] + delta if key in deltas else delta  # delta_sum's order: first + second
    assert len(deltas) == 10  # q, k, v (both adapters), o, down in each of 2 layers
    base = {t.name: t for s in shards for t in gguf.GGUFReader(s).tensors}
    for name, delta in deltas.items():
        weight = gguf.quants.dequantize(np.asarray(base[name].data), Q8).reshape(delta.shape)
        assert np.array_equal(np.asarray(got[name].data).reshape(delta.shape), (weight + delta).astype(np.float16)), name
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert not any(key.startswith("split.") for key in fields)


# Opt-in (needs llama.cpp's binaries): LLAMA_CPP_BIN=<dir with llama-quantize>, e.g. /work/llamacpp/build/bin.
LLAMA_CPP_BIN = os.environ.get("LLAMA_CPP_BIN")


@pytest.mark.skipif(not LLAMA_CPP_BIN, reason="set LLAMA_CPP_BIN to llama.cpp's build/bin to run llama-quantize")
def test_q4_k_base_from_llama_quantize(tmp_path):
    """A Q4_K_M base made by llama-quantize: F16 merge = dequant + ΔW; a Q8_0 output loads in llama.cpp."""
    from peft import PeftModel
    from ..helpers import tiny_llama_sized
    base = tiny_llama_sized(tmp_path / "hf", hidden=256, intermediate=512)
    model = load_model(base, torch.float32)
    write_llama_gguf(model, tmp_path / "f32.gguf")
    quantize = Path(LLAMA_CPP_BIN) / "llama-quantize"
    subprocess.run([str(quantize), str(tmp_path / "f32.gguf"), str(tmp_path / "q4k.gguf"), "Q4_K_M"], check=True,
                   capture_output=True)
    make_peft_adapter(base, tmp_path / "peft", target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    adapterfmt.convert(tmp_path / "peft", tmp_path / "a.safetensors", base=base)
    peft_model = PeftModel.from_pretrained(load_model(base, torch.float32), tmp_path / "peft")
    want = expected(tmp_path / "q4k.gguf", peft_model)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q4k.gguf").tensors}
    assert {types[name] for name in want} >= {"Q4_K"}
    adapterfmt.merge(tmp_path / "q4k.gguf", [tmp_path / "a.safetensors"], tmp_path / "f16.gguf", gguf_type="F16")
    got = read(tmp_path / "f16.gguf")
    for name, value in want.items():
        assert np.array_equal(np.asarray(got[name].data).reshape(value.shape), value.astype(np.float16)), name
    with pytest.raises(UsageError, match="cannot quantize to Q4_K"):
        adapterfmt.merge(tmp_path / "q4k.gguf", [tmp_path / "a.safetensors"], tmp_path / "keep.gguf")
    summary = adapterfmt.merge(tmp_path / "q4k.gguf", [tmp_path / "a.safetensors"], tmp_path / "q8.gguf",
                               gguf_type="Q8_0", force=True)
    assert all(row["type"] == "Q8_0" for row in summary.base_form["layers"])
    # llama.cpp's own loader reads the requantized model (llama-quantize loads every tensor).
    subprocess.run([str(quantize), "--allow-requantize", str(tmp_path / "q8.gguf"), str(tmp_path / "again.gguf"),
                    "Q8_0"], check=True, capture_output=True)
