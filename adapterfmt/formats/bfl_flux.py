"""BFL-layout Flux LoRA files (BFL's own, ai-toolkit, ComfyUI): dotted original module names,
``[diffusion_model.]double_blocks.N.img_attn.qkv.lora_A.weight`` (or ``lora_down``/``lora_up``) with
optional ``.alpha``; CLIP-L under ``text_encoders.clip_l.transformer.``.

Read and written by flux_lora.py: fused qkv / linear1 split exactly into diffusers' modules and
fused back; files read here come back bit-for-bit (names, role spelling, alpha layout, header).
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_file
from ..errors import UsageError
from ..format import Adapter
from ._files import load_safetensors
from .base import AdapterFormat
from .flux_keys import COMFY_TE, module_names
from .flux_names import COMFY_UNET, flux_table
from .flux_lora import flux_state, read_flux_state, refuse_single_model


def _dotted_flux_name(name: str) -> bool:
    bare = name.removeprefix(COMFY_UNET)
    return bare in flux_table().parts or name.startswith(COMFY_TE)


class BflFluxFormat(AdapterFormat):
    name = "bfl"
    summary = "Flux LoRA in BFL's layout ([diffusion_model.]double_blocks.N.img_attn.qkv.lora_A/B; ComfyUI, ai-toolkit)"
    priority = 29
    suffixes = (".safetensors",)
    writes_methods = ("lora",)

    def detect(self, path: Path) -> bool:
        names = module_names(path)
        # One Flux transformer name in BFL spelling claims the file; the reader refuses the rest by name.
        return any(_dotted_flux_name(n) and not n.startswith(COMFY_TE) for n in names)

    def read(self, path: Path, options, report) -> Adapter:
        state, metadata = load_safetensors(path)
        return read_flux_state(state, metadata, options.base, path, report, "bfl")

    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        if not adapter.manifest.components:
            refuse_single_model(adapter, "BFL-layout files hold Flux pipeline LoRAs",
                                "read the source with --base pointing at the Flux pipeline; for LLMs use --to peft")
        if "transformer" not in adapter.manifest.components:
            raise UsageError("BFL-layout files hold Flux LoRAs; this adapter has no transformer component",
                             hint="for SD 1.x/SDXL use --to comfyui or --to kohya")
        state, metadata = flux_state(adapter, report, "bfl")
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        return path
