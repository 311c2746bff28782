"""MLX-LM adapters: a directory with ``adapters.safetensors`` and ``adapter_config.json``.

mlx-lm stores ``lora_a`` (in, r) and ``lora_b`` (r, out), the transposes of PEFT's A and B, and
applies ``x @ lora_a @ lora_b * scale`` with ONE absolute ``scale`` and ONE ``rank`` for the whole
model (``lora_parameters``), on the last ``num_layers`` blocks, to the block-relative ``keys``.
DoRA adds ``.m`` (out,), the row norm target, the same semantics as PEFT's magnitude.
Export folds per-module scale differences into B and zero-pads lower ranks to the global rank
(exact: the padding adds zero terms); the true ranks are kept in ``adapter_config.json`` under
``adapterfmt`` (mlx-lm ignores unknown keys) so the way back trims the padding again.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory
from ._files import load_safetensors
from ..jsonio import read_json_file
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, Manifest
from ..conversion_report import LOSSLESS
from ._lowrank import (add_lowrank_module, fold_to_global, known_base_config, lora_params_exact, most_common,
                       require_linear)
from .base import AdapterFormat

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
BLOCK_RE = re.compile(r"^(?P<stack>.+\.layers)\.(?P<index>\d+)\.(?P<key>.+)$")
KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<role>lora_a|lora_b|m)$")


class MlxFormat(AdapterFormat):
    name = "mlx"
    summary = "MLX-LM adapter directory (adapters.safetensors + adapter_config.json; transposed, absolute scale)"
    priority = 15  # before PEFT: both directories hold an adapter_config.json
    writes_methods = ("lora", "dora")

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()

    # ---------------------------------------------------------------- reading
    def read(self, path: Path, options, report) -> Adapter:
        config = read_json_file(path / CONFIG_FILE)
        params = config.get("lora_parameters")
        kind = config.get("fine_tune_type", "lora")
        if kind not in ("lora", "dora") or not isinstance(params, dict) or "num_layers" not in config:
            raise ForeignFormatError(f"fine_tune_type {kind!r} / lora_parameters / num_layers: not an MLX-LM "
                                     "LoRA or DoRA adapter config", path=path / CONFIG_FILE,
                                     hint="full fine-tunes are models, not adapters")
        try:
            rank, scale = int(params["rank"]), float(params["scale"])
        except (KeyError, TypeError, ValueError):
            raise ForeignFormatError("lora_parameters needs numeric rank and scale", path=path / CONFIG_FILE,
                                     hint="the config is damaged") from None
        ours = config.get("adapterfmt") or {}
        true_ranks = ours.get("ranks") or {} if isinstance(ours, dict) else None
        if not isinstance(config.get("model"), (str, type(None))):
            raise ForeignFormatError(f"field model must be a string, got {config['model']!r}", path=path / CONFIG_FILE,
                                     hint="the config is damaged")
        if not isinstance(true_ranks, dict):
            raise ForeignFormatError("field adapterfmt must be an object with an object 'ranks'",
                                     path=path / CONFIG_FILE, hint="the config is damaged")
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
            r = _trimmed_rank(module, a, b, true_ranks.get(module), rank, report)
            magnitude = parts.get("m")
            add_lowrank_module(manifest, tensors, module, a[:, :r].t(), b[:r].t(), lora_params_exact(r, scale),
                               magnitude=magnitude)
            report.add(module, LOSSLESS)
        if not manifest.modules:
            raise ForeignFormatError("no LoRA tensors found", path=path / WEIGHTS_FILE, hint="the adapter is empty")
        manifest.base.name_or_path = config.get("model")
        manifest.source = {"format": "mlx", "config": {k: config[k] for k in
                                                       ("fine_tune_type", "num_layers", "lora_parameters") if k in config}}
        adapter = Adapter(manifest=manifest, tensors=tensors)
        return adapter

    # ---------------------------------------------------------------- writing
    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        require_linear(adapter, "MLX-LM", report, options.base)
        manifest = adapter.manifest
        methods = set(manifest.methods())
        if len(methods) != 1:
            raise UsageError(f"MLX-LM has one fine_tune_type, but the adapter mixes {sorted(methods)}",
                             hint="export LoRA and DoRA modules as separate adapters")
        stacks, indices, keys = set(), [], set()
        for target in manifest.modules:
            match = BLOCK_RE.match(target)
            if not match:
                raise UsageError(f"module {target!r} is outside the transformer blocks; MLX-LM adapts only the "
                                 "last num_layers blocks", hint="drop that module first")
            stacks.add(match["stack"])
            indices.append(int(match["index"]))
            keys.add(match["key"])
        if len(stacks) != 1:
            raise UsageError(f"modules come from several layer stacks {sorted(stacks)}; MLX-LM has one")
        n_total = known_base_config(adapter, options.base).get("num_hidden_layers")
        if not n_total:
            n_total = max(indices) + 1
            report.notes.append(f"base layer count unknown: assumed {n_total} (pass --base to be sure)")
        num_layers = int(n_total) - min(indices)
        scale = most_common([float(e.params["scale"]) for e in manifest.modules.values()])
        factors = fold_to_global(adapter, report, lambda e: scale,
                                 lambda e: "rsLoRA expressed as an absolute scale" if e.params["use_rslora"] else "")
        rank = max(int(e.params["rank"]) for e in manifest.modules.values())
        state, ranks = {}, {}
        for target, (a, b) in factors.items():
            r = a.shape[0]
            if r < rank:  # zero rows of A / columns of B add exact zeros to x @ a @ b
                ranks[target] = r
                a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
            state[f"{target}.lora_a"] = a.t().contiguous()
            state[f"{target}.lora_b"] = b.t().contiguous()
            if "magnitude" in manifest.modules[target].tensors:
                state[f"{target}.m"] = adapter.module_tensors(target)["magnitude"].contiguous()
        if ranks:
            report.notes.append(f"{len(ranks)} module(s) zero-padded to the global rank {rank} (exact)")
        config: dict[str, Any] = {
            "fine_tune_type": methods.pop(), "num_layers": num_layers,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
            "adapterfmt": {"ranks": ranks},
        }
        if manifest.base.name_or_path:
            config["model"] = manifest.base.name_or_path
        with atomic_directory(path, overwrite=options.overwrite) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "mlx"})
        return path


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


