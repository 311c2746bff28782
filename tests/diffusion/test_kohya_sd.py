"""kohya sd-scripts LoRA files for SD 1.x and SDXL: every tensor placed on its component, written back exactly."""
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import ForeignFormatError, UsageError

from .kohya_files import sd_scripts_lora

CASES = {"sd15-text_model": ("sd15", "text_model"), "sd15-flat": ("sd15", "flat"), "sdxl": ("sdxl", "text_model")}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, spelling = CASES[request.param]
    pipe, models = request.getfixturevalue(kind)
    path = tmp_path_factory.mktemp(request.param) / "lora.safetensors"
    names = sd_scripts_lora(kind, models, path, te_spelling=spelling)
    return kind, pipe, models, path, names


def _data_section(path):
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0]:]


def test_every_tensor_is_placed_on_its_component(case, tmp_path):
    kind, pipe, models, path, names = case
    out = tmp_path / "af.safetensors"
    report = adapterfmt.convert(path, out, base=pipe)
    assert report.worst == "lossless"
    adapter = adapterfmt.read_adapter(out)
    manifest = adapter.manifest
    # the fixture knows which module each name was made from; diffusers' mapping must agree
    assert set(manifest.modules) == set(names.values())
    assert len(adapter.tensors) == 2 * len(names) == len(load_file(str(path))) * 2 // 3
    assert manifest.source["kohya_names"] == {module: name for name, module in names.items()}
    for key, entry in manifest.modules.items():
        component, inner = key.split(".", 1)
        assert entry.component == component and entry.base_weight == f"{inner}.weight"
        assert manifest.components[component].weights[entry.base_weight].fingerprint
    if kind == "sdxl":  # te1 and te2 stay separate (same module paths, different components)
        one = {k.split(".", 1)[1].removeprefix("text_model.") for k in manifest.modules if k.startswith("text_encoder.")}
        two = {k.split(".", 1)[1].removeprefix("text_model.") for k in manifest.modules if k.startswith("text_encoder_2.")}
        assert len(one) == 12 and one == two
        assert manifest.components["text_encoder_2"].architecture == "CLIPTextModelWithProjection"
    kept = manifest.source["metadata"]
    assert kept["sshs_legacy_hash"] == "deadbeef" and kept["modelspec.sai_model_spec"] == "1.0.0"


def test_kohya_to_adapterfmt_to_kohya_is_bit_exact(case, tmp_path):
    kind, pipe, models, path, names = case
    mid, back = tmp_path / "af.safetensors", tmp_path / "back.safetensors"
    adapterfmt.convert(path, mid, base=pipe)
    assert adapterfmt.convert(mid, back, to="kohya").worst == "lossless"
    with safe_open(str(path), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    # the tensor data section is byte for byte the same (safetensors orders the header's JSON map itself)
    assert _data_section(path) == _data_section(back)


def test_sd15_names_map_without_a_base(sd15, tmp_path):
    path = tmp_path / "lora.safetensors"
    names = sd_scripts_lora("sd15", sd15[1], path)
    adapterfmt.convert(path, tmp_path / "af.safetensors")
    modules = set(adapterfmt.read_adapter(tmp_path / "af.safetensors").manifest.modules)
    # without a base the text encoder keeps the file's 'text_model.' spelling
    assert {m.replace("text_encoder.text_model.", "text_encoder.") for m in modules} == set(names.values())


def test_sgm_names_need_the_unet_config(sdxl, tmp_path):
    path = tmp_path / "lora.safetensors"
    sd_scripts_lora("sdxl", sdxl[1], path)
    with pytest.raises(UsageError, match="SGM block layout"):
        adapterfmt.convert(path, tmp_path / "af.safetensors")


def _edited(src, out, **extra):
    state = load_file(str(src))
    state.update(extra)
    save_file(state, str(out))
    return out


def test_unmatched_keys_are_refused_naming_them_and_the_families(case, tmp_path):
    kind, pipe, models, path, names = case
    bad = _edited(path, tmp_path / "bad.safetensors", **{"lora_unet_foo.weight": torch.zeros(2)})
    with pytest.raises(ForeignFormatError, match=r"'lora_unet_foo.weight' is not a kohya LoRA tensor.*families tried"):
        adapterfmt.convert(bad, tmp_path / "x.safetensors", base=pipe)
    nowhere = _edited(path, tmp_path / "nowhere.safetensors",
                      **{"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
                         "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)})
    # (on SDXL the mix of diffusers and SGM block names makes diffusers drop every SGM name: all are refused)
    with pytest.raises(ForeignFormatError, match=r"kohya name\(s\) match no module of the base \(first: "
                                                 r"lora_unet_down_blocks_7_attentions_0_proj_in\b.*families tried"):
        adapterfmt.convert(nowhere, tmp_path / "x.safetensors", base=pipe)
    assert not (tmp_path / "x.safetensors").exists()


def test_incomplete_lycoris_modules_are_refused_naming_the_family(sd15, tmp_path):
    pipe = sd15[0]
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.zeros(8, 2)},
              str(loha))
    with pytest.raises(ForeignFormatError, match="attn1_to_q.*not one LoRA, LoHa, LoKr or full module|LoHa"):
        adapterfmt.convert(loha, tmp_path / "x.safetensors", base=pipe)
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.zeros(2, 2)}, str(lokr))
    with pytest.raises(ForeignFormatError, match="mlp_fc1"):
        adapterfmt.convert(lokr, tmp_path / "x.safetensors", base=pipe)
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_alpha_and_other_alpha_layouts_round_trip(sd15, tmp_path):
    """Some tools omit alpha (scale 1) or store it as bf16 / shape [1]: written back as read."""
    pipe, models = sd15
    src = tmp_path / "src.safetensors"
    sd_scripts_lora("sd15", models, src, dtype=torch.bfloat16)
    state = load_file(str(src))
    names = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")})
    state.pop(f"{names[0]}.alpha")
    state[f"{names[1]}.alpha"] = torch.tensor([4.0], dtype=torch.float32)
    save_file(state, str(src), metadata={"ss_network_module": "networks.lora"})
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe)
    adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "back.safetensors", to="kohya")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape and torch.equal(back[key], value), key
