"""PEFT FourierFT: positions regenerated bit for bit, n_frequency_pattern round trip, file size.

Merge-vs-PEFT (fp32 and bf16 bases, Llama and Qwen2) and round-trip logits run in test_peft_tuners.py.
"""
from __future__ import annotations

import json

import numpy as np
import torch

import adapterfmt
from adapterfmt.format import read_adapter
from adapterfmt.methods.torch_cpu_rng_peft import fourierft_indices
from tests.helpers import load_model, peft_logits
from tests.tuner_helpers import make_tuner_adapter


def test_fourierft_positions_regenerate_bit_exact_in_numpy(llama_base, tmp_path):
    """PEFT's live ``indices`` of every layer equal the numpy generator's (no torch in the regeneration)."""
    from peft import PeftModel
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", "fourierft")
    model = PeftModel.from_pretrained(load_model(llama_base), peft_dir)
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "fourierft_spectrum") and "default" in getattr(module, "indices", {}):
            want = module.indices["default"].numpy()
            got = fourierft_indices(4321, module.out_features, module.in_features, want.shape[1])
            assert got.dtype == np.int64 and got.tobytes() == want.tobytes(), name
            checked += 1
    assert checked == 6


def test_fourierft_pattern_round_trip_and_size(llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", "fourierft")
    native, back = tmp_path / "a.safetensors", tmp_path / "back"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    sizes = {t: e.params["n_frequency"] for t, e in read_adapter(native).manifest.modules.items()}
    assert sorted(set(sizes.values())) == [24, 40]
    adapterfmt.convert(native, back, to="peft")
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["n_frequency"] == 40 and config["random_loc_seed"] == 4321
    assert set(config["n_frequency_pattern"]) == {t for t, n in sizes.items() if n == 24}
    torch.testing.assert_close(peft_logits(llama_base, back), peft_logits(llama_base, peft_dir), rtol=0, atol=1e-5)
    ours, theirs = native.stat().st_size, (peft_dir / "adapter_model.safetensors").stat().st_size
    print(f"FourierFT: adapterfmt {ours} B, PEFT {theirs} B (PEFT's config holds seed and n separately)")


def test_vera_file_sizes(llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", "vera")
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    ours, theirs = native.stat().st_size, (peft_dir / "adapter_model.safetensors").stat().st_size
    print(f"VeRA: adapterfmt {ours} B, PEFT {theirs} B")
    assert ours < theirs
