"""The adapterfmt container: a safetensors file whose metadata carries our manifest."""
from .manifest import BaseIdentity, BaseWeight, Manifest, ModuleEntry, Payload, TensorRef
from .container import Adapter, read_adapter, write_adapter, read_header
from .versions import FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "Adapter", "BaseIdentity", "BaseWeight", "Manifest", "ModuleEntry", "Payload", "TensorRef",
    "read_adapter", "write_adapter", "read_header", "FORMAT_NAME", "FORMAT_VERSION",
]
