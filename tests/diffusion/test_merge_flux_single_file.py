"""Flux LoRAs (kohya-Flux, BFL; fused qkv / linear1) merged into a BFL-layout single-file Flux transformer.

The single file is written from the tiny diffusers transformer with the test's own BFL table (flux_single_file.py)
and read back with the same table. Each fused module's ΔW must land in its rows of the fused tensor: every
element within 1 ulp of the independent float64 merge (W + alpha/rank · up @ down, rounded once) or of
diffusers' fuse_lora on the diffusers-layout transformer with the same weights. Untouched tensors stay
byte-identical; keys, dtypes and metadata are kept.
"""
import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import InputIOError

from .flux_files import flux_lora_file, reference_delta
from .flux_single_file import diffusers_view, save_bfl_single_file
from .models import flux_transformer

METADATA = {"modelspec.architecture": "flux-1-dev"}


@pytest.fixture(scope="module")
def transformer():
    return flux_transformer()


def _ulp(x):
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


def _fused(transformer, lora):
    """diffusers' fuse_lora of ``lora`` on a copy of the diffusers-layout transformer."""
    from .consumers import tiny_flux_pipeline
    pipe = tiny_flux_pipeline(transformer)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=["transformer"])
    return {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if ".lora_" not in k}


def _assert_within_one_ulp(view, base, deltas, fused=None):
    for param, value in base.items():
        delta = deltas.get("transformer." + param.removesuffix(".weight")) if param.endswith(".weight") else None
        exact = value if delta is None else (value.double() + delta).to(value.dtype)
        near = (view[param] - exact).abs() <= _ulp(exact)
        if fused is not None:
            near |= (view[param] - fused[param].to(value.dtype)).abs() <= _ulp(fused[param].to(value.dtype))
        assert bool(near.all()), param


def _layout_kept(single, merged) -> int:
    """Keys, order, dtypes, shapes and metadata kept; returns how many tensors changed."""
    changed = 0
    with safe_open(str(single), "pt") as a, safe_open(str(merged), "pt") as b:
        assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata() == METADATA
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape
            changed += not torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    return changed


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_the_single_file_reads_as_the_diffusers_transformer(transformer, tmp_path, prefix):
    """diffusers' converter on a FLUX.1-sized probe, rows scaled back: every diffusers tensor is found, exactly."""
    from adapterfmt.checkpoint.single_file import SingleFilePipeline
    single = tmp_path / "flux.safetensors"
    save_bfl_single_file(transformer, single, prefix=prefix)
    component = SingleFilePipeline(single).components["transformer"]
    state = transformer.state_dict()
    assert set(component.names()) == set(state) and not component.unplaced
    assert all(torch.equal(component.get(k), v) for k, v in state.items())


@pytest.mark.parametrize("style,dtype", [("kohya", torch.float32), ("kohya", torch.bfloat16), ("bfl", torch.float32),
                                         ("comfyui", torch.float16)])
def test_fused_lora_merged_into_the_bfl_single_file_lands_in_its_rows(transformer, tmp_path, style, dtype):
    single = tmp_path / "flux.safetensors"
    table = save_bfl_single_file(transformer, single, dtype=dtype, metadata=METADATA)
    src = tmp_path / "lora.safetensors"
    names = flux_lora_file(src, transformer, None, style=style, dtype=torch.float32, single=True, top=True)
    report = adapterfmt.convert(src, tmp_path / "af.safetensors", base=single)
    assert report.worst == "lossless"
    out = tmp_path / "merged.safetensors"
    stats = adapterfmt.merge(single, [tmp_path / "af.safetensors"], out)
    # one stored tensor per BFL module: 10 double-block, 3 single-block and 8 top-level
    assert stats.tensors_changed == len(names) == _layout_kept(single, out) == 21
    base = {k: v.to(dtype) for k, v in transformer.state_dict().items()}
    fused = None
    if dtype == torch.float32:  # near W + ΔW = 0 the exact merge and ours are ulps apart; fuse_lora is the referee
        # diffusers loads none of the top-level layers (and no linear1 of this width) from these files itself:
        # fuse_lora of our diffusers-format file (all 22 layers, checked in test_flux_kohya_bfl.py)
        adapterfmt.convert(tmp_path / "af.safetensors", tmp_path / "d.safetensors", to="diffusers")
        fused = _fused(transformer, tmp_path / "d.safetensors")
    _assert_within_one_ulp(diffusers_view(out, table), base, reference_delta(src, names), fused)


def test_merge_equals_diffusers_fuse_lora_of_the_same_file(transformer, tmp_path):
    """A kohya-Flux file diffusers loads itself (the blocks diffusers maps at any width): fuse_lora is the
    reference, on the diffusers transformer holding the same weights as the single file."""
    single = tmp_path / "flux.safetensors"
    table = save_bfl_single_file(transformer, single, metadata=METADATA)
    src = tmp_path / "lora.safetensors"
    names = flux_lora_file(src, transformer, None, style="kohya", dtype=torch.float32, single=False)
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=single)
    out = tmp_path / "merged.safetensors"
    assert adapterfmt.merge(single, [tmp_path / "af.safetensors"], out).tensors_changed == len(names) == 10
    fused = _fused(transformer, src)
    view = diffusers_view(out, table)
    _assert_within_one_ulp(view, transformer.state_dict(), reference_delta(src, names), fused)
    worst = max(float(((view[k] - fused[k]).abs() / _ulp(fused[k]).clamp_min(1e-45)).max()) for k in fused)
    assert worst <= 4  # fuse_lora rounds B @ A to fp32 first, then adds: a few ulp apart at most


