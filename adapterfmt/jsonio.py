"""Reading JSON from strangers' files: strict numbers, bounded nesting, our errors only."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import AdapterFmtError, ForeignFormatError, InputIOError


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


def _no_duplicates(pairs):
    # Python keeps the last of two equal members, other parsers the first: refuse the ambiguity.
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"member {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _bounded_int(limit: int):
    digits = len(str(limit))

    def parse(text: str) -> int:
        # Length first: a 400-digit literal would later overflow float() deep inside a method.
        if len(text.lstrip("-")) > digits or abs(int(text)) > limit:
            raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range (|n| <= {limit})")
        return int(text)
    return parse


#: Integers in adapterfmt manifests (spec/README.md §2): exactly representable as doubles.
MANIFEST_INT_LIMIT = 2**53 - 1
#: Integers in foreign configs: anything a float() of them survives.
FOREIGN_INT_LIMIT = 2**64


def strict_json_loads(text: str | bytes, *, int_limit: int = FOREIGN_INT_LIMIT):
    """``json.loads`` that refuses NaN/Infinity, overflowing numbers, integers beyond ``int_limit``
    and duplicate members, which would poison scales or make two readers see two files.

    Example:
        >>> strict_json_loads('{"alpha": 8}')
        {'alpha': 8}
    """
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                      parse_int=_bounded_int(int_limit), object_pairs_hook=_no_duplicates)


def read_json_file(path: Path, *, what: str = "config", error: type[AdapterFmtError] = ForeignFormatError,
                   expect_object: bool = True) -> Any:
    """Parse a JSON file strictly; unreadable -> InputIOError, malformed -> ``error``, one line each.

    Example:
        >>> read_json_file(Path("adapter_config.json"))  # doctest: +SKIP
        {'peft_type': 'LORA', ...}
    """
    try:
        data = strict_json_loads(Path(path).read_text())
    except OSError as exc:
        raise InputIOError(f"cannot read ({exc.strerror or exc})", path=path, hint="check the path") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"not valid JSON ({exc})", path=path, hint=f"the {what} is damaged") from None
    if expect_object and not isinstance(data, dict):
        raise error(f"{what} is not a JSON object", path=path, hint=f"the {what} is damaged")
    return data


def peek_json_object(path: Path) -> dict | None:
    """For format detection: the JSON object in ``path``, or None if it is missing or not one."""
    try:
        data = strict_json_loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
