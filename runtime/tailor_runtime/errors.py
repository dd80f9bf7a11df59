"""Domain errors. Each maps to exactly one gRPC status code in `interceptors.py`; nothing else picks codes.

Messages are shown to users: say what was wrong and what would be right, never a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class TailorError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(TailorError):
    """Bad input. Pass `choices` to list the valid values in the message."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, choices: Iterable[str] | None = None):
        self.choices = sorted(choices) if choices is not None else None
        if self.choices is not None:
            message = f"{message}; valid choices: {', '.join(self.choices)}"
        super().__init__(message)


class NotFound(TailorError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(TailorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class VerificationFailed(FailedPrecondition):
    """An export or artifact computed something other than its source; nothing was published."""


class AccuracyGateFailed(FailedPrecondition):
    """A quantized model lost more quality than allowed; nothing was published. `metrics` holds the
    numbers, which the failed operation carries so that a pipeline can report the rejection."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


class ResourceExhausted(TailorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WorkerBusy(ResourceExhausted):
    pass


class IntegrityError(TailorError):
    """Stored bytes do not match their recorded sha256."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(TailorError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(TailorError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TailorError):
    code = grpc.StatusCode.PERMISSION_DENIED


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's (CUDA) OutOfMemoryError, or the CPU allocator refusing ("can't
    allocate memory"), recognised without importing torch."""
    text = str(exc).lower()
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "out of memory" in text
        or "can't allocate memory" in text
    )


class Cancelled(TailorError):
    """Raised inside work when its operation was cancelled (cooperative cancellation)."""

    code = grpc.StatusCode.CANCELLED
