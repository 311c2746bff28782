"""Which keys of a diffusion LoRA file ComfyUI loads: OUR REIMPLEMENTATION of ComfyUI's rules, not ComfyUI.

ComfyUI cannot be installed here, so its key matching was read from its source and written again:
``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``: the names it maps onto an SD 1.x /
SDXL model; ``load_lora``: the per-module key families it consumes, with ``comfy/weight_adapter/lora.py``
``LoRAAdapter.load`` @6fd406f for the LoRA spellings) at commit 41444b5. A key no family consumes is what
ComfyUI logs as ``lora key not loaded`` and skips. Without the model we check the names' families, not
that the module exists in a particular checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .diffusion_keys import DiffusionKeys

COMFY_SOURCE = "ComfyUI comfy/lora.py @41444b5 (model_lora_keys_unet/clip, load_lora), weight_adapter/lora.py @6fd406f"
#: comfy/lora.py LORA_CLIP_MAP: the only CLIP modules the lora_te*/text_encoder* names reach.
CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
CLIP_LAYERS = 32  # model_lora_keys_clip loops over 32 blocks
#: Suffixes load_lora (and the weight adapters it calls) consume for a mapped module.
CONSUMED = frozenset({
    ".alpha", ".dora_scale", ".reshape_weight", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
    "_lora.up.weight", "_lora.down.weight", ".lora_B.weight", ".lora_A.weight", ".lora.up.weight",
    ".lora.down.weight", ".lora_B", ".lora_A", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    ".lora_B.default.weight", ".lora_A.default.weight", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
    ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b",
    ".lokr_t2", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".w_norm", ".b_norm", ".diff", ".diff_b",
    ".set_weight"})
#: A module is patched when it has one of these (the first key of each family load_lora looks for).
WEIGHT_KEYS = frozenset({".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight", ".lora_B",
                         ".lora_linear_layer.up.weight", ".lora_B.default.weight", ".hada_w1_a", ".lokr_w1",
                         ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a", ".a1.weight", ".w_norm", ".diff", ".diff_b",
                         ".set_weight"})
_CLIP_UNDERSCORE = "|".join(c.replace(".", "_") for c in CLIP_MODULES)
_CLIP_DOTTED = "|".join(re.escape(c) for c in CLIP_MODULES)
_ATTENTION_TO = re.compile(r"\.to_(q|k|v|out)(\.0)?$")


def _clip_names(kind: str) -> tuple[re.Pattern, ...]:
    """The CLIP module names model_lora_keys_clip maps for an SD 1.x (clip_l) or SDXL (clip_l + clip_g) model."""
    te = ["lora_te", "lora_te1"] + (["lora_te2"] if kind == "sdxl" else [])
    diffusers = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    names = [re.compile(rf"^({'|'.join(te)})_text_model_encoder_layers_(\d+)_({_CLIP_UNDERSCORE})$"),
             re.compile(rf"^({'|'.join(diffusers)})\.text_model\.encoder\.layers\.(\d+)\.({_CLIP_DOTTED})$"),
             re.compile(r"^text_encoders\.clip_[lg]\.transformer\..+$")]
    if kind == "sdxl":
        names.append(re.compile(r"^lora_te[12]_text_projection$"))
    return tuple(names)


def unet_name_mapped(module: str) -> str | None:
    """None when model_lora_keys_unet has the name, else why not. ``lora_unet_``/``lycoris_`` names (LDM or
    diffusers blocks) and ``diffusion_model.`` keys are taken as given; diffusers-style names only in the
    old attention-processor spelling for attention projections."""
    if module.startswith(("lora_unet_", "lycoris_", "diffusion_model.")):
        return None
    path = module.removeprefix("unet.")
    if _ATTENTION_TO.search(path) and ".processor.to_" not in path:
        return ("ComfyUI maps diffusers attention names only in the old processor spelling "
                "('…attn1.processor.to_q'), not PEFT's '…attn1.to_q'")
    if module.startswith("unet.") and re.match(r"^(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding|"
                                               r"add_embedding|conv_norm_out)", path):
        return None
    return "no ComfyUI SD/SDXL name family has this prefix"


def mapped(module: str, kind: str) -> str | None:
    """None when ComfyUI's key map for an SD 1.x / SDXL model has this module name, else why not."""
    if module.startswith(("lora_te", "text_encoder", "text_encoders.")):
        for pattern in _clip_names(kind):
            match = pattern.match(module)
            if match and (pattern.groups < 2 or int(match[2]) < CLIP_LAYERS):
                return None
        if re.match(r"^(lora_te\d?_|text_encoder(_2)?\.)encoder", module):
            return "text-encoder names without 'text_model' (transformers 5 spelling) are not in ComfyUI's key map"
        return "ComfyUI maps only the CLIP q/k/v/out_proj and fc1/fc2 of text_model.encoder.layers.N"
    return unet_name_mapped(module)


@dataclass
class ComfyOutcome:
    """Modules ComfyUI (by our reimplementation) applies, and the keys it reports 'lora key not loaded'."""

    applied: list[str] = field(default_factory=list)
    not_loaded: dict[str, str] = field(default_factory=dict)  # key -> why
    nothing_applied: list[str] = field(default_factory=list)  # mapped, but no weight family in its keys


def run_comfy(facts: DiffusionKeys, name_rule=None) -> ComfyOutcome:
    """Our reimplementation of ComfyUI's ``load_lora`` over the file's keys for an SD 1.x / SDXL model, or
    for another model when ``name_rule(module)`` (None when mapped, else why not) gives its key map
    (comfy_flux_keys.flux_name_rule for Flux).

    Example:
        >>> run_comfy(read_diffusion_keys("peft_unet.safetensors")).not_loaded  # doctest: +SKIP
    """
    outcome = ComfyOutcome()
    for module, keys in facts.modules.items():
        why = name_rule(module) if name_rule is not None else mapped(module, facts.kind)
        for suffix, key in keys.items():
            if why is not None:
                outcome.not_loaded[key] = why
            elif suffix not in CONSUMED:
                outcome.not_loaded[key] = f"'{suffix or key}' is not a key ComfyUI's adapters read"
        if why is None and any(s in WEIGHT_KEYS for s in keys):
            outcome.applied.append(module)
        elif why is None:
            outcome.nothing_applied.append(module)  # its .alpha/.dora_scale are read, no weight patched
    return outcome
