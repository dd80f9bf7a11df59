"""What the web tests share: the bundled inputs and talking HTTP to the API as a page does."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from support.examples import EXAMPLES

MODEL = EXAMPLES / "models" / "stories260K"
EVAL = EXAMPLES / "data" / "tinystories_eval.txt"
# The benchmark settings of tests/integration/test_sdk.py: a few seconds per candidate here.
QUICK_BENCHMARK = {
    "config": {"max_eval_tokens": 512, "context_length": 128, "stride": 64, "latency_new_tokens": 4,
               "warmup": 0, "repetitions": 1, "threads": 1}
}  # fmt: skip


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload_folder(http: httpx.Client, token: str, folder: Path, kind: str, fmt: str) -> dict:
    """A folder over HTTP as a page sends one: multipart, each file's filename its relative path."""
    files = [("file", (p.relative_to(folder).as_posix(), p.open("rb"), "application/octet-stream"))
             for p in sorted(folder.rglob("*")) if p.is_file()]  # fmt: skip
    try:
        reply = http.post("/api/v1/artifacts", params={"kind": kind, "format": fmt, "name": folder.name},
                          files=files, headers=auth(token))  # fmt: skip
    finally:
        for _, (_, handle, _) in files:
            handle.close()
    assert reply.status_code == 200, reply.text
    return reply.json()


def sse_events(http, token: str, pipeline_id: str) -> list[tuple[str, dict]]:
    """Every (event, data) of the watch stream until the server ends it."""
    events, name, data = [], "", []
    with http.stream("GET", f"/api/v1/pipelines/{pipeline_id}/events", headers=auth(token)) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line.split(":", 1)[1].strip())
            elif not line and name:
                events.append((name, json.loads("\n".join(data))))
                name, data = "", []
    return events
