"""Every artifact id and file path that reaches the store from a request is validated first."""

from __future__ import annotations

import pytest

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.store.keys import check_artifact_id, check_relative_path

GOOD_ID = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "path",
    [
        "config.json",
        "weights/model-00001-of-00002.safetensors",
        "tokenizer/vocab+merges@v2=final.txt",
        "a/b/c/d.bin",
        ".hidden",
    ],
)
def test_valid_paths_pass_unchanged(path):
    assert check_relative_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "a/../../x",
        "a/..",
        "..",
        ".",
        "/etc/passwd",
        "//server/share",
        "a\\b",
        "..\\..\\windows",
        "C:\\x",
        "a//b",
        "a/./b",
        "a/",
        "",
        "nul\x00byte",
        "space in name",
        "semi;colon",
        "new\nline",
        "config.json\n",
        "ünïcode",
    ],
)
def test_unsafe_paths_are_refused(path):
    with pytest.raises(InvalidArgument):
        check_relative_path(path)


def test_refusal_says_what_is_expected():
    with pytest.raises(InvalidArgument, match="relative, with forward slashes"):
        check_relative_path("/abs")
    with pytest.raises(InvalidArgument, match="not normalized"):
        check_relative_path("a/../b")


def test_valid_artifact_id():
    assert check_artifact_id(GOOD_ID) == GOOD_ID


@pytest.mark.parametrize(
    "artifact_id",
    [
        "",
        GOOD_ID[:-1],
        GOOD_ID + "0",
        GOOD_ID.upper(),
        "g" * 64,
        "../" + GOOD_ID[3:],
        GOOD_ID[:63] + "/",
        " " + GOOD_ID[1:],
        GOOD_ID + "\n",
    ],
)
def test_bad_artifact_ids_are_refused(artifact_id):
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        check_artifact_id(artifact_id)


def test_none_id_is_refused():
    with pytest.raises(InvalidArgument):
        check_artifact_id(None)  # type: ignore[arg-type]
