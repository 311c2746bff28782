"""Flux LoRA files in kohya sd-scripts, ComfyUI, ai-toolkit and BFL layouts (fused qkv / linear1), for a tiny
Flux transformer + CLIP-L built from configs: every tensor accounted for, written back bit-exactly, converted
to diffusers and loaded by diffusers, merged equal to fuse_lora.

Where diffusers 0.42.1 cannot load a layout itself (checked below: its kohya-Flux split of a single block's
linear1 is hard-coded to FLUX.1's 3072/12288 rows; it drops img_in/txt_in/time_in/vector_in/final_layer
LoRAs without a word; it loads lora_A/lora_B files with diffusion_model. or bare BFL names as nothing), the
reference is the model with W + ΔW, ΔW computed in float64 from the file's own tensors (flux_files.py).
"""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import ForeignFormatError, UsageError

from .consumers import flux_output
from .flux_files import flux_lora_file, reference_delta
from .models import clip_text, flux_transformer, save_component

TE_STYLES = ("kohya", "comfyui")
WRITER = {"kohya": "kohya", "comfyui": "bfl", "ai-toolkit": "bfl", "bfl": "bfl"}


@pytest.fixture(scope="module")
def flux_te(tmp_path_factory):
    """(pipeline dir, transformer, CLIP-L text encoder)."""
    models = {"transformer": flux_transformer(), "text_encoder": clip_text(16, 8)}
    pipe = tmp_path_factory.mktemp("flux_te") / "pipe"
    for name, model in models.items():
        save_component(model, pipe / name)
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    return pipe, models["transformer"], models["text_encoder"]


def _pipeline(transformer, text_encoder):
    from diffusers import DiffusionPipeline
    from diffusers.loaders import FluxLoraLoaderMixin

    class TinyFlux(FluxLoraLoaderMixin, DiffusionPipeline):
        def __init__(self, transformer, text_encoder):
            super().__init__()
            self.register_modules(transformer=transformer, text_encoder=text_encoder)

    return TinyFlux(copy.deepcopy(transformer), copy.deepcopy(text_encoder))


def _outputs(pipe) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"transformer": flux_output(pipe), "text_encoder": pipe.text_encoder(torch.tensor([[0, 5, 6, 7, 1]])).last_hidden_state}


def _layers(pipe) -> dict[str, int]:
    from peft.tuners.lora import LoraLayer
    return {n: sum(isinstance(m, LoraLayer) for m in getattr(pipe, n).modules()) for n in ("transformer", "text_encoder")}


def _delta(adapter, key) -> torch.Tensor:
    entry = adapter.manifest.modules[key]
    a, b = (adapter.tensors[entry.tensors[r].name].double() for r in ("lora_A", "lora_B"))
    return b @ a * entry.params["scale"]


def _with_delta(transformer, text_encoder, deltas):
    """The independent reference: each weight + ΔW (float64, rounded once)."""
    pipe = _pipeline(transformer, text_encoder)
    with torch.no_grad():
        for key, delta in deltas.items():
            component, module = key.split(".", 1)
            weight = getattr(pipe, component).get_submodule(module).weight
            weight.copy_((weight.double() + delta).to(weight.dtype))
    return pipe


def _same_tensors(a_path, b_path) -> bool:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                    for k in a)


def _metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


@pytest.mark.parametrize("style,dtype,with_base", [("kohya", torch.bfloat16, True), ("kohya", torch.float16, False),
                                                    ("comfyui", torch.float32, True), ("ai-toolkit", torch.bfloat16, True),
                                                    ("bfl", torch.bfloat16, False)])
