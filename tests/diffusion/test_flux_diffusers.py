"""A Flux LoRA saved by diffusers itself (PEFT keys under ``transformer.``, rank/alpha patterns in
lora_adapter_metadata): read, written back, loaded and fused by diffusers."""
import copy

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapterfmt

from .consumers import flux_output, tiny_flux_pipeline


def _diffusers_flux_lora(transformer, out_dir):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = copy.deepcopy(transformer)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"],
                                 rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 3.0}, init_lora_weights=False))
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return out_dir / "pytorch_lora_weights.safetensors"


def test_flux_lora_round_trip_and_same_outputs_in_diffusers(flux, tmp_path):
    pipe_dir, models = flux
    src = _diffusers_flux_lora(models["transformer"], tmp_path / "lora")
    assert adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir).worst == "lossless"
    adapter = adapterfmt.read_adapter(tmp_path / "af.safetensors")
    assert list(adapter.manifest.components) == ["transformer"]
    with safe_open(str(src), framework="pt") as handle:
        assert len(adapter.tensors) == len(handle.keys())
    q = adapter.manifest.modules["transformer.transformer_blocks.0.attn.to_q"].params
    k = adapter.manifest.modules["transformer.transformer_blocks.0.attn.to_k"].params
    assert (q["rank"], q["alpha"], k["rank"], k["alpha"]) == (2, 8.0, 4, 3.0)  # PEFT's pattern rules
    out = tmp_path / "ours.safetensors"
    assert adapterfmt.convert(tmp_path / "af.safetensors", out, to="diffusers").worst == "lossless"
    base = flux_output(tiny_flux_pipeline(models["transformer"]))
    theirs, ours = tiny_flux_pipeline(models["transformer"]), tiny_flux_pipeline(models["transformer"])
    theirs.load_lora_weights(str(src))
    ours.load_lora_weights(str(out))
    want, got = flux_output(theirs), flux_output(ours)
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # merge into the transformer directory: bit-equal to fuse_lora here
    theirs.fuse_lora(components=["transformer"])
    adapterfmt.merge(pipe_dir / "transformer", [tmp_path / "af.safetensors"], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    fused = {k.replace(".base_layer", ""): v for k, v in theirs.transformer.state_dict().items() if ".lora_" not in k}
    assert set(merged) == set(fused)
    assert all(torch.equal(merged[name], fused[name]) for name in merged)
