"""Foreign adapter formats. Each module in this package registers one format (see :mod:`.base`)."""
from ..plugins import import_submodules
from .base import AdapterFormat, ReadOptions, all_formats, detect_format, get_format, register_format

import_submodules(__name__)

__all__ = ["AdapterFormat", "ReadOptions", "all_formats", "detect_format", "get_format", "register_format"]
