"""The per-client rate limit of the HTTP API (``http.rate_limit``): a token bucket per client.

Each client has a bucket of ``burst`` tokens that refills at ``requests_per_second``; a request
takes one token, and a request finding the bucket empty is answered 429 with ``Retry-After`` (whole
seconds until a token is back) and an OperationOutcome (issue code ``throttled``), or an RFC 9457
problem under ``/api/v1``. ``/health*`` is never limited (probes).

**The client** is the authenticated caller's ``sub`` (for a client-credentials token, the client);
a request without an authenticated caller (the public paths, ``auth.mode: off``) counts against its
source address. So the middleware sits inside authentication, which sets ``request.state.caller``.
Requests that authentication refuses (401) never reach it: their cost is one signature check, and a
reverse proxy may limit them per address.

**Memory is bounded**: a bucket idle long enough to be full again is the same as no bucket, so those
are dropped (oldest first) whenever a new client arrives, and at most ``max_clients`` are kept (the
least recently seen dropped first; such a client starts again with a full bucket).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from hms_ach.app.config import RateLimitSettings
from hms_ach.app.hardening import refusal

#: Paths never limited: the health checks.
EXEMPT_PREFIX = "/health"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per client key, with bounded memory (see the module docstring)."""

    def __init__(
        self,
        requests_per_second: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = requests_per_second
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one token from ``key``'s bucket: 0.0 when the request may go, else the seconds until
        a token is back."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            self._evict(now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            self._buckets.move_to_end(key)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _evict(self, now: float) -> None:
        refill_seconds = self.burst / self.rate
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if now - bucket.updated < refill_seconds:
                break
            self._buckets.popitem(last=False)  # full again: the same as no bucket
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


def client_key(scope: Scope) -> str:
    """Whom a request counts against: ``sub:<sub>`` of an authenticated caller, else
    ``address:<source address>``."""
    state = scope.get("state")
    caller: Any = state.get("caller") if isinstance(state, dict) else None
    if caller is not None and getattr(caller, "authenticated", False):
        return f"sub:{caller.subject}"
    client = scope.get("client")
    return f"address:{client[0] if client else '-'}"


class RateLimitMiddleware:
    """Answers 429 with ``Retry-After`` to a client past its rate (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, settings: RateLimitSettings, clock: Callable[[], float] = time.monotonic
    ):
        self.app = app
        self.buckets = TokenBuckets(settings.requests_per_second, settings.burst, settings.max_clients, clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path.startswith(EXEMPT_PREFIX):
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(client_key(scope))
        if wait <= 0.0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        response = refusal(
            path,
            429,
            "Too many requests",
            "throttled",
            f"this client is over its rate limit (http.rate_limit: {self.buckets.rate:g} requests per second, "
            f"burst {self.buckets.burst:g}); retry after {retry_after} s",
        )
        response.headers["Retry-After"] = str(retry_after)
        await response(scope, receive, send)
