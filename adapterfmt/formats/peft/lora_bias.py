"""PEFT ``lora_bias=True``: a bias on ``lora_B``, merged as ``bias += lora_B.bias · scale``.

adapterfmt stores it as a ``bias_delta`` payload on the layer's bias (the fp32 product PEFT adds, so a
merge is bit-identical to PEFT's); the export divides the scale back out (exact in real arithmetic).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import ForeignFormatError
from ...format import Manifest, Payload, TensorRef

LEAF = ".lora_B.bias"


def split_lora_biases(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state without the ``lora_B.bias`` keys, {module: bias})."""
    rest, biases = {}, {}
    for key, tensor in state.items():
        if key.startswith(prefix) and key.endswith(LEAF):
            biases[key[len(prefix):-len(LEAF)]] = tensor
        else:
            rest[key] = tensor
    return rest, biases


def add_bias_deltas(config: dict[str, Any], biases: dict[str, torch.Tensor], manifest: Manifest,
                    tensors: dict[str, torch.Tensor], path: Path, report) -> None:
    """One ``bias_delta`` payload per LoRA module with a ``lora_B.bias`` (refused unless ``lora_bias``)."""
    if biases and not config.get("lora_bias", False):
        raise ForeignFormatError(f"lora_B.bias of {sorted(biases)[0]!r} saved but lora_bias is false", path=path,
                                 hint="the config does not match the weights")
    for module, bias in sorted(biases.items()):
        entry = manifest.modules.get(module)
        if entry is None or entry.method != "lora" or entry.layer == "embedding":
            raise ForeignFormatError(f"lora_B.bias of {module!r}: only plain LoRA Linear/Conv1D modules carry one",
                                     path=path, hint="PEFT does not support lora_bias with DoRA or embeddings")
        target = f"{module}.bias"
        if target in manifest.payloads:
            raise ForeignFormatError(f"{target!r} is saved in full (bias={config.get('bias')!r}) and has a "
                                     "lora_B.bias too", path=path, hint="not supported together; keep the PEFT adapter")
        delta = bias.float() * float(entry.params["scale"])  # PEFT: lora_B.bias * scaling, in fp32
        tensors[f"payload.{target}"] = delta
        manifest.payloads[target] = Payload(kind="bias_delta", target=target,
                                            tensor=TensorRef(f"payload.{target}", "F32", list(delta.shape)))
    if biases:
        report.notes.append(f"lora_bias: {len(biases)} bias(es) kept as bias deltas (lora_B.bias · scale)")


def bias_state(adapter, prefix: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """({PEFT key: lora_B.bias}, payload targets they replace); empty when no LoRA module has a bias delta.

    PEFT's ``lora_bias`` gives every ``lora_B`` a bias: modules without a delta get zeros.
    """
    manifest = adapter.manifest
    deltas = {p.target.rsplit(".", 1)[0]: p for p in manifest.payloads.values()
              if p.kind == "bias_delta" and p.target.endswith(".bias")
              and p.target.rsplit(".", 1)[0] in manifest.modules}
    if not deltas:
        return {}, set()
    out = {}
    for target, entry in manifest.modules.items():
        payload = deltas.get(target)
        out_f = entry.shape[0]
        bias = torch.zeros(out_f) if payload is None else \
            adapter.tensors[payload.tensor.name].float() / float(entry.params["scale"])
        out[f"{prefix}{target}{LEAF}"] = bias
    return out, {p.target for p in deltas.values()}

