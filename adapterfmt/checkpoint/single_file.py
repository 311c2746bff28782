"""Single-file SD 1.x / SD 2.x / SDXL checkpoints (original LDM/SGM key layout) read as a pipeline with
diffusers' names.

The mapping is diffusers' own (``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), run on probes (single_file_map.py):
what diffusers does with each probe says which stored rows each diffusers weight is, including the
q/k/v row slices of OpenCLIP's fused ``in_proj_weight`` (SDXL ``text_encoder_2``, SD 2.x text encoder).
Weights diffusers computes or transposes (OpenCLIP's ``text_projection``) are not placed and are refused
by name when an adapter needs them. Flux files (BFL layout) are mapped by single_file_flux.py (diffusers'
Flux converter on a FLUX.1-sized probe, rows scaled back to the file's).
"""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import BaseMismatchError, InputIOError
from ..format.fingerprint import tensor_fingerprint
from .diffusers_checkpoint import DiffusersPipeline
from .safetensors_checkpoint import BaseCheckpoint
from .single_file_flux import flux_keys, flux_transformer_map
from .single_file_map import Probe, ProbeMap, Source

UNET_PREFIX = "model.diffusion_model."
#: OpenCLIP text encoders: stored prefix -> the pipeline component diffusers loads it as.
OPEN_CLIP = {"conditioner.embedders.1.model.": "text_encoder_2", "cond_stage_model.model.": "text_encoder"}
_LAYER = re.compile(r"\.resblocks\.(\d+)\.")


class SingleFileComponent(BaseCheckpoint):
    """One component of a single-file checkpoint, addressed by diffusers' names.

    Example:
        >>> unet = SingleFilePipeline("sd15.safetensors").components["unet"]  # doctest: +SKIP
        >>> unet.shape("conv_in.weight")  # doctest: +SKIP
        [320, 4, 3, 3]
    """

    def __init__(self, stored: BaseCheckpoint, probe_map: ProbeMap, architecture: str, config: dict):
        self.path, self.root, self._stored = stored.path, stored.root, stored
        self.sources, self.unplaced = probe_map.placed, probe_map.unplaced
        self._architecture, self._config = architecture, config
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
        return list(self.sources)

    def _key(self, name: str) -> str | None:
        # transformers 5's CLIPTextModel has no 'text_model.' prefix: both spellings name the same weight.
        return next((c for c in (name, f"text_model.{name}") if c in self.sources), None)

    def source(self, name: str) -> Source:
        """Where ``name`` is stored (a :class:`BaseMismatchError` naming it when nowhere exactly)."""
        key = self._key(name)
        if key is None:
            why = self.unplaced.get(name) or self.unplaced.get(f"text_model.{name}")
            raise BaseMismatchError(f"the single-file base has no stored tensor for {name!r}"
                                    + (f": {why}" if why else ""), path=self.path,
                                    hint="the adapter was made for a different model, or pass the diffusers "
                                         "pipeline directory as --base")
        return self.sources[key]

    def resolve(self, name: str) -> str:
        key = self._key(name)
        return self.sources[key].stored if key else name

    def __contains__(self, name: str) -> bool:
        return self._key(name) is not None

    def _require(self, name: str):
        source = self.source(name)
        return self._stored._info[source.stored][0], list(source.shape)

    def get(self, name: str) -> torch.Tensor:
        source = self.source(name)
        return source.take(self._stored.get(source.stored)).clone()

    def fingerprint(self, name: str) -> str:
        source = self.source(name)
        if source.whole and list(source.shape) == self._stored.shape(source.stored):
            return self._stored.fingerprint(source.stored)  # samples pages only
        return tensor_fingerprint(self.get(name))

    @cached_property
    def spans(self):
        return {name: self._stored.spans[s.stored] for name, s in self.sources.items()
                if s.whole and list(s.shape) == self._stored.shape(s.stored)}


class SingleFilePipeline(DiffusersPipeline):
    """A single-file checkpoint as a pipeline: ``unet``, ``text_encoder`` (and SDXL's ``text_encoder_2``)
    with diffusers' names.

    Example:
        >>> pipe = SingleFilePipeline("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
        >>> sorted(pipe.components)  # doctest: +SKIP
        ['text_encoder', 'unet']
    """

    def __init__(self, path: Path | str, stored: BaseCheckpoint | None = None):
        stored = stored or BaseCheckpoint(path)
        self.path, self.root, self.stored = stored.path, stored.root, stored
        names = stored.names()
        shapes = {n: tuple(stored.shape(n)) for n in names}
        if flux_keys(names):  # BFL layout: the Flux transformer only (single_file_flux.py)
            self.index = {"_class_name": "single-file checkpoint (Flux, BFL layout)"}
            maps = {"transformer": flux_transformer_map(shapes, self.path)}
        else:
            self.index = {"_class_name": "single-file checkpoint (LDM/SGM layout)"}
            maps = _component_maps(Probe(shapes), names)
        self.components = {name: SingleFileComponent(stored, probe_map, architecture, config)
                           for name, (probe_map, architecture, config) in maps.items()}
        if not self.components:
            raise InputIOError("no UNet or CLIP text encoder found in the single-file checkpoint", path=self.path,
                               hint="pass a diffusers pipeline directory as --base")
        self.shard_files = stored.shard_files


def _component_maps(probe: Probe, names: list[str]) -> dict[str, tuple[ProbeMap, str, dict]]:
    """{component: (probe map, architecture, config)} for every component diffusers finds in the file."""
    from diffusers.loaders import single_file_utils as sfu
    maps = {}
    unet_config = _unet_config(names)
    if unet_config:
        maps["unet"] = (probe.run(lambda sd: sfu.convert_ldm_unet_checkpoint(sd, unet_config)),
                        "UNet2DConditionModel", unet_config)
    text = probe.run(sfu.convert_ldm_clip_checkpoint)
    if text.placed:
        maps["text_encoder"] = (text, "CLIPTextModel", {})
    for prefix, component in OPEN_CLIP.items():
        keys = [n for n in names if n.startswith(prefix)]
        if keys:
            maps[component] = (_open_clip_map(probe, keys, prefix), "CLIPTextModelWithProjection"
                               if component == "text_encoder_2" else "CLIPTextModel", {})
    return maps


def _open_clip_map(probe: Probe, keys: list[str], prefix: str) -> ProbeMap:
    """diffusers' OpenCLIP conversion run one residual block at a time: its q/k/v slices are copies
    (``.clone()``), so one block's probes at once keep the memory small."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    # Without text_projection (SD 2.x: diffusers ignores it) diffusers splits in_proj by the model
    # config's hidden_size, which is the token embedding's width.
    token = probe.shapes.get(f"{prefix}token_embedding.weight")
    model = SimpleNamespace(config=SimpleNamespace(**({"hidden_size": token[1]} if token else {})))
    shared = [k for k in keys if not _LAYER.search(k)]
    layers: dict[str, list[str]] = {}
    for key in keys:
        if (match := _LAYER.search(key)):
            layers.setdefault(match[1], []).append(key)
    result = ProbeMap({}, {})
    for group in [[]] + list(layers.values()):
        part = probe.run(lambda sd: convert_open_clip_checkpoint(model, sd, prefix=prefix), shared + group)
        result.placed.update(part.placed)
        result.unplaced.update(part.unplaced)
    return result


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
