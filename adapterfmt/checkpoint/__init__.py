"""Read-only access to base model checkpoints (local safetensors files and directories)."""
from .safetensors_checkpoint import INDEX_FILE, SINGLE_FILE, BaseCheckpoint

__all__ = ["BaseCheckpoint", "INDEX_FILE", "SINGLE_FILE"]
