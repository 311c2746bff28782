"""The manifest schema's per-method part, derived from the method descriptors (never written by hand).

``tools/make_schema.py`` writes it into ``manifest.schema.json``; a test keeps the file in sync.
"""
from __future__ import annotations

from typing import Any

from .descriptor import Method
from .registry import METHODS


#: The container-level definitions of the hand-written schema; everything else is generated.
CONTAINER_DEFS = ("param_name", "dtype", "shape", "tensor_ref", "base_weight", "payload", "module",
                  "component_name", "base_identity")


def _strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title" and not (k == "default" and v is None)}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def params_schema(method: Method) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON Schema of the method's params, the ``$defs`` it refers to).

    Example:
        >>> from adapterfmt.methods import get_method
        >>> params_schema(get_method("lora"))[0]["required"]
        ['rank', 'alpha', 'use_rslora', 'scale']
    """
    schema = method.params_model.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})
    return _strip_titles(schema), {name: _strip_titles(d) for name, d in defs.items()}


def method_rules() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the module schema's ``allOf`` if/then rules, one per method; the ``$defs`` they use).

    Example:
        >>> rules, defs = method_rules()
        >>> rules[0]["if"]["properties"]["method"]["const"]
        'lora'
    """
    rules, defs = [], {}
    for method in METHODS:
        params, extra = params_schema(method)
        defs.update(extra)
        defs[f"{method.name}_params"] = params
        roles = [r.name for r in method.roles]
        required = [r.name for r in method.roles if r.required]
        rules.append({"if": {"properties": {"method": {"const": method.name}}},
                      "then": {"properties": {
                          "params": {"$ref": f"#/$defs/{method.name}_params"},
                          "layer": {"enum": list(method.layers)},
                          "tensors": {"required": required, "propertyNames": {"enum": roles}}}}})
    return rules, defs


def build_schema(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (the container-level schema) with the per-method rules and params filled in.

    Example:
        >>> build_schema(load_schema())["$defs"]["lora_params"]["type"]  # doctest: +SKIP
        'object'
    """
    schema = dict(base)
    defs = {k: base["$defs"][k] for k in CONTAINER_DEFS}
    rules, method_defs = method_rules()
    module = dict(defs["module"])
    module["allOf"] = rules
    defs["module"] = module
    defs.update(method_defs)
    schema["$defs"] = defs
    return schema


def _role_text(role) -> str:
    shape = ", ".join(str(d) for d in role.shape)
    return f"`{role.name}` ({shape})" + ("" if role.required else " optional")


def _params_text(method: Method) -> str:
    fields = method.params_model.model_fields
    required = [f"`{n}`" for n, f in fields.items() if f.is_required()]
    optional = [f"`{n}`" for n, f in fields.items() if not f.is_required()]
    return ", ".join(required) + (f"; optional {', '.join(optional)}" if optional else "")


def spec_method_table() -> str:
    """The spec's method table (spec/README.md §6), one row per method descriptor.

    Example:
        >>> spec_method_table().splitlines()[0].startswith("| method |")
        True
    """
    rows = ["| method | roles (shape) | params | ΔW / merged weight (canonical, fp32) | needs base | layers | spec |",
            "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rows.append(f"| `{method.name}` | {', '.join(_role_text(r) for r in method.roles)} | {_params_text(method)} "
                    f"| {method.formula} | {'yes' if method.needs_base else 'no'} | {', '.join(method.layers)} "
                    f"| {method.spec_file} |")
    from ..format.dtypes import FLOAT_DTYPES
    dtypes = sorted({d for m in METHODS for r in m.roles for d in r.dtypes if d in FLOAT_DTYPES})
    integer = sorted(f"`{m.name}.{r.name}` ({', '.join(r.dtypes)})" for m in METHODS for r in m.roles
                     if not set(r.dtypes) & set(FLOAT_DTYPES))
    rows.append("")
    rows.append(f"Every floating role may be stored as {', '.join(dtypes)}; values are converted to fp32 exactly "
                f"before use." + (f" Integer roles: {', '.join(integer)}." if integer else ""))
    return "\n".join(rows)
