"""OLoRA (PEFT ``init_lora_weights="olora"``): B0 = Q[:, :r], A0 = R[:r] of the fp32 QR of W.

ΔW against the original base = s·(B·A − B0·A0) (+ the residual's rounding E, recorded only).
"""
from __future__ import annotations

from ._principal import InitRelativeLoRA
from .base import register_method


class OLoRA(InitRelativeLoRA):
    name = "olora"
    summary = "QR-initialised LoRA (Büyükakyüz 2024); stored against the original base with init B0, A0"


register_method(OLoRA())
