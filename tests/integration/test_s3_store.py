"""One behaviour suite for every artifact store backend: the local directory and S3 on a real Ceph RGW.

The S3 runs talk to a real server (tests/support/s3_server.py): signatures are checked, multipart
uploads are real, and corruption is done by overwriting the stored object behind the store's back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.s3_server import free_port

from tailor_runtime.errors import IntegrityError, NotFound, Unauthenticated, Unavailable
from tailor_runtime.store import ArtifactStore, open_store
from tailor_runtime.store.local import LocalStore
from tailor_runtime.store.s3 import MiB, S3Store

pytestmark = pytest.mark.integration

BUCKET = "tailor-test"


@dataclass
class Backend:
    """A store plus a way to reach its raw blobs, as an attacker or a failing disk would."""

    name: str
    store: ArtifactStore
    write_raw: Callable[[str, bytes], None]


def _s3_store(s3_server, prefix: str, **options) -> S3Store:
    return S3Store.from_url(
        f"s3://{BUCKET}/{prefix}",
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        create_bucket=True,
        **options,
    )


def _backend(request, tmp_path: Path, **s3_options) -> Backend:
    if request.param == "local":
        store = LocalStore(tmp_path / "store")
        return Backend("local", store, lambda key, data: (store.root / key).write_bytes(data))
    # Only the S3 runs ask for the server, so `-k local` never starts Ceph.
    s3_server = request.getfixturevalue("s3_server")
    prefix = f"run-{uuid.uuid4().hex[:12]}"
    store = _s3_store(s3_server, prefix, **s3_options)
    client = s3_server.client()
    return Backend(
        "s3", store, lambda key, data: client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=data)
    )


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    return _backend(request, tmp_path)


@pytest.fixture(params=["local", "s3"])
def multipart_backend(request, tmp_path) -> Backend:
    # 5 MiB is S3's smallest part: a 20 MiB file goes up as 4 parts, 2 at a time.
    return _backend(
        request, tmp_path, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2
    )


def _model_dir(root: Path, seed: str = "a") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 64, "seed": seed}))
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "model.safetensors").write_bytes(hashlib.sha256(seed.encode()).digest() * 4096)
    return root


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_publish_then_download_round_trips(backend, tmp_path):
    src = _model_dir(tmp_path / "src")
    manifest = backend.store.publish_directory(src, kind="model", format="hf-safetensors", name="tiny")
    artifact_id = manifest.id

    assert backend.store.exists(artifact_id)
    assert [f.path for f in manifest.files] == ["config.json", "weights/model.safetensors"]
    assert backend.store.get_manifest(artifact_id) == manifest
    assert backend.store.uri_for(artifact_id).endswith(f"/artifacts/{artifact_id}")
    assert backend.store.uri_for(artifact_id).startswith("s3://" if backend.name == "s3" else "file://")

    dest = tmp_path / "dest" / "model"
    assert backend.store.download(artifact_id, dest) == manifest
    assert _same_tree(src, dest)


def test_same_content_gets_the_same_id(backend, tmp_path):
    first = backend.store.publish_directory(_model_dir(tmp_path / "one"), kind="model", format="hf")
    again = backend.store.publish_directory(_model_dir(tmp_path / "one"), kind="model", format="hf")
    elsewhere = backend.store.publish_directory(_model_dir(tmp_path / "two"), kind="model", format="hf")
    different = backend.store.publish_directory(
        _model_dir(tmp_path / "three", "b"), kind="model", format="hf"
    )

    assert first.id == again.id == elsewhere.id
    assert different.id != first.id


def test_corrupted_file_fails_download_and_leaves_nothing(backend, tmp_path):
    manifest = backend.store.publish_directory(_model_dir(tmp_path / "src"), kind="model", format="hf")
    original = (tmp_path / "src" / "weights" / "model.safetensors").read_bytes()
    flipped = bytes([original[0] ^ 0xFF]) + original[1:]  # same size, one bit pattern changed
    backend.write_raw(f"artifacts/{manifest.id}/files/weights/model.safetensors", flipped)

    dest_parent = tmp_path / "downloads"
    with pytest.raises(IntegrityError, match="corrupt"):
        backend.store.download(manifest.id, dest_parent / "model")
    # Neither the destination nor the staging directory is left behind.
    assert list(dest_parent.iterdir()) == []


def test_truncated_file_fails_verification(backend, tmp_path):
    manifest = backend.store.publish_directory(_model_dir(tmp_path / "src"), kind="model", format="hf")
    backend.write_raw(f"artifacts/{manifest.id}/files/config.json", b"{}")

    with pytest.raises(IntegrityError):
        b"".join(backend.store.iter_file(manifest.id, "config.json"))


def test_tampered_manifest_is_refused(backend, tmp_path):
    manifest = backend.store.publish_directory(
        _model_dir(tmp_path / "src"), kind="model", format="hf", metrics={"perplexity": 3.9}
    )
    tampered = manifest.canonical_bytes().replace(b"3.9", b"1.1")
    backend.write_raw(f"artifacts/{manifest.id}/manifest.json", tampered)

    with pytest.raises(IntegrityError, match="does not match its id"):
        backend.store.get_manifest(manifest.id)
    with pytest.raises(IntegrityError):
        backend.store.download(manifest.id, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_missing_artifact_is_not_found(backend, tmp_path):
    missing = "0" * 64
    assert not backend.store.exists(missing)
    with pytest.raises(NotFound, match=missing):
        backend.store.get_manifest(missing)
    with pytest.raises(NotFound):
        backend.store.download(missing, tmp_path / "dest")
    manifest = backend.store.publish_directory(_model_dir(tmp_path / "src"), kind="model", format="hf")
    with pytest.raises(NotFound, match="no file"):
        list(backend.store.iter_file(manifest.id, "absent.bin"))


def test_list_by_kind(backend, tmp_path):
    model = backend.store.publish_directory(_model_dir(tmp_path / "m"), kind="model", format="hf")
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text('{"text": "hello"}\n')
    dataset = backend.store.publish_directory(data_dir, kind="dataset", format="jsonl")

    assert [i for i, _ in backend.store.list_manifests("model")] == [model.id]
    assert [i for i, _ in backend.store.list_manifests("dataset")] == [dataset.id]
    assert sorted(i for i, _ in backend.store.list_manifests()) == sorted([model.id, dataset.id])
    assert backend.store.list_manifests("report") == []


def test_upload_interrupted_before_the_manifest_is_not_an_artifact(backend, tmp_path, monkeypatch):
    src = _model_dir(tmp_path / "src")

    def endpoint_gone(key: str, data: bytes) -> None:
        raise Unavailable("endpoint went away")

    # Every file lands, then the connection drops just as the manifest is written.
    monkeypatch.setattr(backend.store, "_put_bytes", endpoint_gone)
    with pytest.raises(Unavailable):
        backend.store.publish_directory(src, kind="model", format="hf")
    monkeypatch.undo()

    assert backend.store.list_manifests() == []
    # A retry completes the same artifact.
    manifest = backend.store.publish_directory(src, kind="model", format="hf")
    assert backend.store.exists(manifest.id)
    assert [i for i, _ in backend.store.list_manifests()] == [manifest.id]


def test_large_file_round_trips_in_parts(multipart_backend, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(20 * MiB + 123)  # not a whole number of parts
    (src / "model.safetensors").write_bytes(big)
    store = multipart_backend.store
    manifest = store.publish_directory(src, kind="model", format="safetensors")

    chunks = list(store.iter_file(manifest.id, "model.safetensors", chunk_size=MiB))
    assert max(len(c) for c in chunks) <= MiB  # streamed, never one 20 MiB buffer
    assert b"".join(chunks) == big
    store.download(manifest.id, tmp_path / "dest")
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == big

    if isinstance(store, S3Store):
        head = store._client.head_object(
            Bucket=store.bucket, Key=store._key(f"artifacts/{manifest.id}/files/model.safetensors")
        )
        # A multipart object's ETag is "<md5 of part md5s>-<part count>".
        assert head["ETag"].strip('"').endswith("-5")


# --- S3 only: connection, credentials, configuration --------------------------------------------


def test_wrong_secret_key_is_a_clear_error(s3_server, tmp_path, caplog):
    wrong = "definitely-not-the-secret"
    store = S3Store.from_url(
        f"s3://{BUCKET}/wrong-key",
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=wrong,
        max_attempts=1,
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unauthenticated, match="rejected the credentials") as excinfo:
        store.publish_directory(_model_dir(tmp_path / "src"), kind="model", format="hf")
    assert s3_server.endpoint in excinfo.value.message
    with pytest.raises(Unauthenticated):
        store.get_manifest("0" * 64)
    with pytest.raises(Unavailable, match="credentials"):
        store.check_ready()
    # Neither the secret nor the real one appears in a message or a log line.
    assert wrong not in caplog.text and s3_server.secret_key not in caplog.text
    assert wrong not in excinfo.value.message


def test_unreachable_endpoint_is_unavailable(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    store = S3Store.from_url(
        f"s3://{BUCKET}/x",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="AK",
        secret_key="SK",
        max_attempts=2,
        connect_timeout=1,
    )
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}.*unreachable.*nothing was lost"):
        store.check_ready()
    with pytest.raises(Unavailable, match=BUCKET):
        store.publish_directory(_model_dir(tmp_path / "src"), kind="model", format="hf")
    with pytest.raises(Unavailable):
        store.get_manifest("0" * 64)
    with pytest.raises(Unavailable):
        store.list_manifests()


def test_missing_bucket_is_reported_and_can_be_created(s3_server):
    name = f"tailor-new-{uuid.uuid4().hex[:8]}"
    options = dict(
        endpoint_url=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    store = S3Store.from_url(f"s3://{name}/p", **options)
    with pytest.raises(Unavailable, match="does not exist"):
        store.check_ready()
    S3Store.from_url(f"s3://{name}/p", create_bucket=True, **options).check_ready()
    store.check_ready()


def test_settings_come_from_the_environment(s3_server, tmp_path, monkeypatch):
    _s3_store(s3_server, "env").check_ready()  # makes sure the bucket exists
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    store = open_store(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:8]}")
    assert isinstance(store, S3Store)
    store.check_ready()
    manifest = store.publish_directory(_model_dir(tmp_path / "src"), kind="model", format="hf")
    assert store.uri_for(manifest.id) == f"s3://{BUCKET}/{store.prefix}artifacts/{manifest.id}"
    assert store.exists(manifest.id)


def test_a_download_cut_mid_stream_resumes_where_it_stopped(s3_server, tmp_path, monkeypatch):
    from botocore.exceptions import ResponseStreamingError

    store = _s3_store(s3_server, f"resume-{uuid.uuid4().hex[:8]}")
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(3 * MiB + 7)
    (src / "weights.bin").write_bytes(payload)
    manifest = store.publish_directory(src, kind="model", format="raw")

    real_get, requests = store._client.get_object, []

    def flaky_get(**kwargs):
        response = real_get(**kwargs)
        if not kwargs["Key"].endswith("/files/weights.bin"):
            return response  # the manifest
        requests.append(kwargs)
        if len(requests) == 1:  # the first response dies after one chunk, as a dropped connection does
            body, chunks = response["Body"], response["Body"].iter_chunks

            def one_chunk_then_fail(chunk_size):
                yield next(chunks(chunk_size))
                raise ResponseStreamingError(error="connection reset by peer")

            body.iter_chunks = one_chunk_then_fail
        return response

    monkeypatch.setattr(store._client, "get_object", flaky_get)
    data = b"".join(store.iter_file(manifest.id, "weights.bin", chunk_size=MiB))

    assert data == payload
    assert len(requests) == 2
    assert requests[1]["Range"] == f"bytes={MiB}-" and requests[1]["IfMatch"]
