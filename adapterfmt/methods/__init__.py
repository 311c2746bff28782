"""Adapter methods. Each module in this package registers one method (see :mod:`.base`)."""
from ..plugins import import_submodules
from .base import AdapterMethod, all_methods, get_method, lora_scale, register_method

import_submodules(__name__)

__all__ = ["AdapterMethod", "all_methods", "get_method", "lora_scale", "register_method"]
