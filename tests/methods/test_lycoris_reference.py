"""LoHa and LoKr ΔW against LyCORIS's own functional implementation (lycoris-lora is the reference)."""
from __future__ import annotations

import pytest
import torch

import adapterfmt
from adapterfmt.format import read_adapter
from adapterfmt.methods import get_method
from adapterfmt.methods.lokr import lokr_scale
from tests.tuner_helpers import make_tuner_adapter

lycoris_loha = pytest.importorskip("lycoris.functional.loha")
lycoris_lokr = pytest.importorskip("lycoris.functional.lokr")


def _imported(base, tmp_path, method):
    peft_dir = make_tuner_adapter(base, tmp_path / "peft", method)
    adapterfmt.convert(peft_dir, tmp_path / "a.safetensors", base=base)
    return read_adapter(tmp_path / "a.safetensors")


def test_loha_delta_equals_lycoris(llama_base, tmp_path):
    adapter = _imported(llama_base, tmp_path, "loha")
    for target, entry in adapter.manifest.modules.items():
        t = adapter.module_tensors(target)
        ours = get_method("loha").delta(entry, t)
        # LyCORIS's argument order is (w1d, w1u, w2d, w2u); gamma is the final scale alpha/r.
        ref = lycoris_loha.diff_weight(t["w1_b"], t["w1_a"], t["w2_b"], t["w2_a"], None, None,
                                       gamma=entry.params["scale"], backend="torch")
        assert torch.equal(ours, ref), target


def test_lokr_delta_equals_lycoris_up_to_the_documented_scale_convention(llama_base, tmp_path):
    adapter = _imported(llama_base, tmp_path, "lokr")
    seen = set()
    for target, entry in adapter.manifest.modules.items():
        t = adapter.module_tensors(target)
        ours = get_method("lokr").delta(entry, t)
        # diff_weight(gamma=alpha) divides by the factor rank, and uses scale 1 when both halves are full.
        ref = lycoris_lokr.diff_weight(t.get("w1"), t.get("w1_a"), t.get("w1_b"), t.get("w2"), t.get("w2_a"),
                                       t.get("w2_b"), None, gamma=entry.params["alpha"], backend="torch")
        both_full = "w1" in t and "w2" in t
        seen.add(both_full)
        lycoris_rule = lokr_scale("lycoris", entry.params["rank"], entry.params["alpha"], both_full)
        torch.testing.assert_close(ours, ref * (entry.params["scale"] / lycoris_rule), rtol=1e-6, atol=0)
        if both_full:
            assert entry.params["scale"] != lycoris_rule  # PEFT's alpha/r vs LyCORIS's 1
    assert seen == {True, False}


def test_lokr_lycoris_convention_entry_equals_lycoris(llama_base, tmp_path):
    adapter = _imported(llama_base, tmp_path, "lokr")
    for target, entry in adapter.manifest.modules.items():
        t = adapter.module_tensors(target)
        both_full = "w1" in t and "w2" in t
        params = dict(entry.params, convention="lycoris",
                      scale=lokr_scale("lycoris", entry.params["rank"], entry.params["alpha"], both_full))
        lyc_entry = entry.replace(params=params)
        get_method("lokr").check_entry(target, lyc_entry)
        ref = lycoris_lokr.diff_weight(t.get("w1"), t.get("w1_a"), t.get("w1_b"), t.get("w2"), t.get("w2_a"),
                                       t.get("w2_b"), None, gamma=entry.params["alpha"], backend="torch")
        torch.testing.assert_close(get_method("lokr").delta(lyc_entry, t), ref, rtol=1e-6, atol=0)
