"""Single-file SD 1.x checkpoints (LDM layout) as --base, through diffusers' own conversion functions."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.checkpoint.single_file import SingleFilePipeline
from adapterfmt.errors import InputIOError
from adapterfmt.ops.load import load_base

from .kohya_files import sd_scripts_lora
from .ldm_files import save_sd15_single_file


@pytest.fixture(scope="module")
def single(sd15, tmp_path_factory):
    return save_sd15_single_file(sd15[1], tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


def test_fixture_is_what_diffusers_converts_back(sd15, single):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    state = load_file(str(single))
    unet = sd15[1]["unet"]
    converted = convert_ldm_unet_checkpoint(state, {"layers_per_block": unet.config.layers_per_block})
    expected = unet.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_single_file_reads_with_diffusers_names(sd15, single):
    base = load_base(single)
    assert isinstance(base, SingleFilePipeline) and sorted(base.components) == ["text_encoder", "unet"]
    unet, text = sd15[1]["unet"].state_dict(), sd15[1]["text_encoder"].state_dict()
    assert len(base.components["unet"].names()) == len(unet)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(base.get(f"unet.{name}"), unet[name])
    # both CLIP spellings address the same stored weight
    flat = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(base.get(f"text_encoder.{flat}"), text[flat])
    assert base.components["text_encoder"].fingerprint(flat) == base.components["text_encoder"].fingerprint(
        f"text_model.{flat}")


def test_kohya_lora_binds_to_the_single_file_like_to_the_pipeline(sd15, single, tmp_path):
    pipe, models = sd15
    src = tmp_path / "lora.safetensors"
    sd_scripts_lora("sd15", models, src)
    adapterfmt.convert(src, tmp_path / "from-pipe.safetensors", base=pipe)
    adapterfmt.convert(src, tmp_path / "from-single.safetensors", base=single)
    a = adapterfmt.read_adapter(tmp_path / "from-pipe.safetensors").manifest
    b = adapterfmt.read_adapter(tmp_path / "from-single.safetensors").manifest
    assert set(a.modules) == {m.replace("text_encoder.text_model.", "text_encoder.") for m in b.modules}
    fingerprints = {c: {k.removeprefix("text_model."): w.fingerprint for k, w in i.weights.items()}
                    for c, i in b.components.items()}
    assert fingerprints == {c: {k: w.fingerprint for k, w in i.weights.items()} for c, i in a.components.items()}
    assert adapterfmt.validate(tmp_path / "from-pipe.safetensors", base=single).exit_code == 0


def test_layouts_diffusers_cannot_map_one_to_one_are_refused(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(path))
    # A Flux file diffusers' converter cannot be scaled to (here: no img_in, so no inner dimension); complete
    # BFL files are mapped (test_merge_flux_single_file.py).
    with pytest.raises(InputIOError, match="Flux \\(BFL layout\\) file without img_in.weight"):
        load_base(path)


def test_cli_merges_into_a_single_file_and_refuses_flux(sd15, single, tmp_path):
    from click.testing import CliRunner

    from adapterfmt.cli import main
    src = tmp_path / "lora.safetensors"
    sd_scripts_lora("sd15", sd15[1], src)
    adapterfmt.convert(src, tmp_path / "a.safetensors", base=single)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(main, ["merge", "--base", str(single), "--adapter", f"{tmp_path / 'a.safetensors'}:0.5",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "byte for byte" in result.output and out.is_file()
    assert list(load_file(str(out))) == list(load_file(str(single)))
    result = CliRunner().invoke(main, ["merge", "--base", str(single), "--adapter", str(tmp_path / "a.safetensors"),
                                       "--out", str(tmp_path / "merged-dir")])
    assert result.exit_code == 2 and "not a .safetensors file name" in result.output
    assert "--out NAME.safetensors" in result.output and not (tmp_path / "merged-dir").exists()
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(flux))
    result = CliRunner().invoke(main, ["merge", "--base", str(flux), "--adapter", str(tmp_path / "a.safetensors"),
                                       "--out", str(tmp_path / "f.safetensors")])
    assert result.exit_code != 0 and "Flux (BFL layout) file without img_in.weight" in result.output


def test_sdxl_single_file_binds_all_three_components_like_the_pipeline(sdxl, tmp_path):
    """SGM layout: UNet on SGM blocks, te1 one to one, te2 (OpenCLIP) with q/k/v as row slices of in_proj."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    from .ldm_files import save_sdxl_single_file
    pipe, models = sdxl
    single = save_sdxl_single_file(models, tmp_path / "tiny-sdxl.safetensors")
    state = load_file(str(single))
    converted = convert_ldm_unet_checkpoint(state, {"layers_per_block": 2, "addition_embed_type": "text_time"})
    assert set(converted) == set(models["unet"].state_dict())  # the fixture is SGM as diffusers reads it
    te2 = convert_open_clip_checkpoint(models["text_encoder_2"], state, prefix="conditioner.embedders.1.model.")
    expected = models["text_encoder_2"].state_dict()
    assert set(te2) == set(expected) and all(torch.equal(te2[k], expected[k]) for k in expected)
    base = load_base(single)
    q = base.components["text_encoder_2"].source("text_model.encoder.layers.1.self_attn.q_proj.weight")
    assert q.stored.endswith("resblocks.1.attn.in_proj_weight") and q.rows == slice(0, 8)
    src = tmp_path / "lora.safetensors"
    names = sd_scripts_lora("sdxl", models, src)
    adapterfmt.convert(src, tmp_path / "a.safetensors", base=single)
    adapterfmt.convert(src, tmp_path / "b.safetensors", base=pipe)
    a = adapterfmt.read_adapter(tmp_path / "a.safetensors").manifest
    b = adapterfmt.read_adapter(tmp_path / "b.safetensors").manifest
    assert len(a.modules) == len(names) and set(a.components) == {"unet", "text_encoder", "text_encoder_2"}
    for component in a.components:
        assert {k.removeprefix("text_model."): w.fingerprint for k, w in a.components[component].weights.items()} \
            == {k.removeprefix("text_model."): w.fingerprint for k, w in b.components[component].weights.items()}
