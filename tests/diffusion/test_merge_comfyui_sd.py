"""Merging a ComfyUI-layout SD 1.x / SDXL LoRA (``diffusion_model.input_blocks…``, ``text_encoders.clip_l|clip_g…``)
into the diffusers component directories and into the single-file checkpoint equals diffusers' fuse_lora of
the same tensors under kohya names on diffusers' blocks (the kohya twin, which diffusers loads; it cannot load
the ComfyUI file itself).

Tolerance (issue 14): every element within 1 ulp of fuse_lora's, or of the exact merge (float64
W + alpha/rank · up @ down) rounded once to the stored dtype.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterfmt

from .comfyui_files import comfyui_lora
from .consumers import tiny_pipeline
from .test_merge_single_file import _check_layout_and_untouched, _compare, _fused_states, _single, diffusers_view

FILES = {"unet": "diffusion_pytorch_model.safetensors"}


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


def _files(kind, models, tmp_path):
    """(ComfyUI file, its kohya twin, {file name: component.module}, the file's tensors).

    The twin holds the same tensors under kohya names on diffusers' blocks (``lora_unet_down_blocks_…``,
    ``lora_te_``/``lora_te1_``/``lora_te2_text_model_…``), spelled here from the fixture's own module
    table: diffusers' SD 1.x loader maps those (it does not map kohya names on the original blocks)."""
    src, twin = tmp_path / "comfy.safetensors", tmp_path / "twin.safetensors"
    names = comfyui_lora(models, src, uniform_alpha=True)
    state = load_file(str(src))
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if kind == "sdxl" else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    twin_state = {}
    for name, target in names.items():
        component, path = target.split(".", 1)
        path = path if component == "unet" else "text_model." + path.removeprefix("text_model.")
        kohya = prefixes[component] + path.replace(".", "_")
        for role in ("lora_down.weight", "lora_up.weight", "alpha"):
            twin_state[f"{kohya}.{role}"] = state[f"{name}.{role}"]
    save_file(twin_state, str(twin))
    return src, twin, names, state


def _fused(kind, models, twin):
    from .consumers import lora_layer_count
    fused = tiny_pipeline(kind, models)
    fused.load_lora_weights(str(twin))
    assert sum(lora_layer_count(fused).values()) == len(load_file(str(twin))) // 3  # every twin module loaded
    fused.fuse_lora(components=list(models))
    return fused


def _exact(base, names, state, target):
    total = base.double()
    for name, module in names.items():
        if f"{module}.weight" == target:
            down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
            total = total + state[f"{name}.alpha"].double().item() / down.shape[0] * (up @ down)
    return total.to(base.dtype)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfyui_lora_merged_into_components_equals_fuse_lora(kind, request, tmp_path):
    pipe_dir, models = request.getfixturevalue(kind)
    src, twin, names, state = _files(kind, models, tmp_path)
    adapter = tmp_path / "comfy-af.safetensors"
    adapterfmt.convert(src, adapter, base=pipe_dir)
    fused = _fused(kind, models, twin)
    changed = 0
    for component in models:
        out = tmp_path / f"merged-{component}"
        stats = adapterfmt.merge(pipe_dir / component, [adapter], out)
        assert stats.tensors_changed == sum(t.startswith(component + ".") for t in names.values()) > 0
        changed += stats.tensors_changed
        ours = load_file(str(out / FILES.get(component, "model.safetensors")))
        theirs = {k.replace(".base_layer", ""): v for k, v in getattr(fused, component).state_dict().items()
                  if ".lora_" not in k}
        assert set(ours) == set(theirs)
        base = load_file(str(pipe_dir / component / FILES.get(component, "model.safetensors")))
        for param, value in ours.items():
            exact = _exact(base[param], names, state, f"{component}.{param}")
            near = ((value - theirs[param]).abs() <= _ulp(theirs[param])) | ((value - exact).abs() <= _ulp(exact))
            assert bool(near.all()), (component, param)
    assert changed == len(names)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfyui_lora_merged_into_the_single_file_equals_fuse_lora(kind, request, tmp_path):
    models = request.getfixturevalue(kind)[1]
    single = _single(kind, models, tmp_path)
    src, twin, names, state = _files(kind, models, tmp_path)
    adapter = tmp_path / "comfy-af.safetensors"
    adapterfmt.convert(src, adapter, base=single)
    out = tmp_path / "merged.safetensors"
    stats = adapterfmt.merge(single, [adapter], out)
    # SDXL CLIP-G: q, k and v land in one fused in_proj_weight per layer.
    fused_qkv = {t.rsplit(".", 1)[0] for t in names.values() if t.startswith("text_encoder_2.") and "_proj" in t
                 and "out_proj" not in t}
    assert stats.tensors_changed == len(names) - 2 * len(fused_qkv) > 0
    _check_layout_and_untouched(single, out, stats.tensors_changed)
    loras = [(names, state, 1.0)]
    _compare(diffusers_view(out, kind, models), _fused_states(_fused(kind, models, twin), models),
             diffusers_view(single, kind, models), loras, kind)
