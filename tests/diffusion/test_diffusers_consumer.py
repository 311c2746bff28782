"""diffusers-format export, checked with the real consumer: diffusers ``load_lora_weights`` on the tiny pipelines.

Reference 1: the original sd-scripts file loaded by diffusers itself (sd-scripts' default of one alpha
for the file; diffusers 0.42.1 ignores per-module alphas of kohya attention/CLIP names: its
``alpha_pattern`` keys match no module). Reference 2, for per-module alphas: kohya's definition
W + alpha/rank · up @ down applied with plain torch to the sd-scripts tensors.
"""
import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapterfmt

from .consumers import lora_layer_count, outputs, tiny_pipeline
from .kohya_files import sd_scripts_lora

CASES = {"sd15-text_model": ("sd15", "text_model"), "sd15-flat": ("sd15", "flat"), "sdxl": ("sdxl", "text_model")}
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, spelling = CASES[request.param]
    pipe, models = request.getfixturevalue(kind)
    return kind, spelling, pipe, models, tmp_path_factory.mktemp(request.param)


def _export(src, pipe, work, to="diffusers"):
    mid, out = work / f"{src.stem}-af.safetensors", work / f"{src.stem}.{to}.safetensors"
    adapterfmt.convert(src, mid, base=pipe, overwrite=True)
    report = adapterfmt.convert(mid, out, to=to, overwrite=True)
    assert report.worst == "lossless"
    return out


def _loaded(kind, models, path):
    pipe = tiny_pipeline(kind, models)
    pipe.load_lora_weights(str(path))
    return pipe


def test_same_outputs_as_the_kohya_file_in_diffusers(case):
    kind, spelling, pipe, models, work = case
    src = work / "uniform.safetensors"
    sd_scripts_lora(kind, models, src, te_spelling=spelling, alphas="uniform")
    ours = _loaded(kind, models, _export(src, pipe, work))
    theirs = _loaded(kind, models, src)
    assert lora_layer_count(ours) == lora_layer_count(theirs)
    assert all(n > 0 for n in lora_layer_count(ours).values())
    base, got, want = outputs(kind, tiny_pipeline(kind, models)), outputs(kind, ours), outputs(kind, theirs)
    for component in want:
        assert (want[component] - base[component]).abs().max() > 1e-2  # the LoRA does something
        torch.testing.assert_close(got[component], want[component], **TOL)


def _kohya_reference(kind, models, src, names):
    """The models with kohya's ΔW = alpha/rank · up @ down added to each weight (plain torch, fp32)."""
    merged = {name: copy.deepcopy(model) for name, model in models.items()}
    state = load_file(str(src))
    with torch.no_grad():
        for name, target in names.items():
            component, path = target.split(".", 1)
            down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
            alpha = state[f"{name}.alpha"].float().item()
            merged[component].get_submodule(path).weight += (alpha / down.shape[0]) * (up @ down)
    return tiny_pipeline(kind, merged)


def test_per_module_alphas_follow_kohyas_definition(case):
    kind, spelling, pipe, models, work = case
    src = work / "varied.safetensors"
    names = sd_scripts_lora(kind, models, src, te_spelling=spelling, alphas="varied")
    got = outputs(kind, _loaded(kind, models, _export(src, pipe, work)))
    want = outputs(kind, _kohya_reference(kind, models, src, names))
    for component in want:
        torch.testing.assert_close(got[component], want[component], rtol=1e-4, atol=1e-5)


def test_written_kohya_names_load_in_diffusers_like_the_source(case):
    """A kohya file we write with names of our own (read from the diffusers export) applies as many
    layers in diffusers as the sd-scripts source, with the same outputs."""
    kind, spelling, pipe, models, work = case
    src = work / "uniform-src.safetensors"
    sd_scripts_lora(kind, models, src, te_spelling=spelling, alphas="uniform")
    exported = _export(src, pipe, work)
    ours = work / "ours.kohya.safetensors"
    adapterfmt.convert(exported, work / "from-diffusers.safetensors", base=pipe, overwrite=True)
    adapterfmt.convert(work / "from-diffusers.safetensors", ours, to="kohya", overwrite=True)
    with safe_open(str(ours), framework="pt") as handle:
        assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in handle.keys())
    theirs, mine = _loaded(kind, models, src), _loaded(kind, models, ours)
    assert lora_layer_count(mine) == lora_layer_count(theirs)
    got, want = outputs(kind, mine), outputs(kind, theirs)
    for component in want:
        torch.testing.assert_close(got[component], want[component], **TOL)


def test_diffusers_file_round_trips_exactly(case):
    kind, spelling, pipe, models, work = case
    src = work / "rt.safetensors"
    sd_scripts_lora(kind, models, src, te_spelling=spelling, alphas="varied")
    exported = _export(src, pipe, work)
    back = work / "back.diffusers.safetensors"
    adapterfmt.convert(exported, work / "rt-af.safetensors", base=pipe, overwrite=True)
    adapterfmt.convert(work / "rt-af.safetensors", back, to="diffusers", overwrite=True)
    with safe_open(str(exported), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
