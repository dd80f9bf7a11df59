"""A stage's `config:` checked at submit against the JSON Schema its worker publishes.

Each worker lists, with every method and format, the JSON Schema of its pydantic config model
(`MethodInfo.config_schema_json`, written by `tailor_runtime.stage.config_schema_json`), so the gateway
refuses a typo (`stepz`), a wrong type or a value out of bounds before any upload is used or any stage
runs, naming the field path and what would be right. The worker validates the same config again with
the pydantic model itself when the stage runs (cross-field rules the schema cannot state included).
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from tailor_runtime.errors import InvalidArgument


def check_config(path: str, config: dict[str, Any], schema_json: str) -> None:
    """InvalidArgument naming `path`.<field> for the first way `config` breaks the schema."""
    if not schema_json:
        return  # a worker from before schemas were published: the worker checks it when the stage runs
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_json)
    errors = sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise InvalidArgument(describe(path, errors[0], schema))


def describe(path: str, error: Any, schema: dict[str, Any]) -> str:
    """One sentence for a jsonschema ValidationError, in the spec's own field names."""
    where = ".".join([path, *(str(p) for p in error.absolute_path)])
    if error.validator == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}).keys())
        unknown = sorted(set(error.instance) - set(known))
        name = unknown[0] if unknown else "?"
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}.{name}: unknown setting{hint}; valid settings: {', '.join(known)}"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not allowed; valid choices: {', '.join(map(str, error.validator_value))}"
    if error.validator in ("anyOf", "oneOf"):
        # Optional fields are anyOf [type, null]: name the types instead of jsonschema's generic message.
        types = [s.get("type") or s.get("enum") or s.get("const") for s in error.validator_value]
        return f"{where}: {error.instance!r} is not valid; expected one of {types}"
    field = error.absolute_path[-1] if error.absolute_path else None
    about = (schema.get("properties") or {}).get(field, {}).get("description") if field is not None else None
    return f"{where}: {error.message}" + (f" ({about})" if about else "")
