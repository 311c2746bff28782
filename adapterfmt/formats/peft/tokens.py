"""PEFT trainable tokens (``LoraConfig(trainable_token_indices=...)`` and ``TrainableTokensConfig``)
<-> adapterfmt ``trainable_tokens`` modules.

PEFT saves the trained rows only (``<module>.token_adapter.trainable_tokens_delta`` beside LoRA,
``<module>.trainable_tokens_delta`` for the standalone tuner; despite the name they are the new
values, not deltas); the indices live in the config. The vocabulary size is in neither, so the import
needs the base (``--base``). On a base whose output head is tied to the input embedding, PEFT ties
the head's rows to the embedding's (the standalone tuner even saves an identical copy for the head):
the copy is not stored again, and the merge keeps the tie (``changes_tied_uses``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...conversion_report import LOSSLESS
from ...errors import AdapterFmtError, ForeignFormatError, UsageError
from ...format import Adapter, BaseWeight, Manifest, ModuleEntry
from ...methods.descriptor import tensor_refs
from ...methods.trainable_tokens import check_indices, trainable_tokens_params
from .config import MODULE_NAME_RE, PREFIX

LORA_LEAF = ".token_adapter.trainable_tokens_delta"
TUNER_LEAF = ".trainable_tokens_delta"
METHOD = "trainable_tokens"
#: Module names (last part) of input embeddings, whose stored rows are the canonical columns
#: (``nn.Embedding``, fan_in_fan_out); any other targeted module is a Linear (an output head).
EMBEDDING_NAME = re.compile(r"^(.*embed.*|wte|word_embeddings|tok_embeddings|shared)$")


def split_token_rows(state: dict[str, torch.Tensor], leaf: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state without the trained-rows keys, {module: rows}).

    Example:
        >>> split_token_rows({"base_model.model.e.token_adapter.trainable_tokens_delta": 1}, LORA_LEAF)
        ({}, {'e': 1})
    """
    rest, rows = {}, {}
    for key, tensor in state.items():
        if key.startswith(PREFIX) and key.endswith(leaf):
            rows[key[len(PREFIX):-len(leaf)]] = tensor
        else:
            rest[key] = tensor
    return rest, rows


def lora_token_indices(config: dict[str, Any], modules: list[str], path: Path) -> dict[str, list[int]]:
    """{saved module: indices} from ``trainable_token_indices`` (a list: the input embedding's; a dict:
    keys matched as suffixes of the module names, as PEFT's ``_set_trainable`` matches them)."""
    spec = config.get("trainable_token_indices")
    if not modules:
        return {}
    if isinstance(spec, list):
        embeddings = [m for m in modules if EMBEDDING_NAME.match(m.rsplit(".", 1)[-1])]
        if len(embeddings) != 1:
            raise ForeignFormatError(f"trainable_token_indices is a list but rows are saved for {modules}",
                                     path=path, hint="the config does not match the weights")
        return {embeddings[0]: spec}
    if not isinstance(spec, dict):
        raise ForeignFormatError(f"trained token rows saved for {modules} but trainable_token_indices is {spec!r}",
                                 path=path, hint="the config does not match the weights")
    found = {}
    for module in modules:
        keys = [k for k in spec if module == k or module.endswith("." + k)]
        if len(keys) != 1:
            raise ForeignFormatError(f"trained token rows of {module!r} match {len(keys)} trainable_token_indices "
                                     "key(s)", path=path, hint="the config does not match the weights")
        found[module] = spec[keys[0]]
    return found


def add_token_modules(manifest: Manifest, tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor],
                      indices: dict[str, list[int]], base, path: Path, report) -> None:
    """One ``trainable_tokens`` module per saved module; the head's copy of tied rows is not stored twice."""
    for module in sorted(drop_tied_copies(rows, indices, base, report)):
        params, role_tensors, layer, fan, shape = token_module(module, rows[module], indices[module], base, path)
        refs = tensor_refs(module, role_tensors)
        tensors.update({refs[role].name: t for role, t in role_tensors.items()})
        manifest.modules[module] = ModuleEntry(method=METHOD, base_weight=f"{module}.weight", shape=list(shape),
                                               params=params, tensors=refs, fan_in_fan_out=fan, layer=layer)
        manifest.base.weights[f"{module}.weight"] = BaseWeight(shape=list(reversed(shape)) if fan else list(shape))
        report.add(module, LOSSLESS, f"{len(indices[module])} trained token row(s)")


