"""kohya / A1111 / ComfyUI LoRA: names, alpha semantics, round trips, name resolution against a base."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterfmt.ops.convert import convert
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.format import read_adapter

from .conftest import deltas
from .kohya_files import write_kohya_file


@pytest.mark.parametrize("name", ["patterns", "rslora"])
def test_kohya_file_round_trips_bit_exactly(name, native, workdir):
    src = workdir / f"{name}.kohya.safetensors"
    write_kohya_file(native[name], src)
    mid, back = workdir / f"{name}-from-kohya.safetensors", workdir / f"{name}-back.kohya.safetensors"
    assert convert(src, mid).worst == "lossless"  # the header's name table resolves the underscores
    report = convert(mid, back, to="kohya")
    assert report.worst == "lossless"  # per-module alpha = scale·rank holds every scale (rsLoRA too)
    with safe_open(str(src), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_kohya_export_of_an_llm_adapter_is_refused_not_written_under_unmapped_names(native, workdir):
    # diffusers/ComfyUI map no 'lora_transformer_model_layers_...' names: 0 layers applied, exit 0 before.
    out = workdir / "llm.kohya.safetensors"
    with pytest.raises(UsageError, match="no kohya name that a kohya consumer"):
        convert(native["patterns"], out, to="kohya")
    assert not out.exists()


def test_sdxl_te1_te2_file_is_refused_not_collapsed(native, workdir):
    te1, te2 = workdir / "te1.safetensors", workdir / "te2.safetensors"
    write_kohya_file(native["patterns"], te1, prefix="lora_te1", name_table=False)
    write_kohya_file(native["patterns"], te2, prefix="lora_te2", name_table=False)
    both = workdir / "sdxl-te.safetensors"
    save_file({**load_file(str(te1)), **load_file(str(te2))}, str(both))
    # te1/te2 are read as separate components (tests/diffusion); these LLM names (o_proj) are no CLIP
    # module diffusers maps, so the file is refused naming them, not collapsed or half-dropped.
    with pytest.raises(ForeignFormatError, match="match no module of the base .*families tried"):
        convert(both, workdir / "collapsed.safetensors", source_format="kohya")


def test_keys_alpha_and_comfyui_delta(native, workdir, base_weights):
    out = workdir / "rs-kohya-src.safetensors"
    write_kohya_file(native["rslora"], out)
    mid = workdir / "rs-mid.safetensors"
    convert(out, mid)
    out = workdir / "rs.kohya.safetensors"
    report = convert(mid, out, to="kohya")
    assert any("rsLoRA stored as alpha" in m.note for m in report.modules) or report.worst == "lossless"
    ours = deltas(native["rslora"], base_weights)
    with safe_open(str(out), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["ss_network_module"] == "networks.lora"
        for module, delta in ours.items():
            name = "lora_unet_" + module.replace(".", "_")
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
    with pytest.raises(ForeignFormatError, match="lora_unet_x.*not one LoHa, LoKr or LoRA module"):
        convert(path, workdir / "loha-out.safetensors", source_format="kohya")
    with pytest.raises(UsageError, match="embedding"):
        convert(native["embed"], workdir / "embed.kohya.safetensors", to="kohya")