def test_read_accounts_for_every_tensor_and_writes_back_bit_exactly(flux_te, tmp_path, style, dtype, with_base):
    pipe, transformer, text_encoder = flux_te
    src = tmp_path / "src.safetensors"
    names = flux_lora_file(src, transformer, text_encoder if style in TE_STYLES else None, style=style, dtype=dtype,
                           top=True, alpha=style in TE_STYLES)
    af = tmp_path / "af.safetensors"
    report = adapterfmt.convert(src, af, base=pipe if with_base else None)
    assert report.worst == "lossless" and report.source_format == WRITER[style]
    adapter = adapterfmt.read_adapter(af)
    reference = reference_delta(src, names)
    # without a base, CLIP modules keep diffusers' 'text_model.' spelling (transformers 5 has none)
    found = {k.replace("text_encoder.text_model.", "text_encoder."): k for k in adapter.manifest.modules}
    assert set(found) == set(reference)  # every file name found its diffusers modules
    assert sum(len(modules) for modules, _ in names.values()) == len(reference) >= 28
    for key, want in reference.items():
        torch.testing.assert_close(_delta(adapter, found[key]), want, rtol=1e-12, atol=0)
    back = tmp_path / "back.safetensors"
    assert adapterfmt.convert(af, back, to=WRITER[style]).worst == "lossless"
    assert _same_tensors(src, back) and _metadata(src) == _metadata(back)


@pytest.mark.parametrize("style", TE_STYLES)
def test_diffusers_loads_our_diffusers_file_like_the_original(flux_te, tmp_path, style):
    """kohya / ComfyUI double blocks + CLIP-L (what diffusers can load at this size): same outputs."""
    pipe_dir, transformer, text_encoder = flux_te
    src = tmp_path / "src.safetensors"
    flux_lora_file(src, transformer, text_encoder, style=style, dtype=torch.float32, single=False)
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    assert adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "d.safetensors", to="diffusers").worst == "lossless"
    theirs, ours = _pipeline(transformer, text_encoder), _pipeline(transformer, text_encoder)
    theirs.load_lora_weights(str(src))
    ours.load_lora_weights(str(tmp_path / "d.safetensors"))
    assert _layers(theirs) == _layers(ours) == {"transformer": 14, "text_encoder": 12}
    base, want, got = _outputs(_pipeline(transformer, text_encoder)), _outputs(theirs), _outputs(ours)
    for component in want:
        assert (want[component] - base[component]).abs().max() > 1e-2
        torch.testing.assert_close(got[component], want[component], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["kohya", "ai-toolkit", "bfl"])
def test_layouts_diffusers_cannot_load_match_the_float64_reference(flux_te, tmp_path, style):
    pipe_dir, transformer, text_encoder = flux_te
    src = tmp_path / "src.safetensors"
    names = flux_lora_file(src, transformer, text_encoder if style in TE_STYLES else None, style=style,
                           dtype=torch.float32, top=True, alpha=style in TE_STYLES)
    original = _pipeline(transformer, text_encoder)
    if style == "kohya":  # diffusers' linear1 split is FLUX.1's 3072/12288 rows
        with pytest.raises(AssertionError):
            original.load_lora_weights(str(src))
    else:  # lora_A/lora_B under diffusion_model. or bare BFL names: nothing applied, a warning only
        original.load_lora_weights(str(src))
        assert _layers(original) == {"transformer": 0, "text_encoder": 0}
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "d.safetensors", to="diffusers")
    ours = _pipeline(transformer, text_encoder)
    ours.load_lora_weights(str(tmp_path / "d.safetensors"))
    reference = _with_delta(transformer, text_encoder, reference_delta(src, names))
    want, got = _outputs(reference), _outputs(ours)
    for component in want:
        torch.testing.assert_close(got[component], want[component], rtol=2e-5, atol=2e-5)


def test_diffusers_drops_top_level_kohya_flux_layers_we_keep(flux_te, tmp_path):
    pipe_dir, transformer, text_encoder = flux_te
    src = tmp_path / "src.safetensors"
    flux_lora_file(src, transformer, None, style="kohya", dtype=torch.float32, single=False, top=True)
    theirs = _pipeline(transformer, text_encoder)
    theirs.load_lora_weights(str(src))
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "d.safetensors", to="diffusers")
    ours = _pipeline(transformer, text_encoder)
    ours.load_lora_weights(str(tmp_path / "d.safetensors"))
    assert _layers(theirs)["transformer"] == 14 and _layers(ours)["transformer"] == 14 + 8


def _ulp(x):
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


