"""Merging into a single-file SD 1.x / SDXL checkpoint, in its own layout, equals diffusers' fuse_lora.

The merged file is read back with diffusers' own conversion functions (what ``from_single_file``
runs) and compared with ``fuse_lora`` on the diffusers models: every element within 1 ulp of
fuse_lora's or of the exact merge (float64) rounded once. Tensors no module touches must be
byte-identical, and the file keeps the input's keys, dtypes and metadata.
"""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.errors import BaseMismatchError, UsageError

from .consumers import tiny_pipeline
from .kohya_files import sd_scripts_lora
from .ldm_files import save_sd15_single_file, save_sdxl_single_file

SAVE = {"sd15": save_sd15_single_file, "sdxl": save_sdxl_single_file}
METADATA = {"modelspec.title": "tiny", "modelspec.architecture": "stable-diffusion-v1"}


def diffusers_view(path, kind: str, models: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The single file as diffusers reads it (its own conversion functions), per component."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)
    state = load_file(str(path))
    unet_config = {"layers_per_block": models["unet"].config.layers_per_block}
    if kind == "sdxl":
        unet_config["addition_embed_type"] = "text_time"
    view = {"unet": convert_ldm_unet_checkpoint(state, unet_config),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}}
    if kind == "sdxl":
        view["text_encoder_2"] = convert_open_clip_checkpoint(models["text_encoder_2"], state,
                                                              prefix="conditioner.embedders.1.model.")
    return view


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


def _exact(base: torch.Tensor, loras: list[tuple[dict, dict, float]], target: str) -> torch.Tensor:
    """float64 W + Σ weight · alpha/rank · up @ down, rounded once to the stored dtype."""
    total = base.double()
    for names, state, weight in loras:
        for name, module in names.items():
            if f"{module}.weight" == target:
                down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
                total = total + weight * state[f"{name}.alpha"].double().item() / down.shape[0] * (up @ down)
    return total.to(base.dtype)


def _fused_states(fused, models) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k.replace(".base_layer", "").removeprefix("text_model." if c == "text_encoder" else "@"): v
                for k, v in getattr(fused, c).state_dict().items() if ".lora_" not in k} for c in models}


