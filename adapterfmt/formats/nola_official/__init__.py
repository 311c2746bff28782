"""Official UCDvision/NOLA checkpoints (ViT, GPT-2, LLaMA), read only."""
from .format import NolaOfficialFormat, NolaOfficialReadOptions

__all__ = ["NolaOfficialFormat", "NolaOfficialReadOptions"]
