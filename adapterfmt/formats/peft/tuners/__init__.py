"""PEFT tuners other than LoRA: one :class:`Tuner` table entry per ``peft_type`` (explicit, no self-registration)."""
from __future__ import annotations

from ._common import Tuner, build_adapter, check_fields
from .adalora import ADALORA_TUNER
from .boft import BOFT_TUNER
from .ia3 import IA3_TUNER
from .lycoris import LOHA_TUNER, LOKR_TUNER
from .oft import OFT_TUNER
from .vera import VERA_TUNER
from .fourierft import FOURIERFT_TUNER
from .trainable_tokens import TRAINABLE_TOKENS_TUNER

TUNERS: dict[str, Tuner] = {t.peft_type: t for t in (IA3_TUNER, LOHA_TUNER, LOKR_TUNER, ADALORA_TUNER, OFT_TUNER,
                                                          BOFT_TUNER, VERA_TUNER,
                                                          FOURIERFT_TUNER, TRAINABLE_TOKENS_TUNER)}
TUNER_BY_METHOD: dict[str, Tuner] = {t.method: t for t in TUNERS.values()}

__all__ = ["TUNERS", "TUNER_BY_METHOD", "Tuner", "build_adapter", "check_fields"]
