"""PEFT VeRA: import (projections regenerated, not stored), merge vs PEFT, round trip, file size."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import adapterfmt
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.format import read_adapter
from adapterfmt.methods.torch_cpu_rng_peft import vera_projections
from tests.helpers import load_model, peft_logits, peft_merged_state


def make_vera(base, out, save_projection=True, fan_in_fan_out=False, targets=("q_proj", "v_proj", "down_proj")):
    from peft import VeraConfig, get_peft_model
    torch.manual_seed(1)
    config = VeraConfig(r=32, target_modules=list(targets), projection_prng_key=1234,
                        save_projection=save_projection, fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(load_model(base), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_merge_matches_peft_and_file_is_smaller(save_projection, llama_base, tmp_path):
    peft_dir = make_vera(llama_base, tmp_path / "peft", save_projection)
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    adapter = read_adapter(native)
    assert {e.method for e in adapter.manifest.modules.values()} == {"vera"}
    assert not any("proj_A" in e.tensors for e in adapter.manifest.modules.values())  # regenerated, not stored
    adapterfmt.merge(llama_base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    want = peft_merged_state(llama_base, peft_dir)
    base = load_model(llama_base).state_dict()
    changed = 0
    for name, tensor in want.items():
        assert int(ulp_distance(got[name], tensor).max()) <= 1, name
        changed += not torch.equal(tensor, base[name])
    assert changed >= 6
    ours, theirs = native.stat().st_size, (peft_dir / "adapter_model.safetensors").stat().st_size
    print(f"VeRA save_projection={save_projection}: adapterfmt {ours} B, PEFT {theirs} B")
    assert ours < theirs or not save_projection


def test_vera_peft_round_trip_logits(llama_base, tmp_path):
    peft_dir = make_vera(llama_base, tmp_path / "peft")
    native, back = tmp_path / "a.safetensors", tmp_path / "back"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    adapterfmt.convert(native, back, to="peft")
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True
    saved, ours = load_file(peft_dir / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert set(saved) == set(ours)
    for key in ("base_model.vera_A", "base_model.vera_B"):
        assert saved[key].tobytes() == ours[key].tobytes(), key
    torch.testing.assert_close(peft_logits(llama_base, back), peft_logits(llama_base, peft_dir), rtol=0, atol=1e-5)


def test_vera_gpt2_conv1d_merge_matches_peft(gpt2_base, tmp_path):
    peft_dir = make_vera(gpt2_base, tmp_path / "peft", fan_in_fan_out=True, targets=("c_attn", "c_fc"))
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=gpt2_base)
    adapterfmt.merge(gpt2_base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    for name, tensor in peft_merged_state(gpt2_base, peft_dir).items():
        assert int(ulp_distance(got[name], tensor).max()) <= 1, name


def test_vera_unreproducible_projections_are_kept(llama_base, tmp_path):
    """A saved pair that no generator variant reproduces is kept per module and still merges as PEFT."""
    from safetensors.torch import load_file as load_torch, save_file
    peft_dir = make_vera(llama_base, tmp_path / "peft")
    weights = peft_dir / "adapter_model.safetensors"
    state = load_torch(weights)
    state["base_model.vera_A"] = state["base_model.vera_A"].to(torch.bfloat16).float()  # bf16-trained look
    save_file(state, str(weights), metadata={"format": "pt"})
    native = tmp_path / "a.safetensors"
    report = adapterfmt.convert(peft_dir, native, base=llama_base)
    assert any("kept as per-module" in note for note in report.notes)
    assert all("proj_A" in e.tensors for e in read_adapter(native).manifest.modules.values())
    adapterfmt.merge(llama_base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    for name, tensor in peft_merged_state(llama_base, peft_dir).items():
        assert int(ulp_distance(got[name], tensor).max()) <= 1, name
    back = tmp_path / "back"
    adapterfmt.convert(native, back, to="peft")
    torch.testing.assert_close(peft_logits(llama_base, back), peft_logits(llama_base, peft_dir), rtol=0, atol=1e-5)


def test_vera_regeneration_is_bit_exact_in_numpy_alone(llama_base, tmp_path):
    """The PEFT-saved projections equal the numpy generator's output, compared as raw bytes (no torch)."""
    peft_dir = make_vera(llama_base, tmp_path / "peft")
    saved = load_file(peft_dir / "adapter_model.safetensors")
    a, b = vera_projections(1234, 32, saved["base_model.vera_A"].shape[1], saved["base_model.vera_B"].shape[0])
    assert a.dtype == b.dtype == np.float32
    assert a.tobytes() == saved["base_model.vera_A"].tobytes()
    assert b.tobytes() == saved["base_model.vera_B"].tobytes()
