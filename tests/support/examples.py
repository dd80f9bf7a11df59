"""The bundled example model and data, uploaded through a gateway connection."""

from __future__ import annotations

from pathlib import Path

from tailor.connection import Connection
from tailor.transfer import upload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def upload_example_inputs(conn: Connection) -> dict:
    """Spec-shaped inputs: {"model": {"artifact": id}, "data": {"train": {...}, "eval": {...}}}."""
    return {
        "model": {"artifact": upload(conn, EXAMPLES / "models" / "stories260K").artifact.id},
        "data": {
            "train": {"artifact": upload(conn, EXAMPLES / "data" / "tinystories_train.txt").artifact.id},
            "eval": {"artifact": upload(conn, EXAMPLES / "data" / "tinystories_eval.txt").artifact.id},
        },
    }
