"""Key spellings of Flux LoRA files and what each name targets (component, diffusers module, B rows).

Spellings seen in the wild (all of one low-rank pair per module, optional ``.alpha``):

- kohya sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``lora_te1_…`` (CLIP-L);
- BFL / ai-toolkit / ComfyUI: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (or
  ``lora_down``), bare ``double_blocks.0…`` in BFL's own files, ``text_encoders.clip_l.transformer.…``.

Every name is first brought to kohya's spelling with diffusers' own ComfyUI rule (what
``FluxLoraLoaderMixin`` does), then placed by diffusers' kohya-Flux conversion (flux_names.py);
text-encoder names by the same conversion plus the PEFT key conversion ``load_lora_weights`` applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._files import safetensors_keys
from .diffusers_probe import index_probe, quiet_diffusers
from .flux_names import COMFY_UNET, KOHYA_UNET, Part, flux_table, kohya_name

#: role suffix -> role
ROLE_SUFFIXES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "lora_A.weight": "lora_A",
                 "lora_B.weight": "lora_B", "alpha": "alpha"}
COMFY_TE = "text_encoders.clip_l.transformer."
KOHYA_TE = ("lora_te1_", "lora_te_")
#: The families tried, for refusals.
FLUX_FAMILIES = ("kohya Flux (lora_unet_double_blocks_…, lora_unet_single_blocks_…, lora_te1_)",
                 "BFL/ComfyUI/ai-toolkit Flux ([diffusion_model.]double_blocks.N.img_attn.qkv.lora_A|lora_down, "
                 "text_encoders.clip_l.transformer.…)")


@dataclass(frozen=True)
class Style:
    """How a family spells names and roles when we generate them."""

    unet: str
    te: str
    dotted: bool
    down: str
    up: str


STYLES = {"kohya": Style(KOHYA_UNET, "lora_te1_", False, "lora_down.weight", "lora_up.weight"),
          "bfl": Style(COMFY_UNET, COMFY_TE, True, "lora_A.weight", "lora_B.weight")}


@dataclass(frozen=True)
class Target:
    """Where one file name goes: transformer parts (fused or not) or one text-encoder module."""

    component: str
    parts: tuple[Part, ...]


def split_key(key: str) -> tuple[str, str, str] | None:
    """(name, role, role suffix) of a key, or None when the key has no LoRA role suffix.

    Example:
        >>> split_key("diffusion_model.img_in.lora_A.weight")
        ('diffusion_model.img_in', 'lora_A', 'lora_A.weight')
    """
    for suffix, role in ROLE_SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role, suffix
    return None


def module_names(path: Path) -> set[str]:
    """For format detection: the module names of a safetensors file's LoRA keys (split_key); empty for a
    folder, a file that is no safetensors file, or one without tensors.

    Example:
        >>> module_names(Path("no-such-file.safetensors"))
        set()
    """
    found = safetensors_keys(path) if path.is_file() else None
    if not found or not found[0]:
        return set()
    return {split[0] for key in found[0] if (split := split_key(key))}


def kohya_spelling(name: str) -> str:
    """The kohya spelling diffusers gives a name (its ComfyUI replacement), bare BFL names prefixed.

    Example:
        >>> kohya_spelling("diffusion_model.single_blocks.0.linear1")
        'lora_unet_single_blocks_0_linear1'
    """
    if name.startswith((KOHYA_UNET,) + KOHYA_TE):
        return name
    if name in flux_table().parts:
        return kohya_name(name)
    from diffusers.loaders.lora_conversion_utils import _custom_replace
    key = f"{name}.lora_down.weight".replace(COMFY_UNET, KOHYA_UNET).replace(COMFY_TE, "lora_te_")
    return _custom_replace(key, ["lora_down"]).removesuffix(".lora_down.weight")


def targets(names: list[str]) -> dict[str, Target]:
    """{file name: Target} for the names diffusers' Flux loader places; others are absent.

    Example:
        >>> targets(["lora_unet_img_in"])["lora_unet_img_in"].parts[0].module
        'x_embedder'
    """
    table = flux_table()
    by_kohya = table.by_kohya
    found, text = {}, {}
    for name in names:
        spelled = kohya_spelling(name)
        if spelled in by_kohya:
            found[name] = Target("transformer", table.parts[by_kohya[spelled]])
        elif spelled.startswith(KOHYA_TE):
            text[name] = spelled
    for name, module in _text_encoder_modules(text).items():
        found[name] = Target("text_encoder", (Part(module, ()),))
    return found


def _text_encoder_modules(spelled: dict[str, str]) -> dict[str, str]:
    """{file name: CLIP module} as diffusers' Flux loader maps kohya text-encoder names."""
    if not spelled:
        return {}
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType
    names = list(spelled)
    probe = index_probe([spelled[name] for name in names])
    try:
        with quiet_diffusers():
            converted = _convert_kohya_flux_lora_to_diffusers(probe)
    except ValueError:
        return {}
    inner = {k.removeprefix("text_encoder."): v for k, v in converted.items() if k.startswith("text_encoder.")}
    if not inner:
        return {}
    # As load_lora_weights does for text encoders: old diffusers names -> PEFT names (type given, not inferred).
    peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(inner, original_type=StateDictType.DIFFUSERS_OLD),
                                      original_type=StateDictType.DIFFUSERS)
    return {names[int(v.reshape(-1)[0])]: k.removesuffix(".lora_A.weight") for k, v in peft.items()
            if k.endswith(".lora_A.weight")}


def generated_name(component: str, module: str, style: Style) -> tuple[str, tuple[Part, ...]] | None:
    """The name a family gives a diffusers module, and that name's parts; None when it has none.

    Example:
        >>> generated_name("transformer", "transformer_blocks.0.attn.to_k", STYLES["kohya"])[0]
        'lora_unet_double_blocks_0_img_attn_qkv'
    """
    if component == "text_encoder":
        path = module if module.startswith("text_model.") else f"text_model.{module}"
        name = style.te + (path if style.dotted else path.replace(".", "_"))
        return name, (Part(module, ()),)
    table = flux_table()
    bfl = table.by_module.get(module) if component == "transformer" else None
    if bfl is None:
        return None
    return (style.unet + bfl if style.dotted else table.kohya[bfl]), table.parts[bfl]
