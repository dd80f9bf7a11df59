"""Models from the Hugging Face Hub, through huggingface_hub's own code, stored once as an artifact.

`import_from_hub(store, repo, revision)` resolves the revision to a commit, answers from the store's
recipe index when that commit was imported before (`{stage: import, hub: repo, commit: sha}`: nothing is
downloaded), else runs `snapshot_download` for the files a transformers folder needs (safetensors, JSON,
tokenizer files; never pickles) into the Hub cache (`HF_HUB_CACHE` / `HF_HOME`, as the library lays it
out), publishes them as a content-addressed `model` artifact and indexes the recipe.

The token comes from `HF_TOKEN` (the chart mounts it from a Secret); it is handed to huggingface_hub and
never logged or put in a message. huggingface_hub's errors become the domain errors users see, each with
what to do (`_translated`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tailor_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    TailorError,
    Unavailable,
)
from tailor_runtime.ml.model_io import WEIGHT_FILES, infer_format
from tailor_runtime.store import ArtifactStore, Manifest

log = logging.getLogger(__name__)

# What a transformers folder needs: weights as safetensors, config/index/generation/tokenizer JSON,
# SentencePiece (*.model), BPE merges/vocab (*.txt), tiktoken files. Top-level files only: sub-folders
# (`original/` with .pth checkpoints) and Mistral's `consolidated.safetensors` duplicate the weights.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
IGNORE_PATTERNS = ["*/*", "consolidated*"]
# huggingface_hub's own rule (validate_repo_id) plus the org/name shape a model needs.
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_CONFIG_BYTES = 1 << 20
TOKEN_HINT = "set HF_TOKEN on the gateway (in the chart: hub.tokenSecret, a Secret with key 'token')"


def check_repo(repo: str) -> str:
    if not isinstance(repo, str) or not _REPO.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise InvalidArgument(
            f"model.hub {repo!r} is not a Hugging Face model id: expected 'org/name' "
            "(letters, digits, '-', '_', '.'; e.g. Qwen/Qwen2.5-0.5B)"
        )
    return repo


def check_revision(revision: str | None) -> str:
    """None means main; anything else must look like a branch, tag or commit."""
    revision = "main" if revision is None else revision
    if (
        not isinstance(revision, str)
        or not _REVISION.match(revision)
        or ".." in revision
        or revision.endswith("/")
    ):
        raise InvalidArgument(
            f"model.revision {revision!r} is not a branch, tag or commit (e.g. main, v1.0, or 40 hex digits)"
        )
    return revision


def import_recipe(repo: str, commit: str) -> dict[str, Any]:
    return {"stage": "import", "hub": repo, "commit": commit}


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


@contextmanager
def _translated(repo: str, revision: str) -> Iterator[None]:
    """huggingface_hub's exceptions -> InvalidArgument / FailedPrecondition / Unavailable, with what to do."""
    import httpx
    from huggingface_hub import errors as hf

    where = f"{repo}@{revision}"
    try:
        yield
    except TailorError:
        raise
    except hf.GatedRepoError:
        raise FailedPrecondition(
            f"model.hub {repo} is gated: accept its conditions at https://huggingface.co/{repo} with the "
            f"account whose token the gateway uses, and {TOKEN_HINT}"
        ) from None
    except hf.RevisionNotFoundError:
        raise InvalidArgument(
            f"model.revision {revision!r} does not exist in {repo}: give a branch, tag or commit of it"
        ) from None
    except hf.RepositoryNotFoundError:
        raise InvalidArgument(
            f"model.hub {repo} was not found on the Hugging Face Hub (a private repository reads the same "
            f"without a token: {TOKEN_HINT})"
        ) from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, hf.IncompleteSnapshotError):
        mode = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise Unavailable(
            f"cannot fetch {where} from the Hugging Face Hub: {mode}, and it is not in the Hub cache "
            f"{_cache_dir()} (HF_HUB_CACHE); let the gateway reach huggingface.co, fill the cache, or give "
            "the model as `artifact:` (an id in the store) or `path:` (a local folder the CLI uploads)"
        ) from None
    except hf.RemoteEntryNotFoundError:
        raise InvalidArgument(
            f"{where} has no config.json: it is not a transformers model folder (expected config.json, "
            "safetensors weights and a tokenizer)"
        ) from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise FailedPrecondition(
                f"the Hugging Face Hub refused the gateway's token for {repo} (HTTP {status}): {TOKEN_HINT} "
                "with a token that can read it"
            ) from None
        raise Unavailable(
            f"the Hugging Face Hub failed for {where} (HTTP {status}); try again later"
        ) from None
    except (httpx.HTTPError, OSError) as exc:
        raise Unavailable(
            f"cannot reach the Hugging Face Hub for {where} ({type(exc).__name__}); check the gateway's "
            "network, or give the model as `artifact:` or `path:`"
        ) from None


