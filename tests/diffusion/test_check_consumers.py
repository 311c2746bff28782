"""`check --target diffusers` counts against diffusers itself: the number of modules the check says diffusers
applies is the number of LoRA layers diffusers' load_lora_weights puts into the tiny pipeline."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt.ops.check import check_adapter

from .consumers import lora_layer_count, tiny_pipeline
from .kohya_files import sd_scripts_lora


def _diffusers_findings(path, base="BASE"):
    return {f.rule: f for f in check_adapter(path, ["diffusers"], base=str(base)).targets[0].findings}


def _loaded_layers(kind, models, path) -> int:
    pipe = tiny_pipeline(kind, models)
    pipe.load_lora_weights(str(path))
    return sum(lora_layer_count(pipe).values())


@pytest.mark.parametrize("kind,edit", [("sd15", "dora_scale"), ("sd15", "te_spelling"), ("sdxl", None),
                                       ("sd15", "absent_module")])
def test_applied_count_is_what_diffusers_loads(kind, edit, request, tmp_path):
    pipe_dir, models = request.getfixturevalue(kind)
    src = tmp_path / "lora.safetensors"
    names = sd_scripts_lora(kind, models, src, te_spelling="flat" if edit == "te_spelling" else "text_model")
    state = load_file(str(src))
    if edit == "dora_scale":  # kohya DoRA: a per-input magnitude next to each module's factors
        state.update({f"{n}.dora_scale": torch.ones(1, state[f"{n}.lora_down.weight"].shape[1]) for n in names})
    if edit == "absent_module":  # a name no layer of the model has
        bogus = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q"
        state.update({f"{bogus}.{k.split('.', 1)[1]}": v.clone() for k, v in state.items() if k.startswith(next(iter(names)) + ".")})
    save_file(state, str(src))
    found = _diffusers_findings(src, pipe_dir)
    applied = int(found["keys_applied"].message.split("applies ")[1].split(" ")[0])
    # diffusers skips the absent module with an 'unexpected keys' warning and loads the others
    assert applied == len(names) == _loaded_layers(kind, models, src)
    if edit == "absent_module":
        assert "attn9.to_q" in found["not_in_base"].message
        return  # adapterfmt refuses to read it against that base: only the key rules speak
    if edit == "dora_scale":
        assert ".dora_scale" in found["keys_dropped"].message and "DoRA" in found["keys_dropped"].message
        return  # this build's kohya reader refuses dora_scale: only the key rules speak
    assert "keys_dropped" not in found
    # sd-scripts-style per-module alphas: PEFT warns that diffusers' alpha_pattern keys match nothing
    assert found["per_module_alphas"].severity == "mis-scaled"
