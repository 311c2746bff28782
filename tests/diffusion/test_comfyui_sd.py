"""ComfyUI-layout SD 1.x / SDXL LoRA files (diffusion_model.<LDM blocks>, text_encoders.clip_l|clip_g): every tensor
placed by diffusers' own mappings, written back bit-exactly, converted to diffusers format with the same outputs.

diffusers 0.42.1 loads none of these files itself ("Invalid LoRA checkpoint"), and its SD 1.x loader does not map
kohya names on the original blocks either (it passes no UNet config); the references are the float64 W + ΔW from
the file's own tensors, and for SDXL also diffusers loading the same tensors under sd-scripts' SGM names.
"""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import ForeignFormatError

from .comfyui_files import comfyui_lora
from .consumers import lora_layer_count, outputs, tiny_pipeline
from .ldm_files import save_sd15_single_file


def _reference(kind, models, src, names):
    """The pipeline with each weight + alpha/rank · up @ down in float64, rounded once."""
    state, pipe = load_file(str(src)), tiny_pipeline(kind, models)
    with torch.no_grad():
        for name, target in names.items():
            component, module = target.split(".", 1)
            down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
            weight = getattr(pipe, component).get_submodule(module).weight
            weight.copy_((weight.double() + float(state[f"{name}.alpha"]) / down.shape[0] * (up @ down)).to(weight.dtype))
    return pipe


@pytest.mark.parametrize("kind,base", [("sd15", "pipeline"), ("sd15", "single-file"), ("sdxl", "pipeline")])
def test_every_tensor_placed_and_written_back_bit_exactly(kind, base, request, tmp_path):
    pipe_dir, models = request.getfixturevalue(kind)
    src = tmp_path / "comfy.safetensors"
    roles = ("lora_A", "lora_B") if base == "pipeline" and kind == "sd15" else ("lora_down", "lora_up")
    names = comfyui_lora(models, src, roles=roles)
    base_path = save_sd15_single_file(models, tmp_path / "single.safetensors") if base == "single-file" else pipe_dir
    report = adapterfmt.convert(src, tmp_path / "af.safetensors", base=base_path)
    assert report.source_format == "comfyui" and report.worst == "lossless"
    adapter = adapterfmt.read_adapter(tmp_path / "af.safetensors")
    found = {k.replace("text_encoder.text_model.", "text_encoder.") if base == "single-file" else k: k
             for k in adapter.manifest.modules}
    assert set(found) == set(names.values())  # the fixture's own LDM table and diffusers' mapping agree
    state = load_file(str(src))
    for name, target in names.items():
        entry = adapter.manifest.modules[found[target]]
        assert torch.equal(adapter.tensors[entry.tensors["lora_A"].name], state[f"{name}.{roles[0]}.weight"])
        assert torch.equal(adapter.tensors[entry.tensors["lora_B"].name], state[f"{name}.{roles[1]}.weight"])
        assert entry.params["alpha"] == float(state[f"{name}.alpha"])
    if kind == "sdxl":  # CLIP-L and CLIP-G stay on their own components
        assert {m.split(".")[0] for m in adapter.manifest.modules} == {"unet", "text_encoder", "text_encoder_2"}
    back = tmp_path / "back.safetensors"
    assert adapterfmt.convert(tmp_path / "af.safetensors", back, to="comfyui").worst == "lossless"
    again = load_file(str(back))
    assert set(again) == set(state) and all(torch.equal(again[k], v) and again[k].dtype == v.dtype for k, v in state.items())
    with safe_open(str(src), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert a.metadata() == b.metadata() == {"software": "ComfyUI"}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_converted_to_diffusers_gives_the_reference_outputs(kind, request, tmp_path):
    pipe_dir, models = request.getfixturevalue(kind)
    src, twin = tmp_path / "comfy.safetensors", tmp_path / "kohya-twin.safetensors"
    names = comfyui_lora(models, src, dtype=torch.float32, kohya_twin=twin, uniform_alpha=kind == "sdxl")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        tiny_pipeline(kind, models).load_lora_weights(str(src))
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    assert adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "d.safetensors", to="diffusers").worst == "lossless"
    ours = tiny_pipeline(kind, models)
    ours.load_lora_weights(str(tmp_path / "d.safetensors"))
    want, got = outputs(kind, _reference(kind, models, src, names)), outputs(kind, ours)
    for component in want:
        torch.testing.assert_close(got[component], want[component], rtol=2e-5, atol=2e-5)
    if kind == "sdxl":  # diffusers on the same tensors under sd-scripts' SGM names
        theirs = tiny_pipeline(kind, models)
        theirs.load_lora_weights(str(twin))
        assert lora_layer_count(theirs) == lora_layer_count(ours)
        for component, value in outputs(kind, theirs).items():
            torch.testing.assert_close(got[component], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", ["diffusion_model.input_blocks.1.1.norm.diff",  # a full-weight diff: no LoRA role
                                   "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight"])
def test_partly_matching_comfyui_files_are_refused_by_name(sd15, tmp_path, extra):
    pipe_dir, models = sd15
    src = tmp_path / "comfy.safetensors"
    comfyui_lora(models, src)
    state = load_file(str(src))
    state[extra] = torch.zeros(2, 2)
    save_file(state, str(src))
    name = extra.removesuffix(".lora_up.weight")
    with pytest.raises(ForeignFormatError, match=name.replace(".", r"\.") + ".*families tried"):
        adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)


def test_kohya_names_on_the_original_sd15_blocks_read_and_write_back(sd15, tmp_path):
    """sd-scripts/A1111 spelling on LDM blocks (lora_unet_input_blocks_1_1_…): the same modules, bit-exact back."""
    pipe_dir, models = sd15
    src, twin = tmp_path / "comfy.safetensors", tmp_path / "twin.safetensors"
    names = comfyui_lora(models, src, kohya_twin=twin)
    assert adapterfmt.convert(twin, tmp_path / "af.safetensors", base=pipe_dir).source_format == "kohya"
    assert set(adapterfmt.read_adapter(tmp_path / "af.safetensors").manifest.modules) == set(names.values())
    assert adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "back.safetensors", to="kohya").worst == "lossless"
    want, got = load_file(str(twin)), load_file(str(tmp_path / "back.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in want.items())


def test_a_file_of_no_known_family_is_refused_naming_its_keys(tmp_path):
    from adapterfmt.errors import UsageError
    src = tmp_path / "odd.safetensors"
    save_file({"blocks.0.attn.wq.delta": torch.zeros(2, 2), "blocks.0.attn.wk.delta": torch.zeros(2, 2)}, str(src))
    with pytest.raises(UsageError, match=r"its keys \(blocks\.0\.attn\.wk\.delta, blocks\.0\.attn\.wq\.delta\) match "
                                         r"no family \(tried: .*kohya.*bfl, comfyui"):
        adapterfmt.convert(src, tmp_path / "out.safetensors")
