"""Read-only access to base model checkpoints (local safetensors files and directories, diffusers
components and pipelines)."""
from .safetensors_checkpoint import INDEX_FILE, SINGLE_FILE, BaseCheckpoint
from .diffusers_checkpoint import DiffusersComponent, DiffusersPipeline
from .open_base import open_base

__all__ = ["BaseCheckpoint", "DiffusersComponent", "DiffusersPipeline", "INDEX_FILE", "SINGLE_FILE", "open_base"]