@pytest.mark.parametrize("style", ["kohya", "bfl"])
def test_merge_into_the_flux_transformer_equals_fuse_lora(flux_te, tmp_path, style):
    """kohya: fuse_lora of the original file; BFL (diffusers loads nothing): fuse_lora of our diffusers file,
    and the float64 merge rounded once."""
    pipe_dir, transformer, text_encoder = flux_te
    src = tmp_path / "src.safetensors"
    names = flux_lora_file(src, transformer, None, style=style, dtype=torch.float32, single=style == "bfl",
                           top=style == "bfl", alpha=style == "kohya")
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "d.safetensors", to="diffusers")
    fused = _pipeline(transformer, text_encoder)
    fused.load_lora_weights(str(src if style == "kohya" else tmp_path / "d.safetensors"))
    fused.fuse_lora(components=["transformer"])
    stats = adapterfmt.merge(pipe_dir / "transformer", [tmp_path / "af.safetensors"], tmp_path / "merged")
    deltas = reference_delta(src, names)
    assert stats.tensors_changed == len(deltas)
    merged = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    theirs = {k.replace(".base_layer", ""): v for k, v in fused.transformer.state_dict().items() if ".lora_" not in k}
    base = transformer.state_dict()
    assert set(merged) == set(theirs)
    for param, value in merged.items():
        delta = deltas.get("transformer." + param.removesuffix(".weight"))
        exact = base[param] if delta is None else (base[param].double() + delta).to(base[param].dtype)
        near = ((value - theirs[param]).abs() <= _ulp(theirs[param])) | ((value - exact).abs() <= _ulp(exact))
        assert bool(near.all()), param


QKV_OUT = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0)"


def _diffusers_flux_lora(transformer, out_dir, alphas: dict, targets: str = QKV_OUT):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = copy.deepcopy(transformer)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"to_q": 2},
                                 alpha_pattern=alphas, target_modules=targets))
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("to", ["kohya", "bfl"])
def test_separate_qkv_fuse_block_diagonally_or_refuse_by_name(flux_te, tmp_path, to):
    """diffusers' to_q/to_k/to_v (own A each; ranks 2/4/4, scales 4, 1, 2) -> fused rank-10 module, exact."""
    pipe_dir, transformer, text_encoder = flux_te
    src = _diffusers_flux_lora(transformer, tmp_path / "ok", {"to_k": 4.0, "to_v": 8.0})
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    out = tmp_path / f"fused-{to}.safetensors"
    assert adapterfmt.convert(tmp_path / "af.safetensors", out, to=to).worst == "lossless"
    state = load_file(str(out))
    down = state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" if to == "kohya"
                 else "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    assert down.shape == (2 + 4 + 4, 16)
    original, again = adapterfmt.read_adapter(tmp_path / "af.safetensors"), tmp_path / "again.safetensors"
    adapterfmt.convert(out, again, base=pipe_dir)
    reread = adapterfmt.read_adapter(again)
    for key in original.manifest.modules:  # read back: the same ΔW per diffusers module
        torch.testing.assert_close(_delta(reread, key), _delta(original, key), rtol=1e-12, atol=0)
    if to == "kohya":  # diffusers' own kohya-Flux loader reads the block-diagonal file
        theirs, ours = _pipeline(transformer, text_encoder), _pipeline(transformer, text_encoder)
        theirs.load_lora_weights(str(src))
        ours.load_lora_weights(str(out))
        torch.testing.assert_close(_outputs(ours)["transformer"], _outputs(theirs)["transformer"], rtol=1e-5, atol=1e-6)
    bad = _diffusers_flux_lora(transformer, tmp_path / "bad", {"to_k": 3.0})  # scales 4 and 0.75: no power of two
    adapterfmt.convert(bad, tmp_path / "bad-af.safetensors", base=pipe_dir)
    with pytest.raises(UsageError, match="img_attn.qkv.*powers of two"):
        adapterfmt.convert(tmp_path / "bad-af.safetensors", tmp_path / "bad.safetensors", to=to)
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("extra,why", [
    ("lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight", "lora_unet_double_blocks_0_img_attn_bogus"),
    # sd-scripts' T5-XXL names (train_t5xxl): diffusers warns and drops them
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"),
])
def test_partly_matching_kohya_flux_files_are_refused_by_name(flux_te, tmp_path, extra, why):
    pipe_dir, transformer, _ = flux_te
    src = tmp_path / "src.safetensors"
    flux_lora_file(src, transformer, None, style="kohya", single=False)
    state = load_file(str(src))
    state[extra] = torch.zeros(2, 16)
    save_file(state, str(src))
    with pytest.raises(ForeignFormatError, match=f"{why}.*families tried: kohya Flux"):
        adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)