def test_weighted_merge_of_kohya_and_bfl_files(transformer, tmp_path):
    """The common 'merge two LoRAs into the checkpoint' at 0.7 / 0.3: one rounding of W + Σ wᵢ ΔWᵢ."""
    single = tmp_path / "flux.safetensors"
    table = save_bfl_single_file(transformer, single, metadata=METADATA)
    deltas, specs = {}, []
    for seed, (style, weight) in enumerate((("kohya", 0.7), ("bfl", 0.3))):
        src = tmp_path / f"{style}.safetensors"
        names = flux_lora_file(src, transformer, None, style=style, dtype=torch.float32, seed=seed, single=True)
        adapterfmt.convert(src, tmp_path / f"{style}-af.safetensors", base=single)
        for key, delta in reference_delta(src, names).items():
            deltas[key] = deltas.get(key, 0) + weight * delta
        specs.append((tmp_path / f"{style}-af.safetensors", weight))
    out = tmp_path / "merged.safetensors"
    adapterfmt.merge(single, specs, out)
    view, base = diffusers_view(out, table), transformer.state_dict()
    # diffusers: set_adapters + fuse_lora of our diffusers-format files (two fp32 adds, ours one sum then one add)
    from .consumers import tiny_flux_pipeline
    pipe = tiny_flux_pipeline(transformer)
    for (path, _), name in zip(specs, ("a", "b")):
        adapterfmt.convert(path, tmp_path / f"{name}-d.safetensors", to="diffusers")
        pipe.load_lora_weights(str(tmp_path / f"{name}-d.safetensors"), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[w for _, w in specs])
    pipe.fuse_lora(components=["transformer"], adapter_names=["a", "b"])
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if ".lora_" not in k}
    for param, value in base.items():
        delta = deltas.get("transformer." + param.removesuffix(".weight")) if param.endswith(".weight") else None
        exact = value if delta is None else (value.double() + delta).to(value.dtype)
        torch.testing.assert_close(view[param], exact, rtol=4e-7, atol=1e-7)
        torch.testing.assert_close(view[param], fused[param], rtol=4e-7, atol=1e-7)


def test_a_file_the_flux_converter_cannot_map_exactly_is_refused_in_one_line(transformer, tmp_path):
    """MLP ratio 2: linear1 is not q, k, v + 4·inner rows, so diffusers' FLUX.1 split cannot be scaled to it."""
    single = tmp_path / "flux.safetensors"
    save_bfl_single_file(transformer, single, metadata=METADATA)
    state = load_file(str(single))
    state["single_blocks.0.linear1.weight"] = state["single_blocks.0.linear1.weight"][:5 * 16].contiguous()
    save_file(state, str(single))
    with pytest.raises(InputIOError, match="Flux converter refuses this file") as info:
        adapterfmt.merge(single, [tmp_path / "missing.safetensors"], tmp_path / "out.safetensors")
    assert "\n" not in str(info.value)


def test_unmerge_from_the_flux_single_file_restores_within_one_ulp(transformer, tmp_path):
    single = tmp_path / "flux.safetensors"
    save_bfl_single_file(transformer, single, metadata=METADATA)
    src = tmp_path / "lora.safetensors"
    flux_lora_file(src, transformer, None, style="kohya", dtype=torch.float32, single=True, top=True)
    adapterfmt.convert(src, tmp_path / "af.safetensors", base=single)
    adapterfmt.merge(single, [tmp_path / "af.safetensors"], tmp_path / "merged.safetensors")
    adapterfmt.unmerge(tmp_path / "merged.safetensors", [tmp_path / "af.safetensors"], tmp_path / "back.safetensors")
    original, back = load_file(str(single)), load_file(str(tmp_path / "back.safetensors"))
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in original.items():
        # (W + ΔW rounded) − ΔW, rounded: the merge's rounding (1 ulp of the merged value) plus 1 ulp of W
        assert bool(((back[key] - value).abs() <= _ulp(merged[key]) + _ulp(value)).all()), key


def test_check_with_the_flux_single_file_as_base_finds_every_module(transformer, tmp_path):
    """check --base on a BFL single file: diffusers' module names are looked up in the file's Flux map."""
    from adapterfmt.ops.check import check_adapter
    single = tmp_path / "flux.safetensors"
    save_bfl_single_file(transformer, single, metadata=METADATA)
    src = tmp_path / "lora.safetensors"
    flux_lora_file(src, transformer, None, style="kohya", dtype=torch.float32, single=False)
    found = {f.rule: f for f in check_adapter(src, ["diffusers"], base=str(single)).targets[0].findings}
    assert "not_in_base" not in found and "applies 10 of the file's 10 modules" in found["keys_applied"].message
