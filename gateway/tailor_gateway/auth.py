"""The gateway's per-request check: the bearer token -> a principal, then the token's rate limit.

A token verified in the last few seconds is admitted on the event loop from Access's cache (a dict
lookup and a stat); any other is read from the database on a thread, so a slow or restarting database
never stalls the loop (issue 23). A busy token is re-read in the background before its entry expires.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from tailor_gateway.access import Access, Principal
from tailor_gateway.ratelimit import RateLimiter
from tailor_runtime.interceptors import AuthCheck

log = logging.getLogger("tailor.gateway.auth")

# The authenticated caller of the current RPC (project and token id), for scoping and the audit log.
current_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_caller", default=None
)


def gateway_auth_check(access: Access, limiter: RateLimiter) -> AuthCheck:
    """The check for ServerInterceptor: returns the project at once on a cache hit, else an awaitable."""

    def admit(principal: Principal) -> str:
        limiter.check(principal.token_id)
        current_caller.set(principal)
        return principal.project

    async def verify(header: str) -> str:
        return admit(await asyncio.to_thread(access.authenticate, header))

    def check(method: str, metadata: dict[str, str]):
        header = metadata.get("authorization", "")
        hit = access.cached_principal(header)
        if hit is None:
            return verify(header)
        principal, due = hit
        if due:
            _refresh_in_background(access, header)
        return admit(principal)

    return check


def _refresh_in_background(access: Access, header: str) -> None:
    # A revoked token is dropped from the cache by authenticate itself; nothing waits on this.
    future = asyncio.get_running_loop().run_in_executor(None, access.authenticate, header)
    future.add_done_callback(_note_failure)


def _note_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.debug("background token re-read failed: %s", type(exc).__name__)
