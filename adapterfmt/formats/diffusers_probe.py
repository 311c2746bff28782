"""Asking diffusers' own LoRA converters how they map names: each name gets a 1×1 down/up pair holding its
index, so the converted keys can be traced back to the name they came from (values, not key order, survive
diffusers' renaming and regrouping).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def index_probe(names: list[str]) -> dict[str, torch.Tensor]:
    """A kohya-style state dict: ``<name>.lora_down.weight`` and ``.lora_up.weight`` = [[index of name]].

    Example:
        >>> index_probe(["lora_unet_a"])["lora_unet_a.lora_up.weight"]
        tensor([[0.]])
    """
    probe = {}
    for index, name in enumerate(names):
        value = torch.full((1, 1), float(index))
        probe[f"{name}.lora_down.weight"], probe[f"{name}.lora_up.weight"] = value, value
    return probe


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Diffusers' logger at ERROR while probing: the probe's 1×1 tensors make it warn about nothing real.

    Example:
        >>> with quiet_diffusers():
        ...     pass
    """
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
