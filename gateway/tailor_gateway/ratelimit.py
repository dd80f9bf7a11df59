"""Per-token rate limits: a token bucket for each API token, refilled continuously.

A caller over its limit gets RESOURCE_EXHAUSTED with the wait in the message and in the trailing
metadata `retry-after-ms`, so a client can back off by exactly as much as needed.
"""

from __future__ import annotations

import math
import threading
import time

from tailor_runtime.errors import ResourceExhausted

RETRY_AFTER_KEY = "retry-after-ms"


class RateLimited(ResourceExhausted):
    def __init__(self, retry_after_s: float, rate: float):
        millis = max(1, math.ceil(retry_after_s * 1000))
        super().__init__(
            f"rate limit of {rate:g} requests/s for this token exceeded: retry after {millis} ms"
        )
        self.retry_after_s = retry_after_s
        # Sent as trailing metadata by the error interceptor.
        self.trailers = ((RETRY_AFTER_KEY, str(millis)),)


class RateLimiter:
    """rate requests per second on average, bursts of up to `burst`; rate <= 0 disables limiting."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, max(burst, 1.0), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise RateLimited((1.0 - tokens) / self.rate, self.rate)
            self._buckets[key] = (tokens - 1.0, now)
