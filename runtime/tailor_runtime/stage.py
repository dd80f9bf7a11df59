"""Helpers every stage servicer uses: validate requests, fetch inputs, publish outputs, record recipes."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel, ValidationError

from tailor.common.v1 import common_pb2 as common
from tailor_runtime.errors import InvalidArgument, NotFound, TailorError
from tailor_runtime.store import ArtifactStore, Manifest
from tailor_runtime.store.keys import check_artifact_id


def validate_config(config_cls: type[BaseModel], raw: dict[str, Any] | None, what: str) -> BaseModel:
    """A typed config from user input; every problem named with its field and the rule it broke."""
    try:
        return config_cls.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in exc.errors()
        )
        fields = ", ".join(sorted(config_cls.model_fields)) or "none"
        raise InvalidArgument(f"invalid config for {what}: {problems} (its options: {fields})") from None


def config_from_struct(config_cls: type[BaseModel], struct: struct_pb2.Struct | None, what: str) -> BaseModel:
    return validate_config(config_cls, json_format.MessageToDict(struct) if struct is not None else {}, what)


def config_parameters(config_cls: type[BaseModel]) -> list[common.Parameter]:
    """A config's fields as capability-listing parameters: name, type as written (`int`, `bool | None`),
    the default as JSON ("" for a required field), help, and the choices of a Literal."""
    return [
        common.Parameter(
            name=name,
            type=_type_name(field.annotation),
            default_json=_default_json(field),
            description=field.description or "",
            choices=[str(c) for c in _literal_choices(field.annotation)],
        )
        for name, field in config_cls.model_fields.items()
    ]


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__  # `int`, not "<class 'int'>"
    return str(annotation).replace("typing.", "")


def _default_json(field: Any) -> str:
    from pydantic_core import PydanticUndefined, to_jsonable_python

    if field.is_required():
        return ""
    value = field.get_default(call_default_factory=True)
    return "" if value is PydanticUndefined else json.dumps(to_jsonable_python(value), sort_keys=True)


def _literal_choices(annotation: Any) -> tuple:
    """The values a Literal (or an optional Literal) allows; () for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(c for arg in typing.get_args(annotation) for c in _literal_choices(arg))


def config_schema_json(config_cls: type[BaseModel]) -> str:
    """The config's JSON Schema as published in MethodInfo.config_schema_json (keys sorted: stable bytes)."""
    return json.dumps(config_cls.model_json_schema(), sort_keys=True)


def require_artifact(
    store: ArtifactStore, ref: common.ArtifactRef, field: str, kinds: tuple[str, ...]
) -> Manifest:
    """The request's artifact exists and is of an accepted kind; checked before any work starts."""
    if not ref.id:
        raise InvalidArgument(f"{field} is required: an artifact id from an upload or an earlier stage")
    check_artifact_id(ref.id)
    if not store.exists(ref.id):
        raise NotFound(f"{field}: artifact {ref.id} not found in the store")
    manifest = store.get_manifest(ref.id)
    if manifest.kind not in kinds:
        raise InvalidArgument(f"{field}: artifact {ref.id} is a {manifest.kind!r}", choices=kinds)
    return manifest


def library_versions(*distributions: str) -> dict[str, str]:
    versions = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextmanager
def workspace(cache_dir: Path) -> Iterator[Path]:
    """A scratch folder for one operation's outputs, removed afterwards whatever happens."""
    root = cache_dir.parent / "work"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="op-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_format_name(folder: Path) -> str:
    from tailor_runtime.ml.model_io import read_format

    try:
        return read_format(folder)["format"]
    except TailorError:
        return "unknown"


def recipe(
    stage: str,
    method: str,
    config: BaseModel | dict[str, Any],
    inputs: list[str],
    seed: int = 0,
    libraries: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What makes an output: the same recipe on the same inputs gives the same artifact."""
    return {
        "stage": stage,
        "method": method,
        "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
        "inputs": inputs,
        "seed": seed,
        "libraries": library_versions(*libraries),
    }


def dataset_file(manifest: Manifest, suffixes: tuple[str, ...] = (".txt", ".text")) -> str:
    """The one data file of a dataset artifact (by default text: documents separated by blank lines)."""
    texts = [f.path for f in manifest.files if f.path.endswith(suffixes)]
    if len(texts) != 1:
        raise InvalidArgument(
            f"this dataset artifact must hold exactly one {' or '.join(suffixes)} file; "
            f"it holds {[f.path for f in manifest.files]}"
        )
    return texts[0]


# A model's config.json is a few KB; more than this is not a config file.
MAX_CONFIG_BYTES = 1 << 20


def read_model_config(store: ArtifactStore, artifact_id: str) -> dict[str, Any] | None:
    """The parsed config.json of a stored model artifact, read without fetching its weights; None when
    it has none (the stage then says what it cannot load). InvalidArgument when it is not a JSON object."""
    import json

    manifest = store.get_manifest(artifact_id)
    entry = next((f for f in manifest.files if f.path == "config.json"), None)
    if entry is None:
        return None
    if entry.size > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"model: config.json is {entry.size} bytes; a model config is a few KB")
    data = b"".join(store.iter_file(artifact_id, "config.json"))
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"model: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidArgument("model: config.json must hold a JSON object")
    return config


def require_architecture(store: ArtifactStore, artifact_id: str, capability: str) -> None:
    """INVALID_ARGUMENT before any work when the stored model's architecture family cannot take
    `capability` ("quantize/awq"), or is not one Tailor supports; a model without config.json is left
    to the stage's loader, which says what it lacks."""
    from tailor_runtime.ml import architectures

    config = read_model_config(store, artifact_id)
    if config is not None:
        architectures.require(architectures.for_config(config), capability)
