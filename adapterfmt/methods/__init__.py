"""Adapter methods: one declarative descriptor each (see :mod:`.descriptor`), listed in :mod:`.registry`."""
from .descriptor import SCALE_RTOL, Method, Params, Role
from .registry import (METHOD_BY_NAME, METHODS, check_manifest_methods, convert_module, get_method,
                       read_checked_adapter, write_checked_adapter)

__all__ = ["SCALE_RTOL", "Method", "Params", "Role", "METHODS", "METHOD_BY_NAME", "check_manifest_methods",
           "convert_module", "get_method", "read_checked_adapter",
           "write_checked_adapter"]
