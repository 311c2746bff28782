"""diffusers bases: a component directory (``diffusion_pytorch_model.safetensors`` or transformers'
``model.safetensors``, sharded or not) and a pipeline directory (``model_index.json`` + components).

A pipeline is read as one checkpoint whose parameter names are ``<component>.<parameter>``
(``unet.conv_in.weight``), the names diffusers' own LoRA files use; ``components`` gives each
component as its own :class:`DiffusersComponent` for per-component binding.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from ..errors import BaseMismatchError, InputIOError, PickleRefusedError
from .safetensors_checkpoint import INDEX_FILE, SINGLE_FILE, BaseCheckpoint, _shard_name

DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PIPELINE_INDEX = "model_index.json"
#: (index, single file) pairs a component directory may hold, diffusers' first.
COMPONENT_FILES = ((DIFFUSERS_INDEX, DIFFUSERS_FILE), (INDEX_FILE, SINGLE_FILE))


def is_component_dir(path: Path) -> bool:
    """A directory with diffusers weights (transformers-only directories stay BaseCheckpoints)."""
    return path.is_dir() and any((path / name).is_file() for name in (DIFFUSERS_FILE, DIFFUSERS_INDEX))


def is_pipeline_dir(path: Path) -> bool:
    return path.is_dir() and (path / PIPELINE_INDEX).is_file()


class DiffusersComponent(BaseCheckpoint):
    """One component of a diffusers pipeline on disk (UNet, transformer, text encoder, VAE).

    Example:
        >>> unet = DiffusersComponent("sd15/unet")  # doctest: +SKIP
        >>> unet.architecture  # doctest: +SKIP
        'UNet2DConditionModel'
    """

    def __init__(self, path: Path | str):
        self.path = self.root = Path(path)
        if not self.path.is_dir():
            raise InputIOError("component directory not found", path=self.path, hint="check the --base path")
        for index_name, single_name in COMPONENT_FILES:
            if (self.path / index_name).is_file():
                index = self._read_json(self.path / index_name)
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict):
                    raise InputIOError("index has no weight_map", path=self.path / index_name,
                                       hint="the checkpoint index is damaged")
                self._index_shards([self.path / _shard_name(f, self.path / index_name)
                                    for f in dict.fromkeys(weight_map.values())])
                return
            if (self.path / single_name).is_file():
                self._index_shards([self.path / single_name])
                return
        if any(self.path.glob("*.bin")):
            raise PickleRefusedError("component has only pickle (.bin) weights", path=self.path,
                                     hint="re-save it with save_pretrained(safe_serialization=True)")
        raise InputIOError(f"no {DIFFUSERS_FILE} or {SINGLE_FILE} (or their sharded index)", path=self.path,
                           hint="point --base at a diffusers component or pipeline directory")

    @property
    def architecture(self) -> str | None:
        # diffusers records the class as _class_name; transformers components as architectures.
        return self.config.get("_class_name") or super().architecture


class DiffusersPipeline(BaseCheckpoint):
    """A diffusers pipeline directory, read as ``<component>.<parameter>`` names.

    Example:
        >>> pipe = DiffusersPipeline("sd15")  # doctest: +SKIP
        >>> sorted(pipe.components)  # doctest: +SKIP
        ['text_encoder', 'unet']
    """

    def __init__(self, path: Path | str):
        self.path = self.root = Path(path)
        index = self._read_json(self.path / PIPELINE_INDEX)
        if not isinstance(index, dict):
            raise InputIOError(f"{PIPELINE_INDEX} is not a JSON object", path=self.path,
                               hint="the pipeline directory is damaged")
        self.index = index
        self.components: dict[str, DiffusersComponent] = {}
        for name, entry in index.items():
            # Entries are [library, class]; schedulers and tokenizers have no weights, absent ones are [null, null].
            if name.startswith("_") or not isinstance(entry, list) or None in entry:
                continue
            folder = self.path / _shard_name(name, self.path / PIPELINE_INDEX)
            if is_component_dir(folder) or any((folder / f).is_file() for f in (SINGLE_FILE, INDEX_FILE)):
                self.components[name] = DiffusersComponent(folder)
        if not self.components:
            raise InputIOError("pipeline has no component with safetensors weights", path=self.path,
                               hint="point --base at a diffusers pipeline saved with safe_serialization")
        self.shard_files = [f for c in self.components.values() for f in c.shard_files]

    @property
    def config(self) -> dict:
        return self.index

    @property
    def architecture(self) -> str | None:
        return self.index.get("_class_name")

    @cached_property
    def tied_weights(self) -> dict[str, str]:
        return {}

    def component(self, name: str) -> DiffusersComponent:
        """One component's checkpoint (a :class:`BaseMismatchError` when the pipeline has none)."""
        if name not in self.components:
            raise BaseMismatchError(f"the base pipeline has no component {name!r} "
                                    f"(it has {', '.join(sorted(self.components))})", path=self.path,
                                    hint="the adapter was made for another kind of pipeline; check --base")
        return self.components[name]

    def _split(self, name: str) -> tuple[DiffusersComponent, str]:
        component, _, inner = name.partition(".")
        if component not in self.components or not inner:
            raise BaseMismatchError(f"base pipeline has no parameter {name!r}", path=self.path,
                                    hint="names are <component>.<parameter>; check --base")
        return self.components[component], inner

    def names(self) -> list[str]:
        return [f"{c}.{n}" for c, checkpoint in self.components.items() for n in checkpoint.names()]

    def __contains__(self, name: str) -> bool:
        component, _, inner = name.partition(".")
        return component in self.components and inner in self.components[component]

    def resolve(self, name: str) -> str:
        return name

    def dtype_name(self, name: str) -> str:
        checkpoint, inner = self._split(name)
        return checkpoint.dtype_name(inner)

    def shape(self, name: str) -> list[int]:
        checkpoint, inner = self._split(name)
        return checkpoint.shape(inner)

    def get(self, name: str) -> torch.Tensor:
        checkpoint, inner = self._split(name)
        return checkpoint.get(inner)

    def fingerprint(self, name: str) -> str:
        checkpoint, inner = self._split(name)
        return checkpoint.fingerprint(inner)

    @cached_property
    def spans(self):
        return {f"{c}.{n}": span for c, checkpoint in self.components.items() for n, span in checkpoint.spans.items()}


#: Key prefixes of single-file checkpoints as published (original LDM / SGM / BFL layouts).
SINGLE_FILE_MARKERS = {"model.diffusion_model.": "SD 1.x/2.x/SDXL (LDM/SGM layout)",
                       "conditioner.embedders.": "SDXL (SGM layout)",
                       "cond_stage_model.": "SD 1.x/2.x (LDM layout)",
                       "double_blocks.": "Flux (BFL layout)"}


def single_file_layout(checkpoint: BaseCheckpoint) -> str | None:
    """The original layout a single-file checkpoint uses, or None for diffusers/transformers names."""
    names = checkpoint.names()
    return next((layout for prefix, layout in SINGLE_FILE_MARKERS.items()
                 if any(n.startswith(prefix) for n in names)), None)
