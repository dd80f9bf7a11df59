"""A config's JSON Schema (as workers publish it in MethodInfo.config_schema_json) as rows a person reads:
key, type, default, bounds, meaning. Used by `tailor methods describe` and docs/spec-reference.md."""

from __future__ import annotations

import json
from typing import Any

_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def type_name(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " or ".join(type_name(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    kind = prop.get("type", "any")
    if kind == "array" and "items" in prop:
        return f"list of {type_name(prop['items'])}"
    return str(kind)


def bounds(prop: dict[str, Any]) -> str:
    parts = [f"{op} {prop[k]}" for k, op in _BOUNDS.items() if k in prop]
    for sub in prop.get("anyOf", []):
        parts += [f"{op} {sub[k]}" for k, op in _BOUNDS.items() if k in sub]
    return ", ".join(parts)


def schema_rows(schema: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, bounds, meaning) for each property of a JSON Schema object."""
    required = set(schema.get("required") or ())
    rows = []
    for name, prop in (schema.get("properties") or {}).items():
        if "default" in prop:
            default = json.dumps(prop["default"])
        else:  # a default_factory has no JSON default: an empty block or list
            default = "required" if name in required else "optional"
        rows.append((name, type_name(prop), default, bounds(prop), prop.get("description", "")))
    return rows
