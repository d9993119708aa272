"""The ``webhook`` sink: each event is an HTTP POST of its JSON envelope, signed with HMAC-SHA256.

Headers sent (see docs/webhooks.md for how to verify them):

* ``X-HMS-ACH-Timestamp``: Unix seconds when the attempt was signed;
* ``X-HMS-ACH-Signature``: ``v1=`` + hex HMAC-SHA256(secret, timestamp + "." + body);
* ``Idempotency-Key``: the same for every attempt of one event (``hms-ach-evt-<id>``);
* ``X-HMS-ACH-Event``: the event name.

Any 2xx is delivered. Everything else (3xx included: redirects are not followed), a timeout or a
connection error is a failed attempt that is retried; ``Retry-After`` on 429/503 is honoured.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import httpx
from pydantic import Field, SecretStr

from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str, tolerance_seconds: float = 300) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, refuse stale timestamps."""
    try:
        age = abs(time.time() - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_seconds and hmac.compare_digest(signature(secret, timestamp, body), header)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class WebhookSink:
    class Config(SinkSettings):
        url: str = Field(description="Where events are POSTed (https://...)")
        secret: SecretStr = Field(
            description="Shared HMAC-SHA256 key; use ${VAR} to read it from the environment"
        )
        headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers")

    def __init__(self, settings: Config, store: Any = None):
        self.settings = settings
        self._client = httpx.AsyncClient(timeout=settings.timeout_seconds, follow_redirects=False)

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        body = delivery.body()
        ts = str(int(time.time()))
        headers = {
            **self.settings.headers,
            "Content-Type": "application/json",
            "X-HMS-ACH-Event": delivery.event,
            "X-HMS-ACH-Timestamp": ts,
            "X-HMS-ACH-Signature": signature(self.settings.secret.get_secret_value(), ts, body),
            "Idempotency-Key": delivery.idempotency_key,
        }
        try:
            response = await self._client.post(self.settings.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timeout after {self.settings.timeout_seconds}s") from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        text = response.text[:2000]
        if 200 <= response.status_code < 300:
            return DeliveryResult(response=f"{response.status_code} {text}".strip())
        raise DeliveryError(
            f"HTTP {response.status_code}",
            response=text,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )

    async def close(self) -> None:
        await self._client.aclose()
