"""One torch thread for a test module: models the size of stories260K gain nothing from intra-op threads,
and on a busy shared machine OpenMP's spin-waiting made the trainer tests 4x slower (80 s instead of 20 s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
