"""MLX-LM adapters: a directory with ``adapters.safetensors`` and ``adapter_config.json``.

mlx-lm stores ``lora_a`` (in, r) and ``lora_b`` (r, out), the transposes of PEFT's A and B, and
applies ``x @ lora_a @ lora_b * scale`` with ONE absolute ``scale`` and ONE ``rank`` for the whole
model (``lora_parameters``), on the last ``num_layers`` blocks, to the block-relative ``keys``, plus
top-level modules (embeddings, ``lm_head``) named by their full path in ``keys``. Weights are named by
mlx-lm's module paths: ``_mlx_architectures`` maps them to and from the Hugging Face names per
architecture and refuses what mlx-lm's model cannot hold (tied heads, unknown layers, OPT...).
DoRA adds ``.m`` (out,), the row norm target, the same semantics as PEFT's magnitude.
Export folds per-module scale differences into B (fp32 unless exact, see ``fold_to_global``) and
zero-pads lower ranks to the global rank (exact: the padding adds zero terms); the true ranks and
the architecture are kept in ``adapter_config.json`` under ``adapterfmt`` (mlx-lm ignores unknown
keys) so the way back trims the padding and restores the Hugging Face names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory
from ._files import load_safetensors
from ..jsonio import read_json_file
from ..errors import ForeignFormatError, LossyConversionError, UsageError
from ..methods.dora import require_peft_axis
from ..format import Adapter, Manifest
from ..format.dtypes import dtype_name
from ..conversion_report import LOSSLESS
from ._mlx_architectures import (CONV1D, EMBEDDING, LINEAR, MLX_ARCHITECTURES, MlxArchitecture, MlxPlace,
                                 find_architecture, hf_module_of, layer_count, place_in_mlx)
from ._lowrank import (add_lowrank_module, drop_base_copies, cast_exactly, fold_to_global, known_base_config, lora_params_exact,
                      most_common, require_linear, store_dtype)
from pydantic import Field

from .base import AdapterFormat, FormatOptions

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
BLOCK_RE = re.compile(r"^(?P<stack>.+\.layers)\.(?P<index>\d+)\.(?P<key>.+)$")
KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<role>lora_a|lora_b|m)$")


class MlxWriteOptions(FormatOptions):
    dtype: Literal["f32", "f16", "bf16", "keep"] | None = Field(
        default=None, description="Stored dtype of the factors (f32|f16|bf16|keep; default keep).")


class MlxFormat(AdapterFormat):
    write_options = MlxWriteOptions
    name = "mlx"
    summary = "MLX-LM adapter directory (adapters.safetensors + adapter_config.json; transposed, absolute scale)"
    priority = 15  # before PEFT: both directories hold an adapter_config.json
    writes_methods = ("lora", "dora")

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()

    # ---------------------------------------------------------------- reading
    def read(self, path: Path, options, report) -> Adapter:
        config = read_json_file(path / CONFIG_FILE)
        rank, scale, kind = _lora_parameters(config, path)
        ours = config.get("adapterfmt") or {}
        true_ranks = ours.get("ranks") or {} if isinstance(ours, dict) else None
        if not isinstance(config.get("model"), (str, type(None))):
            raise ForeignFormatError(f"field model must be a string, got {config['model']!r}", path=path / CONFIG_FILE,
                                     hint="the config is damaged")
        if not isinstance(true_ranks, dict):
            raise ForeignFormatError("field adapterfmt must be an object with an object 'ranks'",
                                     path=path / CONFIG_FILE, hint="the config is damaged")
        base_config = getattr(options.base, "config", None) or {}
        arch_name = (base_config.get("architectures") or [None])[0] or ours.get("architecture")
        arch = MLX_ARCHITECTURES.get(arch_name)
        grouped = _read_weights(path)
        manifest, tensors = Manifest(), {}
        for module, parts in sorted(grouped.items()):
            want = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
            if set(parts) != want:
                raise ForeignFormatError(f"module {module!r} has {sorted(parts)}, expected {sorted(want)}",
                                         path=path / WEIGHTS_FILE, hint="contains incompatible tensors")
            a, b = parts["lora_a"], parts["lora_b"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != rank or b.shape[0] != rank:
                raise ForeignFormatError(f"module {module!r}: lora_a {list(a.shape)}, lora_b {list(b.shape)} do not "
                                         f"fit rank {rank} (in, r)/(r, out)", path=path / WEIGHTS_FILE,
                                         hint="contains incompatible tensors (MoE/switch layers are not supported)")
            target, layer = _hf_module(module, arch, arch_name, path)
            if kind == "dora" and layer == EMBEDDING:
                raise ForeignFormatError(f"module {module!r}: mlx-lm's DoRAEmbedding keeps one magnitude per token; "
                                         "PEFT's DoRA embedding (and ours) one per dimension", path=path / WEIGHTS_FILE,
                                         hint="DoRA embeddings from mlx-lm cannot be converted exactly")
            r = _trimmed_rank(module, a, b, true_ranks.get(module), rank, report)
            # mlx-lm's LoRAEmbedding: lora_a (vocab, r), lora_b (r, dims): the same transposes as a Linear.
            add_lowrank_module(manifest, tensors, target, a[:, :r].t(), b[:r].t(), lora_params_exact(r, scale),
                               layer=layer, magnitude=parts.get("m"))
            report.add(target, LOSSLESS, "" if target == module else f"mlx-lm name {module}")
        if not manifest.modules:
            raise ForeignFormatError("no LoRA tensors found", path=path / WEIGHTS_FILE, hint="the adapter is empty")
        manifest.base.name_or_path = config.get("model")
        manifest.base.architecture = arch_name if arch else None
        manifest.source = {"format": "mlx", "config": {k: config[k] for k in
                                                       ("fine_tune_type", "num_layers", "lora_parameters") if k in config}}
        return Adapter(manifest=manifest, tensors=tensors)

    # ---------------------------------------------------------------- writing
    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        """Write mlx-lm's adapter directory; ``dtype`` (f32|f16|bf16|keep) sets the stored factors' dtype.

        Example:
            >>> MlxFormat().write(adapter, Path("mlx-adapter"), report, WriteOptions())  # doctest: +SKIP
        """
        settings = _settings(options)
        require_linear(adapter, "MLX-LM", report, settings.base, (LINEAR, CONV1D, EMBEDDING), payloads=False)
        methods = set(adapter.manifest.methods())
        if len(methods) != 1:
            raise UsageError(f"MLX-LM has one fine_tune_type, but the adapter mixes {sorted(methods)}",
                             hint="export LoRA and DoRA modules as separate adapters")
        config = known_base_config(adapter, settings.base)
        places, num_layers = mlx_layout(adapter, settings.base)
        drop_base_copies(adapter, "MLX-LM", report, settings.base)  # after the tie checks, which explain more
        scale = most_common([float(e.params["scale"]) for e in adapter.manifest.modules.values()])
        factors = fold_to_global(adapter, report, lambda e: scale,
                                 lambda e: "rsLoRA expressed as an absolute scale" if e.params["use_rslora"] else "",
                                 dtype=_dtype_rule(settings.dtype), strict=settings.strict)
        state, ranks = _mlx_state(adapter, factors, places, settings, report)
        config_out: dict[str, Any] = {
            "fine_tune_type": methods.pop(), "num_layers": num_layers,
            "lora_parameters": {"rank": max(int(e.params["rank"]) for e in adapter.manifest.modules.values()),
                                "scale": scale, "dropout": 0.0,
                                "keys": sorted({place.key for place in places.values()})},
            "adapterfmt": {"ranks": ranks, "architecture": adapter.manifest.base.architecture or
                           (config.get("architectures") or [None])[0]},
        }
        if adapter.manifest.base.name_or_path:
            config_out["model"] = adapter.manifest.base.name_or_path
        with atomic_directory(path, overwrite=settings.overwrite) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(config_out, indent=4, sort_keys=True) + "\n")
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "mlx"})
        return path


class _Settings(NamedTuple):
    base: Any  # BaseCheckpoint or None
    overwrite: bool
    dtype: torch.dtype | None  # None: keep
    strict: bool


def _settings(options) -> _Settings:
    """The writer's options in one place (the only code that knows how they are passed)."""
    return _Settings(options.base, options.overwrite, store_dtype(getattr(options.format, "dtype", None)),
                     options.strict)


