"""Chunked streams: files travel as chunks whose last one carries eof=True."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO, TypeVar

T = TypeVar("T")


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with a flag that is True for the last one (one item of look-ahead)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def read_chunks(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """The file's chunks; an empty file gives one empty chunk so its eof is still sent."""
    first = True
    while chunk := handle.read(size):
        first = False
        yield chunk
    if first:
        yield b""
