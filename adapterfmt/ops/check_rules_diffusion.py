"""Key-level rules of ``adapterfmt check --target diffusers|comfyui`` for diffusion LoRA files as they are
(kohya, LyCORIS, diffusers/PEFT format): which keys each loader applies, ignores or refuses.

diffusers rules look at a real run of diffusers' own conversion on the file's keys (diffusers_keys.py).
ComfyUI rules look at OUR REIMPLEMENTATION of ComfyUI's key rules (comfy_keys.py): ComfyUI is not run,
and every ComfyUI message says so.
"""
from __future__ import annotations

import math
from functools import cached_property

from .check_model import IGNORED, MISSCALED, OK, REFUSE, Rule
from .check_rules import KOHYA_FOR, MERGE_FIX, some
from .comfy_keys import COMFY_SOURCE, ComfyOutcome, run_comfy
from .diffusers_flux_keys import LINEAR1_ROWS
from .diffusers_keys import DIFFUSERS_VERSION_TESTED, DiffusersOutcome, run_diffusers
from .diffusion_keys import DiffusionKeys, peft_scales

DIFFUSERS_RUN = f"diffusers {DIFFUSERS_VERSION_TESTED} loaders/lora_pipeline.py lora_state_dict + utils/state_dict_utils.py (run on the keys)"
TE_COMPONENTS = ("text_encoder.", "text_encoder_2.")
T5_PREFIXES = ("lora_te2_", "lora_te3_", "text_encoders.t5xxl.")
COMFY_NOTE = "by our reimplementation of ComfyUI's key rules (ComfyUI itself not run)"


class KeyView:
    """A diffusion file's keys with each loader's outcome, computed on first use."""

    def __init__(self, keys: DiffusionKeys):
        self.keys = keys

    @cached_property
    def diffusers(self) -> DiffusersOutcome:
        if self.keys.kind == "flux":
            from .diffusers_flux_keys import run_diffusers_flux
            return run_diffusers_flux(self.keys)
        return run_diffusers(self.keys)

    def outside(self, down: str) -> dict[str, str]:
        """Flux modules diffusers converts to a name ``load_lora_weights`` skips, whose down factor is
        spelled ``down`` (``.lora_down.weight``: kohya/ComfyUI; ``.lora_A.weight``: ai-toolkit/BFL)."""
        return {m: to for m, to in self.diffusers.outside.items() if down in self.keys.modules[m]}

    def t5_dropped(self) -> list[str]:
        """Flux T5-XXL modules diffusers drops (sd-scripts ``lora_te3_``, OneTrainer ``lora_te2_``, ComfyUI
        ``text_encoders.t5xxl.``): its Flux pipeline has no T5 LoRA loader."""
        if self.keys.kind != "flux":
            return []
        return [m for m in self.diffusers.dropped if m.startswith(T5_PREFIXES)]

    def other_dropped(self) -> dict[str, list[str]]:
        t5 = set(self.t5_dropped())
        return {m: s for m, s in self.diffusers.dropped.items() if m not in t5}

    @property
    def layer_note(self) -> str:
        layers = sum(map(len, self.diffusers.layers.values()))
        return f", {layers} diffusers layers" if layers != len(self.diffusers.applied) else ""

    @cached_property
    def comfy(self) -> ComfyOutcome:
        if self.keys.kind == "flux":  # matched against ComfyUI's key map for a Flux model
            from .comfy_flux_keys import flux_name_rule
            return run_comfy(self.keys, flux_name_rule(self.keys.keys))
        return run_comfy(self.keys)

    @property
    def module_count(self) -> int:
        return len(self.keys.modules)

    @property
    def has_alpha_keys(self) -> bool:
        return any(".alpha" in keys for keys in self.keys.modules.values())

    def decided_by_keys(self, target: str) -> set[str]:
        """Manifest rules the file's own keys decide instead: a PEFT-format file (no ``.alpha`` keys) is not
        mis-scaled by diffusers (its lora_adapter_metadata is read), and ComfyUI's scale for it is
        judged by ``peft_alpha_ignored``. diffusers' Flux loader scales every kohya/ComfyUI module by its own
        ``.alpha`` while converting (``_convert_kohya_flux_lora_to_diffusers``)."""
        if self.keys.kind == "flux" and target == "diffusers":
            return {"per_module_alphas"}  # its Flux loader folds each module's alpha/rank into the factors
        if self.has_alpha_keys:
            return set()
        return {"diffusers": {"per_module_alphas"}, "comfyui": {"alphas"}}.get(target, set())

    def not_applied_by_diffusers(self) -> list[str]:
        return [m for m in self.keys.modules if m not in self.diffusers.applied]

    def not_applied_by_comfy(self) -> list[str]:
        applied = set(self.comfy.applied)
        return [m for m in self.keys.modules if m not in applied]

    def te_magnitudes(self) -> list[str]:
        """Text-encoder modules of a diffusers-format file that carry DoRA magnitudes."""
        return [m for m, keys in self.keys.modules.items() if m.startswith(TE_COMPONENTS)
                and any(s.startswith(".lora_magnitude_vector") for s in keys)]

    def reasons(self, keys: dict[str, str]) -> str:
        """'why (e.g. key); other why (e.g. key)' for a {key: why} map, one example per reason."""
        first: dict[str, str] = {}
        for key, why in sorted(keys.items()):
            first.setdefault(why, key)
        return "; ".join(f"{why} (e.g. {key})" for why, key in first.items())