def _mlx_state(adapter: Adapter, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               places: dict[str, MlxPlace], settings: _Settings, report) -> tuple[dict[str, torch.Tensor], dict]:
    """adapters.safetensors' tensors under mlx-lm's names, padded to the global rank, and the true ranks."""
    rank = max(a.shape[0] for a, _ in factors.values())
    state, ranks = {}, {}
    for target, (a, b) in factors.items():
        name, r = places[target].name, a.shape[0]
        if r < rank:  # zero rows of A / columns of B add exact zeros to x @ a @ b
            ranks[name] = r
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        state[f"{name}.lora_a"] = a.t().contiguous()
        state[f"{name}.lora_b"] = b.t().contiguous()
        if "magnitude" in adapter.manifest.modules[target].tensors:
            magnitude = adapter.module_tensors(target)["magnitude"]
            state[f"{name}.m"] = _cast_magnitude(target, magnitude, settings, report).contiguous()
    if ranks:
        report.notes.append(f"{len(ranks)} module(s) zero-padded to the global rank {rank} (exact)")
    return state, ranks


def _lora_parameters(config: dict[str, Any], path: Path) -> tuple[int, float, str]:
    """(rank, scale, fine_tune_type) of an mlx-lm adapter config, or a one-line refusal."""
    params = config.get("lora_parameters")
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora") or not isinstance(params, dict) or "num_layers" not in config:
        raise ForeignFormatError(f"fine_tune_type {kind!r} / lora_parameters / num_layers: not an MLX-LM "
                                 "LoRA or DoRA adapter config", path=path / CONFIG_FILE,
                                 hint="full fine-tunes are models, not adapters")
    try:
        return int(params["rank"]), float(params["scale"]), kind
    except (KeyError, TypeError, ValueError):
        raise ForeignFormatError("lora_parameters needs numeric rank and scale", path=path / CONFIG_FILE,
                                 hint="the config is damaged") from None


