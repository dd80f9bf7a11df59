"""Git-like ids: a unique prefix of 8 or more hex characters stands for the whole id."""

from __future__ import annotations

import pytest

from tailor_gateway.ids import resolve
from tailor_runtime.errors import InvalidArgument, NotFound

IDS = ["0123456789abcdef" * 2, "0123456799999999" * 2, "fedcba9876543210" * 2]


def matches(prefix, limit):
    return [i for i in IDS if i.startswith(prefix)][:limit]


def test_a_unique_prefix_is_the_whole_id():
    assert resolve("fedcba98", 32, "pipeline", matches) == IDS[2]
    assert resolve("012345678", 32, "pipeline", matches) == IDS[0]
    assert resolve(IDS[1], 32, "pipeline", matches) == IDS[1]  # a whole id is not looked up


@pytest.mark.parametrize(
    "given, error, message",
    [
        ("01234567", InvalidArgument, "ambiguous"),
        ("0123", InvalidArgument, "too short: give 8 or more"),
        ("XYZ12345", InvalidArgument, "is not an id"),
        ("0" * 40, InvalidArgument, "is not an id"),
        ("", InvalidArgument, "is not an id"),
        ("aaaaaaaa", NotFound, "no pipeline of this project has an id starting with aaaaaaaa"),
    ],
)
def test_what_is_not_one_id_is_refused_with_what_to_give(given, error, message):
    with pytest.raises(error, match=message):
        resolve(given, 32, "pipeline", matches)
