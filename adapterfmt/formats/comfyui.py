"""ComfyUI / LDM-layout LoRA files of SD 1.x and SDXL: ``diffusion_model.input_blocks.1.1.….lora_down.weight``
(original LDM/SGM block names, ``lora_down``/``lora_up`` or ``lora_A``/``lora_B``, optional ``.alpha``) and
``text_encoders.clip_l.transformer.…`` / ``text_encoders.clip_g.transformer.…`` for the text encoders.

Names are brought to kohya's spelling on the original blocks by diffusers' own ComfyUI rule
(``diffusion_model.`` -> ``lora_unet_``, dots -> underscores; CLIP-L -> ``lora_te1_``, CLIP-G ->
``lora_te2_``), then placed by the kohya pipeline reader: diffusers' SGM block mapping with the base
UNet's config, and with a single-file base each module is checked against the names diffusers'
single-file conversion (``convert_ldm_unet_checkpoint``/``convert_ldm_clip_checkpoint``) gives it.
Every file name is kept, so a file read here is written back bit-for-bit (names, role spelling,
alpha layout, header).
"""
from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_file
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter
from ._files import load_safetensors
from .base import AdapterFormat
from .flux_keys import module_names, split_key
from .flux_lora import group_keys, kept_metadata, refuse_single_model
from .flux_names import COMFY_UNET, flux_table
from .kohya_pipeline import pipeline_kohya_state, read_pipeline_file

#: ComfyUI prefix -> kohya prefix (diffusers' rule maps diffusion_model. to lora_unet_).
PREFIXES = {COMFY_UNET: "lora_unet_", "text_encoders.clip_l.transformer.": "lora_te1_",
            "text_encoders.clip_g.transformer.": "lora_te2_"}
LDM_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
SOURCE_NAMES = "comfyui_names"  #: {kohya name: name in the file}
SOURCE_ROLES = "comfyui_roles"  #: [down suffix, up suffix]
FAMILIES = ("ComfyUI SD 1.x/SDXL (diffusion_model.<LDM blocks>, text_encoders.clip_l|clip_g.transformer.)",)
KOHYA_ROLES = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}


def kohya_spelling(name: str) -> str | None:
    """The kohya name diffusers' ComfyUI rule gives a ComfyUI name; None for other prefixes.

    Example:
        >>> kohya_spelling("diffusion_model.input_blocks.1.1.proj_in")
        'lora_unet_input_blocks_1_1_proj_in'
    """
    for prefix, kohya in PREFIXES.items():
        if name.startswith(prefix):
            return kohya + name[len(prefix):].replace(".", "_")
    return None


def _file_spelling(message: str, file_names: dict[str, str]) -> str:
    """``message`` with every kohya spelling replaced by the ComfyUI name the file has.

    Example:
        >>> _file_spelling("'lora_unet_a_b' is bad", {"lora_unet_a_b": "diffusion_model.a.b"})
        "'diffusion_model.a.b' is bad"
    """
    pattern = re.compile(r"(?<![A-Za-z0-9_])(lora_(?:unet|te1|te2)_[A-Za-z0-9_]+)")
    return pattern.sub(lambda m: file_names.get(m.group(1), m.group(1)), message).replace("kohya name(s)", "name(s)")


def _is_ldm_name(name: str) -> bool:
    return (name.startswith(COMFY_UNET) and name[len(COMFY_UNET):].startswith(LDM_BLOCKS)) or \
        (name.startswith(tuple(PREFIXES)) and not name.startswith(COMFY_UNET))