def drop_tied_copies(rows: dict[str, torch.Tensor], indices: dict[str, list[int]], base, report
                     ) -> dict[str, torch.Tensor]:
    """``rows`` without PEFT's copies for a head tied (in the base) to a saved embedding: same indices and bits."""
    kept = {}
    for module, values in rows.items():
        if _tied_copy(module, rows, indices, base):
            report.notes.append(f"{module}: tied to the input embedding in the base; PEFT's copy of its trained "
                                "rows equals the embedding's and is not stored again (the merge keeps the tie)")
        else:
            kept[module] = values
    return kept


def token_module(module: str, values: torch.Tensor, index, base, path: Path):
    """(params, role tensors, layer, fan_in_fan_out, canonical shape) of one trainable-tokens module."""
    _check_saved(module, values, index, path)
    layer, (tokens, width) = _layer_of(module, base, path)
    if values.shape[1] != width:
        raise ForeignFormatError(f"{module}: trained rows are {values.shape[1]} wide but the base's rows are "
                                 f"{width}", path=path, hint="pass the base this adapter belongs to")
    index_tensor = torch.tensor(index, dtype=torch.int64)
    try:
        check_indices(module, index_tensor, tokens)
    except AdapterFmtError as exc:
        raise ForeignFormatError(exc.message, path=path, hint="pass the base this adapter belongs to") from None
    fan = layer == "embedding"
    roles = {"indices": index_tensor, "values": values.contiguous()}
    return trainable_tokens_params(len(index)), roles, layer, fan, ((width, tokens) if fan else (tokens, width))


def _check_saved(module: str, values: torch.Tensor, index, path: Path) -> None:
    if not MODULE_NAME_RE.match(module):
        raise ForeignFormatError(f"module name {module!r} is not a dotted parameter name", path=path,
                                 hint="the state dict is damaged or hostile")
    if not isinstance(index, list) or not index or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in index):
        raise ForeignFormatError(f"{module}: token indices {index!r} are not a non-empty list of integers",
                                 path=path, hint="the config is damaged")
    if values.dim() != 2 or values.shape[0] != len(index) or not values.is_floating_point():
        raise ForeignFormatError(f"{module}: trained rows {list(values.shape)} ({values.dtype}) do not match "
                                 f"{len(index)} token indices", path=path, hint="the config does not match the weights")


def _tied_copy(module: str, rows, indices, base) -> bool:
    """Whether ``module``'s rows are PEFT's copy for a head tied to a saved embedding (same indices and bits)."""
    source = (base.tied_weights.get(f"{module}.weight") if base is not None else None) or ""
    owner = source[:-len(".weight")] if source.endswith(".weight") else None
    return owner in rows and indices[owner] == indices[module] and rows[owner].dtype == rows[module].dtype \
        and torch.equal(rows[owner], rows[module])


def _layer_of(module: str, base, path: Path) -> tuple[str, tuple[int, int]]:
    """(layer kind, (tokens, row width)) of a module's base weight as stored; needs the base."""
    name = f"{module}.weight"
    if base is None:
        raise ForeignFormatError(f"trainable tokens on {module!r}: the saved rows give only the row width, not "
                                 "the vocabulary size", path=path,
                                 hint="pass --base BASE (the model the adapter was trained on)")
    if name not in base:
        raise ForeignFormatError(f"the base has no {name!r}", path=path, hint="pass the base this adapter belongs to")
    shape = base.shape(name)
    if len(shape) != 2:
        raise ForeignFormatError(f"{name!r} has shape {shape}; trainable tokens replace rows of a 2-D weight",
                                 path=path, hint="pass the base this adapter belongs to")
    layer = "embedding" if EMBEDDING_NAME.match(module.rsplit(".", 1)[-1]) else "linear"
    return layer, (shape[0], shape[1])


def token_state(adapter: Adapter, leaf: str) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """({module: indices}, PEFT state) of the adapter's ``trainable_tokens`` modules.

    Example:
        >>> token_state(adapter, LORA_LEAF)  # doctest: +SKIP
        ({'model.embed_tokens': [1, 5]}, {'base_model.model.model.embed_tokens.token_adapter...': ...})
    """
    indices, state = {}, {}
    for target, entry in adapter.manifest.modules.items():
        if entry.method != METHOD:
            continue
        if entry.base_weight != f"{target}.weight":
            raise UsageError(f"module {target!r} replaces rows of {entry.base_weight!r} under another name; PEFT keys "
                             "trainable tokens by module name", hint="keep the adapterfmt file, or merge it")
        tensors = adapter.module_tensors(target)
        indices[target] = [int(i) for i in tensors["indices"].tolist()]
        state[f"{PREFIX}{target}{leaf}"] = tensors["values"].contiguous()
    return indices, state
