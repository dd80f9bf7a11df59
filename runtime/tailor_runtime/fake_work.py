"""TEST MODE (TAILOR_FAKE_WORK=instant): stage work replaced by a fake, for load tests of the gateway.

Each fake operation waits TAILOR_FAKE_WORK_SECONDS (reporting progress, so cancellation works), then
publishes one small JSON artifact whose format is 'fake-*' and whose recipe says fake: it can never be
mistaken for, or served from the cache in place of, a real model. The settings refuse this mode with an
s3:// store, and every service in it logs a warning at start.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tailor_runtime.store import ArtifactStore

KIND_OF = {"quantize": "model", "finetune": "model", "export": "export", "benchmark": "report"}
WARNING = "TEST MODE: TAILOR_FAKE_WORK is set; stage work is FAKE and its artifacts are markers, not models"


def fake_recipe(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if recipe is None else {**recipe, "fake": True}


def _metrics(seed: str) -> dict[str, float]:
    """Deterministic, plausible benchmark numbers, so the selector has something to choose from."""
    h = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
    return {
        "perplexity": 4.0 + (h % 100) / 100,
        "size_mb": 1.0 + (h % 7),
        "latency_ms_per_token": 1.0 + (h % 13),
        "peak_memory_mb": 100.0 + (h % 50),
        "tokens_per_s": 100.0 + (h % 90),
    }


def fake_work(kind: str, labels: dict[str, str], recipe: dict | None, store: ArtifactStore, seconds: float):
    def work(progress):
        from tailor_runtime.operations import WorkResult

        steps = max(1, int(seconds / 0.1))
        for i in range(steps):
            progress(100.0 * i / steps, "fake", "test mode")
            if seconds:
                time.sleep(seconds / steps)
        identity = {"kind": kind, "recipe": recipe, "labels": {k: labels.get(k, "") for k in sorted(labels)}}
        if recipe is not None:
            identity.pop("labels")  # the same recipe gives the same artifact, whichever pipeline asked
        seed = json.dumps(identity, sort_keys=True)
        metrics = _metrics(seed) if kind == "benchmark" else {}
        with tempfile.TemporaryDirectory(prefix="tailor-fake-") as tmp:
            (Path(tmp) / "fake.json").write_text(json.dumps({**identity, "metrics": metrics}, sort_keys=True))
            manifest = store.publish_directory(
                Path(tmp),
                kind=KIND_OF.get(kind, "report"),
                format=f"fake-{kind}",
                name=f"fake-{kind}",
                recipe=recipe or {"stage": kind, "fake": True, "labels": identity["labels"]},
            )
        return WorkResult(results=[manifest], metrics=metrics)

    return work
