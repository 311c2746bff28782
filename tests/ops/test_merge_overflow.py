"""A merge whose W + ΔW exceeds the output dtype's range is refused, never written as inf.

Directory merges (--dtype fp16), single-file SD merges and GGUF merges (--gguf-type F16) share the rule:
a tensor that gains inf/NaN values in the output is refused by name and nothing is written. The reference
for "overflows" is numpy/torch's own fp16 rounding of the float64 W + ΔW, not the code under test.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import TensorError

from ..helpers import make_peft_adapter

gguf = pytest.importorskip("gguf")


def huge_adapter(llama_base, tmp_path, factor: float):
    """A PEFT LoRA on v_proj whose ΔW is scaled by ``factor`` (1e6: beyond fp16 everywhere it touches)."""
    peft = make_peft_adapter(llama_base, tmp_path / "peft", target_modules=["v_proj"])
    weights = load_file(str(peft / "adapter_model.safetensors"))
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()},
              str(peft / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "a.safetensors"
    adapterfmt.convert(peft, out, base=llama_base)
    return out


def test_directory_merge_to_fp16_refuses_overflow(llama_base, tmp_path):
    adapter = huge_adapter(llama_base, tmp_path, 1e6)
    with pytest.raises(TensorError, match=r"v_proj\.weight' has \d+ inf/NaN value\(s\) after rounding to float16") as info:
        adapterfmt.merge(llama_base, [adapter], tmp_path / "m16", dtype="fp16")
    assert "--dtype fp32" in info.value.one_line()
    assert not (tmp_path / "m16").exists()
    adapterfmt.merge(llama_base, [adapter], tmp_path / "m32", dtype="fp32")  # fp32 holds it: merged
    merged = load_file(str(tmp_path / "m32" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_gguf_merge_to_f16_refuses_overflow(llama_base, tmp_path):
    from .test_merge_gguf import write_llama_gguf
    from ..helpers import load_model
    base = tmp_path / "base.gguf"
    write_llama_gguf(load_model(llama_base, torch.float32), base)
    adapter = huge_adapter(llama_base, tmp_path, 1e6)
    with pytest.raises(TensorError, match=r"attn_v\.weight' has \d+ inf/NaN value\(s\) once written as F16"):
        adapterfmt.merge(base, [adapter], tmp_path / "m.gguf", gguf_type="F16")
    assert not (tmp_path / "m.gguf").exists()
