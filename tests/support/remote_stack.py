"""A real local stack on ports of its own, reached the way a remote gateway is: only through
TAILOR_GATEWAY and TAILOR_TOKEN (an empty state dir, so nothing is found from `tailor up`'s files)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tailor_cli.stack import Stack, free_base_port


@contextmanager
def started_stack(state_dir: Path, first_port: int) -> Iterator[Stack]:
    stack = Stack(state_dir, base_port=free_base_port(start=first_port))
    stack.start(timeout=300)
    try:
        yield stack
    finally:
        stack.stop()


def gateway_env(stack: Stack, empty_state_dir: Path) -> dict[str, str]:
    return {**os.environ, "TAILOR_GATEWAY": stack.address("gateway"), "TAILOR_TOKEN": stack.token,
            "TAILOR_STATE_DIR": str(empty_state_dir)}  # fmt: skip
