"""The subset of JSON Schema draft 2020-12 that spec/manifest.schema.json uses, for the second reader.

Example:
    >>> Schema(load_schema(), opened=False, error=ValueError).check({"base": {}})  # doctest: +SKIP
    Traceback (most recent call last):
    ValueError: schema: manifest: missing 'modules'
"""
from __future__ import annotations

import json
import re
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "spec" / "manifest.schema.json"


def load_schema() -> dict:
    """spec/manifest.schema.json as parsed JSON."""
    return json.loads(SCHEMA_PATH.read_text())


def _ecma(pattern: str) -> re.Pattern:
    # ECMA-262 `$` (no multiline) matches only at the very end; Python's `$` also before a final \n.
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def _is_type(value, kind: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list),
            "string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
            "integer": type(value) is int or (type(value) is float and value.is_integer()),
            "number": type(value) in (int, float)}[kind]


class Schema:
    """The subset of draft 2020-12 that manifest.schema.json uses; ``opened`` as README §3 says."""

    def __init__(self, schema: dict, opened: bool, error: type[Exception]):
        self.root, self.opened, self.error = schema, opened, error

    def check(self, value, node=None, where="manifest"):
        node = self.root if node is None else node
        if "$ref" in node:
            target = self.root
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            self.check(value, target, where)
        for key in ("type", "enum", "const", "pattern", "minLength", "maxLength", "minimum",
                    "exclusiveMinimum", "items", "minItems", "maxItems", "required", "properties",
                    "additionalProperties", "propertyNames", "allOf", "oneOf", "anyOf"):
            if key in node:
                getattr(self, "_" + key)(value, node[key], node, where)

    def fail(self, where, what):
        raise self.error(f"schema: {where}: {what}")

    def _type(self, v, kinds, node, where):
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is_type(v, k) for k in kinds):
            self.fail(where, f"not {kinds}")

    def _enum(self, v, options, node, where):
        if not any(type(v) is type(o) and v == o for o in options):
            self.fail(where, f"{v!r} not one of {options}")

    def _const(self, v, c, node, where):
        if v != c:
            self.fail(where, f"{v!r} is not {c!r}")

    def _pattern(self, v, p, node, where):
        if isinstance(v, str) and not _ecma(p).search(v):
            self.fail(where, f"{v!r} does not match {p}")

    def _minLength(self, v, n, node, where):
        if isinstance(v, str) and len(v) < n:
            self.fail(where, "too short")

    def _maxLength(self, v, n, node, where):
        if isinstance(v, str) and len(v) > n:
            self.fail(where, "too long")

    def _minimum(self, v, n, node, where):
        if _is_type(v, "number") and not isinstance(v, bool) and v < n:
            self.fail(where, f"{v} < {n}")

    def _exclusiveMinimum(self, v, n, node, where):
        if _is_type(v, "number") and not isinstance(v, bool) and v <= n:
            self.fail(where, f"{v} <= {n}")

    def _items(self, v, sub, node, where):
        if isinstance(v, list):
            for i, item in enumerate(v):
                self.check(item, sub, f"{where}[{i}]")

    def _minItems(self, v, n, node, where):
        if isinstance(v, list) and len(v) < n:
            self.fail(where, "too few items")

    def _maxItems(self, v, n, node, where):
        if isinstance(v, list) and len(v) > n:
            self.fail(where, "too many items")

    def _required(self, v, names, node, where):
        if isinstance(v, dict):
            for name in names:
                if name not in v:
                    self.fail(where, f"missing {name!r}")

    def _properties(self, v, props, node, where):
        if isinstance(v, dict):
            for name, sub in props.items():
                if name in v:
                    self.check(v[name], sub, f"{where}.{name}")

    def _additionalProperties(self, v, extra, node, where):
        if not isinstance(v, dict):
            return
        known = node.get("properties", {})
        for name, value in v.items():
            if name in known:
                continue
            if extra is False:
                if not self.opened:
                    self.fail(where, f"unknown member {name!r}")
            elif isinstance(extra, dict):
                self.check(value, extra, f"{where}.{name}")

    def _propertyNames(self, v, sub, node, where):
        if isinstance(v, dict):
            if self.opened and "enum" in sub:
                return
            for name in v:
                self.check(name, sub, f"{where} key {name!r}")

    def _allOf(self, v, subs, node, where):
        for sub in subs:
            if "if" in sub:
                if self._valid(v, sub["if"]):
                    self.check(v, sub.get("then", {}), where)
            else:
                self.check(v, sub, where)

    def _oneOf(self, v, subs, node, where):
        if sum(self._valid(v, s) for s in subs) != 1:
            self.fail(where, "matches not exactly one alternative")

    def _anyOf(self, v, subs, node, where):
        if not any(self._valid(v, s) for s in subs):
            self.fail(where, "matches no alternative")

    def _valid(self, v, sub) -> bool:
        try:
            self.check(v, sub)
        except self.error:
            return False
        return True


