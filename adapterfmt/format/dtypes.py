"""The one dtype table: safetensors dtype names, torch dtypes, element sizes, and which are floating.

Every other module asks this table; none keeps its own copy.
"""
from __future__ import annotations

import torch

#: safetensors name -> (torch dtype or None when this torch lacks it, bytes per element, is floating)
_TABLE: dict[str, tuple[torch.dtype | None, int, bool]] = {
    "F64": (torch.float64, 8, True),
    "F32": (torch.float32, 4, True),
    "F16": (torch.float16, 2, True),
    "BF16": (torch.bfloat16, 2, True),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1, True),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1, True),
    "I64": (torch.int64, 8, False),
    "I32": (torch.int32, 4, False),
    "I16": (torch.int16, 2, False),
    "I8": (torch.int8, 1, False),
    "U64": (getattr(torch, "uint64", None), 8, False),
    "U32": (getattr(torch, "uint32", None), 4, False),
    "U16": (getattr(torch, "uint16", None), 2, False),
    "U8": (torch.uint8, 1, False),
    "BOOL": (torch.bool, 1, False),
}

#: Every dtype name the container may hold.
DTYPE_NAMES: tuple[str, ...] = tuple(_TABLE)
#: Element size in bytes per dtype name.
DTYPE_BYTES: dict[str, int] = {name: size for name, (_, size, _) in _TABLE.items()}
#: Floating dtypes whose values a merge or a method computes with.
FLOAT_DTYPES: tuple[str, ...] = ("F64", "F32", "F16", "BF16")
#: safetensors name -> torch dtype (only the dtypes this torch has).
DTYPE_FROM_NAME: dict[str, torch.dtype] = {name: dt for name, (dt, _, _) in _TABLE.items() if dt is not None}
_NAME_OF: dict[torch.dtype, str] = {dt: name for name, dt in DTYPE_FROM_NAME.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype.

    Example:
        >>> dtype_name(torch.bfloat16)
        'BF16'
    """
    return _NAME_OF[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name.

    Example:
        >>> torch_dtype("F16")
        torch.float16
    """
    return DTYPE_FROM_NAME[name]


def config_dtype_name(name: str) -> str:
    """The spelling transformers' ``config.json`` uses (``BF16`` -> ``bfloat16``).

    Example:
        >>> config_dtype_name("BF16")
        'bfloat16'
    """
    return str(DTYPE_FROM_NAME[name]).removeprefix("torch.")