class ComfyUiFormat(AdapterFormat):
    name = "comfyui"
    summary = ("ComfyUI LoRA of SD 1.x/SDXL on the original LDM blocks (diffusion_model.input_blocks…, "
               "text_encoders.clip_l…)")
    priority = 29
    suffixes = (".safetensors",)
    writes_methods = ("lora",)

    def detect(self, path: Path) -> bool:
        names = module_names(path)
        # One UNet name on LDM blocks claims the file (Flux names belong to bfl); the reader refuses the rest.
        if not any(_is_ldm_name(n) and n.startswith(COMFY_UNET) for n in names):
            return False
        flux = flux_table().parts
        return not any(n.removeprefix(COMFY_UNET) in flux for n in names)

    def read(self, path: Path, options, report) -> Adapter:
        state, metadata = load_safetensors(path)
        grouped, suffixes = group_keys(state, path, FAMILIES)
        unmatched = [name for name in grouped if kohya_spelling(name) is None]
        if unmatched:
            more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
            raise ForeignFormatError(f"{len(unmatched)} of {len(grouped)} names are not ComfyUI SD names: "
                                     f"{', '.join(unmatched[:3])}{more}", path=path,
                                     hint=f"families tried: {'; '.join(FAMILIES)}; nothing was read")
        if options.base is None:
            raise UsageError("ComfyUI names are on the original LDM blocks; mapping them needs the UNet's config",
                             path=path, hint="pass --base (the diffusers pipeline or the single-file checkpoint)")
        # kohya_pipeline reads kohya leaves (``lora_down.weight``…): both ComfyUI spellings become those.
        kohya, file_names = {}, {}
        for name, roles in grouped.items():
            spelled = kohya_spelling(name)
            if spelled in file_names:  # dots -> underscores can merge two names; one would be dropped
                raise ForeignFormatError(f"{file_names[spelled]!r} and {name!r} are the same module once dots "
                                         "become underscores", path=path, hint="the file is ambiguous; nothing was read")
            file_names[spelled] = name
            kohya[spelled] = {KOHYA_ROLES.get(role, role): t for role, t in roles.items()}
        try:
            adapter = read_pipeline_file(kohya, metadata, options.base, path, report)
        except ForeignFormatError as exc:  # name the modules as the file spells them
            raise ForeignFormatError(_file_spelling(exc.message, file_names), path=path, hint=exc.hint) from None
        adapter.manifest.source.update({"format": "comfyui", "metadata": kept_metadata(metadata),
                                        SOURCE_NAMES: {kohya_spelling(name): name for name in grouped},
                                        SOURCE_ROLES: [suffixes.get("lora_A"), suffixes.get("lora_B")]})
        return adapter

    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        if not adapter.manifest.components:
            refuse_single_model(adapter, "ComfyUI SD files hold SD 1.x/SDXL pipeline LoRAs",
                                "read the source with --base pointing at the SD pipeline; for LLMs use --to peft")
        if "transformer" in adapter.manifest.components:
            raise UsageError("ComfyUI SD files hold UNet / CLIP modules of an SD 1.x or SDXL pipeline",
                             hint="for Flux use --to bfl; read the source with --base pointing at the SD pipeline")
        source = adapter.manifest.source
        same = source.get("format") == "comfyui"
        state, metadata = pipeline_kohya_state(adapter, report)
        names = source.get(SOURCE_NAMES) or {} if same else {}
        roles = source.get(SOURCE_ROLES) if same else None
        down, up = roles if roles and all(roles) else (KOHYA_ROLES["lora_A"], KOHYA_ROLES["lora_B"])
        renamed = {}
        for key, tensor in state.items():
            name, role, _ = split_key(key)
            suffix = {"lora_A": down, "lora_B": up}.get(role, "alpha")
            renamed[f"{names.get(name, name)}.{suffix}"] = tensor
        if same:
            metadata = dict(source.get("metadata") or {})
        else:  # modules not read from ComfyUI keep kohya's names on diffusers' blocks, which ComfyUI maps too
            report.notes.append("modules not read from a ComfyUI file are written with kohya names (lora_unet_…, "
                                "lora_te…_), which ComfyUI loads")
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            save_file(renamed, str(tmp), metadata=metadata)
        return path
