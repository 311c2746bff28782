"""Read-only, lazy access to a transformers checkpoint on disk (single file or index + shards).

Local paths only: ``hf://`` specs are resolved by the ops layer before they get here.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..jsonio import read_json_file
from ..errors import BaseMismatchError, InputIOError, PickleRefusedError
from ..format.tensorio import TensorSpan, read_spans, span_fingerprint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _shard_name(name, index: Path) -> str:
    # A hostile index must not make us read files outside the model directory.
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise InputIOError(f"shard name {name!r} is not a file name in the model directory", path=index,
                           hint="the checkpoint index is damaged or hostile")
    return name


class BaseCheckpoint:
    """A base model on disk, read tensor by tensor through memory maps.

    Example:
        >>> base = BaseCheckpoint("tiny-llama")  # doctest: +SKIP
        >>> base.shape("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
        [64, 64]
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise InputIOError("base model not found", path=self.path, hint="check the --base path")
        if self.path.is_file():
            self.root, shard_files = self.path.parent, [self.path]
        elif (self.path / INDEX_FILE).is_file():
            self.root = self.path
            index = self._read_json(self.path / INDEX_FILE)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise InputIOError("index has no weight_map", path=self.path / INDEX_FILE,
                                   hint="the checkpoint index is damaged")
            shard_files = [self.path / _shard_name(f, self.path / INDEX_FILE)
                           for f in dict.fromkeys(weight_map.values())]
        elif (self.path / SINGLE_FILE).is_file():
            self.root, shard_files = self.path, [self.path / SINGLE_FILE]
        elif any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise PickleRefusedError("base model has only pickle (.bin/.pt) weights", path=self.path,
                                     hint="convert it to safetensors first (transformers save_pretrained "
                                          "with safe_serialization=True)")
        else:
            raise InputIOError(f"no {SINGLE_FILE} or {INDEX_FILE}", path=self.path,
                               hint="point --base at a transformers model directory")
        self._index_shards(shard_files)

    def _index_shards(self, shard_files: list[Path]) -> None:
        """Open every shard and record where each tensor is, its dtype and shape (no data read)."""
        self.shard_files = shard_files
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[str, list[int]]] = {}
        for shard in shard_files:
            handle = self._open(shard)
            for name in handle.keys():
                if name in self._where:
                    # Last-wins would merge into one copy and write a model whose index disagrees.
                    raise InputIOError(f"tensor {name!r} is in two shards ({self._where[name].name}, "
                                       f"{shard.name})", path=self.path, hint="the checkpoint is damaged")
                sl = handle.get_slice(name)
                self._where[name] = shard
                self._info[name] = (sl.get_dtype(), list(sl.get_shape()))

    @staticmethod
    def _read_json(path: Path):
        return read_json_file(path, what="file", error=InputIOError, expect_object=False)

    def _open(self, shard: Path):
        if shard not in self._handles:
            if not shard.is_file():
                raise InputIOError("shard listed in the index is missing", path=shard,
                                   hint="the checkpoint is incomplete; re-download it")
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise InputIOError(f"not a readable safetensors file ({exc})", path=shard,
                                   hint="the checkpoint is damaged; re-download it") from None
        return self._handles[shard]

    @cached_property
    def config(self) -> dict:
        cfg = self.root / "config.json"
        return self._read_json(cfg) if cfg.is_file() else {}

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or [None]
        return archs[0]

    @property
    def name_or_path(self) -> str:
        return self.config.get("_name_or_path") or str(self.path)

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info or name in self.tied_weights or name in self.renamed_keys

    @cached_property
    def _meta_model(self):
        """The config's architecture built on the meta device (no weights), or None when transformers
        does not know it. Source of the tie table and the checkpoint key renamings below."""
        arch = self.architecture
        if not arch or not (self.root / "config.json").is_file():
            return None
        try:
            import torch
            import transformers
            from transformers import AutoConfig
            model_class = getattr(transformers, arch, None)
            if model_class is None:
                return None
            config = AutoConfig.from_pretrained(str(self.root), local_files_only=True)
            with torch.device("meta"):
                return model_class(config)
        except Exception:  # an unknown or custom architecture: no ties or renamings known
            return None

    @cached_property
    def tied_weights(self) -> dict[str, str]:
        """Weights the model ties but the files store once: {alias: stored source}, e.g.
        ``{"lm_head.weight": "model.embed_tokens.weight"}`` (transformers' own tie table)."""
        tied = dict(getattr(self._meta_model, "all_tied_weights_keys", None) or {})
        return {alias: self.renamed_keys.get(source, source) for alias, source in tied.items()
                if alias not in self._info and self.renamed_keys.get(source, source) in self._info}

    @cached_property
    def renamed_keys(self) -> dict[str, str]:
        """{parameter name in the live model: stored key} for keys transformers renames on load (ViT's
        ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj`` in transformers 5).
        Pure renamings only, from transformers' own conversion mapping; keys that a converter merges
        or splits get no alias (binding them is refused by name)."""
        model = self._meta_model
        if model is None:
            return {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, rename_source_key
            transforms = get_model_conversion_mapping(model)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
            meta = model.state_dict()
            out = {}
            for key in self._info:
                live, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
                if converter is None and live != key and live not in self._info:
                    out[live] = key
            return out
        except Exception:  # an older transformers without conversion mappings: names are stored as live
            return {}

    def stored_key(self, name: str) -> str:
        """The stored key a live parameter name is saved under (itself when not renamed)."""
        return name if name in self._info else self.renamed_keys.get(name, name)

    def resolve(self, name: str) -> str:
        """The stored tensor that holds ``name`` (itself, its renamed stored key, or a tied alias' source)."""
        if name in self._info:
            return name
        return self.renamed_keys.get(name) or self.tied_weights.get(name, name)

    def dtype_name(self, name: str) -> str:
        return self._require(name)[0]

    def shape(self, name: str) -> list[int]:
        return self._require(name)[1]

    def _require(self, name: str) -> tuple[str, list[int]]:
        try:
            return self._info[self.resolve(name)]
        except KeyError:
            raise BaseMismatchError(f"base model has no parameter {name!r}", path=self.path,
                                    hint="the adapter was made for a different model; check --base") from None

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a copy from the memory map)."""
        self._require(name)
        name = self.resolve(name)
        return self._open(self._where[name]).get_tensor(name)

    @cached_property
    def spans(self) -> dict[str, TensorSpan]:
        """Every tensor's byte span (from the shard headers; no data read)."""
        spans: dict[str, TensorSpan] = {}
        for shard in self.shard_files:
            spans.update(read_spans(shard)[0])
        return spans

    def fingerprint(self, name: str) -> str:
        """The tensor's fingerprint, touching only the sampled pages (not the whole tensor)."""
        self._require(name)
        return span_fingerprint(self.spans[self.resolve(name)])
