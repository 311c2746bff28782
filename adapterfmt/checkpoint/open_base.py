"""Choosing the checkpoint reader for a ``--base`` path."""
from __future__ import annotations

from pathlib import Path

from .diffusers_checkpoint import (DiffusersComponent, DiffusersPipeline, is_component_dir, is_pipeline_dir,
                                   single_file_layout)
from .safetensors_checkpoint import BaseCheckpoint
from .single_file import SingleFilePipeline


def open_base(path: Path) -> BaseCheckpoint:
    """The right checkpoint reader for a local path: pipeline, diffusers component, or transformers model.

    Single-file SD 1.x checkpoints (LDM key layout) are read with diffusers' names through diffusers'
    own conversion code (single_file.py); layouts it cannot map one to one are refused there.

    Example:
        >>> open_base(Path("sd15"))  # doctest: +SKIP
    """
    if is_pipeline_dir(path):
        return DiffusersPipeline(path)
    if is_component_dir(path):
        return DiffusersComponent(path)
    checkpoint = BaseCheckpoint(path)
    if path.is_file() and single_file_layout(checkpoint):
        return SingleFilePipeline(path, checkpoint)
    return checkpoint
