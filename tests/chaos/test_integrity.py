"""Integrity is checked every time bytes are used, not only on first read (issue 23, D4)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tailor_runtime.errors import IntegrityError
from tailor_runtime.store.local import LocalStore
from tailor_runtime.store.s3 import S3Store

RECIPE = {"stage": "quantize", "method": "int8", "inputs": ["x"], "seed": 0}


def _model(root: Path, scale: bytes = b"\x01") -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "weights.bin.safe").write_bytes(scale * 4096)
    return root


def test_a_tampered_cached_copy_is_fetched_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    manifest = store.publish_directory(_model(tmp_path / "m"), kind="model", format="f")
    cache = tmp_path / "cache"
    folder = store.materialize(manifest.id, cache)
    # The worker's cached weights are changed behind its back (same size: only the hash tells).
    (folder / "weights.bin.safe").write_bytes(b"\x02" * 4096)
    again = store.materialize(manifest.id, cache)
    assert (again / "weights.bin.safe").read_bytes() == b"\x01" * 4096


def test_an_extra_file_in_the_cached_copy_is_fetched_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    manifest = store.publish_directory(_model(tmp_path / "m"), kind="model", format="f")
    folder = store.materialize(manifest.id, tmp_path / "cache")
    (folder / "injected.py").write_text("print(1)")
    assert not (store.materialize(manifest.id, tmp_path / "cache") / "injected.py").exists()


@pytest.mark.integration
def test_a_recipe_hit_over_a_corrupted_s3_copy_is_data_loss(tmp_path, s3_server):
    prefix = f"run-{uuid.uuid4().hex[:12]}"
    store = S3Store.from_url(
        f"s3://tailor-test/{prefix}",
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        create_bucket=True,
    )
    manifest = store.publish_directory(_model(tmp_path / "m"), kind="model", format="f", recipe=RECIPE)
    store.remember_recipe(RECIPE, manifest.id)
    assert store.lookup_recipe(RECIPE).id == manifest.id
    s3_server.client().put_object(
        Bucket="tailor-test",
        Key=f"{prefix}/artifacts/{manifest.id}/files/weights.bin.safe",
        Body=b"\x03" * 4096,
    )
    with pytest.raises(IntegrityError, match="weights.bin.safe"):
        store.lookup_recipe(RECIPE)


def test_a_corrupted_store_copy_is_data_loss_on_a_fresh_fetch(tmp_path):
    store = LocalStore(tmp_path / "store")
    manifest = store.publish_directory(_model(tmp_path / "m"), kind="model", format="f")
    (store.root / f"artifacts/{manifest.id}/files/weights.bin.safe").write_bytes(b"\x03" * 4096)
    with pytest.raises(IntegrityError):
        store.materialize(manifest.id, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_rewritten_recipe_index_entry_is_a_miss(tmp_path):
    store = LocalStore(tmp_path / "store")
    full = store.publish_directory(
        _model(tmp_path / "full"), kind="model", format="f", recipe={"stage": "upload"}
    )
    # The index entry for the int8 recipe is rewritten to name the full-precision upload.
    store.remember_recipe(RECIPE, full.id)
    assert store.lookup_recipe(RECIPE) is None


def test_a_download_over_a_corrupt_file_leaves_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")
    manifest = store.publish_directory(_model(tmp_path / "m"), kind="model", format="f")
    (store.root / f"artifacts/{manifest.id}/files/weights.bin.safe").write_bytes(b"\x03" * 4096)
    with pytest.raises(IntegrityError):
        store.download(manifest.id, tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []
