"""Single-file SD 1.x / SDXL checkpoints (original LDM/SGM key layout) read as a pipeline with diffusers' names.

The mapping is diffusers' own (``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``), run on placeholders instead of tensors: each placeholder carries its
stored name, so where diffusers puts it says which stored tensor a diffusers name is. Only names
diffusers maps one to one are addressable: SDXL's OpenCLIP encoder (fused qkv) is left out and refused
by name when an adapter needs it; Flux files (BFL, fused qkv) are refused: their diffusers weights are
slices of stored tensors.
"""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import torch

from ..errors import BaseMismatchError, InputIOError
from .diffusers_checkpoint import DiffusersPipeline
from .safetensors_checkpoint import BaseCheckpoint

UNET_PREFIX = "model.diffusion_model."
#: Layouts whose diffusers weights are not stored tensors one to one (the whole file is refused).
NOT_ONE_TO_ONE = {"double_blocks.": "Flux (BFL layout, fused qkv)"}
#: Components left out of an otherwise readable file: stored prefix -> (component, why).
LEFT_OUT = {"conditioner.embedders.1.model.": ("text_encoder_2", "SDXL's OpenCLIP text encoder stores q/k/v fused "
                                                                 "(in_proj_weight), not one to one")}


class _Stored:
    """A placeholder for one stored tensor: diffusers' conversion moves it, we read where it went."""

    def __init__(self, name: str):
        self.name = name


class SingleFileComponent(BaseCheckpoint):
    """One component of a single-file checkpoint, addressed by diffusers' names.

    Example:
        >>> unet = SingleFilePipeline("sd15.safetensors").components["unet"]  # doctest: +SKIP
        >>> unet.shape("conv_in.weight")  # doctest: +SKIP
        [320, 4, 3, 3]
    """

    def __init__(self, stored: BaseCheckpoint, names: dict[str, str], architecture: str, config: dict):
        self.path, self.root, self._stored = stored.path, stored.root, stored
        self._names, self._architecture, self._config = names, architecture, config
        self.shard_files = stored.shard_files

    @property
    def config(self) -> dict:
        return self._config

    @property
    def architecture(self) -> str | None:
        return self._architecture

    @cached_property
    def tied_weights(self) -> dict[str, str]:
        return {}

    def names(self) -> list[str]:
        return list(self._names)

    def resolve(self, name: str) -> str:
        # transformers 5's CLIPTextModel has no 'text_model.' prefix: both spellings name the same weight.
        for candidate in (name, f"text_model.{name}"):
            if candidate in self._names:
                return self._names[candidate]
        return name

    def __contains__(self, name: str) -> bool:
        return name in self._names or f"text_model.{name}" in self._names

    def _require(self, name: str):
        if name not in self:
            raise BaseMismatchError(f"base model has no parameter {name!r}", path=self.path,
                                    hint="the adapter was made for a different model; check --base")
        return self._stored._info[self.resolve(name)]

    def get(self, name: str) -> torch.Tensor:
        self._require(name)
        return self._stored.get(self.resolve(name))

    def fingerprint(self, name: str) -> str:
        self._require(name)
        return self._stored.fingerprint(self.resolve(name))

    @cached_property
    def spans(self):
        return {name: self._stored.spans[stored] for name, stored in self._names.items()}


class SingleFilePipeline(DiffusersPipeline):
    """A single-file SD 1.x checkpoint as a pipeline: ``unet`` and ``text_encoder`` with diffusers' names.

    Example:
        >>> pipe = SingleFilePipeline("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
        >>> sorted(pipe.components)  # doctest: +SKIP
        ['text_encoder', 'unet']
    """

    def __init__(self, path: Path | str, stored: BaseCheckpoint | None = None):
        stored = stored or BaseCheckpoint(path)
        self.path, self.root = stored.path, stored.root
        names = stored.names()
        for prefix, what in NOT_ONE_TO_ONE.items():
            if any(n.startswith(prefix) for n in names):
                raise InputIOError(f"single-file checkpoints with {what} are not supported as a base yet",
                                   path=self.path, hint="load it with diffusers' from_single_file(...) and "
                                                        "save_pretrained() it, then pass that directory as --base")
        self.left_out = {component: why for prefix, (component, why) in LEFT_OUT.items()
                         if any(n.startswith(prefix) for n in names)}
        self.index = {"_class_name": "single-file checkpoint (LDM/SGM layout)"}
        placeholders = {n: _Stored(n) for n in names}
        self.components = {}
        unet_config = _unet_config(names)
        if unet_config:
            from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
            self.components["unet"] = SingleFileComponent(
                stored, _moved(convert_ldm_unet_checkpoint(placeholders, unet_config)), "UNet2DConditionModel",
                unet_config)
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        text = _moved(convert_ldm_clip_checkpoint(placeholders))
        if text:
            self.components["text_encoder"] = SingleFileComponent(stored, text, "CLIPTextModel", {})
        if not self.components:
            raise InputIOError("no UNet or CLIP text encoder found in the single-file checkpoint", path=self.path,
                               hint="pass a diffusers pipeline directory as --base")
        self.shard_files = stored.shard_files

    def component(self, name: str):
        if name in self.left_out:
            raise BaseMismatchError(f"the single-file base's {name} cannot be used: {self.left_out[name]}",
                                    path=self.path, hint="pass the diffusers pipeline directory as --base "
                                                         "(from_single_file(...).save_pretrained() makes one)")
        return super().component(name)


def _moved(converted: dict) -> dict[str, str]:
    """{diffusers name: stored name} for the entries diffusers moved unchanged."""
    return {new: old.name for new, old in converted.items() if isinstance(old, _Stored)}


def _unet_config(names: list[str]) -> dict | None:
    """What ``convert_ldm_unet_checkpoint`` needs of the UNet config, read off the stored names:
    the first downsampler (``input_blocks.<lpb+1>.0.op``) gives ``layers_per_block``."""
    ops = sorted(int(m[1]) for n in names if (m := re.match(rf"^{re.escape(UNET_PREFIX)}input_blocks\.(\d+)\.0\.op\.", n)))
    if not ops:
        return None
    config = {"layers_per_block": ops[0] - 1}
    if f"{UNET_PREFIX}label_emb.0.0.weight" in names:
        config["addition_embed_type"] = "text_time"
    return config
