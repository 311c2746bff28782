"""Merging a kohya SD 1.x / SDXL LoRA into diffusers component directories equals diffusers' fuse_lora.

Tolerance (issue 14): every element within 1 ulp of fuse_lora's, or of the exact merge
(float64 W + alpha/rank · up @ down) rounded once to the stored dtype.
"""
import pytest
import torch
from safetensors.torch import load_file

import adapterfmt

from .consumers import tiny_pipeline
from .kohya_files import sd_scripts_lora

FILES = {"unet": "diffusion_pytorch_model.safetensors"}


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs())


def _exact(base: torch.Tensor, names, state, component, param) -> torch.Tensor:
    total = base.double()
    for name, target in names.items():
        if target == f"{component}.{param.removesuffix('.weight')}":
            down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
            total = total + state[f"{name}.alpha"].double().item() / down.shape[0] * (up @ down)
    return total.to(base.dtype)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_merge_equals_fuse_lora(kind, request, tmp_path):
    from diffusers import UNet2DConditionModel
    pipe_dir, models = request.getfixturevalue(kind)
    src = tmp_path / "lora.safetensors"
    names = sd_scripts_lora(kind, models, src, alphas="uniform")  # fp16 factors, as sd-scripts saves them
    adapter = tmp_path / "lora-af.safetensors"
    adapterfmt.convert(src, adapter, base=pipe_dir)
    fused = tiny_pipeline(kind, models)
    fused.load_lora_weights(str(src))
    fused.fuse_lora(components=list(models))
    state = load_file(str(src))
    for component in models:
        out = tmp_path / f"merged-{component}"
        stats = adapterfmt.merge(pipe_dir / component, [adapter], out)
        assert stats.tensors_changed == sum(t.startswith(component + ".") for t in names.values()) > 0
        ours = load_file(str(out / FILES.get(component, "model.safetensors")))
        theirs = {k.replace(".base_layer", ""): v for k, v in getattr(fused, component).state_dict().items()
                  if ".lora_" not in k}
        assert set(ours) == set(theirs)
        base = load_file(str(pipe_dir / component / FILES.get(component, "model.safetensors")))
        for param, value in ours.items():
            exact = _exact(base[param], names, state, component, param)
            near_fused = (value - theirs[param]).abs() <= _ulp(theirs[param])
            near_exact = (value - exact).abs() <= _ulp(exact)
            assert bool((near_fused | near_exact).all()), param
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged-unet")
    assert torch.equal(reloaded.state_dict()["conv_in.weight"], models["unet"].state_dict()["conv_in.weight"])


def test_weighted_merge_of_two_loras_equals_diffusers_fused_adapters(sd15, tmp_path):
    """The common "merge two LoRAs at 0.7 / 0.3 into a model": diffusers set_adapters + fuse_lora."""
    pipe_dir, models = sd15
    paths = []
    for seed in (1, 2):
        src = tmp_path / f"lora{seed}.safetensors"
        sd_scripts_lora("sd15", models, src, alphas="uniform", seed=seed)
        adapterfmt.convert(src, tmp_path / f"lora{seed}-af.safetensors", base=pipe_dir)
        paths.append(src)
    fused = tiny_pipeline("sd15", models)
    for seed, src in zip((1, 2), paths):
        fused.load_lora_weights(str(src), adapter_name=f"a{seed}")
    fused.set_adapters(["a1", "a2"], adapter_weights=[0.7, 0.3])
    fused.fuse_lora(components=["unet"], adapter_names=["a1", "a2"])
    adapterfmt.merge(pipe_dir / "unet", [(tmp_path / "lora1-af.safetensors", 0.7),
                                         (tmp_path / "lora2-af.safetensors", 0.3)], tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / FILES["unet"]))
    theirs = {k.replace(".base_layer", ""): v for k, v in fused.unet.state_dict().items() if ".lora_" not in k}
    for param, value in ours.items():
        # two adds in fp32 (diffusers) vs one sum then one add (ours): a few ulp apart at most
        torch.testing.assert_close(value, theirs[param], rtol=4e-7, atol=1e-7)


def test_merge_into_a_pipeline_directory_is_refused(sd15, tmp_path):
    from adapterfmt.errors import UsageError
    with pytest.raises(UsageError, match="component directory"):
        adapterfmt.merge(sd15[0], [tmp_path / "x.safetensors"], tmp_path / "out")
