"""The SDK's errors: what went wrong, in words a user can act on (the CLI prints them without a traceback)."""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A mistake or a refusal the caller can act on: a missing file, a bad spec, no gateway."""


class RequestRefused(ClientError, grpc.RpcError):
    """The gateway refused or failed a call. Like grpc's own errors, `code()` is the status
    (INVALID_ARGUMENT, NOT_FOUND, ...) and `details()` the gateway's message, so code written against
    plain gRPC stubs keeps working."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class PipelineFailed(ClientError):
    """A pipeline ended FAILED or CANCELLED; `pipeline` is its last state."""

    def __init__(self, pipeline):
        super().__init__(f"pipeline {pipeline.id} {pipeline.state}: {pipeline.error or 'no reason given'}")
        self.pipeline = pipeline


def refused(exc: grpc.RpcError) -> RequestRefused:
    return RequestRefused(exc.code(), exc.details() or "")