def _single(kind, models, tmp_path, dtype=None):
    path = SAVE[kind](models, tmp_path / f"{kind}.safetensors")
    state = load_file(str(path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(path), metadata=METADATA)
    return path


def _loras(kind, models, tmp_path, single, seeds_weights):
    loras, specs = [], []
    for seed, weight in seeds_weights:
        src = tmp_path / f"lora{seed}.safetensors"
        names = sd_scripts_lora(kind, models, src, alphas="uniform", seed=seed)
        adapterfmt.convert(src, tmp_path / f"lora{seed}-af.safetensors", base=single)
        loras.append((names, load_file(str(src)), weight))
        specs.append((src, tmp_path / f"lora{seed}-af.safetensors", weight))
    return loras, specs


def _check_layout_and_untouched(single, merged, changed_expected: int):
    with safe_open(str(single), "pt") as a, safe_open(str(merged), "pt") as b:
        assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata() == METADATA
        changed = 0
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape
            same = torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
            changed += not same
    assert changed == changed_expected


def _compare(view, fused, base_view, loras, kind):
    for component, params in view.items():
        for param, value in params.items():
            theirs = fused[component][param]
            exact = _exact(base_view[component][param], loras, f"{component}.{param}")
            near_fused = (value - theirs).abs() <= _ulp(theirs)
            near_exact = (value - exact).abs() <= _ulp(exact)
            assert bool((near_fused | near_exact).all()), (kind, component, param)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_merge_equals_fuse_lora(kind, request, tmp_path):
    models = request.getfixturevalue(kind)[1]
    single = _single(kind, models, tmp_path)
    loras, specs = _loras(kind, models, tmp_path, single, [(0, 1.0)])
    fused = tiny_pipeline(kind, models)
    fused.load_lora_weights(str(specs[0][0]))
    fused.fuse_lora(components=list(models))
    out = tmp_path / "merged.safetensors"
    stats = adapterfmt.merge(single, [specs[0][1]], out)
    targets = set(loras[0][0].values())
    # SDXL te2: q, k and v land in one fused in_proj_weight per layer.
    fused_qkv = {t.rsplit(".", 1)[0] for t in targets if t.startswith("text_encoder_2.") and "_proj" in t
                 and "out_proj" not in t}
    assert stats.tensors_changed == len(targets) - 2 * len(fused_qkv) > 0
    _check_layout_and_untouched(single, out, stats.tensors_changed)
    _compare(diffusers_view(out, kind, models), _fused_states(fused, models), diffusers_view(single, kind, models),
             loras, kind)


def test_weighted_three_lora_merge_into_sdxl_single_file(sdxl, tmp_path):
    """The common "merge three LoRAs into a checkpoint": diffusers set_adapters + fuse_lora as reference."""
    models = sdxl[1]
    single = _single("sdxl", models, tmp_path)
    loras, specs = _loras("sdxl", models, tmp_path, single, [(1, 0.7), (2, 0.5), (3, -0.3)])
    fused = tiny_pipeline("sdxl", models)
    for i, (src, _, _) in enumerate(specs):
        fused.load_lora_weights(str(src), adapter_name=f"a{i}")
    fused.set_adapters([f"a{i}" for i in range(3)], adapter_weights=[w for _, _, w in specs])
    fused.fuse_lora(components=list(models), adapter_names=[f"a{i}" for i in range(3)])
    out = tmp_path / "merged.safetensors"
    adapterfmt.merge(single, [(af, w) for _, af, w in specs], out)
    view, theirs = diffusers_view(out, "sdxl", models), _fused_states(fused, models)
    base_view = diffusers_view(single, "sdxl", models)
    for component, params in view.items():
        for param, value in params.items():
            exact = _exact(base_view[component][param], loras, f"{component}.{param}")
            # diffusers adds three fp32 deltas one by one; we add their fp32 sum once: a few ulps apart
            torch.testing.assert_close(value, theirs[component][param], rtol=4e-7, atol=1e-7)
            # three fp32 ΔWs summed (each rounded at its own, larger scale): a few ulps of ΔW from float64
            torch.testing.assert_close(value, exact, rtol=4e-7, atol=1e-7)


def test_fp16_single_file_merge_rounds_once(sd15, tmp_path):
    models = sd15[1]
    single = _single("sd15", models, tmp_path, torch.float16)
    loras, specs = _loras("sd15", models, tmp_path, single, [(0, 1.0)])
    out = tmp_path / "merged.safetensors"
    stats = adapterfmt.merge(single, [specs[0][1]], out)
    _check_layout_and_untouched(single, out, stats.tensors_changed)
    view, base_view = diffusers_view(out, "sd15", models), diffusers_view(single, "sd15", models)
    for component, params in view.items():
        for param, value in params.items():
            assert value.dtype == torch.float16
            assert torch.equal(value, _exact(base_view[component][param], loras, f"{component}.{param}")) or \
                bool(((value - _exact(base_view[component][param], loras, f"{component}.{param}")).abs()
                      <= _ulp(value)).all()), param


def test_unmerge_from_single_file_restores_within_one_ulp(sdxl, tmp_path):
    models = sdxl[1]
    single = _single("sdxl", models, tmp_path)
    _, specs = _loras("sdxl", models, tmp_path, single, [(1, 0.7), (2, 0.5)])
    adapters = [(af, w) for _, af, w in specs]
    adapterfmt.merge(single, adapters, tmp_path / "merged.safetensors")
    adapterfmt.unmerge(tmp_path / "merged.safetensors", adapters, tmp_path / "restored.safetensors")
    original, merged = load_file(str(single)), load_file(str(tmp_path / "merged.safetensors"))
    restored = load_file(str(tmp_path / "restored.safetensors"))
    assert list(restored) == list(original)
    for key, value in original.items():
        assert bool(((restored[key] - value).abs() <= _ulp(merged[key])).all()), key


def test_a_module_absent_from_the_single_file_is_refused_by_name(sd15, tmp_path):
    models = sd15[1]
    single = _single("sd15", models, tmp_path)
    _, specs = _loras("sd15", models, tmp_path, single, [(0, 1.0)])
    state = load_file(str(single))
    missing = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del state[missing]
    save_file(state, str(tmp_path / "pruned.safetensors"))
    with pytest.raises(BaseMismatchError, match=r"module unet\.down_blocks\.0\.attentions\.0\.transformer_blocks"
                                                r"\.0\.attn1\.to_q targets .* does not hold"):
        adapterfmt.merge(tmp_path / "pruned.safetensors", [specs[0][1]], tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_options_the_single_file_merge_cannot_honour_are_refused(sd15, tmp_path):
    models = sd15[1]
    single = _single("sd15", models, tmp_path)
    _, specs = _loras("sd15", models, tmp_path, single, [(0, 1.0)])
    with pytest.raises(UsageError, match="--dtype does not apply to a single-file checkpoint base"):
        adapterfmt.merge(single, [specs[0][1]], tmp_path / "m.safetensors", dtype="bf16")


def test_sd2_style_open_clip_text_encoder_merges_like_fuse_lora(sd15, tmp_path):
    """An SD 2.x-style file: the text encoder in open_clip's layout (fused in_proj, no text_projection)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from .ldm_files import open_clip_state
    models = sd15[1]
    state = load_file(str(save_sd15_single_file(models, tmp_path / "sd15.safetensors")))
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state.update({"cond_stage_model.model." + k: v for k, v in open_clip_state(models["text_encoder"]).items()})
    single = tmp_path / "sd2.safetensors"
    save_file(state, str(single), metadata=METADATA)
    loras, specs = _loras("sd15", models, tmp_path, single, [(0, 1.0)])
    fused = tiny_pipeline("sd15", models)
    fused.load_lora_weights(str(specs[0][0]))
    fused.fuse_lora(components=["text_encoder"])
    out = tmp_path / "merged.safetensors"
    adapterfmt.merge(single, [specs[0][1]], out)
    te = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(
        models["text_encoder"], load_file(str(out)), prefix="cond_stage_model.model.").items()}
    base_te = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(
        models["text_encoder"], state, prefix="cond_stage_model.model.").items()}
    theirs = _fused_states(fused, {"text_encoder": None})["text_encoder"]
    assert set(te) == set(theirs)
    _compare({"text_encoder": te}, {"text_encoder": theirs}, {"text_encoder": base_te}, loras, "sd2")
    assert any(not torch.equal(te[k], base_te[k]) for k in te if "q_proj" in k)


def test_a_single_component_adapter_finds_its_component_by_architecture(sd15, tmp_path):
    """A PEFT adapter of the UNet alone (no components) merges into the UNet of the single file, as PEFT's
    merge_and_unload does on the UNet."""
    import copy

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from peft import LoraConfig, get_peft_model
    pipe_dir, models = sd15
    single = _single("sd15", models, tmp_path)
    torch.manual_seed(3)
    unet = get_peft_model(copy.deepcopy(models["unet"]), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                    target_modules=["to_q", "to_v"]))
    unet.save_pretrained(tmp_path / "peft")
    adapterfmt.convert(tmp_path / "peft", tmp_path / "a.safetensors", base=pipe_dir / "unet")
    assert not adapterfmt.read_adapter(tmp_path / "a.safetensors").manifest.components
    stats = adapterfmt.merge(single, [tmp_path / "a.safetensors"], tmp_path / "merged.safetensors")
    merged = convert_ldm_unet_checkpoint(load_file(str(tmp_path / "merged.safetensors")), {"layers_per_block": 1})
    theirs = unet.merge_and_unload().state_dict()
    assert stats.tensors_changed == sum(k.endswith(("to_q.weight", "to_v.weight")) for k in theirs) > 0
    for key, value in merged.items():
        assert bool(((value - theirs[key]).abs() <= _ulp(theirs[key])).all()), key


def test_only_adapted_tensors_are_decoded_one_at_a_time(sd15, tmp_path, monkeypatch):
    """Streaming: untouched tensors are copied as bytes (never decoded), touched ones mapped one at a time."""
    import contextlib

    from adapterfmt.engine import merge_single_file as engine
    models = sd15[1]
    single = _single("sd15", models, tmp_path)
    _, specs = _loras("sd15", models, tmp_path, single, [(0, 1.0)])
    opened, open_now = [], [0]
    real = engine.mapped_tensor

    @contextlib.contextmanager
    def counting(span, *args, **kwargs):
        opened.append(span.name)
        open_now[0] += 1
        assert open_now[0] == 1, "two stored tensors decoded at once"
        with real(span, *args, **kwargs) as tensor:
            yield tensor
        open_now[0] -= 1

    monkeypatch.setattr(engine, "mapped_tensor", counting)
    stats = adapterfmt.merge(single, [specs[0][1]], tmp_path / "merged.safetensors")
    assert len(opened) == len(set(opened)) == stats.tensors_changed < stats.tensors_total
