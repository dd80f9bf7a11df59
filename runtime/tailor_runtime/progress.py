"""How domain code reports progress and learns it was cancelled, without knowing about gRPC.

Long-running domain functions take a `progress: ProgressFn` argument and call it now and then:

    progress(40.0, "training", "step 12/30", loss=2.31)

The call raises `tailor_runtime.errors.Cancelled` once the operation was cancelled, so cancellation
stops work at the next report. Call it at least every few seconds of work.
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, percent: float, phase: str = "", message: str = "", **metrics: float) -> None: ...


def no_progress(percent: float, phase: str = "", message: str = "", **metrics: float) -> None:
    """A ProgressFn for scripts and tests that do not follow progress."""
