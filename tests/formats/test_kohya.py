"""kohya / A1111 / ComfyUI LoRA: names, alpha semantics, round trips, name resolution against a base."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterfmt.ops.convert import convert
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.format import read_adapter

from .conftest import assert_round_trip, deltas


@pytest.mark.parametrize("name", ["patterns", "rslora"])
def test_round_trip_is_lossless(name, native, workdir, base_weights):
    out, back = workdir / f"{name}.kohya.safetensors", workdir / f"{name}-from-kohya.safetensors"
    report = convert(native[name], out, to="kohya")
    assert report.worst == "lossless"  # per-module alpha = scale·rank holds every scale (rsLoRA too)
    convert(out, back)  # our header's name table resolves the underscores without --base
    assert_round_trip(native[name], back, report, base_weights)


def test_keys_alpha_and_comfyui_delta(native, workdir, base_weights):
    out = workdir / "rs.kohya.safetensors"
    report = convert(native["rslora"], out, to="kohya")
    assert any("rsLoRA stored as alpha" in m.note for m in report.modules)
    ours = deltas(native["rslora"], base_weights)
    with safe_open(str(out), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["ss_network_module"] == "networks.lora"
        for module, delta in ours.items():
            name = "lora_transformer_" + module.replace(".", "_")
            down, up = handle.get_tensor(f"{name}.lora_down.weight"), handle.get_tensor(f"{name}.lora_up.weight")
            alpha = handle.get_tensor(f"{name}.alpha")
            assert alpha.dim() == 0
            # ComfyUI / A1111: scale = alpha / lora_down.shape[0]; ΔW = up @ down * scale.
            comfy = (up @ down) * (alpha.item() / down.shape[0])
            torch.testing.assert_close(comfy, delta, rtol=1e-6, atol=1e-7)
    assert len(keys) == 3 * len(ours)


def test_third_party_file_needs_base_and_missing_alpha_means_scale_1(workdir, base, native):
    plain = {k: v for k, v in read_adapter(native["patterns"]).tensors.items()}
    target = "model.layers.1.self_attn.q_proj"
    state = {"lora_transformer_model_layers_1_self_attn_q_proj.lora_down.weight": plain[f"{target}.lora_A"],
             "lora_transformer_model_layers_1_self_attn_q_proj.lora_up.weight": plain[f"{target}.lora_B"]}
    path = workdir / "third-party.safetensors"
    save_file(state, str(path))
    with pytest.raises(UsageError, match="without the base model"):
        convert(path, workdir / "tp.safetensors", source_format="kohya")
    convert(path, workdir / "tp.safetensors", source_format="kohya", base=base)
    entry = read_adapter(workdir / "tp.safetensors").manifest.modules[target]
    assert entry.params["scale"] == 1.0 and entry.params["rank"] == 4
    assert read_adapter(workdir / "tp.safetensors").manifest.base.weights[entry.base_weight].fingerprint


def test_lycoris_and_embeddings_are_refused(workdir, native):
    path = workdir / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.lora_down.weight": torch.zeros(1, 2)},
              str(path))
    with pytest.raises(ForeignFormatError, match="LyCORIS hada"):
        convert(path, workdir / "loha-out.safetensors", source_format="kohya")
    with pytest.raises(UsageError, match="embedding"):
        convert(native["embed"], workdir / "embed.kohya.safetensors", to="kohya")