@pytest.mark.parametrize("extra", ["double_blocks.0.img_attn.norm.query_norm.scale",  # BFL control LoRA norms
                                   "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"])
def test_partly_matching_bfl_files_are_refused_by_name(flux_te, tmp_path, extra):
    pipe_dir, transformer, _ = flux_te
    src = tmp_path / "src.safetensors"
    flux_lora_file(src, transformer, None, style="bfl", single=False, alpha=False)
    state = load_file(str(src))
    state[extra] = torch.zeros(2, 16)
    save_file(state, str(src))
    name = extra.removesuffix(".lora_A.weight")
    with pytest.raises(ForeignFormatError, match=name.replace(".", r"\.") + ".*families tried"):
        adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)


def test_absent_parts_of_a_fused_module_get_zero_rows(flux_te, tmp_path):
    """Only to_q/to_k of a double block and to_q of a single block: qkv and linear1 are written with zero rows for
    the parts without LoRA (reported); read back, those parts have ΔW = 0 and the others are unchanged."""
    pipe_dir, transformer, text_encoder = flux_te
    src = _diffusers_flux_lora(transformer, tmp_path / "d", {}, r"(single_)?transformer_blocks\.0\.attn\.to_[qk]")
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=pipe_dir)
    report = adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "k.safetensors", to="kohya")
    assert report.worst == "lossless"
    assert any("attn.to_v have no LoRA" in note for note in report.notes)
    state = load_file(str(tmp_path / "k.safetensors"))
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (16 * 3 + 64, 2 + 4)
    adapterfmt.convert(tmp_path / "k.safetensors", tmp_path / "again.safetensors", base=pipe_dir)
    original, again = adapterfmt.read_adapter(tmp_path / "af.safetensors"), adapterfmt.read_adapter(tmp_path / "again.safetensors")
    assert len(again.manifest.modules) == 3 + 4
    for key in again.manifest.modules:
        want = _delta(original, key) if key in original.manifest.modules else 0 * _delta(again, key)
        torch.testing.assert_close(_delta(again, key), want, rtol=1e-12, atol=0)


def test_cli_kohya_flux_to_bfl_and_back_and_a_refusal_in_one_line(flux_te, tmp_path):
    from click.testing import CliRunner

    from adapterfmt.cli import main
    pipe_dir, transformer, text_encoder = flux_te
    src = tmp_path / "src.safetensors"
    flux_lora_file(src, transformer, text_encoder, style="kohya", top=True)
    bad = tmp_path / "bad.safetensors"
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # sd-scripts' T5-XXL name: diffusers drops it
    save_file(load_file(str(src)) | {f"{t5}.lora_down.weight": torch.ones(2, 16), f"{t5}.lora_up.weight": torch.ones(16, 2)},
              str(bad))
    runner = CliRunner()
    steps = [(["convert", src, tmp_path / "a.safetensors", "--base", pipe_dir], 0, "40 module(s), overall lossless"),
             (["convert", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--to", "bfl"], 0, "lossless"),
             (["convert", tmp_path / "b.safetensors", tmp_path / "c.safetensors", "--base", pipe_dir], 0, "lossless"),
             (["convert", tmp_path / "c.safetensors", tmp_path / "k.safetensors", "--to", "kohya"], 0, "lossless"),
             (["convert", bad, tmp_path / "x.safetensors", "--base", pipe_dir], 1, t5)]
    for args, code, text in steps:
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == code, result.output
        assert text in result.output, result.output
    assert "Traceback" not in result.output and "families tried: kohya Flux" in result.output
    again, want = load_file(str(tmp_path / "k.safetensors")), load_file(str(src))
    assert set(again) == set(want) and all(torch.equal(again[k].to(want[k].dtype), want[k]) for k in want)