def _hf_module(module: str, arch: MlxArchitecture | None, arch_name: str | None, path: Path) -> tuple[str, str]:
    """The Hugging Face name and layer kind of an mlx-lm module path."""
    if arch is not None:
        found = hf_module_of(module, arch)
        if found is None:
            raise ForeignFormatError(f"module {module!r} is not one of the layers of mlx-lm's {arch.model_type} "
                                     f"model ({arch_name}) that have a Hugging Face counterpart here",
                                     path=path / WEIGHTS_FILE,
                                     hint="check that the adapter belongs to this base; MoE expert (switch) "
                                          "layers and routers are not supported")
        return found
    # Without the architecture only Llama-style block names are unambiguous: the same in mlx-lm and
    # transformers, and always Linear layers. Embeddings, heads and GPT-2/NeoX-style names need --base.
    if not re.match(r"^model\.layers\.\d+\.[a-z_0-9.]+$", module):
        raise ForeignFormatError(f"module {module!r}: without the base model its Hugging Face name and layer kind "
                                 "(Linear or Embedding) are unknown", path=path / WEIGHTS_FILE,
                                 hint="pass --base (the base model directory)")
    return module, LINEAR


def mlx_layout(adapter: Adapter, base: Any = None) -> tuple[dict[str, MlxPlace], int]:
    """Where each module goes in mlx-lm's model and ``num_layers``, or the UsageError export would raise.

    For ``adapterfmt check --target mlx``: the same checks as the writer, without writing.

    Example:
        >>> places, num_layers = mlx_layout(read_adapter("adapter.safetensors"))  # doctest: +SKIP
        >>> places["model.layers.0.self_attn.q_proj"].key  # doctest: +SKIP
        'self_attn.q_proj'
    """
    config = known_base_config(adapter, base)
    places = _places(adapter, config)
    return places, _num_layers(adapter, places, config)


