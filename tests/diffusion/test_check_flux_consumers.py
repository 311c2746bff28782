"""`check --target diffusers` on Flux files against diffusers itself: the layers the check says diffusers
applies are the LoRA layers diffusers' load_lora_weights puts into the tiny Flux pipeline, and the file
the check calls refused makes load_lora_weights raise."""
import copy

import pytest
import torch

from adapterfmt.ops.check import check_adapter

from .flux_files import flux_lora_file
from .models import clip_text, flux_transformer


@pytest.fixture(scope="module")
def models():
    return flux_transformer(), clip_text(16, 8)


def _pipeline(transformer, text_encoder):
    from diffusers import DiffusionPipeline
    from diffusers.loaders import FluxLoraLoaderMixin

    class TinyFlux(FluxLoraLoaderMixin, DiffusionPipeline):
        def __init__(self, transformer, text_encoder):
            super().__init__()
            self.register_modules(transformer=transformer, text_encoder=text_encoder)

    return TinyFlux(copy.deepcopy(transformer), copy.deepcopy(text_encoder))


def _loaded_layers(models, path) -> int:
    from peft.tuners.lora import LoraLayer
    pipe = _pipeline(*models)
    pipe.load_lora_weights(str(path))
    return sum(isinstance(m, LoraLayer) for c in (pipe.transformer, pipe.text_encoder) for m in c.modules())


def _applied_layers(path) -> tuple[int, dict]:
    found = {f.rule: f for f in check_adapter(path, ["diffusers"]).targets[0].findings}
    message = found["keys_applied"].message
    modules = int(message.split("applies ")[1].split(" ")[0])
    layers = int(message.split(", ")[1].split(" ")[0]) if " diffusers layers" in message else modules
    return layers, found


@pytest.mark.parametrize("style,top,te", [("kohya", True, True), ("comfyui", True, True), ("kohya", False, False),
                                          ("ai-toolkit", True, False), ("bfl", False, False)])
def test_applied_layers_are_what_diffusers_loads(models, tmp_path, style, top, te):
    path = tmp_path / "lora.safetensors"
    flux_lora_file(path, models[0], models[1] if te else None, style=style, single=False, top=top)
    applied, found = _applied_layers(path)
    assert applied == _loaded_layers(models, path)
    if top and style in ("kohya", "comfyui"):
        # 14 of the 22 transformer layers (the 8 top-level ones dropped), plus the 12 CLIP-L modules (2 layers x 6)
        assert applied == 14 + 12 and "8 top-level" in found["flux_top_level_not_loaded"].message
    if style in ("ai-toolkit", "bfl"):
        assert applied == 0 and "flux_lora_ab_not_loaded" in found


def test_the_refused_file_makes_diffusers_raise_and_the_fix_loads_everything(models, tmp_path):
    import adapterfmt
    path = tmp_path / "lora.safetensors"
    flux_lora_file(path, models[0], style="kohya", single=True)
    found = {f.rule: f for f in check_adapter(path, ["diffusers"]).targets[0].findings}
    assert found["flux_linear1_fixed_rows"].severity == "refuse"
    with pytest.raises(AssertionError):
        _loaded_layers(models, path)
    adapterfmt.convert(path, tmp_path / "d.safetensors", to="diffusers")
    applied, found = _applied_layers(tmp_path / "d.safetensors")
    # 10 double-block modules (each qkv as three layers) + 3 single-block (linear1 as q, k, v, proj_mlp): 14 + 6
    assert applied == _loaded_layers(models, tmp_path / "d.safetensors") == 20
    assert not [f for f in found.values() if f.severity != "ok"]


def test_t5_modules_are_dropped_by_diffusers_as_the_check_says(models, tmp_path):
    from safetensors.torch import load_file, save_file
    path = tmp_path / "lora.safetensors"
    flux_lora_file(path, models[0], style="kohya", single=False)
    state = load_file(str(path))
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # sd-scripts' T5-XXL prefix
    state |= {f"{t5}.lora_down.weight": torch.ones(2, 16), f"{t5}.lora_up.weight": torch.ones(16, 2),
              f"{t5}.alpha": torch.tensor(2.0)}
    save_file(state, str(path))
    applied, found = _applied_layers(path)
    assert applied == _loaded_layers(models, path) == 14 and "flux_t5_filtered" in found
