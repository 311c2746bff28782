"""Foreign adapter formats: one module or subpackage each, listed in :mod:`.registry`."""
from .base import AdapterFormat, FormatOptions, ReadOptions, WriteOptions
from .registry import FORMAT_BY_NAME, FORMATS, detect_format, format_for_output, get_format

__all__ = ["AdapterFormat", "FormatOptions", "ReadOptions", "WriteOptions", "FORMATS", "FORMAT_BY_NAME",
           "detect_format", "format_for_output", "get_format"]