def _places(adapter: Adapter, config: dict[str, Any]) -> dict[str, MlxPlace]:
    """Every module's place in mlx-lm's model, checked against the architecture table."""
    modules = adapter.manifest.modules
    arch_name = adapter.manifest.base.architecture or (config.get("architectures") or [None])[0]
    if arch_name is None and adapter.manifest.source.get("format") == "mlx" and \
            all(BLOCK_RE.match(t) and e.layer == LINEAR for t, e in modules.items()):
        # Read from mlx-lm's own layout without --base: Llama-style block names, kept as they are.
        return {t: MlxPlace(t, BLOCK_RE.match(t)["key"], int(BLOCK_RE.match(t)["index"])) for t in modules}
    arch = find_architecture(arch_name)
    for target, entry in modules.items():
        require_peft_axis(target, entry, "mlx-lm")
        if entry.method == "dora" and entry.layer == EMBEDDING:
            raise UsageError(f"module {target!r}: DoRA on an embedding is not exported to MLX: PEFT's magnitude "
                             "has one entry per embedding dimension, mlx-lm's DoRAEmbedding one per token",
                             hint="drop that module first")
    return {t: place_in_mlx(t, e.layer, arch, config) for t, e in modules.items()}


def _num_layers(adapter: Adapter, places: dict[str, MlxPlace], config: dict[str, Any]) -> int:
    """mlx-lm's ``num_layers``: how many of the last blocks hold the block modules."""
    indices = [p.block for p in places.values() if p.block is not None]
    if not indices:
        return 0  # top-level modules only: matched by full name, whatever num_layers says
    total = layer_count(config)
    if total is None:
        source = adapter.manifest.source.get("config") or {}
        if adapter.manifest.source.get("format") == "mlx" and isinstance(source.get("num_layers"), int):
            return source["num_layers"]  # unchanged from the mlx-lm adapter read
        raise UsageError("the base's number of layers is unknown, so mlx-lm's num_layers (counted from the last "
                         "block) cannot be set", hint="pass --base (the base model directory)")
    if max(indices) >= total:
        raise UsageError(f"block {max(indices)} is beyond the base's {total} layers",
                         hint="the adapter was made for another model")
    return total - min(indices)


def _dtype_rule(requested: torch.dtype | None):
    """The stored dtype per module: the requested one, else (keep) the module's own, except that
    half-precision embedding factors are widened to fp32 (exact): mlx-lm's LoRAEmbedding multiplies
    ``lora_a[ids] @ lora_b`` in the factors' own dtype, where PEFT computes in the activations' dtype."""
    def rule(entry) -> torch.dtype | None:
        if requested is None and entry.layer == EMBEDDING and \
                {ref.dtype for ref in entry.tensors.values()} & {"F16", "BF16"}:
            return torch.float32
        return requested
    return rule


def _cast_magnitude(target: str, magnitude: torch.Tensor, settings: _Settings, report) -> torch.Tensor:
    """DoRA's magnitude in the requested dtype; a rounding cast is refused under --strict."""
    cast, exact = cast_exactly(magnitude, settings.dtype)
    if not exact:
        if settings.strict:
            raise LossyConversionError(f"module {target!r}: the DoRA magnitude does not fit {dtype_name(cast.dtype)} "
                                       "exactly and --strict was given; nothing was written",
                                       hint="drop --strict or choose --dtype keep")
        report.notes.append(f"{target}: DoRA magnitude rounded to {dtype_name(cast.dtype)}")
    return cast


def _read_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_safetensors(path / WEIGHTS_FILE)[0].items():
        match = KEY_RE.match(key)
        if not match:
            raise ForeignFormatError(f"tensor {key!r} is not lora_a, lora_b or m", path=path / WEIGHTS_FILE,
                                     hint="contains incompatible tensors")
        grouped.setdefault(match["module"], {})[match["role"]] = tensor
    return grouped


def _trimmed_rank(module: str, a: torch.Tensor, b: torch.Tensor, recorded: Any, rank: int, report) -> int:
    """The module's true rank: the recorded one when the padding beyond it is all zeros."""
    if not isinstance(recorded, int) or not 0 < recorded < rank:
        return rank
    if bool((a[:, recorded:] == 0).all()) and bool((b[recorded:] == 0).all()):
        return recorded
    report.notes.append(f"{module}: recorded rank {recorded} ignored (the padding is not zero)")
    return rank


