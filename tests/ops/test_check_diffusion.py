"""`adapterfmt check --target diffusers|comfyui` on diffusion LoRA files as they are, judged by their keys.

Every key-level rule has a file that makes it fire and one that leaves it silent. The diffusers
rules come from running diffusers' own conversion on the file's keys; the ComfyUI rules from our
reimplementation of ComfyUI's key rules (ComfyUI cannot be installed here). tests/diffusion/
test_check_consumers.py checks the diffusers counts against diffusers actually loading the files.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adapterfmt.ops.check import OK, check_adapter
from adapterfmt.ops.check_rules_diffusion import KEY_RULES

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
PEFT_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PEFT_TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def kohya(*names, extra=()):
    keys = [f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")]
    return keys + list(extra)


def peft(*names, extra=()):
    return [f"{n}.{s}" for n in names for s in ("lora_A.weight", "lora_B.weight")] + list(extra)


FILES = {
    "plain": kohya(Q, TE),
    "dora": kohya(Q, TE, extra=[f"{Q}.dora_scale", f"{TE}.dora_scale"]),
    "loha": [f"{Q}.{s}" for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")],
    "te5": kohya(Q, "lora_te_encoder_layers_0_self_attn_q_proj"),
    "peft": peft(PEFT_Q, PEFT_TE, "unet.down_blocks.0.attentions.0.proj_in"),
    "peft_te_dora": peft(PEFT_Q, PEFT_TE, extra=[f"{PEFT_TE}.lora_magnitude_vector"]),
    "peft_unet_dora": peft(PEFT_Q, PEFT_TE, extra=[f"{PEFT_Q}.lora_magnitude_vector"]),
    "alpha_only": kohya(Q) + [f"{TE}.alpha"],
    "sgm": kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
    "absent": kohya(Q, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q"),
}


#: diffusers' lora_adapter_metadata (per component r / lora_alpha), as save_lora_weights writes it.
METADATA = {"peft_alpha": {"unet.r": 2, "unet.lora_alpha": 4, "text_encoder.r": 2, "text_encoder.lora_alpha": 2},
            "peft_alpha_one": {"unet.r": 2, "unet.lora_alpha": 2}}


def write(tmp_path, case: str):
    path = tmp_path / f"{case}.safetensors"
    keys = FILES[case.removesuffix("_alpha").removesuffix("_alpha_one")] if case.startswith("peft_alpha") else FILES[case]
    metadata = {"format": "pt"}
    if case in METADATA:
        metadata["lora_adapter_metadata"] = json.dumps(METADATA[case])
    save_file({k: torch.ones(()) if k.endswith(".alpha") else torch.ones(2, 2) for k in keys}, str(path), metadata)
    return path


@pytest.fixture(scope="module")
def sd15_pipe(tmp_path_factory):
    from tests.diffusion.models import build_components, save_pipeline
    return save_pipeline("sd15", tmp_path_factory.mktemp("pipe") / "sd15", build_components("sd15"))


def findings(path, target, base="BASE"):
    report = check_adapter(path, [target], base=str(base))
    return {f.rule: f for f in report.targets[0].findings}


#: (case, target, rule, severity, a phrase of the message, base?) — the file that makes each rule fire.
FIRES = [
    ("loha", "diffusers", "keys_refused", "refuse", "have not been correctly renamed", False),
    ("dora", "diffusers", "keys_dropped", "ignored", ".dora_scale", False),
    ("peft_te_dora", "diffusers", "te_dora_magnitude", "ignored", "0.099", False),
    ("absent", "diffusers", "not_in_base", "ignored", "attn9.to_q", True),
    ("absent", "comfyui", "not_in_base", "ignored", "attn9.to_q", True),
    ("absent", "comfyui", "keys_applied", OK, "applies 1 of the file's 2 modules", True),
    ("sgm", "diffusers", "sgm_names_assumed", OK, "layers_per_block 2", False),
    ("dora", "diffusers", "keys_applied", OK, "applies 2 of the file's 2 modules", False),
    ("te5", "comfyui", "names_not_mapped", "ignored", "without 'text_model'", False),
    ("peft", "comfyui", "names_not_mapped", "ignored", "processor spelling", False),
    ("peft_te_dora", "comfyui", "keys_not_read", "ignored", ".lora_magnitude_vector", False),
    ("alpha_only", "comfyui", "nothing_applied", "ignored", TE, False),
    ("peft_alpha", "comfyui", "peft_alpha_ignored", "mis-scaled", "e.g. 2 (unet.down_blocks.0.attentions.0.proj_in)", False),
    ("peft", "comfyui", "keys_applied", OK, "not applied: " + PEFT_Q, False),
]
#: The file that leaves each rule silent.
SILENT = [
    ("plain", "diffusers", "keys_refused", False), ("plain", "diffusers", "keys_dropped", False),
    ("peft_unet_dora", "diffusers", "te_dora_magnitude", False), ("plain", "diffusers", "not_in_base", True),
    ("sgm", "diffusers", "sgm_names_assumed", True), ("loha", "diffusers", "keys_applied", False),
    ("plain", "comfyui", "names_not_mapped", False), ("plain", "comfyui", "keys_not_read", False),
    ("plain", "comfyui", "nothing_applied", False), ("plain", "comfyui", "not_in_base", True), ("peft_alpha_one", "comfyui", "peft_alpha_ignored", False),
]


@pytest.mark.parametrize("case,target,rule,severity,phrase,with_base", FIRES)
def test_key_rule_fires(tmp_path, sd15_pipe, case, target, rule, severity, phrase, with_base):
    found = findings(write(tmp_path, case), target, sd15_pipe if with_base else "BASE")
    assert rule in found and found[rule].severity == severity and phrase in found[rule].message, found.get(rule)
    if target == "comfyui":
        assert "reimplementation" in found[rule].message


@pytest.mark.parametrize("case,target,rule,with_base", SILENT)
def test_key_rule_is_silent(tmp_path, sd15_pipe, case, target, rule, with_base):
    assert rule not in findings(write(tmp_path, case), target, sd15_pipe if with_base else "BASE")


def test_every_key_rule_fires_and_is_silent_somewhere():
    from tests.ops.test_check_flux import FIRES as FLUX_FIRES, SILENT as FLUX_SILENT
    rules = {(t, r.id) for t, table in KEY_RULES.items() for r in table}
    assert {(t, r) for _, t, r, *_ in FIRES + FLUX_FIRES} == rules
    # keys_applied (comfyui) is the closing count: it is there for every diffusion file, never for others.
    assert {(t, r) for _, t, r, _ in SILENT} | ({(t, r) for _, t, r in FLUX_SILENT} & rules) | {("comfyui", "keys_applied")} == rules


def test_closing_count_is_absent_for_files_judged_by_their_manifest(tmp_path):
    """An adapterfmt multi-component file is judged by its manifest (its keys are ours, not a loader's)."""
    import adapterfmt
    src = write(tmp_path, "plain")
    adapterfmt.convert(src, tmp_path / "a.safetensors")
    found = findings(tmp_path / "a.safetensors", "comfyui")
    assert "keys_applied" not in found and "alphas" in found


def test_check_of_an_unreadable_diffusion_file_refuses_non_diffusion_targets(tmp_path):
    """SGM names without --base: adapterfmt cannot read the file, the diffusion targets still judge its keys."""
    from adapterfmt.errors import AdapterFmtError
    path = write(tmp_path, "sgm")
    assert check_adapter(path, ["diffusers", "comfyui"]).targets
    with pytest.raises(AdapterFmtError):
        check_adapter(path, ["vllm"])


def test_a_diffusers_format_file_is_not_called_mis_scaled_by_diffusers(tmp_path):
    """Per-module alphas in lora_adapter_metadata are read by diffusers: only kohya files (.alpha keys) are
    mis-scaled there (tests/diffusion/test_check_consumers.py shows that one with diffusers itself)."""
    import adapterfmt
    src = tmp_path / "varied.safetensors"
    save_file({k: torch.tensor(2.0 if k.startswith(Q) else 1.0) if k.endswith(".alpha") else torch.ones(2, 2)
               for k in FILES["plain"]}, str(src))
    assert findings(src, "diffusers")["per_module_alphas"].severity == "mis-scaled"  # the kohya file is
    adapterfmt.convert(src, tmp_path / "d.safetensors", to="diffusers")
    assert "per_module_alphas" not in findings(tmp_path / "d.safetensors", "diffusers")
    comfy = findings(tmp_path / "d.safetensors", "comfyui")
    assert "alphas" not in comfy and "keys_applied" in comfy
