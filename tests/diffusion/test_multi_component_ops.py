"""Other operations on multi-component adapters: inspect, rank changes, unmerge from a component directory."""
import torch
from safetensors.torch import load_file

import adapterfmt

from .kohya_files import sd_scripts_lora


def test_inspect_resize_and_unmerge(sd15, tmp_path):
    pipe, models = sd15
    sd_scripts_lora("sd15", models, tmp_path / "k.safetensors", dtype=torch.float32)
    adapter = tmp_path / "a.safetensors"
    adapterfmt.convert(tmp_path / "k.safetensors", adapter, base=pipe)
    info = adapterfmt.inspect_adapter(adapter)
    assert info["components"]["unet"]["modules"] == 40 and info["components"]["text_encoder"]["modules"] == 12
    assert info["base"]["fingerprinted_weights"] == 52
    # exact compaction and a lossy rank cut keep every module on its component
    assert adapterfmt.convert(adapter, tmp_path / "c.safetensors", resize={}).worst in ("lossless", "exact")
    adapterfmt.convert(adapter, tmp_path / "r.safetensors", resize={"rank": 1})
    cut = adapterfmt.read_adapter(tmp_path / "r.safetensors").manifest
    assert sorted(cut.components) == ["text_encoder", "unet"] and len(cut.modules) == 52
    assert all(e.params["rank"] == 1 and e.component for e in cut.modules.values())
    # unmerge from a merged UNet directory restores the base within the merge's rounding
    adapterfmt.merge(pipe / "unet", [adapter], tmp_path / "merged")
    stats = adapterfmt.unmerge(tmp_path / "merged", [adapter], tmp_path / "restored", base=pipe / "unet")
    assert stats.tensors_changed == 40 and stats.verification["max_error_merged_ulps"] <= 1.0
    restored = load_file(str(tmp_path / "restored" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(restored) == set(original)
    assert max((restored[k] - original[k]).abs().max().item() for k in original) < 1e-6