def resolve_commit(repo: str, revision: str, token: str | None = None) -> str | None:
    """The commit sha of repo@revision: itself when it is one; None when offline (the cache decides)."""
    if _COMMIT.match(revision):
        return revision
    if _offline():
        return None
    from huggingface_hub import HfApi

    with _translated(repo, revision):
        return HfApi().model_info(repo, revision=revision, token=token).sha


def find_imported(store: ArtifactStore, repo: str, commit: str | None) -> Manifest | None:
    if commit is None:
        return None
    return store.lookup_recipe(import_recipe(repo, commit))


def import_from_hub(
    store: ArtifactStore,
    repo: str,
    revision: str | None,
    staging_root: Path,
    token: str | None = None,
) -> tuple[Manifest, bool]:
    """(manifest, cached): the model artifact of repo@revision; cached means nothing was downloaded."""
    from huggingface_hub import snapshot_download

    repo, revision = check_repo(repo), check_revision(revision)
    token = token or hub_token()
    commit = resolve_commit(repo, revision, token)
    found = find_imported(store, repo, commit)
    if found is not None:
        log.info("hub import %s@%s: commit %s already in the store as %s", repo, revision, commit, found.id)
        return found, True
    with _translated(repo, revision):
        snapshot = Path(
            snapshot_download(
                repo,
                revision=commit or revision,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                token=token,
            )
        )
    commit = snapshot.name  # the cache's snapshots/<commit> folder
    found = find_imported(store, repo, commit)
    if found is not None:
        return found, True
    if not any((snapshot / name).is_file() for name in WEIGHT_FILES):
        raise FailedPrecondition(
            f"{repo}@{revision} has no safetensors weights ({' or '.join(WEIGHT_FILES)}); the gateway never "
            "downloads pickles. If it has only pytorch_model.bin: `hf download "
            f"{repo} --local-dir DIR`, then `tailor models import DIR` converts it with "
            "torch.load(weights_only=True) and uploads safetensors"
        )
    staging_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="hub-", dir=staging_root))
    try:
        _link_snapshot(snapshot, folder)
        fmt = infer_format(folder)
        manifest = store.publish_directory(
            folder,
            kind="model",
            format=fmt["format"],
            name=repo,
            recipe=import_recipe(repo, commit),
            metrics={},
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    store.remember_recipe(import_recipe(repo, commit), manifest.id)
    log.info("hub import %s@%s (commit %s): published %s", repo, revision, commit, manifest.id)
    return manifest, False


def _link_snapshot(snapshot: Path, folder: Path) -> None:
    """The snapshot's files (symlinks into blobs/) as regular files: hard links, a copy across devices.

    Filtered by the same patterns as the download: a cache shared with other tools can hold more of the
    repo (a pytorch_model.bin that transformers fetched) than the import asked for."""
    from huggingface_hub.utils import filter_repo_objects

    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    wanted = filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    for rel in sorted(wanted):
        path = snapshot / rel
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = path.resolve()
        try:
            os.link(blob, target)
        except OSError:
            shutil.copyfile(blob, target)


def read_config(repo: str, revision: str | None, token: str | None = None) -> dict[str, Any]:
    """The parsed config.json of repo@revision, downloading only that file (for the submit-time check)."""
    from huggingface_hub import hf_hub_download

    repo, revision = check_repo(repo), check_revision(revision)
    with _translated(repo, revision):
        path = Path(hf_hub_download(repo, "config.json", revision=revision, token=token or hub_token()))
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidArgument(
            f"{repo}: config.json is {path.stat().st_size} bytes; a model config is a few KB"
        )
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{repo}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{repo}: config.json must hold a JSON object")
    return config