def _comfy_misscaled(v: KeyView) -> dict[str, float]:
    """PEFT-format modules ComfyUI applies at scale 1 (no .alpha key) whose diffusers scale is not 1."""
    applied = set(v.comfy.applied)
    return {m: s for m, s in peft_scales(v.keys).items() if m in applied and not math.isclose(s, 1.0, rel_tol=1e-9)}


def _comfy_absent(v: KeyView) -> dict[str, str]:
    """Modules ComfyUI's rules map whose layer the base does not have (found by diffusers' mapping checked
    against ``--base``): ComfyUI builds its key map from the model's own weights, so they are not loaded."""
    if v.diffusers.refused is not None or not v.diffusers.missing_in_base:
        return {}
    applied = set(v.comfy.applied)
    return {m: to for m, to in v.diffusers.missing_in_base.items() if m in applied}


def _names_unmapped(v: KeyView) -> dict[str, str]:
    return {k: w for k, w in v.comfy.not_loaded.items() if not w.startswith("'")}


def _keys_unread(v: KeyView) -> dict[str, str]:
    return {k: w for k, w in v.comfy.not_loaded.items() if w.startswith("'")}


FLUX_RUN = f"diffusers {DIFFUSERS_VERSION_TESTED} FluxLoraLoaderMixin.lora_state_dict (run on the keys)"
FLUX_TO_DIFFUSERS = "adapterfmt convert {file} {out} --to diffusers"

