"""The gateway's per-request check: the bearer token -> a principal, then the token's rate limit."""

from __future__ import annotations

import contextvars

from tailor_gateway.access import Access, Principal
from tailor_gateway.ratelimit import RateLimiter
from tailor_runtime.interceptors import AuthCheck

# The authenticated caller of the current RPC (project and token id), for scoping and the audit log.
current_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_caller", default=None
)


def gateway_auth_check(access: Access, limiter: RateLimiter) -> AuthCheck:
    def check(method: str, metadata: dict[str, str]) -> str:
        principal = access.authenticate(metadata.get("authorization", ""))
        limiter.check(principal.token_id)
        current_caller.set(principal)
        return principal.project

    return check
