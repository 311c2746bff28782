"""JSON Schema validation of manifests (the schema file is the one in spec/)."""
from __future__ import annotations

import copy
import functools
import json
import re
from importlib import resources
from typing import Any

import jsonschema

from ..errors import ManifestError


@functools.lru_cache(maxsize=2)
def load_schema(lenient: bool = False) -> dict[str, Any]:
    """The manifest schema; ``lenient`` allows unknown fields (for newer minor versions)."""
    text = resources.files("adapterfmt.schema").joinpath("manifest.schema.json").read_text()
    schema = json.loads(text)
    if lenient:
        schema = _allow_additional(copy.deepcopy(schema))
    return schema


def _allow_additional(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("additionalProperties") is False:
            node["additionalProperties"] = True
        if "propertyNames" in node and "enum" in node["propertyNames"]:
            node.pop("propertyNames")
        for value in node.values():
            _allow_additional(value)
    elif isinstance(node, list):
        for value in node:
            _allow_additional(value)
    return node


def _python_pattern(pattern: str) -> str:
    # The schema's patterns are ECMA-262: there `$` matches only at the very end, in Python also
    # before a final "\n", so "model.q_proj\n" would pass. `\Z` is ECMA's `$`.
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern


def _whole_string_pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not re.search(_python_pattern(pattern), instance):
        yield jsonschema.exceptions.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _whole_string_pattern})


def validate_manifest_dict(data: Any, path: str | None = None, *, lenient: bool = False) -> None:
    """Raise :class:`ManifestError` naming the first schema violation.

    Example:
        >>> validate_manifest_dict({"base": {}, "modules": {}, "payloads": {}})
        Traceback (most recent call last):
        ...
        adapterfmt.errors.ManifestError: ...
    """
    validator = _Validator(load_schema(lenient))
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"manifest fails the schema at {where}: {error.message[:300]}", path=path,
                            hint="the file was damaged or written by a broken tool; re-export it")
