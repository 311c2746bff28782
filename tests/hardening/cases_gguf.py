"""Corpus rows for the llama.cpp GGUF LoRA reader (header keys, tensor pairs, shapes, types)."""
from __future__ import annotations

import numpy as np

from .corpus import Case, Env

F = r"a\.gguf"
# ne = reversed torch shape: lora_a torch (r, in) = (4, 64), lora_b torch (out, r) = (64, 4).
A = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
B = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
GOOD = {"blk.0.attn_v.weight.lora_a": A, "blk.0.attn_v.weight.lora_b": B}


def write_gguf(path, tensors=GOOD, *, arch="llama", kind="adapter", adapter_type="lora", alpha=8.0,
               hf_arch=None, raw=None):
    """A GGUF adapter written with the gguf package; ``raw`` maps tensor names to a quantisation type."""
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.type", kind)
    writer.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if hf_arch:
        writer.add_string("adapterfmt.hf_architecture", hf_arch)
    for name, data in tensors.items():
        qtype = (raw or {}).get(name)
        if qtype is not None:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_case(**kwargs):
    def build(env: Env):
        path = write_gguf(env.tmp / "a.gguf", **kwargs)
        return ["convert", path, env.tmp / "out.safetensors"]
    return build


def truncated(env: Env):
    path = write_gguf(env.tmp / "a.gguf")
    path.write_bytes(path.read_bytes()[:200])
    return ["convert", path, env.tmp / "out.safetensors"]


def q8():
    import gguf
    return {"blk.0.attn_v.weight.lora_a": gguf.GGMLQuantizationType.Q8_0}


CASES = [
    Case("gguf truncated", truncated, 1, rf"{F}: not a readable GGUF file .*; the file is truncated or corrupt"),
    Case("gguf general.type model", gguf_case(kind="model"), 1,
         rf"{F}: general.type='model', adapter.type='lora': not a GGUF LoRA adapter; a full model"),
    Case("gguf adapter.type not lora", gguf_case(adapter_type="control_vector"), 1,
         rf"{F}: general.type='adapter', adapter.type='control_vector': not a GGUF LoRA adapter"),
    Case("gguf unknown architecture", gguf_case(arch="gpt2"), 1,
         rf"{F}: GGUF architecture 'gpt2' is not covered; covered: falcon, gemma, gemma2, gemma3, gptneox, granite, "
         r"granitemoe, llama, phi3, qwen2, qwen2moe, qwen3, qwen3moe, stablelm"),
    Case("gguf architecture disagrees with recorded HF architecture", gguf_case(arch="qwen2",
                                                                               hf_arch="LlamaForCausalLM"), 1,
         rf"{F}: GGUF architecture 'qwen2' does not match the base's LlamaForCausalLM; model arch and LoRA arch"),
    Case("gguf lora_a without lora_b", gguf_case(tensors={"blk.0.attn_v.weight.lora_a": A}), 1,
         rf"{F}: tensor 'blk.0.attn_v.weight' is missing one component; the adapter is incomplete"),
    Case("gguf lora_a not transposed", gguf_case(tensors={"blk.0.attn_v.weight.lora_a": A.T.copy(),
                                                          "blk.0.attn_v.weight.lora_b": B}), 1,
         rf"{F}: tensor 'blk.0.attn_v.weight': lora_a ne \[4, 64\] and lora_b ne \[4, 64\] do not form a low-rank"),
    Case("gguf quantised lora tensor", gguf_case(raw=q8()), 1,
         rf"{F}: tensor 'blk.0.attn_v.weight.lora_a' is Q8_0; quantised LoRA tensors are not supported; re-export"),
    Case("gguf tensor with no transformers name", gguf_case(tensors={"blk.0.attn_qkv.weight.lora_a": A,
                                                                     "blk.0.attn_qkv.weight.lora_b": B}), 1,
         rf"{F}: tensor 'blk.0.attn_qkv.weight' has no transformers name for llama"),
    Case("gguf unexpected tensor suffix", gguf_case(tensors=dict(GOOD, **{"blk.0.attn_v.weight.lora_c": A})), 1,
         rf"{F}: tensor 'blk.0.attn_v.weight.lora_c' has an unexpected suffix"),
    Case("gguf alpha NaN", gguf_case(alpha=float("nan")), 1,
         rf"{F}: adapter.lora.alpha is nan, not a finite number; the file is damaged"),
]
