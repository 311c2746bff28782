"""Hugging Face PEFT adapter directories (``adapter_config.json`` + weights).

:mod:`.config` reads and checks the config, :mod:`.state` converts plain LoRA/rsLoRA/DoRA state
dicts both ways, :mod:`.mutating` imports raw OLoRA/PiSSA adapters against the original base.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field
from safetensors.torch import save_file

from ...atomic import atomic_directory
from ...format import Adapter
from ..base import AdapterFormat, FormatOptions, ReadOptions
from .config import CONFIG_FILE, PLAIN_INITS, WEIGHTS_FILE, read_config
from .mutating import read_mutating
from .state import adapter_to_peft, peft_to_adapter, read_weights
from .tuners import TUNER_BY_METHOD, TUNERS, build_adapter


class PeftReadOptions(FormatOptions):
    init_snapshot: Path | None = Field(default=None, description=(
        "Saved untrained init (PEFT adapter dir or SORSA post-init snapshot) for raw OLoRA/PiSSA/SORSA."))


class PeftFormat(AdapterFormat):
    name = "peft"
    summary = "Hugging Face PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)"
    priority = 20
    writes_methods = ("lora", "dora", "ia3", "loha", "lokr", "adalora", "oft", "boft", "vera", "fourierft",
                      "trainable_tokens")
    read_options = PeftReadOptions

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG_FILE).is_file()

    # ---------------------------------------------------------------- reading
    def read(self, path: Path, options: ReadOptions, report) -> Adapter:
        config = read_config(path)
        tensors = read_weights(path, options.allow_pickle)
        if config["peft_type"] != "LORA":
            tuner = TUNERS[config["peft_type"]]
            return build_adapter(tuner, config, tensors, path, options.base, report)
        if config.get("init_lora_weights", True) not in PLAIN_INITS:
            # OLoRA/PiSSA (and refusals for other mutating inits) live in their own module.
            return read_mutating(config, tensors, path, options, report)
        return peft_to_adapter(config, tensors, path, options, report)

    # ---------------------------------------------------------------- writing
    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        methods = set(adapter.manifest.methods())
        if len(methods) == 1 and next(iter(methods)) in TUNER_BY_METHOD:
            config, tensors = TUNER_BY_METHOD[methods.pop()].export(adapter, report)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
        else:
            config, tensors = adapter_to_peft(adapter, report, options.base)
        with atomic_directory(path, overwrite=options.overwrite) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        return path


