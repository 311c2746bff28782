"""Pieces shared by the LoRA state-dict code and the other PEFT tuners (no imports among those)."""
from __future__ import annotations

import torch

from ...conversion_report import ConversionReport
from ...errors import UsageError
from ...format import Manifest, ModuleEntry, Payload, TensorRef
from ...format.dtypes import dtype_name


def one_fan_in_fan_out(entries: list[ModuleEntry]) -> bool:
    """PEFT's single ``fan_in_fan_out`` flag for these modules; mixing Linear and Conv1D is refused.

    Example:
        >>> one_fan_in_fan_out([])
        False
    """
    fans = {e.fan_in_fan_out for e in entries}
    if len(fans) > 1:
        raise UsageError("PEFT has one fan_in_fan_out flag, but the adapter mixes Linear and Conv1D targets",
                         hint="export the two groups as separate adapters")
    return bool(fans and fans.pop())


def keep_payload(manifest: Manifest, tensors: dict[str, torch.Tensor], key: str, kind: str, tensor: torch.Tensor,
                 report: ConversionReport) -> None:
    """Store a PEFT state-dict tensor that is not an adapter factor as a payload of ``kind``.

    ``key`` is PEFT's name without the model prefix; a ``base_layer`` copy targets the base parameter.

    Example:
        >>> keep_payload(manifest, tensors, "lm_head.weight", "modules_to_save", w, report)  # doctest: +SKIP
    """
    target = key.replace(".base_layer.", ".")
    name = f"payload.{target}"
    tensors[name] = tensor
    manifest.payloads[target] = Payload(kind=kind, target=target,
                                        tensor=TensorRef(name, dtype_name(tensor.dtype), list(tensor.shape)))
    report.notes.append(f"kept {kind} tensor {target} as a payload")
