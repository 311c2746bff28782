"""`adapterfmt check --target diffusers|comfyui` on Flux LoRA files (kohya-Flux, ComfyUI, ai-toolkit, BFL,
diffusers), judged by their keys.

Every Flux key rule has a file that makes it fire and one that leaves it silent. The diffusers rules come
from running diffusers' own Flux conversion on the file's keys (tests/diffusion/test_check_flux_consumers.py
checks the counts against diffusers loading the files); the ComfyUI verdicts from our reimplementation of
ComfyUI's Flux key map (ComfyUI cannot be installed here).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adapterfmt.ops.check import OK, check_adapter
from tests.diffusion.flux_files import flux_lora_file
from tests.diffusion.models import clip_text, flux_transformer

#: case -> (style, which blocks, with CLIP-L)
CASES = {"kohya_blocks": ("kohya", {"single": False}), "kohya_single": ("kohya", {"single": True}),
         "kohya_top": ("kohya", {"single": False, "top": True}), "comfyui_top": ("comfyui", {"single": False, "top": True}),
         "comfyui_single": ("comfyui", {"single": True}), "ai_toolkit": ("ai-toolkit", {"single": False}),
         "bfl": ("bfl", {"single": False})}


@pytest.fixture(scope="module")
def models():
    return flux_transformer(), clip_text(16, 8)


def write(tmp_path, models, case):
    path = tmp_path / f"{case}.safetensors"
    transformer, text_encoder = models
    if case == "diffusers":  # diffusers' own format: transformer.<module>.lora_A/B (as save_lora_weights writes)
        state = {f"transformer.{m}.lora_{r}.weight": torch.ones(2, 2) for r in "AB"
                 for m in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "x_embedder")}
        save_file(state, str(path))
    elif case == "flux1_linear1":  # FLUX.1's own linear1 rows: the split diffusers hard-codes fits
        save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(1, 3072),
                   "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(21504, 1),
                   "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(1.0)}, str(path))
    elif case == "t5":  # sd-scripts' T5-XXL names (lora_te3_) next to a block
        state = {f"{n}.{s}": torch.ones(2, 2) for n in ("lora_unet_double_blocks_0_img_attn_proj",
                                                          "lora_te3_encoder_block_0_layer_0_SelfAttention_q")
                 for s in ("lora_down.weight", "lora_up.weight")}
        save_file(state, str(path))
    else:
        style, which = CASES[case]
        flux_lora_file(path, transformer, text_encoder if style in ("kohya", "comfyui") else None,
                       style=style, **which)
    return path


def findings(path, target):
    return {f.rule: f for f in check_adapter(path, [target]).targets[0].findings}


#: (case, target, rule, severity, a phrase of the message)
FIRES = [
    ("kohya_single", "diffusers", "flux_linear1_fixed_rows", "refuse", "[112] rows"),
    ("comfyui_single", "diffusers", "flux_linear1_fixed_rows", "refuse", "3072/3072/3072/12288"),
    ("kohya_top", "diffusers", "flux_top_level_not_loaded", "ignored", "8 top-level Flux module(s)"),
    ("comfyui_top", "diffusers", "flux_top_level_not_loaded", "ignored", "diffusion_model.img_in"),
    ("ai_toolkit", "diffusers", "flux_lora_ab_not_loaded", "ignored", "10 module(s) have lora_A/lora_B"),
    ("bfl", "diffusers", "flux_lora_ab_not_loaded", "ignored", "double_blocks.0."),
    ("kohya_top", "diffusers", "keys_applied", OK, "applies 22 of the file's 30 modules, 26 diffusers layers"),
    ("flux1_linear1", "diffusers", "keys_applied", OK, "applies 1 of the file's 1 modules, 4 diffusers layers"),
    ("diffusers", "diffusers", "keys_applied", OK, "applies 3 of the file's 3 modules"),
    ("t5", "diffusers", "flux_t5_filtered", "ignored", "1 T5-XXL text-encoder module(s) (lora_te3_"),
    ("bfl", "comfyui", "names_not_mapped", "ignored", "only in BFL control LoRAs"),
    ("kohya_top", "comfyui", "keys_applied", OK, "applies 30 of the file's 30 modules"),
    ("t5", "comfyui", "keys_applied", OK, "applies 2 of the file's 2 modules"),
    ("ai_toolkit", "comfyui", "keys_applied", OK, "applies 10 of the file's 10 modules"),
]
#: The file that leaves each rule silent.
SILENT = [
    ("kohya_blocks", "diffusers", "flux_linear1_fixed_rows"), ("flux1_linear1", "diffusers", "flux_linear1_fixed_rows"),
    ("kohya_blocks", "diffusers", "flux_top_level_not_loaded"), ("ai_toolkit", "diffusers", "flux_top_level_not_loaded"),
    ("kohya_top", "diffusers", "flux_lora_ab_not_loaded"), ("diffusers", "diffusers", "flux_lora_ab_not_loaded"),
    ("kohya_single", "diffusers", "keys_refused"), ("kohya_top", "diffusers", "keys_dropped"),
    ("t5", "diffusers", "keys_dropped"), ("kohya_top", "diffusers", "flux_t5_filtered"),
    ("kohya_top", "diffusers", "per_module_alphas"),  # diffusers' Flux loader folds each .alpha in
    ("ai_toolkit", "comfyui", "names_not_mapped"), ("diffusers", "comfyui", "names_not_mapped"),
]


@pytest.mark.parametrize("case,target,rule,severity,phrase", FIRES)
def test_flux_key_rule_fires(tmp_path, models, case, target, rule, severity, phrase):
    found = findings(write(tmp_path, models, case), target)
    assert rule in found and found[rule].severity == severity and phrase in found[rule].message, found.get(rule)
    if target == "comfyui":
        assert "reimplementation" in found[rule].message


@pytest.mark.parametrize("case,target,rule", SILENT)
def test_flux_key_rule_is_silent(tmp_path, models, case, target, rule):
    assert rule not in findings(write(tmp_path, models, case), target)


def test_every_flux_rule_fires_and_is_silent():
    flux_rules = {"flux_linear1_fixed_rows", "flux_top_level_not_loaded", "flux_lora_ab_not_loaded", "flux_t5_filtered"}
    assert flux_rules <= {r for _, _, r, *_ in FIRES} and flux_rules <= {r for _, _, r in SILENT}


def test_the_exact_route_is_named(tmp_path, models):
    """Every Flux diffusers finding names the conversion that loads the whole file (checked in tests/diffusion)."""
    for case in ("kohya_single", "kohya_top", "ai_toolkit"):
        report = check_adapter(write(tmp_path, models, case), ["diffusers"], out="out.safetensors")
        assert report.targets[0].fix.endswith("out.safetensors --to diffusers"), report.targets[0].verdict()


def test_t5_modules_are_refused_by_the_reader_with_the_reason(tmp_path, models):
    """sd-scripts' lora_te3_ (T5-XXL): diffusers has no T5 LoRA loader to map them, so nothing is read."""
    import adapterfmt
    from adapterfmt.errors import ForeignFormatError
    with pytest.raises(ForeignFormatError, match="T5-XXL text-encoder LoRAs .*no T5 LoRA loader"):
        adapterfmt.convert(write(tmp_path, models, "t5"), tmp_path / "out.safetensors")
