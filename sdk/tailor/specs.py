"""Pipeline specs on the client: read from a file, YAML text or a dict; their local `path:` inputs found,
checked and replaced by artifact ids after upload (the gateway never reads a client's disk)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tailor.errors import ClientError
from tailor_gateway.spec import parse_spec
from tailor_runtime.errors import InvalidArgument


@dataclass
class LocalSpec:
    """A spec as the user gave it: its mapping, and the folder its relative paths are relative to."""

    raw: dict[str, Any]
    base: Path

    @classmethod
    def load(cls, spec: str | Path | dict) -> LocalSpec:
        """A path to a YAML file, YAML text (anything with a newline), or a mapping (paths relative to the
        current directory). Malformed YAML and unknown keys are refused here, naming the field."""
        if isinstance(spec, dict):
            raw, base = copy.deepcopy(spec), Path.cwd()
            text = yaml.safe_dump(raw, sort_keys=False)
        elif isinstance(spec, str) and "\n" in spec:
            text, base = spec, Path.cwd()
        else:
            path = Path(spec)
            if not path.is_file():
                raise ClientError(f"spec file {path} does not exist")
            text, base = path.read_text(), path.parent
        try:
            parse_spec(text, require_artifacts=False)
        except InvalidArgument as exc:
            raise ClientError(exc.message) from None
        raw = yaml.safe_load(text)
        return cls(raw, base)

    def yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)

    def local_inputs(self) -> list[tuple[str, dict]]:
        """(label, node) of every input given as a local `path:`."""
        raw = self.raw
        nodes = [("model", raw.get("model"))]
        nodes += [(f"data.{k}", (raw.get("data") or {}).get(k)) for k in ("train", "eval")]
        for i, candidate in enumerate(raw.get("quantize") or []):
            calibration = (candidate or {}).get("calibration") or {}
            nodes.append((f"quantize[{i}].calibration.data", calibration.get("data")))
        return [(label, node) for label, node in nodes if isinstance(node, dict) and "path" in node]

    def check_local_paths(self) -> None:
        for label, node in self.local_inputs():
            if not (self.base / node["path"]).exists():
                raise ClientError(
                    f"{label}.path: {node['path']} does not exist (relative to {self.base or '.'})"
                )

    def uploaded(self, upload: Callable[[str, Path], str]) -> LocalSpec:
        """A copy with every local input uploaded (`upload(label, path) -> artifact id`) and named by id."""
        done = LocalSpec(copy.deepcopy(self.raw), self.base)
        for label, node in done.local_inputs():
            node["artifact"] = upload(label, (self.base / node.pop("path")).resolve())
        return done
