"""Uploads refuse what could hurt a loader or the gateway, by content, with INVALID_ARGUMENT (issue 23)."""

from __future__ import annotations

import asyncio
import json
import pickle
import struct
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from tailor.errors import ClientError
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.transfer import refuse_outside_symlinks
from tailor_gateway.artifacts import clean_stale_staging, receive_upload
from tailor_runtime.errors import InvalidArgument, TailorError
from tailor_runtime.store.local import LocalStore


def _upload(tmp_path: Path, files: list[tuple[str, bytes]]):
    async def messages():
        yield pb.UploadArtifactRequest(
            header=pb.UploadHeader(kind="model", format="hf-safetensors", name="m")
        )
        for path, data in files:
            yield pb.UploadArtifactRequest(chunk=pb.FileChunk(path=path, data=data, eof=True))

    store = LocalStore(tmp_path / "store")
    return asyncio.run(receive_upload(messages(), store, 1 << 30, tmp_path / "staging"))


def _refused(tmp_path: Path, files, needle: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        _upload(tmp_path, files)
    message = info.value.message
    assert needle in message
    assert str(tmp_path) not in message and "staging" not in message
    assert not list((tmp_path / "staging").iterdir())  # nothing left behind
    return message


def _safetensors(data_bytes: int = 8, end: int | None = None, length_lie: int = 0) -> bytes:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, end or data_bytes]}}
    ).encode()
    return struct.pack("<Q", len(header) + length_lie) + header + b"\0" * data_bytes


def test_old_protocol_pickle_named_safetensors_is_refused(tmp_path):
    _refused(tmp_path, [("model.safetensors", pickle.dumps({"a": 1}, protocol=0))], "pickle")


def test_old_protocol_pickle_named_tokenizer_model_is_refused(tmp_path):
    _refused(tmp_path, [("tokenizer.model", pickle.dumps([1, 2, 3], protocol=1))], "pickle")


def test_pickle_named_npy_is_refused(tmp_path):
    _refused(tmp_path, [("rng_state.npy", pickle.dumps({"state": 3}, protocol=0))], "pickle")


def test_numpy_object_array_is_refused(tmp_path):
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(118) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + pickle.dumps([1])
    _refused(tmp_path, [("rng_state.npy", npy)], "object array")


def test_torch_save_zip_named_weights_zip_is_refused(tmp_path):
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    _refused(tmp_path, [("weights.zip", buffer.getvalue())], "zip archive")


def test_pickle_behind_one_junk_byte_is_refused(tmp_path):
    _refused(tmp_path, [("weights.dat", b"J" + pickle.dumps({"a": 1}, protocol=4))], "at byte 1")


def test_lying_safetensors_header_length_is_refused(tmp_path):
    _refused(tmp_path, [("model.safetensors", _safetensors(length_lie=1000))], "beyond the file")


def test_safetensors_offsets_beyond_file_are_refused(tmp_path):
    _refused(tmp_path, [("model.safetensors", _safetensors(data_bytes=8, end=4096))], "tensors take 4096")


def test_malformed_safetensors_header_json_is_refused(tmp_path):
    _refused(tmp_path, [("model.safetensors", struct.pack("<Q", 4) + b"{{{{")], "not a JSON tensor table")


def test_malformed_gguf_is_refused(tmp_path):
    _refused(tmp_path, [("model.gguf", b"NOPE" + b"\0" * 32)], "GGUF magic")


def test_malformed_onnx_is_refused(tmp_path):
    _refused(tmp_path, [("model.onnx", b"hello, not protobuf")], "ONNX")


def test_a_valid_safetensors_and_text_are_stored(tmp_path):
    manifest = _upload(tmp_path, [("model.safetensors", _safetensors()), ("notes.txt", b"(Reuters) fine.")])
    assert [f.path for f in manifest.files] == ["model.safetensors", "notes.txt"]


def test_file_then_folder_of_same_name_is_invalid_argument(tmp_path):
    _refused(tmp_path, [("a", b"x"), ("a/b", b"y")], "is a file in this upload")


def test_folder_then_file_of_same_name_is_invalid_argument(tmp_path):
    _refused(tmp_path, [("a/b", b"y"), ("a", b"x")], "is a folder in this upload")


def test_over_long_name_is_invalid_argument(tmp_path):
    _refused(tmp_path, [("x" * 300, b"x")], "longer than 255 bytes")


def test_over_long_path_is_invalid_argument(tmp_path):
    _refused(tmp_path, [("/".join(["d" * 200] * 6), b"x")], "longer than 1024 bytes")


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b"])
def test_traversal_and_absolute_paths_are_refused(tmp_path, path):
    _refused(tmp_path, [(path, b"x")], "file path")


def test_more_files_than_the_limit_are_refused_and_nothing_is_published(tmp_path):
    # D6: 36,000 empty files tied the gateway up and were published anyway; the limit stops the upload
    # at the first file over it, before anything reaches the store.
    async def messages():
        yield pb.UploadArtifactRequest(header=pb.UploadHeader(kind="dataset", format="text", name="many"))
        for i in range(50):
            yield pb.UploadArtifactRequest(chunk=pb.FileChunk(path=f"f{i}.txt", data=b"", eof=True))

    store = LocalStore(tmp_path / "store")
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(receive_upload(messages(), store, 1 << 30, tmp_path / "staging", max_files=20))
    assert "more than 20 files" in info.value.message
    assert not list((tmp_path / "staging").iterdir())
    assert not store.list_manifests()


def test_empty_upload_names_no_staging_path(tmp_path):
    _refused(tmp_path, [], "holds no files")


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "leak.txt").symlink_to(secret)
    with pytest.raises(ClientError, match="symbolic link to a file outside the folder"):
        refuse_outside_symlinks(folder)


def test_symlink_inside_the_folder_is_allowed(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    (folder / "b.txt").symlink_to(folder / "a.txt")
    refuse_outside_symlinks(folder)


def test_stale_staging_folders_are_cleaned_at_start_up(tmp_path):
    stale = tmp_path / "upload-dead"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    kept = tmp_path / "other"
    kept.mkdir()
    assert clean_stale_staging(tmp_path, started=stale.stat().st_mtime + 1) == 1
    assert not stale.exists() and kept.exists()


def test_full_disk_fails_cleanly_with_resource_exhausted(tmp_path):
    """RLIMIT_FSIZE in a child process stands in for a full disk (EFBIG, like ENOSPC)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_upload_under_size_limit, args=(tmp_path, queue))
    process.start()
    process.join(60)
    code, message = queue.get(timeout=5)
    assert code == "RESOURCE_EXHAUSTED", message
    assert str(tmp_path) not in message
    assert not list((tmp_path / "staging").iterdir())


def _upload_under_size_limit(tmp_path: Path, queue) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        _upload(tmp_path, [("notes.txt", b"a line of text\n" * 1000)])
        queue.put(("OK", ""))
    except TailorError as exc:
        queue.put((exc.code.name, exc.message))
    except BaseException as exc:  # noqa: BLE001
        queue.put((type(exc).__name__, str(exc)))


def test_a_lying_safetensors_header_in_the_store_is_invalid_argument_at_fetch(tmp_path):
    """A hub import or stage output skips the upload checks; the worker's fetch still refuses it."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(_safetensors(data_bytes=8, end=1 << 20))
    store = LocalStore(tmp_path / "store")
    manifest = store.publish_directory(folder, kind="model", format="hf-safetensors")
    with pytest.raises(InvalidArgument, match="model.safetensors: is not a valid safetensors file"):
        store.materialize(manifest.id, tmp_path / "cache")