DIFFUSERS_KEY_RULES = (
    Rule("flux_linear1_fixed_rows", REFUSE, lambda v: bool(v.diffusers.fixed_rows),
         lambda v: f"diffusers' kohya-Flux loader splits single_blocks.N.linear1 at FLUX.1's fixed rows "
                   f"{'/'.join(map(str, LINEAR1_ROWS))} ({sum(LINEAR1_ROWS)}); this file's linear1 LoRAs have "
                   f"{sorted(set(v.diffusers.fixed_rows.values()))} rows (e.g. {some(list(v.diffusers.fixed_rows), 1)}), "
                   "so load_lora_weights stops with an AssertionError",
         FLUX_TO_DIFFUSERS, source=FLUX_RUN + " (_convert_kohya_flux_lora_to_diffusers dims=[3072, 3072, 3072, 12288])"),
    Rule("flux_top_level_not_loaded", IGNORED, lambda v: bool(v.outside(".lora_down.weight")),
         lambda v: f"{len(v.outside('.lora_down.weight'))} top-level Flux module(s) "
                   f"({some(list(v.outside('.lora_down.weight')), 3)}) are converted to names without "
                   f"'transformer.' (e.g. {some(list(v.outside('.lora_down.weight').values()), 1)}), which "
                   "load_lora_weights skips without a warning",
         FLUX_TO_DIFFUSERS, source=FLUX_RUN + " (_convert_sd_scripts_to_ai_toolkit: img_in, txt_in, time_in, "
                                              "vector_in, guidance_in, final_layer)"),
    Rule("flux_lora_ab_not_loaded", IGNORED, lambda v: bool(v.outside(".lora_A.weight")),
         lambda v: f"{len(v.outside('.lora_A.weight'))} module(s) have lora_A/lora_B keys on BFL names "
                   f"(e.g. {some(list(v.outside('.lora_A.weight')), 1)}): diffusers' Flux loader converts only "
                   "lora_down/lora_up files, keeps these names and applies nothing from them (it only warns "
                   "that no LoRA keys match the transformer)",
         FLUX_TO_DIFFUSERS, source=FLUX_RUN + " + FluxLoraLoaderMixin.load_lora_weights ('transformer.' filter)"),
    Rule("flux_t5_filtered", IGNORED, lambda v: v.diffusers.refused is None and bool(v.t5_dropped()),
         lambda v: f"{len(v.t5_dropped())} T5-XXL text-encoder module(s) ({some(v.t5_dropped(), 1)}): diffusers' "
                   "Flux loader has no T5 LoRA (it loads the transformer and CLIP-L only) and filters them out, "
                   "logging at info level only (adapterfmt does not read T5 LoRAs either)", None, exact_fix=False,
         source=FLUX_RUN + " (_convert_kohya_flux_lora_to_diffusers keeps lora_unet_/lora_te_/lora_te1_ only)"),
    Rule("keys_refused", REFUSE, lambda v: v.diffusers.refused is not None and not v.diffusers.fixed_rows,
         lambda v: f"diffusers refuses the file while converting its keys: {v.diffusers.refused}", MERGE_FIX,
         exact_fix=False, source=DIFFUSERS_RUN),
    Rule("keys_dropped", IGNORED, lambda v: v.diffusers.refused is None and bool(v.other_dropped()),
         lambda v: f"diffusers drops {sum(map(len, v.other_dropped().values()))} key(s) of "
                   f"{len(v.other_dropped())} module(s) while converting "
                   f"({', '.join(sorted({s for x in v.other_dropped().values() for s in x}))}; e.g. "
                   f"{some(list(v.other_dropped()), 1)})"
                   + (f"; it warns: {v.diffusers.warnings[0]}" if v.diffusers.warnings else ""),
         MERGE_FIX, exact_fix=False, source=DIFFUSERS_RUN),
    Rule("te_dora_magnitude", IGNORED, lambda v: bool(v.te_magnitudes()),
         lambda v: f"text-encoder DoRA magnitudes ({some(v.te_magnitudes())}): diffusers 0.42.1 does not reload "
                   "them from its own format (measured in issue 14: outputs 0.099 off; the UNet is exact)",
         MERGE_FIX, exact_fix=False, source="diffusers 0.42.1 loaders/lora_base.py load_lora_into_text_encoder "
                                             "(measured)"),
    Rule("not_in_base", IGNORED, lambda v: v.diffusers.refused is None and bool(v.diffusers.missing_in_base),
         lambda v: f"{len(v.diffusers.missing_in_base)} module(s) land on names the base does not have (e.g. "
                   f"{some(list(v.diffusers.missing_in_base.values()), 1)}); PEFT finds no layer for them",
         "adapterfmt convert {file} {out} --to diffusers --base {base}", source=DIFFUSERS_RUN),
    Rule("sgm_names_assumed", OK, lambda v: v.diffusers.refused is None and v.diffusers.assumed is not None,
         lambda v: v.diffusers.assumed, None,
         source=DIFFUSERS_RUN + " (_maybe_map_sgm_blocks_to_diffusers)"),
    Rule("keys_applied", OK, lambda v: v.diffusers.refused is None,
         lambda v: f"diffusers applies {len(v.diffusers.applied)} of the file's {v.module_count} modules{v.layer_note} "
                   f"(diffusers {DIFFUSERS_VERSION_TESTED}'s own key conversion run on this file's keys)"
                   + (f"; not applied: {some(v.not_applied_by_diffusers(), 3)}" if v.not_applied_by_diffusers() else ""),
         "adapterfmt convert {file} {out} --to diffusers", source=DIFFUSERS_RUN),
)

COMFYUI_KEY_RULES = (
    Rule("names_not_mapped", IGNORED, lambda v: bool(_names_unmapped(v)),
         lambda v: f"{len(_names_unmapped(v))} key(s) get 'lora key not loaded' and are skipped, {COMFY_NOTE}: "
                   f"{v.reasons(_names_unmapped(v))}", KOHYA_FOR + "comfyui", source=COMFY_SOURCE),
    Rule("keys_not_read", IGNORED, lambda v: bool(_keys_unread(v)),
         lambda v: f"{len(_keys_unread(v))} key(s) of mapped modules are read by no ComfyUI weight adapter "
                   f"('lora key not loaded'), {COMFY_NOTE}: {v.reasons(_keys_unread(v))}", MERGE_FIX,
         exact_fix=False, source=COMFY_SOURCE),
    Rule("peft_alpha_ignored", MISSCALED, lambda v: bool(_comfy_misscaled(v)),
         lambda v: f"{len(_comfy_misscaled(v))} PEFT-format module(s) have no .alpha key, so ComfyUI scales them "
                   f"by 1 where the file's lora_adapter_metadata gives e.g. {sorted(_comfy_misscaled(v).items())[0][1]:.6g} "
                   f"({sorted(_comfy_misscaled(v))[0]}), {COMFY_NOTE}", KOHYA_FOR + "comfyui",
         source=COMFY_SOURCE + " (LoRAAdapter.calculate_weight: alpha None -> 1.0)"),
    Rule("nothing_applied", IGNORED, lambda v: bool(v.comfy.nothing_applied),
         lambda v: f"{some(v.comfy.nothing_applied)}: only scalars (.alpha/.dora_scale), no weights; ComfyUI "
                   f"patches nothing there, {COMFY_NOTE}", None, exact_fix=False, source=COMFY_SOURCE),
    Rule("not_in_base", IGNORED, lambda v: bool(_comfy_absent(v)),
         lambda v: f"{len(_comfy_absent(v))} module(s) name layers the base does not have (e.g. "
                   f"{some(list(_comfy_absent(v).values()), 1)}): ComfyUI's key map comes from the model's own "
                   f"weights, so they get 'lora key not loaded', {COMFY_NOTE}", None, exact_fix=False,
         source=COMFY_SOURCE + "; " + DIFFUSERS_RUN),
    Rule("keys_applied", OK, lambda v: True,
         lambda v: f"ComfyUI applies {len(v.comfy.applied) - len(_comfy_absent(v))} of the file's {v.module_count} "
                   f"modules, {COMFY_NOTE}"
                   + (f"; not applied: {some(v.not_applied_by_comfy() + list(_comfy_absent(v)), 3)}"
                      if v.not_applied_by_comfy() or _comfy_absent(v) else ""),
         KOHYA_FOR + "comfyui", source=COMFY_SOURCE),
)

KEY_RULES: dict[str, tuple[Rule, ...]] = {"diffusers": DIFFUSERS_KEY_RULES, "comfyui": COMFYUI_KEY_RULES}
